"""
The kernels behind batch-1 decoding, each timed alone on this machine: what decode.py chooses among, and why
decoding reaches the fraction of bench.py's memory limit that it does.

    python bench_decode.py                                   # GPT-2 124M's Linears
    python bench_decode.py --n_layer=6 --n_embd=384 --vocab_size=65

1. One row through every Linear of the model (the head included), as read rates of the weights' bytes (GB/s):
   a float32 sum over as many bytes (the memory's read rate), then torch.mv, F.linear and oneDNN (decode.py's
   kernels) in each dtype, the int8 kernel (torch._weight_int8pack_mm, what --quantize=int8 uses, with bfloat16
   and float32 activations) and int8 x int8 (torch._int_mm), with one thread and with all of them.
2. By rows (1 to 128: a token, a server's batch, a prompt), one 4*n_embd x n_embd Linear: bfloat16 oneDNN, the
   int8 kernel, int8 dequantized then multiplied, and float16 F.linear against bfloat16's.
3. Attention for one query over 256 cached positions, bfloat16 and float32.
"""

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common import config_defaults, load_config
from decode import best_seconds, name_of

_names_before_config = set(globals())  # imports and the like: not config keys
# -----------------------------------------------------------------------------
n_layer = 12
n_embd = 768
n_head = 12
vocab_size = 50304
budget = 0.2  # seconds of timing per figure (the best pass of those that fit, at least 3)
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals(), _names_before_config)


def one_row_rates(cfg):
    """{(what, threads): GB/s} for one row through every Linear of the model."""
    C = cfg.n_embd
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * cfg.n_layer + [(cfg.vocab_size, C)]
    weights = {dtype: [torch.randn(shape, dtype=dtype) * 0.02 for shape in shapes]
               for dtype in (torch.bfloat16, torch.float32)}
    x = {dtype: {n: torch.randn(1, n, dtype=dtype) for n in (C, 4 * C)} for dtype in weights}
    int8 = [torch.randint(-127, 128, shape, dtype=torch.int8) for shape in shapes]
    scales = [torch.rand(shape[0], dtype=torch.bfloat16) for shape in shapes]
    x8 = {n: torch.randint(-127, 128, (1, n), dtype=torch.int8) for n in (C, 4 * C)}
    runs = {}
    for dtype, ws in weights.items():
        name = name_of(dtype)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
        runs[f'{name} torch.mv'] = (ws, lambda ws=ws, xs=x[dtype]: [torch.mv(w, xs[w.size(1)][0]) for w in ws])
        runs[f'{name} F.linear'] = (ws, lambda ws=ws, xs=x[dtype]: [F.linear(xs[w.size(1)], w) for w in ws])
        runs[f'{name} oneDNN'] = (ws, lambda ws=ws, ps=packed, xs=x[dtype]: [
            torch.ops.mkldnn._linear_pointwise(xs[w.size(1)], p, None, 'none', [], '') for w, p in zip(ws, ps)])
    runs['int8 kernel (bfloat16 activations)'] = (int8, lambda: [
        torch._weight_int8pack_mm(x[torch.bfloat16][w.size(1)], w, s) for w, s in zip(int8, scales)])
    scales32 = [s.float() for s in scales]
    runs['int8 kernel (float32 activations)'] = (int8, lambda: [
        torch._weight_int8pack_mm(x[torch.float32][w.size(1)], w, s) for w, s in zip(int8, scales32)])
    runs['int8 x int8 (torch._int_mm)'] = (int8, lambda: [torch._int_mm(x8[w.size(1)], w.t()) for w in int8])
    nbytes = sum(w.numel() * w.element_size() for w in weights[torch.float32])
    buffer = torch.randn(nbytes // 4)
    rates, threads = {}, torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        rates[('float32 sum (the memory)', n)] = nbytes / best_seconds(buffer.sum, cfg.budget) / 1e9
        for what, (ws, run) in runs.items():
            rates[(what, n)] = sum(w.numel() * w.element_size() for w in ws) / best_seconds(run, cfg.budget) / 1e9
    torch.set_num_threads(threads)
    return rates


def by_rows(cfg):
    """{rows: {what: ms}} for one 4*n_embd x n_embd Linear."""
    C = cfg.n_embd
    w = torch.randn(4 * C, C, dtype=torch.bfloat16) * 0.02
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    w8, s = torch.randint(-127, 128, (4 * C, C), dtype=torch.int8), torch.rand(4 * C, dtype=torch.bfloat16)
    w16 = w.half()
    table = {}
    for rows in (1, 4, 16, 64, 128):
        x = torch.randn(rows, C, dtype=torch.bfloat16)
        x16 = x.half()
        runs = {'bfloat16 oneDNN': lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, 'none', [], ''),
                'int8 kernel': lambda: torch._weight_int8pack_mm(x, w8, s),
                'int8 dequantized, then bfloat16': lambda: F.linear(x, w8.bfloat16()) * s,
                'bfloat16 F.linear': lambda: F.linear(x, w),
                'float16 F.linear': lambda: F.linear(x16, w16)}
        table[rows] = {what: best_seconds(run, cfg.budget / 4) for what, run in runs.items()}
    return table


def main(argv):
    cfg = SimpleNamespace(**load_config(DEFAULTS, argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Linears of {cfg.n_layer}x{cfg.n_embd}, "
          f"vocab {cfg.vocab_size}")
    rates = one_row_rates(cfg)
    threads = sorted({n for _, n in rates})
    print("\n| one row through every Linear | " + " | ".join(f"{n} thread(s), GB/s" for n in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for what in dict.fromkeys(w for w, _ in rates):
        print(f"| {what} | " + " | ".join(f"{rates[(what, n)]:.1f}" for n in threads) + " |")
    table = by_rows(cfg)
    names = list(table[1])
    print(f"\n| rows through a {4 * cfg.n_embd}x{cfg.n_embd} Linear | " + " | ".join(f"{n}, ms" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for rows, row in table.items():
        print(f"| {rows} | " + " | ".join(f"{row[n] * 1e3:.3f}" for n in names) + " |")
    head_size = cfg.n_embd // cfg.n_head
    print("\n| attention, one query over 256 positions | us |\n|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(1, cfg.n_head, n, head_size, dtype=dtype) for n in (1, 256, 256))
        print(f"| {name_of(dtype)} | "
              f"{best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), cfg.budget / 4) * 1e6:.1f} |")
    return rates, table


if __name__ == '__main__':
    main(sys.argv[1:])
