"""
How fast prepare.py turns a large corpus into GPT-2 tokens and how much memory it needs, next to a plain
baseline in the same run: read every document, encode them one after another in one process, write.

    python bench_prepare.py                          # corpora of 200 MB and 400 MB
    python bench_prepare.py --mb=5 --workers=1       # a quick look

The corpus is .jsonl files of documents, each a random run of lines of tiny shakespeare (--source, by default
data/shakespeare_char/input.txt), 2% of them copies of an earlier one. Every run is its own process; its
memory is the peak, sampled every 50 ms, of the proportional set size (PSS) summed over it and its worker
processes (Linux /proc). Timings drift on shared machines: compare the ratios, measured side by side.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def make_corpus(directory, megabytes, source, seed=0, duplicates=0.02):
    """.jsonl files of about 50 MB, `duplicates` of the documents copies of earlier ones; returns their total size
    in bytes."""
    with open(source, encoding='utf-8') as f:
        lines = f.read().split('\n')
    rng, docs, size, file, n_files, made = random.Random(seed), [], 0, None, 0, set()
    os.makedirs(directory, exist_ok=True)
    while size < megabytes * 1e6:
        if file is None or file.tell() > 50e6:
            file = open(os.path.join(directory, f'part_{n_files:03d}.jsonl'), 'w', encoding='utf-8')
            n_files += 1
        if docs and rng.random() < duplicates:
            text = rng.choice(docs)  # an exact duplicate, for prepare.py to drop
        else:
            start, length = rng.randrange(len(lines) - 200), rng.randint(20, 200)
            if (start, length) in made:  # the same run of lines again: only the duplicates above repeat
                continue
            made.add((start, length))
            text = '\n'.join(lines[start:start + length])
            docs = docs[-1000:] + [text]
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
    """(wall seconds, peak MB, the last line it printed) of a command."""
    t0, peak = time.perf_counter(), 0.0
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while proc.poll() is None:
        peak = max(peak, tree_pss_mb(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    output = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode})")
    return seconds, peak, output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mb', type=float, default=200, help='the smaller corpus, in MB; the larger is twice that')
    parser.add_argument('--workers', type=int, help="prepare.py's --workers (default: one per core)")
    parser.add_argument('--source', default=os.path.join('data', 'shakespeare_char', 'input.txt'))
    parser.add_argument('--workdir', default='bench-prepare', help='where the corpora and outputs go (deleted after)')
    parser.add_argument('--baseline', help=argparse.SUPPRESS)  # internal: run the baseline on this corpus
    args = parser.parse_args()
    if args.baseline:
        return baseline(args.baseline, os.path.join(args.workdir, 'baseline.bin'))
    if not os.path.exists(args.source):
        sys.exit(f"error: no source text at {args.source}: run python prepare.py shakespeare_char, or pass --source=FILE")

    rows = []
    try:
        for megabytes in (args.mb, 2 * args.mb):
            corpus = os.path.abspath(os.path.join(args.workdir, f'corpus_{megabytes:g}MB'))
            n_bytes = make_corpus(corpus, megabytes, args.source)
            base_s, base_mb, base_out = measure([sys.executable, __file__, f'--baseline={corpus}',
                                                 f'--workdir={args.workdir}'], cwd=os.getcwd())
            ours_s, ours_mb, ours_out = measure([sys.executable, os.path.join(ROOT, 'prepare.py'), 'bench',
                                                 f'--input={corpus}'] + ([f'--workers={args.workers}'] if args.workers else []),
                                                cwd=args.workdir)
            rows.append((n_bytes / 1e6, base_s, base_mb, ours_s, ours_mb))
            print(f"{n_bytes / 1e6:.0f} MB: baseline {base_out[-1]}; prepare.py {ours_out[-2]}")
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)

    print("| corpus | baseline MB/s | baseline peak MB | prepare.py MB/s | prepare.py peak MB | speed ratio |")
    print("|---|---|---|---|---|---|")
    for mb, base_s, base_mb, ours_s, ours_mb in rows:
        print(f"| {mb:,.0f} MB | {mb / base_s:.1f} | {base_mb:,.0f} | {mb / ours_s:.1f} | {ours_mb:,.0f} | "
              f"{base_s / ours_s:.2f}x |")


if __name__ == '__main__':
    main()
