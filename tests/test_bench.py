import os
import re

import pytest

from conftest import SHAKESPEARE, gpt2_bpe_available, run


def test_bench_quick_mode_prints_its_table(tmp_path):
    out = run('bench.py', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
              '--gradient_accumulation_steps=2', '--vocab_size=65', '--train_steps=2', '--warmup_steps=1',
              '--sample_tokens=40', '--device=cpu', '--compile=False', cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if line.startswith('| ') and not line.startswith('| measure |')]
    names = [r.split(' | ')[0] for r in rows]
    assert names[0] == '| train tokens/s (batch 4x2)' and names[1].startswith('| train MFU')
    assert names[2] == '| sample tokens/s (batch 1, 40 new)' and len(rows) == 4
    assert names[3] == '| sample tokens/s if only the matrix-vector products ran'
    values = []
    for row in rows:
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert float(cells[2].rstrip('%').replace(',', '')) > 0
        values.append(float(cells[4].rstrip('%').replace(',', '')))
    assert all(v > 0 for v in values) and values[3] > values[2]  # the limit is above what decoding reaches
    ratios = re.findall(r'\| ([\d.]+)x \|', out)
    assert len(ratios) == 3 and all(float(r) > 0 for r in ratios)


@pytest.mark.skipif(not (gpt2_bpe_available() and os.path.exists(SHAKESPEARE)), reason="needs the BPE files and tiny shakespeare")
def test_bench_prepare_quick_mode_prints_its_table(tmp_path):
    out = run('bench_prepare.py', '--mb=0.5', f'--source={SHAKESPEARE}', '--workdir=work', cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if re.match(r'\| [\d.]+ MB \|', line)]
    assert len(rows) == 2, out
    for row in rows:
        cells = [float(c.strip().rstrip('x').replace(',', '')) for c in row.strip('|').split('|')[1:]]
        assert len(cells) == 5 and all(c > 0 for c in cells)
    assert not (tmp_path / 'work').exists()  # the corpora are deleted
