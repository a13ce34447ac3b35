"""FSDP2 (fsdp=True) on CPU through torchrun and gloo, and activation checkpointing."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, gpt2_bpe_available, run
from model import GPT, GPTConfig, ShardedMuon
from test_lora import hub_model_and_data  # noqa: F401 (fixture)
from test_pretrained import hub  # noqa: F401 (fixture)
from test_train import TINY, prepared  # noqa: F401 (fixture)

ARGS = ['--dataset=tiny_char', '--eval_interval=10', '--log_interval=5', '--dtype=float32',
        '--gradient_accumulation_steps=2', *TINY]


def torchrun(cwd, *args):
    """train.py on 2 CPU processes with FSDP; -> the finished process."""
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, 'train.py'), '--fsdp=True', *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'terminate called' not in proc.stderr and 'Traceback' not in proc.stderr
    return proc


def weights(cwd, out_dir):
    return torch.load(cwd / out_dir / 'ckpt.pt', weights_only=True)['model']


def optimizer_state_mib(out):
    return float(re.search(r'memory per process \(.*optimizer state ([\d.]+) MiB', out).group(1))


# Muon for 3 steps: its bfloat16 Newton-Schulz turns float32 rounding differences (6e-8 by step 4, AdamW's too,
# not from clipping, their source not found yet) into bfloat16 ones, 5e-3 by step 10; the first 3 steps are bitwise the
# same, which orthogonalising the shards instead (torch.optim.Muon on DTensors) misses by 1e-3
@pytest.mark.slow  # about 10 s each
@pytest.mark.parametrize('optimizer,max_iters', [('adamw', 10), ('muon', 3)])
def test_fsdp_trains_as_one_process_with_half_the_optimizer_state(prepared, optimizer, max_iters):
    cwd = prepared
    args = [*ARGS, f'--max_iters={max_iters}', f'--eval_interval={max_iters}', f'--optimizer={optimizer}']
    sharded = torchrun(cwd, '--out_dir=fsdp', *args).stdout
    single = run('train.py', '--out_dir=single', *args, cwd=cwd).stdout
    assert sharded.count(f'step {max_iters}: train loss') == 1  # only rank 0 logs
    assert 'memory per process (FSDP)' in sharded and 'memory per process (one process)' in single
    ratio = optimizer_state_mib(sharded) / optimizer_state_mib(single)
    print(f"{optimizer}: optimizer state per process, FSDP / one process = {ratio:.3f}")
    assert 0.45 < ratio < 0.55
    expected, got = weights(cwd, 'single'), weights(cwd, 'fsdp')
    assert got.keys() == expected.keys()  # the same checkpoint: tied head and all
    print(f"{optimizer}: largest weight difference "
          f"{max((got[k] - expected[k]).abs().max().item() for k in expected):.2e}")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)


def test_sharded_muon_is_torchs_muon_bitwise():
    """ShardedMuon's own Newton-Schulz against torch.optim.Muon's (on whole tensors: under FSDP it gathers them)."""
    torch.manual_seed(0)
    expected = [torch.nn.Parameter(torch.randn(shape)) for shape in ((32, 64), (64, 32), (48, 48))]
    got = [torch.nn.Parameter(p.detach().clone()) for p in expected]
    reference, ours = torch.optim.Muon(expected, lr=0.02, weight_decay=0.1), ShardedMuon(got, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(expected, got):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        reference.step()
        ours.step()
    assert all(torch.equal(p, q) for p, q in zip(expected, got))
    assert ours.state_dict()['state'].keys() == reference.state_dict()['state'].keys() == {0, 1, 2}
    assert ours.state_dict()['state'][0].keys() == {'momentum_buffer'}  # checkpoints move between the two


@pytest.mark.slow  # six runs, about a minute
def test_fsdp_resume_is_bitwise_and_its_checkpoint_is_a_plain_one(prepared):
    cwd = prepared
    args = [*ARGS, '--dropout=0.1', '--activation_checkpointing=True']
    torchrun(cwd, '--out_dir=straight', '--max_iters=10', *args)
    torchrun(cwd, '--out_dir=halves', '--max_iters=5', '--eval_interval=5', *args)
    resumed = torchrun(cwd, '--out_dir=halves', '--max_iters=10', '--init_from=resume', *args).stdout
    assert 'resuming from halves at iteration 5' in resumed
    straight, halves = weights(cwd, 'straight'), weights(cwd, 'halves')
    for key, value in straight.items():
        assert torch.equal(value, halves[key]), key
    # the FSDP checkpoint samples, and resumes without FSDP (its optimizer state too: no warning)
    sampled = run('sample.py', '--out_dir=halves', '--num_samples=2', '--max_new_tokens=20', cwd=cwd).stdout
    assert sampled.count('---------------') == 2
    plain = run('train.py', '--out_dir=halves', '--max_iters=12', '--init_from=resume', *args, cwd=cwd).stdout
    assert 'resuming from halves at iteration 10' in plain and 'warning' not in plain
    # and a checkpoint written without FSDP resumes with it
    again = torchrun(cwd, '--out_dir=halves', '--max_iters=14', '--init_from=resume', *args).stdout
    assert 'resuming from halves at iteration 12' in again and 'warning' not in again
    assert torch.load(cwd / 'halves' / 'ckpt.pt', weights_only=True)['iter_num'] == 14


def test_fsdp_without_torchrun_is_a_one_line_error(prepared):
    proc = run('train.py', '--dataset=tiny_char', '--fsdp=True', *TINY, cwd=prepared, check=False)
    assert proc.returncode == 1 and 'fsdp=True shards the model across torchrun' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # two runs, about 11 s
@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_fsdp_lora_on_a_hub_model_trains_the_adapters_as_one_process(hub_model_and_data, tmp_path):
    _, args = hub_model_and_data
    args = [*args, '--gradient_accumulation_steps=2', '--max_iters=5', '--lora_rank=4', '--lora_alpha=8']
    run('train.py', *args, '--out_dir=single', cwd=tmp_path)
    torchrun(tmp_path, *args, '--out_dir=fsdp')
    expected, got = weights(tmp_path, 'single'), weights(tmp_path, 'fsdp')
    assert got.keys() == expected.keys() and all('.lora_' in k for k in got)  # adapters only: the base is frozen
    assert all(got[k].abs().sum() > 0 for k in got if k.endswith('lora_B'))  # trained (B starts at 0)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)


def saved_bytes(model, idx):
    """Bytes of the tensors autograd keeps for the backward pass of one forward (each storage once), and the
    gradients it gives: what activation checkpointing cuts down."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in parameters)


def test_activation_checkpointing_gives_the_same_weights_with_less_kept_for_backward():
    config = GPTConfig(block_size=64, vocab_size=64, n_layer=4, n_head=4, n_embd=64, dropout=0.1)
    idx = torch.randint(64, (8, 64))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        model.activation_checkpointing = recompute
        [optimizer] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
        kept = []
        for step in range(3):
            torch.manual_seed(step)  # as train.py seeds dropout at each step
            kept.append(saved_bytes(model, idx))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append((kept[0], model.state_dict()))
    (plain, expected), (recomputed, got) = results
    print(f"activations kept for the backward pass: {plain / 2 ** 20:.2f} MiB, "
          f"with activation checkpointing {recomputed / 2 ** 20:.2f} MiB")
    assert recomputed < plain / 2
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
