"""Training that survives: kills, signals, bad resumes, non-finite losses, failed saves."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import train
from checkpoint import MODEL_KEYS, check_resume, lora_settings
from conftest import ROOT, run
from test_train import TINY, prepared  # noqa: F401 (fixture)

ARGS = ['--dataset=tiny_char', '--out_dir=out', '--log_interval=1', *TINY]


def start(cwd, *args, launcher=()):
    return subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, 'train.py'), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def wait_for(proc, text, timeout=120):
    """Read proc's stdout until a line contains text."""
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}:\n{''.join(lines)}\n{proc.stderr.read()}")


@pytest.mark.slow
def test_kill_9_never_leaves_a_broken_checkpoint(prepared):
    """SIGKILL a run that saves at every step, at several moments; every ckpt.pt left behind loads."""
    cwd = prepared
    args = [*ARGS, '--eval_interval=1', '--eval_iters=1', '--max_iters=100000', '--always_save_checkpoint=True']
    kills, lost = 0, 0
    for delay in (0.0, 0.05, 0.13, 0.21, 0.34, 0.55):
        had_checkpoint = os.path.exists(cwd / 'out' / 'ckpt.pt')
        proc = start(cwd, *args, *(['--init_from=resume'] if had_checkpoint else []))
        wait_for(proc, 'saving checkpoint')
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        kills += 1
        if not had_checkpoint and not os.path.exists(cwd / 'out' / 'ckpt.pt'):
            continue  # killed during the very first save: there was nothing to lose
        try:
            checkpoint = torch.load(cwd / 'out' / 'ckpt.pt', weights_only=True)
            assert checkpoint['iter_num'] >= 1
        except Exception as e:
            print(f"lost after {delay} s: {e}")
            lost += 1
    print(f"kill -9 runs: {kills}, checkpoints lost: {lost}")
    assert kills == 6 and lost == 0


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_next_step_and_resume_continues(prepared, signum):
    cwd = prepared
    proc = start(cwd, *ARGS, '--eval_interval=1000', '--max_iters=100000', '--always_save_checkpoint=False')
    wait_for(proc, 'iter 3:')
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert 'stopped by a signal at iteration' in out and 'Traceback' not in err
    saved = torch.load(cwd / 'out' / 'ckpt.pt', weights_only=True)
    assert saved['iter_num'] >= 3 and saved['preempted']
    resumed = run('train.py', *ARGS, '--eval_interval=1000', f"--max_iters={saved['iter_num'] + 2}",
                  '--always_save_checkpoint=False', '--init_from=resume', cwd=cwd).stdout
    assert f"resuming from out at iteration {saved['iter_num']}" in resumed
    assert f"iter {saved['iter_num'] + 2}:" in resumed
    # a preemption checkpoint had no eval at its step: eval_only evaluates it, and saves nothing
    again = [*ARGS, '--out_dir=again']
    proc = start(cwd, *again, '--eval_interval=1000', '--max_iters=100000', '--always_save_checkpoint=True')
    wait_for(proc, 'iter 3:')
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    step = torch.load(cwd / 'again' / 'ckpt.pt', weights_only=True)['iter_num']
    before = (cwd / 'again' / 'ckpt.pt').read_bytes()
    evaluated = run('train.py', *again, '--init_from=resume', '--eval_only=True', cwd=cwd).stdout
    assert f"step {step}: train loss" in evaluated
    assert (cwd / 'again' / 'ckpt.pt').read_bytes() == before


@pytest.mark.slow
def test_resume_from_a_signal_saved_checkpoint_is_bitwise_a_run_that_never_stopped(prepared):
    cwd = prepared
    common = [*ARGS, '--eval_interval=1000', '--dtype=float32', '--dropout=0.1', '--gradient_accumulation_steps=2',
              '--always_save_checkpoint=False']
    run('train.py', *common, '--out_dir=straight', '--max_iters=30', cwd=cwd)
    proc = start(cwd, *common, '--max_iters=30')
    wait_for(proc, 'iter 3:')
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    stopped_at = torch.load(cwd / 'out' / 'ckpt.pt', weights_only=True)['iter_num']
    assert 3 <= stopped_at < 30
    run('train.py', *common, '--max_iters=30', '--init_from=resume', cwd=cwd)
    straight = torch.load(cwd / 'straight' / 'ckpt.pt', weights_only=True)['model']
    resumed = torch.load(cwd / 'out' / 'ckpt.pt', weights_only=True)['model']
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def start_ranks(cwd, *args, n=2):
    """The n processes torchrun would start (its environment variables, a free port), each with its own output:
    so that the test sees every rank's exit code."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
           'WORLD_SIZE': str(n), 'LOCAL_WORLD_SIZE': str(n), 'OMP_NUM_THREADS': '1'}
    return [subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=cwd, text=True,
                             env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(n)]


@pytest.mark.parametrize('sharding', [[], ['--fsdp=True']], ids=['ddp', 'fsdp'])
def test_sigterm_under_torchrun_stops_every_rank_with_exit_code_0(prepared, sharding):
    cwd = prepared
    # dtype auto: rank 0 measures, and passes its answer to rank 1
    ranks = start_ranks(cwd, *ARGS, *sharding, '--eval_interval=1000', '--max_iters=100000',
                        '--gradient_accumulation_steps=2')
    wait_for(ranks[0], 'iter 3:')
    for proc in ranks:  # as torchrun (or a cluster's scheduler) passes it on to every rank
        proc.send_signal(signal.SIGTERM)
    results = [proc.communicate(timeout=60) for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], results
    assert 'stopped by a signal at iteration' in results[0][0]
    assert all('Traceback' not in err and 'terminate called' not in err for _, err in results)
    assert torch.load(cwd / 'out' / 'ckpt.pt', weights_only=True)['iter_num'] >= 3


def test_a_user_error_under_torchrun_is_said_once_and_every_rank_exits_alike(prepared):
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(ROOT, 'train.py'), '--dataset=nothing_here', '--device=cpu'],
                          cwd=prepared, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("error: dataset 'nothing_here' is not prepared") == 1  # rank 0 alone says it
    assert re.findall(r'exitcode\s*: (-?\d+) \(pid', proc.stderr) == ['1', '1']  # torchrun's summary of each rank
    assert 'terminate called' not in proc.stderr


def test_resume_refuses_a_new_shape_and_logs_changed_keys(prepared):
    cwd = prepared
    run('train.py', *ARGS, '--max_iters=4', '--eval_interval=4', cwd=cwd)
    proc = run('train.py', *ARGS, '--init_from=resume', '--max_iters=6', '--eval_interval=4', '--n_layer=3',
               cwd=cwd, check=False)
    assert proc.returncode != 0 and 'has n_layer=2, this run asks for n_layer=3' in proc.stderr
    assert 'Traceback' not in proc.stderr
    out = run('train.py', *ARGS, '--init_from=resume', '--max_iters=6', '--eval_interval=4', '--learning_rate=1e-3',
              cwd=cwd).stdout
    assert 'changed since the checkpoint: learning_rate 0.003 -> 0.001, max_iters 4 -> 6' in out


@pytest.mark.parametrize('key,value', [('n_layer', 3), ('n_head', 4), ('n_embd', 64), ('bias', True),
                                       ('block_size', 64), ('lora_rank', 8), ('lora_alpha', 16.0),
                                       ('lora_targets', 'c_attn')])
def test_resume_refuses_a_changed_shape_or_adapter(key, value):
    cfg = SimpleNamespace(**{**train.DEFAULTS, 'n_layer': 2, 'n_head': 2, 'n_embd': 32, 'block_size': 32,
                             'bias': False, 'lora_rank': 4, 'lora_alpha': 8.0, 'lora_targets': 'c_attn,c_proj'})
    checkpoint = {'model_args': {k: getattr(cfg, k) for k in MODEL_KEYS}, 'config': dict(vars(cfg)),
                  'lora': lora_settings(cfg)}
    check_resume(cfg, checkpoint, master=False)  # the same settings resume
    setattr(cfg, key, value)
    with pytest.raises(SystemExit, match=f"has {key}=.*this run asks for"):
        check_resume(cfg, checkpoint, master=False)


def test_resume_refuses_a_dataset_with_a_larger_vocabulary(prepared):
    cwd = prepared
    run('train.py', *ARGS, '--max_iters=2', '--eval_interval=2', cwd=cwd)
    (cwd / 'more.txt').write_text(''.join(chr(0x400 + i) for i in range(200)) * 50, encoding='utf-8')
    run('prepare.py', 'other_char', '--input=more.txt', cwd=cwd)
    proc = run('train.py', *ARGS, '--dataset=other_char', '--init_from=resume', '--max_iters=4', cwd=cwd, check=False)
    assert proc.returncode != 0 and "is not the one of dataset 'other_char' (200 tokens)" in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(prepared):
    cwd = prepared
    run('train.py', *ARGS, '--max_iters=4', '--eval_interval=4', cwd=cwd)
    before = (cwd / 'out' / 'ckpt.pt').read_bytes()
    explode = ['--learning_rate=1e30', '--min_lr=1e30', '--warmup_iters=0', '--grad_clip=0.0']
    proc = run('train.py', *ARGS, '--init_from=resume', '--max_iters=40', '--eval_interval=1', *explode,
               cwd=cwd, check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'at iteration' in proc.stderr and 'last good checkpoint' in proc.stderr, proc.stderr
    assert (cwd / 'out' / 'ckpt.pt').read_bytes() == before
    # or skip the steps whose gradients are not finite (the exploded weights still fail the final eval)
    proc = run('train.py', *ARGS, '--init_from=resume', '--max_iters=8', '--eval_interval=100', *explode,
               '--skip_nonfinite=True', cwd=cwd, check=False)
    assert 'gradients are not finite, step skipped' in proc.stdout and 'Traceback' not in proc.stderr
    assert (cwd / 'out' / 'ckpt.pt').read_bytes() == before


def test_a_failed_save_keeps_the_old_checkpoint(prepared):
    cwd = prepared
    run('train.py', *ARGS, '--max_iters=2', '--eval_interval=2', cwd=cwd)
    before = (cwd / 'out' / 'ckpt.pt').read_bytes()
    os.mkdir(cwd / 'out' / 'ckpt.pt.tmp')  # the temporary file can't be written: as good as a full disk
    out = run('train.py', *ARGS, '--init_from=resume', '--max_iters=4', '--eval_interval=2', cwd=cwd).stdout
    assert 'could not save' in out and 'the previous checkpoint is kept' in out
    assert (cwd / 'out' / 'ckpt.pt').read_bytes() == before


def test_a_new_run_does_not_write_over_an_earlier_runs_checkpoint(prepared):
    cwd = prepared
    run('train.py', *ARGS, '--max_iters=2', '--eval_interval=2', cwd=cwd)
    before = (cwd / 'out' / 'ckpt.pt').read_bytes()
    for init_from in ('scratch', 'out/ckpt.pt'):  # a new model, or fine-tuning that checkpoint into its own out_dir
        proc = run('train.py', *ARGS, '--max_iters=4', f'--init_from={init_from}', cwd=cwd, check=False)
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr
        assert 'out holds the checkpoint of an earlier run' in proc.stderr and '--init_from=resume' in proc.stderr
    assert (cwd / 'out' / 'ckpt.pt').read_bytes() == before
    evaluated = run('train.py', *ARGS, '--eval_only=True', cwd=cwd).stdout  # saves nothing: not refused
    assert 'val loss' in evaluated and (cwd / 'out' / 'ckpt.pt').read_bytes() == before
