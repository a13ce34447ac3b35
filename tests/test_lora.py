"""Fine-tuning: from a Hub model or another run's checkpoint, fully or with LoRA adapters."""
import copy
import os
import re

import pytest
import torch

from conftest import gpt2_bpe_available, run
from checkpoint import load_model
from model import LORA_TARGETS, GPT, LoRALinear, add_lora, merge_lora
from tokenizer import Tokenizer
from test_model import tiny_config
from test_pretrained import hub, publish, tiny_gpt2  # noqa: F401 (fixture)
from test_train import TINY, prepared  # noqa: F401 (fixture)


def val_losses(out):
    return [float(v) for v in re.findall(r'step \d+: train loss [\d.]+, val loss ([\d.]+)', out)]


def test_lora_starts_as_the_base_model_and_merging_keeps_its_function():
    torch.manual_seed(0)
    base = GPT(tiny_config()).eval()
    idx = torch.randint(37, (2, 16))
    expected, _ = base(idx, idx)
    model = add_lora(copy.deepcopy(base), rank=4, alpha=8.0, targets=LORA_TARGETS).eval()
    assert torch.equal(model(idx, idx)[0], expected)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all('.lora_' in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B, four Linears per block, two blocks
    [optimizer] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(trainable)  # the adapters only

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('lora_B'):
                p.normal_(std=0.1)
    unmerged, _ = model(idx, idx)
    unmerged_step, _ = model(idx[:1, :1])  # a single row: Linear's torch.mv path
    assert not torch.allclose(unmerged, expected, atol=1e-3)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(model(idx, idx)[0], unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(idx[:1, :1])[0], unmerged_step, atol=1e-5, rtol=1e-5)


def test_the_adapters_contribution_is_x_a_b_times_alpha_over_rank():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 12)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * (8.0 / 4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x[:1, :1]), expected[:1, :1], atol=1e-5, rtol=1e-5)  # a single row too


def test_fine_tuning_another_runs_checkpoint_fully_and_with_lora(prepared):
    cwd = prepared
    args = ['--dataset=tiny_char', '--eval_interval=10', '--log_interval=5', '--dtype=float32', *TINY,
            '--gradient_accumulation_steps=1']
    trained = run('train.py', '--out_dir=base', '--max_iters=10', *args, cwd=cwd).stdout
    # full fine-tuning: the same weights at iteration 0, so the same eval batches give the same val loss
    full = run('train.py', '--out_dir=full', '--init_from=base', '--max_iters=10', *args, cwd=cwd).stdout
    assert val_losses(full)[0] == val_losses(trained)[-1]
    assert 'step 0: train loss' in full and 'trainable parameters: ' in full
    # LoRA on a checkpoint: the adapters name the base by its absolute path
    lora = run('train.py', '--out_dir=lora', '--init_from=base/ckpt.pt', '--max_iters=10', '--lora_rank=4',
               '--lora_dropout=0.1', *args, cwd=cwd).stdout
    losses = val_losses(lora)
    assert losses[0] == val_losses(trained)[-1] and losses[-1] < losses[0]
    checkpoint = torch.load(cwd / 'lora' / 'ckpt.pt', weights_only=True)
    assert checkpoint['lora'] == {'rank': 4, 'alpha': 16.0, 'dropout': 0.1, 'targets': list(LORA_TARGETS),
                                  'base': str(cwd / 'base' / 'ckpt.pt')}
    sampled = run('sample.py', '--out_dir=lora', '--num_samples=2', '--max_new_tokens=20', cwd=cwd).stdout
    assert sampled.count('---------------') == 2


@pytest.mark.parametrize('args,message', [
    (['--init_from=scratch', '--lora_rank=4'], 'LoRA adapts a trained model'),
    (['--init_from=base', '--lora_rank=4', '--lora_targets=c_attn,wte'], 'lora_targets must name some of'),
    (['--init_from=test/hub-gpt2'], "the vocabulary of test/hub-gpt2 (50257 tokens) is not the one of dataset 'tiny_char'"),
    (['--init_from=test/hub-gpt2', '--block_size=64'], 'has a context of 32 tokens: use --block_size=32 or less'),
])
def test_bad_fine_tuning_settings_are_one_line_errors(prepared, hub, args, message):  # noqa: F811
    cwd = prepared
    publish(hub[0], 'test/hub-gpt2', tiny_gpt2())
    load_model('test/hub-gpt2')  # into the cache, so that no progress bar joins the error on stderr
    proc = run('train.py', '--dataset=tiny_char', '--out_dir=out', *TINY, *args, cwd=cwd, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def hub_model_and_data(hub, tmp_path, small_text):  # noqa: F811
    """A tiny GPT-2 on the test Hub (test/tiny-gpt2), and a dataset 'tiny' in its tokenizer in tmp_path -> (that
    model, train.py's arguments that fine-tune it on the dataset)."""
    root, _ = hub
    source = tiny_gpt2()
    publish(root, 'test/tiny-gpt2', source)
    (tmp_path / 'input.txt').write_text(small_text, encoding='utf-8')
    run('prepare.py', 'tiny', '--input=input.txt', cwd=tmp_path)
    # small batches: the logits of GPT-2's vocabulary are most of the work
    return source, ['--dataset=tiny', '--init_from=test/tiny-gpt2', '--block_size=16', '--batch_size=4',
                    '--eval_iters=2', '--eval_interval=5', '--log_interval=5', '--learning_rate=3e-2',
                    '--warmup_iters=0', '--decay_lr=False', '--dtype=float32', '--device=cpu']


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_lora_fine_tuning_of_a_hub_model(hub_model_and_data, tmp_path, monkeypatch):
    source, args = hub_model_and_data
    args = [*args, '--gradient_accumulation_steps=1']
    lora_args = [*args, '--lora_rank=4', '--lora_alpha=8']
    out = run('train.py', *lora_args, '--out_dir=lora', '--max_iters=10', cwd=tmp_path).stdout
    # 2 blocks x rank 4 x (c_attn 16+48, c_proj 16+16, c_fc 16+64, c_proj 64+16); in full, wpe cropped to 16
    assert 'trainable parameters: 2,048 (0.25%), optimizer state 0.0 MiB (full fine-tuning: 810,960, AdamW 6.2 MiB)' in out
    assert len(val_losses(out)) == 3  # (a random base leaves LoRA little to learn: the char test sees it learn)

    # the checkpoint: adapters and the name of their base, a fraction of a full fine-tuning's checkpoint
    run('train.py', *args, '--out_dir=full', '--max_iters=1', '--eval_interval=1', cwd=tmp_path)
    lora_size, full_size = os.path.getsize(tmp_path / 'lora' / 'ckpt.pt'), os.path.getsize(tmp_path / 'full' / 'ckpt.pt')
    print(f"LoRA checkpoint {lora_size:,} bytes, full fine-tuning {full_size:,} bytes")
    assert lora_size < full_size / 50
    checkpoint = torch.load(tmp_path / 'lora' / 'ckpt.pt', weights_only=True)
    assert checkpoint['lora']['base'] == 'test/tiny-gpt2' and all('.lora_' in k for k in checkpoint['model'])

    # the base weights did not move; the adapters did
    model, _ = load_model(str(tmp_path / 'lora'))
    state = model.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(state[name], value[:len(state[name])]), name  # (wpe cropped to block_size)
    assert all(state[k].abs().sum() > 0 for k in checkpoint['model'] if k.endswith('lora_B'))

    # resumes exactly: 5 steps, then 5 more, give the same adapters as 10 in one go
    run('train.py', *lora_args, '--out_dir=halves', '--max_iters=5', cwd=tmp_path)
    resumed = run('train.py', *lora_args, '--out_dir=halves', '--init_from=resume', '--max_iters=10',
                  cwd=tmp_path).stdout
    assert 'resuming from halves at iteration 5' in resumed
    halves = torch.load(tmp_path / 'halves' / 'ckpt.pt', weights_only=True)
    for key, value in checkpoint['model'].items():
        assert torch.equal(value, halves['model'][key]), key
    proc = run('train.py', *lora_args, '--out_dir=halves', '--init_from=resume', '--lora_rank=8', cwd=tmp_path,
               check=False)
    assert 'has lora_rank=4, this run asks for 8' in proc.stderr and 'Traceback' not in proc.stderr

    # sampling merges the adapters, with the base from the cache: no server needed
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    out = run('sample.py', '--out_dir=lora', '--num_samples=1', '--max_new_tokens=12', '--start=ROMEO:',
              '--temperature=0', '--dtype=float32', cwd=tmp_path).stdout
    tok = Tokenizer(checkpoint['meta'])
    encode, decode = tok.encode, tok.decode
    merged = merge_lora(model).eval()
    greedy = merged.generate(torch.tensor([encode('ROMEO:')]), 12, temperature=0)[0, len(encode('ROMEO:')):]
    assert out == 'ROMEO:' + decode(greedy.tolist()) + '\n'
