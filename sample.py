"""
Sample from a trained model.

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=1 --max_new_tokens=300
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0    # greedy, from a file
    python sample.py --init_from=gpt2 --start="Once upon a time"              # GPT-2 from the Hugging Face Hub

With num_samples=1 the text is printed as it is generated; several samples are generated together,
as one batch, and printed when done.

    python sample.py --out_dir=out-sft --chat --system="You are brief."

talks with a model fine-tuned on conversations, in the terminal: replies stream in (Ctrl-C stops one);
/clear starts over, /exit or Ctrl-D ends. When standard input is not a terminal, each line is a user message.

    python sample.py --out_dir=out-shakespeare-char --serve --port=8000

serves the model over HTTP instead, as OpenAI's API (POST /v1/completions, /v1/chat/completions for a chat
model, and a chat page at /), on 127.0.0.1 unless --host says otherwise (serve.py).
"""

import sys
from types import SimpleNamespace

import torch

from common import check_ranges, config_defaults, die, load_config, pick_device, pick_dtype
from checkpoint import load_model
from model import merge_lora
from decode import check_quantize, prepare
from dataset import checkpoint_meta
from batcher import complete
from serve import run_server
from tokenizer import Tokenizer

_names_before_config = set(globals())  # imports and the like: not config keys
# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a checkpoint file or out_dir, or a Hub model: gpt2, owner/name
out_dir = 'out'
start = '\n'  # the prompt: text, or FILE:path to read it from a file
num_samples = 10
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 samples the model's distribution, < 1.0 is more conservative, 0 is greedy
top_k = 200  # sample among the k likeliest tokens only (0: all of them)
top_p = 1.0  # sample among the likeliest tokens that make up this much probability (1.0: all of them)
seed = 1337
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # the weights' dtype: 'auto' (bfloat16 where it is faster, else float32), ...
compile = False  # torch.compile the model's forward pass (inductor's kernels, not the one measured fastest here)
quantize = ''  # 'int8': the Linears' weights in int8, one scale per row (half of bfloat16's bytes to read per token)
chat = False  # talk with the model (fine-tuned on conversations) in the terminal
system = ''  # --chat: a system message that starts the conversation
serve = False  # serve the model over HTTP (OpenAI's API and a chat page) instead of printing samples
host = '127.0.0.1'  # the address to listen on: only this machine by default; 0.0.0.0 opens it to the network
port = 8000  # 0: any free port (printed at start)
max_tokens_cap = 1024  # the largest max_tokens a request may ask for (past block_size each token is slower)
max_batch = 16  # completions decoded together, from all requests (continuous batching: batcher.py)
max_batch_tokens = 0  # tokens of KV cache the admitted requests may fill, prompt plus max_tokens each (0: max_batch x block_size)
max_queue = 64  # requests waiting for room in the batch; more get a 429
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals(), _names_before_config)
RANGES = {'num_samples': '> 0', 'max_new_tokens': '> 0', 'temperature': '>= 0', 'top_k': '>= 0', 'top_p': '(0, 1]',
          'max_tokens_cap': '> 0', 'port': '[0, 65535]', 'max_batch': '> 0', 'max_batch_tokens': '>= 0',
          'max_queue': '> 0', 'seed': f'[{-2 ** 63}, {2 ** 64 - 1}]'}  # (common.check_ranges)


def load_model_and_tokenizer(cfg, device):
    """The model (LoRA adapters merged into its weights), and the tokenizer of the data it was trained on,
    which the checkpoint carries (tokenizer.py; its vocab_size may be smaller than a padded model's)."""
    model, checkpoint = load_model(cfg.init_from, cfg.out_dir, device)
    merge_lora(model)  # generation then costs what the base model's does
    tokenizer = Tokenizer(checkpoint_meta(checkpoint), f"the tokenizer of {cfg.init_from}")
    if model.config.vocab_size < tokenizer.vocab_size:
        die(f"the model has {model.config.vocab_size} token ids, fewer than its tokenizer's {tokenizer.vocab_size}: "
            "a checkpoint without a tokenizer of its own (nanoGPT's) needs its dataset's data/<dataset>/meta.json: "
            "prepare that dataset (python prepare.py ...)")
    return model, tokenizer


def chat_loop(cfg, model, tokenizer, device):
    """A conversation in the terminal, each reply streamed as it is generated. The history is kept; past the
    context the oldest turns are dropped whole (the system message stays)."""
    if not tokenizer.chat:
        die("this model has no chat template: fine-tune it on conversations first (python prepare.py NAME "
            "--input=chats.jsonl --tokenizer=data/<its dataset>, then python train.py --init_from=... "
            "--dataset=NAME)")
    interactive = sys.stdin.isatty()
    system = [{'role': 'system', 'content': cfg.system}] if cfg.system else []
    messages = list(system)
    block_size = model.config.block_size
    req = dict(n=1, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
               stop=[], seed=None)
    if interactive:
        print("chat: type a message; /clear starts over, /exit or Ctrl-D ends")
    while True:
        try:
            line = input('> ' if interactive else '')
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: the end
            if interactive:
                print()
            break
        if line.strip() == '/exit':
            break
        if line.strip() == '/clear':
            messages = list(system)
            print("(a new conversation)")
            continue
        if not line.strip():
            continue
        messages.append({'role': 'user', 'content': line})
        try:
            ids, dropped = tokenizer.fit_prompt(messages, block_size, cfg.max_new_tokens)
        except (ValueError, SystemExit) as e:
            print(f"error: {str(e).removeprefix('error: ')}", flush=True)
            messages.pop()
            continue
        if dropped:
            messages = system + messages[len(system) + dropped:]
            print(f"(the {dropped} oldest messages no longer fit the context: dropped)", flush=True)
        reply = ''
        try:
            for _, text, _, _ in complete(model, tokenizer, device, ids, req, end_ids=tokenizer.reply_ends):
                print(text, end='', flush=True)
                reply += text
        except KeyboardInterrupt:  # Ctrl-C during a reply stops it; the conversation goes on
            print(" (stopped)", end='')
        print(flush=True)
        messages.append({'role': 'assistant', 'content': reply})


def main(argv):
    cfg = SimpleNamespace(**load_config(DEFAULTS, argv))
    check_ranges(vars(cfg), RANGES)
    check_quantize(cfg.quantize)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device.split(':')[0])
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    # inference needs no float32 master weights: weights in dtype halve the memory read per token
    model.eval().to(getattr(torch, dtype))
    prepare(model, cfg.quantize, cfg.compile)  # int8 weights if asked; the Linear kernel measured fastest here
    if cfg.serve:
        return run_server(cfg, model, tokenizer, device)
    if cfg.chat:
        return chat_loop(cfg, model, tokenizer, device)

    prompt = cfg.start
    if prompt.startswith('FILE:'):
        try:
            with open(prompt[5:], encoding='utf-8') as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"could not read the prompt file {prompt[5:]}: {e}")
    ids = tokenizer.encode(prompt)
    if not ids:
        die("the prompt is empty: give --start=TEXT (the default is a newline)")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :].repeat(cfg.num_samples, 1)  # (B, T)
    stream = model.generate_stream(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                                   vocab_size=tokenizer.vocab_size)

    if cfg.num_samples == 1:
        new_ids, printed = [], ''
        print(prompt, end='', flush=True)
        for token in stream:
            new_ids.append(token.item())
            text = tokenizer.decode(new_ids)
            if not text.endswith('\ufffd'):  # wait for the rest of a character split across tokens
                print(text[len(printed):], end='', flush=True)
                printed = text
        print(tokenizer.decode(new_ids)[len(printed):])
    else:
        out = torch.cat(list(stream), dim=1)  # (B, max_new_tokens)
        for sample in out.tolist():
            print(prompt + tokenizer.decode(sample))
            print('---------------')


if __name__ == '__main__':
    main(sys.argv[1:])
