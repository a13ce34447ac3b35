"""
Train a GPT, on one CPU or GPU or on several through DDP.

    python train.py config/train_shakespeare_char_cpu.py              # a laptop CPU, 2 to 4 minutes
    python train.py config/train_shakespeare_char.py --max_iters=2000  # config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    # several nodes: run on each, with its own --node_rank (0 on the master):
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py config/train_gpt2.py
    python train.py config/finetune_shakespeare.py                    # fine-tune GPT-2 from the Hub
    python train.py config/finetune_shakespeare_lora.py               # the same with LoRA adapters

Every default is below; config/*.py files (plain Python) and --key=value arguments override them.
"""

import importlib.util
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch

from common import (autocast_context, check_ranges, config_defaults, die, load_config, measure_peak_flops,
                    pick_device, pick_dtype)
from checkpoint import (full_model_state, full_optimizer_state, load_optimizer_state, lora_settings, model_to_train,
                        save_checkpoint, shard_model)
from model import LORA_TARGETS, lora_state_dict
from dataset import Conversations, open_dataset
from plot import MetricsLog, duration, summary
from tasks import read_task, run_task
from tokenizer import Tokenizer

_names_before_config = set(globals())  # imports and the like: not config keys
# -----------------------------------------------------------------------------
# default config values: GPT-2 (124M) on the BPE shakespeare text
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200  # batches per split for each loss estimate
eval_only = False  # evaluate once, then exit
eval_tasks = ''  # task files (tasks.py, as eval.py --task) scored at each eval, comma-separated: 'mc.jsonl,qa.jsonl'
eval_task_limit = 100  # records of each task scored at each eval (0: all): what the tasks cost
always_save_checkpoint = True  # save ckpt.pt at every eval (the best one also goes to best.pt)
plot = True  # draw out_dir/curves.png at each eval (plot.py), where matplotlib is installed
# 'scratch', 'resume' (from out_dir/ckpt.pt), or weights to fine-tune from, at iteration 0: 'gpt2', 'gpt2-medium',
# 'gpt2-large', 'gpt2-xl', another GPT-2 repository on the Hugging Face Hub, or a checkpoint file or out_dir
init_from = 'scratch'
seed = 1337
# wandb logging
wandb_log = False
wandb_project = 'gptforge'
wandb_run_name = 'gpt2'
# data
dataset = 'shakespeare'  # data/<dataset>/, made by python prepare.py <dataset>
gradient_accumulation_steps = 5 * 8  # micro-batches per optimizer step, over all processes
batch_size = 12  # sequences per micro-batch (chat datasets: as many conversations as make batch_size * block_size tokens)
block_size = 1024
mask_prompt = True  # chat datasets: the loss counts the assistant's tokens only (False: every token, to compare)
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, 0.1+ for fine-tuning
bias = False  # biases in Linears and LayerNorms?
# options from the NanoGPT speedrun (model.py's GPTConfig says what each does); these defaults are GPT-2
rope = False
rope_base = 10000.0
norm = 'layernorm'  # or 'rmsnorm'
qk_norm = False
activation = 'gelu'  # or 'relu2', or 'gelu_tanh' (the tanh approximation: GPT-2's own)
tie_embeddings = True
logit_softcap = 0.0  # 0: off
zero_init = False
# (a model from init_from brings its own n_layer, n_head, n_embd, bias; block_size may crop its context)
# LoRA: train low-rank adapters of the frozen weights of init_from's model
lora_rank = 0  # 0: off, every weight trains
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc'  # the Linears of each block that get adapters
# optimizer: AdamW, or Muon for the blocks' weight matrices and AdamW for the rest
optimizer = 'adamw'  # 'adamw' or 'muon'
learning_rate = 6e-4  # the maximum learning rate (of AdamW)
muon_lr = 0.02  # the maximum learning rate of Muon, which follows the same schedule
max_iters = 600000  # optimizer steps in all
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm, 0.0 to disable
skip_nonfinite = False  # skip steps whose gradients are inf/nan (checked every step) instead of stopping
# learning rate schedule: linear warmup, then down to min_lr at lr_decay_iters
decay_lr = True
lr_schedule = 'cosine'  # 'cosine', or 'wsd' (warmup-stable-decay: constant, then linear over the last cooldown_frac)
cooldown_frac = 0.4
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate/10 per Chinchilla
# system
backend = 'auto'  # DDP backend: 'auto' is nccl on CUDA, gloo on CPU
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' (bfloat16 where it is faster, else float32), 'float32', 'bfloat16', 'float16'
compile = None  # torch.compile the model; None means on for CUDA, off elsewhere
fsdp = False  # under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2), not DDP
activation_checkpointing = False  # recompute each Block's forward in the backward pass: less memory, ~1/3 more compute
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals(), _names_before_config)
# the values each numeric key may take (common.check_ranges)
RANGES = {**{key: '> 0' for key in ('eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps',
                                     'batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'rope_base')},
          **{key: '>= 0' for key in ('eval_task_limit', 'logit_softcap', 'lora_rank', 'learning_rate',
                                      'muon_lr', 'max_iters', 'weight_decay', 'grad_clip', 'warmup_iters',
                                      'lr_decay_iters', 'min_lr')},
          'dropout': '[0, 1)', 'lora_dropout': '[0, 1)', 'beta1': '[0, 1)', 'beta2': '[0, 1)', 'cooldown_frac': '(0, 1]',
          'lora_alpha': '> 0', 'seed': f'[0, {2 ** 63 - 1}]'}


def get_batch(data, batch_size, block_size, rng, device, mask_prompt=True):
    """Inputs x and next-token targets y, (B, T) each, and how many real (not padding) tokens x has: of a token
    stream, batch_size random windows; of a chat dataset's Conversations, whole conversations (y is -1 where
    nothing is trained)."""
    if isinstance(data, Conversations):
        x, y, n_tokens = data.sample(batch_size, block_size, rng, mask_prompt)
        xy = torch.from_numpy(np.stack([x, y]))  # (2, B, T)
    else:
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        windows = data[starts[:, None] + np.arange(block_size + 1)]  # (B, T+1), one read of the memmap
        windows = torch.from_numpy(windows.astype(np.int64))
        xy, n_tokens = torch.stack([windows[:, :-1], windows[:, 1:]]), batch_size * block_size
    if str(device).startswith('cuda'):  # pinned memory lets the copy overlap with the GPU's work
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[0], xy[1], n_tokens


def batch_rng(seed, *step):
    """The random generator of one batch, a function of (seed, step) alone: same data on 1 or N processes,
    and after a resume."""
    return np.random.default_rng((seed, *step))


def get_lr(it, cfg):
    """Linear warmup (non-zero at step 0), decay to min_lr at lr_decay_iters (cosine, or constant then
    linear for 'wsd'), then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    if cfg.lr_schedule == 'wsd':
        coeff = min(1.0, (1.0 - decay_ratio) / cfg.cooldown_frac)  # 1 until the cooldown, then down to 0
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 down to 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, ctx):
    """Mean loss over the same eval_iters batches of each split at every eval, so evals compare fairly."""
    out = {}
    model.eval()
    for split_id, (split, data) in enumerate(splits.items()):
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y, _ = get_batch(data, cfg.batch_size, cfg.block_size, batch_rng(cfg.seed, 1, split_id, k), device,
                                cfg.mask_prompt)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def optimizer_step(model, optimizers, scaler, grad_clip, skip_nonfinite=False):
    """After the micro-steps' backward passes: unscale and clip the gradients, step every optimizer (unless the
    gradients are not finite and skip_nonfinite), zero the gradients. -> whether the step was taken."""
    if grad_clip != 0.0 or skip_nonfinite:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    taken = not (skip_nonfinite and not torch.isfinite(grad_norm))  # a host sync, only with skip_nonfinite
    if taken:
        for optimizer in optimizers:
            scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return taken


def local(p):
    """This process's part of a parameter: its shard under FSDP, else all of it."""
    return p.to_local() if hasattr(p, 'to_local') else p  # a DTensor has to_local


def optimizer_state_bytes(optimizers):
    """The float32 state the optimizers will keep in this process: AdamW two moments per parameter, Muon one
    momentum buffer (under FSDP, for this process's shards)."""
    return sum((8 if isinstance(optimizer, torch.optim.AdamW) else 4) * local(p).numel()
               for optimizer in optimizers for group in optimizer.param_groups for p in group['params'])


def check_config(cfg):
    """Stop early, with the fix, on settings that would only fail later."""
    check_ranges(vars(cfg), RANGES)
    if cfg.wandb_log and not importlib.util.find_spec('wandb'):
        die("wandb_log=True needs wandb: pip install wandb (or leave wandb_log off)")
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:
        die(f"min_lr ({cfg.min_lr}) must be at most learning_rate ({cfg.learning_rate})")
    if not cfg.out_dir.strip() or os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        die(f"out_dir must name a directory, and '{cfg.out_dir}' is {'empty' if not cfg.out_dir.strip() else 'a file'}: "
            "pass --out_dir=DIR")
    if cfg.n_embd % cfg.n_head != 0:
        die(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}): "
            f"try n_head={math.gcd(cfg.n_embd, cfg.n_head)} or n_embd={cfg.n_embd // cfg.n_head * cfg.n_head or cfg.n_head}")
    for key, choices in (('norm', ('layernorm', 'rmsnorm')), ('activation', ('gelu', 'gelu_tanh', 'relu2')),
                         ('optimizer', ('adamw', 'muon')), ('lr_schedule', ('cosine', 'wsd')),
                         ('backend', ('auto', 'nccl', 'gloo')), ('compile', (None, True, False))):
        if getattr(cfg, key) not in choices:
            die(f"{key} must be one of {', '.join(map(str, choices))}, got '{getattr(cfg, key)}'")
    if cfg.rope and (cfg.n_embd // cfg.n_head) % 2:
        die(f"rope rotates pairs of coordinates: the head size n_embd / n_head ({cfg.n_embd // cfg.n_head}) must be even")
    targets = lora_settings(cfg)['targets']
    if cfg.lora_rank > 0 and (not targets or not set(targets) <= set(LORA_TARGETS)):
        die(f"lora_targets must name some of {','.join(LORA_TARGETS)}, got '{cfg.lora_targets}'")
    if cfg.fsdp and cfg.eval_tasks:
        die("eval_tasks are scored by rank 0 alone, which FSDP's sharded model can't do: leave eval_tasks empty "
            "and score the checkpoints with eval.py --task")
    if cfg.fsdp and cfg.dtype == 'float16':
        die("fsdp=True trains in bfloat16 or float32 (float16's GradScaler is DDP's): use --dtype=bfloat16")
    if cfg.lora_rank > 0 and cfg.init_from == 'scratch':
        die("LoRA adapts a trained model: set init_from to gpt2 (or another Hub repository, or a checkpoint), "
            "or lora_rank=0 to train from scratch")


def main(argv):
    cfg = SimpleNamespace(**load_config(DEFAULTS, argv))
    check_config(cfg)
    if cfg.eval_only and cfg.init_from == 'scratch' and os.path.exists(os.path.join(cfg.out_dir, 'ckpt.pt')):
        cfg.init_from = 'resume'  # the model to evaluate is the one there, not a random one
    if cfg.init_from != 'resume' and not cfg.eval_only and any(
            os.path.exists(os.path.join(cfg.out_dir, name)) for name in ('ckpt.pt', 'best.pt')):
        die(f"{cfg.out_dir} holds the checkpoint of an earlier run, which this run would write over: "
            "--init_from=resume continues it; to start anew, use another --out_dir or move it away first")

    # processes: one, or one per GPU (or CPU share) under torchrun
    ddp = int(os.environ.get('RANK', -1)) != -1
    device = pick_device(cfg.device)
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        backend = cfg.backend if cfg.backend != 'auto' else ('nccl' if device.startswith('cuda') else 'gloo')
        torch.distributed.init_process_group(backend=backend)
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        else:  # processes on one machine share its cores
            torch.set_num_threads(max(1, os.cpu_count() // int(os.environ['LOCAL_WORLD_SIZE'])))
        if cfg.gradient_accumulation_steps % world_size != 0:
            die(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the "
                f"number of processes ({world_size})")
    else:
        rank, world_size = 0, 1
    if cfg.fsdp and not ddp:
        die("fsdp=True shards the model across torchrun's processes: run under torchrun "
            "(torchrun --standalone --nproc_per_node=N train.py ...), or leave fsdp off")
    master = rank == 0  # only the master process logs and writes checkpoints
    accum_steps = cfg.gradient_accumulation_steps // world_size  # micro-batches per process per step
    device_type = device.split(':')[0]
    # 'auto' on a CPU is measured: by rank 0 alone (the others would share its cores), whose answer all take
    dtype = pick_dtype(cfg.dtype, device_type) if master or cfg.dtype != 'auto' else None
    if ddp:
        answer = [dtype]
        torch.distributed.broadcast_object_list(answer, src=0)
        dtype = answer[0]
    ctx = autocast_context(device_type, dtype)
    use_compile = cfg.compile if cfg.compile is not None else device_type == 'cuda'
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # chat: about as many
    if master:
        print(f"torch {torch.__version__}, device {device}, dtype {dtype}, compile {use_compile}, "
              f"{world_size} process(es), {torch.get_num_threads()} threads each")
        print(f"tokens per iteration will be: {tokens_per_iter:,}")

    meta, splits = open_dataset(cfg.dataset, cfg.block_size)  # meta: what the checkpoints record of the tokenizer
    tasks = [read_task(path.strip()) for path in cfg.eval_tasks.split(',') if path.strip()] if master else []

    # the model: new (its initialization seeded), the one in out_dir/ckpt.pt, or pretrained weights to fine-tune
    torch.manual_seed(cfg.seed)
    model, checkpoint, meta, source = model_to_train(cfg, meta, device, master)
    resume = cfg.init_from == 'resume'
    iter_num, best_val_loss = (checkpoint['iter_num'], float(checkpoint['best_val_loss'])) if resume else (0, float('inf'))
    model_args = asdict(model.config)
    task_tokenizer = Tokenizer(meta) if tasks else None  # the tokenizer of the data, special tokens included
    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.fsdp:  # before the optimizers, which then hold this process's shards
        shard_model(model, device_type, dtype)

    # GradScaler only does something for float16, whose gradients underflow without it
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    optimizers = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                            device_type, muon_lr=cfg.muon_lr if cfg.optimizer == 'muon' else 0.0)
    if master:
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        full = sum(p.numel() for name, p in model.named_parameters() if '.lora_' not in name)
        print(f"trainable parameters: {trainable:,} ({trainable / full:.2%}), optimizer state "
              f"{optimizer_state_bytes(optimizers) / 2 ** 20:,.1f} MiB"
              + (f" (full fine-tuning: {full:,}, AdamW {8 * full / 2 ** 20:,.1f} MiB)" if cfg.lora_rank > 0 else ''))
        params = [local(p) for p in model.parameters()]
        print(f"memory per process ({'FSDP' if cfg.fsdp else 'DDP' if ddp else 'one process'}): parameters "
              f"{sum(p.nbytes for p in params) / 2 ** 20:,.3f} MiB, gradients "
              f"{sum(p.nbytes for p in params if p.requires_grad) / 2 ** 20:,.3f} MiB, optimizer state "
              f"{optimizer_state_bytes(optimizers) / 2 ** 20:,.3f} MiB, activations "
              f"{'recomputed per Block' if cfg.activation_checkpointing else 'kept'}")
    if checkpoint is not None:
        try:
            for optimizer, key in zip(optimizers, ('optimizer', 'muon_optimizer')):
                if cfg.fsdp:
                    load_optimizer_state(model, optimizer, checkpoint[key])
                else:
                    optimizer.load_state_dict(checkpoint[key])
        except (ValueError, KeyError):  # nanoGPT also decays the embeddings; or the optimizer changed
            print("warning: the checkpoint's optimizer state has other parameter groups (nanoGPT's, or "
                  "another optimizer's): the optimizer starts afresh, so this resume is not exact")
        if 'scaler' in checkpoint:
            scaler.load_state_dict(checkpoint['scaler'])
    # a checkpoint saved at an eval has had this step's eval (a preemption checkpoint has not)
    preempted = checkpoint is not None and checkpoint.get('preempted', False)
    resumed_at = iter_num if checkpoint is not None and not preempted and not cfg.eval_only else None
    # with always_save_checkpoint off, ckpt.pt holds the best model until a preemption saves over it
    ckpt_is_best = checkpoint is not None and checkpoint.get('is_best', not preempted)
    # how far the run had got, for the metrics log: wall seconds and tokens trained on (older checkpoints: unknown)
    reached = (checkpoint.get('seconds'), checkpoint.get('tokens')) if resume else (0.0, 0)
    checkpoint = None  # free the memory

    raw_model = model  # the plain model: what is saved, evaluated for MFU, and configured
    if use_compile:
        model = torch.compile(model)
    if ddp and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[int(device[5:])] if device_type == 'cuda' else None)
    if cfg.wandb_log and master:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))
    peak_flops = measure_peak_flops(device, dtype) if master else 1.0
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            die(f"cannot make out_dir {cfg.out_dir} ({e.strerror or e}): pass another --out_dir")
    # out_dir/metrics.jsonl: every log line and eval, for plot.py; a resume drops the records it will redo
    metrics = MetricsLog(cfg.out_dir, iter_num if resume else None, *reached, plot=cfg.plot) \
        if master and not cfg.eval_only else None
    ckpt_path, best_path = os.path.join(cfg.out_dir, 'ckpt.pt'), os.path.join(cfg.out_dir, 'best.pt')
    # a LoRA checkpoint holds the adapters and names the model they adapt: the base's weights are not copied
    lora = lora_settings(cfg, base=source) if cfg.lora_rank > 0 else None

    def make_checkpoint(is_best, preempted=False):  # under FSDP every process gathers, and rank 0 gets the whole state
        if cfg.fsdp:
            state, opt_states = full_model_state(raw_model), [full_optimizer_state(raw_model, o) for o in optimizers]
        else:
            state, opt_states = raw_model.state_dict(), [opt.state_dict() for opt in optimizers]
        states = dict(zip(('optimizer', 'muon_optimizer'), opt_states))
        return {'model': lora_state_dict(state) if lora else state, 'lora': lora, **states,
                'model_args': model_args, 'iter_num': iter_num,
                'best_val_loss': best_val_loss, 'config': vars(cfg), 'meta': meta, 'init_from': source,
                'scaler': scaler.state_dict(), 'is_best': is_best, 'preempted': preempted,
                'tokens': trained(), 'seconds': metrics.elapsed() if metrics else None}

    # SIGTERM (preemption) and SIGINT (Ctrl-C): finish the step, save, exit cleanly
    stop_requests = []

    def request_stop(signum, frame):
        stop_requests.append(signum)
        if len(stop_requests) > 1:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)

    def next_batch(iter_num, micro_step):  # this process's share of step iter_num's global batch
        micro_index = rank * accum_steps + micro_step
        return get_batch(splits['train'], cfg.batch_size, cfg.block_size,
                         batch_rng(cfg.seed, 0, iter_num, micro_index), device, cfg.mask_prompt)

    x, y, n_tokens = next_batch(iter_num, 0)
    first_iter = iter_num
    t0 = run_start = time.time()
    # (time, iteration) at the last log lines, spanning an eval or more: the time left, evals included
    recent = deque([(t0, iter_num)], maxlen=max(10, math.ceil(cfg.eval_interval / cfg.log_interval) + 1))
    running_mfu, train_loss, stopped_by, last_log = -1.0, None, 'an error', iter_num
    loss_sum = torch.zeros((), device=device)
    tokens_seen = 0  # by this process since the last log line: real tokens, without a chat batch's padding
    tokens_total = metrics.tokens if metrics else 0  # by all processes up to the last log line, resumes included

    def trained():  # tokens trained on so far, by all processes (the others' as many as ours)
        return tokens_total + tokens_seen * world_size
    try:
        while True:
            lr = get_lr(iter_num, cfg) if cfg.decay_lr else cfg.learning_rate
            muon_lr = lr / cfg.learning_rate * cfg.muon_lr if cfg.learning_rate > 0 else cfg.muon_lr  # AdamW's schedule
            for optimizer, opt_lr in zip(optimizers, (lr, muon_lr)):
                for group in optimizer.param_groups:
                    group['lr'] = opt_lr

            if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only) \
                    and iter_num != resumed_at and (master or cfg.fsdp):  # FSDP: every rank joins the forwards
                losses = estimate_loss(model, splits, cfg, device, ctx)
                if cfg.fsdp:  # rank 0's figures decide for all whether to save, which they do together
                    torch.distributed.broadcast_object_list(answer := [losses], src=0)
                    losses = answer[0]
                line = f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                figures = {}  # what the model can do: acc_norm (multiple choice) or exact match (generation)
                for task in tasks:
                    results, _, _ = run_task(raw_model, task_tokenizer, task, cfg.eval_task_limit, device=device, ctx=ctx)
                    name = os.path.splitext(os.path.basename(task[0]))[0]
                    line += f", {name} {results['metric']} {results[results['metric']]:.4f}"
                    figures[f"{name}/{results['metric']}"] = results[results['metric']]
                if master:
                    print(line)
                if cfg.wandb_log and master:
                    wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                               'mfu': running_mfu * 100, **{f'tasks/{k}': v for k, v in figures.items()}})
                if not math.isfinite(losses['val']):
                    die(f"val loss is {losses['val']} at iteration {iter_num}: lower learning_rate or raise "
                        f"warmup_iters; the last good checkpoint in {cfg.out_dir} is kept")
                if metrics:
                    metrics.write(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], lr=lr, tokens=trained(),
                                  **figures)
                    metrics.draw()
                improved = losses['val'] < best_val_loss
                best_val_loss = min(best_val_loss, losses['val'])
                if iter_num > 0 and (improved or cfg.always_save_checkpoint) and not cfg.eval_only:
                    checkpoint = make_checkpoint(is_best=improved)
                    if master:
                        print(f"saving checkpoint to {cfg.out_dir}")
                        if save_checkpoint(checkpoint, ckpt_path):
                            ckpt_is_best = improved
                        if improved and cfg.always_save_checkpoint:  # ckpt.pt is the latest; keep the best apart
                            save_checkpoint(checkpoint, best_path)
                    checkpoint = None
            if cfg.eval_only or iter_num >= cfg.max_iters:
                stopped_by = 'max_iters'
                break

            # one optimizer step: forward and backward over accum_steps micro-batches
            # dropout's randomness, like the batches, is a function of (seed, step, process): resumes are exact
            torch.manual_seed(int(batch_rng(cfg.seed, 2, iter_num, rank).integers(2 ** 62)))
            step_loss = torch.zeros((), device=device)
            for micro_step in range(accum_steps):
                if cfg.fsdp:  # reduce-scatter the gradients only once, at the last micro-step
                    raw_model.set_requires_gradient_sync(micro_step == accum_steps - 1)
                elif ddp:  # average the gradients across processes only once, at the last micro-step
                    model.require_backward_grad_sync = (micro_step == accum_steps - 1)
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / accum_steps  # the gradients add up over micro-steps: make them a mean
                tokens_seen += n_tokens
                # fetch the next batch while the device works on this one
                x, y, n_tokens = next_batch(*((iter_num, micro_step + 1) if micro_step + 1 < accum_steps
                                              else (iter_num + 1, 0)))
                scaler.scale(loss).backward()
                step_loss += loss.detach()
            if optimizer_step(model, optimizers, scaler, cfg.grad_clip, cfg.skip_nonfinite):
                loss_sum += step_loss
            else:
                print(f"iter {iter_num}: gradients are not finite, step skipped")
            iter_num += 1

            stop = bool(stop_requests)
            if ddp:  # every process stops at the same step, whichever of them got the signal
                flag = torch.tensor(float(stop), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop = flag.item() > 0
            if master and device_type == 'cuda' and iter_num == first_iter + 3:  # warm: the steady state's peak
                print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2 ** 30:,.2f} GiB")
            if stop:
                checkpoint = make_checkpoint(is_best=False, preempted=True) if master or cfg.fsdp else None
                if master and not math.isfinite(loss_sum.item()):
                    print(f"stopped by a signal at iteration {iter_num}, not saved: the loss is not finite")
                elif master:
                    if not cfg.always_save_checkpoint and ckpt_is_best and os.path.exists(ckpt_path):
                        shutil.copyfile(ckpt_path, best_path + '.tmp')  # keep the best model as best.pt
                        os.replace(best_path + '.tmp', best_path)
                    if save_checkpoint(checkpoint, ckpt_path):
                        print(f"stopped by a signal at iteration {iter_num}: saved {ckpt_path}; "
                              f"continue with --init_from=resume")
                stopped_by = 'a signal'
                break

            if iter_num % cfg.log_interval == 0 and master:
                t1, steps = time.time(), iter_num - last_log  # (fewer than log_interval steps after a resume)
                dt = (t1 - t0) / steps
                t0, last_log = t1, iter_num
                loss = loss_sum.item() / steps  # .item() waits for the device: only here
                if not math.isfinite(loss):
                    die(f"loss is {loss} at iteration {iter_num}: lower learning_rate or raise warmup_iters; "
                        f"the last good checkpoint in {cfg.out_dir} is kept")
                tokens_per_step = tokens_seen * world_size / steps  # the other processes' as many as ours
                if iter_num >= 5 * cfg.log_interval:  # the first steps include warm-up and compilation
                    mfu = raw_model.estimate_mfu(tokens_per_step / cfg.block_size, dt, peak_flops * world_size,
                                                 cfg.block_size)
                    running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                tokens_total += tokens_seen * world_size
                train_loss = loss
                recent.append((t1, iter_num))
                eta = (t1 - recent[0][0]) / (iter_num - recent[0][1]) * (cfg.max_iters - iter_num)
                mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else '-'  # '-': not measured yet
                print(f"iter {iter_num}: loss {loss:.4f}, time {dt * 1000:.2f}ms, "
                      f"tok/s {tokens_per_step / dt:,.0f}, mfu {mfu_text}, eta {duration(eta)}")
                metrics.write(iter=iter_num, loss=loss, lr=lr, ms=dt * 1000, tok_s=tokens_per_step / dt,
                              mfu=running_mfu * 100 if running_mfu >= 0 else None, tokens=tokens_total)
            if iter_num % cfg.log_interval == 0:
                loss_sum.zero_()
                tokens_seen = 0
    finally:  # however the run ends: what it reached, where its files are, what to do next
        if metrics:
            summary(cfg.out_dir, iter_num, cfg.max_iters, train_loss, trained(), time.time() - run_start,
                    metrics.elapsed(), 'a second signal' if len(stop_requests) > 1 else stopped_by,
                    'chat_template' in meta)

    if ddp:  # leave together: a rank that tears down while rank 0 still evaluates and saves can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # a second Ctrl-C (or signal) while the first one's step finishes
        die("interrupted: nothing was saved after the last checkpoint")
    except SystemExit as e:  # under torchrun every rank stops alike (a missing dataset, say); rank 0 alone says why
        if isinstance(e.code, str) and 'RANK' in os.environ:
            # torchrun ends the ranks still running (SIGTERM) once one has left: they leave with the same code
            signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(1))
            if int(os.environ['RANK']) == 0:
                print(e.code, file=sys.stderr, flush=True)
            else:
                time.sleep(2)  # rank 0 leaves first, having said why
            os._exit(1)  # no teardown of the process group, which can abort when the other side is gone
        raise
