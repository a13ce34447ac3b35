"""
Tokenizers, in one place: characters, GPT-2's BPE, a byte-level BPE trained on your own text (or a Hugging
Face Hub model's), their special tokens, and the chat template.

    tok = Tokenizer(meta)                  # meta: a dataset's meta.json, or a checkpoint's 'meta'
    tok.encode(text) -> ids                # ordinary text: "<|endoftext|>" in it is text, never the special id
    tok.decode(ids) -> text
    tok.render(messages) -> (ids, mask)    # a conversation; mask 1 on the tokens training predicts
    tok.render(messages, open_reply=True)  # a prompt: the conversation so far, then an open assistant turn

A meta is plain JSON, so a checkpoint carries it and torch.load(weights_only=True) still reads it:
    tokenizer       'char', 'gpt2' or 'bpe'
    vocab_size      ids in all, special tokens included; dtype: how the dataset stores them
    chars           (char) the characters: id = position
    pattern, ranks  (bpe) the regex that splits text before BPE, and each token's bytes in base64: id = position
                    (null where the id is a special token's)
    special         {name: id} of the special tokens
    chat_template   on chat datasets and the models trained on them: the template below
Nothing here imports torch, so prepare.py's workers start quickly.
"""

import base64
import binascii
import json
import re

import numpy as np

from dataset import GPT2_EOT, die, token_dtype

EOT = '<|endoftext|>'  # starts every document (and conversation) of a BPE dataset, as in GPT-2's
ROLES = ('system', 'user', 'assistant')
CHAT_TOKENS = tuple(f'<|{role}_{edge}|>' for role in ROLES for edge in ('start', 'end'))
SPECIAL_TOKENS = (EOT, *CHAT_TOKENS)  # what a trained BPE reserves, after its merged tokens
CHAT_TEMPLATE = ('[<|endoftext|>] [<|system_start|> text <|system_end|>] then, for each turn, <|user_start|> text '
                 '<|user_end|> <|assistant_start|> text <|assistant_end|>; trained: assistant text and its end')
# GPT-4's split pattern (cl100k), but digits in groups of at most 2, not 3: at the vocabularies people train
# here (a few thousand tokens) the 1,000 three-digit groups would take a large share of the vocabulary.
# Text is split into letters with one leading non-letter, digit pairs, punctuation runs, newlines and spaces;
# BPE merges only within a split, so no token crosses from a word into the next.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte is a token, then the special tokens
MAX_VOCAB = 2 ** 32  # ids are stored as uint32 at most


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # tiktoken downloads its files once; offline, it needs a cache
        die(f"could not load the GPT-2 BPE files ({type(e).__name__}): connect to the internet once, "
            "or set TIKTOKEN_CACHE_DIR to a directory that holds them")


class Tokenizer:
    """Text <-> ids for a meta (see the top of this file), with its special tokens and the chat template."""

    def __init__(self, meta, where='the tokenizer'):
        import tiktoken
        self.meta, self.kind, self.vocab_size = meta, meta.get('tokenizer'), meta.get('vocab_size')
        try:
            self.special = {str(name): int(i) for name, i in special_tokens(meta).items()}
            if self.kind == 'char':
                self.chars = list(meta['chars'])
                self.stoi = {ch: i for i, ch in enumerate(self.chars)}
                self.codes = np.array([ord(ch) for ch in self.chars], dtype=np.uint32)  # sorted, as prepare.py writes
                if np.any(np.diff(self.codes.astype(np.int64)) <= 0):
                    raise ValueError("its characters are not sorted and distinct")
            elif self.kind == 'gpt2':
                gpt2 = gpt2_encoding()
                # GPT-2's ranks and pattern with the extra special tokens, as tiktoken's README extends an encoding
                self.enc = gpt2 if len(self.special) == 1 else tiktoken.Encoding(
                    'gpt2-chat', pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                    special_tokens=self.special)
            elif self.kind == 'bpe':
                ranks = {base64.b64decode(b, validate=True): i for i, b in enumerate(meta['ranks']) if b is not None}
                self.enc = tiktoken.Encoding(f"bpe-{len(ranks)}", pat_str=meta['pattern'], mergeable_ranks=ranks,
                                             special_tokens=self.special)
            else:
                raise ValueError(f"unknown tokenizer {self.kind!r}: expected 'char', 'gpt2' or 'bpe'")
            if not isinstance(self.vocab_size, int) or self.vocab_size <= max(self.special.values(), default=0):
                raise ValueError(f"vocab_size {self.vocab_size!r} does not hold its tokens")
        except (KeyError, ValueError, TypeError, binascii.Error) as e:
            die(f"{where} is damaged ({type(e).__name__}: {e}): prepare the dataset again, or use another checkpoint")
        self.eot = self.special.get(EOT, meta.get('eot'))  # ends a text; None for characters
        self.names = {i: name for name, i in self.special.items()}
        self.reply_ends = set(self.special.values())  # a reply ends at any of them: it can't hold another turn
        self.chat = 'chat_template' in meta  # fine-tuned on conversations (a BPE has the tokens from the start)

    def encode(self, text):
        """Ordinary text -> list of ids. Special-token strings in it are text."""
        if self.kind == 'char':
            return self.encode_array(text).tolist()
        return self.enc.encode_ordinary(text)

    def encode_special(self, text):
        """encode, except that special tokens' names in text are those tokens: '<|endoftext|>' is one id (the
        server's /tokenize, as vLLM's, for lm-evaluation-harness)."""
        if not self.special:
            return self.encode(text)
        pieces = re.split('(' + '|'.join(map(re.escape, self.special)) + ')', text)  # text, name, text, ...
        return [i for k, piece in enumerate(pieces) for i in ([self.special[piece]] if k % 2 else self.encode(piece))]

    def encode_array(self, text):
        """encode for bulk text: -> np.ndarray, without a Python int per token."""
        if self.kind != 'char':
            # with no special token allowed or disallowed, "<|endoftext|>" in a text is plain text
            return self.enc.encode_to_numpy(text, disallowed_special=())
        values = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
        ids = np.searchsorted(self.codes, values).clip(max=len(self.codes) - 1)
        if not np.array_equal(self.codes[ids], values):
            unknown = ''.join(sorted(set(text) - self.stoi.keys()))
            die(f"characters {unknown!r} are not in this character vocabulary: use only characters of its "
                "training text, or prepare a vocabulary of your own (python prepare.py NAME --tokenizer=char)")
        return ids

    def decode(self, ids):
        if self.kind == 'char':
            n = len(self.chars)
            return ''.join(self.chars[i] if i < n else self.names.get(i, '') for i in ids)
        return self.enc.decode(ids)

    def render(self, messages, open_reply=False):
        """A conversation in the chat template -> (ids, mask). mask[i] is 1 where training predicts ids[i]:
        each assistant turn's text and its end token (unless the message has "weight": 0). Message text is
        ordinary text, so it cannot open or close a turn. With open_reply, the last message is the user's and
        the ids end with an open assistant turn, for the model to continue; otherwise the last is the assistant's.
        A conversation that breaks the template raises ValueError, saying how."""
        if not set(CHAT_TOKENS) <= self.special.keys():
            raise ValueError("this tokenizer has no chat tokens: prepare the conversations with prepare.py, "
                             "which adds them")
        check_roles(messages, last='user' if open_reply else 'assistant')
        ids, mask = ([self.eot], [0]) if self.eot is not None else ([], [])
        for message in messages:
            role, text = message['role'], message['content']
            if role == 'assistant' and not text and not open_reply:
                raise ValueError("an assistant turn is empty: there is nothing to train on")
            content = self.encode(text)
            trained = int(role == 'assistant' and message.get('weight', 1) != 0)  # OpenAI's "weight": 0 skips a turn
            ids += [self.special[f'<|{role}_start|>'], *content, self.special[f'<|{role}_end|>']]
            mask += [0] + [trained] * (len(content) + 1)
        if open_reply:
            ids.append(self.special['<|assistant_start|>'])
            mask.append(0)
        return ids, mask

    def fit_prompt(self, messages, block_size, max_new_tokens):
        """render(messages, open_reply=True) -> (ids, messages dropped), in at most block_size minus room for
        a reply of max_new_tokens (at most half the context: the prompt keeps at least the other half). The
        oldest exchanges (user and assistant) go first, whole; a system message stays. ValueError when the
        last user turn alone (with the system message) does not fit."""
        max_len = block_size - min(max_new_tokens, block_size // 2)
        ids, _ = self.render(messages, open_reply=True)  # checks the roles too
        system = 1 if messages[0]['role'] == 'system' else 0
        sizes = [len(self.encode(m['content'])) + 2 for m in messages[system:]]  # text, start and end tokens
        dropped, excess = 0, len(ids) - max_len
        while excess > 0 and dropped + 1 < len(sizes):
            excess -= sizes[dropped] + sizes[dropped + 1]
            dropped += 2
        if excess > 0:
            raise ValueError(f"the last user message takes {excess + max_len} tokens with the template"
                             f"{' and the system message' if system else ''}, more than the {max_len} the context "
                             f"leaves for it (block_size {block_size}, a reply of up to {max_new_tokens}): shorten it")
        return (self.render(messages[:system] + messages[system + dropped:], open_reply=True)[0] if dropped else ids,
                dropped)


def check_roles(messages, last):
    """Raise ValueError unless messages are: a system message or not, then user and assistant turns in
    turn, starting with the user's and ending with a `last` one; each {'role', 'content': str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get('content'), str):
            raise ValueError(f"message {i + 1} must be an object with a string 'content'")
        role = message.get('role')
        if role not in ROLES:
            raise ValueError(f"message {i + 1} has role {role!r}: use system, user or assistant")
        first_turn = 1 if messages[0]['role'] == 'system' else 0
        expected = 'system' if i < first_turn else ('user', 'assistant')[(i - first_turn) % 2]
        if role != expected:
            raise ValueError(f"message {i + 1} is the {role}'s where the {expected}'s is due: after an optional "
                             "system message, user and assistant take turns, starting with the user")
    if messages[-1]['role'] != last:
        raise ValueError(f"the last message is the {messages[-1]['role']}'s: it must be the {last}'s")


def with_chat_tokens(meta):
    """meta with the chat tokens it lacks added after its ids (GPT-2: from 50257; characters: after the last
    one) and the chat template recorded."""
    special = dict(meta.get('special') or {})
    size = meta['vocab_size']
    for name in CHAT_TOKENS:
        if name not in special:
            special[name], size = size, size + 1
    return {**meta, 'special': special, 'vocab_size': size, 'dtype': token_dtype(size), 'chat_template': CHAT_TEMPLATE}


def base_meta(meta):
    """The part of a meta that says what ids mean, without how a dataset stores them or whether it chats."""
    return {k: v for k, v in meta.items() if k not in ('dtype', 'chat_template', 'vocab_size', 'special', 'source')}


def special_tokens(meta):
    """{name: id} of a meta's special tokens (GPT-2's <|endoftext|> included), without loading the tokenizer."""
    return {**({EOT: GPT2_EOT} if meta.get('tokenizer') == 'gpt2' else {}), **(meta.get('special') or {})}


def compatible(model_meta, data_meta):
    """Whether ids of data_meta mean what they meant to a model trained on model_meta: the same tokenizer,
    and special tokens that agree where both have them (the data may add some, such as the chat tokens)."""
    if base_meta(model_meta) != base_meta(data_meta):
        return False
    model_special, data_special = special_tokens(model_meta), special_tokens(data_meta)
    by_id = {i: name for name, i in model_special.items()}
    return all(model_special.get(name, i) == i and by_id.get(i, name) == name for name, i in data_special.items())


def check_vocab_size(vocab_size):
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        die(f"vocab_size must be at least {MIN_BPE_VOCAB} (the 256 bytes and {len(SPECIAL_TOKENS)} special tokens) "
            f"and at most {MAX_VOCAB:,} (uint32 ids), got {vocab_size}")


def train_bpe(texts, vocab_size, pattern=SPLIT_PATTERN):
    """A byte-level BPE trained on the texts (an iterable of str, streamed) -> its meta, the special tokens
    after the merged ones. rustbpe does the training (see the README for why it, not HF tokenizers)."""
    import rustbpe
    check_vocab_size(vocab_size)
    bpe = rustbpe.Tokenizer()
    # it counts this many texts at a time in parallel (prepare.py gives pieces of at most ~16k characters)
    bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), buffer_size=1024, pattern=pattern)
    ranks = [base64.b64encode(token).decode() for token, _ in sorted(bpe.get_mergeable_ranks(), key=lambda t: t[1])]
    special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    size = len(ranks) + len(special)  # smaller than asked when the text has fewer pairs to merge
    return {'tokenizer': 'bpe', 'vocab_size': size, 'pattern': pattern, 'ranks': ranks, 'special': special}


def byte_level_alphabet():
    """{byte: the character that stands for it} in byte-level BPE files (GPT-2's vocab.json, Hugging Face's
    tokenizer.json): printable bytes stand for themselves, the others for characters from U+0100 on."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def from_tokenizer_json(path, eos_id=None):
    """The meta of a Hugging Face tokenizer.json of a byte-level BPE (GPT-2's kind), so that tiktoken encodes
    with it. Its token ids are the ranks: that gives Hugging Face's tokens when each merge makes a token of a
    higher id than the merges before it, which is checked. eos_id: config.json's, if the model has one."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        model, pre = data['model'], data.get('pre_tokenizer') or {}
        if model.get('type') != 'BPE' or model.get('byte_fallback') or model.get('continuing_subword_prefix') \
                or model.get('end_of_word_suffix') or data.get('normalizer'):
            raise ValueError("it is not a plain byte-level BPE (type BPE, no normalizer, prefix or suffix)")
        if pre.get('type') == 'ByteLevel' and pre.get('use_regex', True) and not pre.get('add_prefix_space'):
            pattern = GPT2_PATTERN
        elif pre.get('type') == 'Sequence' and [p.get('type') for p in pre['pretokenizers']] == ['Split', 'ByteLevel'] \
                and pre['pretokenizers'][0].get('behavior') == 'Isolated' and not pre['pretokenizers'][0].get('invert') \
                and not pre['pretokenizers'][1].get('use_regex') and not pre['pretokenizers'][1].get('add_prefix_space'):
            pattern = pre['pretokenizers'][0]['pattern']['Regex']
        else:
            raise ValueError(f"its pre-tokenizer {json.dumps(pre)[:80]} is not GPT-2's byte-level split or a regex "
                             "split then byte-level")
        special = {t['content']: int(t['id']) for t in data.get('added_tokens', [])}
        vocab = {token: int(i) for token, i in model['vocab'].items()}
        size = max([*vocab.values(), *special.values()]) + 1
        ranks, to_byte = [None] * size, {c: b for b, c in byte_level_alphabet().items()}
        for token, i in vocab.items():
            if token not in special:
                ranks[i] = base64.b64encode(bytes(to_byte[c] for c in token)).decode()  # KeyError: not byte-level
        if sum(1 for r in ranks if r is not None and len(base64.b64decode(r)) == 1) != 256:
            raise ValueError("it does not have a token for each of the 256 bytes")
        previous = -1
        for merge in model['merges']:
            left, right = merge.split(' ') if isinstance(merge, str) else merge
            made = vocab[left + right]
            if made <= previous:
                raise ValueError(f"its merge {left!r} + {right!r} makes id {made}, lower than an earlier merge's: "
                                 "ids that do not follow the merges' order are not supported")
            previous = made
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        die(f"{path} is not a tokenizer.json gptforge can use ({type(e).__name__}: {e})")
    eot = eos_id if eos_id in special.values() else special.get(EOT)
    return {'tokenizer': 'bpe', 'vocab_size': size, 'pattern': pattern, 'ranks': ranks, 'special': special,
            **({'eot': eot} if eot is not None and EOT not in special else {})}


def hub_tokenizer(repo):
    """The meta of a Hub repository's tokenizer.json (downloaded into the cache with its model), or None if
    it has none."""
    import hub
    path = hub.fetch_file(repo, 'tokenizer.json')
    if path is None:
        return None
    config = hub.fetch_config(repo)
    return {**from_tokenizer_json(path, config.get('eos_token_id')), 'source': f'hub:{repo}'}
