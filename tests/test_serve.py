"""sample.py --serve: the OpenAI completions API, against a tiny character model trained here for a second."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests
import torch

from conftest import ROOT
from checkpoint import load_checkpoint
from model import GPT, GPTConfig
from batcher import complete, held_back

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine!\n"
        "Where is my cat? She sleeps on the mat, and dreams of fish.\n") * 4
CHARS = sorted(set(TEXT))


def train_tiny_checkpoint(out_dir):
    """A 2-layer model that has seen TEXT for 150 steps: its greedy text is words, not one letter repeated."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread synchronisation (worse on a busy machine)
    try:
        torch.manual_seed(0)
        args = dict(block_size=32, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
        model = GPT(GPTConfig(**args))
        data = torch.tensor([CHARS.index(c) for c in TEXT])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(150):
            starts = torch.randint(len(data) - 33, (16,)).tolist()
            x = torch.stack([data[s:s + 32] for s in starts])
            y = torch.stack([data[s + 1:s + 33] for s in starts])
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    meta = {'tokenizer': 'char', 'vocab_size': len(CHARS), 'chars': CHARS, 'dtype': 'uint16'}
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'model': model.state_dict(), 'model_args': args, 'config': {}, 'meta': meta, 'iter_num': 150},
               os.path.join(out_dir, 'ckpt.pt'))


def start_server(out_dir, log_path, *args):
    """sample.py --serve (and args) on a free port of 127.0.0.1 -> (process, base url), once it answers."""
    log = open(log_path, 'w')
    # one thread: the model is tiny, and the machine may be busy with other work
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={out_dir}', '--serve',
                             '--port=0', '--device=cpu', '--dtype=float32', *args],
                            cwd=os.path.dirname(out_dir), stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        found = re.search(r'on (http://127\.0\.0\.1:\d+)/v1', open(log_path).read())
        if found and requests.get(found.group(1) + '/v1/models', timeout=5).ok:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{open(log_path).read()}")


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('serve') / 'out')
    train_tiny_checkpoint(out_dir)
    return out_dir


@pytest.fixture(scope='module')
def server(ckpt):
    log_path = os.path.join(os.path.dirname(ckpt), 'server.log')
    proc, url = start_server(ckpt, log_path)
    yield SimpleNamespace(url=url, log=log_path, proc=proc)
    proc.kill()
    proc.wait()


def post(server, **body):
    return requests.post(server.url + '/v1/completions', json=body, timeout=30)


def stream_events(server, **body):
    """The parsed events of a streamed completion, checking that it ends with data: [DONE]."""
    with requests.post(server.url + '/v1/completions', json={**body, 'stream': True}, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers['Content-Type'] == 'text/event-stream'
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith('data: ') for line in lines) and lines[-1] == 'data: [DONE]'
    return [json.loads(line[len('data: '):]) for line in lines[:-1]]


def greedy(ckpt, prompt, max_tokens):
    """What the model's own generate() continues prompt with, greedily: the reference for the server."""
    model, _ = load_checkpoint(ckpt)
    x = torch.tensor([[CHARS.index(c) for c in prompt]])
    return ''.join(CHARS[i] for i in model.eval().generate(x, max_tokens, temperature=0)[0, x.size(1):].tolist())


# -----------------------------------------------------------------------------
# the text logic, with a scripted model: stop sequences and characters split across tokens

class Scripted:
    """Stands in for GPT: generate_stream yields the given rows of tokens, one column per step."""

    def __init__(self, rows):
        self.rows, self.steps, self.config = rows, 0, SimpleNamespace(block_size=8)

    def generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, vocab_size):
        for step in range(max_new_tokens):
            self.steps += 1
            yield torch.tensor([[row[step]] for row in self.rows])


def utf8_decode(ids):  # byte tokens: a character like é takes two, as BPE may split it
    return bytes(ids).decode('utf-8', errors='replace')


EOT = 300  # an end-of-text id past the bytes, as GPT-2's <|endoftext|> is past its other tokens


def run_complete(rows, stop, max_tokens=None):
    model = Scripted(rows)
    req = dict(n=len(rows), stop=stop, seed=None, max_tokens=max_tokens or len(rows[0]), temperature=1.0, top_k=0,
               top_p=1.0)
    tokenizer = SimpleNamespace(decode=utf8_decode, vocab_size=EOT + 1, eot=EOT)
    return model, list(complete(model, tokenizer, 'cpu', [0], req))


def test_held_back_is_the_end_that_could_start_a_stop_sequence():
    assert held_back('abc EN', ['END']) == 2
    assert held_back('abc E', ['xyz', 'END']) == 1
    assert held_back('abc', ['xyz']) == 0 and held_back('abc', []) == 0
    assert held_back('EN', ['ENDING']) == 2


def test_complete_stops_holds_back_and_waits_for_split_characters():
    text = 'héllo wörld END more'.encode()
    model, events = run_complete([list(text)], ['END', 'zzz'])
    assert ''.join(e[1] for e in events) == 'héllo wörld '
    assert events[-1][2:] == ('stop', len('héllo wörld END'.encode()))
    assert model.steps == len('héllo wörld END'.encode())  # generation stopped with the sample
    assert all('\ufffd' not in e[1] and 'E' not in e[1] for e in events)  # nothing sent that might be the stop
    assert [e[2] for e in events[:-1]] == [None] * (len(events) - 1)

    _, events = run_complete([list(text)], [])  # no stop: every character, finish_reason 'length'
    assert ''.join(e[1] for e in events) == 'héllo wörld END more' and events[-1][2:] == ('length', len(text))
    _, events = run_complete([list(text)], ['ENDING'])  # a held-back 'END' is sent when it turns out not to stop
    assert ''.join(e[1] for e in events) == 'héllo wörld END more'
    # a character cut off by max_tokens is sent as it decodes
    _, events = run_complete([list('ab€'.encode())], [], max_tokens=3)
    assert ''.join(e[1] for e in events) == 'ab\ufffd'


def test_complete_batch_runs_until_every_sample_has_stopped():
    rows = [list(b'one. two. three.'), list(b'first and second')]
    model, events = run_complete(rows, ['.'])
    texts = {i: ''.join(e[1] for e in events if e[0] == i) for i in (0, 1)}
    assert texts == {0: 'one', 1: 'first and second'}
    assert [(e[0], e[2], e[3]) for e in events if e[2]] == [(0, 'stop', 4), (1, 'length', 16)]
    model, events = run_complete([list(b'a.bc'), list(b'ab.c')], ['.'])
    assert model.steps == 3  # both stopped: no fourth step


def test_end_of_text_ends_a_sample_with_stop():
    """The model's end-of-text token ends its sample, with finish_reason 'stop', as OpenAI's models stop."""
    rows = [[*b'the end', EOT, *b' of it'], list(b'keeps going on')]
    model, events = run_complete(rows, ['xyz', 'd o'])  # 'd o' would match across the end of text: it must not
    texts = {i: ''.join(e[1] for e in events if e[0] == i) for i in (0, 1)}
    assert texts == {0: 'the end', 1: 'keeps going on'}
    assert [(e[0], e[2], e[3]) for e in events if e[2]] == [(0, 'stop', 8), (1, 'length', 14)]


# -----------------------------------------------------------------------------
# the server

def test_models_and_a_plain_completion(server, ckpt):
    models = requests.get(server.url + '/v1/models', timeout=10).json()
    assert models['object'] == 'list' and models['data'][0]['id'] == ckpt and models['data'][0]['object'] == 'model'
    r = post(server, prompt='The', max_tokens=20, temperature=0)
    assert r.status_code == 200 and r.headers['Content-Type'] == 'application/json'
    body = r.json()
    assert body['object'] == 'text_completion' and body['id'].startswith('cmpl-') and body['model'] == ckpt
    assert abs(body['created'] - time.time()) < 60
    assert body['choices'] == [{'text': greedy(ckpt, 'The', 20), 'index': 0, 'logprobs': None,
                                'finish_reason': 'length'}]
    assert body['usage'] == {'prompt_tokens': 3, 'completion_tokens': 20, 'total_tokens': 23}
    assert len(post(server, prompt=['The']).json()['choices'][0]['text']) == 16  # OpenAI's default max_tokens
    ids = [CHARS.index(c) for c in 'The']  # a prompt of token ids
    by_ids = post(server, prompt=ids, max_tokens=20, temperature=0).json()
    assert by_ids['choices'][0]['text'] == body['choices'][0]['text']


def test_a_long_prompt_keeps_its_last_block_size_tokens(server, ckpt):
    long = TEXT[:100] + 'The'  # block_size is 32
    body = post(server, prompt=long, max_tokens=40, temperature=0).json()  # past block_size too
    model, _ = load_checkpoint(ckpt)
    x = torch.tensor([[CHARS.index(c) for c in long]])
    expected = ''.join(CHARS[i] for i in model.eval().generate(x, 40, temperature=0)[0, x.size(1):].tolist())
    assert body['choices'][0]['text'] == expected and body['usage']['prompt_tokens'] == len(long)


def test_stream_is_one_event_per_token_and_the_same_text(server):
    settings = dict(prompt='Where', max_tokens=30, temperature=1.0, top_k=20, top_p=0.95, seed=7)
    events = stream_events(server, **settings)
    assert len(events) == 30  # a character per token, no stop sequence: one event each
    assert all(e['object'] == 'text_completion' and e['choices'][0]['index'] == 0 for e in events)
    assert [e['choices'][0]['finish_reason'] for e in events] == [None] * 29 + ['length']
    assert len({e['id'] for e in events}) == 1
    assert ''.join(e['choices'][0]['text'] for e in events) == post(server, **settings).json()['choices'][0]['text']


def test_the_seed_decides_the_text(server):
    texts = [post(server, prompt='A', max_tokens=40, temperature=1.2, seed=s).json()['choices'][0]['text']
             for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1] and len(set(texts)) == 3


def test_stop_sequences(server, ckpt):
    full = greedy(ckpt, 'The', 40)
    stop = full[12:15]
    expected = full[:full.find(stop)]
    assert expected, full
    body = post(server, prompt='The', max_tokens=40, temperature=0, stop=['zzz', stop]).json()
    assert body['choices'][0]['text'] == expected and body['choices'][0]['finish_reason'] == 'stop'
    assert body['usage']['completion_tokens'] == len(expected) + len(stop)
    events = stream_events(server, prompt='The', max_tokens=40, temperature=0, stop=stop)
    assert ''.join(e['choices'][0]['text'] for e in events) == expected
    assert events[-1]['choices'][0]['finish_reason'] == 'stop'
    body = post(server, prompt='The', max_tokens=40, temperature=0, stop='not in it').json()
    assert body['choices'][0]['text'] == full and body['choices'][0]['finish_reason'] == 'length'


def test_n_completions_are_one_batch(server):
    body = post(server, prompt='She', max_tokens=12, n=3, seed=5, temperature=1.5).json()
    assert [c['index'] for c in body['choices']] == [0, 1, 2]
    assert all(len(c['text']) == 12 and c['finish_reason'] == 'length' for c in body['choices'])
    assert len({c['text'] for c in body['choices']}) > 1
    assert body['usage'] == {'prompt_tokens': 3, 'completion_tokens': 36, 'total_tokens': 39}
    events = stream_events(server, prompt='She', max_tokens=12, n=3, seed=5, temperature=1.5)
    streamed = [''.join(e['choices'][0]['text'] for e in events if e['choices'][0]['index'] == i) for i in range(3)]
    assert streamed == [c['text'] for c in body['choices']]


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    bad = [{'prompt': ''}, {}, {'prompt': 5}, {'prompt': ['a', 5]}, {'prompt': [1, 10_000]}, {'prompt': 'é€'},
           {'prompt': 'a', 'max_tokens': 0}, {'prompt': 'a', 'max_tokens': 100_000}, {'prompt': 'a', 'max_tokens': 'x'},
           {'prompt': 'a', 'max_tokens': 2.5}, {'prompt': 'a', 'temperature': -1}, {'prompt': 'a', 'top_p': 0},
           {'prompt': 'a', 'top_p': 1.5}, {'prompt': 'a', 'n': 0}, {'prompt': 'a', 'n': 1000},
           {'prompt': 'a', 'top_k': -1}, {'prompt': 'a', 'stop': ['a', 'b', 'c', 'd', 'e']}, {'prompt': 'a', 'stop': 3},
           {'prompt': 'a', 'stream': 'yes'}, {'prompt': 'a', 'seed': 'x'}, {'prompt': 'a', 'n': True}, [1, 2]]
    for body in bad:
        r = post(server, **body) if isinstance(body, dict) else requests.post(server.url + '/v1/completions',
                                                                                  json=body, timeout=10)
        assert r.status_code == 400, body
        assert r.json()['error']['type'] == 'invalid_request_error' and r.json()['error']['message'], body
    for raw in [b'{not json', b'\xff\xfe', b'']:
        r = requests.post(server.url + '/v1/completions', data=raw, timeout=10)
        assert r.status_code == 400 and 'error' in r.json()
    for r in [requests.get(server.url + '/v1/nothing', timeout=10),
              requests.post(server.url + '/v2', json={}, timeout=10)]:
        assert r.status_code == 404 and 'message' in r.json()['error']
    ok = post(server, prompt='a', max_tokens=3, unknown_field=1, model='whatever', logprobs=None, stop=None)
    assert ok.status_code == 200 and len(ok.json()['choices'][0]['text']) == 3


def test_concurrent_clients_get_their_own_answers(server):
    prompts = ['The', 'Where', 'A', 'She', 'dog']
    jobs = [(prompts[i % 5], 5 + i, i % 2 == 1) for i in range(20)]  # (prompt, max_tokens, stream)
    expected = {(p, m): post(server, prompt=p, max_tokens=m, temperature=0).json()['choices'][0]['text']
                for p, m, _ in jobs}
    answers = {}

    def client(job):
        prompt, max_tokens, stream = job
        if stream:
            events = stream_events(server, prompt=prompt, max_tokens=max_tokens, temperature=0)
            answers[job] = ''.join(e['choices'][0]['text'] for e in events)
        else:
            body = post(server, prompt=prompt, max_tokens=max_tokens, temperature=0).json()
            answers[job] = body['choices'][0]['text']

    threads = [threading.Thread(target=client, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {job: answers.get(job) for job in jobs} == {(p, m, s): expected[p, m] for p, m, s in jobs}


def test_a_client_leaving_mid_stream_frees_the_server(server):
    body = json.dumps({'prompt': 'The', 'max_tokens': 1024, 'stream': True}).encode()
    port = int(server.url.rsplit(':', 1)[1])
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                  b'Content-Length: ' + str(len(body)).encode() + b'\r\n\r\n' + body)
        received = b''
        while b'data: ' not in received:  # the headers may come first, on their own
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk
    deadline = time.time() + 20
    while not (stopped := re.search(r'a completion stopped after (\d+) of 1024 tokens', open(server.log).read())):
        assert time.time() < deadline, "the server did not stop generating for the client that left"
        time.sleep(0.05)
    # it noticed at a failed write, a few tokens after the client left, and generated no more
    assert int(stopped.group(1)) < 256, open(server.log).read()
    assert post(server, prompt='a', max_tokens=3).status_code == 200


def test_the_openai_client(server, ckpt):
    import openai  # in requirements.txt: this test runs wherever the suite does
    client = openai.OpenAI(base_url=server.url + '/v1', api_key='unused')
    result = client.completions.create(model=ckpt, prompt='The', max_tokens=20, temperature=0)
    assert result.choices[0].text == greedy(ckpt, 'The', 20) and result.usage.completion_tokens == 20
    chunks = client.completions.create(model=ckpt, prompt='The', max_tokens=20, temperature=0, stream=True)
    assert ''.join(c.choices[0].text for c in chunks) == result.choices[0].text


def test_ctrl_c_stops_the_server_cleanly(ckpt):
    log_path = os.path.join(os.path.dirname(ckpt), 'server-sigint.log')
    proc, url = start_server(ckpt, log_path)
    with requests.post(url + '/v1/completions', json={'prompt': 'The', 'max_tokens': 1024, 'stream': True},
                       stream=True, timeout=30) as r:
        next(r.iter_lines())  # Ctrl-C in the middle of a stream
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    output = open(log_path).read()
    assert 'server stopped' in output and 'Traceback' not in output, output


def test_a_padded_vocabulary_never_yields_ids_the_tokenizer_lacks(tmp_path):
    """A model whose vocabulary is padded past its tokenizer's (as train.py pads GPT-2's) samples only ids the
    tokenizer has, in sample.py and through the server; untrained, its padding ids would come up every few tokens."""
    torch.manual_seed(0)
    args = dict(block_size=32, vocab_size=len(CHARS) + 8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    meta = {'tokenizer': 'char', 'vocab_size': len(CHARS), 'chars': CHARS, 'dtype': 'uint16'}
    os.makedirs(tmp_path / 'out')
    torch.save({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'config': {}, 'meta': meta,
                'iter_num': 0}, tmp_path / 'out' / 'ckpt.pt')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--out_dir=out', '--device=cpu',
                           '--num_samples=3', '--max_new_tokens=200', '--top_k=0', '--start=a'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split('---------------')[:-1]
    assert len(samples) == 3 and all(len(sample.strip('\n')) >= 150 for sample in samples)
    server_proc, url = start_server(str(tmp_path / 'out'), str(tmp_path / 'server.log'))
    try:
        r = requests.post(url + '/v1/completions', json=dict(prompt='a', max_tokens=200, n=3, top_k=0), timeout=60)
        assert r.status_code == 200, r.text
        assert all(len(choice['text']) == 200 for choice in r.json()['choices'])  # one character per token
    finally:
        server_proc.kill()
        server_proc.wait()
