import os
import time
from types import SimpleNamespace

import pytest
import torch

import common
import train
from common import load_config

DEFAULTS = {'learning_rate': 6e-4, 'max_iters': 100, 'compile': None, 'bias': False, 'out_dir': 'out', 'start': '\n'}


def test_files_then_overrides_in_order(tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text("import math\nmax_iters = 200\nlearning_rate = 1e-3 * math.sqrt(4)\n_scratch = 5\n")
    config = load_config(DEFAULTS, [str(config_file), '--max_iters=300', '--out_dir=out-x'])
    assert config == {**DEFAULTS, 'max_iters': 300, 'learning_rate': 2e-3, 'out_dir': 'out-x'}


def test_values_are_python_literals_widened_and_strings_taken_as_written():
    config = load_config(DEFAULTS, ['--learning_rate=1', '--bias=True', '--compile=false', '--start=a=b 1'])
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float
    assert config['bias'] is True
    assert config['start'] == 'a=b 1'  # a value may contain '='
    assert load_config(DEFAULTS, ['--compile=True'])['compile'] is True  # None default: any value
    assert load_config(DEFAULTS, ['--bias=false'])['bias'] is False
    assert load_config(DEFAULTS, ['--compile=false'])['compile'] is False  # not the (truthy) string 'false'
    assert load_config(DEFAULTS, ['--compile=none'])['compile'] is None
    assert load_config(DEFAULTS, ['--bias'])['bias'] is True  # a bare bool flag
    assert load_config(DEFAULTS, ['--compile'])['compile'] is True  # and a bare flag whose default is None


def test_only_the_block_of_defaults_makes_config_keys():
    namespace = {'GPT2_EOT': 50256, 'os': os}  # what a script has imported before its block
    before = set(namespace)
    namespace.update(max_iters=10, out_dir='out', compile=None, _private=1, helper=print)
    assert common.config_defaults(namespace, before) == {'max_iters': 10, 'out_dir': 'out', 'compile': None}
    assert 'GPT2_EOT' not in train.DEFAULTS and 'dataset' in train.DEFAULTS


@pytest.mark.parametrize('argv,message', [
    (['--learnig_rate=1'], "unknown config key 'learnig_rate'.*did you mean 'learning_rate'"),
    (['--max_iters=1.5'], "'max_iters' expects int"),
    (['--bias=yes'], "'bias' expects bool"),
    (['--max_iters'], "has no value"),
    (['config/does_not_exist.py'], "config file config/does_not_exist.py not found"),
])
def test_bad_config_is_a_one_line_error(argv, message):
    with pytest.raises(SystemExit, match=message):
        load_config(DEFAULTS, argv)


def test_config_file_errors_name_the_file_and_line(tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text("max_iters = 10\nlearning_rate = = 3\n")
    with pytest.raises(SystemExit, match=r"broken.py failed at line 2: SyntaxError"):
        load_config(DEFAULTS, [str(broken)])
    typo = tmp_path / 'typo.py'
    typo.write_text("max_iters = 10\nlr = 3\n")
    with pytest.raises(SystemExit, match="unknown config key 'lr'"):
        load_config(DEFAULTS, [str(typo)])


def test_every_shipped_config_loads():
    import glob
    configs = glob.glob(os.path.join(os.path.dirname(train.__file__), 'config', '*.py'))
    assert configs
    for path in configs:  # and passes train.py's checks (ranges, min_lr <= learning_rate when it decays, ...)
        train.check_config(SimpleNamespace(**load_config(train.DEFAULTS, [path])))


def test_lr_schedule():
    cfg = type('cfg', (), dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110,
                               lr_schedule='cosine', cooldown_frac=0.4))
    assert 0 < train.get_lr(0, cfg) < train.get_lr(5, cfg) < 1e-3  # warmup starts above zero
    assert train.get_lr(10, cfg) == pytest.approx(1e-3)  # peak after warmup
    assert train.get_lr(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the cosine
    assert train.get_lr(110, cfg) == pytest.approx(1e-4)
    assert train.get_lr(10_000, cfg) == 1e-4
    lrs = [train.get_lr(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically
    cfg.lr_schedule = 'wsd'  # warmup, stable until the last 40% of the 100 decay steps, then linear
    assert train.get_lr(69, cfg) == pytest.approx(1e-3) and train.get_lr(70, cfg) == pytest.approx(1e-3)
    assert train.get_lr(90, cfg) == pytest.approx((1e-3 + 1e-4) / 2)
    assert train.get_lr(110, cfg) == pytest.approx(1e-4)


def test_auto_dtype_on_a_cpu_is_the_one_that_trains_faster():
    """dtype 'auto' decides from a quick bf16 vs fp32 matmul; checked against what it stands for, the
    speed of training steps (a Linear's forward and backward under autocast), timed here independently."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 1024)
    x = torch.randn(2048, 1024)

    def seconds_per_step(dtype):
        ctx = common.autocast_context('cpu', dtype)
        for step in range(8):
            if step == 3:  # the first steps warm up the allocator and the kernels
                t0 = time.perf_counter()
            with ctx:
                loss = layer(x).float().square().mean()
            loss.backward()
        return (time.perf_counter() - t0) / 5

    speedup = seconds_per_step('float32') / seconds_per_step('bfloat16')
    if 0.8 < speedup < 1.6:
        pytest.skip(f"bf16 steps run {speedup:.2f}x as fast as fp32 here: too close to call either way")
    assert common.pick_dtype('auto', 'cpu') == ('bfloat16' if speedup >= 1.6 else 'float32'), f"speedup {speedup:.2f}"


def test_auto_dtype_on_a_cpu_takes_bf16_only_with_the_margin(monkeypatch):
    """The decision itself, for measured matmul speeds on either side of the 1.5x margin."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 instructions: 'auto' is float32 without measuring")
    for ratio, expected in ((0.55, 'float32'), (1.4, 'float32'), (1.6, 'bfloat16'), (10.0, 'bfloat16')):
        flops = {'float32': 100e9, 'bfloat16': ratio * 100e9}
        monkeypatch.setattr(common, 'measure_peak_flops', lambda device, dtype, *args: flops[dtype])
        common.cpu_bf16_is_faster.cache_clear()
        assert common.pick_dtype('auto', 'cpu') == expected, ratio
    common.cpu_bf16_is_faster.cache_clear()  # the next caller measures for real
