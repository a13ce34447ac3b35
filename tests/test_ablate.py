import json
import math
import re

import pytest

from conftest import run

TINY = "dataset = 'tiny_char'\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\nbatch_size = 8\n" \
       "gradient_accumulation_steps = 1\neval_iters = 2\nmax_iters = 100\nwarmup_iters = 10\ndevice = 'cpu'\n"


@pytest.mark.slow
def test_ablate_runs_each_option_on_and_off_and_prints_its_table(tmp_path, small_text):
    (tmp_path / 'input.txt').write_text(small_text, encoding='utf-8')
    run('prepare.py', 'tiny_char', '--input=input.txt', cwd=tmp_path)
    (tmp_path / 'base.py').write_text(TINY + "learning_rate = 3e-3\n")
    (tmp_path / 'fast.py').write_text(TINY + "activation = 'relu2'\noptimizer = 'muon'\nlearning_rate = 6e-3\n")
    out = run('ablate.py', '--baseline=base.py', '--speedrun=fast.py', '--seconds=0.5', '--options=relu2,muon',
              cwd=tmp_path).stdout
    rows = re.findall(r'^\| (.+?) \| ([\d.]+) \| (\d+) \| (\d+) \|$', out, re.M)
    assert [r[0] for r in rows] == ['GPT-2 recipe (baseline)', 'baseline + relu2', 'baseline + muon',
                                    'speedrun config', 'speedrun - relu2', 'speedrun - muon']
    untrained = math.log(json.loads((tmp_path / 'data' / 'tiny_char' / 'meta.json').read_text())['vocab_size'])
    assert all(int(steps) >= 10 for _, _, steps, _ in rows)
    assert all(0 < float(loss) < untrained - 1.0 for _, loss, _, _ in rows)  # every run learned
    # each run keeps its metrics in out-ablate/<run>, and one picture compares them
    assert 'the runs\' curves: out-ablate/curves.png' in out and (tmp_path / 'out-ablate' / 'curves.png').stat().st_size > 0
    assert (tmp_path / 'out-ablate' / 'baseline-relu2' / 'metrics.jsonl').exists()
    assert len(list((tmp_path / 'out-ablate').glob('*/metrics.jsonl'))) == 6
    bad = run('ablate.py', '--options=bogus', cwd=tmp_path, check=False)
    assert bad.returncode == 1 and 'unknown option(s) bogus' in bad.stderr
