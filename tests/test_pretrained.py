"""GPT-2 weights from a Hugging Face Hub: a tiny repository written here in the Hub's own layout and
served from 127.0.0.1, checked against the model it was exported from."""
import json
import os
import struct

import pytest
import requests
import torch

import dataset
from conftest import gpt2_bpe_available, run
from checkpoint import load_model
from model import GPT, GPTConfig
from test_model import reference_logits

CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def write_safetensors(path, tensors):
    """The safetensors format, written by hand: an 8-byte little-endian header size, a JSON header of
    dtypes, shapes and byte offsets, then the raw little-endian data."""
    names = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16'}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {'dtype': names[tensor.dtype], 'shape': list(tensor.shape),
                        'data_offsets': [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)  # padded to 8 bytes, as the reference writer does
    path.write_bytes(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def publish(root, repo, model, prefix='', weights='model.safetensors', dtype=torch.float32, **config):
    """Write model as the Hub serves a GPT-2 repository: root/<repo>/resolve/main/{config.json, weights},
    Conv1D weights (in, out), causal-mask buffers; with prefix 'transformer.' as GPT2LMHeadModel saves
    itself (lm_head.weight included), with '' as GPT2Model (gpt2's own model.safetensors)."""
    c = model.config
    directory = root / repo / 'resolve' / 'main'
    directory.mkdir(parents=True)
    config = {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'n_layer': c.n_layer, 'n_head': c.n_head,
              'n_embd': c.n_embd, 'n_positions': c.block_size, 'n_ctx': c.block_size, 'vocab_size': c.vocab_size,
              'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5, **config}
    (directory / 'config.json').write_text(json.dumps(config))
    tensors = {}
    for name, value in model.state_dict().items():
        if name == 'lm_head.weight' and not prefix:
            continue
        name = name if name == 'lm_head.weight' else prefix + name.removeprefix('transformer.')
        tensors[name] = (value.t() if name.endswith(CONV1D) else value).to(dtype).contiguous()
    T = c.block_size
    for i in range(c.n_layer):
        tensors[f'{prefix}h.{i}.attn.bias'] = torch.tril(torch.ones(T, T)).view(1, 1, T, T).to(dtype)
        tensors[f'{prefix}h.{i}.attn.masked_bias'] = torch.tensor(-1e4).to(dtype)
    if weights == 'model.safetensors':
        write_safetensors(directory / weights, tensors)
    else:
        torch.save(tensors, directory / weights)


def tiny_gpt2(seed=0):
    """GPT-2's vocabulary (so its tokenizer applies), everything else tiny."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16, bias=True)).eval()


@pytest.fixture
def hub(http_server, tmp_path, monkeypatch):
    """HF_ENDPOINT at the local server, HF_HOME in tmp_path -> (the server's root directory, its state)."""
    url, root, state = http_server
    monkeypatch.setenv('HF_ENDPOINT', url)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    monkeypatch.delenv('HF_TOKEN', raising=False)
    return root, state


def assert_same_function(model, source, dtype=torch.float32, gelu='tanh'):
    """model computes source's function, with the GELU its config.json names (gelu_new: tanh)."""
    idx = torch.randint(source.config.vocab_size, (2, source.config.block_size))
    expected = reference_logits({k: v.to(dtype).float() for k, v in source.state_dict().items()}, source.config, idx,
                                gelu)
    torch.testing.assert_close(model.eval()(idx, idx)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('prefix,dtype', [('', torch.float32), ('transformer.', torch.bfloat16), ('', torch.float16)])
def test_hub_model_loads_as_exported_then_from_the_cache(hub, prefix, dtype):
    root, state = hub
    source = tiny_gpt2()
    publish(root, 'someone/tiny-gpt2', source, prefix=prefix, dtype=dtype)
    model, checkpoint = load_model('someone/tiny-gpt2')
    assert_same_function(model, source, dtype)
    assert checkpoint['meta'] == {'tokenizer': 'gpt2', 'vocab_size': 50257, 'dtype': 'uint16'}
    assert state['paths'] == ['/someone/tiny-gpt2/resolve/main/config.json',
                              '/someone/tiny-gpt2/resolve/main/model.safetensors']
    again, _ = load_model('someone/tiny-gpt2')  # from the cache: the server hears nothing
    assert len(state['paths']) == 2
    assert_same_function(again, source, dtype)


@pytest.mark.parametrize('activation', ['gelu_new', 'gelu_pytorch_tanh', 'gelu'])
def test_hub_models_use_the_gelu_their_config_names(hub, activation):
    """gelu_new (GPT-2's) is the tanh approximation, 'gelu' the exact one; the two differ here by far more than the
    1e-5 the logits must match to, so the test tells them apart."""
    root, _ = hub
    source = tiny_gpt2(3)
    with torch.no_grad():
        for block in source.transformer.h:
            block.mlp.c_fc.weight.mul_(30)  # pre-activations around 2-3, where the two GELUs differ most
            block.mlp.c_proj.weight.mul_(30)
        source.transformer.wte.weight.mul_(10)  # (the head too): the difference carried to the logits
    publish(root, f'test/tiny-{activation}', source, activation_function=activation)
    model, checkpoint = load_model(f'test/tiny-{activation}')
    gelu = 'exact' if activation == 'gelu' else 'tanh'
    assert checkpoint['model_args']['activation'] == ('gelu' if gelu == 'exact' else 'gelu_tanh')
    assert_same_function(model, source, gelu=gelu)
    idx = torch.randint(50257, (1, 32))
    other = reference_logits(source.state_dict(), source.config, idx, 'tanh' if gelu == 'exact' else 'exact')
    assert (model(idx, idx)[0] - other).abs().max() > 1e-4
    # saved and loaded again (a checkpoint records the activation), it stays the same function
    torch.save({'model': model.state_dict(), 'model_args': checkpoint['model_args'], 'meta': checkpoint['meta']},
               root / 'ckpt.pt')
    again, _ = load_model(str(root / 'ckpt.pt'))
    assert_same_function(again, source, gelu=gelu)


def test_pytorch_model_bin_when_the_repository_has_no_safetensors(hub):
    root, state = hub
    source = tiny_gpt2(1)
    publish(root, 'test/tiny-gpt2', source, prefix='transformer.', weights='pytorch_model.bin')
    model, _ = load_model('test/tiny-gpt2')
    assert_same_function(model, source)
    assert [p.rsplit('/', 1)[1] for p in state['paths']] == ['config.json', 'model.safetensors', 'pytorch_model.bin']
    load_model('test/tiny-gpt2')
    assert len(state['paths']) == 3  # the cached .bin, without asking for model.safetensors again


def test_a_truncated_download_is_never_used(hub, tmp_path, monkeypatch):
    root, state = hub
    monkeypatch.setattr(dataset.time, 'sleep', lambda seconds: None)  # no pauses between tries
    source = tiny_gpt2(2)
    publish(root, 'test/tiny-gpt2', source)
    weights = '/test/tiny-gpt2/resolve/main/model.safetensors'
    state['truncate'][weights] = 3  # every one of the three tries is cut in half (of what is left)
    with pytest.raises(SystemExit, match='after 3 tries'):
        load_model('test/tiny-gpt2')
    cache = tmp_path / 'hf_home' / 'gptforge' / 'test/tiny-gpt2'
    assert sorted(os.listdir(cache)) == ['config.json', 'model.safetensors.part', 'model.safetensors.part.etag']
    part_size, size = (cache / 'model.safetensors.part').stat().st_size, (root / weights.lstrip('/')).stat().st_size
    assert size // 2 <= part_size < size  # what arrived is kept, to resume from
    state['truncate'][weights] = 1  # cut once more, then the rest: the next load resumes the .part
    model, _ = load_model('test/tiny-gpt2')
    assert_same_function(model, source)
    resumed = [r for p, r in zip(state['paths'], state['ranges']) if p == weights][3:]
    assert len(resumed) == 2 and resumed[0] == f'bytes={part_size}-' and resumed[1] > resumed[0]
    assert sorted(os.listdir(cache)) == ['config.json', 'model.safetensors']


def test_bad_repositories_are_one_line_errors(hub, tmp_path):
    root, _ = hub
    proc = run('sample.py', '--init_from=nobody/nothing', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "no model 'nobody/nothing'" in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    source = tiny_gpt2()
    publish(root, 'test/deeper', source, n_layer=3)
    publish(root, 'test/llama', source, model_type='llama')
    publish(root, 'test/untied', source, tie_word_embeddings=False)
    publish(root, 'test/empty', source)
    os.remove(root / 'test' / 'empty' / 'resolve' / 'main' / 'model.safetensors')
    for repo, message in [('test/deeper', "do not fit a GPT-2 of its config.json: missing transformer.h.2"),
                          ('test/llama', 'only the GPT-2 architecture'), ('test/untied', 'tie_word_embeddings=False'),
                          ('test/empty', 'has neither model.safetensors nor pytorch_model.bin'),
                          ('no/such/repo', "no checkpoint or directory named 'no/such/repo'")]:
        with pytest.raises(SystemExit, match=message):
            load_model(repo)
    publish(root, 'test/damaged', source)
    load_model('test/damaged')
    cached = tmp_path / 'hf_home' / 'gptforge' / 'test' / 'damaged' / 'model.safetensors'
    cached.write_bytes(cached.read_bytes()[:-100])
    with pytest.raises(SystemExit, match='not a valid safetensors file .* delete it to download it again'):
        load_model('test/damaged')


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_sample_and_bench_from_the_hub(hub, tmp_path):
    root, _ = hub
    publish(root, 'test/tiny-gpt2', tiny_gpt2())
    out = run('sample.py', '--init_from=test/tiny-gpt2', '--num_samples=1', '--max_new_tokens=8', '--start=Hello',
              '--temperature=0', '--device=cpu', cwd=tmp_path).stdout
    assert out.startswith('Hello') and len(out) > len('Hello\n')
    out = run('bench.py', '--init_from=test/tiny-gpt2', '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=1',
              '--train_steps=1', '--warmup_steps=1', '--sample_tokens=4', '--lora_rank=2', '--device=cpu',
              cwd=tmp_path).stdout
    assert 'model 2x16 (2 heads), block 16, vocab 50257' in out
    assert '| trainable parameters | full fine-tuning' in out and 'LoRA rank 2' in out
    # and served, as OpenAI's completions API, under its Hub name
    from test_serve import start_server
    proc, url = start_server(str(tmp_path / 'out'), tmp_path / 'serve.log', '--init_from=test/tiny-gpt2')
    try:
        assert requests.get(url + '/v1/models', timeout=10).json()['data'][0]['id'] == 'test/tiny-gpt2'
        answer = requests.post(url + '/v1/completions', json={'prompt': 'Hello', 'max_tokens': 5, 'temperature': 0},
                               timeout=60).json()
        assert answer['usage']['completion_tokens'] == 5 and answer['choices'][0]['finish_reason'] == 'length'
    finally:
        proc.terminate()
        proc.wait(timeout=30)
