"""
Measure a model on text: loss (nats per token), perplexity, and bits per character (char models) or
per byte (GPT-2 BPE), which compare across tokenizers.

    python eval.py --out_dir=out-shakespeare-char                  # a run's model on its dataset's val split
    python eval.py --init_from=gpt2 --dataset=shakespeare           # GPT-2 from the Hub on a prepared dataset
    python eval.py --init_from=gpt2 --input=notes.txt               # on any UTF-8 text file
    python eval.py --out_dir=out-sft --show=3                       # a chat model on its conversations' val split
    python eval.py --init_from=gpt2 --task=hellaswag_val.jsonl --limit=500   # a task: multiple choice or generation

Every token but the first is predicted once, from the tokens before it in its window. Windows of
block_size tokens start every `stride` tokens, and each scores only the tokens no earlier window did:
by default stride = block_size (non-overlapping windows, a token sees 0 to block_size - 1 tokens of
context); a smaller stride gives every scored token more context, for more compute. Nothing is
random, so a model and a text always give the same figures.

    bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text  (per character: characters)

On a chat dataset (prepare.py's conversations) each conversation is scored from its first token, on the
tokens training predicts (the assistant's), and the stop rate is measured: the model replies greedily to
each conversation's last user turn, and a reply that ends with the assistant's end token within
max_new_tokens has stopped. A base model, whose vocabulary lacks the chat tokens, gets them as
fine-tuning would give them (grow_vocab), so its figures are those fine-tuning starts from.

With --task=FILE.jsonl it scores a task instead: multiple-choice accuracy (acc, acc_norm) or generated
answers (exact match, F1, BLEU, ROUGE-L, stop rate); tasks.py says how. --output=FILE.json writes the
figures with each record's scores.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from common import autocast_context, check_ranges, config_defaults, die, load_config, pick_device, pick_dtype
from checkpoint import fit_vocabulary, load_model
from model import merge_lora
from decode import check_quantize, quantize_int8
from dataset import Conversations, checkpoint_meta, load_meta, open_split
from tasks import read_task, run_task
from tokenizer import Tokenizer

_names_before_config = set(globals())  # imports and the like: not config keys
# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a checkpoint file or out_dir, or a Hub model: gpt2, owner/name
out_dir = 'out'
dataset = ''  # the prepared dataset data/<dataset>/ whose split to score; '' is the checkpoint's own
split = 'val'  # 'train' or 'val'
input = ''  # a UTF-8 text file to score instead of a split
block_size = 0  # tokens per window; 0 is the model's block_size
stride = 0  # tokens from one window's start to the next; 0 is block_size
batch_size = 1  # windows per forward pass: each one's logits are block_size x vocab_size floats
max_tokens = 0  # score only the first max_tokens tokens (0: all of them), for a quicker estimate
device = 'auto'  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'float32'  # float32, unlike training: the figures should not depend on the hardware's bfloat16
quantize = ''  # 'int8': score the model with int8 weights, as sample.py --quantize=int8 generates with them
# chat datasets
conversations = 0  # score only the first N conversations of the split (0: all)
stop_rate = True  # also reply to each conversation's last user turn and count the replies that end themselves
show = 0  # print the first `show` prompts with the model's replies
max_new_tokens = 256  # a reply (or a task's generated answer) that has not ended after this many tokens has not stopped
# tasks (tasks.py)
task = ''  # a task file (.jsonl) to score instead of text: multiple choice, or generation
limit = 0  # score only its first N records (0: all)
output = ''  # write the results, with each record's scores, to this .json file
# -----------------------------------------------------------------------------
DEFAULTS = config_defaults(globals(), _names_before_config)
RANGES = {**{k: '>= 0' for k in ('block_size', 'stride', 'max_tokens', 'conversations', 'show', 'limit')},
          'batch_size': '> 0', 'max_new_tokens': '> 0'}  # the values each numeric key may take (common.check_ranges)


@torch.no_grad()
def evaluate(model, ids, block_size, stride, batch_size=1, device='cpu', ctx=nullcontext()):
    """(total negative log-likelihood in nats, number of tokens scored) of ids[1:], each given the tokens
    before it in its window."""
    n = len(ids)
    windows, done = [], 0  # (start, end, done): inputs ids[start:end], targets ids[done + 1:end + 1] scored
    for start in range(0, n - 1, stride):
        end = min(start + block_size, n - 1)
        windows.append((start, end, done))
        done = end
        if end == n - 1:
            break
    model.eval()
    nats, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        x = torch.zeros(len(batch), max(end - start for start, end, _ in batch), dtype=torch.long)
        y = torch.full_like(x, -1)  # -1: not scored (padding, or scored by an earlier window)
        for row, (start, end, done) in enumerate(batch):
            x[row, :end - start] = torch.from_numpy(ids[start:end].astype(np.int64))
            y[row, done - start:end - start] = torch.from_numpy(ids[done + 1:end + 1].astype(np.int64))
        with ctx:
            _, loss = model(x.to(device), y.to(device))  # the mean over the scored targets
        scored = int((y >= 0).sum())
        nats += loss.item() * scored
        count += scored
    return nats, count


@torch.no_grad()
def evaluate_conversations(model, conversations, n, batch_size=1, device='cpu', ctx=nullcontext()):
    """(total negative log-likelihood in nats, tokens scored) of the first n conversations, each from its
    first token, on the tokens training predicts. Batches hold conversations of similar lengths."""
    model.eval()
    order = np.argsort(conversations.lengths[:n], kind='stable')
    nats, count = 0.0, 0
    for i in range(0, n, batch_size):
        x, y, _ = conversations.rows(order[i:i + batch_size])
        with ctx:
            _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        scored = int((y >= 0).sum())
        nats += loss.item() * scored
        count += scored
    return nats, count


@torch.no_grad()
def replies(model, tokenizer, conversations, n, max_new_tokens, device='cpu'):
    """(prompt ids, reply ids, whether it ended with the assistant's end token) for each of the first n
    conversations: the model's greedy reply to its last user turn. Any special token ends a reply."""
    model.eval()
    reply_start, reply_end = tokenizer.special['<|assistant_start|>'], tokenizer.special['<|assistant_end|>']
    for start, end in zip(conversations.starts[:n], conversations.ends[:n]):
        ids = conversations.tokens[start:end].astype(np.int64)
        prompt = ids[:np.flatnonzero(ids == reply_start)[-1] + 1]  # up to its last assistant turn's start
        reply = []
        for token in model.generate_stream(torch.from_numpy(prompt)[None].to(device), max_new_tokens,
                                           temperature=0, vocab_size=tokenizer.vocab_size):
            reply.append(token.item())
            if reply[-1] in tokenizer.reply_ends:
                break
        yield prompt, reply, reply[-1] == reply_end


def read_tokens(cfg, checkpoint, model, meta, block_size):
    """(a name for the text, its token ids or a chat dataset's Conversations, the tokenizer that decodes
    them): the --input file, or a prepared dataset's split."""
    tokenizer = Tokenizer(meta, f"{cfg.init_from}'s tokenizer")
    if cfg.input:
        try:
            with open(cfg.input, encoding='utf-8') as f:
                return cfg.input, np.array(tokenizer.encode(f.read()), dtype=np.int64), tokenizer
        except (OSError, UnicodeDecodeError) as e:
            die(f"could not read {cfg.input} as UTF-8 text ({e}): pass a text file")
    dataset = cfg.dataset or checkpoint.get('config', {}).get('dataset')
    if not dataset:
        die(f"{cfg.init_from} has no dataset of its own: pass --dataset=NAME (prepared by prepare.py) or --input=FILE")
    data_dir = os.path.join('data', dataset)
    data_meta = load_meta(data_dir) if os.path.isdir(data_dir) else None
    data = open_split(data_dir, cfg.split, data_meta['dtype'], block_size) \
        if data_meta and cfg.split in ('train', 'val') else None
    if data is None:
        die(f"no split '{cfg.split}' of dataset '{dataset}' in {data_dir}: use --split=train or val, after "
            f"python prepare.py {dataset} ...")
    # the data may add special tokens (a chat template's), which the model gets as fine-tuning gives them
    fit_vocabulary(model, checkpoint, data_meta, dataset, cfg.init_from)
    return f"{dataset} {cfg.split}", data, Tokenizer(data_meta, f"{data_dir}/meta.json")


def chat_results(cfg, model, name, conversations, tokenizer, device, ctx):
    """eval.py on a chat dataset: the loss on the assistant's tokens, and the stop rate."""
    n = min(cfg.conversations or len(conversations), len(conversations))
    nats, count = evaluate_conversations(model, conversations, n, cfg.batch_size, device, ctx)
    if count == 0:
        die(f"no assistant token of {name} falls within block_size {cfg.block_size}: raise --block_size")
    results = {'loss': nats / count, 'perplexity': math.exp(nats / count), 'tokens': count, 'conversations': n}
    line = (f"{name}: {n:,} conversations, {count:,} assistant tokens | loss {results['loss']:.4f} | "
            f"perplexity {results['perplexity']:.3f}")
    if cfg.stop_rate:
        stopped = 0
        for k, (prompt, reply, ended) in enumerate(replies(model, tokenizer, conversations, n, cfg.max_new_tokens,
                                                           device)):
            stopped += ended
            if k < cfg.show:
                print(f"--- prompt: {tokenizer.decode(prompt.tolist())}\n--- reply "
                      f"({'ended' if ended else 'did not end'}): {tokenizer.decode(reply[:-1] if ended else reply)}")
        results['stop_rate'] = stopped / n
        line += f" | stop rate {stopped}/{n} = {stopped / n:.1%} (replies ended within {cfg.max_new_tokens} tokens)"
    print(line)
    return results


def task_results(cfg, model, tokenizer, device, ctx):
    """eval.py --task: a multiple-choice or generation task's figures (tasks.py), and with --output each record's."""
    task, t0 = read_task(cfg.task), time.time()
    results, rows, line = run_task(model, tokenizer, task, cfg.limit, cfg.max_new_tokens, device, ctx)
    print(f"{line} | {time.time() - t0:.1f} s")
    if cfg.output:
        try:
            with open(cfg.output, 'w') as f:
                json.dump({'task': cfg.task, 'model': cfg.init_from if cfg.init_from != 'resume' else cfg.out_dir,
                           'results': results, 'records': rows}, f, indent=1)
        except OSError as e:
            die(f"cannot write {cfg.output} ({e.strerror or e}): pass another --output")
    return results


def main(argv):
    cfg = SimpleNamespace(**load_config(DEFAULTS, argv))
    check_ranges(vars(cfg), RANGES)
    if cfg.output and not cfg.task:
        die("--output writes a task's figures and each record's scores: pass --task=FILE.jsonl too")
    check_quantize(cfg.quantize)
    device = pick_device(cfg.device)
    ctx = autocast_context(device.split(':')[0], pick_dtype(cfg.dtype, device.split(':')[0]))
    model, checkpoint = load_model(cfg.init_from, cfg.out_dir, device)
    merge_lora(model)
    block_size = cfg.block_size or model.config.block_size
    stride = cfg.stride or block_size
    if not 0 < block_size <= model.config.block_size or not 0 < stride <= block_size:
        die(f"need 0 < stride <= block_size <= {model.config.block_size} (the model's), got stride {stride}, "
            f"block_size {block_size}")
    meta = checkpoint_meta(checkpoint)
    if cfg.task:
        model = quantize_int8(model) if cfg.quantize else model
        return task_results(cfg, model, Tokenizer(meta, f"{cfg.init_from}'s tokenizer"), device, ctx)
    name, ids, tokenizer = read_tokens(cfg, checkpoint, model, meta, block_size)
    if cfg.quantize:  # after read_tokens, which may grow the vocabulary for a chat dataset's special tokens
        quantize_int8(model)
    if isinstance(ids, Conversations):
        return chat_results(cfg, model, name, ids, tokenizer, device, ctx)
    ids = ids[:cfg.max_tokens or len(ids)]
    if len(ids) < 2:
        die(f"{name} has {len(ids)} token(s): at least 2 are needed, one to predict the other")

    nats, count = evaluate(model, ids, block_size, stride, cfg.batch_size, device, ctx)
    loss = nats / count
    unit = 'char' if meta['tokenizer'] == 'char' else 'byte'
    units = count if unit == 'char' else len(tokenizer.decode(ids[1:].tolist()).encode('utf-8'))  # the scored text
    results = {'loss': loss, 'perplexity': math.exp(loss), f'bits_per_{unit}': nats / math.log(2) / units,
               'tokens': count, f'{unit}s': units}
    print(f"{name}: {count:,} tokens ({units:,} {unit}s), block_size {block_size}, stride {stride} | "
          f"loss {loss:.4f} | perplexity {math.exp(loss):.3f} | bits per {unit} {results[f'bits_per_{unit}']:.4f}")
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
