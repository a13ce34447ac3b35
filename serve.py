"""
Serve a model over HTTP as OpenAI's API, with the standard library only:

    python sample.py --out_dir=out-shakespeare-char --serve --port=8000

POST /v1/completions takes prompt, max_tokens, temperature, top_p, n, stop, seed, stream (server-sent
events, one per token) and top_k (ours). POST /v1/chat/completions takes messages instead of a prompt (and
max_completion_tokens, stream_options.include_usage), for a model fine-tuned on conversations: the
messages are rendered with its chat template (tokenizer.py), ending with an open assistant turn, and the
reply ends at the assistant's end token. GET / is a chat page (chat.html), GET /v1/models lists the one
model and GET /health says it is up; both say whether it chats. Requests are handled in threads; generation
runs in the main thread, where the Batcher decodes every request's completions together (continuous
batching: max_batch of them at once, a request joining and leaving between two tokens). Each completion keeps
its own settings, and a seeded one its own random numbers, so its text does not depend on the others in the
batch (exactly so when greedy; sampled, up to float rounding, which batch sizes change). Beyond max_batch
requests wait, and beyond max_queue waiting they get a 429.

For evaluation harnesses (lm-evaluation-harness's local-completions), /v1/completions also takes OpenAI's
legacy logprobs (0..5) and echo, max_tokens 0 with echo, and a list of prompts (n completions each, in
order); GET /tokenizer_info, POST /tokenize and POST /detokenize are vLLM's, so that a harness tokenizes
with the served model's own tokenizer.

A completion also stops, with finish_reason 'stop', at the tokenizer's end of text (GPT-2's
<|endoftext|>). Choices where OpenAI's API leaves room: an empty prompt is a 400 (sample.py refuses one
too); a prompt longer than block_size is not refused: the model sees its last block_size tokens, as in
sample.py, and usage counts all of them; text that might be the start of a stop sequence is held back from
a stream until it is known not to be one. A chat longer than the context loses its oldest turns (header
X-Dropped-Messages); a reply's max_tokens defaults to max_tokens_cap: it normally ends by itself.
"""

import json
import os
import queue
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from types import SimpleNamespace
from urllib.parse import urlsplit

from batcher import Batcher
from common import die
from tokenizer import ROLES

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat.html')  # the chat page, GET /

MAX_N = 16  # completions per request: n samples are one batch, so memory and time grow with n
MAX_PROMPTS = 64  # prompts per completions request, each started when there is room in the batch
MAX_LOGPROBS = 5  # alternatives per token in a completion's logprobs, as OpenAI
MAX_STOPS = 4  # stop sequences per request, as OpenAI
MAX_BODY = 1 << 20  # bytes of JSON a request may send
LOOPBACK = ('127.0.0.1', 'localhost', '::1')


class BadRequest(Exception):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def parse_settings(body, max_tokens_cap, default_max_tokens, min_tokens=1):
    """The sampling settings of a request (parsed JSON) or BadRequest. Defaults are OpenAI's; top_k is ours
    (0: off). Unknown fields are ignored, and null means the default, as OpenAI's clients send it for unset fields.
    min_tokens: 0 where a request may generate nothing (a completion that echoes its prompt)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")

    def field(name, types, default, ok, expected):
        value = body.get(name)
        if value is None:
            return default
        if not isinstance(value, types) or isinstance(value, bool) != (types is bool) or not ok(value):
            raise BadRequest(f"'{name}' must be {expected}, got {json.dumps(value)}", name)
        return value

    number = (int, float)
    max_tokens = field('max_tokens', int, default_max_tokens, lambda v: min_tokens <= v <= max_tokens_cap,
                       f"an integer in {min_tokens}..{max_tokens_cap}")
    req = dict(
        max_tokens=field('max_completion_tokens', int, max_tokens, lambda v: min_tokens <= v <= max_tokens_cap,
                         f"an integer in {min_tokens}..{max_tokens_cap}"),  # the chat API's newer name for it
        temperature=field('temperature', number, 1.0, lambda v: 0 <= v < float('inf'), "a number >= 0"),
        top_p=field('top_p', number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=field('top_k', int, 0, lambda v: v >= 0, "an integer >= 0 (0: off)"),
        n=field('n', int, 1, lambda v: 1 <= v <= MAX_N, f"an integer in 1..{MAX_N}"),
        seed=field('seed', int, None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer"),
        stream=field('stream', bool, False, lambda v: True, "true or false"),
    )
    options = field('stream_options', dict, {}, lambda v: isinstance(v.get('include_usage', False), bool),
                    'an object like {"include_usage": true}')
    req['include_usage'] = bool(options.get('include_usage'))
    stop = field('stop', (str, list), [], lambda v: isinstance(v, str) or (
        len(v) <= MAX_STOPS and all(isinstance(s, str) for s in v)), f"a string or a list of up to {MAX_STOPS} strings")
    req['stop'] = [s for s in ([stop] if isinstance(stop, str) else stop) if s]  # an empty string stops nothing
    return req


def parse_request(body, encode, vocab_size, max_tokens_cap, block_size):
    """Check a completions request (parsed JSON) -> (prompts: lists of token ids, dict of settings) or raise
    BadRequest. A prompt is a string or a list of token ids, or a list of several such prompts: n completions
    each, in order. logprobs (0..5) and echo are OpenAI's legacy fields: the log-probabilities of the tokens
    (with echo, the prompt's too, and its text before the completion's; with max_tokens 0, nothing generated)."""
    echo = body.get('echo') if isinstance(body, dict) else None
    if echo is not None and not isinstance(echo, bool):
        raise BadRequest(f"'echo' must be true or false, got {json.dumps(echo)}", 'echo')
    req = parse_settings(body, max_tokens_cap, default_max_tokens=16, min_tokens=0 if echo else 1)
    logprobs = body.get('logprobs')
    if logprobs is not None and (type(logprobs) is not int or not 0 <= logprobs <= MAX_LOGPROBS):
        raise BadRequest(f"'logprobs' must be an integer in 0..{MAX_LOGPROBS}, got {json.dumps(logprobs)}", 'logprobs')
    req['logprobs'], req['echo'] = logprobs, bool(echo)
    if (logprobs is not None or echo) and req['stream']:
        raise BadRequest("logprobs and echo are answered whole here: set stream to false", 'stream')
    prompts = body.get('prompt')
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(type(t) is int for t in prompts)):
        prompts = [prompts]  # one prompt: text, or token ids
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
        raise BadRequest(f"'prompt' must be a string, a list of token ids, or a list of up to {MAX_PROMPTS} of "
                         "those", 'prompt')
    all_ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            try:
                ids = encode(prompt)
            except SystemExit as e:  # the tokenizer's one-line error: a character outside a char vocabulary
                raise BadRequest(str(e).removeprefix('error: '), 'prompt')
        elif isinstance(prompt, list) and all(type(t) is int and 0 <= t < vocab_size for t in prompt):
            ids = prompt
        else:
            raise BadRequest(f"'prompt' must be a string, or a list of token ids in 0..{vocab_size - 1} (or a list "
                             "of those)", 'prompt')
        if not ids:
            raise BadRequest("'prompt' is empty: give at least one token (a newline, say)", 'prompt')
        if logprobs is not None and len(ids) + req['max_tokens'] > block_size + 1:
            raise BadRequest(f"with logprobs, a prompt ({len(ids)} tokens) and max_tokens ({req['max_tokens']}) must "
                             f"fit the model's context of {block_size} tokens (plus the last one generated)", 'prompt')
        all_ids.append(ids)
    return all_ids, req


def parse_chat_request(body, tokenizer, block_size, max_tokens_cap):
    """Check a chat completions request -> (prompt token ids, settings, how many old messages were dropped to
    fit the context: Tokenizer.fit_prompt) or raise BadRequest."""
    if not tokenizer.chat:
        raise BadRequest("this model has no chat template: fine-tune it on conversations first (prepare.py with "
                         "--format=chat data, then train.py), or use /v1/completions", 'messages')
    req = parse_settings(body, max_tokens_cap, default_max_tokens=max_tokens_cap)
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", 'messages')
    plain = []
    for i, message in enumerate(messages):
        content = message.get('content') if isinstance(message, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text' and
                                             isinstance(p.get('text'), str) for p in content):
            content = ''.join(p['text'] for p in content)  # a list of text parts
        if not isinstance(message, dict) or message.get('role') not in ROLES or not isinstance(content, str):
            raise BadRequest(f"messages[{i}] must have a role (system, user or assistant) and a content string "
                             "(or a list of text parts)", 'messages')
        plain.append({'role': message['role'], 'content': content})
    try:
        ids, dropped = tokenizer.fit_prompt(plain, block_size, req['max_tokens'])
    except SystemExit as e:  # the tokenizer's one-line error: a character outside a char vocabulary
        raise BadRequest(str(e).removeprefix('error: '), 'messages')
    except ValueError as e:
        raise BadRequest(str(e), 'messages')
    return ids, req, dropped


def tokenize(body, path, tokenizer, block_size):
    """vLLM's POST /tokenize {prompt} -> {tokens} and /detokenize {tokens} -> {prompt}: with GET /tokenizer_info,
    they let lm-evaluation-harness use the served model's own tokenizer, whatever it is."""
    if path == '/tokenize':
        prompt = body.get('prompt') if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", 'prompt')
        try:
            ids = tokenizer.encode_special(prompt)
        except SystemExit as e:  # a character outside a char vocabulary
            raise BadRequest(str(e).removeprefix('error: '), 'prompt')
        return {'tokens': ids, 'count': len(ids), 'max_model_len': block_size}
    tokens = body.get('tokens') if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in tokens):
        raise BadRequest(f"'tokens' must be a list of token ids in 0..{tokenizer.vocab_size - 1}", 'tokens')
    return {'prompt': tokenizer.decode(tokens)}


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for clients still connected
    request_queue_size = 64  # connections waiting to be accepted; the default 5 drops bursts of clients


class CompletionHandler(BaseHTTPRequestHandler):
    timeout = 60  # seconds a client may stall a read or a write before it is dropped

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status, message, type='invalid_request_error', param=None, headers=None):
        self.send_json(status, {'error': {'message': message, 'type': type, 'param': param, 'code': None}}, headers)

    def foreign_host(self):
        """A request whose Host is not this machine's, while the server listens on loopback only: a web page
        elsewhere reaching it through a DNS name that points here (DNS rebinding). Refused with a 400."""
        host = self.headers.get('Host', '').rsplit(':', 1)[0].strip('[]')
        if self.server.app.loopback and host not in LOOPBACK:
            self.send_error_json(400, f"Host '{host}' is not this server, which only serves this machine: use "
                                 "http://127.0.0.1:<port>/ (or --host for another address)")
            return True
        return False

    def do_GET(self):
        app, path = self.server.app, urlsplit(self.path).path
        if self.foreign_host():
            return
        if path in ('/', '/index.html'):  # the chat page, the one file served: no path reaches another
            with open(PAGE, 'rb') as f:
                page = f.read()
            self.send_response(200)
            self.send_header('Content-Type', 'text/html; charset=utf-8')
            self.send_header('Content-Length', str(len(page)))
            # the page loads nothing and talks to this server only, whatever a reply holds
            self.send_header('Content-Security-Policy', "default-src 'none'; script-src 'unsafe-inline'; "
                             "style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
            self.end_headers()
            self.wfile.write(page)
        elif path.rstrip('/') == '/v1/models':
            model = {'id': app.name, 'object': 'model', 'created': app.created, 'owned_by': 'gptforge',
                     'chat': app.tokenizer.chat}
            self.send_json(200, {'object': 'list', 'data': [model]})
        elif path == '/tokenizer_info':  # vLLM's: lm-evaluation-harness finds the model's tokenizer here
            self.send_json(200, {'eos_token': app.tokenizer.names.get(app.tokenizer.eot), 'bos_token': None,
                                 'pad_token': None, 'tokenizer': app.tokenizer.kind,
                                 'vocab_size': app.tokenizer.vocab_size, 'max_model_len': app.model.config.block_size})
        elif path == '/health':
            self.send_json(200, {'status': 'ok', 'model': app.name, 'chat': app.tokenizer.chat})
        else:
            self.send_error_json(404, f"no such path: GET {self.path} (try /, /v1/models, /health or /tokenizer_info)",
                                 'not_found_error')

    def do_POST(self):
        app, path = self.server.app, urlsplit(self.path).path.rstrip('/')
        if self.foreign_host():
            return
        if path not in ('/v1/completions', '/v1/chat/completions', '/tokenize', '/detokenize'):
            return self.send_error_json(404, f"no such path: POST {self.path} (try /v1/completions, "
                                        "/v1/chat/completions, /tokenize or /detokenize)", 'not_found_error')
        chat, dropped = path == '/v1/chat/completions', 0
        try:  # JSON only: a page elsewhere can't send that here without the browser asking first (CORS)
            if self.headers.get_content_type() != 'application/json':
                raise BadRequest("send the body as JSON, with the header Content-Type: application/json")
            length = self.headers.get('Content-Length', '')
            if not length.isdigit() or int(length) > MAX_BODY:
                raise BadRequest(f"send a JSON body of at most {MAX_BODY} bytes, with its Content-Length")
            try:
                body = json.loads(self.rfile.read(int(length)))
            except ValueError as e:
                raise BadRequest(f"the body is not valid JSON: {e}")
            if path in ('/tokenize', '/detokenize'):
                return self.send_json(200, tokenize(body, path, app.tokenizer, app.model.config.block_size))
            if chat:
                ids, req, dropped = parse_chat_request(body, app.tokenizer, app.model.config.block_size,
                                                       app.max_tokens_cap)
                prompts = [ids]
            else:
                prompts, req = parse_request(body, app.tokenizer.encode, app.tokenizer.vocab_size, app.max_tokens_cap,
                                             app.model.config.block_size)
        except BadRequest as e:
            return self.send_error_json(400, str(e), param=e.param)

        end_ids = app.tokenizer.reply_ends if chat else {app.tokenizer.eot}  # the assistant's end, or the text's
        job = SimpleNamespace(prompts=prompts, req=req, end_ids=end_ids, events=queue.Queue(), cancelled=False,
                              finished=False, error=None, logprobs={}, held=[])
        too_big = app.batcher.never_fits(job)  # a row per completion, and the cache its prompt and max_tokens fill
        if too_big:
            return self.send_error_json(400, too_big, param='n')
        if app.jobs.qsize() + len(app.batcher.waiting) >= app.max_queue:  # (a deque's len is safe from a thread)
            return self.send_error_json(429, f"{app.max_queue} requests are already waiting: try again in a moment",
                                        'rate_limit_error', headers={'Retry-After': '1'})
        app.jobs.put(job)  # generated by the main thread (generation_loop), which passes the events back
        head = {'id': f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                'object': 'chat.completion' if chat else 'text_completion', 'created': int(time.time()),
                'model': app.name}
        headers = {'X-Dropped-Messages': str(dropped)} if dropped else {}
        try:
            (self.stream if req['stream'] else self.answer)(job, head, chat, headers)
        except (ConnectionError, TimeoutError):
            job.cancelled = True  # the client is gone: its generation stops at the next token
            self.close_connection = True
            self.log_message('"%s" client went away mid-response', self.requestline)

    def answer(self, job, head, chat, headers):
        n = len(job.prompts) * job.req['n']  # choice p * n + i: prompt p's i-th completion
        texts, finish, tokens = [''] * n, [None] * n, [0] * n
        if job.req.get('echo'):
            texts = [self.server.app.tokenizer.decode(job.prompts[i // job.req['n']]) for i in range(n)]
        for i, text, finish_reason, n_tokens in iter(job.events.get, None):
            texts[i], finish[i], tokens[i] = texts[i] + text, finish_reason, n_tokens
        if job.error:
            return self.send_error_json(500, job.error, 'server_error')
        choices = [{'index': i, **({'message': {'role': 'assistant', 'content': t}} if chat else {'text': t}),
                    'logprobs': job.logprobs.get(i), 'finish_reason': f} for i, (t, f) in enumerate(zip(texts, finish))]
        self.send_json(200, {**head, 'choices': choices, 'usage': usage(job, tokens)}, headers)

    def stream(self, job, head, chat, headers):
        """Server-sent events: a completion's text as it comes; a chat's as OpenAI's chunks (the role first,
        then content, then the finish_reason), then the usage if asked for, then [DONE]."""
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        head = {**head, 'object': 'chat.completion.chunk'} if chat else head

        def send(choice, **extra):
            self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice] if choice else [], **extra})}\n\n".encode())
        n = len(job.prompts) * job.req['n']
        tokens = [0] * n
        for i in range(n if chat else 0):
            send({'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None, 'finish_reason': None})
        for i, text, finish_reason, n_tokens in iter(job.events.get, None):
            tokens[i] = n_tokens
            if chat and text:
                send({'index': i, 'delta': {'content': text}, 'logprobs': None, 'finish_reason': None})
            if chat and finish_reason:
                send({'index': i, 'delta': {}, 'logprobs': None, 'finish_reason': finish_reason})
            if not chat and (text or finish_reason):
                send({'text': text, 'index': i, 'logprobs': None, 'finish_reason': finish_reason})
        if job.error:
            self.wfile.write(f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n".encode())
            return
        if job.req['include_usage']:
            send(None, usage=usage(job, tokens))
        self.wfile.write(b'data: [DONE]\n\n')


def usage(job, tokens):
    prompt_tokens = sum(map(len, job.prompts))
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': sum(tokens), 'total_tokens': prompt_tokens + sum(tokens)}


def generation_loop(app):
    """Run the requests' generations, for ever: a Batcher step at a time, taking new requests in between.

    This runs in the main thread, and torch only ever runs here: one model call at a time, and Ctrl-C stops
    the server between two steps, as it stops sample.py. (A handler thread still inside torch when Python exits
    can abort the process.)"""
    batcher = app.batcher  # (made with the app: handlers read its queue's length)
    while True:
        try:
            while True:  # every request that came in, waiting for the next step when there is nothing to do
                batcher.waiting.append(app.jobs.get(block=not batcher.busy()))
        except queue.Empty:
            pass
        try:
            batcher.step()
        except Exception as e:  # out of memory, say: these requests fail, the server goes on
            traceback.print_exc()
            batcher.fail(f"generation failed: {type(e).__name__}: {e}")


def run_server(cfg, model, tokenizer, device):
    """Answer completion requests on cfg.host:cfg.port until Ctrl-C."""
    try:
        server = CompletionServer((cfg.host, cfg.port), CompletionHandler)
    except OSError as e:
        die(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): pick another --port or --host")
    name = cfg.out_dir if cfg.init_from == 'resume' else cfg.init_from  # the model's id in the API
    block_size = model.config.block_size
    server.app = SimpleNamespace(model=model, tokenizer=tokenizer, device=device, jobs=queue.Queue(), name=name,
                                 created=int(time.time()), max_tokens_cap=cfg.max_tokens_cap,
                                 loopback=cfg.host in LOOPBACK, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                                 max_batch_tokens=cfg.max_batch_tokens or cfg.max_batch * block_size)
    server.app.batcher = Batcher(server.app)
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1 (POST /v1/completions"
          + (", POST /v1/chat/completions, a chat page at GET /" if tokenizer.chat else "")
          + ", GET /v1/models); Ctrl-C stops", flush=True)
    if not server.app.loopback:
        print(f"warning: listening on {host}, without authentication: anyone who can reach it can use the model",
              flush=True)
    cache_bytes = 2 * model.config.n_layer * cfg.max_batch * block_size * model.config.n_embd * \
        next(model.parameters()).element_size()
    print(f"continuous batching: up to {cfg.max_batch} completions at once, {server.app.max_batch_tokens:,} tokens "
          f"of cache ({cache_bytes / 2 ** 20:,.0f} MiB, allocated at the first request), {cfg.max_queue} waiting",
          flush=True)
    Thread(target=server.serve_forever, daemon=True).start()  # accepts connections; a thread per request
    try:
        generation_loop(server.app)
    except KeyboardInterrupt:
        print("\nserver stopped", flush=True)
    finally:
        server.shutdown()
        server.server_close()
