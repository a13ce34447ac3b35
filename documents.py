"""
The input side of prepare.py: which files to read (input_files), the documents in them, as text or as
conversations (read_documents), and the pieces a document is cut into for the tokenizing workers (pieces).

.txt and .md files are one document each; .jsonl files one record a line and .json files a list of
records: a document's "text", or a conversation in OpenAI's fine-tuning format ("messages") or Alpaca's
("instruction", "input", "output"). Line endings become \\n. Nothing here imports torch.
"""

import glob
import json
import os
import re
from urllib.parse import urlsplit

import numpy as np

from dataset import DATASETS, die, download
from tokenizer import check_roles

PIECE_CHARS = 1 << 20  # the unit of a tokenizer worker's work: about 60 ms of GPT-2 BPE
# where pieces() cuts: an ASCII space or line break between a letter or digit and a non-space. Both GPT-2's
# split pattern and ours (tokenizer.py) end a split after that letter and start one at that space, so the
# pieces' tokens are the whole text's. (Not after punctuation: ours keeps the line breaks that follow it.)
CUT = re.compile(r'(?<=[^\W_])[ \t\n\r](?=\S)')
LARGE_FILE = 64 << 20  # bytes: a text file larger than this is read in chunks, never held in memory whole
TEXT_SUFFIXES, JSONL_SUFFIX, JSON_SUFFIX = ('.txt', '.md'), '.jsonl', '.json'
RECORD_SUFFIXES = (JSONL_SUFFIX, JSON_SUFFIX)  # files of JSON records: documents or conversations



# -----------------------------------------------------------------------------
# reading the input: files -> documents -> pieces

def input_files(name, input_path, data_dir):
    """(files to read, whether they are one text to split by position): --input (a file, directory, glob or
    URL), else data/<name>/input.txt, else the dataset's known URL. A directory is walked for .txt, .md and
    .jsonl files; they are read in path order. A directory, a glob or a file of records is split by document."""
    input_path = input_path and os.path.expanduser(input_path)  # --input=~/notes: the shell leaves that ~ alone
    if not input_path or input_path.startswith(('http://', 'https://')):
        url, sha256 = (input_path, None) if input_path else DATASETS.get(name, (None, None))[:2]
        filename = os.path.basename(urlsplit(input_path).path.rstrip('/')) if input_path else 'input.txt'
        if not filename or filename in ('train.bin', 'val.bin', 'meta.json') or filename.endswith('.tmp'):
            filename = f'downloaded-{filename or "input.txt"}'  # never one of the dataset's own files
        path = os.path.join(data_dir, filename)
        if os.path.exists(path):
            print(f"using {path}" + (f" (delete it to download {url} again)" if url else ""))
        elif url is None:
            die(f"no text for dataset '{name}': {path} does not exist; pass --input=PATH (a file, directory, glob or URL)")
        else:
            download(url, path, sha256=sha256)
        return [path], not path.endswith(RECORD_SUFFIXES)
    if os.path.isfile(input_path):
        return [input_path], not input_path.endswith(RECORD_SUFFIXES)
    if os.path.isdir(input_path) or glob.has_magic(input_path):
        files = []
        for path in sorted(glob.glob(input_path, recursive=True)) if glob.has_magic(input_path) else [input_path]:
            if os.path.isfile(path):
                files.append(path)
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith('.')]  # no .git
                files += [os.path.join(root, n) for n in names if n.endswith((*TEXT_SUFFIXES, JSONL_SUFFIX))]
        if not files:
            die(f"no input in {input_path}: looked for .txt, .md and .jsonl files")
        return sorted(set(files)), False  # in path order
    die(f"{input_path} does not exist: pass a file, a directory, a glob (quoted) or an http(s) URL as --input")


def read_documents(files, progress=lambda n_bytes: None, chat=False):
    """Each document of the files in order: its text in chunks with line endings made \\n (a list, or a
    TextFile for a text file of more than LARGE_FILE bytes, which is read when iterated rather than held);
    with chat, each record as a Conversation."""
    for path in files:
        if path.endswith(RECORD_SUFFIXES):
            for where, record in records(path, progress):
                yield conversation(record, where) if chat else [record_text(record, where)]
        elif chat:
            die(f"{path} is text, not conversations: give .jsonl or .json records (or --format=text)")
        elif os.path.getsize(path) > LARGE_FILE:
            yield TextFile(path, progress)
        else:
            yield list(TextFile(path))
            progress(os.path.getsize(path))


def records(path, progress=lambda n_bytes: None):
    """(where, record) for each JSON object of a .jsonl file (one a line) or a .json file (a list of them).
    A lone surrogate escaped in a string (no text) becomes U+FFFD; line endings become \\n."""
    if path.endswith(JSON_SUFFIX):  # one JSON value, read whole: such files are small (instruction datasets)
        with open(path, 'rb') as f:
            raw = f.read()
        progress(len(raw))
        try:
            items = json.loads(raw)
        except ValueError as e:  # not JSON, or not UTF-8
            die(f"{path} is not valid JSON ({e}): a .json file must be a list of records")
        if not isinstance(items, list):
            die(f"{path} is not a list of records: a .json file must hold one, [{{...}}, {{...}}]")
        escaped = has_escaped_surrogate(raw)
        lines = ((f"{path}, record {i}", item, escaped) for i, item in enumerate(items, 1))
    else:
        lines = jsonl_records(path, progress)
    for where, record, escaped_surrogate in lines:
        if not isinstance(record, dict):
            die(f"{where}, is not a JSON object: every record must be one")
        yield where, clean_strings(record) if escaped_surrogate else record


def jsonl_records(path, progress):
    with open(path, 'rb') as f:
        for line_no, line in enumerate(f, 1):
            progress(len(line))
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8
                    record = None
                yield f"{path}, line {line_no}", record, has_escaped_surrogate(line)


def has_escaped_surrogate(raw):
    return b'\\ud' in raw or b'\\uD' in raw  # \\udc00 or \\uDC00: both are JSON


def clean_strings(value):
    """value with lone surrogates in its strings made U+FFFD: an escaped surrogate without its pair is no text."""
    if isinstance(value, str):
        return re.sub('[\ud800-\udfff]', '\ufffd', value)
    if isinstance(value, list):
        return [clean_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: clean_strings(v) for k, v in value.items()}
    return value


def record_text(record, where):
    text = record.get('text')
    if not isinstance(text, str):
        die(f'{where}, has no "text" string: the document\'s text must be there')
    return newlines(text)


def newlines(text):
    return text.replace('\r\n', '\n').replace('\r', '\n')


class Conversation(list):
    """A conversation: its messages [{'role', 'content'}], as the chat template (tokenizer.py) renders them."""

    def texts(self):
        return [m['content'] for m in self]


def conversation(record, where):
    """A record in OpenAI's fine-tuning format {"messages": [...]} (an assistant message with "weight": 0 is
    not trained on) or Alpaca's {"instruction", "input", "output"} (a user turn: the instruction, then the
    input if any; an assistant turn: the output)."""
    if 'messages' in record:
        messages = record['messages']
    elif isinstance(record.get('instruction'), str) and isinstance(record.get('output'), str):
        extra = record.get('input') or ''
        user = record['instruction'] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else '')
        messages = [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': record['output']}]
    else:
        die(f'{where}, has neither "messages" nor "instruction" and "output" strings: it is not a conversation')
    try:
        check_roles(messages, last='assistant')
        if any(m['role'] == 'assistant' and not m['content'].strip() for m in messages):
            raise ValueError("an assistant turn is empty: there is nothing to train on")
        if any(m.get('weight', 1) not in (0, 1) for m in messages):
            raise ValueError('a "weight" is neither 0 (an assistant turn not trained on) nor 1')
    except ValueError as e:
        die(f"{where}: {e}")
    return Conversation({'role': m['role'], 'content': newlines(m['content']), **({'weight': 0} if m.get('weight') == 0
                                                                                  else {})} for m in messages)


def detect_format(files):
    """'chat' if the first record of the input is a conversation ("messages", or "instruction" and
    "output"), else 'text'."""
    for path in files:
        if path.endswith(RECORD_SUFFIXES):
            for _, record in records(path):
                return 'chat' if 'messages' in record or {'instruction', 'output'} <= record.keys() else 'text'
    return 'text'


class TextFile:
    """A UTF-8 text file, iterated in chunks of PIECE_CHARS characters; \\r\\n and \\r are read as \\n."""

    def __init__(self, path, progress=None):
        self.path, self.progress = path, progress

    def __iter__(self):
        done = 0
        try:
            with open(self.path, encoding='utf-8-sig') as f:  # without a byte-order mark; universal newlines
                while chunk := f.read(PIECE_CHARS):
                    if self.progress:
                        self.progress(f.buffer.tell() - done)
                        done = f.buffer.tell()
                    yield chunk
        except UnicodeDecodeError:
            die(f"{self.path} is not UTF-8 text: convert it (e.g. iconv -t utf-8) or move it out of the input")


def pieces(chunks, size=None):
    """A document's text re-cut into pieces of a little over `size` (PIECE_CHARS) characters, each cut where
    CUT says a tokenizer's split always starts, so tokenizing piece by piece gives the same tokens as the
    whole text, however many workers there are."""
    rest, size = '', size or PIECE_CHARS
    for chunk in chunks:
        rest += chunk
        while len(rest) > size:
            cut = CUT.search(rest, size)
            if cut is None and len(rest) < 16 * size:
                break  # wait for more text
            end = cut.start() if cut else len(rest)  # a text without spaces is cut anywhere, rarely
            yield rest[:end]
            rest = rest[end:]
    if rest:
        yield rest


def characters(files, chat=False):
    """The characters the input uses, sorted, and how many it has: for a char vocabulary, or a split by position."""
    from tqdm import tqdm
    used, count = np.zeros(0x110000, dtype=bool), 0  # one flag per Unicode code point
    with tqdm(total=sum(os.path.getsize(p) for p in files), unit='B', unit_scale=True, desc='counting characters') as bar:
        for document in read_documents(files, bar.update, chat):
            for chunk in texts(document):
                used[np.frombuffer(chunk.encode('utf-32-le'), dtype=np.uint32)] = True
                count += len(chunk)
    return ''.join(map(chr, np.flatnonzero(used))), count


def texts(document):
    """A document's text in chunks: a conversation's are its messages."""
    return document.texts() if isinstance(document, Conversation) else document
