"""
Which BPE library trains prepare.py's tokenizer, and which tokenizer trains the better model.

    python bench_tokenizer.py libraries          # corpora of 20 MB and 200 MB, vocab 8192
    python bench_tokenizer.py models             # tiny shakespeare: char, GPT-2, BPE 1024/4096/8192, 60 s each

libraries: rustbpe and Hugging Face's tokenizers, each called directly on the same text (the train
documents of a .jsonl corpus generated from tiny shakespeare, as bench_prepare.py makes it, without
duplicates) with the same split pattern and vocabulary size: training seconds, peak memory (PSS of the
process, sampled every 50 ms) and bytes per token of the val documents. Next to them, prepare.py
--tokenizer=bpe on the corpus (its training time, as it prints it, and its peak), and the speed of its
tokenizing with that BPE against the same run with GPT-2's tokenizer. Each is run --repeats times,
interleaved; the fastest time of each is kept (on a shared machine the same run took 7 to 14 s), and
the largest peak.

models: the CPU recipe's model (config/train_shakespeare_char_cpu.py) trained for the same wall time on
tiny shakespeare in each tokenizer, then eval.py's val bits per byte, which compare across tokenizers.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from bench_prepare import make_corpus, measure

ROOT = os.path.dirname(os.path.abspath(__file__))


def corpus_documents(corpus, split):
    """The documents of a corpus directory's .jsonl files in order, split as prepare.py splits them when
    no document is dropped: the 1st, 11th, 21st... go to val."""
    n = 0
    for name in sorted(os.listdir(corpus)):
        with open(os.path.join(corpus, name), encoding='utf-8') as f:
            for line in f:
                if (n % 10 == 0) == (split == 'val'):
                    yield json.loads(line)['text']
                n += 1


def direct(library, corpus, vocab_size):
    """Train `library` directly on the corpus's train documents; print the training seconds and the val
    documents' bytes and tokens."""
    from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
    t0 = time.perf_counter()
    if library == 'rustbpe':
        import rustbpe
        import tiktoken
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(corpus_documents(corpus, 'train'), vocab_size - len(SPECIAL_TOKENS),
                                pattern=SPLIT_PATTERN)
        seconds = time.perf_counter() - t0
        enc = tiktoken.Encoding('bench', pat_str=SPLIT_PATTERN, special_tokens={},
                                mergeable_ranks={bytes(token): rank for token, rank in bpe.get_mergeable_ranks()})
        count = lambda texts: sum(len(ids) for ids in enc.encode_ordinary_batch(texts))  # noqa: E731
    else:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior='isolated'),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(corpus_documents(corpus, 'train'), trainer)
        seconds = time.perf_counter() - t0
        count = lambda texts: sum(len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False))  # noqa: E731
    val = list(corpus_documents(corpus, 'val'))
    print(f"seconds {seconds:.3f} bytes {sum(len(t.encode()) for t in val)} tokens {count(val)}")


def best(old, new):
    """Of two runs' (training seconds, peak MB, bytes per token, MB/s): the fastest times, the larger peak."""
    return new if old is None else (min(old[0], new[0]), max(old[1], new[1]), new[2], max(old[3], new[3]))


def libraries(args):
    rows = []
    for megabytes in args.mb:
        corpus = os.path.abspath(os.path.join(args.workdir, f'corpus_{megabytes:g}MB'))
        n_bytes = make_corpus(corpus, megabytes, args.source, duplicates=0.0)
        row = {'MB': n_bytes / 1e6}
        for _ in range(args.repeats):  # interleaved, and the fastest of each kept: shared machines have slow minutes
            for library in ('rustbpe', 'tokenizers'):
                _, peak, out = measure([sys.executable, __file__, '--direct', library, corpus, str(args.vocab_size)],
                                       ROOT)
                seconds, val_bytes, val_tokens = (float(v) for v in re.findall(r'[\d.]+', out[-1]))
                row[library] = best(row.get(library), (seconds, peak, val_bytes / val_tokens, 0.0))
            for tokenizer in ('bpe', 'gpt2'):
                extra = [f'--vocab_size={args.vocab_size}'] if tokenizer == 'bpe' else []
                _, peak, out = measure([sys.executable, os.path.join(ROOT, 'prepare.py'), f'bench_{tokenizer}',
                                        f'--input={corpus}', f'--tokenizer={tokenizer}', *extra], args.workdir)
                text = '\n'.join(out)
                trained = re.search(r'in ([\d.]+) s\b', text) if tokenizer == 'bpe' else None
                mb_s = float(re.search(r'tokenizing alone ([\d.]+) MB/s' if trained else r'\(([\d.]+) MB/s', text).group(1))
                per_token = float(re.search(r'val text: ([\d.]+) bytes per token', text).group(1))
                key = f'prepare.py {tokenizer}'
                row[key] = best(row.get(key), (float(trained.group(1)) if trained else 0.0, peak, per_token, mb_s))
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(corpus)

    print(f"\nBPE training, vocab {args.vocab_size:,}: seconds, peak memory (MB), val bytes per token")
    print("| corpus | rustbpe | HF tokenizers | prepare.py --tokenizer=bpe (rustbpe) | prepare.py vs the faster |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [f"{s:.2f} s, {p:,.0f} MB, {b:.3f}" for s, p, b, _ in (row['rustbpe'], row['tokenizers'])]
        s, p, b, _ = row['prepare.py bpe']
        fastest = min(row['rustbpe'][0], row['tokenizers'][0])
        print(f"| {row['MB']:,.0f} MB | {cells[0]} | {cells[1]} | {s:.2f} s, {p:,.0f} MB, {b:.3f} | {s / fastest:.2f}x |")
    print("\nprepare.py tokenizing alone (after training), MB/s; GPT-2's bytes per token on the same val text")
    print("| corpus | BPE vocab {0:,} | GPT-2 | ratio | GPT-2 bytes per token |".format(args.vocab_size))
    print("|---|---|---|---|---|")
    for row in rows:
        bpe, gpt2 = row['prepare.py bpe'][3], row['prepare.py gpt2'][3]
        print(f"| {row['MB']:,.0f} MB | {bpe:.1f} | {gpt2:.1f} | {bpe / gpt2:.2f}x | {row['prepare.py gpt2'][2]:.3f} |")


def models(args):
    import ablate
    import train
    from common import load_config
    source = os.path.abspath(args.source)
    # datasets of its own in data/ (bench_tokenizer_*), so that it never writes over one of yours
    datasets = [('char', 'bench_tokenizer_char', ['--tokenizer=char']), ('GPT-2', 'bench_tokenizer_gpt2', ['--tokenizer=gpt2'])]
    datasets += [(f'BPE {v}', f'bench_tokenizer_bpe{v}', ['--tokenizer=bpe', f'--vocab_size={v}']) for v in args.vocab_sizes]
    config = load_config(train.DEFAULTS, [os.path.join(ROOT, 'config', 'train_shakespeare_char_cpu.py')])
    rows = []
    for label, name, prepare_args in datasets:
        out = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), name, f'--input={source}',
                              *prepare_args], capture_output=True, text=True, check=True).stdout
        per_token = re.search(r'val text: ([\d.]+) bytes', out)
        val_loss, steps, wall = ablate.train_for({**config, 'dataset': name}, args.seconds)
        out = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), f'--out_dir={os.path.join("out-ablate", "run")}',
                              '--device=cpu'], capture_output=True, text=True, check=True).stdout
        bits = float(re.search(r'bits per (?:byte|char) ([\d.]+)', out).group(1))  # shakespeare is ASCII: a char is a byte
        rows.append((label, per_token.group(1), steps, val_loss, bits))
        print(f"{label}: {steps} steps, val loss {val_loss:.4f}, {bits:.4f} bits per byte", flush=True)
    print(f"\n{args.seconds:g} s of training each, {config['n_layer']}x{config['n_embd']} block {config['block_size']}")
    print("| tokenizer | val bytes per token | steps | val loss (per token) | val bits per byte |")
    print("|---|---|---|---|---|")
    for label, per_token, steps, val_loss, bits in rows:
        print(f"| {label} | {per_token} | {steps} | {val_loss:.4f} | {bits:.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('what', choices=['libraries', 'models'])
    parser.add_argument('--mb', type=float, nargs='+', default=[20, 200], help='libraries: corpus sizes in MB')
    parser.add_argument('--vocab_size', type=int, default=8192, help='libraries: the vocabulary trained')
    parser.add_argument('--repeats', type=int, default=3, help='libraries: runs of each, the fastest kept')
    parser.add_argument('--seconds', type=float, default=60, help='models: training time per tokenizer')
    parser.add_argument('--vocab_sizes', type=int, nargs='+', default=[1024, 4096, 8192], help='models: BPE sizes')
    parser.add_argument('--source', default=os.path.join('data', 'shakespeare_char', 'input.txt'))
    parser.add_argument('--workdir', default='.', help='libraries: where a temporary directory for the corpora goes')
    if sys.argv[1:2] == ['--direct']:  # internal: one library, in a process of its own
        return direct(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    args = parser.parse_args()
    if not os.path.exists(args.source):
        sys.exit(f"error: no source text at {args.source}: run python prepare.py shakespeare_char, or pass --source=FILE")
    if args.what == 'models':
        return models(args)
    args.workdir = tempfile.mkdtemp(prefix='bench-tokenizer-', dir=args.workdir)  # its own: deleted after
    try:
        libraries(args)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
