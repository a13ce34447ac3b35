"""
Generation for the server: every request's completions decoded together (continuous batching), and the
text of a completion as its tokens come.

    batcher = Batcher(app)       # app: the model, tokenizer, device and the max_batch settings (serve.py)
    batcher.waiting.append(job)  # a request: its prompts, settings and the queue its events go to
    while batcher.busy():
        batcher.step()           # admit, read new prompts, one token for every completion

complete() generates one request's completions as a batch of its own (sample.py --chat); both turn tokens
into text with Completion.
"""

import traceback
from collections import deque
from types import SimpleNamespace

import torch

from decode import KVCache, RowCache
from model import sample_next
from tasks import token_logprobs

PREFILL_CHUNK = 64  # tokens of a prompt read in a step: a long prompt delays the batch's next token by about a step
PREFILL_TOKENS = 256  # prompt tokens read in a step, all prompts together


def held_back(text, stops):
    """Length of the longest end of text that could be the start of a stop sequence: not sent yet."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class Completion:
    """One completion's text as its tokens come: feed(token) -> (new text, finish_reason) to send, or None while
    the text can't be sent yet (a character split across tokens). It stops at a token of end_ids (not part of
    the text), at a stop sequence (the text ends before it) or after max_tokens; text that might be the start of
    a stop sequence is held back until it is known not to be one."""

    def __init__(self, tokenizer, req, end_ids):
        self.tokenizer, self.stops, self.end_ids, self.max_tokens = tokenizer, req['stop'], end_ids, req['max_tokens']
        self.ids, self.tokens, self.sent, self.done = [], 0, 0, False  # tokens: generated, an end token included

    def feed(self, token):
        self.tokens += 1
        if token in self.end_ids:  # the model ended its text (GPT-2's <|endoftext|>): a stop, as in OpenAI's API
            self.done = True
            return self.tokenizer.decode(self.ids)[self.sent:], 'stop'
        self.ids.append(token)
        text, last = self.tokenizer.decode(self.ids), self.tokens == self.max_tokens
        if text.endswith('\ufffd') and not last:
            return None  # wait for the rest of a character split across tokens
        found = [j for j in (text.find(s) for s in self.stops) if j >= 0]
        if found or last:
            self.done = True
            return text[self.sent:min(found)] if found else text[self.sent:], 'stop' if found else 'length'
        end = len(text) - held_back(text, self.stops)
        chunk, self.sent = text[self.sent:end], end
        return chunk, None


def complete(model, tokenizer, device, ids, req, end_ids=None):
    """Generate one request's n completions as one batch through generate_stream; yield (index, new text,
    finish_reason, tokens generated). sample.py --chat answers this way (the server batches requests: Batcher).
    A sample also stops at a token of end_ids (default: the end of text). Seeding the global RNG here makes the
    seed alone decide the text."""
    end_ids = {tokenizer.eot} if end_ids is None else end_ids
    # the model sees the last block_size tokens anyway (as sample.py); dropping the rest here saves memory
    x = torch.tensor(ids[-model.config.block_size:], dtype=torch.long, device=device)[None, :].repeat(req['n'], 1)
    if req['seed'] is not None:
        torch.manual_seed(req['seed'])  # sample_next draws from the global RNG
    stream = model.generate_stream(x, req['max_tokens'], req['temperature'], req['top_k'] or None, req['top_p'],
                                   vocab_size=tokenizer.vocab_size)
    completions = [Completion(tokenizer, req, end_ids) for _ in range(req['n'])]
    for tokens in stream:
        for i, token in enumerate(tokens[:, 0].tolist()):
            if not completions[i].done:  # a stopped sample rides along in the batch until all have stopped
                event = completions[i].feed(token)
                if event:
                    yield i, *event, completions[i].tokens
        if all(c.done for c in completions):
            return  # stops generate_stream


@torch.no_grad()
def completion_logprobs(model, tokenizer, rows, start, top, device):
    """OpenAI's legacy logprobs of each row of token ids (at most block_size + 1 of them) from position start
    on: {tokens, token_logprobs, top_logprobs (the `top` likeliest tokens, likeliest first), text_offset}.
    A row's first token has no log-probability (null): nothing comes before it. Offsets count characters from
    the start of the row's text. Tokens that decode alike (the bytes of a split character) share one entry."""
    logprobs, y = token_logprobs(model, rows, tokenizer.vocab_size, device)  # (rows, width - 1, vocab)
    chosen = logprobs.gather(-1, y.clamp(min=0)[..., None])[..., 0].tolist()  # only these leave the device
    values, indices = logprobs.topk(top, dim=-1) if top else (None, None)
    values, indices = (values.tolist(), indices.tolist()) if top else (None, None)
    out = []
    for r, ids in enumerate(rows):
        n = len(ids) - 1
        tops = [None] + [{} for _ in range(n)]
        for j in range(n if top else 0):
            for i, v in zip(indices[r][j], values[r][j]):
                tops[j + 1].setdefault(tokenizer.decode([i]), v)
        out.append({'tokens': [tokenizer.decode([i]) for i in ids[start:]],
                    'token_logprobs': ([None] + chosen[r][:n])[start:], 'top_logprobs': tops[start:],
                    'text_offset': [len(tokenizer.decode(ids[:j])) for j in range(start, len(ids))]})
    return out


class Sequence:
    """One completion in the batch: choice `choice` of its job, its tokens (prompt and generated), its own random
    numbers (a seeded request's text depends on nothing else), its text (Completion), and the cache tokens it
    may fill (need: what it gives back to the budget when it ends)."""

    def __init__(self, job, choice, prompt, completion, device, need=0):
        self.job, self.choice, self.tokens, self.completion, self.need = job, choice, list(prompt), completion, need
        seed = job.req['seed']
        self.generator = None if seed is None else torch.Generator(device).manual_seed((seed * 1_000_003 + choice) % 2 ** 64)


class Batcher:
    """Continuous batching: every request's completions decoded together, one token each per forward pass.

    A step lets completions that ended leave (the last row fills each gap, and their rows and cache budget are
    free again); starts the waiting prompts, in order, while rows (max_batch: n per prompt) and cache tokens
    (max_batch_tokens: each completion counted at its prompt plus max_tokens, at most block_size) are free;
    reads a chunk of PREFILL_CHUNK tokens of the prompts being read, each into a KVCache of its own (prompts of
    the same length together), at most PREFILL_TOKENS in a step, so that long prompts delay the others by
    about a step; then decodes one token for every completion in the RowCache, in one forward pass. A prompt
    read in full gives its completions their first token, and they take rows. A completion that reaches
    block_size goes on as generate_stream does: each step re-reads its last block_size tokens (positions are
    learned, so cached keys no longer apply)."""

    def __init__(self, app):
        self.app, self.model, self.block_size = app, app.model, app.model.config.block_size
        self.cache = RowCache(self.model.config.n_layer, app.max_batch, self.block_size)
        self.waiting = deque()  # requests not started (a handler reads its length: a 429 past max_queue)
        self.prompts = deque()  # (job, prompt index) of the started requests, waiting for room
        self.reading = []  # prompts being read: job, p, context, need, cache, done
        self.rows = []  # the Sequence in each RowCache row
        self.long = []  # Sequences past block_size
        self.jobs = []  # started and not finished
        self.booked, self.reserved = 0, 0  # rows and cache tokens of the completions started and not ended

    def need(self, job, p):
        """Cache tokens a completion of prompt p may fill."""
        return min(self.block_size, len(job.prompts[p]) + job.req['max_tokens'])

    def room(self, job, p):
        """Whether prompt p's n completions fit in the rows and cache the started ones leave."""
        n = job.req['n']
        return self.booked + n <= self.app.max_batch and self.reserved + n * self.need(job, p) <= self.app.max_batch_tokens

    def never_fits(self, job):
        """Why a request could never start (too many completions, or cache), or None."""
        n = job.req['n']
        if n > self.app.max_batch or n * max(self.need(job, p) for p in range(len(job.prompts))) > \
                self.app.max_batch_tokens:
            return (f"this request's {n} completion(s) of a prompt need up to {n} rows and {n} x (prompt + max_tokens) "
                    f"tokens of cache, more than the server's max_batch {self.app.max_batch} and max_batch_tokens "
                    f"{self.app.max_batch_tokens}: ask for fewer completions (n) or a smaller max_tokens")
        return None

    def busy(self):
        return bool(self.waiting or self.jobs)

    @torch.inference_mode()  # (as generate_stream: the cache's tensors are only ever touched here)
    def step(self):
        self.leave()  # first: the rows of completions that ended last step are free again
        self.admit()
        self.read()
        self.decode()

    def admit(self):
        while self.prompts or self.waiting:
            if not self.prompts:  # the next request, once its first prompt has room: its prompts start in order
                job = self.waiting[0]
                if not self.room(job, 0) and job.req['max_tokens'] and not job.cancelled:
                    return
                self.waiting.popleft()
                self.jobs.append(job)
                job.seqs, job.pending = [], len(job.prompts) * job.req['n']
                if job.req['max_tokens'] == 0:  # an echo of the prompts, nothing generated
                    for p, ids in enumerate(job.prompts):
                        for i in range(job.req['n']):
                            job.seqs.append(Sequence(job, p * job.req['n'] + i, ids, None, self.app.device))
                            self.send(job, (p * job.req['n'] + i, '', 'length', 0))
                    self.finish(job)
                elif not job.cancelled:
                    self.prompts.extend((job, p) for p in range(len(job.prompts)))
                continue
            job, p = self.prompts[0]
            n, need = job.req['n'], self.need(job, p)
            if not self.room(job, p):
                return  # it waits for completions to end
            self.prompts.popleft()
            self.booked, self.reserved = self.booked + n, self.reserved + n * need
            context = job.prompts[p][-self.block_size:]  # the model sees the last block_size tokens, as sample.py
            self.reading.append(SimpleNamespace(job=job, p=p, context=context, need=need, done=0,
                                                cache=KVCache(self.model.config.n_layer, len(context))))

    def read(self):
        """Read a chunk of the prompts being read, at most PREFILL_TOKENS in all (and at least one chunk). Short
        prompts of the same length, read from the start, go as one batch."""
        groups, budget = {}, PREFILL_TOKENS
        for r in self.reading:
            short = r.done == 0 and len(r.context) <= PREFILL_CHUNK
            groups.setdefault(len(r.context) if short else id(r), []).append(r)
        for group in groups.values():
            if budget <= 0:
                return
            chunks = [r.context[r.done:r.done + PREFILL_CHUNK] for r in group]
            budget -= sum(map(len, chunks))
            cache = group[0].cache if len(group) == 1 else KVCache(self.model.config.n_layer, len(chunks[0]))
            logits, _ = self.model(torch.tensor(chunks, device=self.app.device), cache=cache)  # (B, 1, vocab)
            for row, r in enumerate(group):
                r.done += len(chunks[row])
                if r.done == len(r.context):  # read in full: its completions join the batch
                    self.reading = [x for x in self.reading if x is not r]
                    self.join(r, cache, row, logits[row, -1])

    def join(self, r, cache, row, logits):
        """A prompt has been read (into row `row` of cache): its n completions take rows of the batch (or go on
        past block_size), and sample their first token from logits (vocab,)."""
        job, n, seqs = r.job, r.job.req['n'], []
        for i in range(n):
            seq = Sequence(job, r.p * n + i, job.prompts[r.p], Completion(self.app.tokenizer, job.req, job.end_ids),
                           self.app.device, r.need)
            seqs.append(seq)
            if len(r.context) < self.block_size:
                self.cache.load(self.cache.n, cache, len(r.context), row)
                self.cache.n += 1
                self.rows.append(seq)
            else:
                self.long.append(seq)
        job.seqs += seqs
        self.emit(seqs, logits.expand(n, -1))  # the prompt's next-token distribution, for each completion

    def decode(self):
        self.leave()  # (completions whose first token ended them)
        if self.rows:
            x = torch.tensor([[seq.tokens[-1]] for seq in self.rows], device=self.app.device)
            logits, _ = self.model(x, cache=self.cache)  # (rows, 1, vocab): one token for every row
            self.emit(list(self.rows), logits[:, -1])
        if self.long:  # every window is block_size tokens long: one batch
            windows = torch.tensor([seq.tokens[-self.block_size:] for seq in self.long], device=self.app.device)
            logits, _ = self.model(windows)
            self.emit(list(self.long), logits[:, -1])

    def leave(self):
        """Completions that ended, or whose client went away, leave: the last row fills each gap, and their rows
        and cache budget are free again. Those whose row is full go on past block_size."""
        def release(seq):
            self.booked, self.reserved = self.booked - 1, self.reserved - seq.need
            if seq.job.cancelled:  # the log shows that a client who leaves costs no more tokens
                print(f"a completion stopped after {seq.completion.tokens} of {seq.job.req['max_tokens']} tokens: "
                      "its client went away", flush=True)

        for row in reversed(range(len(self.rows))):
            seq = self.rows[row]
            gone = seq.completion.done or seq.job.cancelled
            if gone or self.cache.lengths[row] >= self.block_size:
                last = len(self.rows) - 1
                if row != last:
                    self.cache.move(last, row)
                    self.rows[row] = self.rows[last]
                self.rows.pop()
                self.cache.n -= 1
                if gone:
                    release(seq)
                else:
                    self.long.append(seq)
        for seq in [seq for seq in self.long if seq.completion.done or seq.job.cancelled]:
            self.long.remove(seq)
            release(seq)
        for r in [r for r in self.reading if r.job.cancelled]:
            self.reading.remove(r)
            self.booked, self.reserved = self.booked - r.job.req['n'], self.reserved - r.job.req['n'] * r.need
        self.prompts = deque((job, p) for job, p in self.prompts if not job.cancelled)
        for job in [job for job in self.jobs if job.cancelled]:
            self.finish(job)

    def emit(self, seqs, logits):
        """Sample each sequence's next token from its row of logits (len(seqs), vocab) with its request's settings,
        and pass on its text. Rows that share their settings and draw from the global random numbers (no seed)
        are sampled in one call; a seeded one draws from its own generator."""
        logits, groups = logits[:, :self.app.tokenizer.vocab_size].float(), {}
        for i, seq in enumerate(seqs):
            req = seq.job.req
            groups.setdefault((req['temperature'], req['top_k'], req['top_p']) if seq.generator is None else i,
                              []).append(i)
        tokens = [0] * len(seqs)
        for rows in groups.values():
            seq = seqs[rows[0]]
            req = seq.job.req
            picked = sample_next(logits[rows], req['temperature'], req['top_k'] or None, req['top_p'], seq.generator)
            for i, token in zip(rows, picked[:, 0].tolist()):
                tokens[i] = token
        for seq, token in zip(seqs, tokens):
            seq.tokens.append(token)
            event = seq.completion.feed(token)
            if event:
                self.send(seq.job, (seq.choice, *event, seq.completion.tokens))
            if seq.completion.done:
                seq.job.pending -= 1
                if seq.job.pending == 0:
                    self.finish(seq.job)

    def send(self, job, event):
        if job.req['stream']:
            job.events.put(event)
        else:  # its handler waits for the whole answer: waking it for every token costs ~10% here
            job.held.append(event)

    @torch.no_grad()
    def finish(self, job):
        """A request is done (or gone): its logprobs if it asked for them, then its events and the end mark,
        whatever happens."""
        if job.finished:
            return
        job.finished = True
        self.jobs = [j for j in self.jobs if j is not job]
        try:
            top, n = job.req.get('logprobs'), job.req['n']
            if top is not None and not job.cancelled and not job.error:  # one more forward pass per prompt
                for p, ids in enumerate(job.prompts):
                    seqs = [seq for seq in job.seqs if seq.choice // n == p]
                    results = completion_logprobs(self.model, self.app.tokenizer, [seq.tokens for seq in seqs],
                                                  0 if job.req['echo'] else len(ids), top, self.app.device)
                    job.logprobs.update({seq.choice: result for seq, result in zip(seqs, results)})
        except Exception as e:  # out of memory, say: this request fails
            traceback.print_exc()
            job.error = f"logprobs failed: {type(e).__name__}: {e}"
        finally:
            for event in job.held:
                job.events.put(event)
            job.events.put(None)

    def fail(self, message):
        """Something went wrong in a step (out of memory, say): every started request fails, the server goes on."""
        for job in list(self.jobs):
            job.error = message
            self.finish(job)
        self.prompts.clear()
        self.reading, self.rows, self.long, self.cache.n, self.booked, self.reserved = [], [], [], 0, 0, 0
