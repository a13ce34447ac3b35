"""
Generation at the speed this machine allows: the KV caches that make each new token one position of compute,
the Linear kernel and the attention dtype chosen by measuring the candidates here, and optional int8 weights.

    model.eval().to(torch.bfloat16)
    decode.prepare(model, quantize='')   # last, once the weights are final: 'int8' for int8 weights

Batch-1 decoding reads every weight once per token, so its speed is set by how fast a kernel reads weights for
one row, and that differs between machines: on a Xeon with AMX torch.mv read bfloat16 weights 1.4x faster than
F.linear; on an AMD EPYC (Zen 5) F.linear was 1.7x faster than torch.mv, and oneDNN's matmul on weights reordered
once into its own layout 1.6-2.9x faster than F.linear (bench_decode.py). So nothing is assumed: prepare()
times each kernel on the model's own weights, and attention for one query in the model's dtype and in float32,
once per process (a fraction of a second), and says what it chose.
"""

import sys
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

from dataset import die


class KVCache:
    """Keys and values of every layer for the positions seen so far, allocated once per generate(). Every row
    is at the same position (RowCache, below, holds rows at their own)."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.k = [None] * n_layer  # per layer: (B, nh, max_len, hs), allocated at first use
        self.v = [None] * n_layer
        self.pos = 0  # how many positions the cache holds

    def positions(self, T, device):
        """The positions of T new tokens: (T,)."""
        self.end = self.pos + T
        return torch.arange(self.pos, self.end, device=device)

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at the next positions -> (keys and values of every position so far, the
        attention mask, is_causal): the new queries see all cached positions, and their own causally."""
        if self.k[layer] is None:
            B, nh, _, hs = k.shape
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)  # only written positions are read
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        T = k.size(2)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos) \
            if self.pos > 0 and T > 1 else None
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask, self.pos == 0

    def advance(self, T):
        self.pos += T

    def repeat(self, n):
        """One cached row (a prompt) continued n ways: each layer's keys and values copied to n rows."""
        self.k = [k.expand(n, -1, -1, -1).contiguous() for k in self.k]
        self.v = [v.expand(n, -1, -1, -1).contiguous() for v in self.v]


class RowCache:
    """A server's keys and values: up to `rows` sequences decoded together, each at its own length (continuous
    batching). Rows [0, n) are in use; a sequence joins with its prompt's KVCache (load) and leaves by giving its
    row to the last one (move), so a step always runs on rows [0, n)."""

    def __init__(self, n_layer, rows, max_len):
        self.rows, self.max_len, self.n = rows, max_len, 0
        self.k = [None] * n_layer  # per layer: (rows, nh, max_len, hs), allocated at the first load
        self.v = [None] * n_layer
        self.lengths = [0] * rows  # positions each row holds

    def load(self, row, cache, length, src=0):
        """Put the first `length` positions of row `src` of a KVCache into row `row`."""
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            if self.k[layer] is None:  # zeros: the unused positions are masked, and 0 * a finite value is 0
                self.k[layer] = k.new_zeros(self.rows, k.size(1), self.max_len, k.size(3))
                self.v[layer] = v.new_zeros(self.rows, v.size(1), self.max_len, v.size(3))
            self.k[layer][row, :, :length] = k[src, :, :length]
            self.v[layer][row, :, :length] = v[src, :, :length]
        self.lengths[row] = length

    def move(self, src, dst):
        length = self.lengths[dst] = self.lengths[src]
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def positions(self, T, device):
        """The positions of T new tokens in each row in use: (n, T). Also the mask this step's layers share:
        a row's query at position p sees that row's positions up to p."""
        lengths = self.lengths[:self.n]
        self.pos = torch.tensor(lengths, device=device)[:, None] + torch.arange(T, device=device)
        self.end = max(lengths) + T
        self.mask = None if T == 1 and min(lengths) == max(lengths) else \
            (torch.arange(self.end, device=device) <= self.pos[:, :, None])[:, None]  # (n, 1, T, end); None: all seen
        return self.pos

    def update(self, layer, k, v):
        """Store k, v (n, nh, T, hs) at each row's next positions -> (keys, values, mask, is_causal)."""
        if self.n == 1:  # one row (one client): a slice, as KVCache writes
            start = self.lengths[0]
            self.k[layer][0, :, start:start + k.size(2)] = k[0]
            self.v[layer][0, :, start:start + v.size(2)] = v[0]
        else:
            rows = torch.arange(self.n, device=k.device)[:, None]
            self.k[layer][rows, :, self.pos] = k.transpose(1, 2)  # indexed (row, position): (n, T, nh, hs)
            self.v[layer][rows, :, self.pos] = v.transpose(1, 2)
        return self.k[layer][:self.n, :, :self.end], self.v[layer][:self.n, :, :self.end], self.mask, False

    def advance(self, T):
        for row in range(self.n):
            self.lengths[row] += T


# -----------------------------------------------------------------------------
# the Linear kernel for generation, chosen by measurement (model.Linear calls layer.kernel when no gradient is needed)

def linear_kernel(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def mv_kernel(layer, x):
    """torch.mv for a single row, F.linear for more."""
    if x.numel() != layer.in_features:
        return F.linear(x, layer.weight, layer.bias)
    y = torch.mv(layer.weight, x.reshape(-1))
    y = y if layer.bias is None else y + layer.bias
    return y.view(*x.shape[:-1], layer.out_features)


def onednn_kernel(layer, x):
    """oneDNN's matmul on layer.packed, the weight reordered once into oneDNN's blocked layout (a copy: the
    parameter stays as it is, for the state dict and a tied embedding), reordered again if the weight changed."""
    if layer.packed_from != weight_version(layer):
        pack([layer])
    return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, 'none', [], '')


KERNELS = {'onednn': onednn_kernel, 'linear': linear_kernel, 'mv': mv_kernel}


def weight_version(layer):
    """Changes whenever the weight does: in place (its version counter) or replaced (its storage, its dtype)."""
    return layer.weight._version, layer.weight.data_ptr(), layer.weight.dtype


def pack(layers):
    """Give each layer its oneDNN copy of the weight (a second copy of it in memory) -> None, or why oneDNN can't
    take these weights here (float16 needs AVX512-FP16 or AVX-NE-CONVERT, for one)."""
    try:
        for layer in layers:
            if getattr(layer, 'packed_from', None) != weight_version(layer):
                layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), 1)  # 1: sized for a row
                layer.packed_from = weight_version(layer)
    except (RuntimeError, AttributeError) as e:
        unpack(layers)
        return str(e).splitlines()[0]


def unpack(layers):
    for layer in layers:
        layer.__dict__.pop('packed', None)
        layer.__dict__.pop('packed_from', None)


def use_kernel(layers, name):
    """Set the kernel called name on every layer (oneDNN's copies of the weights made, or dropped)."""
    pack(layers) if name == 'onednn' else unpack(layers)
    for layer in layers:
        layer.kernel = KERNELS[name]


def best_seconds(run, budget=0.02, at_least=3):
    """The fastest of repeated runs of run(): as many as fit in budget seconds, at least at_least, after one to warm
    up (a small model's pass takes microseconds: one timing of it is mostly noise)."""
    run()
    best, start, n = float('inf'), time.perf_counter(), 0
    while n < at_least or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        run()
        best, n = min(best, time.perf_counter() - t0), n + 1
    return best


def kernel_seconds(kernel, layers):
    """Seconds one row takes through every layer with kernel."""
    xs = {n: torch.randn(1, 1, n, dtype=layers[0].weight.dtype) for n in {layer.in_features for layer in layers}}
    with torch.no_grad():
        return best_seconds(lambda: [kernel(layer, xs[layer.in_features]) for layer in layers])


_chosen = {}  # what was measured fastest for a model's shape and dtype, once per process: kernel, cache dtype


def name_of(dtype):
    return str(dtype).removeprefix('torch.')


def choose_kernel(layers, log):
    """The name of the fastest kernel for one row through these layers, timed on them (oneDNN's copies of the
    weights are made for the timing, and kept if it wins)."""
    key = (layers[0].weight.dtype, tuple(tuple(layer.weight.shape) for layer in layers))
    if key not in _chosen:
        refused = pack(layers)
        seconds = {name: kernel_seconds(kernel, layers) for name, kernel in KERNELS.items()
                   if name != 'onednn' or refused is None}
        _chosen[key] = min(seconds, key=seconds.get)
        log(f"decode kernel: {_chosen[key]}, the fastest here for one row in {name_of(key[0])} "
            f"(a pass over the weights: {', '.join(f'{n} {s * 1e3:.2f} ms' for n, s in seconds.items())}"
            f"{'; onednn refused: ' + refused if refused else ''})")
    return _chosen[key]


def attention_seconds(dtype, n_head, head_size, positions):
    """Seconds of attention for one query over positions cached keys and values in dtype (each head's)."""
    q, k, v = (torch.randn(1, n_head, n, head_size, dtype=dtype) for n in (1, positions, positions))
    return best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), budget=0.01)


def choose_cache_dtype(config, dtype, log):
    """float32 for the KV cache and attention over it if that measured faster than dtype (once per process for a
    model of this shape): on an AMD EPYC, one bfloat16 query over 256 positions took 123-132 us, float32 17-22."""
    key = ('attention', dtype, config.n_head, config.n_embd, config.block_size)
    if key not in _chosen:
        positions = min(256, config.block_size)
        seconds = {d: attention_seconds(d, config.n_head, config.n_embd // config.n_head, positions)
                   for d in (dtype, torch.float32)}
        _chosen[key] = min(seconds, key=seconds.get)
        log(f"KV cache and attention: {name_of(_chosen[key])}, the faster here for one query over {positions} "
            f"positions ({', '.join(f'{name_of(d)} {s * 1e6:.1f} us' for d, s in seconds.items())})")
    return _chosen[key]


def prepare(model, quantize='', compile=False, log=lambda line: print(line, file=sys.stderr)):
    """Make model (in eval mode, in its sampling dtype, on its device) generate as fast as this machine allows:
    int8 weights if quantize='int8', and on a CPU every Linear given the kernel measured fastest here, and the KV
    cache in float32 where attention measured faster in it; or with compile, the forward pass compiled (inductor
    chooses its kernels). Call it last: oneDNN's copies of the weights would not see later changes to the
    parameters."""
    if quantize == 'int8':
        quantize_int8(model)
    if compile:  # oneDNN's reordered weights can't go through inductor: it reorders them itself
        model.forward = torch.compile(model.forward, dynamic=True)
        return model
    dtype = model.transformer.wte.weight.dtype
    if model.transformer.wte.weight.device.type != 'cpu':
        return model
    if dtype != torch.float32:
        cache_dtype = choose_cache_dtype(model.config, dtype, log)
        for block in model.transformer.h:
            block.attn.cache_dtype = cache_dtype if cache_dtype != dtype else None
    # model.Linear, which has a kernel to set (model.py is not imported here: it imports this file)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(type(m), 'kernel')]
    if not layers:
        return model
    use_kernel(layers, choose_kernel(layers, log))
    return model


# -----------------------------------------------------------------------------
# int8 weights for generation

def check_quantize(quantize):
    if quantize not in ('', 'int8'):
        die(f"quantize must be '' or 'int8', got {quantize!r}")


# the int8 kernel reads the weights once per row: up to ~20 rows it beat dequantizing them for a bfloat16 matmul, at
# 128 rows (a prompt) it took about twice as long (bench_decode.py, 3072x768, AMD EPYC)
INT8_KERNEL_ROWS = 16


class Int8Linear(nn.Module):
    """A Linear whose weight is stored in int8 with one scale per output row (weight-only quantization):
    W ~ scales[:, None] * weight, half the bytes of bfloat16 to read per token. For a few rows the matmul
    dequantizes as it reads (torch._weight_int8pack_mm); on a CPU it computes in bfloat16 (the kernel's float32
    path was 10x slower on an AMD EPYC)."""

    def __init__(self, layer):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        w = layer.weight.detach().float()
        # each row's largest |w| maps to 127; the scale is rounded to bfloat16 first, so W is rounded against it
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).bfloat16()
        self.register_buffer('weight', (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer('scales', scales)
        self.bias = layer.bias

    def forward(self, x):
        cpu = x.device.type == 'cpu'
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16 if cpu else x.dtype)  # (B*T, in)
        if cpu and rows.size(0) <= INT8_KERNEL_ROWS and self.in_features % 16 == 0:  # (other widths: wrong results)
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        else:  # a prompt, or not a CPU: the weight dequantized for this call, then a plain matmul
            y = F.linear(rows, self.weight.to(rows.dtype)) * self.scales.to(rows.dtype)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def quantize_int8(model):
    """Replace every Linear of model (the head included) by an Int8Linear. For generation only: it can't train."""
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if isinstance(layer, nn.Linear):
                setattr(parent, name, Int8Linear(layer))
    return model
