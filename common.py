"""
Small pieces shared by train.py, sample.py and bench.py: the configuration loader, device and
dtype selection, and the peak FLOP/s measurement behind MFU. Errors a user can cause stop the
program with a one-line message (SystemExit), never a traceback.
"""

import ast
import difflib
import functools
import os
import re
import time
from contextlib import ExitStack

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dataset import die  # defined there, so that prepare.py runs without torch


# -----------------------------------------------------------------------------
# configuration: python train.py config/x.py --key=value ...

def load_config(defaults, argv):
    """Apply config files (run as Python) and --key=value overrides, in order, to a copy of defaults.

    Every key must exist in defaults and keep its type (an int is fine for a float; a default of
    None takes any value). Values are Python literals, except for str keys where they are taken as
    written: --out_dir=out-x, --start="a=b". A bool key (or one whose default is None, such as compile) without a
    value is set: --serve means --serve=True.
    """
    config = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if not eq and key in defaults and (defaults[key] is None or isinstance(defaults[key], bool)):
                raw = 'True'  # a bare --flag turns a bool key on: python sample.py --serve
            elif not eq:
                die(f"'{arg}' has no value: write --{key}=VALUE")
            _set(config, defaults, key, _parse_value(raw, defaults.get(key)), arg)
        else:
            for key, value in _run_config_file(arg).items():
                _set(config, defaults, key, value, arg)
    return config


def config_defaults(namespace, names_before):
    """A script's config keys: the plain values it defined after names_before (the names it had when its block of
    defaults began), so that a constant it imported (GPT2_EOT, say) never becomes a key."""
    return {k: v for k, v in namespace.items() if k not in names_before and not k.startswith('_')
            and isinstance(v, (int, float, bool, str, type(None)))}


def check_ranges(config, ranges):
    """Stop with a one-line error at the first key whose value is outside its range. ranges: key -> the range as
    it is written in mathematics, '> 0', '>= 0', '[0, 1)', '(0, 1]' ...; nan and infinities are in none."""
    for key, allowed in ranges.items():
        value = config[key]
        finite = value == value and abs(value) != float('inf')
        if allowed.startswith(('>', '<')):
            op, bound = allowed.split()
            bound = ast.literal_eval(bound)  # an int stays an int: 2**64 - 1 is not 2.0**64
            inside = finite and {'>': value > bound, '>=': value >= bound, '<': value < bound, '<=': value <= bound}[op]
        else:
            low, high = (ast.literal_eval(b.strip()) for b in allowed[1:-1].split(','))
            inside = finite and (low < value if allowed[0] == '(' else low <= value) and \
                (value < high if allowed[-1] == ')' else value <= high)
        if not inside:
            die(f"{key} must be {'in ' if allowed[0] in '([' else ''}{allowed}, got {value!r}")


def _parse_value(raw, default):
    if isinstance(default, str):
        return raw
    if (default is None or isinstance(default, bool)) and raw.lower() in ('true', 'false', 'none'):
        return {'true': True, 'false': False, 'none': None}[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # left as a string: the type check below says what was expected


def _run_config_file(path):
    if not os.path.isfile(path):
        die(f"config file {path} not found (config files are Python, e.g. config/train_shakespeare_char.py;"
            " overrides are written --key=value)")
    namespace = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)
    except Exception as e:  # the file is the user's Python: any error in it is theirs to fix
        line = getattr(e, 'lineno', None) or (e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else '?')
        die(f"config file {path} failed at line {line}: {type(e).__name__}: {e}")
    # keep plain values: skip modules, functions and private names the file used along the way
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not callable(v) and type(v).__name__ != 'module'}


def _set(config, defaults, key, value, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults.keys(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        die(f"unknown config key '{key}' (from {source}){hint}")
    default = defaults[key]
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if default is not None and type(value) is not type(default):
        die(f"config key '{key}' expects {type(default).__name__} (like {default!r}), "
            f"got {type(value).__name__} {value!r} (from {source})")
    config[key] = value


# -----------------------------------------------------------------------------
# device and dtype

def pick_device(device):
    """'auto' -> cuda, then mps, then cpu. A device that isn't there is an error, not a fallback."""
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    device_type = device.split(':')[0]
    if device_type == 'cuda' and not torch.cuda.is_available():
        die(f"device '{device}' asked for, but this PyTorch sees no CUDA GPU: use --device=cpu (or auto)")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        die(f"device '{device}' asked for, but MPS is not available here: use --device=cpu (or auto)")
    if device_type not in ('cpu', 'cuda', 'mps') or not re.fullmatch(r'[a-z]+(:\d+)?', device):
        die(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype, device_type):
    """'auto' -> bfloat16 where it is faster than float32 (on a CPU: measured), else float32. float16 only when asked."""
    if dtype == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float32'
        if device_type == 'cpu':
            return 'bfloat16' if cpu_bf16_is_faster() else 'float32'
        return 'float32'  # mps: bfloat16 needs macOS 14+; ask for it with --dtype=bfloat16
    if dtype not in ('float32', 'bfloat16', 'float16'):
        die(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if dtype == 'float16' and device_type == 'cpu' and not cpu_has_fast_fp16():
        die("float16 on a CPU without AVX512-FP16 or AVX-NE-CONVERT is far slower than the other dtypes: use bfloat16 "
            "or float32 (or auto)")
    return dtype


def cpu_has_fast_fp16():
    """Whether oneDNN takes float16 on this CPU (it needs AVX512-FP16 or AVX-NE-CONVERT). Without it, on an AMD EPYC,
    a 64-row float16 matmul ran 16x slower than bfloat16 (one row, as in decoding, was as fast: too little to offer
    float16 for prompts or training)."""
    try:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_bf16_is_faster(margin=1.5):
    """Whether bfloat16 matmuls run at least margin times as fast as float32 ones on this CPU.

    CPUs that report bf16 instructions differ too much for a flag to tell: measured with the same
    PyTorch, bf16 matmuls ran ~10x faster than fp32 on a Xeon with AMX, and ~0.5x as fast on one with
    AVX512-BF16 but no AMX, where bf16 made training 0.6x and sampling 0.45x as fast. The margin
    covers the casts that autocast adds around every matmul. Takes ~0.1 s, once per process.
    """
    try:  # oneDNN's check for bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    size, seconds = 1024, 0.03  # large enough for the matmul kernels' full speed, quick enough to run at start
    bf16 = measure_peak_flops('cpu', 'bfloat16', size, seconds)
    return bf16 >= margin * measure_peak_flops('cpu', 'float32', size, seconds)


class autocast_context:
    """Mixed precision for training and evaluation: float32 weights, matmuls in dtype. Reusable: `with ctx:`."""

    def __init__(self, device_type, dtype):
        self.device_type, self.dtype = device_type, dtype

    def __enter__(self):
        self.stack = ExitStack()
        if self.dtype != 'float32':
            self.stack.enter_context(torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype)))
        if self.device_type == 'cpu' and self.dtype == 'bfloat16':
            # measured on CPU: the flash-attention kernel's backward is 2x slower in bf16 than in fp32, while
            # the plain (math) attention runs its matmuls in bf16: the CPU recipe trains ~8% faster with it
            self.stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def measure_peak_flops(device, dtype, size=2048, seconds=0.3):
    """FLOP/s of a large square matmul in dtype on device: the peak that MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    a @ b  # warm up
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    synchronize(device)
    return 2 * size ** 3 * n / (time.perf_counter() - t0)


def synchronize(device):
    """Wait for queued GPU work, so that a timer measures it (a no-op on CPU)."""
    device_type = str(device).split(':')[0]
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()
