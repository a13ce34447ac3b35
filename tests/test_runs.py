"""Seeing runs: metrics.jsonl, plot.py, the time left, the closing summary, and every key checked at start."""

import json
import os
import re
import struct
import subprocess
import sys

import pytest

import plot
import train
from common import cpu_has_fast_fp16
from conftest import ROOT, run

TINY = ['--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=16', '--batch_size=4', '--eval_iters=1',
        '--gradient_accumulation_steps=1',
        '--device=cpu', '--compile=False', '--dataset=tiny_char']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two short runs in one directory: 'a' (20 steps, then resumed to 30 after a preemption that had logged
    past its checkpoint) and 'b' (10 steps at another learning rate) -> (cwd, train.py's output for a and b)."""
    cwd = tmp_path_factory.mktemp('runs')
    (cwd / 'input.txt').write_text('the king shall speak of love and death, my good lord.\n' * 400)
    run('prepare.py', 'tiny_char', '--input=input.txt', cwd=cwd)
    first = run('train.py', *TINY, '--out_dir=a', '--max_iters=20', '--eval_interval=10', '--log_interval=5',
                cwd=cwd).stdout
    with open(cwd / 'a' / 'metrics.jsonl', 'a') as f:  # what a preemption after step 20's checkpoint leaves behind
        f.write(json.dumps({'iter': 25, 'loss': 99.0, 'lr': 0.0, 'tokens': 0, 'time': 0.0}) + '\n')
    resumed = run('train.py', *TINY, '--out_dir=a', '--max_iters=30', '--eval_interval=10', '--log_interval=5',
                  '--init_from=resume', cwd=cwd).stdout
    other = run('train.py', *TINY, '--out_dir=b', '--max_iters=10', '--eval_interval=5', '--log_interval=5',
                '--learning_rate=1e-3', cwd=cwd).stdout
    return cwd, first, resumed, other


def test_metrics_jsonl_has_each_log_line_and_eval_once_across_a_resume(runs):
    cwd, first, resumed, _ = runs
    records = [json.loads(line) for line in (cwd / 'a' / 'metrics.jsonl').read_text().splitlines()]
    logs = [r for r in records if 'loss' in r]
    evals = [r for r in records if 'val_loss' in r]
    assert [r['iter'] for r in logs] == [5, 10, 15, 20, 25, 30]  # the replayed 25 once, the real one
    assert [r['iter'] for r in evals] == [0, 10, 20, 30]
    assert all(r['loss'] < 10 for r in logs)  # the preemption's stale record is gone
    assert set(logs[0]) == {'iter', 'loss', 'lr', 'ms', 'tok_s', 'mfu', 'tokens', 'time'}
    # the logged values are the printed ones, and tokens and time go on across the resume
    printed = [float(v) for v in re.findall(r'iter \d+: loss ([\d.]+)', first + resumed)]
    assert [round(r['loss'], 4) for r in logs] == printed
    assert [r['tokens'] for r in logs] == [5 * 4 * 16 * k for k in range(1, 7)]  # 5 steps of 4 x 16 tokens
    assert all(a['time'] < b['time'] for a, b in zip(records, records[1:]))
    assert [r['tokens'] for r in evals] == [r['iter'] * 4 * 16 for r in evals]  # what the steps before it trained on
    printed_val = [float(v) for v in re.findall(r'^step \d+: train loss [\d.]+, val loss ([\d.]+)', first + resumed, re.M)]
    assert [round(r['val_loss'], 4) for r in evals] == printed_val
    # the log line says how long is left
    assert re.search(r'iter 25: loss [\d.]+, .*, eta \d+s$', resumed, re.M)
    assert re.search(r'iter 30: .*, eta 0s$', resumed, re.M)


def test_the_closing_summary_names_the_best_val_loss_the_files_and_the_next_commands(runs):
    cwd, first, resumed, _ = runs
    evals = [json.loads(line) for line in (cwd / 'a' / 'metrics.jsonl').read_text().splitlines() if 'val_loss' in line]
    best = min(evals, key=lambda r: r['val_loss'])
    summary = resumed[resumed.index('\n--- iteration 30 of 30, stopped by max_iters'):]
    assert f"best val loss {best['val_loss']:.4f} at iteration {best['iter']}" in summary
    last_train = re.findall(r'iter 30: loss ([\d.]+)', resumed)[0]
    assert f"last train loss {last_train}" in summary
    assert re.search(r'after [\dhms]+ \([\dhms]+ in all\); 1,920 tokens trained on', summary)
    files = [os.path.join('a', name) for name in ('ckpt.pt', 'best.pt', 'curves.png', 'metrics.jsonl')]
    assert f"files: {', '.join(f for f in files if os.path.exists(cwd / f))}" in summary
    assert summary.rstrip().endswith("next:\n  python sample.py --out_dir=a\n  python eval.py --out_dir=a\n"
                                     "  python plot.py a")
    assert '--- iteration 20 of 20, stopped by max_iters' in first


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
    return struct.unpack('>II', data[16:24])


def test_plot_py_draws_two_runs_with_their_logged_values(runs):
    cwd, *_ = runs
    out = run('plot.py', 'a', 'b', '--output=both.png', cwd=cwd).stdout
    assert out.strip() == 'wrote both.png'
    width, height = png_size(cwd / 'both.png')
    assert 600 <= width <= 1200 and 300 <= height <= 700 and 10_000 < (cwd / 'both.png').stat().st_size < 150_000
    # through matplotlib's own objects: a train and a val line per run on each loss axis, with the logged values
    fig = plot.plot_runs([str(cwd / 'a'), str(cwd / 'b')], str(cwd / 'again.png'), names=['a', 'b'])
    loss_axes, lr_axis = fig.axes[:3], fig.axes[3]
    for axis, x in zip(loss_axes, ('iter', 'tokens', 'time')):
        lines = axis.get_lines()
        assert [line.get_label() for line in lines] == ['a train', 'a val', 'b train', 'b val']
        for line, (name, kind) in zip(lines, [('a', 'loss'), ('a', 'val_loss'), ('b', 'loss'), ('b', 'val_loss')]):
            records = [r for r in plot.read_metrics(cwd / name) if kind in r]
            assert list(line.get_xdata()) == [r[x] for r in records]
            assert list(line.get_ydata()) == [r[kind] for r in records]
    assert [len(line.get_xdata()) for line in lr_axis.get_lines()] == [6, 2]  # a's and b's log lines
    # train.py drew each run's own curves at its evals
    assert png_size(cwd / 'a' / 'curves.png')[0] > 0 and (cwd / 'b' / 'curves.png').exists()
    bad = run('plot.py', 'nothing-here', cwd=cwd, check=False)
    assert bad.returncode != 0 and "nothing-here has no metrics.jsonl" in bad.stderr and 'Traceback' not in bad.stderr


@pytest.mark.parametrize('arg,message', [
    ('--learning_rate=-0.1', 'learning_rate must be >= 0, got -0.1'),
    ('--learning_rate=1e999', 'learning_rate must be >= 0, got inf'),
    ('--min_lr=0.1', r'min_lr \(0.1\) must be at most learning_rate'),
    ('--beta1=1.0', r'beta1 must be in \[0, 1\), got 1.0'),
    ('--beta2=-0.5', r'beta2 must be in \[0, 1\)'),
    ('--weight_decay=-1', 'weight_decay must be >= 0'),
    ('--grad_clip=-1.0', 'grad_clip must be >= 0'),
    ('--dropout=1.0', r'dropout must be in \[0, 1\)'),
    ('--warmup_iters=-5', 'warmup_iters must be >= 0'),
    ('--max_iters=-1', 'max_iters must be >= 0'),
    ('--lr_decay_iters=-1', 'lr_decay_iters must be >= 0'),
    ('--cooldown_frac=0', r'cooldown_frac must be in \(0, 1\]'),
    ('--muon_lr=-0.02', 'muon_lr must be >= 0'),
    ('--batch_size=0', 'batch_size must be > 0'),
    ('--eval_task_limit=-1', 'eval_task_limit must be >= 0'),
    ('--lora_dropout=2', r'lora_dropout must be in \[0, 1\)'),
    ('--rope_base=0', 'rope_base must be > 0'),
    ('--logit_softcap=-1', 'logit_softcap must be >= 0'),
    ('--seed=-1', r'seed must be in \[0, 9223372036854775807\], got -1'),
    ('--compile=abc', "compile must be one of None, True, False, got 'abc'"),
    ('--backend=foo', "backend must be one of auto, nccl, gloo"),
    ('--lora_alpha=0', 'lora_alpha must be > 0'),
    ('--out_dir=', "out_dir must name a directory, and '' is empty"),
    ('--out_dir=taken', "out_dir must name a directory, and 'taken' is a file"),
])
def test_bad_values_stop_with_one_line_before_touching_out_dir(runs, arg, message, monkeypatch):
    cwd, *_ = runs
    monkeypatch.chdir(cwd)
    (cwd / 'taken').write_text('a file of the user')
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (cwd / 'a').iterdir()}
    with pytest.raises(SystemExit, match=message):
        train.main(['--out_dir=a', *TINY, arg] if not arg.startswith('--out_dir') else [*TINY, arg])
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (cwd / 'a').iterdir()} == before
    assert (cwd / 'taken').read_text() == 'a file of the user'


def test_a_bad_value_from_the_command_line_is_one_line(runs):
    cwd, *_ = runs
    proc = run('train.py', '--out_dir=fresh', *TINY, '--learning_rate=-1', cwd=cwd, check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == 'error: learning_rate must be >= 0, got -1.0'
    assert not (cwd / 'fresh').exists()


def test_other_scripts_refuse_odd_values_in_one_line(runs):
    """Found by trying odd values of every key: each was a traceback or silently did something absurd."""
    cwd, *_ = runs
    for script, args, message in [
            ('prepare.py', ['../outside', '--input=input.txt'], "the dataset name '../outside' must be letters"),
            ('prepare.py', ['input.txt', '--input=input.txt'], "data/input.txt"),
            ('eval.py', ['--out_dir=a', '--output=x.json'], "--output writes a task's figures"),
            ('sample.py', ['--out_dir=a', f'--seed={10 ** 30}'], 'seed must be in'),
            ('sample.py', ['--init_from='], 'init_from is empty'),
            ('eval.py', ['--out_dir=a', '--max_tokens=-1'], 'max_tokens must be >= 0'),
            ('train.py', [*TINY, '--out_dir=new', '--dtype=float16'], 'float16 on a CPU without AVX512-FP16 or AVX-NE'),
            ('sample.py', ['--out_dir=a', '--device=cpu:abc'], "unknown device 'cpu:abc'")]:
        if '--dtype=float16' in args and cpu_has_fast_fp16():  # this CPU takes float16: nothing to refuse
            continue
        if script == 'prepare.py' and args[0] == 'input.txt':
            (cwd / 'data' / 'input.txt').write_text('a file where a dataset directory would go')
            message = "data/input.txt is a file, not a dataset's directory"
        proc = run(script, *args, cwd=cwd, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (script, args, proc.stderr)
        assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (cwd.parent / 'outside').exists() and not (cwd / 'new').exists()


def test_train_py_does_not_import_matplotlib(runs):
    """matplotlib is plot.py's, imported when drawing: training needs none of it."""
    cwd, *_ = runs
    code = "import sys, train; assert 'matplotlib' not in sys.modules, 'imported'"
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
