"""Continuous batching: rows at their own lengths decode as each would alone (RowCache), and the server's
Batcher serves many clients at once."""

import json
import os
import socket
import threading
import time

import pytest
import requests
import torch

from decode import KVCache, RowCache
from model import GPT, GPTConfig
from test_serve import ckpt, greedy, start_server  # noqa: F401 (ckpt: a fixture, the tiny model)


@pytest.mark.parametrize('rope', [False, True])
def test_ragged_rows_decode_as_each_alone(rope):
    """Prompts of 3, 9 and 14 tokens in one RowCache, then 6 steps together: every row's logits equal those of
    a plain forward pass over that sequence alone, within 1e-5 in float32, and the greedy tokens are identical."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, rope=rope)).eval()
    prompts = [torch.randint(50, (n,)).tolist() for n in (3, 9, 14)]
    cache = RowCache(2, rows=4, max_len=32)
    first = []
    for row, prompt in enumerate(prompts):  # each prompt read into its own KVCache, then loaded into a row
        own = KVCache(2, len(prompt))
        logits, _ = model(torch.tensor([prompt]), cache=own)
        cache.load(row, own, len(prompt))
        first.append(logits[0, -1].argmax().item())
    cache.n = len(prompts)
    seqs = [p + [t] for p, t in zip(prompts, first)]
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache)  # (3, 1, vocab)
            for s, row_logits in zip(seqs, logits[:, -1]):
                alone, _ = model(torch.tensor([s]))  # the plain forward over the whole sequence
                torch.testing.assert_close(row_logits, alone[0, -1], atol=1e-5, rtol=1e-5)
                s.append(row_logits.argmax().item())
    for prompt, s in zip(prompts, seqs):  # the same greedy tokens as generate() alone
        alone = model.generate(torch.tensor([prompt]), 7, temperature=0)[0].tolist()
        assert s == alone
    # a finished row leaves: the last row moves into its place and goes on as before
    cache.move(2, 0)
    seqs[0] = seqs.pop()
    cache.n = 2
    logits, _ = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache)
    for s, row_logits in zip(seqs, logits[:, -1]):
        torch.testing.assert_close(row_logits, model(torch.tensor([s]))[0][0, -1], atol=1e-5, rtol=1e-5)


class Letters:
    """A tokenizer for a 30-token model: id i is one letter; 29 ends a text."""
    vocab_size, eot = 30, 29

    def decode(self, ids):
        return ''.join(chr(65 + i) for i in ids)


@pytest.mark.parametrize('rope', [False, True])
def test_the_batcher_step_by_step(rope):
    """The Batcher in-process, on a model with a context of 160 (longer than a prompt chunk of 64): prompts of 1
    to 300 tokens (read in chunks, together when of the same length, or past block_size from the start), n = 2,
    several prompts in a request, requests arriving every other step, one leaving midway. Every completion is
    the model's greedy text alone; rows, the cache budget and the requests' bookkeeping end empty."""
    import queue
    import random
    from types import SimpleNamespace
    from batcher import PREFILL_CHUNK, Batcher
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=160, vocab_size=30, n_layer=2, n_head=2, n_embd=32, rope=rope)).eval()
    assert model.config.block_size > PREFILL_CHUNK
    rng = random.Random(1)
    prompts = [[rng.randrange(29) for _ in range(n)] for n in (1, 3, 3, 5, 64, 65, 130, 159, 160, 167, 300)]

    def request(ids, max_tokens, n=1):
        return SimpleNamespace(prompts=ids, req=dict(n=n, max_tokens=max_tokens, temperature=0.0, top_k=0, top_p=1.0,
                                                     seed=None, stop=[], stream=True), end_ids={29},
                               events=queue.Queue(), cancelled=False, finished=False, error=None, logprobs={}, held=[])
    jobs = [request([p], 40, n=2) for p in prompts] + [request(prompts[:4], 25, n=2), request([prompts[2]], 200)]
    gone = request([prompts[5]], 200)
    app = SimpleNamespace(model=model, tokenizer=Letters(), device='cpu', max_batch=8, max_batch_tokens=8 * 160)
    batcher, arriving, steps = Batcher(app), jobs[:6] + [gone] + jobs[6:], 0
    while arriving or batcher.busy():
        if arriving and steps % 2 == 0:
            batcher.waiting.append(arriving.pop(0))
        gone.cancelled = gone.cancelled or steps == 20
        batcher.step()
        steps += 1
        assert len(batcher.rows) == batcher.cache.n <= batcher.booked <= app.max_batch
    batcher.leave()
    assert (batcher.booked, batcher.reserved, batcher.jobs, batcher.rows, batcher.long) == (0, 0, [], [], [])
    assert list(iter(gone.events.get, None)) is not None and gone.finished
    for job in jobs:
        events = list(iter(job.events.get, None))
        for p, ids in enumerate(job.prompts):
            alone = model.generate(torch.tensor([ids]), job.req['max_tokens'], temperature=0)[0, len(ids):].tolist()
            expected = Letters().decode(alone[:alone.index(29)] if 29 in alone else alone)
            for i in range(job.req['n']):
                mine = [e for e in events if e[0] == p * job.req['n'] + i]
                assert ''.join(e[1] for e in mine) == expected and [e[2] for e in mine if e[2]] in (['stop'], ['length'])


def test_n_completions_decode_in_one_forward_pass_per_step():
    """A request for n = 3 completions of 12 tokens: one pass reads the prompt, then each step is one forward pass
    over all three rows (11 in all), not one per completion."""
    import queue
    from types import SimpleNamespace
    from batcher import Batcher
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=30, n_layer=2, n_head=2, n_embd=32)).eval()
    batches, forward = [], model.forward

    def counted(idx, *args, **kwargs):
        batches.append(tuple(idx.shape))
        return forward(idx, *args, **kwargs)
    model.forward = counted
    job = SimpleNamespace(prompts=[[1, 2, 3]], req=dict(n=3, max_tokens=12, temperature=1.0, top_k=0, top_p=1.0,
                                                        seed=None, stop=[], stream=True), end_ids=set(),
                          events=queue.Queue(), cancelled=False, finished=False, error=None, logprobs={}, held=[])
    app = SimpleNamespace(model=model, tokenizer=Letters(), device='cpu', max_batch=8, max_batch_tokens=8 * 32)
    batcher = Batcher(app)
    batcher.waiting.append(job)
    while batcher.busy():
        batcher.step()
    events = list(iter(job.events.get, None))
    texts = [''.join(e[1] for e in events if e[0] == i) for i in range(3)]
    assert all(len(t) == 12 for t in texts) and len(set(texts)) > 1  # three completions, sampled apart
    assert batches == [(1, 3)] + [(3, 1)] * 11


# -----------------------------------------------------------------------------
# the server: requests decoded together

@pytest.fixture(scope='module')
def small(ckpt):
    """A server with room for 2 completions at once and 2 requests waiting."""
    proc, url = start_server(ckpt, os.path.join(os.path.dirname(ckpt), 'small.log'), '--max_batch=2', '--max_queue=2')
    yield url
    proc.kill()
    proc.wait()


def post(url, **body):
    return requests.post(url + '/v1/completions', json=body, timeout=60)


def stream_text(url, chat=False, **body):
    """(the streamed text, the time its first piece came) of a streamed request."""
    path, first, text = '/v1/chat/completions' if chat else '/v1/completions', None, ''
    with requests.post(url + path, json={**body, 'stream': True}, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith('data: {'):
                choices = json.loads(line[6:])['choices']
                piece = (choices[0]['delta'].get('content') or '') if chat and choices else \
                    (choices[0]['text'] if choices else '')
                if piece and first is None:
                    first = time.time()
                text += piece
    return text, first


def test_many_clients_with_their_own_settings_get_what_they_asked_for(ckpt):
    """20 clients at once, streaming or not, greedy or seeded sampling, with their own stops and lengths: each
    gets the text it gets alone (a seeded request's text does not depend on the others in the batch)."""
    proc, url = start_server(ckpt, os.path.join(os.path.dirname(ckpt), 'many.log'), '--max_batch=8')
    try:
        prompts = ['The', 'Where', 'A', 'She', 'dog']
        jobs = [dict(prompt=prompts[i % 5], max_tokens=5 + i, temperature=0 if i % 3 else 0.9, seed=i, top_k=5 * (i % 2),
                     stop=['.'] if i % 4 == 0 else None, stream=i % 2 == 1) for i in range(20)]
        alone = [post(url, **{**job, 'stream': False}).json()['choices'][0]['text'] for job in jobs]
        assert alone[1] == greedy(ckpt, 'Where', 6)  # (job 1 is greedy, without a stop)
        together = [None] * len(jobs)

        def client(i):
            job = jobs[i]
            together[i] = stream_text(url, **job)[0] if job['stream'] else post(url, **job).json()['choices'][0]['text']

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
    finally:
        proc.kill()
        proc.wait()


def test_a_request_joins_a_running_batch_without_restarting_it(ckpt):
    proc, url = start_server(ckpt, os.path.join(os.path.dirname(ckpt), 'join.log'))
    try:
        long_alone = post(url, prompt='The', max_tokens=1000, temperature=0).json()['choices'][0]['text']
        result = {}
        thread = threading.Thread(target=lambda: result.update(long=stream_text(url, prompt='The', max_tokens=1000,
                                                                                temperature=0)))
        thread.start()
        time.sleep(0.2)  # the long one is under way
        short = post(url, prompt='Where', max_tokens=4, temperature=0).json()['choices'][0]['text']
        long_still_running = thread.is_alive()  # the short one did not wait for the long one's 1000 tokens
        thread.join(120)
        assert short == greedy(ckpt, 'Where', 4) and long_still_running
        assert result['long'][0] == long_alone  # not restarted, not disturbed
    finally:
        proc.kill()
        proc.wait()


def test_admission_within_max_batch_and_a_full_queue_is_429(small, ckpt):
    # n = 3 completions can never fit 2 rows: refused at once
    r = post(small, prompt='The', max_tokens=3, n=3)
    assert r.status_code == 400 and 'more than the server\'s max_batch 2' in r.json()['error']['message']
    # 2 long requests fill the batch, 2 more wait: the next one is told to come back
    results, threads = {}, []
    for i in range(4):
        threads.append(threading.Thread(target=lambda i=i: results.update(
            {i: post(small, prompt='The', max_tokens=1024, temperature=0)})))
        threads[-1].start()
        time.sleep(0.05)
    r = post(small, prompt='The', max_tokens=3)
    assert r.status_code == 429 and r.headers['Retry-After'] == '1' and 'already waiting' in r.json()['error']['message']
    for t in threads:
        t.join(120)
    texts = {r.json()['choices'][0]['text'] for r in results.values()}
    assert len(results) == 4 and texts == {greedy(ckpt, 'The', 1024)}  # the waiting ones got in when rows freed
    assert post(small, prompt='The', max_tokens=3).status_code == 200


def test_a_client_leaving_frees_its_row(small, ckpt):
    """With 2 rows, two clients that leave mid-stream must not keep them: the next request is admitted."""
    body = json.dumps({'prompt': 'The', 'max_tokens': 1024, 'stream': True}).encode()
    port = int(small.rsplit(':', 1)[1])
    for _ in range(2):
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                      b'Content-Length: ' + str(len(body)).encode() + b'\r\n\r\n' + body)
            assert b'data: ' in s.recv(4096) + s.recv(4096)
    r = post(small, prompt='Where', max_tokens=4, temperature=0)  # admitted once the rows are freed
    assert r.status_code == 200 and r.json()['choices'][0]['text'] == greedy(ckpt, 'Where', 4)
    log = open(os.path.join(os.path.dirname(ckpt), 'small.log')).read()
    assert log.count('client went away') >= 2  # both noticed, their generations stopped (not run to the end)


def test_admission_keeps_within_the_cache_budget(ckpt):
    """max_batch_tokens=40: a request of 3 + 1000 tokens (32 of cache at most) leaves no room for one of 5 + 20,
    which waits for it though rows are free; one that could never fit (2 completions of 32 tokens) is a 400."""
    proc, url = start_server(ckpt, os.path.join(os.path.dirname(ckpt), 'budget.log'), '--max_batch=4',
                             '--max_batch_tokens=40')
    try:
        r = post(url, prompt='The', max_tokens=40, n=2)
        assert r.status_code == 400 and 'max_batch_tokens 40' in r.json()['error']['message']
        done = {}
        first = threading.Thread(target=lambda: done.update(a=(stream_text(url, prompt='The', max_tokens=1000,
                                                                           temperature=0), time.time())))
        first.start()
        time.sleep(0.05)
        second = post(url, prompt='Where', max_tokens=20, temperature=0)
        done['b'] = time.time()
        first.join(60)
        assert second.json()['choices'][0]['text'] == greedy(ckpt, 'Where', 20)
        assert done['a'][0][0] == greedy(ckpt, 'The', 1000) and done['a'][1] <= done['b']  # b waited for a's cache
    finally:
        proc.kill()
        proc.wait()


def test_chat_and_completions_mixed_in_one_batch(chat_model):
    """A chat model's server: 12 chat requests and 12 completions at once, streamed or not, each greedy text the
    same as when it is alone."""
    from conftest import chat_conversations
    proc, url = start_server(chat_model, os.path.join(os.path.dirname(chat_model), 'mixed.log'))
    try:
        questions = [c['messages'][0]['content'] for c in chat_conversations()[:6]]
        jobs = [('chat', q, s) for q in questions for s in (False, True)] + \
               [('text', q[:12], s) for q in questions for s in (False, True)]

        def ask(kind, text, stream):
            if kind == 'chat':
                body = {'messages': [{'role': 'user', 'content': text}], 'max_tokens': 40, 'temperature': 0}
                if stream:
                    return stream_text(url, chat=True, **body)[0]
                r = requests.post(url + '/v1/chat/completions', json=body, timeout=60)
                return r.json()['choices'][0]['message']['content']
            body = {'prompt': text, 'max_tokens': 20, 'temperature': 0}
            return stream_text(url, **body)[0] if stream else post(url, **body).json()['choices'][0]['text']

        alone = [ask(*job) for job in jobs]
        together = [None] * len(jobs)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(*jobs[i]))) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone and all(alone[:12])
    finally:
        proc.kill()
        proc.wait()
