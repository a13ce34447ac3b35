"""
Turn text into the token streams train.py reads:
    data/<name>/train.bin, val.bin  raw token ids, uint16 (uint32 if the vocabulary needs it), for np.memmap
    data/<name>/meta.json           tokenizer, vocab_size, dtype (and the characters, for 'char')

    python prepare.py shakespeare_char           # tiny shakespeare, one token per character
    python prepare.py shakespeare                # the same text in GPT-2 BPE tokens
    python prepare.py NAME --input=PATH          # a file, a directory, a glob or an http(s) URL
    python prepare.py fineweb10B --shards=8      # FineWeb in GPT-2 tokens, as the NanoGPT speedrun publishes it

.txt and .md files are one document each, .jsonl files one document per line (its "text" field).
A single text file is split by position: its first (1 - val_fraction) is the training split. Anything
else is split by document (every 1/val_fraction-th kept one goes to val), and in GPT-2 tokens every
document starts with the end-of-text token. Exact duplicate documents are dropped.

Memory stays bounded whatever the input's size: documents are read one at a time and cut into pieces of
~1M characters that worker processes tokenize, and their tokens are appended to the splits in input order as
they come back. (A character vocabulary, or the length of a single text, takes one more read first.)
This file is also the one place that builds a tokenizer from meta.json (get_tokenizer) and opens a split.
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
import requests

try:
    import fcntl  # to lock a partial download against a second process (POSIX only)
except ImportError:
    fcntl = None

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
DATASETS = {  # name -> (where the text comes from, its SHA-256, tokenizer)
    'shakespeare_char': (SHAKESPEARE_URL, SHAKESPEARE_SHA256, 'char'),
    'shakespeare': (SHAKESPEARE_URL, SHAKESPEARE_SHA256, 'gpt2'),
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>: starts every document of a GPT-2 dataset
FINEWEB_REPO = 'kjj0/fineweb10B-gpt2'  # the speedrun's shards: fineweb_val_000000.bin, fineweb_train_000001..103.bin
FINEWEB_TRAIN_SHARDS = 103
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256  # a header of 256 int32, then uint16 tokens
PIECE_CHARS = 1 << 20  # the unit of a tokenizer worker's work: about 60 ms of GPT-2 BPE
CUT = re.compile(r'[ \t\n\r\v\f](?=\S)')  # where pieces() cuts; ASCII: tiktoken's \s differs from Python's beyond it
LARGE_FILE = 64 << 20  # bytes: a text file larger than this is read in chunks, never held in memory whole
INCOMPLETE = 'prepare-incomplete'  # present while prepare.py replaces a dataset: load_meta refuses the directory
TEXT_SUFFIXES, JSONL_SUFFIX = ('.txt', '.md'), '.jsonl'


def die(message):
    """Stop with a one-line error (SystemExit), never a traceback. It lives here rather than in common.py
    (which re-exports it) so that prepare.py and its workers start without importing torch."""
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# tokenizers

def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken downloads its files once; offline, it needs a cache
        die(f"could not load the GPT-2 BPE files ({type(e).__name__}): connect to the internet once, "
            "or set TIKTOKEN_CACHE_DIR to a directory that holds them")


def get_tokenizer(meta):
    """(encode, decode) for a dataset's meta: encode(str) -> list of ids, decode(ids) -> str."""
    if meta['tokenizer'] == 'char':
        chars = meta['chars']
        stoi = {ch: i for i, ch in enumerate(chars)}

        def encode(text):
            unknown = set(text) - stoi.keys()
            if unknown:
                die(f"characters {''.join(sorted(unknown))!r} are not in this character vocabulary; "
                    "use only characters of the training text")
            return [stoi[ch] for ch in text]
        return encode, lambda ids: ''.join(chars[i] for i in ids)
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode
    die(f"unknown tokenizer {meta['tokenizer']!r} in meta.json: expected 'char' or 'gpt2'")


def array_encoder(meta):
    """get_tokenizer's encode for bulk text: str -> np.ndarray of ids, without a Python int per token."""
    if meta['tokenizer'] == 'char':
        codes = np.array([ord(ch) for ch in meta['chars']], dtype=np.uint32)  # ascending: chars are sorted
        return lambda text: np.searchsorted(codes, np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32))
    enc = gpt2_encoding()
    # with no special token allowed or disallowed, "<|endoftext|>" in a text is plain text: encode_ordinary
    return lambda text: enc.encode_to_numpy(text, disallowed_special=())


def load_meta(data_dir):
    """The dataset's tokenizer, vocab_size and dtype from its meta.json (not its list of shards, which
    open_split reads); a directory without one holds GPT-2 tokens, as in nanoGPT."""
    if os.path.exists(os.path.join(data_dir, INCOMPLETE)):
        die(f"{data_dir} is incomplete: a prepare.py writing it was interrupted; run it again")
    path = os.path.join(data_dir, 'meta.json')
    if os.path.exists(path):
        with open(path) as f:
            return {key: value for key, value in json.load(f).items() if key != 'shards'}
    if os.path.exists(os.path.join(data_dir, 'meta.pkl')):  # nanoGPT's, which we don't unpickle
        die(f"{data_dir} has nanoGPT's meta.pkl but no meta.json: run python prepare.py "
            f"{os.path.basename(data_dir)} --input=<its input.txt> to write meta.json")
    return {'tokenizer': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE, 'dtype': 'uint16'}


def checkpoint_meta(checkpoint):
    """The meta of the data a model was trained on: our checkpoints (and Hub models) carry it; nanoGPT's
    name the dataset whose meta.json to read."""
    return checkpoint.get('meta') or load_meta(os.path.join('data', checkpoint.get('config', {}).get('dataset', '')))


def token_dtype(vocab_size):
    return 'uint16' if vocab_size <= 2 ** 16 else 'uint32'


# -----------------------------------------------------------------------------
# reading a split: split.bin, or the speedrun's shards

def open_split(data_dir, split, dtype):
    """A split's tokens, indexable like one array: data/<name>/<split>.bin memory-mapped, or else the shards
    meta.json lists for it (without a list, every *_<split>_*.bin), read as one stream. None if neither exists."""
    path = os.path.join(data_dir, f'{split}.bin')
    if os.path.exists(path):
        return np.memmap(path, dtype=dtype, mode='r')
    listed, meta_path = {}, os.path.join(data_dir, 'meta.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            listed = json.load(f).get('shards', {})
    names = listed.get(split) or sorted(os.path.basename(p) for p in glob.glob(os.path.join(data_dir, f'*_{split}_*.bin')))
    shards = [shard_tokens(os.path.join(data_dir, name)) for name in names]
    return None if not shards else shards[0] if len(shards) == 1 else TokenShards(shards)


def shard_tokens(path):
    """The uint16 tokens of a shard file, memory-mapped past its header, which is checked."""
    if not os.path.exists(path):
        die(f"{path} is missing: run prepare.py again to download it")
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    n_header = SHARD_HEADER_INTS * 4
    if len(header) < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        die(f"{path} is not a token shard (its header lacks magic {SHARD_MAGIC}, version {SHARD_VERSION}): "
            "delete it and run prepare.py again")
    if os.path.getsize(path) != n_header + 2 * int(header[2]):
        die(f"{path} should hold {header[2]:,} tokens but its size says otherwise: delete it and run prepare.py again")
    return np.memmap(path, dtype=np.uint16, mode='r', offset=n_header, shape=(int(header[2]),))


class TokenShards:
    """Several token arrays read as their concatenation: len(), and indexing with an array or a slice."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])  # where each array starts in the stream

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        index = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index)
        if index.size and not 0 <= index.min() <= index.max() < len(self):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.offsets, index, side='right') - 1
        out = np.empty(index.shape, dtype=self.arrays[0].dtype)
        for k in np.unique(shard):
            here = shard == k
            out[here] = self.arrays[k][index[here] - self.offsets[k]]
        return out


# -----------------------------------------------------------------------------
# downloads

def download(url, path, retries=3, timeout=30, headers=None, missing_ok=False, sha256=None):
    """Stream url to path through path.part, renamed into place only when complete. A dropped connection or
    an interrupted run resumes from the .part file with an HTTP Range request, guarded by If-Range (the ETag
    or Last-Modified of the first response, kept in path.part.etag): a file changed meanwhile starts over.
    The SHA-256 is checked where one is known: given, or sent by the server (the Hub's X-Linked-Etag).

    Returns True when done. An HTTP 4xx (no such file) stops with an error, or returns False with missing_ok.
    """
    part = open_locked_part(path)
    if part is None:  # downloaded before, or by the process we waited for
        return True
    with part:
        for attempt in range(1, retries + 1):
            try:
                expected_sha256 = download_rest(url, part, timeout, headers or {}, sha256)
                break
            except requests.HTTPError as e:
                status = e.response.status_code
                if 400 <= status < 500 and status not in (408, 429):  # no such file, or no access: no retry
                    discard(part.name, keep_content=status not in (404, 410))
                    if missing_ok and status in (404, 410):
                        return False
                    die(f"could not download {url}: HTTP {status}: check the URL" +
                        (" (and $HF_TOKEN, for a private repository)" if status in (401, 403) else ""))
                error = f"HTTP {status}"
            except requests.RequestException as e:
                error = type(e).__name__
            if attempt == retries:
                discard(part.name, keep_content=True)
                die(f"could not download {url} after {retries} tries ({error}): check the URL and the network, "
                    f"then run again to resume it (or save the file yourself as {path})")
            time.sleep(attempt)  # a short, growing pause before trying again
        if expected_sha256 and file_sha256(part.name) != expected_sha256:
            discard(part.name)
            die(f"{url} does not have the expected SHA-256 {expected_sha256}: the download was deleted; "
                "run again, or check the URL")
        os.replace(part.name, path)
        discard(part.name)  # its .etag
    return True


def open_locked_part(path):
    """path.part, opened to append and locked against other processes (POSIX); None once path exists."""
    while not os.path.exists(path):
        part = open(f'{path}.part', 'a+b')
        if fcntl:
            fcntl.flock(part, fcntl.LOCK_EX)  # one process downloads a file at a time; the others wait here
        if os.fstat(part.fileno()).st_nlink and not os.path.exists(path):  # not renamed or deleted meanwhile
            return part
        part.close()
    return None


def download_rest(url, part, timeout, headers, sha256):
    """Append to the .part file what it lacks of url; returns the SHA-256 to check it against, if one is known."""
    from tqdm import tqdm
    etag_path, offset, validator = part.name + '.etag', part.seek(0, os.SEEK_END), ''
    if offset and os.path.exists(etag_path):
        with open(etag_path) as f:
            validator = f.read()
    if offset and not validator and not sha256:  # nothing would tell us the file changed since: start over
        offset = part.truncate(0)
    resume = {'Range': f'bytes={offset}-', **({'If-Range': validator} if validator else {})} if offset else {}
    headers = {**headers, 'Accept-Encoding': 'identity', **resume}  # bytes of the file itself, not of a gzip
    with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
        expected_sha256 = sha256 or hub_sha256(response)
        if response.status_code == 416:  # nothing after offset
            if response.headers.get('content-range', '').endswith(f'/{offset}'):
                return expected_sha256  # the .part is complete: a run was stopped just before its rename
            part.truncate(0)
            raise requests.ConnectionError(f"the partial download is longer than {url}: starting over")
        response.raise_for_status()
        if response.status_code != 206:  # the whole file (new, or changed since), not the rest of it
            offset = part.truncate(0)
            etag = response.headers.get('etag', '')
            with open(etag_path, 'w') as f:  # a weak ETag can't validate byte ranges
                f.write(etag if etag and not etag.startswith('W/') else response.headers.get('last-modified', ''))
        size = int(response.headers.get('content-length', 0))
        total = offset + size if size else None
        with tqdm(total=total, initial=offset, unit='B', unit_scale=True,
                  desc=f"downloading {os.path.basename(part.name).removesuffix('.part')}") as bar:
            for chunk in response.iter_content(chunk_size=1 << 16):  # a dropped connection loses <= 64 KiB
                part.write(chunk)
                bar.update(len(chunk))
        if total and bar.n != total:  # urllib3 2 raises on a short body itself; older ones don't
            raise requests.ConnectionError(f"the connection closed after {bar.n} of {total} bytes")
    part.flush()
    return expected_sha256


def discard(part_path, keep_content=False):
    """Delete a .part file and its .etag; with keep_content, only if it is empty (nothing to resume)."""
    if keep_content and os.path.exists(part_path) and os.path.getsize(part_path):
        return
    for p in (part_path, part_path + '.etag'):
        if os.path.exists(p):
            os.remove(p)


def hub_sha256(response):
    """The SHA-256 the Hugging Face Hub sends for a large file (on the redirect to its storage), if any."""
    for r in (*response.history, response):
        etag = r.headers.get('x-linked-etag', '').strip('"')
        if re.fullmatch('[0-9a-f]{64}', etag):
            return etag
    return None


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# reading the input: files -> documents -> pieces

def input_files(name, input_path, data_dir):
    """The files to read: --input (a file, directory, glob or URL), else data/<name>/input.txt, else the
    dataset's known URL. A directory is walked for .txt, .md and .jsonl files; they are read in path order."""
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
        return [path]
    if os.path.isfile(input_path):
        return [input_path]
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
        return sorted(set(files))  # in path order
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
    worker_encode, worker_dtype = array_encoder(meta), meta['dtype']


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
    files = input_files(name, input_path, data_dir)
    n_bytes = sum(os.path.getsize(p) for p in files)
    if n_bytes == 0:
        die(f"{input_path or files[0]} is empty: there is nothing to train on")
    # one text file (not a directory or glob) is split by position, anything else by document
    single_text = not (input_path and (os.path.isdir(os.path.expanduser(input_path)) or glob.has_magic(input_path))) \
        and not files[0].endswith(JSONL_SUFFIX)
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
                (multiprocessing.Pool(workers, start_worker, (meta, True)) if workers > 1 else nullcontext()) as pool:
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
    for split, filename in [(split, filename) for split in ('val', 'train') for filename in names[split]]:
        path = os.path.join(data_dir, filename)
        if not os.path.exists(path):
            download(f'{endpoint}/datasets/{FINEWEB_REPO}/resolve/main/{filename}', path)
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
