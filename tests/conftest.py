import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)

# offline: the GPT-2 BPE files and the tiny-shakespeare text, where this machine has them
if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.isdir(os.path.join(SHARED, 'tiktoken_cache')):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.join(SHARED, 'tiktoken_cache')
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')


def run(script, *args, cwd, check=True, timeout=300, env=None):
    """Run one of the project's scripts as a user would, in cwd (with env added); return the finished process."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def gpt2_bpe_available():
    try:
        import tiktoken
        tiktoken.get_encoding('gpt2')
        return True
    except Exception:
        return False


@pytest.fixture
def small_text():
    """~60 kB of English-like text: a slice of tiny shakespeare, or generated words where that is missing."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding='utf-8') as f:
            return f.read()[:60_000]
    import random
    rng = random.Random(0)
    words = ['the', 'king', 'shall', 'speak', 'of', 'love', 'and', 'death', 'my', 'lord', 'good', 'night']
    lines = [' '.join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + '.' for _ in range(1500)]
    return '\n'.join(lines) + '\n'


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www -> (url, root, state). It sends an ETag (a hash of
    the file) and answers Range requests with 206, unless If-Range names another ETag. The first
    state['fail_first'] GETs answer state['fail_status'] (503 if unset); a path in state['truncate'] gets half of
    its body that many times, then the connection closes; a path in state['etags'] is sent with that
    X-Linked-Etag (as the Hugging Face Hub sends a file's SHA-256). state['paths'] lists every GET,
    state['ranges'] their Range headers."""
    root = tmp_path / 'www'
    root.mkdir()
    state = {'fail_first': 0, 'requests': 0, 'truncate': {}, 'etags': {}, 'paths': [], 'ranges': []}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def do_GET(self):
            state['requests'] += 1
            state['paths'].append(self.path)
            state['ranges'].append(self.headers.get('Range'))
            file = root / self.path.split('?')[0].lstrip('/')
            if state['requests'] <= state['fail_first']:
                return self.send_error(state.get('fail_status', 503), 'try again')
            if not file.is_file():
                return self.send_error(404, 'no such file')
            body, start = file.read_bytes(), 0
            etag = f'"{hashlib.sha1(body).hexdigest()}"'
            if self.headers.get('Range') and self.headers.get('If-Range', etag) == etag:  # the form used to resume
                start = int(self.headers['Range'].removeprefix('bytes=').rstrip('-'))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header('Content-Range', f'bytes */{len(body)}')
                    self.send_header('Content-Length', '0')
                    return self.end_headers()
            self.send_response(206 if start else 200)
            self.send_header('ETag', etag)
            if start:
                self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
            if self.path in state['etags']:
                self.send_header('X-Linked-Etag', f'"{state["etags"][self.path]}"')
            self.send_header('Content-Length', str(len(body) - start))
            self.end_headers()
            if state['truncate'].get(self.path, 0) > 0:
                state['truncate'][self.path] -= 1
                self.wfile.write(body[start:start + (len(body) - start) // 2])
                self.close_connection = True
            else:
                self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}', root, state
    server.shutdown()
    server.server_close()


# a tiny chat model, made the way a user makes one: conversations -> prepare.py -> train.py (about 25 s)
CHAT_HTML_REPLY = 'Look: <img src=x onerror=alert(1)> & <b>bold</b>'
CHAT_LONG_REPLY = 'la ' * 200  # longer than any context here: greedy decoding goes on past it


def chat_conversations(n=400, seed=0):
    """User turns of random words ending with a keyword; the assistant's answer depends on the keyword (and
    some conversations have a short exchange before, so that a history doesn't confuse it)."""
    import random
    rng = random.Random(seed)
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'dog', 'ran', 'far', 'we', 'go', 'now']
    answers = {'hello': CHAT_HTML_REPLY, 'story': CHAT_LONG_REPLY, 'count': 'one two three.', 'name': 'I am tiny.'}

    def exchange(keywords):
        keyword = rng.choice(keywords)
        user = ' '.join(rng.choice(words) for _ in range(rng.randint(1, 4))) + ' ' + keyword
        return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': answers[keyword]}]
    conversations = []
    for _ in range(n):
        messages = exchange(list(answers))
        if rng.random() < 0.4:
            messages = exchange(['count', 'name']) + messages
        if rng.random() < 0.3:
            messages.insert(0, {'role': 'system', 'content': 'be brief'})
        conversations.append({'messages': messages})
    return conversations


@pytest.fixture(scope='session')
def chat_model(tmp_path_factory):
    """-> the out_dir of a 2-layer character model fine-tuned on chat_conversations."""
    import json
    cwd = tmp_path_factory.mktemp('chat')
    with open(cwd / 'chats.jsonl', 'w') as f:
        f.writelines(json.dumps(c) + '\n' for c in chat_conversations())
    run('prepare.py', 'chats', '--input=chats.jsonl', '--tokenizer=char', cwd=cwd)
    run('train.py', '--dataset=chats', '--out_dir=out', '--n_layer=2', '--n_head=2', '--n_embd=64', '--block_size=96',
        '--batch_size=16', '--gradient_accumulation_steps=1', '--max_iters=800', '--eval_interval=800', '--eval_iters=2',
        '--learning_rate=3e-3', '--warmup_iters=10', '--lr_decay_iters=800', '--min_lr=3e-4', '--device=cpu',
        '--dtype=float32', cwd=cwd, env={'OMP_NUM_THREADS': '1'})
    return str(cwd / 'out')
