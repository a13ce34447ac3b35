"""
Data curation for prepare.py, as FineWeb does it (with datatrove) on a cluster, here in its worker processes:

- quality rules (Gopher's, C4's, FineWeb's): each is a small function measuring one thing about a document,
  kept when every measure is within its bounds (RULES; the 'web' preset is FineWeb's choice of thresholds);
- near duplicates: MinHash over word 5-grams and LSH bands (the workers sign, the main process looks each
  document up in one index in input order, so the first of a cluster is kept whatever the number of workers);
- PII: emails and public IP addresses replaced by fixed placeholders (redact);
- the report of what was read, kept and removed, by reason, with a few removed documents to look at.

Nothing here imports torch; prepare.py wires it in.
"""

import collections
import ipaddress
import itertools
import json
import os
import re
import sys
from functools import cached_property
from operator import itemgetter

import numpy as np

# -----------------------------------------------------------------------------
# quality rules: a measure of a document, and the keys of its bounds (a document is kept if min <= measure <= max)

TERMINAL_PUNCTUATION = '.!?"\'\u201d\u2019\u2026'  # ." ends a sentence as . does
BULLETS = '-*\u2022\u2023\u2043\u25e6\u25aa\u25cf\u2013>'
ELLIPSES = ('...', '\u2026')


class Doc:
    """A document's text, and the parts of it that the rules measure, each split once when first asked for
    (hash_words sets the words and shingles of many at once)."""

    def __init__(self, text):
        self.text = text

    @cached_property
    def lines(self):  # the non-empty ones, stripped
        return list(filter(None, map(str.strip, self.text.split('\n'))))

    @cached_property
    def line_ends(self):  # each line's first character and its last, as two strings (counted fast)
        return ''.join(map(itemgetter(0), self.lines)), ''.join(map(itemgetter(-1), self.lines))

    @cached_property
    def words(self):  # (64-bit hashes, lengths in bytes) of its words: runs of letters and digits, any case
        return word_hashes(self.text.lower().encode())[:2]

    @cached_property
    def shingles(self):  # the hashes of its word 5-grams (of all its words, if it has fewer)
        return ngram_hashes(self.words[0], SHINGLE_WORDS)


def word_count(doc):
    return len(doc.words[1])


def mean_word_length(doc):
    return int(doc.words[1].sum()) / max(word_count(doc), 1)


def symbol_ratio(doc):
    """Gopher: hashes and ellipses per word (lists of tags, text cut short)."""
    return (doc.text.count('#') + sum(map(doc.text.count, ELLIPSES))) / max(word_count(doc), 1)


def line_punctuation(doc):
    """FineWeb: the fraction of lines ending in terminal punctuation (menus and lists end in none)."""
    return sum(map(doc.line_ends[1].count, TERMINAL_PUNCTUATION)) / max(len(doc.lines), 1)


def duplicate_lines(doc):
    """Gopher: the fraction of lines that repeat an earlier line of the document."""
    return (len(doc.lines) - len(set(doc.lines))) / max(len(doc.lines), 1)


def duplicate_ngram_chars(doc):
    """Gopher: the fraction of the words' characters inside 5-grams that occur more than once in the document."""
    grams, lengths = doc.shingles, doc.words[1]
    if len(lengths) < SHINGLE_WORDS:
        return 0.0
    ordered = np.sort(grams)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(twice) == 0:  # most documents
        return 0.0
    repeated = np.isin(grams, twice).astype(np.int32)
    starts_minus_ends = np.zeros(len(lengths) + 1, dtype=np.int32)  # each repeated 5-gram covers its 5 words
    starts_minus_ends[:len(grams)] += repeated
    starts_minus_ends[SHINGLE_WORDS:SHINGLE_WORDS + len(grams)] -= repeated
    covered = np.cumsum(starts_minus_ends[:-1]) > 0
    return float(lengths[covered].sum() / lengths.sum())


def bullet_lines(doc):
    """Gopher: the fraction of lines starting with a bullet (lists, navigation)."""
    return sum(map(doc.line_ends[0].count, BULLETS)) / max(len(doc.lines), 1)


def ellipsis_lines(doc):
    """Gopher: the fraction of lines ending in an ellipsis (truncated previews)."""
    return sum(map(str.endswith, doc.lines, itertools.repeat(ELLIPSES))) / max(len(doc.lines), 1)


RULES = {  # name: (measure, key of its lower bound, key of its upper bound), checked in this order
    'word count': (word_count, 'min_words', 'max_words'),
    'mean word length': (mean_word_length, 'min_mean_word_length', 'max_mean_word_length'),
    'symbol ratio': (symbol_ratio, None, 'max_symbol_ratio'),
    'line punctuation': (line_punctuation, 'min_line_punct', None),
    'duplicate lines': (duplicate_lines, None, 'max_dup_lines'),
    'duplicate n-grams': (duplicate_ngram_chars, None, 'max_dup_ngram_chars'),
    'bullet lines': (bullet_lines, None, 'max_bullet_lines'),
    'ellipsis lines': (ellipsis_lines, None, 'max_ellipsis_lines'),
}
PRESETS = {  # FineWeb's thresholds: Gopher's (Rae et al. 2021, appendix A) and FineWeb's own line_punct_thr
    'web': {'min_words': 50, 'max_words': 100_000, 'min_mean_word_length': 3, 'max_mean_word_length': 10,
            'max_symbol_ratio': 0.1, 'min_line_punct': 0.12, 'max_dup_lines': 0.3, 'max_dup_ngram_chars': 0.15,
            'max_bullet_lines': 0.9, 'max_ellipsis_lines': 0.3},
}
QUALITY_KEYS = list(PRESETS['web'])  # every rule's bounds, each an option of prepare.py


def quality_bounds(preset=None, **overrides):
    """The bounds in force: a preset's (or none), with the keys given (not None) replacing its own. Raises
    ValueError, saying what to give instead, for an unknown preset or key."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown --quality '{preset}': use {', '.join(PRESETS)}, or set the rules' own keys")
    unknown = set(overrides) - set(QUALITY_KEYS)
    if unknown:
        raise ValueError(f"unknown quality key(s) {', '.join(sorted(unknown))}: the keys are {', '.join(QUALITY_KEYS)}")
    bounds = {**PRESETS.get(preset, {}), **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in bounds.items():
        if not value >= 0:
            raise ValueError(f"--{key} must be 0 or more, got {value}")
    return bounds


def failed_rule(doc, bounds):
    """The name of the first rule whose measure of doc is outside its bounds, or None."""
    for name, (measure, low, high) in RULES.items():
        if low in bounds or high in bounds:
            value = measure(doc)
            if value < bounds.get(low, value) or value > bounds.get(high, value):
                return name
    return None


# -----------------------------------------------------------------------------
# near duplicates: MinHash signatures of word 5-grams, and the LSH index that finds the ones seen before

SHINGLE_WORDS = 5
NUM_PERM = 64  # hash functions, a signature's cost: 128 would cost twice as much and hardly sharpen the S-curve
_params = np.random.default_rng(20240521).integers(0, 1 << 32, (2, NUM_PERM), dtype=np.uint64).astype(np.uint32)
PERM_A, PERM_B = _params[0] | np.uint32(1), _params[1]  # x -> a*x + b mod 2^32, a odd: NUM_PERM fixed permutations
PLACE_WEIGHTS = np.random.default_rng(1).integers(0, 1 << 63, NUM_PERM, dtype=np.uint64) << np.uint64(1) | np.uint64(1)
WORD_BYTE = np.zeros(256, dtype=bool)  # letters, digits and any byte of a non-ASCII character
WORD_BYTE[np.frombuffer(b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789', np.uint8)] = True
WORD_BYTE[128:] = True
NON_WORD = re.compile(rb'[^A-Za-z0-9\x80-\xff]')
HASH_BYTES = 1 << 20  # the most text word_hashes takes in one piece
# documents are hashed and signed together, GROUP_BYTES of text and SIGN_AT_ONCE shingles at a time: numpy's
# cost per call is about what a short document's own work costs (these sizes measured fastest)
GROUP_BYTES = 1 << 16
SIGN_AT_ONCE = 1 << 13
POLY = 0x100000001B3  # odd, so invertible mod 2^64: a word's hash is a difference of prefix sums, rescaled
POLY_INVERSE = pow(POLY, -1, 1 << 64)


def mix64(x):
    """MurmurHash3's finalizer on an array of uint64: every input bit flips about half the output bits."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def word_hashes(data):
    """(hashes, lengths, starts) of the words in data, lowercased UTF-8: runs of ASCII letters and digits (and
    of non-ASCII characters), so punctuation and case don't tell two copies apart. The same in every process
    (Python's hash() is salted per process): a polynomial hash of the bytes, from prefix sums in numpy, a
    piece of HASH_BYTES at a time (cut between words) so that the arrays stay small for a long text."""
    pieces, start = [], 0
    while start < len(data) or not pieces:
        cut = NON_WORD.search(data, start + HASH_BYTES) if len(data) - start > HASH_BYTES else None
        end = cut.start() if cut else len(data)
        codes = np.frombuffer(data[start:end], dtype=np.uint8)
        in_word = np.zeros(len(codes) + 2, dtype=bool)  # a non-word byte on either side
        in_word[1:-1] = WORD_BYTE[codes]
        edges = np.flatnonzero(in_word[1:] != in_word[:-1])
        starts, ends = edges[::2], edges[1::2]
        powers, inverses = poly_powers(len(codes) + 1)
        prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
        np.cumsum(codes * powers[:-1], out=prefix[1:])  # sum of byte_j * POLY^(j+1) for j < i, mod 2^64
        pieces.append(((prefix[ends] - prefix[starts]) * inverses[starts], ends - starts, starts + start))
        start = end
    return tuple(np.concatenate(part) for part in zip(*pieces)) if len(pieces) > 1 else pieces[0]


_powers = (np.empty(0, dtype=np.uint64),) * 2


def poly_powers(n):
    """POLY^(i+1) and POLY^-(i+1) mod 2^64 for i < n, from tables kept between documents."""
    global _powers
    if len(_powers[0]) < n:
        size = max(n, 2 * len(_powers[0]), 1 << 16)
        _powers = tuple(np.cumprod(np.full(size, p, dtype=np.uint64)) for p in (POLY, POLY_INVERSE))
    return _powers[0][:n], _powers[1][:n]


def ngram_hashes(hashes, n):
    """The hashes of the n-grams of consecutive words (one, of all the words, if there are fewer than n)."""
    n = min(n, len(hashes))
    if n == 0:
        return hashes
    grams = hashes[:len(hashes) - n + 1].copy()
    for k in range(1, n):  # an ordered combination: the same words in another order are another n-gram
        grams = grams * np.uint64(0x9E3779B97F4A7C15) + hashes[k:len(hashes) - n + 1 + k]
    return mix64(grams)


def hash_words(docs):
    """Set the words and shingles of Docs at once: their texts hashed as one (a line break between two, so no
    word spans them), then cut back."""
    texts = [doc.text.lower().encode() for doc in docs]
    hashes, lengths, starts = word_hashes(b'\n'.join(texts))
    firsts = np.searchsorted(starts, np.cumsum([0] + [len(text) + 1 for text in texts]))  # each one's first word
    grams = ngram_hashes(hashes, SHINGLE_WORDS)  # those across two documents are left out below
    for doc, first, end in zip(docs, firsts.tolist(), firsts[1:].tolist()):
        doc.words = hashes[first:end], lengths[first:end]
        doc.shingles = (grams[first:end - SHINGLE_WORDS + 1] if end - first >= SHINGLE_WORDS else
                        ngram_hashes(hashes[first:end], SHINGLE_WORDS))


def signatures(shingles, perms=NUM_PERM):
    """The MinHash signatures of documents, one row each (given their shingles): for each of the first `perms`
    permutations, the least permuted shingle (32 bits). All together, SIGN_AT_ONCE shingles at a time."""
    x = (np.concatenate(shingles) >> np.uint64(32)).astype(np.uint32) if shingles else np.empty(0, np.uint32)
    owner = np.repeat(np.arange(len(shingles)), [len(s) for s in shingles])  # the document of each shingle
    rows = np.full((len(shingles), perms), np.iinfo(np.uint32).max, dtype=np.uint32)
    for start in range(0, len(x), SIGN_AT_ONCE):
        permuted = PERM_A[:perms, None] * x[None, start:start + SIGN_AT_ONCE]  # (perms, shingles), mod 2^32
        permuted += PERM_B[:perms, None]
        block = owner[start:start + SIGN_AT_ONCE]
        firsts = np.flatnonzero(np.diff(block, prepend=-1))  # where each document's shingles start
        rows[block[firsts]] = np.minimum(rows[block[firsts]], np.minimum.reduceat(permuted, firsts, axis=1).T)
    return rows


def lsh_shape(threshold, perms=NUM_PERM, recall=0.95):
    """(bands, rows) of the LSH: the most rows per band (the fewest pairs found below the threshold) for which a
    pair of documents whose Jaccard similarity is the threshold is still found with probability `recall`."""
    for rows in range(perms, 0, -1):
        if found_probability(threshold, perms // rows, rows) >= recall:
            return perms // rows, rows
    return perms, 1


def found_probability(jaccard, bands, rows):
    """How likely LSH finds a pair of that Jaccard similarity: all the rows of one band or more agree."""
    return 1 - (1 - jaccard ** rows) ** bands


def band_keys(signatures, bands, rows):
    """A 64-bit key per band of each signature (a row): the band's values weighted by their place in the
    signature (so one index holds every band's) and summed, mod 2^64."""
    weighted = signatures[:, :bands * rows].astype(np.uint64) * PLACE_WEIGHTS[:bands * rows]
    return weighted.reshape(len(signatures), bands, rows).sum(axis=2)


class SeenHashes:
    """A set of 64-bit hashes in ~8-17 bytes each, where a Python set takes ~90: a sorted array, plus a set of
    recent ones merged into it whenever it grows past an eighth of the array (so merges stay rare)."""

    def __init__(self):
        self.merged, self.recent = np.empty(0, dtype=np.uint64), set()

    def add(self, h):
        """Add h; False if it was already there."""
        i = int(np.searchsorted(self.merged, h))
        if h in self.recent or (i < len(self.merged) and self.merged[i] == h):
            return False
        self.recent.add(h)
        self._merge_if_large()
        return True

    def add_rows(self, rows):
        """Add the hashes of each row of a 2-D array, in order; for each row, whether none was there before."""
        i = np.minimum(np.searchsorted(self.merged, rows), max(len(self.merged) - 1, 0))
        in_merged = (self.merged[i] == rows).any(axis=1).tolist() if len(self.merged) else [False] * len(rows)
        new = []
        for row, seen in zip(rows.tolist(), in_merged):
            new.append(not seen and self.recent.isdisjoint(row))
            self.recent.update(row)
        self._merge_if_large()
        return new

    def _merge_if_large(self):
        if len(self.recent) > max(1 << 16, len(self.merged) // 8):
            n = len(self.merged)
            self.merged.resize(n + len(self.recent), refcheck=False)  # in place where it can: never two copies
            self.merged[n:] = np.fromiter(self.recent, np.uint64, len(self.recent))
            self.merged.sort()
            self.recent.clear()

    def nbytes(self):
        """Its memory: the array, the set, and the set's int objects."""
        return self.merged.nbytes + sys.getsizeof(self.recent) + sum(map(sys.getsizeof, self.recent))


# -----------------------------------------------------------------------------
# the judgement of a batch of documents, in a worker process

def judge_batch(task):
    """In a worker, for a task (settings, texts): for each text, (the rule it fails, or None; its LSH band keys
    when near-dedup is on and it passes and has words, else None)."""
    (bounds, bands, rows), texts = task
    docs, group, n_bytes = [Doc(text) for text in texts], [], 0
    for doc in docs:  # hashed in groups of about GROUP_BYTES
        group.append(doc)
        n_bytes += len(doc.text)
        if n_bytes >= GROUP_BYTES or doc is docs[-1]:
            hash_words(group)
            group, n_bytes = [], 0
    verdicts = [(failed_rule(doc, bounds) if bounds else None, None) for doc in docs]
    signed = [i for i, (reason, _) in enumerate(verdicts) if bands and reason is None and len(docs[i].shingles)]
    keys = band_keys(signatures([docs[i].shingles for i in signed], bands * rows), bands, rows)
    for i, row in zip(signed, keys):
        verdicts[i] = (None, row)
    return verdicts


# -----------------------------------------------------------------------------
# PII: emails and public IP addresses become fixed placeholders, as FineWeb's PII formatter does

PLACEHOLDERS = {  # reserved for documentation (RFC 2606, 5737, 3849): no one's, and left alone by a second pass
    'email': 'email@example.com', 'ipv4': '192.0.2.1', 'ipv6': '2001:db8::1'}
PII = {  # kind: (its pattern from a literal '@', ':' or '.', which re finds fast; what comes before that literal)
    'email': (re.compile(r'@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])'),
              re.compile(r'(?<![\w.%+-])[\w.%+-]{1,64}$')),
    'ipv6': (re.compile(r':(?:[0-9A-Fa-f]{0,4}:){1,6}'  # then an IPv4 tail, a last group, or nothing after ::
                        r'(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4}|(?<=:))(?![\w:]|\.\d)'),
             re.compile(r'(?<![\w:.])[0-9A-Fa-f]{1,4}$')),  # before ipv4: ::ffff:8.8.8.8 is one address
    'ipv4': (re.compile(r'\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)'),
             re.compile(r'(?<![\w.])\d{1,3}$')),
}


def is_public(address):
    """An IP address anyone on the Internet could reach: not private, loopback, link-local, reserved,
    documentation or multicast. Not one at all (12:30:45, 999.1.1.1): False."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_global and not ip.is_multicast


def redact_item(item):
    """(item with its PII redacted, the redactions by kind): a text, or each message of a conversation."""
    if isinstance(item, str):
        return redact(item)
    counts, messages = collections.Counter(), []
    for message in item:
        content, found = redact(message['content'])
        messages.append({**message, 'content': content})
        counts.update(found)
    return type(item)(messages), counts


def redact(text):
    """(text with its emails and public IP addresses replaced by PLACEHOLDERS, how many of each kind)."""
    counts = collections.Counter()
    for kind, (pattern, before) in PII.items():
        kept, done = [], 0
        for match in pattern.finditer(text):
            head = before.search(text, max(done, match.start() - 64), match.start())
            start = head.start() if head else match.start()
            found = text[start:match.end()]
            if ((head is None and kind != 'ipv6') or found == PLACEHOLDERS[kind] or  # ::1 has no head
                    (kind != 'email' and not is_public(found))):
                continue
            kept += [text[done:start], PLACEHOLDERS[kind]]
            done = match.end()
            counts[kind] += 1
        text = ''.join(kept) + text[done:] if kept else text
    return text, counts


# -----------------------------------------------------------------------------
# the report

SAMPLES_PER_REASON = 5
SAMPLE_CHARS = 200


class Report:
    """Documents and bytes read, kept and removed by reason; the kept documents by split; redactions by kind;
    and the first few documents removed for each reason (their first SAMPLE_CHARS characters, redacted when
    redact_samples is on)."""

    def __init__(self, redact_samples=False):
        self.documents, self.bytes = collections.Counter(), collections.Counter()
        self.splits, self.redactions = collections.Counter(), collections.Counter()
        self.samples, self.redact_samples = [], redact_samples
        self.unjudged, self.indexed, self.index = 0, 0, None  # near-dedup's: documents in its index, its figures

    def read(self, n_bytes):
        self.documents['read'] += 1
        self.bytes['read'] += n_bytes

    def remove(self, reason, n_bytes, text=None, number=None):
        """Count a document removed for reason; keep the start of its text if it is one of the first few."""
        self.documents[reason] += 1
        self.bytes[reason] += n_bytes
        if text is not None and self.documents[reason] <= SAMPLES_PER_REASON:
            sample = text[:SAMPLE_CHARS]
            self.samples.append({'reason': reason, 'document': number,
                                 'text': redact(sample)[0] if self.redact_samples else sample})

    def removed(self):
        """{reason: documents} in the order prepare.py applies them."""
        order = ['too short', 'exact duplicate', *RULES, 'near duplicate']
        return {reason: self.documents[reason] for reason in sorted(set(self.documents) - {'read'}, key=order.index)}

    def as_dict(self, **extra):
        removed = self.removed()
        return {'documents': {'read': self.documents['read'], 'kept': self.documents['read'] - sum(removed.values()),
                              'removed': removed},
                'bytes': {'read': self.bytes['read'], 'kept': self.bytes['read'] - sum(map(self.bytes.get, removed)),
                          'removed': {reason: self.bytes[reason] for reason in removed}},
                'redactions': dict(self.redactions), 'unjudged': self.unjudged, 'near_dedup_index': self.index, **extra}

    def lines(self, what='documents'):
        """The table prepare.py prints: read, kept and each reason's removals, in documents and MB."""
        figures = self.as_dict()
        rows = [('read', figures['documents']['read'], figures['bytes']['read']),
                ('kept', figures['documents']['kept'], figures['bytes']['kept'])]
        rows += [(f'removed: {reason}', n, figures['bytes']['removed'][reason])
                 for reason, n in figures['documents']['removed'].items()]
        width = max(len(name) for name, _, _ in rows + [(what, 0, 0)])
        lines = [f"{what:{width}}  {'count':>11}  {'MB':>9}  {'of bytes':>8}"]
        for name, n, n_bytes in rows:
            lines.append(f"{name:{width}}  {n:11,}  {n_bytes / 1e6:9,.1f}  {n_bytes / max(self.bytes['read'], 1):8.1%}")
        if self.redact_samples:
            lines.append(f'redacted: {self.redacted()}')
        if self.index:
            lines.append(f"near-duplicate index: {self.index['bands']} bands of {self.index['rows']} rows, "
                         f"{self.index['bytes'] / 1e6:,.1f} MB, "
                         f"{self.index['bytes per document']:.0f} bytes per document")
        return lines

    def redacted(self):
        return ', '.join(f"{self.redactions[kind]:,} {kind}" for kind in PLACEHOLDERS)

    def write(self, data_dir, **extra):
        """data_dir/report.json: the figures, and extra; data_dir/removed_samples.jsonl: the samples, in input
        order (whatever the number of workers), to check that the rules remove what they should."""
        samples = sorted(self.samples, key=lambda sample: sample['document'] or 0)
        for filename, text in (('report.json', json.dumps(self.as_dict(**extra), indent=1)),
                               ('removed_samples.jsonl', ''.join(json.dumps(sample, ensure_ascii=False) + '\n'
                                                                 for sample in samples))):
            with open(os.path.join(data_dir, f'{filename}.tmp'), 'w', encoding='utf-8') as f:
                f.write(text)
            os.replace(os.path.join(data_dir, f'{filename}.tmp'), os.path.join(data_dir, filename))


def index_figures(index, documents, threshold, lsh_shape):
    """The LSH index's shape and memory (holding the keys of `documents`), for the report."""
    bands, rows = lsh_shape
    return {'threshold': threshold, 'bands': bands, 'rows': rows, 'documents': documents,
            'bytes': index.nbytes(), 'bytes per document': round(index.nbytes() / max(documents, 1), 1),
            'found at the threshold': round(found_probability(threshold, bands, rows), 4)}
