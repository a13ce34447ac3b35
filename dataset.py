"""
The datasets on disk: what train.py, sample.py, eval.py and bench.py read.
    data/<name>/train.bin, val.bin  raw token ids, uint16 (uint32 if the vocabulary needs it), for np.memmap
    data/<name>/meta.json           the tokenizer (tokenizer.py reads it), vocab_size, dtype
    data/<name>/<split>_mask.bin    (chat datasets) which tokens training predicts, where conversations start
or, for the speedrun's FineWeb, shards of GPT-2 tokens read in place. Also the one place that opens a split
(open_split: a token stream, or Conversations) and downloads a file (download). prepare.py makes the
datasets; nothing here imports torch, so it and its worker processes start quickly.
"""

import glob
import hashlib
import json
import os
import re
import time

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
    'shakespeare_bpe': (SHAKESPEARE_URL, SHAKESPEARE_SHA256, 'bpe'),  # a BPE trained on it (--vocab_size)
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>: starts every document of a GPT-2 dataset
GPT2_META = {'tokenizer': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE, 'dtype': 'uint16'}  # meta.json of GPT-2 tokens
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256  # a header of 256 int32, then uint16 tokens
INCOMPLETE = 'prepare-incomplete'  # present while prepare.py replaces a dataset: load_meta refuses the directory


def die(message):
    """Stop with a one-line error (SystemExit), never a traceback. It lives here rather than in common.py
    (which re-exports it) so that prepare.py and its workers start without importing torch."""
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# meta.json

def load_meta(data_dir):
    """The dataset's tokenizer, vocab_size and dtype from its meta.json (not its list of shards, which
    open_split reads); a directory without one holds GPT-2 tokens, as in nanoGPT."""
    if os.path.exists(os.path.join(data_dir, INCOMPLETE)):  # it holds what went wrong, when prepare.py knew
        with open(os.path.join(data_dir, INCOMPLETE)) as f:
            reason = f.read().strip() or 'a prepare.py writing it was interrupted'
        die(f"{data_dir} is incomplete: {reason}; run prepare.py again")
    path = os.path.join(data_dir, 'meta.json')
    if os.path.exists(path):
        try:
            with open(path) as f:
                return {key: value for key, value in json.load(f).items() if key != 'shards'}
        except (ValueError, AttributeError) as e:  # not JSON, or not an object
            die(f"{path} is damaged ({type(e).__name__}): prepare the dataset again")
    if os.path.exists(os.path.join(data_dir, 'meta.pkl')):  # nanoGPT's, which we don't unpickle
        die(f"{data_dir} has nanoGPT's meta.pkl but no meta.json: run python prepare.py "
            f"{os.path.basename(data_dir)} --input=<its input.txt> to write meta.json")
    return dict(GPT2_META)


def checkpoint_meta(checkpoint):
    """The meta of the data a model was trained on: our checkpoints (and Hub models) carry it; nanoGPT's
    name the dataset whose meta.json to read."""
    return checkpoint.get('meta') or load_meta(os.path.join('data', checkpoint.get('config', {}).get('dataset', '')))


def token_dtype(vocab_size):
    return 'uint16' if vocab_size <= 2 ** 16 else 'uint32'


# -----------------------------------------------------------------------------
# reading a split: split.bin, or the speedrun's shards

def open_split(data_dir, split, dtype, block_size=None):
    """A split's tokens, indexable like one array: data/<name>/<split>.bin memory-mapped, or else the shards
    meta.json lists for it (without a list, every *_<split>_*.bin), read as one stream. None if neither exists.
    A chat dataset's (it has <split>_mask.bin), given block_size: its Conversations."""
    path = os.path.join(data_dir, f'{split}.bin')
    mask_path = os.path.join(data_dir, f'{split}_mask.bin')
    if os.path.exists(path) and block_size and os.path.exists(mask_path):
        tokens, mask = np.memmap(path, dtype=dtype, mode='r'), np.memmap(mask_path, dtype=np.uint8, mode='r')
        if len(mask) != len(tokens) or not len(mask) or not mask[0] & 2:
            die(f"{mask_path} does not fit {path}: prepare the dataset again")
        return Conversations(tokens, mask, block_size)
    if os.path.exists(path):
        return np.memmap(path, dtype=dtype, mode='r')
    listed, meta_path = {}, os.path.join(data_dir, 'meta.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            listed = json.load(f).get('shards', {})
    names = listed.get(split) or sorted(os.path.basename(p) for p in glob.glob(os.path.join(data_dir, f'*_{split}_*.bin')))
    shards = [shard_tokens(os.path.join(data_dir, name)) for name in names]
    return None if not shards else shards[0] if len(shards) == 1 else TokenShards(shards)


class Conversations:
    """A chat dataset's split: its tokens, and per token a byte from <split>_mask.bin: 1 if training predicts
    it (an assistant's text and end), + 2 where a conversation starts. Rows are conversations from their
    first token, cut after block_size + 1 tokens; those whose first block_size targets hold nothing to
    train on are left out (see `skipped`)."""

    def __init__(self, tokens, mask, block_size):
        self.tokens, self.mask = tokens, mask
        starts = np.flatnonzero(mask & 2)
        ends = np.append(starts[1:], len(tokens))
        lengths = np.minimum(ends - starts, block_size + 1)
        trained = np.concatenate([[0], np.cumsum(mask & 1)])  # trained[i]: trained tokens before i
        usable = trained[starts + lengths] - trained[starts + 1] > 0
        self.skipped = int((~usable).sum())
        self.starts, self.ends, self.lengths = starts[usable], ends[usable], lengths[usable]
        self.by_length = np.argsort(self.lengths, kind='stable')  # conversations of a batch have similar lengths

    def __len__(self):
        return len(self.starts)

    def sample(self, batch_size, block_size, rng, mask_prompt=True):
        """A random batch of about batch_size * block_size tokens, as a stream's batch: a random conversation
        and the ones just shorter than it, as many as fit (fewer for the very shortest). -> rows()"""
        i = int(rng.integers(len(self)))
        rows = max(1, batch_size * block_size // (int(self.lengths[self.by_length[i]]) - 1))
        return self.rows(self.by_length[max(0, i + 1 - rows):i + 1], mask_prompt)

    def rows(self, indices, mask_prompt=True):
        """(x, y, real tokens) of the conversations `indices`, one a row from its first token: inputs x and
        targets y (B, T) int64, T the longest one's; y is -1 on padding and, with mask_prompt, on every token
        training doesn't predict. Real tokens: x's tokens that are not padding."""
        T = int(self.lengths[indices].max()) - 1
        x, y = np.zeros((len(indices), T), dtype=np.int64), np.full((len(indices), T), -1, dtype=np.int64)
        for row, i in enumerate(indices):
            start, n = self.starts[i], self.lengths[i]
            ids = self.tokens[start:start + n].astype(np.int64)
            x[row, :n - 1] = ids[:-1]
            trained = self.mask[start + 1:start + n] & 1 if mask_prompt else True
            y[row, :n - 1] = np.where(trained, ids[1:], -1)
        return x, y, int(self.lengths[indices].sum()) - len(indices)


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


def open_dataset(dataset, block_size):
    """data/<dataset>'s meta and its train/val splits for train.py: token streams, memory-mapped, or
    Conversations; a one-line error, with the fix, for what training could not use."""
    data_dir = os.path.join('data', dataset)
    meta = load_meta(data_dir)
    splits = {split: open_split(data_dir, split, meta['dtype'], block_size) for split in ('train', 'val')}
    for split, data in splits.items():
        if data is None:
            how = f"python prepare.py {dataset}" + ("" if dataset in DATASETS else " --input=PATH")
            die(f"dataset '{dataset}' is not prepared ({data_dir}/{split}.bin is missing): run {how}")
        if isinstance(data, Conversations):
            if len(data) == 0:
                die(f"no conversation of the {split} split of {data_dir} has an assistant token within block_size "
                    f"{block_size}: raise block_size")
            if data.skipped:
                print(f"{data.skipped:,} conversations of the {split} split have no assistant token within block_size "
                      f"{block_size}: left out")
        elif len(data) <= block_size:
            die(f"the {split} split of {data_dir} has {len(data)} tokens, too few for block_size {block_size}: "
                f"use --block_size={max(1, len(data) // 2)} or more text")
    return meta, splits
