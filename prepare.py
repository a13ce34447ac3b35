"""
Turn a text into the token streams train.py reads:
    data/<name>/train.bin, val.bin  raw token ids, uint16 (uint32 if the vocabulary needs it), for np.memmap
    data/<name>/meta.json           tokenizer, vocab_size, dtype (and the characters, for 'char')

    python prepare.py shakespeare_char      # tiny shakespeare, one token per character
    python prepare.py shakespeare           # the same text in GPT-2 BPE tokens
    python prepare.py NAME --input=PATH_OR_URL [--tokenizer=gpt2|char] [--val_fraction=0.1]

The text is data/<name>/input.txt; when that is missing it is downloaded from the dataset's URL.
The first (1 - val_fraction) of the text is the training split, the rest the validation split.
This file is also the one place that builds a tokenizer from meta.json (get_tokenizer).
"""

import argparse
import json
import os
import time

import numpy as np
import requests

from common import die

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
DATASETS = {  # name -> (where the text comes from, tokenizer)
    'shakespeare_char': (SHAKESPEARE_URL, 'char'),
    'shakespeare': (SHAKESPEARE_URL, 'gpt2'),
}
GPT2_VOCAB_SIZE = 50257


# -----------------------------------------------------------------------------
# tokenizers

def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken downloads its files once; offline, it needs a cache
        die(f"could not load the GPT-2 BPE files ({type(e).__name__}): connect to the internet once, "
            "or set TIKTOKEN_CACHE_DIR to a directory that holds them")


def get_tokenizer(meta):
    """(encode, decode) for a dataset's meta: encode(str) -> list of ids, decode(ids) -> str."""
    if meta['tokenizer'] == 'char':
        chars = meta['chars']
        stoi = {ch: i for i, ch in enumerate(chars)}

        def encode(text):
            unknown = set(text) - stoi.keys()
            if unknown:
                die(f"characters {''.join(sorted(unknown))!r} are not in this character vocabulary; "
                    "use only characters of the training text")
            return [stoi[ch] for ch in text]
        return encode, lambda ids: ''.join(chars[i] for i in ids)
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode
    die(f"unknown tokenizer {meta['tokenizer']!r} in meta.json: expected 'char' or 'gpt2'")


def load_meta(data_dir):
    """The dataset's meta.json; a directory without one holds GPT-2 tokens, as in nanoGPT."""
    path = os.path.join(data_dir, 'meta.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if os.path.exists(os.path.join(data_dir, 'meta.pkl')):  # nanoGPT's, which we don't unpickle
        die(f"{data_dir} has nanoGPT's meta.pkl but no meta.json: run python prepare.py "
            f"{os.path.basename(data_dir)} --input=<its input.txt> to write meta.json")
    return {'tokenizer': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE, 'dtype': 'uint16'}


def checkpoint_meta(checkpoint):
    """The meta of the data a model was trained on: our checkpoints (and Hub models) carry it; nanoGPT's
    name the dataset whose meta.json to read."""
    return checkpoint.get('meta') or load_meta(os.path.join('data', checkpoint.get('config', {}).get('dataset', '')))


def token_dtype(vocab_size):
    return 'uint16' if vocab_size <= 2 ** 16 else 'uint32'


# -----------------------------------------------------------------------------
# getting the text

def download(url, path, retries=3, timeout=30, headers=None, missing_ok=False):
    """Stream url to path, through a temporary file so an interrupted download never looks complete.

    Returns True when done. An HTTP 4xx (no such file) stops with an error, or returns False with missing_ok.
    """
    from tqdm import tqdm
    tmp_path = f'{path}.{os.getpid()}.part'  # one per process: two downloads of one file never mix
    for attempt in range(1, retries + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as response:
                response.raise_for_status()
                total = int(response.headers.get('content-length', 0)) or None
                with open(tmp_path, 'wb') as f, tqdm(total=total, unit='B', unit_scale=True,
                                                     desc=f"downloading {os.path.basename(path)}") as bar:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                # urllib3 2 raises on a short body itself; older ones don't (a compressed body has another length)
                if total and bar.n != total and 'content-encoding' not in response.headers:
                    raise requests.ConnectionError(f"the connection closed after {bar.n} of {total} bytes")
            os.replace(tmp_path, path)
            return True
        except requests.HTTPError as e:
            if e.response.status_code < 500:  # 404 and friends won't change on a retry
                if missing_ok:
                    return False
                die(f"could not download {url}: HTTP {e.response.status_code}: check the URL")
            error = e
        except requests.RequestException as e:
            error = e
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        if attempt < retries:
            time.sleep(attempt)  # a short, growing pause before trying again
    die(f"could not download {url} after {retries} tries ({type(error).__name__}): check the URL and "
        f"the network, or save the file yourself as {path}")


def get_text(name, input_path, data_dir):
    """The text to tokenize: --input (file or URL), else data/<name>/input.txt, else the known URL."""
    if input_path and input_path.startswith(('http://', 'https://')):
        url, path = input_path, os.path.join(data_dir, os.path.basename(input_path.rstrip('/')) or 'input.txt')
    elif input_path:
        url, path = None, input_path
    else:
        url, path = DATASETS.get(name, (None, None))[0], os.path.join(data_dir, 'input.txt')
    if not os.path.exists(path):
        if url is None:
            die(f"no text for dataset '{name}': {path} does not exist; pass --input=PATH_OR_URL")
        download(url, path)
    elif url is not None:
        print(f"using {path} (delete it to download {url} again)")
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        die(f"{path} is not UTF-8 text (byte {e.start}): convert it, e.g. iconv -t utf-8")
    except IsADirectoryError:
        die(f"{path} is a directory: pass a text file")
    if not text:
        die(f"{path} is empty: there is nothing to train on")
    return text


# -----------------------------------------------------------------------------

def write_atomic(path, write):
    """Write through a temporary file and rename, so a reader sees the old file or the new one."""
    tmp_path = path + '.tmp'
    with open(tmp_path, 'wb') as f:
        write(f)
    os.replace(tmp_path, path)


def prepare(name, input_path=None, tokenizer=None, val_fraction=0.1, data_root='data'):
    data_dir = os.path.join(data_root, name)
    os.makedirs(data_dir, exist_ok=True)
    tokenizer = tokenizer or DATASETS.get(name, (None, 'char' if name.endswith('_char') else 'gpt2'))[1]
    if tokenizer not in ('char', 'gpt2'):
        die(f"unknown tokenizer '{tokenizer}': use char or gpt2")
    if not 0.0 < val_fraction < 1.0:
        die(f"val_fraction must be between 0 and 1, got {val_fraction}")
    text = get_text(name, input_path, data_dir)

    if tokenizer == 'char':
        meta = {'tokenizer': 'char', 'vocab_size': 0, 'chars': sorted(set(text))}
        meta['vocab_size'] = len(meta['chars'])
    else:
        meta = {'tokenizer': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE}
    meta['dtype'] = token_dtype(meta['vocab_size'])
    encode, _ = get_tokenizer(meta)

    # every file is written under a temporary name first, then all are renamed together with meta.json
    # last: an interrupted prepare leaves the old dataset as it was
    split = int(len(text) * (1 - val_fraction))
    for split_name, part in (('train', text[:split]), ('val', text[split:])):
        ids = np.array(encode(part), dtype=meta['dtype'])
        ids.tofile(os.path.join(data_dir, f'{split_name}.bin.tmp'))
        print(f"{split_name}.bin: {len(ids):,} tokens")
    if os.path.exists(os.path.join(data_dir, 'meta.json')):
        os.remove(os.path.join(data_dir, 'meta.json'))  # the old meta must not describe the new splits
    for split_name in ('train', 'val'):
        os.replace(os.path.join(data_dir, f'{split_name}.bin.tmp'), os.path.join(data_dir, f'{split_name}.bin'))
    write_atomic(os.path.join(data_dir, 'meta.json'), lambda f: f.write(json.dumps(meta).encode()))
    print(f"wrote {data_dir}: vocab_size {meta['vocab_size']:,} ({tokenizer}), tokens stored as {meta['dtype']}")
    return data_dir


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('name', nargs='?', help='dataset name: the directory data/<name>')
    parser.add_argument('--name', dest='name_flag', help='the same, as a flag')
    parser.add_argument('--input', help='a text file or an http(s) URL (default: data/<name>/input.txt)')
    parser.add_argument('--tokenizer', choices=['char', 'gpt2'], help='default: char for *_char datasets, else gpt2')
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the share of the text kept for validation')
    args = parser.parse_args()
    name = args.name or args.name_flag
    if not name:
        parser.error("give a dataset name: python prepare.py shakespeare_char, or --name=NAME --input=PATH")
    prepare(name, args.input, args.tokenizer, args.val_fraction)
