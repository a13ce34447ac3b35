import os
import re
import time

import pytest

from conftest import SHAKESPEARE, run


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs the tiny-shakespeare text offline")
def test_cpu_recipe_reaches_its_target_loss(tmp_path):
    """The README's main job: config/train_shakespeare_char_cpu.py to the README's val loss, 1.72 (here <= 1.80: seeds
    and dtypes move it by a few hundredths), in the README's 2 to 4 minutes on 2 cores: at most 240 s where dtype
    auto picks bfloat16 (measured 129 s on a Xeon with AMX, 136 s on an EPYC), 360 s in float32 (~4 minutes), with
    room for a shared machine."""
    os.makedirs(tmp_path / 'data' / 'shakespeare_char')
    os.symlink(SHAKESPEARE, tmp_path / 'data' / 'shakespeare_char' / 'input.txt')
    run('prepare.py', 'shakespeare_char', cwd=tmp_path)
    t0 = time.time()
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'config',
                          'train_shakespeare_char_cpu.py')
    out = run('train.py', config, cwd=tmp_path, timeout=900).stdout
    wall = time.time() - t0
    final = float(re.findall(r'val loss ([\d.]+)', out)[-1])
    print(f"cpu recipe: val loss {final:.4f} in {wall:.0f} s")
    assert final <= 1.80
    dtype = re.search(r'dtype (\w+)', out).group(1)
    assert wall <= (240 if dtype == 'bfloat16' else 360), f"{wall:.0f} s in {dtype}"
    run('sample.py', '--out_dir=out-shakespeare-char-cpu', '--num_samples=1', '--max_new_tokens=50', cwd=tmp_path)
