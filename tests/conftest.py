import os
import subprocess
import sys

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
