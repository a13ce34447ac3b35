"""
What each speedrun option is worth on your machine: the val loss after the same training time, for
each option added alone to the GPT-2 recipe, and removed alone from the speedrun config (or added, for
an option the speedrun config leaves out).

    python ablate.py                  # 20 s of training per run, 20 runs: about 10 minutes
    python ablate.py --seconds=60 --options=rope,muon

Each run's number of steps comes from its own speed, measured first (bench.py's train_speed), so every
run trains for about `seconds`; its schedule (warmup, decay) is its config's, scaled to those steps.
Prints a markdown table, and draws the runs' curves into out-ablate/curves.png (plot.py); the data must be
prepared (python prepare.py shakespeare_char).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

import bench
import train
from checkpoint import model_config
from common import config_defaults, die, load_config, pick_device, pick_dtype
from model import GPT
from plot import plot_runs

_names_before_config = set(globals())  # imports and the like: not config keys
# -----------------------------------------------------------------------------
baseline = 'config/train_shakespeare_char_cpu.py'  # GPT-2's architecture, AdamW, cosine schedule
speedrun = 'config/speedrun_shakespeare_char_cpu.py'  # every option on
seconds = 20.0  # training time per run
options = 'all'  # comma-separated names from OPTIONS, or 'all'
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals(), _names_before_config)

# each option's settings when on; its 'off' is the baseline's values of those keys. Muon and the
# schedule also take the speedrun config's values of the keys they were tuned with.
OPTIONS = {
    'rope': {'rope': True},
    'rmsnorm': {'norm': 'rmsnorm'},
    'qk_norm': {'qk_norm': True},
    'relu2': {'activation': 'relu2'},
    'untied head': {'tie_embeddings': False},
    'logit softcap': {'logit_softcap': 15.0},
    'zero init': {'zero_init': True},
    'muon': {'optimizer': 'muon'},
    'wsd schedule': {'lr_schedule': 'wsd'},
}
TUNED_WITH = {'muon': ['muon_lr', 'learning_rate', 'weight_decay', 'beta2'], 'wsd schedule': ['cooldown_frac', 'min_lr']}


def with_option(config, name, on, base, fast):
    """config with option `name` turned on (or off)."""
    keys = list(OPTIONS[name]) + TUNED_WITH.get(name, [])
    values = {**OPTIONS[name], **{k: fast[k] for k in TUNED_WITH.get(name, [])}} if on else {k: base[k] for k in keys}
    return {**config, **values}


def train_for(config, seconds, out_dir):
    """Train config (a dict of train.py keys) for about `seconds` in out_dir -> (val loss, steps, wall seconds of
    the run)."""
    cfg = SimpleNamespace(**config, vocab_size=0, warmup_steps=2, train_steps=8)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device.split(':')[0])
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, bench.vocab_size_of(cfg)))
    tokens_per_s = bench.train_speed(cfg, model, device, dtype, use_compile=False)[0]
    steps = max(10, int(seconds * tokens_per_s / (cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size)))
    scale = steps / config['max_iters']  # the config's schedule, shrunk or stretched to `steps`
    shutil.rmtree(out_dir, ignore_errors=True)  # ablate.py's own runs: each one starts anew
    run = {**config, 'max_iters': steps, 'lr_decay_iters': steps, 'eval_interval': steps,
           'warmup_iters': round(config['warmup_iters'] * scale), 'out_dir': out_dir,
           'always_save_checkpoint': False, 'log_interval': max(1, steps // 20), 'plot': False}
    args = [f"--{k}={v}" for k, v in run.items() if v != train.DEFAULTS[k]]
    t0 = time.perf_counter()
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
    proc = subprocess.run([sys.executable, train_py, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        die(f"train.py {' '.join(args)} failed:\n{proc.stderr.strip()}")
    val_loss = float(re.findall(r'val loss ([\d.]+)', proc.stdout)[-1])
    return val_loss, steps, time.perf_counter() - t0


def main(argv):
    cfg = SimpleNamespace(**load_config(DEFAULTS, argv))
    names = list(OPTIONS) if cfg.options == 'all' else [n.strip() for n in cfg.options.split(',')]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        die(f"unknown option(s) {', '.join(unknown)}: pick from {', '.join(OPTIONS)}")
    base, fast = (load_config(train.DEFAULTS, [path]) for path in (cfg.baseline, cfg.speedrun))
    print(f"{cfg.seconds:g} s of training per run; baseline {cfg.baseline}, speedrun {cfg.speedrun}")
    runs = [('GPT-2 recipe (baseline)', base)]
    runs += [(f"baseline + {name}", with_option(base, name, True, base, fast)) for name in names]
    runs += [('speedrun config', fast)]
    for name in names:  # the options the speedrun config has are taken out, the others put in
        has = all(fast[k] == v for k, v in OPTIONS[name].items())
        runs.append((f"speedrun {'-' if has else '+'} {name}", with_option(fast, name, not has, base, fast)))
    rows, out_dirs = [], []
    for label, config in runs:  # each in its own out-ablate/<run>, whose metrics.jsonl the plot draws
        out_dirs.append(os.path.join('out-ablate', re.sub(r'[^\w]+', '-', label).strip('-')))
        val_loss, steps, wall = train_for(config, cfg.seconds, out_dirs[-1])
        rows.append((label, val_loss, steps, wall))
        print(f"{label}: val loss {val_loss:.4f} after {steps} steps ({wall:.0f} s with start-up and evals)", flush=True)
    print("\n| run | val loss | steps | wall s (whole run) |\n|---|---|---|---|")
    for label, val_loss, steps, wall in rows:
        print(f"| {label} | {val_loss:.4f} | {steps} | {wall:.0f} |")
    if importlib.util.find_spec('matplotlib'):
        plot_runs(out_dirs, os.path.join('out-ablate', 'curves.png'), names=[label for label, *_ in rows])
        print("\nthe runs' curves: out-ablate/curves.png")
    return rows


if __name__ == '__main__':
    main(sys.argv[1:])
