"""decode.py: every Linear kernel computes nn.Linear, the kernel is the one measured fastest, every decode path
gives full recomputation's tokens, and int8 weights stay close to the model they came from."""

import re

import pytest
import torch

import decode
from checkpoint import load_checkpoint
from conftest import run
from model import GPT, Linear
from test_model import reference_logits, tiny_config
from test_serve import CHARS, ckpt, start_server  # noqa: F401 (ckpt: a fixture, a tiny model trained on words)


def kernels_here(dtype):
    """The kernels that run on this machine for dtype (oneDNN may refuse one)."""
    refused = decode.pack([Linear(8, 8).to(dtype)])
    return [name for name in decode.KERNELS if name != 'onednn' or refused is None]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('bias', [True, False])
def test_every_kernel_matches_nn_linear(dtype, bias):
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias).to(dtype)
    reference = torch.nn.Linear(48, 80, bias=bias)  # PyTorch's own, in float32, with the same weights
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    tolerance = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name in kernels_here(dtype):
        decode.use_kernel([layer], name)
        for shape in [(1, 1, 48), (1, 48), (48,), (3, 48), (3, 2, 48), (3, 1, 48)]:  # one row (decoding), several,
            # and (3, 1, 48) as GPT.forward gives the head the last of 5 positions: a view, not contiguous
            x = torch.randn(shape, dtype=dtype) if shape != (3, 1, 48) else torch.randn(3, 5, 48, dtype=dtype)[:, -1:]
            with torch.no_grad():
                y = layer(x)
            assert y.shape == shape[:-1] + (80,) and y.dtype == dtype, (name, shape)
            torch.testing.assert_close(y.float(), reference(x.float()), **tolerance, msg=f"{name} {shape}")
        y = layer(torch.randn(2, 48, dtype=dtype, requires_grad=True))  # training: F.linear, whatever the kernel
        assert y.grad_fn is not None


def test_kernel_choice_follows_the_measurement(monkeypatch):
    """Fake timings, each kernel the fastest in turn: prepare() takes that one, says so, and measures once."""
    names = kernels_here(torch.float32)
    for fastest in names:
        seconds = {name: (0.001 if name == fastest else 0.005) for name in names}
        calls, lines = [], []
        monkeypatch.setattr(decode, 'kernel_seconds', lambda kernel, layers: calls.append(kernel) or
                            seconds[next(n for n, k in decode.KERNELS.items() if k is kernel)])
        monkeypatch.setattr(decode, '_chosen', {})
        model = GPT(tiny_config()).eval()
        decode.prepare(model, log=lines.append)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert all(m.kernel is decode.KERNELS[fastest] for m in linears) and len(linears) == 9
        assert all(hasattr(m, 'packed') == (fastest == 'onednn') for m in linears)  # no copies left unused
        assert len(calls) == len(names) and len(lines) == 1 and lines[0].startswith(f"decode kernel: {fastest},")
        assert '1.00 ms' in lines[0] and '5.00 ms' in lines[0]
        decode.prepare(GPT(tiny_config()).eval(), log=lines.append)  # the same shapes: no second measurement
        assert len(calls) == len(names) and len(lines) == 1


def test_cache_dtype_follows_the_measurement(monkeypatch):
    """Attention over the KV cache in float32 when one query measured faster in it than in the model's bfloat16
    (fake timings on both sides), else in bfloat16; said in one line, measured once per shape."""
    for bf16, fp32, expected in ((125e-6, 19e-6, torch.float32), (10e-6, 19e-6, None)):
        timings, lines = {torch.bfloat16: bf16, torch.float32: fp32}, []
        monkeypatch.setattr(decode, 'attention_seconds', lambda dtype, *args: timings[dtype])
        monkeypatch.setattr(decode, '_chosen', {})
        model = GPT(tiny_config()).eval().to(torch.bfloat16)
        decode.prepare(model, log=lines.append)
        assert all(block.attn.cache_dtype == expected for block in model.transformer.h)
        assert lines[0].startswith(f"KV cache and attention: {'float32' if expected else 'bfloat16'}, the faster")
        with torch.no_grad():  # and the cache is kept in that dtype
            cache = decode.KVCache(2, 16)
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        assert cache.k[0].dtype == (expected or torch.bfloat16)


def test_a_float32_cache_in_the_servers_rows():
    """A bfloat16 model whose attention runs in float32: a RowCache (the server's) holds float32 keys and values, and
    its rows decode as each prompt does alone in a KVCache."""
    torch.manual_seed(1)
    model = GPT(tiny_config()).eval().to(torch.bfloat16)
    for block in model.transformer.h:
        block.attn.cache_dtype = torch.float32
    prompts = [torch.randint(37, (n,)).tolist() for n in (3, 7)]
    rows, alone = decode.RowCache(2, rows=2, max_len=16), []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            own = decode.KVCache(2, 16)
            model(torch.tensor([prompt]), cache=own)
            rows.load(row, own, len(prompt))
            alone.append((own, model(torch.tensor([[prompt[-1]]]), cache=own)[0][0, -1]))
        rows.n = 2
        together = model(torch.tensor([[p[-1]] for p in prompts]), cache=rows)[0][:, -1]
    assert rows.k[0].dtype == torch.float32
    for (_, logits), row_logits in zip(alone, together):
        torch.testing.assert_close(row_logits.float(), logits.float(), atol=2e-2, rtol=2e-2)


def test_bfloat16_model_with_a_float32_cache_decodes_as_its_full_forward():
    torch.manual_seed(2)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(37, (2, 12))
    with torch.no_grad():
        expected = model(idx)[0][:, -1]  # float32, the whole context at once
        model.to(torch.bfloat16)
        for block in model.transformer.h:
            block.attn.cache_dtype = torch.float32
        cache = decode.KVCache(2, 16)
        model(idx[:, :5], cache=cache)
        for t in range(5, 12):
            logits = model(idx[:, t:t + 1], cache=cache)[0][:, -1]
    assert cache.k[0].dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize('quantize', ['', 'int8'])
def test_every_decode_path_gives_full_recomputations_tokens(quantize):
    """Greedy, float32: each kernel (and int8 weights), batch 1 and 3, 30 new tokens past block_size (16), cached,
    gives the tokens that the same model gives re-reading the whole context for every token."""
    torch.manual_seed(3)
    base = GPT(tiny_config()).eval()
    for name in kernels_here(torch.float32) if not quantize else ['int8']:
        model = GPT(tiny_config()).eval()
        model.load_state_dict(base.state_dict())
        if quantize:
            decode.prepare(model, quantize)
        else:
            decode.use_kernel([m for m in model.modules() if isinstance(m, Linear)], name)
        for batch in (1, 3):
            prompt = torch.randint(37, (batch, 4))
            cached = model.generate(prompt, 30, temperature=0)
            assert torch.equal(cached, model.generate(prompt, 30, temperature=0, use_cache=False)), (name, batch)
            if not quantize:  # and the same as the plain model's (F.linear)
                assert torch.equal(cached, base.generate(prompt, 30, temperature=0, use_cache=False)), (name, batch)


def test_a_changed_weight_is_packed_again():
    """oneDNN's copy of a weight follows the weight: changed in place (an optimizer step, load_state_dict) or
    replaced (another dtype), the next call reorders it again instead of using the old copy."""
    layer = Linear(32, 16)
    if decode.pack([layer]):
        pytest.skip("oneDNN takes no float32 weights here")
    decode.use_kernel([layer], 'onednn')
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)  # in place
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.to(torch.bfloat16)  # replaced
        y = layer(x.bfloat16())
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float()),
                               atol=2e-2, rtol=2e-2)


def test_int8_linear_against_its_dequantized_weights():
    """Int8Linear computes x W^T + b with W = scales * weight, each row's largest |w| at +-127."""
    torch.manual_seed(0)
    layer = Linear(64, 24)
    q = decode.Int8Linear(layer)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (24,)
    assert torch.equal(q.weight.abs().amax(dim=1), torch.full((24,), 127, dtype=torch.int8))
    dequantized = q.weight.double() * q.scales.double()[:, None]
    assert (dequantized - layer.weight.double()).abs().max() <= q.scales.double().max() / 2 * 1.01  # rounding
    for rows in (1, 5, 40):  # a few rows through the int8 kernel; more (a prompt) through the dequantized weight
        x = torch.randn(rows, 64)
        expected = x.bfloat16().double() @ dequantized.T + layer.bias.double()  # activations in bfloat16, as computed
        torch.testing.assert_close(q(x).double(), expected, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize('width', [40, 100])
def test_int8_on_widths_the_kernel_cannot_take(width):
    """torch._weight_int8pack_mm gives wrong numbers (or crashes) for several rows of a width that is not a multiple
    of 16: such Linears take the dequantized weight, and a model of that width stays close to its float32 self."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=width, n_head=2)).eval()
    idx = torch.randint(37, (2, 6))
    with torch.no_grad():
        expected = [model(idx)[0], model(idx[:1, :1])[0]]  # 12 rows at once, and 1
        decode.quantize_int8(model)
        got = [model(idx)[0], model(idx[:1, :1])[0]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=5e-2, rtol=0)


def test_int8_model_against_the_reference_and_bf16(ckpt):
    """A trained tiny model: int8 logits within 0.1 of its dequantized weights written out (test_model's reference,
    float64); against the bfloat16 model's, within 3% of the largest logit (bfloat16's own rounding is 0.4%), the
    next-token distributions within 0.03 in total variation (measured: 1.2%, 0.017), the same argmax at 90% of
    positions or more."""
    model, _ = load_checkpoint(ckpt)
    model.eval()
    idx = torch.tensor([[CHARS.index(c) for c in 'The quick brown fox jumps over']])
    bf16 = GPT(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    decode.quantize_int8(model)
    sd = {k: v.double() for k, v in model.state_dict().items() if k.endswith('bias') or 'ln' in k or 'wpe' in k
          or k == 'transformer.wte.weight'}
    for name, m in model.named_modules():
        if isinstance(m, decode.Int8Linear):
            sd[name + '.weight'] = m.weight.double() * m.scales.double()[:, None]
    with torch.no_grad():
        logits = torch.stack([model(idx[:, :t])[0][0, -1] for t in range(1, idx.size(1) + 1)]).double()
        reference = reference_logits(sd, model.config, idx)[0]
        torch.testing.assert_close(logits, reference, atol=0.1, rtol=0)
        bf16_logits = torch.stack([bf16(idx[:, :t])[0][0, -1] for t in range(1, idx.size(1) + 1)]).double()
    difference = (logits - bf16_logits).abs().max() / bf16_logits.abs().max()
    variation = (logits.softmax(-1) - bf16_logits.softmax(-1)).abs().sum(-1).max() / 2
    print(f"int8 against bfloat16: max logit difference {difference:.2%} of the largest, "
          f"total variation {variation:.4f}")
    assert difference < 0.03 and variation < 0.03
    assert (logits.argmax(-1) == bf16_logits.argmax(-1)).float().mean() >= 0.9


def test_int8_through_sample_py_and_the_server(ckpt, tmp_path):
    out = run('sample.py', f'--out_dir={ckpt}', '--quantize=int8', '--start=The', '--num_samples=1',
              '--max_new_tokens=30', '--temperature=0', '--device=cpu', '--dtype=float32', cwd=tmp_path)
    assert out.stdout.startswith('The') and len(out.stdout.strip()) > 20
    model, _ = load_checkpoint(ckpt)
    decode.quantize_int8(model.eval())
    x = torch.tensor([[CHARS.index(c) for c in 'The']])
    expected = ''.join(CHARS[i] for i in model.generate(x, 30, temperature=0)[0, 3:].tolist())
    assert out.stdout.rstrip('\n') == 'The' + expected
    bad = run('sample.py', f'--out_dir={ckpt}', '--quantize=int4', '--device=cpu', cwd=tmp_path, check=False)
    assert bad.returncode == 1 and "quantize must be '' or 'int8'" in bad.stderr and 'Traceback' not in bad.stderr

    import requests
    proc, url = start_server(ckpt, str(tmp_path / 'server.log'), '--quantize=int8')
    try:
        body = requests.post(url + '/v1/completions', json={'prompt': 'The', 'max_tokens': 30, 'temperature': 0},
                             timeout=30).json()
        assert body['choices'][0]['text'] == expected
    finally:
        proc.kill()
        proc.wait()


def test_int8_bits_per_char_within_1_percent_of_bf16(ckpt, tmp_path):
    """eval.py --quantize=int8 on the text the tiny model learned: within 1% of the bfloat16 figure."""
    from test_serve import TEXT
    (tmp_path / 'text.txt').write_text(TEXT * 4)
    figures = {}
    for quantize in ('', 'int8'):
        out = run('eval.py', f'--out_dir={ckpt}', '--input=text.txt', '--dtype=bfloat16', f'--quantize={quantize}',
                  '--device=cpu', cwd=tmp_path).stdout
        figures[quantize] = float(re.search(r'bits per char ([\d.]+)', out).group(1))
    assert abs(figures['int8'] / figures[''] - 1) < 0.01, figures
