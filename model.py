"""
The GPT-2 language model, in one file you can read top to bottom.

Architecture and parameter names are GPT-2's, as in nanoGPT, so nanoGPT checkpoints load
unchanged. What differs from nanoGPT's model.py:
- generate() keeps a preallocated KV cache (decode.py), so each new token costs one position of compute
  instead of a forward pass over the whole context; decode.prepare() picks the Linear kernel and the
  attention dtype measured fastest on this machine;
- sampling takes top_k (exactly k tokens kept), top_p, and temperature 0 for greedy decoding;
- weight decay skips embeddings as well as biases and norms;
- estimate_mfu() takes the peak FLOP/s of your hardware instead of assuming an A100;
- grow_vocab() adds token ids (a chat template's special tokens) to a trained model;
- LoRA: LoRALinear adapters on chosen Linears of a frozen model, merged into the weights for sampling;
- options from the NanoGPT speedrun (GPTConfig: rope, rmsnorm, qk_norm, relu2, untied head, logit
  softcap, zero init), all off by default, and Muon for the blocks' matrices in configure_optimizers
  (under FSDP, ShardedMuon: each matrix orthogonalised whole, so sharding doesn't change the result);
- activation_checkpointing: each Block's activations recomputed in the backward pass instead of kept.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from decode import KVCache


class Linear(nn.Linear):
    """nn.Linear (same parameters and names), whose kernel for generation decode.prepare() may choose: the one
    measured fastest on this machine for reading the weights, used when no gradient is needed."""
    kernel = None  # a function (layer, x) -> y; None: F.linear

    def forward(self, x):
        if self.kernel is None or torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)  # (under autocast, x may be bfloat16 and the weight float32)
        return self.kernel(self, x)


class LoRALinear(Linear):
    """A Linear whose weight W stays frozen while a low-rank update learns (LoRA, Hu et al. 2021):
    y = x W^T + b + (alpha / rank) x A^T B^T, with A (rank, in) and B (out, rank). B starts at zero,
    so an adapted model starts as exactly the base model. W and b keep their names in the state dict."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device='meta')
        self.weight, self.bias = base.weight, base.bias  # the base layer's own parameters, not copies
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as the LoRA paper's code
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale


def norm_layer(config):
    """The normalisation before each sub-block and at the end: GPT-2's LayerNorm, or RMSNorm."""
    return nn.RMSNorm(config.n_embd) if config.norm == 'rmsnorm' else nn.LayerNorm(config.n_embd, bias=config.bias)


def apply_rope(x, cos, sin):
    """Rotate each head's (first half, second half) coordinate pairs by position-dependent angles.
    x (B, nh, T, hs); cos, sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    cache_dtype = None  # the dtype of the KV cache and of attention over it, if decode.prepare() measured one faster

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm, self.rms = config.qk_norm, config.norm == 'rmsnorm'

    def forward(self, x, cache=None, layer=0, rope=None):
        B, T, C = x.size()  # batch, sequence length, n_embd
        qkv = self.c_attn(x)
        dtype = qkv.dtype  # (under autocast, bfloat16 while x is float32)
        if cache is not None and self.cache_dtype is not None:  # (float32 on a CPU whose bfloat16 attention is slower)
            qkv = qkv.to(self.cache_dtype)
        q, k, v = qkv.split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # normalised queries and keys keep attention logits bounded at high learning rates
            norm = F.rms_norm if self.rms else F.layer_norm  # the model's norm, without weights
            q, k = norm(q, (q.size(-1),)), norm(k, (k.size(-1),))
        if rope is not None:  # rotary embeddings: position enters as a rotation of queries and keys
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal, mask = True, None
        if cache is not None:
            k, v, mask, is_causal = cache.update(layer, k, v)  # (B, nh, positions so far, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        x = self.c_fc(x)
        if self.activation == 'relu2':
            x = F.relu(x).square()  # ReLU squared: cheaper, and trains faster
        else:  # GPT-2's own GELU (gelu_new) is the tanh approximation; ours by default is exact
            x = F.gelu(x, approximate='tanh' if self.activation == 'gelu_tanh' else 'none')
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope)  # pre-norm residual blocks
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    # options from the NanoGPT speedrun; the defaults are GPT-2's architecture, whose checkpoints load as they are
    rope: bool = False  # rotary position embeddings instead of learned absolute ones (then there is no wpe)
    rope_base: float = 10000.0  # the rotation frequencies are rope_base ** (-2i / head_size)
    norm: str = 'layernorm'  # 'layernorm' (GPT-2) or 'rmsnorm'
    qk_norm: bool = False  # normalise each head's queries and keys (with the norm above, unweighted)
    activation: str = 'gelu'  # 'gelu' (exact, as nanoGPT), 'gelu_tanh' (GPT-2's own, from the Hub) or 'relu2' (ReLU squared)
    tie_embeddings: bool = True  # the output head is the token embedding matrix, as GPT-2
    logit_softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap), smoothly bounded
    zero_init: bool = False  # the projections into the residual stream (and an untied head) start at zero


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # a training setting, not the model's shape: not in GPTConfig
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if config.rope else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm_layer(config),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings, as GPT-2
        if config.rope:  # cos and sin of every (position, frequency): (block_size, head_size / 2) each
            head_size = config.n_embd // config.n_head
            freqs = config.rope_base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), freqs)
            self.register_buffer('rope_cos', angles.cos(), persistent=False)  # recomputed, not saved
            self.register_buffer('rope_sin', angles.sin(), persistent=False)

        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections into the residual stream by 1/sqrt(number of them)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            if config.zero_init and (name.endswith('c_proj.weight') or name == 'lm_head.weight' and
                                     not config.tie_embeddings):
                torch.nn.init.zeros_(p)  # each block starts as the identity, the untied head predicts uniform

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the embeddings that are lookups rather than matmuls: the
        position embeddings, and the token embeddings when they are not also the head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rope:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n_params -= self.transformer.wte.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.size()
        # the new tokens' positions: (T,), or (B, T) in a RowCache, whose rows are at their own lengths
        pos = cache.positions(T, idx.device) if cache is not None else torch.arange(T, device=idx.device)
        end = cache.end if cache is not None else T  # one past the last position (a host value: no device sync)
        assert end <= self.config.block_size, f"cannot forward {end} positions, block_size is {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rope:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, hs/2) each, or (B, T, hs/2)
            rope = tuple(r[:, None] for r in rope) if pos.dim() == 2 else rope  # (B, 1, T, hs/2): the heads share it
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.transformer.h):
            if recompute:  # keep the block's input only; its RNG state is replayed, so dropout masks are the same
                x = checkpoint(block, x, cache, layer, rope, use_reentrant=False)
            else:
                x = block(x, cache, layer, rope)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.advance(T)

        if targets is not None:
            logits = self.softcap(self.lm_head(x))  # (B, T, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.softcap(self.lm_head(x[:, -1:, :]))  # (B, 1, vocab_size): only the last position (a view)
            loss = None
        return logits, loss

    def softcap(self, logits):
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) on shorter blocks."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.rope:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def grow_vocab(self, vocab_size):
        """More token ids, e.g. for the chat template's special tokens: the new rows of the embedding (and so
        of the tied head) start as the mean embedding, a token the model already reads as typical text."""
        old = self.transformer.wte.weight
        rows = old.mean(dim=0, keepdim=True).expand(vocab_size - old.size(0), -1)
        self.transformer.wte.weight = nn.Parameter(torch.cat([old, rows]), requires_grad=old.requires_grad)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            head = self.lm_head.weight
            self.lm_head.weight = nn.Parameter(torch.cat([head, head.mean(dim=0, keepdim=True).expand_as(rows)]),
                                               requires_grad=head.requires_grad)
        self.lm_head.out_features = self.transformer.wte.num_embeddings = self.config.vocab_size = vocab_size

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon_lr=0.0):
        """[AdamW], or with muon_lr > 0 [AdamW, Muon]: Muon for the blocks' weight matrices (it
        orthogonalises their updates), AdamW for the embeddings, the head, biases and norms."""
        # decay the weight matrices only: not embeddings (the head is tied to wte), biases or norms
        embeddings = {'transformer.wte.weight', 'transformer.wpe.weight'}
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = {n for n, p in params if muon_lr > 0 and p.dim() == 2 and n.startswith('transformer.h.')}
        decay = [p for n, p in params if p.dim() >= 2 and n not in embeddings and n not in hidden]
        no_decay = [p for n, p in params if (p.dim() < 2 or n in embeddings) and n not in hidden]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        # the fused kernel does the whole update in one pass over the parameters
        fused = device_type in ('cuda', 'cpu') and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))]
        if hidden:
            matrices = [p for n, p in params if n in hidden]
            sharded = hasattr(matrices[0], 'full_tensor')  # a DTensor (not imported here: it costs any script ~0.7 s)
            muon = ShardedMuon if sharded else torch.optim.Muon  # FSDP's shards, or whole matrices
            optimizers.append(muon(matrices, lr=muon_lr, weight_decay=weight_decay))
        return optimizers

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, seq_len=None):
        """Model FLOPs utilization: achieved FLOP/s over peak_flops (PaLM paper, appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len or cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.inference_mode()  # no autograd bookkeeping at all: decoding ran 3-9% faster than under no_grad (AMD EPYC)
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                        vocab_size=None):
        """Yield the next tokens (B, 1), one step at a time, continuing the prompts idx (B, T).

        The context is the last block_size tokens, as in nanoGPT. While it fits, the KV cache makes
        each step one position of compute. Past block_size every position moves (positions are
        learned, absolute), so cached keys no longer apply and each step re-reads the whole window.
        use_cache=False always re-reads the whole context: the plain reference the cache must match.
        vocab_size: sample among the first vocab_size ids only, the tokenizer's; a vocabulary padded for
        speed (GPT-2's 50257 to 50304) has ids no tokenizer can decode.
        """
        block_size = self.config.block_size
        B, T = idx.size()
        tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
        tokens[:, :T] = idx
        cache = KVCache(self.config.n_layer, min(block_size, T + max_new_tokens)) if use_cache else None
        context = idx[:, -block_size:]  # the prompt goes in one forward pass
        for n in range(T, T + max_new_tokens):
            logits, _ = self(context, cache=cache)
            next_token = sample_next(logits[:, -1, :vocab_size].float(), temperature, top_k, top_p)  # (B, 1)
            tokens[:, n] = next_token[:, 0]
            yield next_token
            if cache is not None and cache.pos < block_size:
                context = next_token
            else:
                context, cache = tokens[:, max(0, n + 1 - block_size):n + 1], None

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, vocab_size=None):
        """Return idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, vocab_size))
        return torch.cat([idx] + new, dim=1)


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for FSDP's sharded matrices (DTensors), giving what one process gives: the momentum,
    weight decay and update stay on this process's shard (they are elementwise), but Newton-Schulz, which
    mixes whole rows and columns, runs on the whole matrix (gathered), and each process keeps its shard of
    the result. Orthogonalising the shards' DTensors instead would do sharded matmuls in bfloat16, which
    round differently. Same hyperparameters and state ('momentum_buffer') as torch's, so checkpoints move
    between the two. Plain tensors work too (nothing to gather)."""

    @torch.no_grad()
    def step(self):
        from torch.distributed.tensor import DTensor, distribute_tensor  # here: importing it costs ~0.7 s
        for group in self.param_groups:
            lr, momentum = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group['nesterov'] else buf
                sharded = isinstance(update, DTensor)
                ortho = newton_schulz(update.full_tensor() if sharded else update, group['ns_coefficients'],
                                      group['ns_steps'], group['eps'])
                if sharded:  # every process computed the same whole matrix: each keeps its own shard, no copying
                    ortho = distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
                p.mul_(1 - lr * group['weight_decay'])
                p.add_(ortho, alpha=-lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))  # torch's 'original'


def newton_schulz(G, coefficients, steps, eps):
    """The orthogonalisation of Muon (Keller Jordan's quintic iteration, in bfloat16), op for op as
    torch.optim.Muon's, so that ShardedMuon's result is bitwise that of torch.optim.Muon."""
    a, b, c = coefficients
    X = G.bfloat16()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if G.size(0) > G.size(1) else X


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, vocab_size) -> (B, 1). generator: the random numbers' source (a
    request's own, in the server); the global one by default."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k)  # exactly k kept, even when values tie
        logits = torch.full_like(logits, -float('inf')).scatter_(-1, indices, values)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the ones more likely than it already reach top_p (the top one always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # inverse-CDF sampling: one uniform number per row (multinomial draws one per token, ~1 ms for GPT-2)
    cdf = probs.cumsum(dim=-1)  # (B, vocab_size)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)  # first token with cdf > u


def padded_vocab_size(vocab_size):
    """vocab_size rounded up to a multiple of 64, which makes the head's matmul faster (GPT-2's 50257 -> 50304),
    unless that adds more than 1% of rows (a character vocabulary's 65 stays 65)."""
    padded = math.ceil(vocab_size / 64) * 64
    return padded if padded - vocab_size < 0.01 * vocab_size else vocab_size


LORA_TARGETS = ('c_attn', 'c_proj', 'c_fc')  # the Linears of a block: attention's two, the MLP's two (c_proj names both)


def add_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Freeze every parameter of model, then put trainable LoRA adapters on the Linears named in targets."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight, W += (B @ A) * alpha / rank, leaving plain Linears: the same
    function at the base model's cost. A model without adapters is returned as it is."""
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if isinstance(layer, LoRALinear):
                layer.weight += (layer.lora_B @ layer.lora_A) * layer.scale
                plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device='meta')
                plain.weight, plain.bias = layer.weight, layer.bias
                setattr(parent, name, plain)
    return model


def lora_state_dict(state_dict):
    """Only the adapters of a model's state dict: what a LoRA checkpoint stores, next to a reference to its base."""
    return {k: v for k, v in state_dict.items() if '.lora_' in k}
