import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, run
from checkpoint import load_checkpoint
from tokenizer import Tokenizer

TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8', '--eval_iters=2',
        '--warmup_iters=5', '--lr_decay_iters=40', '--learning_rate=3e-3', '--min_lr=3e-4', '--device=cpu']


def test_get_batch_shapes_dtypes_and_targets():
    data = np.arange(1000, dtype=np.uint16)
    x, y, n = train.get_batch(data, 4, 16, train.batch_rng(1, 0, 0, 0), 'cpu')
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64 and n == 4 * 16
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(x.max()) < 1000
    # a batch is a function of (seed, step) alone
    x2, _, _ = train.get_batch(data, 4, 16, train.batch_rng(1, 0, 0, 0), 'cpu')
    x3, _, _ = train.get_batch(data, 4, 16, train.batch_rng(1, 0, 1, 0), 'cpu')
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    big = np.arange(70_000, dtype=np.uint32)  # uint32 streams read the same way
    x, y, _ = train.get_batch(big, 2, 8, train.batch_rng(0, 0), 'cpu')
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.dtype == torch.int64


@pytest.fixture
def prepared(tmp_path, small_text):
    (tmp_path / 'input.txt').write_text(small_text, encoding='utf-8')
    run('prepare.py', 'tiny_char', '--input=input.txt', cwd=tmp_path)
    return tmp_path


def test_end_to_end_train_resume_sample(prepared):
    cwd = prepared
    first = run('train.py', '--dataset=tiny_char', '--out_dir=out', '--max_iters=20', '--eval_interval=10',
                '--log_interval=5', *TINY, cwd=cwd).stdout
    assert 'iter 20: loss' in first and 'step 20: train loss' in first
    # MFU is measured from the 5th log line on (earlier steps include warm-up): '-' until then, never 0.00%
    assert re.search(r'iter 5: loss [\d.]+, time [\d.]+ms, tok/s [\d,]+, mfu -, eta', first)
    assert re.search(r'iter 20: loss [\d.]+, time [\d.]+ms, tok/s [\d,]+, mfu -, eta', first)
    losses = [float(v) for v in re.findall(r'val loss ([\d.]+)', first)]
    assert losses[-1] < losses[0]  # it learns
    assert os.path.exists(cwd / 'out' / 'ckpt.pt') and os.path.exists(cwd / 'out' / 'best.pt')

    resumed = run('train.py', '--dataset=tiny_char', '--out_dir=out', '--init_from=resume', '--max_iters=30',
                  '--eval_interval=10', '--log_interval=5', *TINY, cwd=cwd).stdout
    assert 'resuming from out at iteration 20' in resumed and 'step 30: train loss' in resumed
    assert load_checkpoint(str(cwd / 'out'))[1]['iter_num'] == 30
    logged = run('train.py', '--dataset=tiny_char', '--out_dir=mfu', '--max_iters=5', '--eval_interval=5',
                 '--log_interval=1', *TINY, cwd=cwd).stdout
    assert re.search(r'iter 4: .*, mfu -, ', logged) and re.search(r'iter 5: .*, mfu \d+\.\d\d%, ', logged)
    # eval_only in a run's out_dir evaluates its checkpoint (not a random model), and writes nothing
    before = (cwd / 'out' / 'ckpt.pt').read_bytes()
    evaluated = run('train.py', '--dataset=tiny_char', '--out_dir=out', '--eval_only=True', *TINY, cwd=cwd).stdout
    assert 'resuming from out at iteration 30' in evaluated
    assert float(re.findall(r'val loss ([\d.]+)', evaluated)[-1]) < losses[0] - 0.3
    assert (cwd / 'out' / 'ckpt.pt').read_bytes() == before

    batch = run('sample.py', '--out_dir=out', '--num_samples=3', '--max_new_tokens=40', '--start=The',
                cwd=cwd).stdout
    assert batch.count('---------------') == 3 and batch.count('The') >= 3
    streamed = run('sample.py', '--out_dir=out', '--num_samples=1', '--max_new_tokens=40', '--temperature=0',
                   '--start=ROMEO:', '--dtype=float32', cwd=cwd).stdout
    assert streamed.startswith('ROMEO:') and len(streamed) >= len('ROMEO:') + 40
    again = run('sample.py', '--out_dir=out', '--num_samples=1', '--max_new_tokens=40', '--temperature=0',
                '--start=ROMEO:', '--dtype=float32', cwd=cwd).stdout
    assert again == streamed  # greedy is deterministic
    # and it is the model's argmax at every step, each from a plain forward pass over the text so far
    model, checkpoint = load_checkpoint(str(cwd / 'out'))
    tokenizer = Tokenizer(checkpoint['meta'])
    ids = tokenizer.encode('ROMEO:')
    with torch.no_grad():
        for _ in range(40):
            logits, _ = model.eval()(torch.tensor([ids[-model.config.block_size:]]))
            ids.append(logits[0, -1, :tokenizer.vocab_size].argmax().item())
    assert streamed.startswith(tokenizer.decode(ids))


def test_resume_gives_bitwise_the_same_weights(prepared):
    cwd = prepared
    common = ['--dataset=tiny_char', '--eval_interval=10', '--log_interval=10', '--dtype=float32', '--dropout=0.1',
              *TINY]
    run('train.py', '--out_dir=straight', '--max_iters=20', *common, cwd=cwd)
    run('train.py', '--out_dir=halves', '--max_iters=10', *common, cwd=cwd)
    run('train.py', '--out_dir=halves', '--max_iters=20', '--init_from=resume', *common, cwd=cwd)
    straight = torch.load(cwd / 'straight' / 'ckpt.pt', weights_only=True)
    halves = torch.load(cwd / 'halves' / 'ckpt.pt', weights_only=True)
    assert straight['iter_num'] == halves['iter_num'] == 20
    for key, value in straight['model'].items():
        assert torch.equal(value, halves['model'][key]), key


# float16 on a CPU is refused (its matmuls are slow there): this runs train.py as it would run on a GPU in float16,
# on a model small enough for a CPU's float16 (and no 2048-wide matmul to measure MFU against). Its GradScaler
# starts high and grows every 3 steps, so that overflowing steps are skipped and the loss scale moves all along.
FLOAT16 = ("import functools, sys, torch, train; train.pick_dtype = lambda dtype, device_type: 'float16'; "
           "train.measure_peak_flops = lambda device, dtype: 1e12; torch.amp.GradScaler = functools.partial("
           "torch.amp.GradScaler, init_scale=2.0 ** 24, growth_interval=3); train.main(sys.argv[1:])")


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_resume_is_bitwise_in_reduced_precision_with_the_scalers_state(prepared, dtype):
    cwd = prepared
    common = ['--dataset=tiny_char', '--eval_interval=10', '--log_interval=10', f'--dtype={dtype}', '--dropout=0.1',
              *TINY, '--gradient_accumulation_steps=2']

    def train_run(*args):
        if dtype == 'bfloat16':
            return run('train.py', *args, *common, cwd=cwd)
        proc = subprocess.run([sys.executable, '-c', FLOAT16, *args, *common], cwd=cwd, capture_output=True,
                              text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
        assert proc.returncode == 0, proc.stderr
        return proc
    assert f'dtype {dtype}' in train_run('--out_dir=straight', '--max_iters=20').stdout
    train_run('--out_dir=halves', '--max_iters=10')
    train_run('--out_dir=halves', '--max_iters=20', '--init_from=resume')
    straight = torch.load(cwd / 'straight' / 'ckpt.pt', weights_only=True)
    halves = torch.load(cwd / 'halves' / 'ckpt.pt', weights_only=True)
    for key, value in straight['model'].items():
        assert torch.equal(value, halves['model'][key]), key
    if dtype == 'float16':  # the loss scale moved, and was resumed with the rest
        assert straight['scaler']['scale'] < 2.0 ** 24 and straight['scaler'] == halves['scaler']


def test_best_checkpoint_is_not_replaced_by_a_worse_one(prepared):
    cwd = prepared
    args = ['--dataset=tiny_char', '--out_dir=out', '--eval_interval=5', '--log_interval=5',
            '--always_save_checkpoint=False', *TINY]
    run('train.py', *args, '--max_iters=10', cwd=cwd)
    best = (cwd / 'out' / 'ckpt.pt').read_bytes()
    best_val_loss = torch.load(cwd / 'out' / 'ckpt.pt', weights_only=True)['best_val_loss']
    # a learning rate this high makes every later evaluation worse
    out = run('train.py', *args, '--max_iters=20', '--init_from=resume', '--learning_rate=0.5', '--warmup_iters=0',
              '--grad_clip=0.0', cwd=cwd).stdout
    later = [float(v) for v in re.findall(r'step \d+: train loss [\d.]+, val loss ([\d.]+)', out)]
    assert len(later) == 2 and min(later) > best_val_loss
    assert 'saving checkpoint' not in out and (cwd / 'out' / 'ckpt.pt').read_bytes() == best


@pytest.mark.parametrize('script,args,message', [
    ('train.py', ['--dataset=nothing_here'], "dataset 'nothing_here' is not prepared"),
    ('train.py', ['--dataset=tiny_char', '--learnig_rate=1'], "did you mean 'learning_rate'"),
    ('train.py', ['--dataset=tiny_char', '--n_embd=100', '--n_head=3'], 'must be divisible by n_head'),
    ('train.py', ['--dataset=tiny_char', '--batch_size=0'], 'batch_size must be > 0, got 0'),
    ('train.py', ['--dataset=tiny_char', '--block_size=100000'], 'too few for block_size 100000'),
    ('train.py', ['--dataset=tiny_char', '--device=cuda'], 'sees no CUDA GPU'),
    ('train.py', ['--dataset=tiny_char', '--init_from=resume', '--out_dir=empty'], 'no checkpoint at empty'),
    ('train.py', ['config/no_such_config.py'], 'not found'),
    ('sample.py', ['--out_dir=empty'], 'no checkpoint at empty'),
    ('sample.py', ['--GPT2_EOT=7'], "unknown config key 'GPT2_EOT'"),  # an imported constant is not a key
    ('train.py', ['--dataset=tiny_char', '--init_from=out-tiny-cpuu'],
     "no checkpoint or directory named 'out-tiny-cpuu' exists, and it is not a Hub model"),
    ('train.py', ['--dataset=tiny_char', '--out_dir='], "out_dir must name a directory, and '' is empty"),
    ('train.py', ['--dataset=tiny_char', '--max_iters=-1'], 'max_iters must be >= 0, got -1'),
    ('train.py', ['--dataset=tiny_char', '--dtype=float16'], 'float16'),
])
def test_bad_input_is_a_one_line_error(prepared, script, args, message):
    before = sorted(os.listdir(prepared / 'data' / 'tiny_char'))
    proc = run(script, *args, cwd=prepared, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(prepared / 'data' / 'tiny_char')) == before


def test_wandb_log_without_wandb_says_what_to_install_before_any_work(prepared):
    import importlib.util
    if importlib.util.find_spec('wandb'):
        pytest.skip("wandb is installed here")
    proc = run('train.py', '--dataset=tiny_char', '--out_dir=out', '--wandb_log=True', cwd=prepared, check=False)
    assert proc.returncode == 1 and 'pip install wandb' in proc.stderr and 'Traceback' not in proc.stderr
    assert proc.stdout == '' and not (prepared / 'out').exists()


def test_ddp_with_gloo_matches_one_process(prepared):
    """torchrun with 2 CPU processes trains the same model as 1 process with the same global batch."""
    import subprocess
    import sys
    cwd = prepared
    args = ['--dataset=tiny_char', '--max_iters=10', '--eval_interval=10', '--log_interval=5', '--dtype=float32',
            '--gradient_accumulation_steps=2', *TINY]
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(os.path.dirname(train.__file__), 'train.py'), '--out_dir=ddp', *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('step 10: train loss') == 1  # only rank 0 logs
    run('train.py', '--out_dir=single', *args, cwd=cwd)
    ddp = torch.load(cwd / 'ddp' / 'ckpt.pt', weights_only=True)['model']
    single = torch.load(cwd / 'single' / 'ckpt.pt', weights_only=True)['model']
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_works_on_cpu_and_trains_as_eager(prepared):
    cwd = prepared
    args = ['--dataset=tiny_char', '--max_iters=10', '--eval_interval=10', '--log_interval=1', '--dtype=float32', *TINY]
    out = run('train.py', '--out_dir=out', '--compile', *args, cwd=cwd).stdout  # a bare --compile is True
    assert 'compile True' in out and 'step 10: train loss' in out
    eager = run('train.py', '--out_dir=eager', *args, cwd=cwd).stdout
    assert 'compile False' in eager
    compiled_losses, eager_losses = ([float(v) for v in re.findall(r'iter \d+: loss ([\d.]+)', o)] for o in (out, eager))
    assert len(compiled_losses) == 10  # the same losses step by step, up to the fused kernels' rounding
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    sampled = run('sample.py', '--out_dir=out', '--compile=True', '--num_samples=2', '--max_new_tokens=20',
                  cwd=cwd).stdout
    assert sampled.count('---------------') == 2
