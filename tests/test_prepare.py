import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dataset
import documents
import prepare as prepare_module
from conftest import ROOT, gpt2_bpe_available, run
from dataset import GPT2_EOT, TokenShards, download, load_meta, open_split, token_dtype
from tokenizer import Tokenizer
from prepare import prepare

needs_bpe = pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")


def read_split(data_dir, split):
    meta = load_meta(str(data_dir))
    return np.fromfile(data_dir / f'{split}.bin', dtype=meta['dtype']), meta


def test_char_dataset_round_trips(tmp_path, small_text):
    (tmp_path / 'in.txt').write_text(small_text, encoding='utf-8')
    data_dir = prepare('tiny_char', str(tmp_path / 'in.txt'), data_root=str(tmp_path / 'data'))
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    assert meta['tokenizer'] == 'char' and meta['dtype'] == 'uint16'
    assert meta['chars'] == sorted(set(small_text)) and meta['vocab_size'] == len(meta['chars'])
    train, _ = read_split(tmp_path / 'data' / 'tiny_char', 'train')
    val, _ = read_split(tmp_path / 'data' / 'tiny_char', 'val')
    assert len(train) == int(len(small_text) * 0.9)  # the first 90% of the text
    decode = Tokenizer(meta).decode
    assert decode(train.tolist()) + decode(val.tolist()) == small_text


@needs_bpe
def test_gpt2_dataset_round_trips(tmp_path, small_text):
    (tmp_path / 'in.txt').write_text(small_text, encoding='utf-8')
    prepare('tiny', str(tmp_path / 'in.txt'), data_root=str(tmp_path / 'data'))
    train, meta = read_split(tmp_path / 'data' / 'tiny', 'train')
    val, _ = read_split(tmp_path / 'data' / 'tiny', 'val')
    assert meta == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}
    tok = Tokenizer(meta)
    encode, decode = tok.encode, tok.decode
    assert decode(train.tolist()) + decode(val.tolist()) == small_text
    assert encode('Hello world') == [15496, 995]  # GPT-2's own ids


def test_token_dtype_widens_for_large_vocabularies():
    assert token_dtype(65) == 'uint16' and token_dtype(65536) == 'uint16'
    assert token_dtype(65537) == 'uint32' and token_dtype(100_277) == 'uint32'


def test_large_char_vocabulary_is_stored_as_uint32(tmp_path):
    # 67,952 distinct characters (surrogates can't be encoded): more than uint16 can number
    text = ''.join(chr(i) for i in range(0x100, 0x100 + 70_000) if not 0xD800 <= i < 0xE000) * 2
    (tmp_path / 'big.txt').write_text(text, encoding='utf-8')
    prepare('big_char', str(tmp_path / 'big.txt'), data_root=str(tmp_path / 'data'))
    train, meta = read_split(tmp_path / 'data' / 'big_char', 'train')
    assert meta['dtype'] == 'uint32' and meta['vocab_size'] > 65536
    decode = Tokenizer(meta).decode
    assert decode(train.tolist()) == text[:len(train)]


def test_downloads_from_a_url_with_retries(tmp_path, http_server, small_text):
    url, root, state = http_server
    (root / 'input.txt').write_text(small_text, encoding='utf-8')
    state['fail_first'] = 2  # two 503s, then the file
    data_dir = prepare('web_char', f'{url}/input.txt', data_root=str(tmp_path / 'data'))
    assert state['requests'] == 3
    assert open(os.path.join(data_dir, 'input.txt'), encoding='utf-8').read() == small_text
    assert not os.path.exists(os.path.join(data_dir, 'input.txt.part'))
    # a second prepare uses the downloaded copy
    prepare('web_char', f'{url}/input.txt', data_root=str(tmp_path / 'data'))
    assert state['requests'] == 3


def test_prepare_bad_input_is_a_one_line_error(tmp_path, http_server):
    url, root, _ = http_server
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
    cases = [
        (['x_char', f'--input={tmp_path}/missing.txt'], 'does not exist'),
        (['x_char', f'--input={tmp_path}/empty.txt'], 'is empty'),
        (['x_char', f'--input={tmp_path}/latin1.txt'], 'is not UTF-8'),
        (['x_char', f'--input={url}/nothing_here.txt'], 'HTTP 404'),
        (['unknown_dataset'], 'pass --input=PATH'),
    ]
    for args, message in cases:
        proc = run('prepare.py', *args, cwd=tmp_path, check=False)
        assert proc.returncode != 0
        assert message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / 'data' / 'x_char' / 'meta.json')


def test_unreachable_url_fails_after_retries(tmp_path):
    import socket
    with socket.socket() as s:  # a port on 127.0.0.1 with nothing listening
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = run('prepare.py', 'x_char', f'--input=http://127.0.0.1:{port}/input.txt', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'after 3 tries' in proc.stderr and 'Traceback' not in proc.stderr


# -----------------------------------------------------------------------------
# many documents: a directory, a glob, .jsonl

def gpt2_documents(data_dir):
    """The documents of a GPT-2 dataset's splits: each starts with the end-of-text token."""
    meta = load_meta(str(data_dir))
    decode = Tokenizer(meta).decode
    splits = {}
    for split in ('train', 'val'):
        ids = np.fromfile(data_dir / f'{split}.bin', dtype=meta['dtype'])
        assert ids[0] == GPT2_EOT
        starts = list(np.flatnonzero(ids == GPT2_EOT)) + [len(ids)]
        splits[split] = [decode(ids[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    return splits


def write_corpus(root, small_text):
    """A folder of documents with duplicates, a short one, CRLF line endings and files to ignore;
    returns the documents prepare.py keeps (min_length=50), in the order it reads them."""
    lines = small_text.split('\n')
    doc = ['\n'.join(lines[i:i + 30]) for i in range(0, 900, 30)]  # 30 distinct documents
    (root / 'notes' / 'deeper').mkdir(parents=True)
    (root / '.git').mkdir()
    (root / 'a.txt').write_text(doc[0])
    (root / 'b.md').write_bytes(doc[1].replace('\n', '\r\n').encode())  # Windows line endings
    (root / 'c.txt').write_text(doc[0])  # a duplicate of a.txt
    (root / 'd.txt').write_text('too short')
    (root / 'notes' / 'deeper' / 'e.txt').write_text(doc[2])
    (root / 'notes' / 'f.jsonl').write_text(''.join(json.dumps({'text': t, 'id': i}) + '\n' for i, t in enumerate(
        doc[3:20] + [doc[1].replace('\n', '\r\n'), doc[5]] + doc[20:])) + '\n')  # two duplicates, a blank line
    (root / 'notes' / 'ignored.csv').write_text(doc[29] + 'x')
    (root / '.git' / 'HEAD.txt').write_text(doc[29] + 'y')
    return [doc[0], doc[1], doc[2]] + doc[3:]  # read order: a, b, (c, d dropped), notes/deeper/e, notes/f


@needs_bpe
def test_a_directory_of_documents_round_trips(tmp_path, small_text, capsys):
    expected = write_corpus(tmp_path / 'in', small_text)
    prepare('docs', str(tmp_path / 'in'), val_fraction=0.25, min_length=50, data_root=str(tmp_path / 'data'))
    splits = gpt2_documents(tmp_path / 'data' / 'docs')
    # every 4th kept document goes to val, starting with the first
    assert splits['val'] == expected[::4] and splits['train'] == [d for i, d in enumerate(expected) if i % 4]
    out = capsys.readouterr().out
    table = dict(re.findall(r'^(\S.*?) {2,}([\d,]+) ', out, re.M))  # name, documents
    assert table['read'] == '34' and table['kept'] == '30' and '22 went to train, 8 to val' in out
    assert table['removed: exact duplicate'] == '3' and table['removed: too short'] == '1'
    # a glob picks its files the same way; here only the .jsonl, where the CRLF copy of b.md is no duplicate
    prepare('glob', str(tmp_path / 'in' / '**' / '*.jsonl'), data_root=str(tmp_path / 'data'))
    splits = gpt2_documents(tmp_path / 'data' / 'glob')
    kept = expected[3:20] + [expected[1]] + expected[20:]
    assert splits['val'] == kept[::10] and splits['train'] == [d for i, d in enumerate(kept) if i % 10]


@needs_bpe
def test_tokens_match_tiktoken_on_whole_documents_for_any_number_of_workers(tmp_path, small_text, monkeypatch):
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    monkeypatch.setattr(documents, 'PIECE_CHARS', 2000)  # documents of many pieces, batches of many documents
    rng = np.random.default_rng(0)
    docs = [small_text[a:a + n] for a, n in zip(rng.integers(0, 50_000, 40), rng.integers(10, 9000, 40))]
    docs += ['the text of <|endoftext|> is just text', 'x' * 5000 + '  \n\n  ' + 'word ' * 1000,
             '\n\n'.join(line + ' ' for line in small_text.split('\n')[:2000])]  # blank lines, lines ending in a space
    assert max(len(piece) for piece in documents.pieces([docs[-1]])) < 2000 + 20  # a document in many pieces
    (tmp_path / 'in.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    outputs = []
    for workers in (1, 3):
        data_dir = prepare(f'w{workers}', str(tmp_path / 'in.jsonl'), workers=workers, data_root=str(tmp_path / 'data'))
        outputs.append([open(os.path.join(data_dir, f'{split}.bin'), 'rb').read() for split in ('train', 'val')])
    assert outputs[0] == outputs[1]
    # independently: tiktoken on each whole document, the end-of-text token before each
    expected = {'train': [], 'val': []}
    for i, doc in enumerate(docs):
        expected['val' if i % 10 == 0 else 'train'] += [GPT2_EOT] + enc.encode_ordinary(doc)
    for split, data in zip(('train', 'val'), outputs[0]):
        assert np.frombuffer(data, dtype=np.uint16).tolist() == expected[split]


@needs_bpe
def test_large_files_are_streamed_with_the_same_tokens(tmp_path, small_text, monkeypatch):
    import tiktoken
    enc = tiktoken.get_encoding('gpt2')
    monkeypatch.setattr(documents, 'PIECE_CHARS', 3000)
    monkeypatch.setattr(documents, 'LARGE_FILE', 10_000)  # bytes: files above it are read in chunks
    (tmp_path / 'in').mkdir()
    docs = [small_text[:50_000], small_text[:5000], small_text[:50_000], small_text[5000:60_000]]  # one duplicate
    for i, doc in enumerate(docs):
        (tmp_path / 'in' / f'{i}.txt').write_text(doc)
    data_dir = prepare('big', str(tmp_path / 'in'), val_fraction=0.3, data_root=str(tmp_path / 'data'))
    train, val = (np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16).tolist()
                  for split in ('train', 'val'))
    assert val == [GPT2_EOT] + enc.encode_ordinary(docs[0])
    assert train == [GPT2_EOT] + enc.encode_ordinary(docs[1]) + [GPT2_EOT] + enc.encode_ordinary(docs[3])


def test_the_worker_pool_reads_only_a_few_tasks_ahead():
    import itertools
    import multiprocessing
    pulled = []

    def endless():  # an input that never ends: reading it all would never return
        for i in itertools.count():
            pulled.append(i)
            yield i
    with multiprocessing.Pool(2) as pool:
        results = prepare_module.ordered_map(pool, abs, endless(), window=4)
        assert [next(results) for _ in range(10)] == list(range(10))  # in order
    assert len(pulled) <= 10 + 4


def test_seen_hashes_is_a_set():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2 ** 64, 100_000, dtype=np.uint64)
    values = np.concatenate([values, values[:3000], rng.integers(0, 2 ** 64, 50_000, dtype=np.uint64), values[-9000:]])
    seen, reference = prepare_module.SeenHashes(), set()
    for value in values:  # past a merge of the recent hashes into the sorted array
        assert seen.add(value) == (int(value) not in reference)
        reference.add(int(value))
    assert len(seen.merged) > 0


def test_char_documents_share_one_vocabulary(tmp_path):
    (tmp_path / 'in').mkdir()
    for i, text in enumerate(['abc\n', 'héllo\r\n', 'abc\n', 'xyz' * 5]):
        (tmp_path / 'in' / f'{i}.txt').write_text(text, newline='')
    prepare('c_char', str(tmp_path / 'in'), val_fraction=0.3, data_root=str(tmp_path / 'data'))
    train, meta = read_split(tmp_path / 'data' / 'c_char', 'train')
    val, _ = read_split(tmp_path / 'data' / 'c_char', 'val')
    decode = Tokenizer(meta).decode
    assert meta['chars'] == sorted(set('abc\nhélloxyz'))  # no \r: line endings are normalised
    assert decode(val.tolist()) == 'abc\n' and decode(train.tolist()) == 'héllo\n' + 'xyz' * 5  # no separators


def test_a_lone_surrogate_in_jsonl_becomes_a_replacement_character(tmp_path):
    (tmp_path / 'in.jsonl').write_text('{"text": "a\\ud800b"}\n{"text": "emoji \\ud83d\\ude00 ok"}\n')
    prepare('s_char', str(tmp_path / 'in.jsonl'), val_fraction=0.5, data_root=str(tmp_path / 'data'))
    val, meta = read_split(tmp_path / 'data' / 's_char', 'val')
    train, _ = read_split(tmp_path / 'data' / 's_char', 'train')
    decode = Tokenizer(meta).decode
    assert decode(val.tolist()) == 'a\ufffdb' and decode(train.tolist()) == 'emoji \U0001F600 ok'


def test_prepare_rejects_bad_documents_in_one_line(tmp_path):
    (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / 'notext.jsonl').write_text('{"text": "fine"}\n{"body": "no text"}\n')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'one.jsonl').write_text('{"text": "a lonely document"}\n')
    cases = [
        (['x', f'--input={tmp_path}/bad.jsonl'], 'bad.jsonl, line 2, is not a JSON object'),
        (['x', f'--input={tmp_path}/notext.jsonl'], 'notext.jsonl, line 2, has no "text" string'),
        (['x', f'--input={tmp_path}/empty'], 'no input in'),
        (['x', f'--input={tmp_path}/nothing*.txt'], 'no input in'),
        (['x', f'--input={tmp_path}/one.jsonl'], 'no train text'),
        (['x_char', f'--input={tmp_path}/one.jsonl', '--workers=0'], 'workers must be 1 or more'),
    ]
    for args, message in cases:
        proc = run('prepare.py', *args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path / 'data' / 'x') == []  # nothing left behind


# -----------------------------------------------------------------------------
# an interrupted prepare

@needs_bpe
def test_an_interrupted_prepare_never_leaves_a_dataset_that_looks_complete(tmp_path, small_text, monkeypatch):
    import train
    (tmp_path / 'old.txt').write_text(small_text)
    data_dir = prepare('d_char', str(tmp_path / 'old.txt'), data_root=str(tmp_path / 'data'))
    old = {n: open(os.path.join(data_dir, n), 'rb').read() for n in ('train.bin', 'val.bin', 'meta.json')}

    # killed while tokenizing: the old dataset is untouched
    big = tmp_path / 'big.txt'
    big.write_text(small_text.upper() * 300)  # 18 MB: about a second of BPE
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prepare.py'), 'd_char', f'--input={big}',
                             '--tokenizer=gpt2', '--workers=1'], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_train = os.path.join(data_dir, 'train.bin.tmp')
    while not (os.path.exists(tmp_train) and os.path.getsize(tmp_train) > 0) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-way, not finished
    assert {n: open(os.path.join(data_dir, n), 'rb').read() for n in old} == old

    # Ctrl-C (SIGINT to the process group, workers included): a one-line message, and no leftovers
    os.remove(tmp_train)  # what the killed run left; the next run would overwrite it
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prepare.py'), 'd_char', f'--input={big}',
                             '--tokenizer=gpt2', '--workers=2'], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ours ignores it
    while not (os.path.exists(tmp_train) and os.path.getsize(tmp_train) > 0) and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    stderr = proc.communicate()[1]
    assert proc.returncode == 1 and 'error: interrupted' in stderr and 'Traceback' not in stderr, stderr
    assert {n: open(os.path.join(data_dir, n), 'rb').read() for n in old} == old
    assert sorted(os.listdir(data_dir)) == ['meta.json', 'removed_samples.jsonl', 'report.json', 'train.bin', 'val.bin']

    # killed while the new files are moved into place: train.py refuses the dataset
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(prepare_module.os, 'replace', replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare('d_char', str(tmp_path / 'old.txt'), data_root=str(tmp_path / 'data'))
    monkeypatch.undo()
    cfg = train.SimpleNamespace(**{**train.DEFAULTS, 'dataset': 'd_char', 'block_size': 8})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='is incomplete: a prepare.py writing it was interrupted; run prepare.py again'):
        train.open_dataset(cfg.dataset, cfg.block_size)

    # a re-run starts clean and leaves a complete dataset
    prepare('d_char', str(tmp_path / 'old.txt'), data_root=str(tmp_path / 'data'))
    assert sorted(os.listdir(data_dir)) == ['meta.json', 'removed_samples.jsonl', 'report.json', 'train.bin', 'val.bin']
    assert {n: open(os.path.join(data_dir, n), 'rb').read() for n in old} == old
    train.open_dataset(cfg.dataset, cfg.block_size)


# -----------------------------------------------------------------------------
# downloads

def test_a_dropped_download_resumes_where_it_stopped(tmp_path, http_server, small_text, monkeypatch):
    url, root, state = http_server
    monkeypatch.setattr(dataset.time, 'sleep', lambda seconds: None)  # no pauses between tries
    text = small_text * 20  # 1.2 MB
    (root / 'input.txt').write_text(text)
    state['truncate']['/input.txt'] = 1  # the connection drops half-way once
    data_dir = prepare('r_char', f'{url}/input.txt', data_root=str(tmp_path / 'data'))
    # the second request asked for the rest only (the bytes of the read the drop interrupted are lost)
    assert state['ranges'][0] is None and len(state['ranges']) == 2
    assert 0 < int(state['ranges'][1].removeprefix('bytes=').rstrip('-')) <= len(text) // 2
    assert open(os.path.join(data_dir, 'input.txt')).read() == text
    assert not os.path.exists(os.path.join(data_dir, 'input.txt.part'))

    # an interrupted run left a .part and the file's ETag: the next run resumes it...
    etag = f'"{hashlib.sha1(text.encode()).hexdigest()}"'  # what the server sends
    for name, part_bytes, saved_etag in (('other.txt', text.encode()[:1000], etag),
                                         ('third.txt', b'bytes of an older version', '"old"')):
        (root / name).write_text(text)
        (tmp_path / 'data' / 'r_char' / f'{name}.part').write_bytes(part_bytes)
        (tmp_path / 'data' / 'r_char' / f'{name}.part.etag').write_text(saved_etag)
        prepare('r_char', f'{url}/{name}', data_root=str(tmp_path / 'data'))
        assert state['ranges'][-1] == f'bytes={len(part_bytes)}-'
        assert open(os.path.join(data_dir, name)).read() == text  # ...and one that changed since starts over
        assert sorted(n for n in os.listdir(data_dir) if name in n) == [name]


def test_downloads_are_checked_against_a_known_sha256(tmp_path, http_server):
    url, root, state = http_server
    (root / 'f.bin').write_bytes(b'some bytes' * 1000)
    good = hashlib.sha256(b'some bytes' * 1000).hexdigest()
    with pytest.raises(SystemExit, match='does not have the expected SHA-256'):
        download(f'{url}/f.bin', str(tmp_path / 'a.bin'), sha256='0' * 64)
    assert not (tmp_path / 'a.bin').exists()
    download(f'{url}/f.bin', str(tmp_path / 'a.bin'), sha256=good)
    # the SHA-256 the Hub sends along (X-Linked-Etag) is checked too
    state['etags']['/f.bin'] = '1' * 64
    with pytest.raises(SystemExit, match='does not have the expected SHA-256'):
        download(f'{url}/f.bin', str(tmp_path / 'b.bin'))
    state['etags']['/f.bin'] = good
    download(f'{url}/f.bin', str(tmp_path / 'b.bin'))
    assert (tmp_path / 'b.bin').read_bytes() == b'some bytes' * 1000
    # a .part without the ETag it started with is resumed when a SHA-256 will check the result
    (tmp_path / 'c.bin.part').write_bytes(b'some bytes' * 500)
    download(f'{url}/f.bin', str(tmp_path / 'c.bin'), sha256=good)
    assert state['ranges'][-1] == 'bytes=5000-' and (tmp_path / 'c.bin').read_bytes() == b'some bytes' * 1000
    assert sorted(os.listdir(tmp_path)) == ['a.bin', 'b.bin', 'c.bin', 'www']  # no .part or .etag left


def test_a_complete_part_is_not_downloaded_again_and_429_is_retried(tmp_path, http_server, monkeypatch):
    url, root, state = http_server
    monkeypatch.setattr(dataset.time, 'sleep', lambda seconds: None)
    body = b'all of it' * 1000
    (root / 'f.bin').write_bytes(body)
    # killed after the last byte, before the rename: the server answers 416 to the next Range request
    (tmp_path / 'a.bin.part').write_bytes(body)
    (tmp_path / 'a.bin.part.etag').write_text(f'"{hashlib.sha1(body).hexdigest()}"')
    download(f'{url}/f.bin', str(tmp_path / 'a.bin'))
    assert state['ranges'] == [f'bytes={len(body)}-'] and (tmp_path / 'a.bin').read_bytes() == body
    assert sorted(os.listdir(tmp_path)) == ['a.bin', 'www']
    state.update(fail_first=state['requests'] + 2, fail_status=429)  # rate-limited twice: tried again
    download(f'{url}/f.bin', str(tmp_path / 'b.bin'))
    assert (tmp_path / 'b.bin').read_bytes() == body


# -----------------------------------------------------------------------------
# FineWeb shards

def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, 1, len(tokens)
    with open(path, 'wb') as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_token_shards_read_as_their_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 50257, n).astype(np.uint16) for n in (100, 1, 57, 300)]
    for i, part in enumerate(parts):
        write_shard(tmp_path / f'x_train_{i:06d}.bin', part)
    stream, whole = open_split(str(tmp_path), 'train', 'uint16'), np.concatenate(parts)
    assert isinstance(stream, TokenShards) and len(stream) == len(whole)
    index = rng.integers(0, len(whole) - 20, 64)[:, None] + np.arange(20)  # windows across shard boundaries too
    assert np.array_equal(stream[index], whole[index]) and np.array_equal(stream[90:170], whole[90:170])
    (tmp_path / 'x_train_000009.bin').write_bytes(b'\0' * 2000)
    with pytest.raises(SystemExit, match='is not a token shard'):
        open_split(str(tmp_path), 'train', 'uint16')


def test_fineweb_shards_download_and_train(tmp_path, http_server):
    url, root, state = http_server
    repo = root / 'datasets' / 'kjj0' / 'fineweb10B-gpt2' / 'resolve' / 'main'
    repo.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ('fineweb_val_000000.bin', 'fineweb_train_000001.bin', 'fineweb_train_000002.bin',
                 'fineweb_train_000003.bin'):
        write_shard(repo / name, rng.integers(0, 50257, 3000))
    # the Hub sends a large file's SHA-256 along: a right one passes (a wrong one fails: see above)
    state['etags'] = {f'/datasets/kjj0/fineweb10B-gpt2/resolve/main/{name}': hashlib.sha256(
        (repo / name).read_bytes()).hexdigest() for name in os.listdir(repo)}
    env = {'HF_ENDPOINT': url}
    proc = run('prepare.py', 'fineweb10B', '--shards=2', cwd=tmp_path, env=env)
    assert 'wrote data/fineweb10B: 2 training shards (6,000 tokens), val 3,000 tokens' in proc.stdout
    assert sorted(os.listdir(tmp_path / 'data' / 'fineweb10B')) == [
        'fineweb_train_000001.bin', 'fineweb_train_000002.bin', 'fineweb_val_000000.bin', 'meta.json']
    n_requests = state['requests']
    run('prepare.py', 'fineweb10B', '--shards=3', cwd=tmp_path, env=env)  # downloads the third shard only
    assert state['requests'] == n_requests + 1
    run('prepare.py', 'fineweb10B', '--shards=1', cwd=tmp_path, env=env)  # now train.py reads one shard
    assert load_meta(str(tmp_path / 'data' / 'fineweb10B')) == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}
    assert len(open_split(str(tmp_path / 'data' / 'fineweb10B'), 'train', 'uint16')) == 3000
    # a failed download (here: a shard the server lacks) leaves a dataset train.py refuses, saying why
    proc = run('prepare.py', 'fineweb10B', '--shards=4', cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 1 and 'HTTP 404' in proc.stderr
    proc = run('train.py', '--dataset=fineweb10B', cwd=tmp_path, check=False)
    assert 'is incomplete: downloading fineweb_train_000004.bin failed (could not download' in proc.stderr
    assert 'HTTP 404' in proc.stderr and 'interrupted' not in proc.stderr and 'Traceback' not in proc.stderr
    run('prepare.py', 'fineweb10B', '--shards=2', cwd=tmp_path, env=env)
    proc = run('train.py', '--dataset=fineweb10B', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=64',
               '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=4', '--eval_interval=4',
               '--eval_iters=2', '--log_interval=2', '--device=cpu', '--compile=False', '--out_dir=out-fw', cwd=tmp_path)
    assert 'step 4: train loss' in proc.stdout and (tmp_path / 'out-fw' / 'ckpt.pt').exists()



@needs_bpe
def test_streaming_holds_memory_flat_as_the_input_grows(tmp_path, small_text, monkeypatch):
    """prepare.py's own peak memory (tracemalloc: Python objects and numpy arrays) on a single text file of 4 and
    of 16 pieces: the same within a margin, and below the file's size."""
    import tracemalloc
    piece = 250_000
    monkeypatch.setattr(documents, 'PIECE_CHARS', piece)
    monkeypatch.setattr(documents, 'LARGE_FILE', piece)  # bytes: files above it are read in chunks
    peaks = {}
    for n_pieces in (4, 16):
        text = (small_text * (n_pieces * piece // len(small_text) + 1))[:n_pieces * piece]
        (tmp_path / f'{n_pieces}.txt').write_text(text, encoding='utf-8')
        tracemalloc.start()
        prepare(f'p{n_pieces}', str(tmp_path / f'{n_pieces}.txt'), 'gpt2', data_root=str(tmp_path / 'data'),
                workers=1)
        peaks[n_pieces] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"peak traced memory: {peaks[4] / 1e6:.2f} MB for 4 pieces, {peaks[16] / 1e6:.2f} MB for 16")
    assert peaks[16] < 1.25 * peaks[4]  # flat: not 4x
    assert peaks[16] < 0.8 * 16 * piece  # and below the 4 MB text
