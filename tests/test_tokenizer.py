"""tokenizer.py and prepare.py's tokenizers: a BPE trained on the text, reused tokenizers, special tokens, checkpoints
that carry their tokenizer, and Hub models with a vocabulary of their own (checked against Hugging Face's tokenizers)."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import documents
from conftest import gpt2_bpe_available, run
from dataset import load_meta
from checkpoint import load_model
from model import GPT, GPTConfig
from prepare import prepare
from test_model import reference_logits
from test_pretrained import hub, publish  # noqa: F401 (fixture)
from test_train import TINY
from tokenizer import (CHAT_TOKENS, EOT, GPT2_PATTERN, MIN_BPE_VOCAB, SPLIT_PATTERN, Tokenizer, compatible,
                       with_chat_tokens)

needs_gpt2 = pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")

UNICODE_DOCS = [
    "Café déjà vu, naïve façade: résumé of the ÉLÈVE.\n",
    "東京は日本の首都です。中文也可以。한국어도.\n",
    "Emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷 between words 🙂.\n",
    "lines that are only whitespace:\n   \n\t\n \t \n\nand after them, text.\n",
    "Numbers 1234567 and 3.14159, dates 2026-11-30, x**2 + y_1 = z;\n",
]


def read(data_dir, split):
    meta = load_meta(str(data_dir))
    return np.fromfile(data_dir / f'{split}.bin', dtype=meta['dtype']), meta


def write_docs(directory, docs):
    directory.mkdir()
    for i, doc in enumerate(docs):
        (directory / f'{i:03d}.txt').write_text(doc, encoding='utf-8')


def test_a_trained_bpe_round_trips_documents_with_unicode(tmp_path, small_text):
    docs = [small_text[i:i + 3000] for i in range(0, 30000, 3000)] + UNICODE_DOCS * 2
    docs = [doc + f" {i}" for i, doc in enumerate(docs)]  # no duplicates
    write_docs(tmp_path / 'in', docs)
    data_dir = prepare('b', str(tmp_path / 'in'), tokenizer='bpe', vocab_size=600, data_root=str(tmp_path / 'data'))
    train, meta = read(tmp_path / 'data' / 'b', 'train')
    val, _ = read(tmp_path / 'data' / 'b', 'val')
    tok = Tokenizer(meta)
    assert meta['tokenizer'] == 'bpe' and meta['vocab_size'] == 600 and meta['dtype'] == 'uint16'
    assert meta['special'] == {name: 600 - 7 + i for i, name in enumerate((EOT, *CHAT_TOKENS))}
    assert meta['pattern'] == SPLIT_PATTERN and len(meta['ranks']) == 600 - 7
    # every document starts with <|endoftext|>; val has the 1st, 11th, 21st... (sorted by file name)
    for ids, expected in ((val, docs[::10]), (train, [d for i, d in enumerate(docs) if i % 10])):
        assert ids[0] == tok.eot and (ids == tok.eot).sum() == len(expected)
        assert tok.decode(ids.tolist()) == ''.join(EOT + doc for doc in expected)
    assert os.path.exists(os.path.join(data_dir, 'meta.json'))


def test_bpe_training_sees_the_train_split_only(tmp_path, small_text):
    """A word that only the val text has never becomes one token: the tokenizer never saw it."""
    secret = 'Zyxwvutsrq'
    text = small_text[:40_000] + (' ' + secret) * 2000
    (tmp_path / 'in.txt').write_text(text, encoding='utf-8')
    prepare('s', str(tmp_path / 'in.txt'), tokenizer='bpe', vocab_size=400, val_fraction=0.4,
            data_root=str(tmp_path / 'data'))
    val, meta = read(tmp_path / 'data' / 's', 'val')
    tok = Tokenizer(meta)
    assert len(tok.encode(' ' + secret)) > 3  # a frequent word in val, yet pieces of bytes here
    assert tok.decode(val.tolist()).endswith(secret)
    # a control: trained on the same text as train, it becomes a single token
    (tmp_path / 'in2.txt').write_text((' ' + secret) * 2000 + small_text[:40_000], encoding='utf-8')
    prepare('s2', str(tmp_path / 'in2.txt'), tokenizer='bpe', vocab_size=400, val_fraction=0.4,
            data_root=str(tmp_path / 'data'))
    assert len(Tokenizer(read(tmp_path / 'data' / 's2', 'val')[1]).encode(' ' + secret)) == 1


@pytest.mark.parametrize('kind', ['bpe', pytest.param('gpt2', marks=needs_gpt2)])
def test_literal_special_token_strings_are_ordinary_text(tmp_path, kind):
    literal = 'a page that says <|endoftext|> and <|user_start|>hi<|assistant_end|> literally'
    lines = [json.dumps({'text': f"{literal} {i}"}) for i in range(20)]
    (tmp_path / 'in.jsonl').write_text('\n'.join(lines) + '\n')
    prepare('lit', str(tmp_path / 'in.jsonl'), tokenizer=kind, vocab_size=300 if kind == 'bpe' else None,
            data_root=str(tmp_path / 'data'))
    train, meta = read(tmp_path / 'data' / 'lit', 'train')
    tok = Tokenizer(with_chat_tokens(meta))  # the chat tokens too, as a chat dataset would have them
    assert (train == tok.eot).sum() == 18  # the separators only: the text's "<|endoftext|>" is not one
    assert not set(tok.special.values()) - {tok.eot} & set(train.tolist())
    assert tok.decode(train.tolist()) == ''.join(f"{EOT}{literal} {i}" for i in range(20) if i % 10)
    ids = tok.encode(literal)
    assert not set(ids) & set(tok.special.values()) and tok.decode(ids) == literal


def test_training_and_encoding_are_deterministic_for_any_number_of_workers(tmp_path, small_text):
    (tmp_path / 'in.txt').write_text(small_text + ''.join(UNICODE_DOCS), encoding='utf-8')
    outputs = []
    for name, workers in (('a', 1), ('b', 2), ('c', 2)):
        data_dir = prepare(name, str(tmp_path / 'in.txt'), tokenizer='bpe', vocab_size=1000, workers=workers,
                           data_root=str(tmp_path / 'data'))
        outputs.append([open(os.path.join(data_dir, f), 'rb').read() for f in ('meta.json', 'train.bin', 'val.bin')])
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize('pattern', [SPLIT_PATTERN, GPT2_PATTERN])
def test_pieces_give_the_tokens_of_the_whole_text(monkeypatch, pattern):
    """prepare.py cuts documents into pieces that workers tokenize apart: for both split patterns the tokens
    must be those of the whole text. Fuzzed with tiny pieces over an alphabet of every kind of boundary."""
    import tiktoken
    ranks = {bytes([b]): b for b in range(256)}
    for pair in ('th', 'he', ' t', 'in', '12', '..', '\n\n', ' \n'):  # a few merges, so that tokens span characters
        ranks[pair.encode()] = len(ranks)
    enc = tiktoken.Encoding('fuzz', pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    monkeypatch.setattr(documents, 'PIECE_CHARS', 5)
    alphabet = ['a', 'b', 'Z', 'é', '東', '😀', '1', '2', '.', ',', "'", "'s", '_', ' ', '  ', '\n', '\n\n', '\t', ' \n',
                '\u00a0', '\u3000', '\u2028', '\x0b', '\x1c', '-', '"']
    rng = random.Random(0)
    for _ in range(3000):
        text = ''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        pieces = list(documents.pieces([text]))
        assert ''.join(pieces) == text
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text), (text, pieces)


def test_reusing_a_prepared_tokenizer(tmp_path, small_text):
    (tmp_path / 'base.txt').write_text(small_text, encoding='utf-8')
    prepare('base_bpe', str(tmp_path / 'base.txt'), tokenizer='bpe', vocab_size=500, data_root=str(tmp_path / 'data'))
    prepare('base_char', str(tmp_path / 'base.txt'), data_root=str(tmp_path / 'data'))
    new = small_text[-5000:].upper() + ' Ünïcode 😀'
    (tmp_path / 'new.txt').write_text(new, encoding='utf-8')
    prepare('new', str(tmp_path / 'new.txt'), tokenizer=str(tmp_path / 'data' / 'base_bpe'),
            data_root=str(tmp_path / 'data'))
    base_meta, new_meta = load_meta(str(tmp_path / 'data' / 'base_bpe')), load_meta(str(tmp_path / 'data' / 'new'))
    assert new_meta == base_meta and compatible(base_meta, new_meta)
    train, _ = read(tmp_path / 'data' / 'new', 'train')
    val, _ = read(tmp_path / 'data' / 'new', 'val')
    assert Tokenizer(new_meta).decode(train.tolist() + val.tolist()) == new
    # a char vocabulary is reused when it has every character, and names the ones it lacks otherwise
    (tmp_path / 'lower.txt').write_text(small_text[:3000].lower(), encoding='utf-8')
    prepare('lower_char', str(tmp_path / 'lower.txt'), tokenizer=str(tmp_path / 'data' / 'base_char'),
            data_root=str(tmp_path / 'data'))
    assert load_meta(str(tmp_path / 'data' / 'lower_char'))['chars'] == load_meta(str(tmp_path / 'data' / 'base_char'))['chars']
    missing = ''.join(sorted(set(new) - set(small_text)))
    assert 'Ü' in missing and '😀' in missing
    with pytest.raises(SystemExit, match=f"vocabulary lacks: {missing!r}"):
        prepare('bad_char', str(tmp_path / 'new.txt'), tokenizer=str(tmp_path / 'data' / 'base_char'),
                data_root=str(tmp_path / 'data'))


def test_bad_tokenizer_input_is_a_one_line_error(tmp_path, small_text):
    (tmp_path / 'in.txt').write_text(small_text[:20000], encoding='utf-8')
    run('prepare.py', 'ok_bpe', '--input=in.txt', '--tokenizer=bpe', '--vocab_size=300', cwd=tmp_path)
    damaged = tmp_path / 'data' / 'damaged'
    shutil.copytree(tmp_path / 'data' / 'ok_bpe', damaged)
    meta = json.loads((damaged / 'meta.json').read_text())
    meta['ranks'][5] = '%%% not base64'
    (damaged / 'meta.json').write_text(json.dumps(meta))
    truncated = tmp_path / 'data' / 'truncated'
    shutil.copytree(tmp_path / 'data' / 'ok_bpe', truncated)
    (truncated / 'meta.json').write_text((damaged / 'meta.json').read_text()[:500])
    cases = [
        (['--tokenizer=bpe', f'--vocab_size={MIN_BPE_VOCAB - 1}'], f'vocab_size must be at least {MIN_BPE_VOCAB}'),
        (['--tokenizer=bpe', f'--vocab_size={2 ** 32 + 1}'], 'at most 4,294,967,296 (uint32 ids)'),
        (['--vocab_size=1000'], '--vocab_size is for a BPE trained here'),
        (['--tokenizer=data/nothing'], 'data/nothing is not a prepared dataset'),
        (['--tokenizer=data/damaged'], 'data/damaged/meta.json is damaged'),
        (['--tokenizer=data/truncated'], 'data/truncated/meta.json is damaged'),
        (['--tokenizer=sentencepiece'], "unknown tokenizer 'sentencepiece'"),
    ]
    for args, message in cases:
        proc = run('prepare.py', 'x', '--input=in.txt', *args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr and 'Traceback' not in proc.stderr, (args, proc.stderr)
    proc = run('train.py', '--dataset=truncated', *TINY, cwd=tmp_path, check=False)
    assert 'data/truncated/meta.json is damaged' in proc.stderr and 'Traceback' not in proc.stderr


def test_compatible_tokenizers():
    bpe = {'tokenizer': 'bpe', 'vocab_size': 263, 'pattern': SPLIT_PATTERN, 'ranks': [None] * 256,
           'special': {name: 256 + i for i, name in enumerate((EOT, *CHAT_TOKENS))}}
    char = {'tokenizer': 'char', 'vocab_size': 3, 'chars': ['a', 'b', 'c']}
    assert compatible(char, with_chat_tokens(char)) and compatible(with_chat_tokens(char), char)
    assert with_chat_tokens(char)['special'] == {name: 3 + i for i, name in enumerate(CHAT_TOKENS)}
    assert with_chat_tokens(bpe)['special'] == bpe['special']  # a trained BPE has them already
    assert not compatible(char, {**char, 'chars': ['a', 'b', 'd']})
    assert not compatible(with_chat_tokens(char), {**char, 'special': {'<|user_start|>': 9}})  # another id
    assert not compatible({**char, 'special': {'<|x|>': 3}}, {**char, 'special': {'<|y|>': 3}})  # id 3 means two things
    assert not compatible(bpe, char)


# -----------------------------------------------------------------------------
# models: checkpoints carry their tokenizer; Hub models bring theirs

def test_a_bpe_model_samples_and_evaluates_without_its_data(tmp_path, small_text):
    (tmp_path / 'input.txt').write_text(small_text, encoding='utf-8')
    run('prepare.py', 'sh_bpe', '--input=input.txt', '--tokenizer=bpe', '--vocab_size=512', cwd=tmp_path)
    out = run('train.py', '--dataset=sh_bpe', '--out_dir=out', '--max_iters=30', '--eval_interval=30', *TINY,
              cwd=tmp_path).stdout
    assert 'step 30: train loss' in out
    before = run('eval.py', '--out_dir=out', '--input=input.txt', '--max_tokens=2000', cwd=tmp_path).stdout
    shutil.rmtree(tmp_path / 'data')
    sample = run('sample.py', '--out_dir=out', '--num_samples=1', '--max_new_tokens=30', '--start=ROMEO:',
                 '--temperature=0', cwd=tmp_path).stdout
    assert sample.startswith('ROMEO:') and len(sample) > len('ROMEO:') + 10
    after = run('eval.py', '--out_dir=out', '--input=input.txt', '--max_tokens=2000', cwd=tmp_path).stdout
    assert after == before and 'bits per byte' in after
    from test_serve import start_server
    proc, url = start_server(str(tmp_path / 'out'), str(tmp_path / 'serve.log'))
    try:
        import requests
        answer = requests.post(url + '/v1/completions', json={'prompt': 'ROMEO:', 'max_tokens': 5, 'temperature': 0},
                               timeout=60).json()
        assert answer['usage']['completion_tokens'] <= 5 and isinstance(answer['choices'][0]['text'], str)
    finally:
        proc.kill()
        proc.wait()


def hf_tokenizer_json(path, texts, vocab_size, split_pattern=None):
    """A byte-level BPE trained by Hugging Face's tokenizers (the library the Hub's files come from), saved as
    tokenizer.json: GPT-2's byte-level split, or a regex split then byte-level. -> the HF tokenizer."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    if split_pattern:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior='isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    hf.save(str(path))
    return hf


@pytest.mark.parametrize('split_pattern', [None, SPLIT_PATTERN])
def test_a_hub_model_with_its_own_vocabulary(hub, tmp_path, small_text, split_pattern):
    pytest.importorskip('tokenizers')
    root, state = hub
    torch.manual_seed(0)
    source = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=16, bias=True)).eval()
    publish(root, 'someone/tiny-1000', source)
    repo_dir = root / 'someone' / 'tiny-1000' / 'resolve' / 'main'
    texts = [small_text[i:i + 2000] for i in range(0, len(small_text), 2000)]
    hf = hf_tokenizer_json(repo_dir / 'tokenizer.json', texts, 1000, split_pattern)
    assert hf.get_vocab_size() == 1000 and hf.token_to_id(EOT) == 0
    model, checkpoint = load_model('someone/tiny-1000')
    idx = torch.randint(1000, (2, 32))
    torch.testing.assert_close(model.eval()(idx, idx)[0], reference_logits(source.state_dict(), source.config, idx),
                               atol=1e-5, rtol=1e-5)
    tok = Tokenizer(checkpoint['meta'])
    assert tok.vocab_size == 1000 and tok.eot == 0 and checkpoint['meta']['source'] == 'hub:someone/tiny-1000'
    for text in texts[:5] + UNICODE_DOCS + ['<|endoftext|> is text here']:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids or EOT in text, text  # HF splits the special
        assert tok.decode(ids) == text
    assert 'tokenizer.json' in os.listdir(tmp_path / 'hf_home' / 'gptforge' / 'someone' / 'tiny-1000')
    # sample.py decodes with it; prepare.py encodes fine-tuning data with it
    out = run('sample.py', '--init_from=someone/tiny-1000', '--num_samples=1', '--max_new_tokens=12', '--start=ROMEO:',
              '--temperature=0', '--device=cpu', '--dtype=float32', cwd=tmp_path).stdout
    with torch.no_grad():
        expected = model.generate(torch.tensor([tok.encode('ROMEO:')]), 12, temperature=0)[0].tolist()
    assert out == tok.decode(expected) + '\n'
    (tmp_path / 'ft.txt').write_text(small_text[:20000], encoding='utf-8')
    run('prepare.py', 'ft', '--input=ft.txt', '--tokenizer=hub:someone/tiny-1000', cwd=tmp_path)
    ft_meta = load_meta(str(tmp_path / 'data' / 'ft'))
    assert compatible(checkpoint['meta'], ft_meta)
    train, _ = read(tmp_path / 'data' / 'ft', 'train')
    assert train.tolist() == tok.encode(small_text[:18000])  # the first 90% of the text
    run('train.py', '--init_from=someone/tiny-1000', '--dataset=ft', '--out_dir=ft-out', '--max_iters=2',
        '--eval_interval=2', *TINY, cwd=tmp_path)


def test_a_hub_repository_without_a_usable_tokenizer_is_a_one_line_error(hub, tmp_path):
    root, _ = hub
    torch.manual_seed(0)
    source = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=1, n_head=2, n_embd=16, bias=True)).eval()
    publish(root, 'test/no-tokenizer', source)
    with pytest.raises(SystemExit, match='fewer than GPT-2.s 50257, and no tokenizer.json'):
        load_model('test/no-tokenizer')
    publish(root, 'test/wordpiece', source)
    (root / 'test' / 'wordpiece' / 'resolve' / 'main' / 'tokenizer.json').write_text(json.dumps(
        {'model': {'type': 'WordPiece', 'vocab': {'a': 0}}, 'pre_tokenizer': None}))
    with pytest.raises(SystemExit, match='is not a tokenizer.json gptforge can use .*not a plain byte-level BPE'):
        load_model('test/wordpiece')
    (tmp_path / 'in.txt').write_text('some text to prepare\n' * 50)
    proc = run('prepare.py', 'x', '--input=in.txt', '--tokenizer=hub:test/no-tokenizer', cwd=tmp_path, check=False)
    assert 'test/no-tokenizer has no tokenizer.json' in proc.stderr and 'Traceback' not in proc.stderr
