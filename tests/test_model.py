import math

import pytest
import torch

from checkpoint import load_checkpoint
from decode import KVCache
from model import GPT, GPTConfig, sample_next


def tiny_config(**overrides):
    args = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(overrides)
    return GPTConfig(**args)


def reference_logits(sd, cfg, idx, gelu='exact'):
    """GPT-2 written out from the state dict with plain tensor ops: no nn.Module, no SDPA, no model.py.
    gelu: 'exact' (ours, nanoGPT's) or 'tanh' (GPT-2's own gelu_new). The speedrun options of cfg (rope, rmsnorm,
    qk_norm, relu2, logit_softcap) are written out from their definitions too."""
    def norm(x, prefix=None):  # LayerNorm, or RMSNorm; without a prefix, unweighted (qk_norm)
        if cfg.norm == 'rmsnorm':
            y = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
        else:
            mean = x.mean(-1, keepdim=True)
            y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
        if prefix is None:
            return y
        y = y * sd[prefix + '.weight']
        return y + sd[prefix + '.bias'] if prefix + '.bias' in sd else y

    def linear(x, prefix):
        y = x @ sd[prefix + '.weight'].T
        return y + sd[prefix + '.bias'] if prefix + '.bias' in sd else y

    def rotate(t):  # RoPE: each head's pairs (t[j], t[j + hs/2]) as complex numbers, turned by pos * base^(-2j/hs)
        hs = t.size(-1)
        z = torch.complex(t[..., :hs // 2].double(), t[..., hs // 2:].double())
        angles = torch.outer(torch.arange(T).double(), cfg.rope_base ** (-2 * torch.arange(hs // 2).double() / hs))
        z = z * torch.polar(torch.ones_like(angles), angles)
        return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)

    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    x = sd['transformer.wte.weight'][idx] + (0 if cfg.rope else sd['transformer.wpe.weight'][:T])
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg.n_layer):
        p = f'transformer.h.{i}'
        q, k, v = linear(norm(x, p + '.ln_1'), p + '.attn.c_attn').split(C, dim=2)
        q, k, v = (t.reshape(B, T, nh, C // nh).permute(0, 2, 1, 3) for t in (q, k, v))
        if cfg.qk_norm:
            q, k = norm(q), norm(k)
        if cfg.rope:
            q, k = rotate(q), rotate(k)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // nh)
        att = torch.softmax(att.masked_fill(~causal, float('-inf')), dim=-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = x + linear(y, p + '.attn.c_proj')
        h = linear(norm(x, p + '.ln_2'), p + '.mlp.c_fc')
        if cfg.activation == 'relu2':
            h = torch.clamp(h, min=0) ** 2
        elif gelu == 'tanh':  # the approximation GPT-2 was trained with (Hendrycks & Gimpel, 2016)
            h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
        else:
            h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        x = x + linear(h, p + '.mlp.c_proj')
    logits = norm(x, 'transformer.ln_f') @ sd['lm_head.weight'].T
    cap = cfg.logit_softcap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


@pytest.mark.parametrize('bias', [True, False])
def test_logits_match_independent_reference(bias):
    torch.manual_seed(0)
    cfg = tiny_config(bias=bias)
    model = GPT(cfg).eval()
    idx = torch.randint(cfg.vocab_size, (3, cfg.block_size))
    logits, loss = model(idx, idx)
    expected = reference_logits(model.state_dict(), cfg, idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    manual_loss = torch.nn.functional.cross_entropy(expected.reshape(-1, cfg.vocab_size), idx.reshape(-1))
    torch.testing.assert_close(loss, manual_loss, atol=1e-5, rtol=1e-5)


def test_parameter_names_and_init_are_gpt2s():
    cfg = tiny_config(n_layer=4, n_embd=64, n_head=4)
    model = GPT(cfg)
    names = set(model.state_dict())
    for name in ['transformer.wte.weight', 'transformer.wpe.weight', 'transformer.h.0.ln_1.weight',
                 'transformer.h.0.attn.c_attn.weight', 'transformer.h.0.attn.c_proj.bias', 'transformer.h.3.ln_2.bias',
                 'transformer.h.0.mlp.c_fc.weight', 'transformer.h.0.mlp.c_proj.weight', 'transformer.ln_f.weight',
                 'lm_head.weight']:
        assert name in names
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.001


def test_nanogpt_checkpoint_loads_and_gives_the_same_logits(tmp_path):
    """A checkpoint laid out as nanoGPT's train.py writes it: compiled-model prefix, mask buffers,
    a tensor best_val_loss, model_args with dropout."""
    torch.manual_seed(1)
    cfg = tiny_config()
    source = GPT(cfg).eval()
    state = {'_orig_mod.' + k: v for k, v in source.state_dict().items()}
    for i in range(cfg.n_layer):
        state[f'_orig_mod.transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-3)
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, bias=True, vocab_size=37, dropout=0.0)
    torch.save({'model': state, 'optimizer': optimizer.state_dict(), 'model_args': model_args, 'iter_num': 250,
                'best_val_loss': torch.tensor(1.5), 'config': {'dataset': 'shakespeare_char', 'batch_size': 64}},
               tmp_path / 'ckpt.pt')
    model, checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint['iter_num'] == 250
    idx = torch.randint(cfg.vocab_size, (2, 10))
    expected = reference_logits(source.state_dict(), cfg, idx)
    logits, _ = model.eval()(idx, idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_checkpoint_files_give_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match='no checkpoint'):
        load_checkpoint(str(tmp_path))
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint at all')
    with pytest.raises(SystemExit, match='not a readable checkpoint'):
        load_checkpoint(str(tmp_path))
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match="no 'model'"):
        load_checkpoint(str(tmp_path / 'other.pt'))


def test_kv_cache_forward_equals_full_forward():
    torch.manual_seed(2)
    cfg = tiny_config()
    model = GPT(cfg).eval()
    idx = torch.randint(cfg.vocab_size, (2, 12))
    with torch.no_grad():
        cache = KVCache(cfg.n_layer, cfg.block_size)
        steps = [model(idx[:, :5], cache=cache)[0]]  # a 5-token prompt in one pass
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 9)]  # one token at a time
        steps += [model(idx[:, 9:12], cache=cache)[0]]  # then 3 at once, after cached positions
        for n, logits in zip([5, 6, 7, 8, 9, 12], steps):
            expected, _ = model(idx[:, :n])
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12


@pytest.mark.parametrize('temperature,top_k,top_p', [(0.0, None, None), (1.0, None, None), (0.8, 5, None),
                                                     (1.2, None, 0.9)])
def test_cached_generation_equals_full_recompute(temperature, top_k, top_p):
    """Batch of 3, prompt of 4, and 30 new tokens: well past block_size (16)."""
    torch.manual_seed(3)
    cfg = tiny_config()
    model = GPT(cfg).eval()
    prompt = torch.randint(cfg.vocab_size, (3, 4))
    torch.manual_seed(42)
    cached = model.generate(prompt, 30, temperature, top_k, top_p, use_cache=True)
    torch.manual_seed(42)
    recomputed = model.generate(prompt, 30, temperature, top_k, top_p, use_cache=False)
    assert cached.shape == (3, 34)
    assert torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, recomputed)


def test_generation_samples_only_the_tokenizers_ids():
    """A vocabulary padded for speed (GPT-2's 50257 to 50304) has ids no tokenizer decodes: vocab_size keeps
    sampling off them, whatever the sampling settings."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=70, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.zeros(4, 1, dtype=torch.long)
    assert model.generate(idx, 100)[:, 1:].max() >= 65  # an untrained model: the padding ids do come up
    for settings in ({}, {'top_k': 68}, {'top_p': 0.99}, {'temperature': 0.0}, {'use_cache': False}):
        assert model.generate(idx, 100, vocab_size=65, **settings)[:, 1:].max() < 65, settings


def test_generation_past_block_size_sees_the_last_block_size_tokens():
    """nanoGPT's policy: past block_size, the next token depends on the last block_size tokens only."""
    torch.manual_seed(4)
    cfg = tiny_config(block_size=8)
    model = GPT(cfg).eval()
    prompt = torch.randint(cfg.vocab_size, (1, 20))
    out = model.generate(prompt, 1, temperature=0)
    logits, _ = model(prompt[:, -8:])
    assert out[0, -1].item() == logits[0, -1].argmax().item()


def test_sample_next():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0]])
    assert sample_next(logits, temperature=0).item() in (1, 2, 3)  # greedy: a maximum
    torch.manual_seed(0)
    # top_k=2 keeps exactly two tokens even though three share the top value
    picked = {sample_next(logits, 1.0, top_k=2).item() for _ in range(300)}
    assert len(picked) == 2 and picked <= {1, 2, 3}
    # top_k larger than the vocabulary keeps everything
    picked = {sample_next(logits, 1.0, top_k=100).item() for _ in range(2000)}
    assert picked == {0, 1, 2, 3, 4, 5}
    # top_p: the likeliest tokens making up p of the mass; token 0 (p=0.5) alone for top_p=0.5
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert {sample_next(logits, 1.0, top_p=0.5).item() for _ in range(200)} == {0}
    assert {sample_next(logits, 1.0, top_p=0.7).item() for _ in range(500)} == {0, 1}
    assert sample_next(torch.randn(5, 10), temperature=0.5).shape == (5, 1)
    # sampled frequencies follow the probabilities (20,000 draws: standard error < 0.004)
    draws = torch.cat([sample_next(logits.expand(1000, 4), 1.0) for _ in range(20)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    # a token of probability zero is never drawn, even for u == 0
    assert set(sample_next(torch.tensor([[-float('inf'), 0.0, 0.0]]).expand(500, 3), 1.0).flatten().tolist()) == {1, 2}


def test_configure_optimizers_decays_only_matrices():
    model = GPT(tiny_config())
    [optimizer] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = optimizer.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    decayed = {id(p) for p in decay['params']}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay['params'])
    assert id(model.transformer.wte.weight) not in decayed and id(model.transformer.wpe.weight) not in decayed
    assert all('.c_' in names[i] for i in decayed)
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_crop_block_size_and_mfu():
    model = GPT(tiny_config())
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 16)
    model(torch.zeros(1, 8, dtype=torch.long))
    # MFU against the PaLM count by hand: 6N + 12 L H Q T FLOPs per token, N without the position embeddings
    V, C, L, H, T = 37, 16, 2, 2, 8
    n_params = V * C + L * (2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C + 4 * C * C + 4 * C + 4 * C * C + C) + 2 * C
    flops = (6 * n_params + 12 * L * H * (C // H) * T) * T * 3  # 3 sequences of T tokens, forward and backward
    assert model.estimate_mfu(3, 0.5, 1e9, seq_len=T) == pytest.approx(flops / 0.5 / 1e9, rel=1e-12)
