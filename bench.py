"""
Measure training and sampling speed of a model configuration, each next to a plain baseline
measured in the same run (absolute times drift on shared machines; ratios don't):

    python bench.py config/train_shakespeare_char_cpu.py
    python bench.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --vocab_size=65 --sample_tokens=256
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50304 --train_steps=0
    python bench.py --init_from=gpt2 --block_size=256 --batch_size=4 --gradient_accumulation_steps=1 --lora_rank=8

Training: tokens/s and MFU in the chosen dtype, eager and torch.compile'd (unless --compile=False),
against float32 eager.
Sampling: tokens/s of one sample from a 1-token prompt, KV cache and weights in dtype (and the Linear kernel
decode.py measures fastest here), against float32 generation that re-runs the whole context for every token
(nanoGPT's generate); and against the physical limit of batch-1 decoding: reading every weight once per token
at the memory bandwidth measured here, the ratio being the fraction reached. --quantize=int8 adds int8 weights;
with compile, the decode step compiled.
init_from (as in train.py: gpt2, a Hub repository, a checkpoint) measures that model instead of a new
one. With a chat dataset (--dataset=NAME, prepared from conversations), training is also measured on its
conversations, counting real tokens only, next to a token stream. With lora_rank > 0, training is LoRA's
against full fine-tuning, both in dtype, with the trainable parameters and the memory AdamW's state takes.
Otherwise the data is random tokens: speed does not depend on them.
"""

import copy
import json
import os
import re
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

import decode
import train
from common import autocast_context, die, load_config, measure_peak_flops, pick_device, pick_dtype, synchronize
from checkpoint import load_model, lora_settings, model_config
from model import GPT, add_lora, merge_lora
from dataset import GPT2_META, load_meta, open_split

DEFAULTS = {
    **train.DEFAULTS,
    'vocab_size': 0,  # 0: the dataset's (from data/<dataset>/meta.json), or GPT-2's padded 50304
    'train_steps': 10,  # timed optimizer steps per training measurement (0 skips training)
    'warmup_steps': 3,  # untimed steps first (compilation, allocator warm-up)
    'sample_tokens': 256,  # new tokens per sampling measurement (0 skips sampling)
    'baseline': True,  # also measure the float32 / full-recompute baselines
    'quantize': '',  # 'int8': sampling with int8 weights too (sample.py --quantize=int8)
    'profile': False,  # print the PyTorch profiler's top entries for each KV-cache sample (run again, after timing it)
    'serve_clients': '',  # e.g. '1,4,16': a server's aggregate tokens/s with that many clients at once (CPU)
}


def vocab_size_of(cfg):
    if cfg.vocab_size:
        return cfg.vocab_size
    try:
        return load_meta(f'data/{cfg.dataset}')['vocab_size']
    except SystemExit:
        return 50304


def train_speed(cfg, model, device, dtype, use_compile, lora_rank=0, data=None):
    """(tokens/s, MFU, trainable parameters, bytes of AdamW state) of train_steps optimizer steps, as
    train.py takes them, on data (a chat dataset's Conversations: tokens/s counts its real tokens, not the
    padding) or random tokens."""
    model = model.to(device)
    if lora_rank > 0:
        add_lora(model, lora_rank, cfg.lora_alpha, cfg.lora_dropout, lora_settings(cfg)['targets'])
    optimizers = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                            device.split(':')[0], cfg.muon_lr if cfg.optimizer == 'muon' else 0.0)
    step_model = torch.compile(model) if use_compile else model
    ctx = autocast_context(device.split(':')[0], dtype)
    if data is None:
        data = np.random.default_rng(cfg.seed).integers(0, model.config.vocab_size, 100_000).astype(np.int64)
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=(dtype == 'float16'))
    accum, tokens = cfg.gradient_accumulation_steps, 0
    for step in range(cfg.warmup_steps + cfg.train_steps):
        if step == cfg.warmup_steps:
            synchronize(device)
            t0, tokens = time.perf_counter(), 0
        for micro_step in range(accum):
            x, y, n_tokens = train.get_batch(data, cfg.batch_size, cfg.block_size,
                                             train.batch_rng(cfg.seed, step, micro_step), device)
            tokens += n_tokens
            with ctx:
                _, loss = step_model(x, y)
            scaler.scale(loss / accum).backward()
        train.optimizer_step(model, optimizers, scaler, cfg.grad_clip)
    synchronize(device)
    dt = (time.perf_counter() - t0) / cfg.train_steps
    peak = measure_peak_flops(device, dtype)
    mfu = model.estimate_mfu(tokens / cfg.train_steps / cfg.block_size, dt, peak, cfg.block_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(t.numel() * t.element_size() for optimizer in optimizers
                      for state in optimizer.state.values() for t in state.values())
    return tokens / cfg.train_steps / dt, mfu, trainable, state_bytes


def sample_speed(cfg, model, device, dtype, use_cache, quantize='', compile=False, prepare=True):
    """tokens/s of one sample of sample_tokens new tokens after a 1-token prompt. With the KV cache the model is
    decode.prepare()'d as sample.py does it (int8 weights if quantize, the kernels measured fastest here) unless
    prepare=False; without it, it is plain nanoGPT generation. -> (tokens/s, the bytes each token reads, the memory's
    read bandwidth measured right after: a shared machine's speed drifts, so the limit is measured with its run)"""
    model = model.to(device).eval().to(getattr(torch, dtype))
    if use_cache and prepare:
        decode.prepare(model, quantize, compile, log=print)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    list(model.generate_stream(prompt, 4, use_cache=use_cache))  # warm up
    synchronize(device)
    t0 = time.perf_counter()
    for _ in model.generate_stream(prompt, cfg.sample_tokens, use_cache=use_cache):
        pass
    synchronize(device)
    tok_s = cfg.sample_tokens / (time.perf_counter() - t0)
    nbytes = bytes_per_token(model)
    bandwidth = read_bandwidth(nbytes, device) if use_cache and prepare else None
    if cfg.profile and use_cache:  # where a token's time goes (a run of its own: the profiler slows what it watches)
        with torch.profiler.profile() as profiler:
            for _ in model.generate_stream(prompt, cfg.sample_tokens):
                pass
        print(f"{dtype}{' ' + quantize if quantize else ''}, {cfg.sample_tokens} tokens:\n" +
              profiler.key_averages().table(sort_by='self_cpu_time_total', row_limit=8))
    return tok_s, nbytes, bandwidth


def bytes_per_token(model):
    """The bytes batch-1 decoding reads per token: every weight once, except the embedding tables, of which it
    reads one row (a tied head is counted, as the head)."""
    tensors = {id(t): t for m in model.modules() if not isinstance(m, (nn.Embedding, GPT))
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_bandwidth(nbytes, device, repeats=10):
    """Bytes/s at which this machine reads nbytes from memory: the best of repeats sums over a float32 buffer of that
    size (float32: the fastest reduction measured; bfloat16's sum read ~0.6x as fast on an AMD EPYC)."""
    buffer = torch.randn(max(1, nbytes // 4), device=device)
    seconds = decode.best_seconds(lambda: (buffer.sum(), synchronize(device)), budget=0, at_least=repeats)
    return buffer.numel() * 4 / seconds


def serve_speed(cfg, model, dtype, clients):
    """Serving: for each number of clients, that many streamed completions of sample_tokens tokens sent at
    once to a server (sample.py --serve, started here on the model) and the same requests one at a time ->
    {clients: (tokens/s one at a time, tokens/s together, [times to first token], [times between tokens])}."""
    import http.client
    import subprocess
    import tempfile
    import threading
    with tempfile.TemporaryDirectory() as out_dir:
        vocab = model.config.vocab_size  # a tokenizer for the model: GPT-2's, or one character per id
        meta = dict(GPT2_META) if vocab >= GPT2_META['vocab_size'] else \
            {'tokenizer': 'char', 'vocab_size': vocab, 'chars': [chr(0x4e00 + i) for i in range(vocab)], 'dtype': 'uint16'}
        torch.save({'model': model.state_dict(), 'model_args': asdict(model.config), 'meta': meta},
                   os.path.join(out_dir, 'ckpt.pt'))
        log_path = os.path.join(out_dir, 'server.log')
        with open(log_path, 'w') as log:  # (a file, not a pipe: the server's request log must never block it)
            server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                    'sample.py'), f'--out_dir={out_dir}', '--serve',
                                       '--port=0', f'--dtype={dtype}', f'--device={cfg.device}',
                                       f'--max_batch={max(clients)}'], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = None
            while url is None:  # its first line says where it listens
                found = re.search(r'on (http://[\d.]+:\d+)/v1', open(log_path).read())
                url = found and found.group(1)
                if server.poll() is not None:
                    die(f"the server did not start:\n{open(log_path).read()}")
                time.sleep(0.1)
            prompt = meta['chars'][0] if meta['tokenizer'] == 'char' else 'The'
            host, port = url.removeprefix('http://').split(':')

            def one(times):  # one streamed request -> tokens generated; times: when each piece came
                t0 = time.perf_counter()
                body = json.dumps({'prompt': prompt, 'max_tokens': cfg.sample_tokens, 'temperature': 1.0,
                                   'stream': True, 'stream_options': {'include_usage': True}})
                connection = http.client.HTTPConnection(host, port, timeout=600)
                connection.request('POST', '/v1/completions', body, {'Content-Type': 'application/json'})
                tokens = 0
                for line in connection.getresponse():  # each event as it comes (a line is read when it arrives)
                    if line.startswith(b'data: {'):
                        event = json.loads(line[6:])
                        if event['choices']:
                            times.append(time.perf_counter() - t0)
                        tokens = event.get('usage', {}).get('completion_tokens', tokens)
                connection.close()
                return tokens

            one([])  # warm up
            results = {}
            for n in clients:
                t0 = time.perf_counter()
                alone = sum(one([]) for _ in range(n)) / (time.perf_counter() - t0)
                times, tokens = [[] for _ in range(n)], [0] * n
                threads = [threading.Thread(target=lambda i=i: tokens.__setitem__(i, one(times[i]))) for i in range(n)]
                t0 = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                together = sum(tokens) / (time.perf_counter() - t0)
                results[n] = (alone, together, [t[0] for t in times if t],
                              [b - a for t in times for a, b in zip(t, t[1:])])
            return results
        finally:
            server.terminate()
            server.wait()


def main(argv):
    cfg = SimpleNamespace(**load_config(DEFAULTS, argv))
    train.check_config(cfg)
    decode.check_quantize(cfg.quantize)
    device = pick_device(cfg.device)
    device_type = device.split(':')[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    use_compile = cfg.compile if cfg.compile is not None else device_type == 'cuda'
    if cfg.init_from == 'scratch':
        base = None
        config = model_config(cfg, vocab_size_of(cfg))
    else:  # init_from's model, its context cropped to block_size
        base = merge_lora(load_model(cfg.init_from, cfg.out_dir, dropout=cfg.dropout)[0])
        base.crop_block_size(min(cfg.block_size, base.config.block_size))
        cfg.block_size, config = base.config.block_size, base.config

    def new_model():  # the same weights for every measurement
        torch.manual_seed(cfg.seed)
        return GPT(config) if base is None else copy.deepcopy(base)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; model "
          f"{config.n_layer}x{config.n_embd} ({config.n_head} heads), block {config.block_size}, "
          f"vocab {config.vocab_size}, {(base or GPT(config)).get_num_params() / 1e6:.1f}M parameters")
    fast_name = f"{dtype}{' compiled' if use_compile else ''}"
    rows = []  # (measure, baseline name, baseline value, ours name, ours value)
    if cfg.train_steps > 0:
        batch = f"batch {cfg.batch_size}x{cfg.gradient_accumulation_steps}"
        if cfg.lora_rank > 0:
            # against full fine-tuning of the same model, in the same dtype
            tok_s, _, trainable, state_bytes = train_speed(cfg, new_model(), device, dtype, use_compile, cfg.lora_rank)
            full = train_speed(cfg, new_model(), device, dtype, use_compile) if cfg.baseline else (None,) * 4
            lora_name, full_name = f"LoRA rank {cfg.lora_rank}, {fast_name}", f"full fine-tuning, {fast_name}"
            rows.append((f"train tokens/s ({batch})", full_name, full[0], lora_name, tok_s))
            rows.append(("trainable parameters", full_name, full[2], lora_name, trainable))
            rows.append(("AdamW state, MiB", full_name, full[3] and full[3] / 2 ** 20, lora_name, state_bytes / 2 ** 20))
        else:
            base_tok_s, base_mfu, _, _ = train_speed(cfg, new_model(), device, 'float32', False) if cfg.baseline \
                else (None,) * 4
            # eager, and compiled unless --compile=False: compiling pays off in long runs only (it takes a minute)
            for compiled in [False, True] if cfg.compile is not False else [False]:
                name = f"{dtype}{' compiled' if compiled else ' eager'}"
                tok_s, mfu, _, _ = train_speed(cfg, new_model(), device, dtype, compiled)
                rows.append((f"train tokens/s ({batch})", 'float32 eager', base_tok_s, name, tok_s))
                rows.append((f"train MFU (of the measured {dtype} peak)", 'float32 eager, of fp32 peak', base_mfu,
                             name, mfu))
        data_dir = os.path.join('data', cfg.dataset)
        if os.path.exists(os.path.join(data_dir, 'train_mask.bin')):  # a chat dataset: its conversations too
            conversations = open_split(data_dir, 'train', load_meta(data_dir)['dtype'], cfg.block_size)
            stream = train_speed(cfg, new_model(), device, dtype, False)[0]
            rows.append((f"train tokens/s on {cfg.dataset}'s conversations (not counting padding)",
                         f"{dtype} eager, a token stream", stream, f"{dtype} eager, whole conversations",
                         train_speed(cfg, new_model(), device, dtype, False, data=conversations)[0]))
    if cfg.sample_tokens > 0:
        tok_s, nbytes, bandwidth = sample_speed(cfg, new_model(), device, dtype, use_cache=True)
        base_tok_s = sample_speed(cfg, new_model(), device, 'float32', use_cache=False)[0] if cfg.baseline else None
        rows.append((f"sample tokens/s (batch 1, {cfg.sample_tokens} new)", 'float32 full recompute', base_tok_s,
                     f"{dtype} KV cache", tok_s))
        plain = sample_speed(cfg, new_model(), device, dtype, use_cache=True, prepare=False)[0]
        rows.append((f"sample tokens/s (batch 1, {cfg.sample_tokens} new)",
                     f"{dtype} KV cache, PyTorch's defaults (F.linear, attention in {dtype})", plain,
                     f"{dtype} KV cache, decode.py's measured choices", tok_s))
        # the physical limit of batch-1 decoding: reading every weight once per token; the ratio is the fraction reached
        samples = [(f"{dtype} KV cache", tok_s, nbytes, bandwidth)]
        if cfg.quantize:
            q_tok_s, q_bytes, q_bandwidth = sample_speed(cfg, new_model(), device, dtype, use_cache=True,
                                                         quantize=cfg.quantize)
            rows.append((f"sample tokens/s (batch 1, {cfg.sample_tokens} new)", f"{dtype} KV cache", tok_s,
                         f"{cfg.quantize} weights, KV cache", q_tok_s))
            samples.append((f"{cfg.quantize} weights, KV cache", q_tok_s, q_bytes, q_bandwidth))
        for name, speed, size, rate in samples:
            print(f"memory read bandwidth after {name}: {rate / 1e9:.1f} GB/s (a float32 sum over {size / 1e6:.3g} MB)")
            rows.append(("sample tokens/s against reading every weight once per token",
                         f"limit: {size / 1e6:.3g} MB read at {rate / 1e9:.1f} GB/s", rate / size, name, speed))
        if use_compile:  # the decode step compiled (inductor's own kernels) against eager with the measured kernel
            rows.append((f"sample tokens/s (batch 1, {cfg.sample_tokens} new)", f"{dtype} KV cache", tok_s,
                         f"{dtype} KV cache, compiled", sample_speed(cfg, new_model(), device, dtype, True,
                                                                     compile=True)[0]))

    if cfg.serve_clients:
        clients = [int(n) for n in cfg.serve_clients.split(',')]
        latencies = []
        for n, (alone, together, first, between) in serve_speed(cfg, new_model(), dtype, clients).items():
            rows.append((f"serve tokens/s, {n} client(s) of {cfg.sample_tokens} tokens", 'one at a time', alone,
                         'together (continuous batching)', together))
            latencies.append((n, *(np.percentile(v, q) * 1000 for v in (first, between) for q in (50, 95))))

    def fmt(v, is_mfu):
        return '-' if v is None else (f"{v * 100:.3g}%" if is_mfu else f"{v:,}" if isinstance(v, int) else f"{v:,.1f}")
    print("\n| measure | baseline | baseline value | gptforge | gptforge value | ratio |")
    print("|---|---|---|---|---|---|")
    for what, base_name, base, ours_name, ours in rows:
        is_mfu = 'MFU' in what
        ratio = f"{ours / base:.2{'f' if ours >= 0.1 * base else 'g'}}x" if base and not is_mfu else '-'  # MFUs: other peaks
        print(f"| {what} | {base_name} | {fmt(base, is_mfu)} | {ours_name} | {fmt(ours, is_mfu)} | {ratio} |")
    if cfg.serve_clients:
        print("\n| clients | time to first token, median | p95 | time between tokens, median | p95 |\n|---|---|---|---|---|")
        for n, *ms in latencies:
            print(f"| {n} | " + " | ".join(f"{v:,.1f} ms" for v in ms) + " |")
    return rows


if __name__ == '__main__':
    main(sys.argv[1:])
