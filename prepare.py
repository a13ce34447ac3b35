"""
Turn text into the token streams train.py reads:
    data/<name>/train.bin, val.bin  raw token ids, uint16 (uint32 if the vocabulary needs it), for np.memmap
    data/<name>/meta.json           tokenizer, vocab_size, dtype (and the characters, for 'char')

    python prepare.py shakespeare_char           # tiny shakespeare, one token per character
    python prepare.py shakespeare                # the same text in GPT-2 BPE tokens
    python prepare.py NAME --input=PATH          # a file, a directory, a glob or an http(s) URL
    python prepare.py fineweb10B --shards=8      # FineWeb in GPT-2 tokens, as the NanoGPT speedrun publishes it

.txt and .md files are one document each, .jsonl files one document per line (its "text" field).
A single text file (or URL) is split by position: its first (1 - val_fraction) is the training split.
Anything else is split by document (every 1/val_fraction-th kept one goes to val), and in GPT-2 tokens
every document starts with the end-of-text token. Exact duplicate documents are dropped.

Memory stays bounded whatever the input's size: documents are read one at a time and cut into pieces of
~1M characters that worker processes tokenize, and their tokens are appended to the splits in input order as
they come back. (A character vocabulary, or the length of a single text, takes one more read first.)
The formats on disk, the tokenizers and downloads are in dataset.py, which the other scripts read.
"""

import argparse
import collections
import glob
import hashlib
import json
import multiprocessing
import os
import re
import signal
import time
from contextlib import nullcontext
from urllib.parse import urlsplit

import numpy as np

from dataset import (DATASETS, GPT2_EOT, GPT2_VOCAB_SIZE, INCOMPLETE, array_encoder, die, download, shard_tokens,
                     token_dtype)

FINEWEB_REPO = 'kjj0/fineweb10B-gpt2'  # the speedrun's shards: fineweb_val_000000.bin, fineweb_train_000001..103.bin
FINEWEB_TRAIN_SHARDS = 103
PIECE_CHARS = 1 << 20  # the unit of a tokenizer worker's work: about 60 ms of GPT-2 BPE
CUT = re.compile(r'[ \t\n\r\v\f](?=\S)')  # where pieces() cuts; ASCII: tiktoken's \s differs from Python's beyond it
LARGE_FILE = 64 << 20  # bytes: a text file larger than this is read in chunks, never held in memory whole
TEXT_SUFFIXES, JSONL_SUFFIX = ('.txt', '.md'), '.jsonl'


# -----------------------------------------------------------------------------
# reading the input: files -> documents -> pieces

def input_files(name, input_path, data_dir):
    """(files to read, whether they are one text to split by position): --input (a file, directory, glob or
    URL), else data/<name>/input.txt, else the dataset's known URL. A directory is walked for .txt, .md and
    .jsonl files; they are read in path order. A directory, a glob or a .jsonl file is split by document."""
    input_path = input_path and os.path.expanduser(input_path)  # --input=~/notes: the shell leaves that ~ alone
    if not input_path or input_path.startswith(('http://', 'https://')):
        url, sha256 = (input_path, None) if input_path else DATASETS.get(name, (None, None))[:2]
        filename = os.path.basename(urlsplit(input_path).path.rstrip('/')) if input_path else 'input.txt'
        if not filename or filename in ('train.bin', 'val.bin', 'meta.json') or filename.endswith('.tmp'):
            filename = f'downloaded-{filename or "input.txt"}'  # never one of the dataset's own files
        path = os.path.join(data_dir, filename)
        if os.path.exists(path):
            print(f"using {path}" + (f" (delete it to download {url} again)" if url else ""))
        elif url is None:
            die(f"no text for dataset '{name}': {path} does not exist; pass --input=PATH (a file, directory, glob or URL)")
        else:
            download(url, path, sha256=sha256)
        return [path], not path.endswith(JSONL_SUFFIX)
    if os.path.isfile(input_path):
        return [input_path], not input_path.endswith(JSONL_SUFFIX)
    if os.path.isdir(input_path) or glob.has_magic(input_path):
        files = []
        for path in sorted(glob.glob(input_path, recursive=True)) if glob.has_magic(input_path) else [input_path]:
            if os.path.isfile(path):
                files.append(path)
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith('.')]  # no .git
                files += [os.path.join(root, n) for n in names if n.endswith((*TEXT_SUFFIXES, JSONL_SUFFIX))]
        if not files:
            die(f"no input in {input_path}: looked for .txt, .md and .jsonl files")
        return sorted(set(files)), False  # in path order
    die(f"{input_path} does not exist: pass a file, a directory, a glob (quoted) or an http(s) URL as --input")


def read_documents(files, progress=lambda n_bytes: None):
    """Each document of the files in order, as its text in chunks with line endings made \\n: a list, or a
    TextFile for a text file of more than LARGE_FILE bytes, which is read when iterated rather than held."""
    for path in files:
        if path.endswith(JSONL_SUFFIX):
            with open(path, 'rb') as f:
                for line_no, line in enumerate(f, 1):
                    progress(len(line))
                    if line.strip():
                        yield [jsonl_text(line, path, line_no)]
        elif os.path.getsize(path) > LARGE_FILE:
            yield TextFile(path, progress)
        else:
            yield list(TextFile(path))
            progress(os.path.getsize(path))


def jsonl_text(line, path, line_no):
    try:
        text = json.loads(line).get('text')
    except (ValueError, AttributeError):  # not JSON (or not UTF-8), or not an object
        die(f"{path}, line {line_no}, is not a JSON object: every line of a .jsonl file must be one")
    if not isinstance(text, str):
        die(f'{path}, line {line_no}, has no "text" string: the document\'s text must be there')
    if b'\\ud' in line.lower():  # an escaped surrogate: one without its pair is no text, and becomes U+FFFD
        text = re.sub('[\ud800-\udfff]', '\ufffd', text)
    return text.replace('\r\n', '\n').replace('\r', '\n')


class TextFile:
    """A UTF-8 text file, iterated in chunks of PIECE_CHARS characters; \\r\\n and \\r are read as \\n."""

    def __init__(self, path, progress=None):
        self.path, self.progress = path, progress

    def __iter__(self):
        done = 0
        try:
            with open(self.path, encoding='utf-8-sig') as f:  # without a byte-order mark; universal newlines
                while chunk := f.read(PIECE_CHARS):
                    if self.progress:
                        self.progress(f.buffer.tell() - done)
                        done = f.buffer.tell()
                    yield chunk
        except UnicodeDecodeError:
            die(f"{self.path} is not UTF-8 text: convert it (e.g. iconv -t utf-8) or move it out of the input")


def pieces(chunks):
    """A document's text re-cut into pieces of a little over PIECE_CHARS, each cut just before an ASCII
    whitespace that precedes a non-space: GPT-2's tokenizer always starts a new word there, so tokenizing piece
    by piece gives the same tokens as the whole text, however many workers there are."""
    rest = ''
    for chunk in chunks:
        rest += chunk
        while len(rest) > PIECE_CHARS:
            cut = CUT.search(rest, PIECE_CHARS)
            if cut is None and len(rest) < 16 * PIECE_CHARS:
                break  # wait for more text
            end = cut.start() if cut else len(rest)  # a text without spaces is cut anywhere, rarely
            yield rest[:end]
            rest = rest[end:]
    if rest:
        yield rest


# -----------------------------------------------------------------------------
# choosing the documents, and tokenizing them in worker processes

def characters(files):
    """The characters the input uses, sorted, and how many it has: for a char vocabulary, or a split by position."""
    from tqdm import tqdm
    used, count = np.zeros(0x110000, dtype=bool), 0  # one flag per Unicode code point
    with tqdm(total=sum(os.path.getsize(p) for p in files), unit='B', unit_scale=True, desc='counting characters') as bar:
        for document in read_documents(files, bar.update):
            for chunk in document:
                used[np.frombuffer(chunk.encode('utf-32-le'), dtype=np.uint32)] = True
                count += len(chunk)
    return ''.join(map(chr, np.flatnonzero(used))), count


class SeenHashes:
    """A set of 64-bit hashes in ~8-30 bytes each, where a Python set takes ~90: a sorted array, plus a set of
    recent ones merged into it whenever it grows past a quarter of the array (so merges stay rare)."""

    def __init__(self):
        self.merged, self.recent = np.empty(0, dtype=np.uint64), set()

    def add(self, h):
        """Add h; False if it was already there."""
        i = int(np.searchsorted(self.merged, h))
        if h in self.recent or (i < len(self.merged) and self.merged[i] == h):
            return False
        self.recent.add(h)
        if len(self.recent) > max(1 << 16, len(self.merged) // 4):
            self.merged = np.sort(np.concatenate([self.merged, np.fromiter(self.recent, np.uint64, len(self.recent))]))
            self.recent.clear()
        return True


def kept_documents(documents, val_fraction, min_length, dedup, counts):
    """(split, document) for each document kept, decided as they come: empty ones, those shorter than min_length
    characters and exact duplicates (same text) are dropped; of the others, every 1/val_fraction-th goes to
    val, starting with the first. counts counts them all."""
    seen = SeenHashes()
    for document in documents:
        counts['documents'] += 1
        if isinstance(document, TextFile) and not dedup:
            length = os.path.getsize(document.path)  # its size stands in for its length, saving a read
        else:
            length, digest = 0, hashlib.blake2b(digest_size=8)  # 64 bits: 1e7 documents collide with p < 3e-6
            for chunk in (TextFile(document.path) if isinstance(document, TextFile) else document):
                length += len(chunk)
                if dedup:
                    digest.update(chunk.encode())
        if length == 0 or length < min_length:
            counts['too short'] += 1
            continue
        if dedup and not seen.add(np.uint64(int.from_bytes(digest.digest(), 'little'))):
            counts['duplicates'] += 1
            continue
        split = 'val' if counts['val'] < val_fraction * (counts['train'] + counts['val'] + 1) else 'train'
        counts[split] += 1
        yield split, document


def by_document(documents, separate):
    """(split, starts_a_document, text) for the documents in pieces, in order."""
    for split, document in documents:
        for i, piece in enumerate(pieces(document)):
            yield split, separate and i == 0, piece


def by_position(documents, split_at):
    """The same for one text split by position: val begins at its character split_at."""
    position = 0
    for _, document in documents:
        for piece in pieces(document):
            cut = min(max(split_at - position, 0), len(piece))
            position += len(piece)
            if cut > 0:
                yield 'train', False, piece[:cut]
            if cut < len(piece):
                yield 'val', False, piece[cut:]


def batches(items):
    """by_document's or by_position's items in tasks of about PIECE_CHARS characters, each of one split."""
    open_batches, sizes = {'train': [], 'val': []}, {'train': 0, 'val': 0}
    for split, starts_a_document, text in items:
        open_batches[split].append((split, starts_a_document, text))
        sizes[split] += len(text)
        if sizes[split] >= PIECE_CHARS:
            yield open_batches[split]
            open_batches[split], sizes[split] = [], 0
    yield from (batch for batch in open_batches.values() if batch)


def start_worker(meta, in_pool=False):
    global worker_encode, worker_dtype
    if in_pool:  # Ctrl-C is the main process's to handle: it stops the pool, with SIGTERM, which ends a worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, 'pthread_sigmask'):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by worker_pool until now
    worker_encode, worker_dtype = array_encoder(meta), meta['dtype']


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_pool(workers, meta):
    """A pool of tokenizing workers. Ctrl-C and SIGTERM wait while it starts them (blocked, then delivered):
    a worker that got SIGTERM from a pool stopped early (an error in the first lines of input) before it
    had set its own handlers would die with this process's, printing a KeyboardInterrupt traceback."""
    if not hasattr(signal, 'pthread_sigmask'):  # Windows: no such signals to wait for
        return multiprocessing.Pool(workers, start_worker, (meta, True))
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return multiprocessing.Pool(workers, start_worker, (meta, True))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def encode_batch(batch):
    """In a worker: (split, token ids) of one batch."""
    ids = []
    for _, starts_a_document, text in batch:
        if starts_a_document:
            ids.append(np.array([GPT2_EOT]))
        ids.append(worker_encode(text))
    return batch[0][0], np.concatenate(ids).astype(worker_dtype)


def ordered_map(pool, fn, items, window):
    """pool.imap(fn, items) that reads at most `window` items ahead, so memory stays bounded."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare(name, input_path=None, tokenizer=None, val_fraction=0.1, data_root='data', workers=None,
            min_length=0, dedup=True):
    """Make data/<name>/ (train.bin, val.bin, meta.json) from the input (see input_files); returns its path."""
    from tqdm import tqdm
    tokenizer = tokenizer or DATASETS.get(name, (None, None, 'char' if name.endswith('_char') else 'gpt2'))[2]
    if tokenizer not in ('char', 'gpt2'):
        die(f"unknown tokenizer '{tokenizer}': use char or gpt2")
    if not 0.0 < val_fraction < 1.0:
        die(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if workers is None:  # one per core this process may use
        workers = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if workers < 1:
        die(f"workers must be 1 or more, got {workers}")
    data_dir = os.path.join(data_root, name)
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    files, single_text = input_files(name, input_path, data_dir)
    n_bytes = sum(os.path.getsize(p) for p in files)
    if n_bytes == 0:
        die(f"{input_path or files[0]} is empty: there is nothing to train on")
    chars, n_chars = characters(files) if tokenizer == 'char' or single_text else (None, None)
    if tokenizer == 'char':
        meta = {'tokenizer': 'char', 'vocab_size': len(chars), 'chars': list(chars)}
    else:
        meta = {'tokenizer': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE}
    meta['dtype'] = token_dtype(meta['vocab_size'])

    # read, choose and cut the documents here; workers tokenize; their tokens are appended to temporary files
    start_worker(meta)  # here first: a tokenizer that can't load stops us now, not each worker in a loop
    counts, tokens = collections.Counter(), collections.Counter()
    tmp = {split: os.path.join(data_dir, f'{split}.bin.tmp') for split in ('train', 'val')}
    try:
        # worker processes, as reading, hashing and cutting the text here hold the GIL
        with open(tmp['train'], 'wb') as train_file, open(tmp['val'], 'wb') as val_file, \
                tqdm(total=n_bytes, unit='B', unit_scale=True, desc=f'tokenizing ({workers} workers)') as bar, \
                (worker_pool(workers, meta) if workers > 1 else nullcontext()) as pool:
            out = {'train': train_file, 'val': val_file}
            documents = kept_documents(read_documents(files, bar.update), val_fraction, min_length,
                                       dedup and not single_text, counts)
            tasks = batches(by_position(documents, int(n_chars * (1 - val_fraction))) if single_text
                            else by_document(documents, separate=tokenizer == 'gpt2'))
            results = ordered_map(pool, encode_batch, tasks, window=4 * workers) if pool else map(encode_batch, tasks)
            for split, ids in results:
                ids.tofile(out[split])
                tokens[split] += len(ids)
        for split in ('train', 'val'):
            if tokens[split] == 0:
                die(f"no {split} text in {input_path or files[0]}: of {counts['documents']:,} documents, "
                    f"{counts['duplicates']:,} were duplicates and {counts['too short']:,} empty or shorter than "
                    f"--min_length; {counts['train']:,} went to train and {counts['val']:,} to val: "
                    + ("use a larger --val_fraction" if single_text and split == 'val' else
                       "pass the file itself, to split it by position" if counts['documents'] == 1 else "give more text"))
    except BaseException:  # a failure or Ctrl-C: the old dataset stays, without our leftovers
        for path in tmp.values():
            os.remove(path)
        raise
    replace_dataset(data_dir, tmp, meta)

    seconds = time.time() - t0
    if single_text:
        print(f"one text of {n_chars:,} characters, split by position")
    else:
        print(f"documents: {counts['documents']:,} read, {counts['train'] + counts['val']:,} kept ({counts['val']:,} "
              f"for val); removed {counts['duplicates']:,} duplicates, {counts['too short']:,} empty or shorter than "
              "--min_length")
    print(f"train.bin: {tokens['train']:,} tokens; val.bin: {tokens['val']:,} tokens; "
          f"{n_bytes / 1e6:,.1f} MB of input in {seconds:.1f} s ({n_bytes / 1e6 / seconds:.1f} MB/s)")
    print(f"wrote {data_dir}: vocab_size {meta['vocab_size']:,} ({tokenizer}), tokens stored as {meta['dtype']}")
    return data_dir


def replace_dataset(data_dir, tmp_paths, meta):
    """Move the new splits into place and write meta.json. Meanwhile a marker file makes load_meta refuse the
    directory: a kill at any moment leaves the old dataset or one that train.py won't take as complete."""
    marker = os.path.join(data_dir, INCOMPLETE)
    open(marker, 'w').close()
    for split, tmp_path in tmp_paths.items():
        os.replace(tmp_path, os.path.join(data_dir, f'{split}.bin'))
    with open(os.path.join(data_dir, 'meta.json.tmp'), 'w') as f:
        json.dump(meta, f)
    os.replace(os.path.join(data_dir, 'meta.json.tmp'), os.path.join(data_dir, 'meta.json'))
    os.remove(marker)


def prepare_fineweb(shards, data_root='data'):
    """The first `shards` training shards of FineWeb 10B (100M GPT-2 tokens each) and its val shard, as the
    speedrun publishes them; train.py reads them where they are (open_split)."""
    if not 1 <= shards <= FINEWEB_TRAIN_SHARDS:
        die(f"--shards must be between 1 and {FINEWEB_TRAIN_SHARDS} (100M tokens each), got {shards}")
    data_dir = os.path.join(data_root, 'fineweb10B')
    os.makedirs(data_dir, exist_ok=True)
    open(os.path.join(data_dir, INCOMPLETE), 'w').close()  # until every shard is here
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    names = {'val': ['fineweb_val_000000.bin'], 'train': [f'fineweb_train_{i:06d}.bin' for i in range(1, shards + 1)]}
    n_tokens = collections.Counter()
    for split, filenames in names.items():
        for filename in filenames:
            path = os.path.join(data_dir, filename)
            download(f'{endpoint}/datasets/{FINEWEB_REPO}/resolve/main/{filename}', path)  # unless it is here
            n_tokens[split] += len(shard_tokens(path))
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:  # the shards train.py reads: no more, no fewer
        json.dump({'tokenizer': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE, 'dtype': 'uint16', 'shards': names}, f)
    os.remove(os.path.join(data_dir, INCOMPLETE))
    print(f"wrote {data_dir}: {shards} training shards ({n_tokens['train']:,} tokens), val {n_tokens['val']:,} tokens")
    return data_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('name', nargs='?', help='dataset name: the directory data/<name>')
    parser.add_argument('--name', dest='name_flag', help='the same, as a flag')
    parser.add_argument('--input', help='a file, a directory, a glob or an http(s) URL (default: data/<name>/input.txt)')
    parser.add_argument('--tokenizer', choices=['char', 'gpt2'], help='default: char for *_char datasets, else gpt2')
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the share of the text kept for validation')
    parser.add_argument('--workers', type=int, help='tokenizer processes (default: one per CPU core)')
    parser.add_argument('--min_length', type=int, default=0, help='drop documents shorter than this, in characters')
    parser.add_argument('--dedup', action=argparse.BooleanOptionalAction, default=True,
                        help='drop exact duplicate documents (default: on)')
    parser.add_argument('--shards', type=int, default=8, help='fineweb10B: training shards of 100M tokens')
    args = parser.parse_args()
    name = args.name or args.name_flag
    if not name:
        parser.error("give a dataset name: python prepare.py shakespeare_char, or --name=NAME --input=PATH")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` cleans up as Ctrl-C does
    try:
        if name == 'fineweb10B' and not args.input:
            prepare_fineweb(args.shards)
        else:
            prepare(name, args.input, args.tokenizer, args.val_fraction, workers=args.workers,
                    min_length=args.min_length, dedup=args.dedup)
    except KeyboardInterrupt:
        die("interrupted: run the same command again to start over (a download resumes where it stopped)")
