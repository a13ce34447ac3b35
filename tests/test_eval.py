"""eval.py: loss, perplexity and bits per character or byte, against direct computations."""
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import gpt2_bpe_available, run
from eval import evaluate, main as eval_main
from model import GPT
from dataset import GPT2_META, load_meta
from tokenizer import Tokenizer
from test_model import tiny_config
from test_pretrained import hub, publish, tiny_gpt2  # noqa: F401 (fixture)
from test_train import prepared  # noqa: F401 (fixture)


@torch.no_grad()
def direct_nats(model, ids, block_size):
    """-log p(each token | the tokens before it in its window), summed over non-overlapping windows."""
    total = 0.0
    for start in range(0, len(ids) - 1, block_size):
        x = torch.tensor(ids[start:start + block_size + 1], dtype=torch.long)  # inputs and, shifted, targets
        logits, _ = model.eval()(x[None, :-1], x[None, 1:])
        total -= torch.log_softmax(logits[0].double(), dim=-1)[torch.arange(len(x) - 1), x[1:]].sum().item()
    return total


def test_eval_of_a_split_equals_a_direct_computation(prepared, monkeypatch):  # noqa: F811
    cwd = prepared
    meta = load_meta(str(cwd / 'data' / 'tiny_char'))
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=meta['vocab_size'], block_size=32)).eval()
    (cwd / 'out').mkdir()
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config), 'meta': meta, 'iter_num': 0,
                'best_val_loss': 0.0, 'config': {'dataset': 'tiny_char'}}, cwd / 'out' / 'ckpt.pt')
    monkeypatch.chdir(cwd)
    results = eval_main(['--out_dir=out', '--device=cpu', '--batch_size=3'])  # its own dataset's val split
    ids = np.fromfile(cwd / 'data' / 'tiny_char' / 'val.bin', dtype=meta['dtype']).tolist()
    nats = direct_nats(model, ids, 32)
    assert results['tokens'] == results['chars'] == len(ids) - 1
    assert results['loss'] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert results['perplexity'] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    assert results['bits_per_char'] == pytest.approx(nats / math.log(2) / (len(ids) - 1), rel=1e-5)
    # the documented command prints the same figures, and again the same: nothing is random
    for _ in range(2):
        out = run('eval.py', '--out_dir=out', '--device=cpu', cwd=cwd).stdout
        assert (f"tiny_char val: {len(ids) - 1:,} tokens ({len(ids) - 1:,} chars), block_size 32, stride 32 | "
                f"loss {results['loss']:.4f} | perplexity {results['perplexity']:.3f} | "
                f"bits per char {results['bits_per_char']:.4f}") in out


def test_strided_windows_give_every_token_the_longest_context():
    torch.manual_seed(1)
    model = GPT(tiny_config()).eval()  # block_size 16
    ids = np.random.default_rng(0).integers(0, 37, 50)
    with torch.no_grad():  # each token after up to 16 of its predecessors, one forward pass per token
        expected = -sum(torch.log_softmax(model(torch.tensor(ids[max(0, t - 16):t])[None])[0][0, -1].double(), -1)
                        [ids[t]].item() for t in range(1, 50))
    nats, count = evaluate(model, ids, block_size=16, stride=1, batch_size=4)
    assert count == 49 and nats == pytest.approx(expected, rel=1e-5)
    nats, count = evaluate(model, ids, block_size=16, stride=16, batch_size=2)
    assert count == 49 and nats == pytest.approx(direct_nats(model, ids.tolist(), 16), rel=1e-5)
    assert evaluate(model, ids, 16, 5)[1] == 49  # every token once, whatever the stride


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_bits_per_byte_of_a_text_file_with_a_hub_model(hub, tmp_path, monkeypatch):  # noqa: F811
    root, _ = hub
    source = tiny_gpt2()
    publish(root, 'test/tiny-gpt2', source)
    text = "Café, naïve façade: ROMEO, wilt thou leave me so unsatisfied? 你好, 世界.\n" * 4
    (tmp_path / 'text.txt').write_text(text, encoding='utf-8')
    monkeypatch.chdir(tmp_path)
    results = eval_main(['--init_from=test/tiny-gpt2', '--input=text.txt', '--device=cpu'])
    tok = Tokenizer(GPT2_META)
    encode, decode = tok.encode, tok.decode
    ids = encode(text)
    scored_bytes = len(text.encode('utf-8')) - len(decode(ids[:1]).encode('utf-8'))  # all but the first token's
    nats = direct_nats(source, ids, 32)
    assert results['tokens'] == len(ids) - 1 and results['bytes'] == scored_bytes
    assert results['loss'] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert results['bits_per_byte'] == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-5)

    (tmp_path / 'data' / 'chars').mkdir(parents=True)
    (tmp_path / 'data' / 'chars' / 'meta.json').write_text(json.dumps(
        {'tokenizer': 'char', 'vocab_size': 3, 'chars': ['a', 'b', 'c'], 'dtype': 'uint16'}))
    np.array([0, 1, 2] * 20, dtype=np.uint16).tofile(tmp_path / 'data' / 'chars' / 'val.bin')
    for args, message in [([], 'has no dataset of its own: pass --dataset=NAME'),
                          (['--dataset=chars'], "the vocabulary of test/tiny-gpt2 .50257 tokens. is not the one of dataset 'chars'"),
                          (['--dataset=chars', '--split=test'], "no split 'test' of dataset 'chars'"),
                          (['--input=text.txt', '--stride=64'], 'need 0 < stride <= block_size <= 32')]:
        with pytest.raises(SystemExit, match=message):
            eval_main(['--init_from=test/tiny-gpt2', '--device=cpu', *args])
