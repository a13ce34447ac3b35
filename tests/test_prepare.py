import json
import os

import numpy as np
import pytest

from conftest import gpt2_bpe_available, run
from prepare import get_tokenizer, load_meta, prepare, token_dtype


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
    _, decode = get_tokenizer(meta)
    assert decode(train.tolist()) + decode(val.tolist()) == small_text


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_gpt2_dataset_round_trips(tmp_path, small_text):
    (tmp_path / 'in.txt').write_text(small_text, encoding='utf-8')
    prepare('tiny', str(tmp_path / 'in.txt'), data_root=str(tmp_path / 'data'))
    train, meta = read_split(tmp_path / 'data' / 'tiny', 'train')
    val, _ = read_split(tmp_path / 'data' / 'tiny', 'val')
    assert meta == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}
    encode, decode = get_tokenizer(meta)
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
    _, decode = get_tokenizer(meta)
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
        (['unknown_dataset'], 'pass --input=PATH_OR_URL'),
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
