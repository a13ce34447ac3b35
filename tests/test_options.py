"""The NanoGPT-speedrun options of GPTConfig and the Muon optimizer (all off by default)."""
import pytest
import torch

import train
from conftest import run
from checkpoint import load_checkpoint
from model import GPT, GPTConfig
from test_model import reference_logits
from test_train import prepared  # noqa: F401 (fixture)

OPTIONS = {
    'rope': dict(rope=True, rope_base=500.0),
    'rmsnorm': dict(norm='rmsnorm'),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(activation='relu2'),
    'untied': dict(tie_embeddings=False),
    'softcap': dict(logit_softcap=5.0),
    'zero_init': dict(zero_init=True, tie_embeddings=False),
}
OPTIONS['all'] = {k: v for option in OPTIONS.values() for k, v in option.items()}


def tiny(**options):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **options))


@pytest.mark.parametrize('name', OPTIONS)
def test_option_trains_and_cached_generation_equals_uncached(name):
    model = tiny(**OPTIONS[name])
    x = torch.randint(0, 50, (3, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):  # forward, backward and a few steps: every parameter gets a gradient, the loss drops
        _, loss = model(x, x.roll(-1, dims=1))
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    prompt = x[:, :5]
    for temperature in (0.0, 1.0):  # 30 new tokens: past block_size 16 as well
        torch.manual_seed(1)
        cached = model.generate(prompt, 30, temperature=temperature, top_k=10)
        torch.manual_seed(1)
        full = model.generate(prompt, 30, temperature=temperature, top_k=10, use_cache=False)
        assert torch.equal(cached, full)


@pytest.mark.parametrize('name', [name for name in OPTIONS if name != 'zero_init'])
def test_option_matches_its_definition_written_out(name):
    """The logits against test_model's reference, which writes each option out from its definition: RoPE as
    complex rotations by pos * base^(-2j/hs), relu(x)^2, unweighted norms of q and k, cap * tanh(logits / cap)."""
    options = {**OPTIONS[name], **({'logit_softcap': 2.0} if 'logit_softcap' in OPTIONS[name] else {})}
    model = tiny(**options).eval()
    with torch.no_grad():  # weights large enough that each option moves the logits by far more than the tolerance
        for p in model.parameters():
            p.normal_(std=0.3)
    x = torch.randint(0, 50, (2, 16))
    logits, _ = model(x, x)
    expected = reference_logits(model.state_dict(), model.config, x)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=2e-5)


def test_options_change_the_model_as_documented():
    assert 'transformer.wpe.weight' not in tiny(rope=True).state_dict()  # rope replaces learned positions
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    zero = tiny(zero_init=True, tie_embeddings=False)
    assert all(p.abs().sum() == 0 for n, p in zero.named_parameters() if n.endswith('c_proj.weight') or n == 'lm_head.weight')
    assert zero.transformer.wte.weight.abs().sum() > 0
    logits, _ = zero(torch.zeros(1, 4, dtype=torch.long))
    assert torch.allclose(logits, torch.zeros_like(logits))  # a zero head predicts the uniform distribution
    capped, _ = tiny(logit_softcap=0.5)(torch.zeros(1, 4, dtype=torch.long))
    assert capped.abs().max() < 0.5
    # softcap is a smooth clamp: small logits pass nearly unchanged
    plain = tiny()
    assert torch.allclose(plain.softcap(torch.tensor([0.01])), torch.tensor([0.01]))


def test_checkpoint_records_the_options(tmp_path):
    options = OPTIONS['all']
    model = tiny(**options)
    model_args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **options)
    torch.save({'model': model.state_dict(), 'model_args': model_args}, tmp_path / 'ckpt.pt')
    loaded, _ = load_checkpoint(str(tmp_path))
    assert loaded.config == model.config
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_muon_takes_only_the_blocks_weight_matrices():
    model = tiny(tie_embeddings=False)
    adamw, muon = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', muon_lr=0.02)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group['params']}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group['params']}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith('transformer.h.')}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names.values())
    assert {'transformer.wte.weight', 'lm_head.weight', 'transformer.wpe.weight'} <= in_adamw
    assert muon.param_groups[0]['lr'] == 0.02
    assert len(model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')) == 1  # AdamW alone by default
    # the state train.py's log announces is what the optimizers hold after a step: Muon keeps one buffer, not two
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    loss.backward()
    adamw.step()
    muon.step()
    held = sum(t.numel() * t.element_size() for optimizer in (adamw, muon) for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)  # (not the scalar step counts)
    assert train.optimizer_state_bytes([adamw, muon]) == held


def test_muon_and_all_options_resume_exactly_and_sample(prepared):
    """Checkpoints carry the options and both optimizers' states: 6 steps = 3 + resume to 6, bitwise."""
    cwd = prepared
    common = ['--dataset=tiny_char', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
              '--eval_iters=2', '--eval_interval=3', '--log_interval=3', '--warmup_iters=2', '--lr_decay_iters=6',
              '--device=cpu', '--dtype=float32', '--optimizer=muon', '--lr_schedule=wsd', '--rope=True',
              '--norm=rmsnorm', '--qk_norm=True', '--activation=relu2', '--tie_embeddings=False',
              '--logit_softcap=15.0', '--zero_init=True']
    run('train.py', '--out_dir=straight', '--max_iters=6', *common, cwd=cwd)
    run('train.py', '--out_dir=halves', '--max_iters=3', *common, cwd=cwd)
    run('train.py', '--out_dir=halves', '--max_iters=6', '--init_from=resume', *common, cwd=cwd)
    straight = torch.load(cwd / 'straight' / 'ckpt.pt', weights_only=True)
    halves = torch.load(cwd / 'halves' / 'ckpt.pt', weights_only=True)
    assert straight['model_args']['rope'] is True and 'muon_optimizer' in straight
    for key, value in straight['model'].items():
        assert torch.equal(value, halves['model'][key]), key
    refused = run('train.py', '--out_dir=halves', '--max_iters=8', '--init_from=resume', *common, '--rope=False',
                  cwd=cwd, check=False)
    assert refused.returncode == 1 and 'rope=True' in refused.stderr
    out = run('sample.py', '--out_dir=halves', '--num_samples=2', '--max_new_tokens=40', cwd=cwd).stdout
    assert out.count('---------------') == 2


def test_bad_option_values_are_one_line_errors(prepared):
    for arg, message in [('--norm=batchnorm', 'norm must be one of layernorm, rmsnorm'),
                         ('--optimizer=sgd', 'optimizer must be one of adamw, muon'),
                         ('--n_embd=30', 'must be even')]:
        proc = run('train.py', '--dataset=tiny_char', '--n_head=2', '--rope=True', arg, cwd=prepared, check=False)
        assert proc.returncode == 1 and message in proc.stderr and 'Traceback' not in proc.stderr
