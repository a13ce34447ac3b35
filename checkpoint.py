"""
Checkpoints, in one place: a model from train.py's checkpoint (ours, or nanoGPT's), from a Hugging Face Hub
repository of GPT-2's architecture (hub.py fetches the files), and writing a checkpoint so that a crash
never loses the last one.

    model, checkpoint = load_model(init_from, out_dir)   # 'resume', a checkpoint file or out_dir, or a Hub repo
    save_checkpoint(checkpoint, path)                      # atomic: the old file or the new one
    model, checkpoint, meta, source = model_to_train(cfg, meta, device, master)  # train.py's: new, resumed, fine-tuned
    check_resume(cfg, checkpoint, master)                  # a resumed run keeps the model's shape (and LoRA's)
    shard_model(model, device_type, dtype)                 # FSDP2: each Block and the whole GPT sharded
    full_model_state(model), full_optimizer_state(model, optimizer)  # gathered on rank 0, as a plain run saves them
    load_optimizer_state(model, optimizer, state)          # a saved (plain) optimizer state into a sharded run's

A checkpoint is a dict: 'model' (the state dict; with LoRA only the adapters, and 'lora' names their base),
'model_args' (GPTConfig's fields), 'config' (train.py's keys), 'meta' (the tokenizer: tokenizer.py),
'iter_num', 'best_val_loss', the optimizers' and GradScaler's states, 'init_from', and how far the run had got
('tokens' trained on, wall 'seconds').
"""

import os
import re
from dataclasses import asdict, fields

import torch

import hub
from common import die
from dataset import GPT2_META, GPT2_VOCAB_SIZE, token_dtype
from model import GPT, GPTConfig, add_lora, merge_lora, padded_vocab_size
from tokenizer import compatible, hub_tokenizer, special_tokens


HUB_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', 'distilgpt2')  # Hub models without an owner
# the model's shape: what a resumed run may not change (dropout may; the vocabulary comes from the data)
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in ('dropout', 'vocab_size'))


def check_resume(cfg, checkpoint, master):
    """A resumed run keeps the model's shape; training keys may change, and the change is logged."""
    model_args, saved = checkpoint['model_args'], checkpoint.get('config', {})
    for key in MODEL_KEYS:
        saved_value = model_args.get(key, getattr(GPTConfig, key))  # older checkpoints: the default
        if getattr(cfg, key) != saved_value:
            die(f"the checkpoint in {cfg.out_dir} has {key}={saved_value!r}, this run asks for "
                f"{key}={getattr(cfg, key)!r}: resume with the run's own config (or --{key}={saved_value!r}), "
                "or start from scratch in another out_dir")
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in vars(cfg).items()
               if k in saved and saved[k] != v and k not in ('init_from', 'eval_only')]
    if changed and master:
        print(f"changed since the checkpoint: {', '.join(changed)}")
    saved_lora, lora = checkpoint.get('lora') or {'rank': 0}, lora_settings(cfg)
    for key in ('rank', 'alpha', 'targets'):  # the adapters' shape (and scale) is part of the model's
        if (saved_lora['rank'] or lora['rank']) and saved_lora.get(key) != lora[key]:
            die(f"the checkpoint in {cfg.out_dir} has lora_{key}={saved_lora.get(key)!r}, this run asks for "
                f"{lora[key]!r}: resume with the run's own config, or fine-tune from it in another out_dir")


def lora_settings(cfg, base=None):
    """The LoRA keys as a LoRA checkpoint stores them, with the model the adapters belong to."""
    return {'rank': cfg.lora_rank, 'alpha': cfg.lora_alpha, 'dropout': cfg.lora_dropout,
            'targets': [t.strip() for t in cfg.lora_targets.split(',') if t.strip()], 'base': base}


def model_config(cfg, vocab_size):
    """The GPTConfig that a training run's keys describe."""
    return GPTConfig(**{key: getattr(cfg, key) for key in MODEL_KEYS + ('dropout',)}, vocab_size=vocab_size)


def model_to_train(cfg, meta, device, master):
    """The model a training run starts from -> (model, checkpoint, meta, source): a new one of cfg's shape; the one
    in out_dir to resume (checkpoint: its dict); or another's weights to fine-tune (init_from: a Hub model, a
    checkpoint), at iteration 0 with a fresh optimizer (checkpoint None). A model that brings its own shape sets
    cfg's; meta (the data's tokenizer) may gain the checkpoint's; source is where the weights first came from (a
    LoRA checkpoint's base), kept across resumes."""
    resume = cfg.init_from == 'resume'
    if cfg.init_from == 'scratch':
        # GPT-2's 50257 tokens padded to 50304, a multiple of 64, makes the head's matmul faster
        model, checkpoint, source = GPT(model_config(cfg, padded_vocab_size(meta['vocab_size']))), None, 'scratch'
    else:
        model, checkpoint = load_model(cfg.init_from, cfg.out_dir, device, cfg.dropout, cfg.lora_dropout)
        # a path made absolute, so that it still holds from another directory
        if resume:
            source = checkpoint.get('init_from', 'scratch')
        else:
            source = os.path.abspath(cfg.init_from) if os.path.exists(cfg.init_from) else cfg.init_from
        if source != 'scratch':  # the model brought its own shape: the saved config says which
            for key in MODEL_KEYS:
                if key != 'block_size':
                    setattr(cfg, key, getattr(model.config, key))
        if not resume:  # fine-tuning: these weights, at iteration 0, with a fresh optimizer
            merge_lora(model)
            if cfg.block_size > model.config.block_size:
                die(f"{cfg.init_from} has a context of {model.config.block_size} tokens: "
                    f"use --block_size={model.config.block_size} or less")
            model.crop_block_size(cfg.block_size)
        rows = model.config.vocab_size
        # fine-tuning data may bring special tokens the model lacks (a chat template's): it grows rows for them
        meta = fit_vocabulary(model, checkpoint, meta, cfg.dataset, 'the checkpoint' if resume else cfg.init_from,
                              grow=not resume)
        if model.config.vocab_size > rows and cfg.lora_rank > 0:
            die(f"dataset '{cfg.dataset}' adds special tokens (a chat template's) that {cfg.init_from} lacks: with "
                "LoRA their rows would stay frozen, alike, and the model could not tell them apart; fine-tune fully "
                "(lora_rank=0), or start from a model whose tokenizer has them (a BPE trained by prepare.py)")
        if model.config.vocab_size > rows and master:
            print(f"vocabulary grown to {model.config.vocab_size:,} rows for the dataset's special tokens")
        if resume:
            check_resume(cfg, checkpoint, master)
            if master:
                print(f"resuming from {cfg.out_dir} at iteration {checkpoint['iter_num']}, "
                      f"best val loss {float(checkpoint['best_val_loss']):.4f}")
        else:
            checkpoint = None  # its optimizer state belongs to another run
    if cfg.lora_rank > 0 and not resume:  # (a resumed LoRA checkpoint brought its adapters)
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, lora_settings(cfg)['targets'])
    return model, checkpoint, meta, source


def save_checkpoint(checkpoint, path):
    """Write through a temporary file, fsync, rename: a crash leaves the old checkpoint or the new one."""
    tmp_path = path + '.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        return True
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.isfile(tmp_path):
            os.remove(tmp_path)
        print(f"warning: could not save {path} ({e}); the previous checkpoint is kept")
        return False


def shard_model(model, device_type, dtype):
    """FSDP2, in place: each Block and then the whole GPT (embeddings, head, final norm) sharded across the
    processes. On CUDA in bfloat16, the Blocks compute in bfloat16 and reduce gradients in float32."""
    from torch.distributed.device_mesh import init_device_mesh  # (FSDP's imports cost every script ~0.7 s: here)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    bf16 = device_type == 'cuda' and dtype == 'bfloat16'
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_options():
    """Whole tensors, on rank 0's CPU (the others get none)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model):
    """A sharded model's state dict as model.state_dict() would be, on rank 0. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=full_state_options())


def param_names(model, optimizer):
    """The names of the optimizer's parameters, in the order of its param ids (0, 1, ...)."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group['params']]


def full_optimizer_state(model, optimizer):
    """A sharded optimizer's state as optimizer.state_dict() would be (param ids, not names), on rank 0: so
    that a run without FSDP resumes it. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=full_state_options())
    if not state:
        return state
    ids = {name: i for i, name in enumerate(param_names(model, optimizer))}
    return {'state': {ids[name]: value for name, value in state['state'].items()},
            'param_groups': [{**g, 'params': [ids[name] for name in g['params']]} for g in state['param_groups']]}


def load_optimizer_state(model, optimizer, state):
    """A whole optimizer state (optimizer.state_dict()'s, param ids) into a sharded run's optimizer."""
    names = param_names(model, optimizer)
    if len(names) != sum(len(g['params']) for g in state['param_groups']):
        raise ValueError("the saved optimizer has other parameters")
    state = {'state': {names[i]: value for i, value in state['state'].items()},
             'param_groups': [{**g, 'params': [names[i] for i in g['params']]} for g in state['param_groups']]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def fit_vocabulary(model, checkpoint, data_meta, dataset, name, grow=True):
    """Check that the ids of a dataset's tokenizer (data_meta) mean what they meant to the model (its checkpoint's
    meta: tokenizer.compatible), and with grow, give the model rows for the special tokens the data adds (a
    chat template's) as fine-tuning starts: grow_vocab. nanoGPT's checkpoints, which have no meta, only need
    enough rows. A mismatch is a one-line error. -> the meta that a checkpoint of the model trained on this
    data records: the data's, keeping the special tokens (and chat template) the model already had."""
    model_meta = checkpoint.get('meta') or data_meta
    grows = grow and 'meta' in checkpoint and model.config.vocab_size < data_meta['vocab_size']
    if not compatible(model_meta, data_meta) or (model.config.vocab_size < data_meta['vocab_size'] and not grows):
        how = (model_meta.get('source') or 'data/<its dataset>') if model_meta['tokenizer'] == 'bpe' \
            else model_meta['tokenizer']
        die(f"the vocabulary of {name} ({model.config.vocab_size} tokens) is not the one of dataset '{dataset}' "
            f"({data_meta['vocab_size']} tokens): " + (f"prepare a dataset with the model's tokenizer: python prepare.py "
                                                        f"NAME --input=FILE --tokenizer={how}" if grow else
                                                        "resume on the dataset it was trained on"))
    if grows:
        model.grow_vocab(padded_vocab_size(data_meta['vocab_size']))
    kept = {name: i for name, i in special_tokens(model_meta).items() if name not in special_tokens(data_meta)}
    if not kept and ('chat_template' in data_meta or 'chat_template' not in model_meta):
        return data_meta
    size = max(model_meta['vocab_size'], data_meta['vocab_size'])  # a chat model trained on more text stays one
    return {**data_meta, 'special': {**special_tokens(data_meta), **kept}, 'vocab_size': size,
            'dtype': token_dtype(size), **{k: v for k, v in model_meta.items() if k == 'chat_template'}}


def load_model(init_from, out_dir='out', device='cpu', dropout=None, lora_dropout=None):
    """-> (model, checkpoint dict) from init_from: 'resume' (out_dir's checkpoint), a checkpoint file or a
    run's out_dir, or a Hub repository of the GPT-2 architecture (gpt2, gpt2-medium, ..., owner/name).
    dropout and lora_dropout, training settings, replace the saved ones when given."""
    if not init_from.strip():
        die("init_from is empty: name a checkpoint, an out_dir, 'resume' or a Hub model such as gpt2")
    if init_from == 'resume':
        return load_checkpoint(out_dir, device, dropout, lora_dropout)
    if os.path.exists(init_from) or init_from.endswith('.pt') or init_from.startswith(('.', '/', '~')):
        return load_checkpoint(os.path.expanduser(init_from), device, dropout, lora_dropout)
    if init_from not in HUB_NAMES and not re.fullmatch(r'[\w.-]+/[\w.-]+', init_from):  # a mistyped out_dir, say
        die(f"no checkpoint or directory named '{init_from}' exists, and it is not a Hub model (gpt2, gpt2-medium, "
            "gpt2-large, gpt2-xl or owner/name)")
    return from_pretrained(init_from, device, dropout or 0.0)


def from_pretrained(repo, device='cpu', dropout=0.0):
    """GPT-2 weights from the Hub -> (model, a checkpoint-like dict: model_args, meta, init_from).

    The shapes come from config.json. Hugging Face stores the Linears of a block as Conv1D, weight
    (in, out): they are transposed. Its causal-mask buffers (attn.bias, attn.masked_bias) are not
    weights. Names may or may not start with 'transformer.' (GPT2LMHeadModel or GPT2Model).
    """
    config, weights = hub.fetch(repo)
    if config.get('model_type') != 'gpt2' or not {'n_layer', 'n_head', 'n_embd', 'vocab_size'} <= config.keys():
        die(f"{repo} is a '{config.get('model_type')}' model: only the GPT-2 architecture (model_type gpt2) loads")
    n_embd = config['n_embd']
    # settings this model does not have (GPT-2's own GELU, gelu_new, is the tanh approximation: it is used)
    unlike_ours = {'n_inner': (None, 4 * n_embd), 'activation_function': ('gelu_new', 'gelu', 'gelu_pytorch_tanh'),
                   'scale_attn_by_inverse_layer_idx': (False,), 'add_cross_attention': (False,),
                   'tie_word_embeddings': (True,)}
    for key, fine in unlike_ours.items():
        if config.get(key, fine[0]) not in fine:
            die(f"{repo} has {key}={config[key]!r} in its config.json, which this GPT-2 does not implement")
    # the tokenizer: GPT-2's for GPT-2's vocabulary (or a larger, padded one without a tokenizer.json of its own)
    meta = hub_tokenizer(repo) if config['vocab_size'] != GPT2_VOCAB_SIZE else None
    if meta is None and config['vocab_size'] < GPT2_VOCAB_SIZE:
        die(f"{repo} has {config['vocab_size']} tokens, fewer than GPT-2's {GPT2_VOCAB_SIZE}, and no tokenizer.json: "
            "there is no tokenizer to use it with")
    meta = {**meta, 'dtype': token_dtype(meta['vocab_size'])} if meta else dict(GPT2_META)
    if meta['vocab_size'] > config['vocab_size']:
        die(f"{repo}'s tokenizer.json has ids up to {meta['vocab_size'] - 1}, past its {config['vocab_size']} embeddings")
    model_args = dict(n_layer=config['n_layer'], n_head=config['n_head'], n_embd=n_embd, bias=True, dropout=dropout,
                      block_size=config.get('n_positions', config.get('n_ctx')), vocab_size=config['vocab_size'],
                      activation='gelu' if config.get('activation_function') == 'gelu' else 'gelu_tanh')
    model = GPT(GPTConfig(**model_args))

    state_dict, conv1d = {}, ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    for key, value in weights.items():
        key = key if key == 'lm_head.weight' else 'transformer.' + key.removeprefix('transformer.')
        if not key.endswith(('.attn.bias', '.attn.masked_bias')):
            state_dict[key] = value.t() if key.endswith(conv1d) else value
    state_dict.setdefault('lm_head.weight', state_dict.get('transformer.wte.weight'))  # tied: usually not stored
    expected = model.state_dict()
    problems = ([f"missing {k}" for k in expected if state_dict.get(k) is None]
                + [f"unexpected {k}" for k in state_dict if k not in expected]
                + [f"{k} is {tuple(v.shape)}, not {tuple(expected[k].shape)}" for k, v in state_dict.items()
                   if k in expected and v is not None and v.shape != expected[k].shape])
    if problems:
        die(f"{repo}'s weights do not fit a GPT-2 of its config.json: {', '.join(problems[:3])}"
            f"{' ...' if len(problems) > 3 else ''}")
    if not torch.equal(state_dict['lm_head.weight'], state_dict['transformer.wte.weight']):
        die(f"{repo} has an lm_head.weight apart from its token embeddings: only tied embeddings (GPT-2's) load")
    model.load_state_dict(state_dict)
    return model.to(device), {'model_args': model_args, 'meta': meta, 'init_from': repo}


def load_checkpoint(path, device='cpu', dropout=None, lora_dropout=None):
    """Load a checkpoint written by train.py, here or in nanoGPT -> (model, checkpoint dict).

    Only tensors and plain Python values are unpickled (weights_only=True), so a checkpoint from
    someone else cannot run code. Errors a user can cause stop with a one-line message. A LoRA
    checkpoint holds only adapters: its base model is loaded first, and the adapters put on it.
    """
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}: train one first (python train.py ...) "
                         "or point --out_dir at a directory holding ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}); it may be "
                         "truncated or not a checkpoint at all: use another one or retrain")
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'model_args' not in checkpoint:
        raise SystemExit(f"error: {path} has no 'model' and 'model_args': not a checkpoint of train.py")
    known = {f.name for f in fields(GPTConfig)}
    model_args = {k: v for k, v in checkpoint['model_args'].items() if k in known}
    if dropout is not None:
        model_args['dropout'] = dropout
    lora = checkpoint.get('lora')
    if lora:
        model, _ = load_model(lora['base'], device=device, dropout=model_args.get('dropout'))
        merge_lora(model)  # the base may itself be a LoRA checkpoint
        if model.config.block_size > model_args['block_size']:
            model.crop_block_size(model_args['block_size'])
        if model.config.vocab_size < model_args['vocab_size']:  # grown for a chat template: frozen at the mean
            model.grow_vocab(model_args['vocab_size'])
        activation = model_args.get('activation', 'gelu')
        if {activation, model.config.activation} == {'gelu', 'gelu_tanh'}:  # adapters of a Hub model, trained
            for block in model.transformer.h:  # before it had its own GELU (or after), keep the one they learned with
                block.mlp.activation = model.config.activation = activation
        if asdict(model.config) != {**asdict(GPTConfig()), **model_args}:
            die(f"{path} holds LoRA adapters for a base '{lora['base']}' of another shape than the one found "
                f"there now: point the checkpoint's base at the model it was trained on")
        add_lora(model, lora['rank'], lora['alpha'], lora['dropout'] if lora_dropout is None else lora_dropout,
                 lora['targets'])
    else:
        model = GPT(GPTConfig(**model_args))
    state_dict = {}
    for key, value in checkpoint['model'].items():
        key = key.removeprefix('_orig_mod.')  # nanoGPT saved torch.compile'd models under this prefix
        if not key.endswith('.attn.bias'):  # nanoGPT's causal-mask buffer on PyTorch < 2.0: not a weight
            state_dict[key] = value
    missing, unexpected = model.load_state_dict(state_dict, strict=not lora)
    if unexpected or any('.lora_' in k for k in missing):
        die(f"{path}'s LoRA adapters do not fit its base '{lora['base']}' (missing {len(missing)}, unexpected "
            f"{len(unexpected)} tensors): the checkpoint is damaged or its lora settings were edited")
    return model.to(device), checkpoint
