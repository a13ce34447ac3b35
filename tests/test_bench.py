import os
import re

import pytest

from conftest import SHAKESPEARE, gpt2_bpe_available, run


def test_bench_quick_mode_prints_its_table(tmp_path):
    out = run('bench.py', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4',
              '--gradient_accumulation_steps=2', '--vocab_size=65', '--train_steps=2', '--warmup_steps=1',
              '--sample_tokens=40', '--device=cpu', '--compile=False', '--dtype=float32', '--quantize=int8',
              cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if line.startswith('| ') and not line.startswith('| measure |')]
    names = [r.split(' | ')[0] for r in rows]
    assert names[0] == '| train tokens/s (batch 4x2)' and names[1].startswith('| train MFU')
    assert names[2] == names[3] == names[4] == '| sample tokens/s (batch 1, 40 new)' and len(rows) == 7
    assert "| float32 KV cache, PyTorch's defaults (F.linear, attention in float32) |" in rows[3]
    assert '| int8 weights, KV cache |' in rows[4]
    assert names[5] == names[6] == '| sample tokens/s against reading every weight once per token'
    rows.pop(3)  # then: float32 against full recompute, int8 against float32, each against its limit
    values = []
    for row in rows:
        cells = [c.strip() for c in row.strip('|').split('|')]
        assert float(cells[2].rstrip('%').replace(',', '')) > 0
        values.append(float(cells[4].rstrip('%').replace(',', '')))
    assert all(v > 0 for v in values) and values[4] == values[2] and values[5] == values[3]  # against the limit
    # the limit: every weight read once per token, counted by hand (train.py's default bias=False): each block's
    # 4 matrices and 2 norm weights, the final norm, the head (65 x 32, tied to the embedding)
    matrices = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 65 * 32
    norms, rows_of_matrices = 2 * 2 * 32 + 32, 2 * (96 + 32 + 128 + 32) + 65
    assert f'limit: {(matrices + norms) * 4 / 1e6:.3g} MB read at ' in rows[4]  # float32
    assert f'limit: {(matrices + 2 * rows_of_matrices + 4 * norms) / 1e6:.3g} MB read at ' in rows[5]  # int8, bf16 scales
    assert re.search(r'decode kernel: \w+, the fastest here for one row in float32', out)
    ratios = re.findall(r'\| ([\d.]+)x \|', out)
    assert len(ratios) == 6 and all(float(r) > 0 for r in ratios)


def test_bench_decode_prints_its_tables(tmp_path):
    out = run('bench_decode.py', '--n_layer=1', '--n_embd=64', '--n_head=2', '--vocab_size=128', '--budget=0.01',
              cwd=tmp_path).stdout
    kernels = re.findall(r'^\| ([a-zA-Z][^|]*?) \| ([\d.]+) \|', out, re.M)  # (the one-thread rates)
    names = [name for name, _ in kernels]
    assert names[0] == 'float32 sum (the memory)' and 'bfloat16 oneDNN' in names and 'int8 x int8 (torch._int_mm)' in names
    assert names[-2:] == ['bfloat16', 'float32']  # the attention table's rows
    assert all(float(rate) > 0 for _, rate in kernels)
    rows = re.findall(r'^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|', out, re.M)
    assert [r[0] for r in rows] == ['1', '4', '16', '64', '128'] and all(float(v) > 0 for r in rows for v in r[1:])


@pytest.mark.skipif(not (gpt2_bpe_available() and os.path.exists(SHAKESPEARE)), reason="needs the BPE files and tiny shakespeare")
def test_bench_prepare_quick_mode_prints_its_table(tmp_path):
    out = run('bench_prepare.py', '--mb=0.5', f'--source={SHAKESPEARE}', '--workdir=work', cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if re.match(r'\| [\d.]+ MB \|', line)]
    assert len(rows) == 2, out
    for row in rows:
        cells = [float(c.strip().rstrip('x').replace(',', '')) for c in row.strip('|').split('|')[1:]]
        assert len(cells) == 5 and all(c > 0 for c in cells)
    assert not (tmp_path / 'work').exists()  # the corpora are deleted
