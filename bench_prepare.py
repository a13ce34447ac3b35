"""
How fast prepare.py turns a large corpus into GPT-2 tokens and how much memory it needs, next to a plain
baseline in the same run: read every document, encode them one after another in one process, write.

    python bench_prepare.py                          # corpora of 200 MB and 400 MB
    python bench_prepare.py --mb=5 --workers=1       # a quick look
    python bench_prepare.py --curate                 # and with --quality=web --near_dedup=0.8 --redact_pii
    python bench_prepare.py --near_dup_docs=20000    # near-duplicate removal alone: found, missed, MB/s

The corpus is .jsonl files of planted_documents: headers, paragraphs of random lines of tiny shakespeare
(--source, by default data/shakespeare_char/input.txt) and footers, 2% of them exact copies of an earlier one
and 5% near copies. Every run is its own process; its memory is the peak, sampled every 50 ms, of the
proportional set size (PSS) summed over it and its worker processes (Linux /proc), and its CPU time theirs
together. Timings drift on shared machines: compare the ratios, measured side by side.
"""

import argparse
import itertools
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
CURATE_OPTIONS = ['--quality=web', '--near_dedup=0.8', '--redact_pii']  # --curate's


HEADERS = ['Posted by {name} on {date}', '{site} > {section} > page {n}', '{section} | {site}', 'By {name}, {date}',
           'Posted from {ip} on {date}']
FOOTERS = ['Copyright {year} {site}. All rights reserved.', 'Filed under {section}. {n} comments',
           'Share this article: email, print, post', 'Written by {name} for {site} on {date}.',
           'Corrections to {email}, please.']
NAMES = ['Ann Lee', 'Bo Chen', 'Carla Diaz', 'Dev Patel', 'Eve Stone', 'Femi Ade', 'Gus Berg', 'Hana Sato']
SITES = ['example.org', 'The Daily Quill', 'Riverside News', 'Stage Notes', 'The Globe Review']
SECTIONS = ['News', 'Theatre', 'Opinion', 'Culture', 'Letters', 'History']


def frame(rng, template):
    """A header or footer line: a template with its fields drawn at random, so pages of a site share its words
    (and some have PII for --redact_pii: an email, a public IPv4 or IPv6 address)."""
    name = rng.choice(NAMES)
    ip = rng.choice([f'{rng.randint(11, 99)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}',
                     f'2a00:{rng.randint(0, 0xffff):x}::{rng.randint(1, 0xffff):x}'])
    return template.format(name=name, site=rng.choice(SITES), section=rng.choice(SECTIONS), ip=ip,
                           email=f"{name.lower().replace(' ', '.')}@{rng.choice(['mail.com', 'quill.net'])}",
                           n=rng.randint(1, 999), year=rng.randint(1995, 2025),
                           date=f'{rng.randint(1, 28)} {rng.choice(["May", "June", "July"])} {rng.randint(1995, 2025)}')


def different(old, draw):
    """draw() until it gives something other than old: a near copy is never an exact one."""
    while (new := draw()) == old:
        pass
    return new


def planted_documents(lines, seed=0, duplicates=0.02, near_duplicates=0.05):
    """Endless documents as (text, kind, the number of the document it copies or None). A new one ('new') is a
    header, 2-10 paragraphs of 4-24 lines drawn at random from `lines`, and a footer. Of the others, drawn from
    the last 1,000, `duplicates` are exact copies ('exact') and `near_duplicates` near copies, a third each:
    5-10% of the words changed in runs of 1-8 words, as an edit rewrites a phrase ('edited'); the paragraphs
    in another order ('reordered'); another header or footer ('reframed')."""
    rng, recent, words = random.Random(seed), [], ' '.join(lines).split()
    for number in itertools.count(1):
        kind = rng.choices(['new', 'exact', 'near'], [1 - duplicates - near_duplicates, duplicates, near_duplicates])[0]
        if kind == 'new' or not recent:
            header, footer = frame(rng, rng.choice(HEADERS)), frame(rng, rng.choice(FOOTERS))
            paragraphs = ['\n'.join(rng.choice(lines) for _ in range(rng.randint(4, 24)))
                          for _ in range(rng.randint(2, 10))]
            recent = recent[-999:] + [(number, header, paragraphs, footer)]
            yield '\n\n'.join([header, *paragraphs, footer]), 'new', None
            continue
        original, header, paragraphs, footer = rng.choice(recent)
        if kind == 'near':
            kind = rng.choice(['edited', 'reordered', 'reframed'])
        if kind == 'edited':
            tokens = '\n\n'.join(paragraphs).split(' ')  # a line break stays inside its token
            changed, goal = set(), rng.uniform(0.05, 0.10) * len(tokens)
            while len(changed) < goal:
                start = rng.randrange(len(tokens))
                changed.update(range(start, min(start + rng.randint(1, 8), len(tokens))))
            paragraphs = [' '.join(rng.choice(words) if i in changed else token for i, token in enumerate(tokens))]
        elif kind == 'reordered':
            paragraphs = different(paragraphs, lambda: rng.sample(paragraphs, len(paragraphs)))
        elif kind == 'reframed' and rng.random() < 0.5:
            header = different(header, lambda: frame(rng, rng.choice(HEADERS)))
        elif kind == 'reframed':
            footer = different(footer, lambda: frame(rng, rng.choice(FOOTERS)))
        yield '\n\n'.join([header, *paragraphs, footer]), kind, original


def make_corpus(directory, megabytes, source, seed=0):
    """.jsonl files of about 50 MB of planted_documents; returns their total size in bytes."""
    with open(source, encoding='utf-8') as f:
        lines = [line for line in f.read().split('\n') if line.strip()]
    size, file, n_files = 0, None, 0
    os.makedirs(directory, exist_ok=True)
    for text, _, _ in planted_documents(lines, seed):
        if size >= megabytes * 1e6:
            break
        if file is None or file.tell() > 50e6:
            file = open(os.path.join(directory, f'part_{n_files:03d}.jsonl'), 'w', encoding='utf-8')
            n_files += 1
        line = json.dumps({'text': text}) + '\n'
        file.write(line)
        size += len(line)
    file.close()
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))


def baseline(corpus, out_path):
    """The plain way: every document in memory, one process encodes them all, then one write."""
    import numpy as np
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    docs = []
    for name in sorted(os.listdir(corpus)):
        with open(os.path.join(corpus, name), encoding='utf-8') as f:
            docs += [json.loads(line)['text'] for line in f]
    ids = []
    for doc in docs:
        ids.append(enc.eot_token)
        ids.extend(enc.encode_ordinary(doc))
    np.array(ids, dtype=np.uint16).tofile(out_path)
    print(f"{len(ids):,} tokens")


def tree_pss_mb(pid):
    """The PSS of a process and its descendants, in MB (0 where /proc doesn't tell)."""
    total, stack = 0, [pid]
    while stack:
        pid = stack.pop()
        try:
            with open(f'/proc/{pid}/smaps_rollup') as f:
                total += next(int(line.split()[1]) for line in f if line.startswith('Pss:'))
            for tid in os.listdir(f'/proc/{pid}/task'):
                with open(f'/proc/{pid}/task/{tid}/children') as f:
                    stack += [int(child) for child in f.read().split()]
        except (OSError, StopIteration):  # gone meanwhile, or not Linux
            pass
    return total / 1024


def measure(cmd, cwd):
    """(wall seconds, peak MB, what it printed, CPU seconds of it and its processes) of a command."""
    t0, peak, cpu0 = time.perf_counter(), 0.0, resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while proc.poll() is None:
        peak = max(peak, tree_pss_mb(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    output = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode})")
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # its workers too: it waited for them, we for it
    return seconds, peak, output, cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime


def near_duplicate_recall(lines, n_documents, threshold=0.8):
    """Sign n planted_documents in this process and look them up, in order, as prepare.py does; returns
    ({kind: (documents, removed)}, seconds), and the same with datasketch (MinHash and MinHashLSH with the same
    bands and rows, over the same words) where it is installed, else None."""
    import curate
    import numpy as np
    documents = list(itertools.islice(planted_documents(lines), n_documents))
    bands, rows = curate.lsh_shape(threshold)
    results, t0 = {}, time.perf_counter()
    index = curate.SeenHashes()
    for start in range(0, n_documents, 300):  # in batches, as prepare.py's workers judge them
        batch = documents[start:start + 300]
        verdicts = curate.judge_batch((({}, bands, rows), [text for text, _, _ in batch]))
        new = index.add_rows(np.stack([keys for _, keys in verdicts]))
        for (_, kind, _), is_new in zip(batch, new):
            results[kind] = tuple(a + b for a, b in zip(results.get(kind, (0, 0)), (1, not is_new)))
    ours = results, time.perf_counter() - t0, index.nbytes() / n_documents
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        return ours, None
    results, t0 = {}, time.perf_counter()
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    word = re.compile(r'[a-z0-9\x80-\U0010ffff]+')  # curate.word_hashes's words
    for number, (text, kind, _) in enumerate(documents):
        words = word.findall(text.lower())
        signature = MinHash(num_perm=bands * rows, seed=1)
        signature.update_batch([' '.join(words[i:i + 5]).encode() for i in range(max(len(words) - 4, 1))])
        removed = bool(lsh.query(signature))
        lsh.insert(number, signature)
        results[kind] = tuple(a + b for a, b in zip(results.get(kind, (0, 0)), (1, removed)))
    return ours, (results, time.perf_counter() - t0, None)


def print_recall(lines, n_documents):
    import curate
    mb = sum(len(text.encode()) for text, _, _ in itertools.islice(planted_documents(lines), n_documents)) / 1e6
    ours, theirs = near_duplicate_recall(lines, n_documents)
    print(f"{n_documents:,} documents ({mb:.1f} MB), --near_dedup=0.8 ({'x'.join(map(str, curate.lsh_shape(0.8)))} "
          "bands x rows): the share of each kind removed")
    kinds = ['new', 'exact', 'edited', 'reordered', 'reframed']
    print("| MinHash | " + " | ".join(kinds) +
          " | near duplicates found | new ones removed | MB/s | index bytes per document |")
    print("|---" * (len(kinds) + 5) + "|")
    for name, result in (('numpy (curate.py)', ours), ('datasketch', theirs)):
        if result is None:
            print(f"| {name} | not installed: pip install datasketch |")
            continue
        counts, seconds, index_bytes = result
        near = [counts.get(kind, (0, 0)) for kind in ('edited', 'reordered', 'reframed')]
        print(f"| {name} | " + " | ".join(f"{counts[k][1] / counts[k][0]:.1%}" if k in counts else '-' for k in kinds) +
              f" | {sum(r for _, r in near) / max(sum(n for n, _ in near), 1):.1%} | "
              f"{counts['new'][1] / counts['new'][0]:.2%} | {mb / seconds:.1f} | "
              + (f"{index_bytes:.0f} |" if index_bytes else "- |"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mb', type=float, default=200, help='the smaller corpus, in MB; the larger is twice that')
    parser.add_argument('--workers', type=int, help="prepare.py's --workers (default: one per core)")
    parser.add_argument('--source', default=os.path.join('data', 'shakespeare_char', 'input.txt'))
    parser.add_argument('--workdir', default='bench-prepare', help='where the corpora and outputs go (deleted after)')
    parser.add_argument('--curate', action='store_true', help='also prepare.py ' + ' '.join(CURATE_OPTIONS))
    parser.add_argument('--near_dup_docs', type=int, help='only measure near-duplicate removal on this many documents')
    parser.add_argument('--baseline', help=argparse.SUPPRESS)  # internal: run the baseline on this corpus
    args = parser.parse_args()
    if args.baseline:
        return baseline(args.baseline, os.path.join(args.workdir, 'baseline.bin'))
    if not os.path.exists(args.source):
        sys.exit(f"error: no source text at {args.source}: run python prepare.py shakespeare_char, or pass --source=FILE")
    if args.near_dup_docs:
        with open(args.source, encoding='utf-8') as f:
            return print_recall([line for line in f.read().split('\n') if line.strip()], args.near_dup_docs)

    rows, curated_rows = [], []
    prepare_cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), 'bench'] + (
        [f'--workers={args.workers}'] if args.workers else [])
    try:
        for megabytes in (args.mb, 2 * args.mb):
            corpus = os.path.abspath(os.path.join(args.workdir, f'corpus_{megabytes:g}MB'))
            n_bytes = make_corpus(corpus, megabytes, args.source)
            base_s, base_mb, base_out, _ = measure([sys.executable, __file__, f'--baseline={corpus}',
                                                 f'--workdir={args.workdir}'], cwd=os.getcwd())
            ours_s, ours_mb, ours_out, ours_cpu = measure(prepare_cmd + [f'--input={corpus}'], cwd=args.workdir)
            rows.append((n_bytes / 1e6, base_s, base_mb, ours_s, ours_mb))
            print(f"{n_bytes / 1e6:.0f} MB: baseline {base_out[-1]}; prepare.py {tokens_line(ours_out)}")
            if args.curate:
                cur_s, cur_mb, cur_out, cur_cpu = measure(prepare_cmd + [f'--input={corpus}'] + CURATE_OPTIONS,
                                                          cwd=args.workdir)
                curated_rows.append((n_bytes / 1e6, ours_s, ours_mb, ours_cpu, cur_s, cur_mb, cur_cpu))
                print(f"{n_bytes / 1e6:.0f} MB, prepare.py {' '.join(CURATE_OPTIONS)}:", *cur_out, sep='\n  ')
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)

    print("| corpus | baseline MB/s | baseline peak MB | prepare.py MB/s | prepare.py peak MB | speed ratio |")
    print("|---|---|---|---|---|---|")
    for mb, base_s, base_mb, ours_s, ours_mb in rows:
        print(f"| {mb:,.0f} MB | {mb / base_s:.1f} | {base_mb:,.0f} | {mb / ours_s:.1f} | {ours_mb:,.0f} | "
              f"{base_s / ours_s:.2f}x |")
    if curated_rows:
        print(f"\n| corpus | prepare.py MB/s | peak MB | CPU s | with {' '.join(CURATE_OPTIONS)}: MB/s | peak MB | "
              "CPU s | speed ratio | CPU time ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for mb, ours_s, ours_mb, ours_cpu, cur_s, cur_mb, cur_cpu in curated_rows:
            print(f"| {mb:,.0f} MB | {mb / ours_s:.1f} | {ours_mb:,.0f} | {ours_cpu:.1f} | {mb / cur_s:.1f} | "
                  f"{cur_mb:,.0f} | {cur_cpu:.1f} | {ours_s / cur_s:.2f}x | {ours_cpu / cur_cpu:.2f}x |")


def tokens_line(output):
    return next((line for line in output if line.startswith('train.bin:')), output[-1])


if __name__ == '__main__':
    main()
