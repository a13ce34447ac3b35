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


def run(script, *args, cwd, check=True, timeout=300):
    """Run one of the project's scripts as a user would, in cwd; return the finished process."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
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
    """A real HTTP server on 127.0.0.1 serving tmp_path/www -> (url, root, state). The first
    state['fail_first'] GETs answer 503; a path in state['truncate'] gets half its body that many times,
    then the connection closes; state['paths'] lists every GET."""
    root = tmp_path / 'www'
    root.mkdir()
    state = {'fail_first': 0, 'requests': 0, 'truncate': {}, 'paths': []}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            state['requests'] += 1
            state['paths'].append(self.path)
            if state['requests'] <= state['fail_first']:
                self.send_error(503, 'try again')
            elif state['truncate'].get(self.path, 0) > 0:
                state['truncate'][self.path] -= 1
                body = (root / self.path.lstrip('/')).read_bytes()
                self.send_response(200)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.close_connection = True
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}', root, state
    server.shutdown()
    server.server_close()
