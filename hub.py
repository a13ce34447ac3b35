"""
Files of a model repository on the Hugging Face Hub: config.json, the weights (and tokenizer.json, which
tokenizer.py reads), downloaded once into a local cache, and a reader of the safetensors format that never
unpickles anything.

    server: $HF_ENDPOINT, default https://huggingface.co (a private repository also needs $HF_TOKEN)
    cache:  $HF_HOME/gptforge/<repo>/, HF_HOME defaulting to ~/.cache/huggingface

model.py (from_pretrained) turns these into a GPT; this file knows nothing about the architecture.
"""

import json
import math
import os

import numpy as np

from dataset import die, download  # no torch at import: prepare.py fetches tokenizers through here

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # in order of preference: the first needs no pickle
SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64',
                      'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool'}


def endpoint():
    return os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')


def cache_dir(repo):
    home = os.environ.get('HF_HOME') or os.path.join(os.path.expanduser('~'), '.cache', 'huggingface')
    return os.path.join(home, 'gptforge', *repo.split('/'))


def fetch_file(repo, filename):
    """The path of one file of a Hub repository, from the cache or downloaded into it; None if the repository
    lacks it. Only complete files enter the cache (dataset.download renames them when done), and a cached
    file is used without asking the server: a second load works offline."""
    directory = cache_dir(repo)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    token = os.environ.get('HF_TOKEN')
    if os.path.exists(path) or download(f'{endpoint()}/{repo}/resolve/main/{filename}', path, missing_ok=True,
                                        headers=token and {'Authorization': f'Bearer {token}'}):
        return path
    return None


def fetch_config(repo):
    """config.json of a Hub repository, as a dict."""
    path = fetch_file(repo, 'config.json')
    if path is None:
        die(f"no model '{repo}' here or on {endpoint()} (no file or directory of that name, and the Hub has no "
            f"{repo}/config.json): check the name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, owner/name; "
            "a private repository needs HF_TOKEN) or the checkpoint's path")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path} is not a readable config.json ({e}): delete it to download it again")


def fetch(repo):
    """(config.json as a dict, {name: tensor}) of a Hub repository, from the cache or downloaded into it."""
    import torch
    config = fetch_config(repo)
    cached = [name for name in WEIGHT_FILES if os.path.exists(os.path.join(cache_dir(repo), name))]
    weights_path = next((path for path in (fetch_file(repo, name) for name in cached or WEIGHT_FILES) if path), None)
    if weights_path is None:
        die(f"{endpoint()}/{repo} has neither {' nor '.join(WEIGHT_FILES)}: only repositories with PyTorch "
            "weights in one of those files load")
    if weights_path.endswith('.safetensors'):
        return config, read_safetensors(weights_path)
    try:
        return config, torch.load(weights_path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f"{weights_path} is not a readable PyTorch file ({type(e).__name__}): delete it to download it again")


def read_safetensors(path):
    """{name: tensor} of a .safetensors file, without pickle.

    The format: an 8-byte little-endian header length n, n bytes of JSON mapping each name to its
    dtype, shape and [begin, end) byte offsets into the data that follows, raw and little-endian
    (as this machine's numbers are: x86 and ARM). The tensors are views of a copy-on-write memory
    map, so only what is used gets read from disk.
    """
    import torch
    size = os.path.getsize(path)
    try:
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            if not 0 < n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode='c', offset=8 + n) if size > 8 + n else np.empty(0, np.uint8)
        tensors = {}
        for name, info in header.items():
            if name == '__metadata__':
                continue
            dtype, shape = getattr(torch, SAFETENSORS_DTYPES[info['dtype']]), info['shape']
            begin, end = info['data_offsets']
            count = math.prod(shape)
            if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
                raise ValueError(f"{name}'s bytes [{begin}, {end}) do not hold {info['dtype']} {shape}")
            tensors[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count
                             else torch.empty(0, dtype=dtype)).view(shape)
        return tensors
    except (ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        die(f"{path} is not a valid safetensors file ({type(e).__name__}: {e}): delete it to download it again")
