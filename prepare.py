"""
Turn text, or conversations, into the token streams train.py reads:
    data/<name>/train.bin, val.bin  raw token ids, uint16 (uint32 if the vocabulary needs it), for np.memmap
    data/<name>/meta.json           the tokenizer (tokenizer.py), vocab_size, dtype
    data/<name>/train_mask.bin, val_mask.bin   (conversations) a byte per token: 1 if training predicts it,
                                    + 2 where a conversation starts
    data/<name>/report.json, removed_samples.jsonl   what was read, kept and removed, and why (curate.py)

    python prepare.py shakespeare_char           # tiny shakespeare, one token per character
    python prepare.py shakespeare                # the same text in GPT-2 BPE tokens
    python prepare.py NAME --input=PATH          # a file, a directory, a glob or an http(s) URL
    python prepare.py NAME --input=PATH --tokenizer=bpe --vocab_size=8192   # a BPE trained on the train split
    python prepare.py NAME --input=DIR --quality=web --near_dedup=0.8 --redact_pii   # curated, as FineWeb is
    python prepare.py sft --input=chats.jsonl --tokenizer=data/NAME         # conversations, NAME's tokenizer
    python prepare.py fineweb10B --shards=8      # FineWeb in GPT-2 tokens, as the NanoGPT speedrun publishes it

.txt and .md files are one document each, .jsonl files one document per line (its "text" field), .json
files a list of them. Records with "messages" (OpenAI's fine-tuning format) or "instruction" and "output"
(Alpaca's) are conversations, rendered with the chat template.
A single text file (or URL) is split by position: its first (1 - val_fraction) is the training split.
Anything else is split by document (every 1/val_fraction-th kept one goes to val), and in BPE tokens
every document starts with the end-of-text token. Exact duplicate documents are dropped; curate.py's quality
rules, near-duplicate removal and PII redaction are there to switch on.

Memory stays bounded whatever the input's size: documents are read one at a time and cut into pieces of
~1M characters that worker processes tokenize, and their tokens are appended to the splits in input order as
they come back. (A character vocabulary, the length of a single text, or a BPE to train, takes one more
read first.) Reading the input is documents.py; the formats on disk and downloads are dataset.py, which the
other scripts read; the tokenizers are tokenizer.py.
"""

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import re
import signal
import time
from contextlib import ExitStack

import numpy as np

import curate  # quality rules, near duplicates, PII, the report
import documents as docs  # the input: files, documents, conversations, pieces
import hub
from curate import SeenHashes
from dataset import DATASETS, GPT2_META, INCOMPLETE, die, download, load_meta, shard_tokens, token_dtype
from documents import Conversation, TextFile, characters, detect_format, input_files, pieces, read_documents, texts
from tokenizer import Tokenizer, check_vocab_size, gpt2_encoding, hub_tokenizer, train_bpe, with_chat_tokens

FINEWEB_REPO = 'kjj0/fineweb10B-gpt2'  # the speedrun's shards: fineweb_val_000000.bin, fineweb_train_000001..103.bin
FINEWEB_TRAIN_SHARDS = 103


# -----------------------------------------------------------------------------
# choosing the documents, and tokenizing them in worker processes

def screened(documents, min_length, dedup, report):
    """(number, document) for each document that is neither empty nor shorter than min_length characters nor
    (with dedup) an exact duplicate (same text) of an earlier one, decided as they come; report counts them all."""
    seen = SeenHashes()
    for number, document in enumerate(documents, 1):
        if isinstance(document, TextFile) and not dedup:
            length = n_bytes = os.path.getsize(document.path)  # its size stands in for its length, saving a read
        else:
            length, n_bytes = 0, 0
            digest = hashlib.blake2b(digest_size=8)  # 64 bits: 1e7 documents collide with p < 3e-6
            if isinstance(document, Conversation):  # the same messages, roles included
                digest.update(json.dumps(document).encode())
            for chunk in texts(TextFile(document.path) if isinstance(document, TextFile) else document):
                data = chunk.encode()
                length, n_bytes = length + len(chunk), n_bytes + len(data)
                if dedup and not isinstance(document, Conversation):
                    digest.update(data)
        report.read(n_bytes)
        if length == 0 or length < min_length:
            report.remove('too short', n_bytes, start_of(document), number)
        elif dedup and not seen.add(np.uint64(int.from_bytes(digest.digest(), 'little'))):
            report.remove('exact duplicate', n_bytes, start_of(document), number)
        else:
            yield number, document


def start_of(document):
    """The start of a document for the report's samples (None for a large file, read in chunks)."""
    if isinstance(document, TextFile):
        return None
    return '\n'.join(document.texts()) if isinstance(document, Conversation) else next(iter(document), '')


def curated(documents, bounds, lsh_shape, index, pool, workers, report):
    """The documents that pass the quality rules (bounds) and, with lsh_shape (bands, rows), are no near
    duplicate of one already in the LSH index, decided in input order. Workers judge them in batches and
    compute their band keys; here each one's keys are looked up and added to the index, in order, so the
    first document of a cluster is the one kept, whatever the number of workers. A document too large to
    hold (a file read in chunks) is kept unjudged."""
    settings, judged = (bounds, *(lsh_shape or (0, 0))), collections.deque()

    def tasks():  # what the workers judge: a batch's texts; the documents wait in `judged` for their verdicts
        batch, n_chars = [], 0
        for number, document in documents:
            text = None if isinstance(document, TextFile) else ''.join(texts(document))
            batch.append((number, document, text))
            n_chars += len(text or '')
            if n_chars >= docs.PIECE_CHARS:
                judged.append(batch)
                yield settings, [text for _, _, text in batch if text is not None]
                batch, n_chars = [], 0
        if batch:
            judged.append(batch)
            yield settings, [text for _, _, text in batch if text is not None]
    verdicts = ordered_map(pool, curate.judge_batch, tasks(), 4 * workers) if pool else map(curate.judge_batch, tasks())
    for batch_verdicts in verdicts:
        # the keys of those signed (not those that failed a rule or have no words), looked up and added in
        # order, a removed one's too: a cluster grows
        signed = [keys for _, keys in batch_verdicts if keys is not None]
        new = iter(index.add_rows(np.stack(signed)) if signed else [])
        batch_verdicts = iter(batch_verdicts)
        for number, document, text in judged.popleft():
            reason, keys = next(batch_verdicts) if text is not None else (None, None)
            if text is None:
                report.unjudged += 1
            elif reason is not None:
                report.remove(reason, len(text.encode()), text, number)
                continue
            elif keys is not None:
                report.indexed += 1
                if not next(new):
                    report.remove('near duplicate', len(text.encode()), text, number)
                    continue
            yield number, document


def with_splits(documents, val_fraction, counts):
    """(split, document) for each document: every 1/val_fraction-th goes to val, starting with the first."""
    for _, document in documents:
        split = 'val' if counts['val'] < val_fraction * (counts['train'] + counts['val'] + 1) else 'train'
        counts[split] += 1
        yield split, document


def by_document(documents):
    """(split, starts_a_document, text or Conversation) for the documents in pieces (a conversation whole), in order."""
    for split, document in documents:
        if isinstance(document, Conversation):
            yield split, True, document
            continue
        for i, piece in enumerate(pieces(document)):
            yield split, i == 0, piece


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


def item_chars(item):
    return sum(map(len, item.texts())) if isinstance(item, Conversation) else len(item)


def batches(items):
    """by_document's or by_position's items in tasks of about docs.PIECE_CHARS characters, each of one split."""
    open_batches, sizes = {'train': [], 'val': []}, {'train': 0, 'val': 0}
    for split, starts_a_document, item in items:
        open_batches[split].append((split, starts_a_document, item))
        sizes[split] += item_chars(item)
        if sizes[split] >= docs.PIECE_CHARS:
            yield open_batches[split]
            open_batches[split], sizes[split] = [], 0
    yield from (batch for batch in open_batches.values() if batch)


def start_worker(meta, in_pool=False, redact_pii=False):
    global worker_tokenizer, worker_gpt2, worker_redact
    if in_pool:  # Ctrl-C is the main process's to handle: it stops the pool, with SIGTERM, which ends a worker
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, 'pthread_sigmask'):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by worker_pool until now
    worker_tokenizer, worker_redact = Tokenizer(meta), redact_pii
    worker_gpt2 = None  # GPT-2's tokenizer, to compare bytes per token on the val text with (where it loads)
    if meta['tokenizer'] == 'bpe':
        try:
            worker_gpt2 = gpt2_encoding()
        except SystemExit:
            pass


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_pool(workers, meta, redact_pii=False):
    """A pool of tokenizing workers. Ctrl-C and SIGTERM wait while it starts them (blocked, then delivered):
    a worker that got SIGTERM from a pool stopped early (an error in the first lines of input) before it
    had set its own handlers would die with this process's, printing a KeyboardInterrupt traceback."""
    if not hasattr(signal, 'pthread_sigmask'):  # Windows: no such signals to wait for
        return multiprocessing.Pool(workers, start_worker, (meta, True, redact_pii))
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return multiprocessing.Pool(workers, start_worker, (meta, True, redact_pii))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def encode_batch(batch):
    """In a worker: (split, token ids, mask or None, statistics) of one batch. A conversation is rendered with
    the chat template, and its mask says which tokens training predicts (1) and where it starts (2). For the
    val text: its UTF-8 bytes, its tokens without separators and GPT-2's tokens of it; with --redact_pii, the
    redactions by kind ('email', 'ipv4', 'ipv6')."""
    tok, ids, masks, stats = worker_tokenizer, [], [], collections.Counter()
    for split, starts_a_document, item in batch:
        if worker_redact:
            item, found = curate.redact_item(item)
            stats.update(found)
        if isinstance(item, Conversation):
            conversation_ids, mask = tok.render(item)
            ids.append(np.array(conversation_ids))
            masks.append(np.array(mask, dtype=np.uint8))
            masks[-1][0] |= 2
            continue
        if starts_a_document and tok.eot is not None:  # BPE documents are separated, as GPT-2's
            ids.append(np.array([tok.eot]))
        ids.append(tok.encode_array(item))
        if split == 'val':
            stats['bytes'] += len(item.encode())
            stats['tokens'] += len(ids[-1])
            stats['gpt2 tokens'] += len(worker_gpt2.encode_ordinary(item)) if worker_gpt2 else 0
    return batch[0][0], np.concatenate(ids).astype(tok.meta['dtype']), np.concatenate(masks) if masks else None, stats


def redacted(items):
    """by_document's or by_position's items, redacted: what a BPE trained here learns from."""
    for split, starts_a_document, item in items:
        yield split, starts_a_document, curate.redact_item(item)[0]


def ordered_map(pool, fn, items, window):
    """pool.imap(fn, items) that reads at most `window` items ahead, so memory stays bounded."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def choose_tokenizer(spec, files, chat, chars, documents, vocab_size):
    """The meta of the dataset's tokenizer (see tokenizer.py): char, gpt2, bpe (trained here on the train
    split's documents), data/OTHER (an already prepared dataset's), or hub:owner/name (a Hub model's)."""
    if vocab_size is not None and spec != 'bpe':
        die("--vocab_size is for a BPE trained here: add --tokenizer=bpe (other tokenizers bring their own)")
    if spec == 'char':
        meta = {'tokenizer': 'char', 'vocab_size': len(chars), 'chars': list(chars)}
    elif spec == 'gpt2':
        meta = dict(GPT2_META)
    elif spec == 'bpe':
        meta = train_tokenizer(documents(), 8192 if vocab_size is None else vocab_size)
    elif spec.startswith('hub:'):
        meta = hub_tokenizer(spec[4:]) or die(
            f"{spec[4:]} has no tokenizer.json: only a Hub model with one (or GPT-2's: --tokenizer=gpt2) can be used")
    elif os.path.isdir(spec) or os.sep in spec or '/' in spec:
        if not os.path.exists(os.path.join(spec, 'meta.json')):
            die(f"--tokenizer={spec}: {spec} is not a prepared dataset (it has no meta.json): prepare it first")
        meta = {k: v for k, v in load_meta(spec).items() if k not in ('chat_template', 'dtype')}
        Tokenizer(meta, f"{spec}/meta.json")  # a damaged one stops here
        if meta['tokenizer'] == 'char':
            used = chars if chars is not None else characters(files, chat)[0]  # counted already for one text
            missing = ''.join(sorted(set(used) - set(meta['chars'])))
            if missing:
                die(f"the text has characters that {spec}'s vocabulary lacks: {missing!r}; remove them, or prepare "
                    "with a vocabulary of its own (--tokenizer=char)")
    else:
        die(f"unknown tokenizer '{spec}': use char, gpt2, bpe, data/NAME (a prepared dataset's) or hub:owner/name")
    meta = with_chat_tokens(meta) if chat else meta
    return {**meta, 'dtype': token_dtype(meta['vocab_size'])}


def train_tokenizer(items, vocab_size):
    """A BPE trained on the train split's texts (items as by_document or by_position gives them)."""
    check_vocab_size(vocab_size)
    t0, n_chars = time.time(), 0

    def train_texts():
        nonlocal n_chars
        for split, _, item in items:
            if split == 'train':  # in pieces of ~16k characters: rustbpe holds 1024 at a time
                for text in texts(item) if isinstance(item, Conversation) else pieces([item], 1 << 14):
                    n_chars += len(text)
                    yield text
    meta = train_bpe(train_texts(), vocab_size)
    seconds = time.time() - t0
    print(f"trained a BPE of {meta['vocab_size']:,} tokens on {n_chars:,} characters of the train split in "
          f"{seconds:.2f} s" + (f" (the text had pairs for no more than {meta['vocab_size']:,})"
                                if meta['vocab_size'] < vocab_size else ""))
    return meta


def prepare(name, input_path=None, tokenizer=None, val_fraction=0.1, data_root='data', workers=None,
            min_length=0, dedup=True, vocab_size=None, format=None, quality=None, quality_keys=None,
            near_dedup=None, redact_pii=False):
    """Make data/<name>/ (train.bin, val.bin, meta.json; with conversations, the masks; report.json and
    removed_samples.jsonl) from the input (see input_files) and tokenizer (see choose_tokenizer); returns its
    path. Curation (curate.py): quality, a preset of the quality rules' bounds, and quality_keys, bounds of
    its rules to set or replace; near_dedup, a Jaccard similarity past which a document is removed as a near
    duplicate of an earlier one; redact_pii, emails and public IP addresses replaced by placeholders."""
    from tqdm import tqdm
    if not 0.0 < val_fraction < 1.0:
        die(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if workers is None:  # one per core this process may use
        workers = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if workers < 1:
        die(f"workers must be 1 or more, got {workers}")
    if format not in (None, 'text', 'chat'):
        die(f"unknown format '{format}': use text or chat (the default: told by the records)")
    try:
        bounds = curate.quality_bounds(quality, **(quality_keys or {}))
    except ValueError as e:
        die(str(e))
    if near_dedup is not None and not 0.0 < near_dedup < 1.0:
        die(f"--near_dedup is a Jaccard similarity between 0 and 1 (FineWeb's is about 0.75), got {near_dedup}; "
            "1 would be exact duplicates, which --dedup removes")
    if not re.fullmatch(r'[\w][\w.-]*', name):  # a directory of data/, never a path out of it
        die(f"the dataset name '{name}' must be letters, digits, '_', '-' or '.' (it names data/<name>/)")
    data_dir = os.path.join(data_root, name)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        die(f"{data_dir} is a file, not a dataset's directory: move it away or pick another name")
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    files, single_text = input_files(name, input_path, data_dir)
    n_bytes = sum(os.path.getsize(p) for p in files)
    if n_bytes == 0:
        die(f"{input_path or files[0]} is empty: there is nothing to train on")
    chat = (format or detect_format(files)) == 'chat'
    single_text = single_text and not chat
    tokenizer = tokenizer or DATASETS.get(name, (None, None, 'char' if name.endswith('_char') else 'gpt2'))[2]
    if (bounds or near_dedup) and (chat or single_text):
        die("--quality and --near_dedup judge documents of text: " + (
            "conversations are not filtered by them (--redact_pii works on them)" if chat else
            f"{input_path or files[0]} is one text, split by position; give a directory, a glob or .jsonl documents"))
    lsh_shape = curate.lsh_shape(near_dedup) if near_dedup else None
    chars, n_chars = characters(files, chat) if tokenizer == 'char' or single_text else (None, None)
    if redact_pii and tokenizer == 'char':  # the vocabulary made here holds the placeholders' characters too
        chars = ''.join(sorted(set(chars) | set(''.join(curate.PLACEHOLDERS.values()))))

    def documents(report=None, progress=lambda n_bytes: None, pool=None, index=None):
        """by_position's or by_document's items: the same on every pass over the input."""
        report = report or curate.Report()
        kept = screened(read_documents(files, progress, chat), min_length, dedup and not single_text, report)
        if bounds or lsh_shape:
            kept = curated(kept, bounds, lsh_shape, index or SeenHashes(), pool, workers, report)
        kept = with_splits(kept, val_fraction, report.splits)
        return by_position(kept, int(n_chars * (1 - val_fraction))) if single_text else by_document(kept)
    meta = choose_tokenizer(tokenizer, files, chat, chars, (lambda: redacted(documents())) if redact_pii else documents,
                            vocab_size)
    t_tokenize = time.time()

    # read, choose and cut the documents here; workers tokenize; their tokens are appended to temporary files
    start_worker(meta, redact_pii=redact_pii)  # here first: a tokenizer that can't load stops us now, not each worker
    report, index = curate.Report(redact_samples=redact_pii), SeenHashes()
    tokens, stats = collections.Counter(), collections.Counter()
    keys = ['train', 'val'] + (['train_mask', 'val_mask'] if chat else [])
    tmp = {key: os.path.join(data_dir, f'{key}.bin.tmp') for key in keys}
    try:
        # worker processes, as reading, hashing and cutting the text here hold the GIL
        with ExitStack() as stack:
            out = {key: stack.enter_context(open(path, 'wb')) for key, path in tmp.items()}
            bar = stack.enter_context(tqdm(total=n_bytes, unit='B', unit_scale=True,
                                           desc=f'tokenizing ({workers} workers)'))
            pool = stack.enter_context(worker_pool(workers, meta, redact_pii)) if workers > 1 else None
            tasks = batches(documents(report, bar.update, pool, index))
            results = ordered_map(pool, encode_batch, tasks, window=4 * workers) if pool else map(encode_batch, tasks)
            for split, ids, mask, batch_stats in results:
                ids.tofile(out[split])
                if mask is not None:
                    mask.tofile(out[f'{split}_mask'])
                tokens[split] += len(ids)
                stats.update(batch_stats)
        counts = report.splits
        for split in ('train', 'val'):
            if tokens[split] == 0:
                removed = ', '.join(f"{n:,} {reason}" for reason, n in report.removed().items()) or 'none'
                die(f"no {split} text in {input_path or files[0]}: of {report.documents['read']:,} documents, "
                    f"{counts['train']:,} went to train and {counts['val']:,} to val (removed: {removed}): "
                    + ("use a larger --val_fraction" if single_text and split == 'val' else
                       "pass the file itself, to split it by position" if report.documents['read'] == 1 else
                       "give more text, or loosen the quality rules" if bounds else "give more text"))
    except BaseException:  # a failure or Ctrl-C: the old dataset stays, without our leftovers
        for path in tmp.values():
            os.remove(path)
        raise
    replace_dataset(data_dir, tmp, meta)
    report.redactions.update({kind: stats[kind] for kind in curate.PLACEHOLDERS if redact_pii})
    report.index = curate.index_figures(index, report.indexed, near_dedup, lsh_shape) if lsh_shape else None
    report.write(data_dir, splits={split: {'documents': counts[split], 'tokens': tokens[split]} for split in tokens},
                 options={'min_length': min_length, 'dedup': dedup and not single_text, 'quality': bounds or None,
                          'near_dedup': near_dedup, 'redact_pii': redact_pii})

    seconds = time.time() - t0
    if single_text:
        print(f"one text of {n_chars:,} characters, split by position" +
              (f"; redacted: {report.redacted()}" if redact_pii else ""))
    else:
        print('\n'.join(report.lines('conversations' if chat else 'documents')))
        print(f"{counts['train']:,} went to train, {counts['val']:,} to val" + (
            f"; {report.unjudged:,} over {docs.LARGE_FILE >> 20} MB were kept unjudged" if report.unjudged else ""))
    tokenizing = f"; tokenizing alone {n_bytes / 1e6 / (time.time() - t_tokenize):.1f} MB/s" if tokenizer == 'bpe' else ""
    print(f"train.bin: {tokens['train']:,} tokens; val.bin: {tokens['val']:,} tokens; "
          f"{n_bytes / 1e6:,.1f} MB of input in {seconds:.1f} s ({n_bytes / 1e6 / seconds:.1f} MB/s{tokenizing})")
    if stats['tokens']:
        print(f"val text: {stats['bytes'] / stats['tokens']:.3f} bytes per token" +
              (f"; GPT-2's tokenizer: {stats['bytes'] / stats['gpt2 tokens']:.3f} on the same text "
               f"({stats['gpt2 tokens'] / stats['tokens']:.2f}x as many tokens)" if stats['gpt2 tokens'] else ""))
    print(f"wrote {data_dir}: vocab_size {meta['vocab_size']:,} ({meta['tokenizer']}), tokens stored as {meta['dtype']}"
          + (", with the chat template and its training masks" if chat else ""))
    return data_dir


def replace_dataset(data_dir, tmp_paths, meta):
    """Move the new files into place and write meta.json. Meanwhile a marker file makes load_meta refuse the
    directory: a kill at any moment leaves the old dataset or one that train.py won't take as complete."""
    marker = os.path.join(data_dir, INCOMPLETE)
    open(marker, 'w').close()
    for key, tmp_path in tmp_paths.items():
        os.replace(tmp_path, os.path.join(data_dir, f'{key}.bin'))
    for stale in {'train_mask', 'val_mask'} - tmp_paths.keys():  # an earlier chat dataset's masks
        if os.path.exists(os.path.join(data_dir, f'{stale}.bin')):
            os.remove(os.path.join(data_dir, f'{stale}.bin'))
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
    marker = os.path.join(data_dir, INCOMPLETE)
    open(marker, 'w').close()  # until every shard is here
    names = {'val': ['fineweb_val_000000.bin'], 'train': [f'fineweb_train_{i:06d}.bin' for i in range(1, shards + 1)]}
    n_tokens = collections.Counter()
    for split, filenames in names.items():
        for filename in filenames:
            path = os.path.join(data_dir, filename)
            try:
                download(f'{hub.endpoint()}/datasets/{FINEWEB_REPO}/resolve/main/{filename}', path)  # unless here
            except SystemExit as e:  # train.py will say this, not that a prepare.py was interrupted
                with open(marker, 'w') as f:
                    f.write(f"downloading {filename} failed ({str(e.code).removeprefix('error: ')})")
                raise
            n_tokens[split] += len(shard_tokens(path))
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:  # the shards train.py reads: no more, no fewer
        json.dump({**GPT2_META, 'shards': names}, f)
    os.remove(os.path.join(data_dir, INCOMPLETE))
    print(f"wrote {data_dir}: {shards} training shards ({n_tokens['train']:,} tokens), val {n_tokens['val']:,} tokens")
    return data_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('name', nargs='?', help='dataset name: the directory data/<name>')
    parser.add_argument('--name', dest='name_flag', help='the same, as a flag')
    parser.add_argument('--input', help='a file, a directory, a glob or an http(s) URL (default: data/<name>/input.txt)')
    parser.add_argument('--tokenizer', help='char, gpt2, bpe (trained here), data/NAME (a prepared dataset\'s) or '
                        'hub:owner/name; default: char for *_char datasets, else gpt2')
    parser.add_argument('--vocab_size', type=int, help='--tokenizer=bpe: tokens in all, special ones included (8192)')
    parser.add_argument('--format', choices=['text', 'chat'], help='text or conversations (default: told by the records)')
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the share of the text kept for validation')
    parser.add_argument('--workers', type=int, help='tokenizer processes (default: one per CPU core)')
    parser.add_argument('--min_length', type=int, default=0, help='drop documents shorter than this, in characters')
    parser.add_argument('--dedup', action=argparse.BooleanOptionalAction, default=True,
                        help='drop exact duplicate documents (default: on)')
    parser.add_argument('--shards', type=int, default=8, help='fineweb10B: training shards of 100M tokens')
    parser.add_argument('--quality', help="quality rules: 'web' (FineWeb's choice of Gopher's and C4's)")
    for rule, (_, low, high) in curate.RULES.items():  # each bound of each rule, an option
        for key in filter(None, (low, high)):
            parser.add_argument(f'--{key}', type=float, help=f"{rule}: {'least' if key == low else 'most'} "
                                f"kept (--quality=web: {curate.PRESETS['web'][key]})")
    parser.add_argument('--near_dedup', type=float, help='remove near duplicates at this Jaccard similarity (e.g. 0.8)')
    parser.add_argument('--redact_pii', action='store_true', help='replace emails and public IP addresses')
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
                    min_length=args.min_length, dedup=args.dedup, vocab_size=args.vocab_size, format=args.format,
                    quality=args.quality, quality_keys={key: getattr(args, key) for key in curate.QUALITY_KEYS},
                    near_dedup=args.near_dedup, redact_pii=args.redact_pii)
    except KeyboardInterrupt:
        die("interrupted: run the same command again to start over (a download resumes where it stopped)")
