import collections
import itertools
import json
import os
import re

import numpy as np
import pytest

import curate
from bench_prepare import planted_documents
from conftest import SHAKESPEARE, gpt2_bpe_available, run
from curate import PRESETS, Doc, failed_rule
from prepare import prepare
from documents import Conversation
from test_prepare import gpt2_documents

needs_bpe = pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
needs_text = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs tiny shakespeare")
WEB = PRESETS['web']


def distinct_words(n, length=5):
    """n different words of `length` consonants: bbbbb, bbbbc, ..."""
    return [''.join(letters) for letters in itertools.islice(itertools.product('bcdfghjklmnp', repeat=length), n)]


# -----------------------------------------------------------------------------
# each quality rule at its 'web' bound: the bound itself passes, a step past it fails

def rule_cases():
    """(rule, its keys, a document at its bound, one just past it)."""
    w = distinct_words(2000)

    def punctuated(n):  # 100 lines, n of them ending in a full stop
        return '\n'.join(f'{w[i]} {w[i + 100]}' + ('.' if i < n else '') for i in range(100))

    def repeating(n):  # 100 lines, n of them repeating an earlier one
        return '\n'.join(w[:100 - n] + w[:n])

    def bulleted(n):
        return '\n'.join(('- ' if i < n else '') + w[i] for i in range(100))

    def cut_short(n):
        return '\n'.join(w[i] + ('...' if i < n else '.') for i in range(100))
    # 80 words of 5 letters; a phrase of 6 of them twice covers 12 words, 15% of the characters, with
    # repeated 5-grams; one letter less in a word outside them makes it 60 / 399 = 15.04%
    phrase = w[:6]
    return [
        ('word count', ['min_words'], ' '.join(w[:50]), ' '.join(w[:49])),
        ('word count', ['max_words'], ' '.join(['ab'] * 100_000), ' '.join(['ab'] * 100_001)),
        ('mean word length', ['min_mean_word_length'], ' '.join(['ab', 'abcd'] * 30),
         ' '.join(['ab', 'abcd'] * 30 + ['ab'])),
        ('mean word length', ['max_mean_word_length'], ' '.join(['a' * 10] * 60),
         ' '.join(['a' * 10] * 59 + ['a' * 11])),
        ('symbol ratio', ['max_symbol_ratio'], ' '.join(w[:100]) + ' #' * 10, ' '.join(w[:100]) + ' #' * 11),
        ('symbol ratio', ['max_symbol_ratio'], ' '.join(w[:100]) + ' ...' * 9 + ' \u2026',
         ' '.join(w[:100]) + ' ...' * 11),
        ('line punctuation', ['min_line_punct'], punctuated(12), punctuated(11)),
        ('duplicate lines', ['max_dup_lines'], repeating(30), repeating(31)),
        ('duplicate n-grams', ['max_dup_ngram_chars'], ' '.join(phrase + w[6:74] + phrase),
         ' '.join(phrase + [w[6][:4]] + w[7:74] + phrase)),
        ('bullet lines', ['max_bullet_lines'], bulleted(90), bulleted(91)),
        ('ellipsis lines', ['max_ellipsis_lines'], cut_short(30), cut_short(31)),
    ]


@pytest.mark.parametrize('rule, keys, at_bound, past_bound', rule_cases(), ids=[case[1][0] for case in rule_cases()])
def test_each_quality_rule_keeps_its_bound_and_removes_past_it(rule, keys, at_bound, past_bound):
    bounds = {key: WEB[key] for key in keys}
    assert failed_rule(Doc(at_bound), bounds) is None
    assert failed_rule(Doc(past_bound), bounds) == rule
    assert failed_rule(Doc(past_bound), {}) is None  # without its bound, no rule removes it


def test_the_duplicate_ngram_measure_matches_a_plain_count():
    rng = np.random.default_rng(0)
    vocabulary = distinct_words(30, 3) + distinct_words(30, 7)
    for _ in range(30):  # from a few words (many repeats) to many
        words = [vocabulary[i] for i in rng.integers(0, rng.integers(2, 60), rng.integers(5, 120))]
        counts = collections.Counter(tuple(words[i:i + 5]) for i in range(len(words) - 4))
        covered = set()
        for i in range(len(words) - 4):
            if counts[tuple(words[i:i + 5])] > 1:
                covered.update(range(i, i + 5))
        expected = sum(len(words[i]) for i in covered) / sum(map(len, words))
        assert curate.duplicate_ngram_chars(Doc(' '.join(words))) == pytest.approx(expected)


@needs_text
def test_the_web_preset_keeps_prose_and_removes_boilerplate():
    prose = open(SHAKESPEARE).read()[:3000]
    menu = '\n'.join(['Home', 'About us', 'Products', 'Contact', 'Login'] * 12)
    tags = ' '.join(f'#{w}' for w in distinct_words(60))
    assert failed_rule(Doc(prose), WEB) is None
    assert failed_rule(Doc(menu), WEB) == 'line punctuation' and failed_rule(Doc(tags), WEB) == 'symbol ratio'
    assert failed_rule(Doc('Too short to train on.'), WEB) == 'word count'


def test_bad_curation_options_are_one_line_errors(tmp_path):
    (tmp_path / 'in.jsonl').write_text(json.dumps({'text': 'some text'}) + '\n')
    (tmp_path / 'one.txt').write_text('some text')
    cases = [(['--quality=foo'], "unknown --quality 'foo': use web"), (['--near_dedup=1.5'], 'between 0 and 1'),
             (['--near_dedup=0'], 'between 0 and 1'), (['--max_dup_lines=-1'], '--max_dup_lines must be 0 or more'),
             (['--quality=web', f'--input={tmp_path}/one.txt'], 'is one text, split by position')]
    for args, message in cases:
        proc = run('prepare.py', 'x', f'--input={tmp_path}/in.jsonl', *args, cwd=tmp_path, check=False)
        assert proc.returncode == 1 and message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# near duplicates

def shingle_set(text):
    """Word 5-grams computed plainly, as curate.py defines words: runs of letters and digits, any case."""
    words = re.findall(r'[a-z0-9\x80-\U0010ffff]+', text.lower())
    return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}


@needs_text
def test_minhash_estimates_the_jaccard_similarity_of_word_5grams():
    lines = open(SHAKESPEARE).read().split('\n')
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(60):  # pairs sharing from none to nearly all of their lines
        start, n, shift = rng.integers(0, 30_000), rng.integers(40, 120), rng.integers(0, 130)
        a, b = '\n'.join(lines[start:start + n]), '\n'.join(lines[start + shift:start + shift + n])
        sa, sb = shingle_set(a), shingle_set(b)
        exact = len(sa & sb) / len(sa | sb)
        signatures = curate.signatures([Doc(a).shingles, Doc(b).shingles])
        estimate = np.mean(signatures[0] == signatures[1])
        assert abs(estimate - exact) < 4 * np.sqrt(exact * (1 - exact) / curate.NUM_PERM) + 0.02
        errors.append(estimate - exact)
    assert abs(np.mean(errors)) < 0.02  # unbiased


def test_lsh_shape_finds_pairs_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = curate.lsh_shape(threshold)
        assert bands * rows <= curate.NUM_PERM and curate.found_probability(threshold, bands, rows) >= 0.95
        if rows < curate.NUM_PERM:  # one more row per band would miss more than 5% at the threshold
            assert curate.found_probability(threshold, curate.NUM_PERM // (rows + 1), rows + 1) < 0.95


def test_the_index_tells_the_rows_sharing_a_key_with_an_earlier_one():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2 ** 64, (20_000, 10), dtype=np.uint64)  # 200,000 keys: past a merge
    for earlier, later in rng.integers(0, 20_000, (3000, 2)):  # one key of a row again, in another
        rows[max(earlier, later), rng.integers(10)] = rows[min(earlier, later), rng.integers(10)]
    index, reference, new = curate.SeenHashes(), set(), []
    for start in range(0, len(rows), 333):
        new += index.add_rows(rows[start:start + 333])
    for row, is_new in zip(rows.tolist(), new, strict=True):
        assert is_new == reference.isdisjoint(row)
        reference.update(row)
    assert len(index.merged) > 0


@needs_bpe
@needs_text
def test_planted_near_duplicates_are_removed_and_distinct_documents_kept(tmp_path):
    lines = [line for line in open(SHAKESPEARE).read().split('\n') if line.strip()]
    corpus = list(itertools.islice(planted_documents(lines, seed=1, duplicates=0, near_duplicates=0.2), 800))
    (tmp_path / 'in.jsonl').write_text(''.join(json.dumps({'text': text}) + '\n' for text, _, _ in corpus))
    prepare('near', str(tmp_path / 'in.jsonl'), near_dedup=0.8, data_root=str(tmp_path / 'data'), workers=2)
    kept = collections.Counter(d for split in gpt2_documents(tmp_path / 'data' / 'near').values() for d in split)
    planted = [text for text, kind, _ in corpus if kind != 'new']
    distinct = [text for text, kind, _ in corpus if kind == 'new']
    assert len(planted) > 100
    assert sum(kept[text] == 0 for text in planted) >= 0.95 * len(planted)  # removed
    assert sum(kept[text] == 0 for text in distinct) <= 0.01 * len(distinct)
    report = json.load(open(tmp_path / 'data' / 'near' / 'report.json'))
    assert report['documents']['removed']['near duplicate'] == len(corpus) - sum(kept.values())
    index = report['near_dedup_index']
    assert index['documents'] == len(corpus) and index['bytes per document'] > 0
    assert index['found at the threshold'] >= 0.95


# -----------------------------------------------------------------------------
# PII

def test_emails_and_public_ips_are_redacted_in_text_urls_and_next_to_punctuation():
    text = ('Write to john.doe+news@mail.example.com, or (ann@quill.net). Mail: <bo_chen@uni.edu>!\n'
            'See mailto:eve@stone.org?subject=hi and https://93.184.216.34/index.html '
            'or http://[2606:4700::1111]:80/.\n'
            'Our servers: 8.8.8.8; 2001:4860:4860::8888, and 1.1.1.1.')
    redacted, counts = curate.redact(text)
    assert redacted == (
        'Write to email@example.com, or (email@example.com). Mail: <email@example.com>!\n'
        'See mailto:email@example.com?subject=hi and https://192.0.2.1/index.html '
        'or http://[2001:db8::1]:80/.\n'
        'Our servers: 192.0.2.1; 2001:db8::1, and 192.0.2.1.')
    assert counts == {'email': 4, 'ipv4': 3, 'ipv6': 2}
    assert curate.redact(redacted) == (redacted, {})  # the placeholders are left alone


def test_private_addresses_and_text_without_pii_are_left_byte_for_byte(small_text):
    private = ('the router is 192.168.1.1, the host 127.0.0.1 or ::1; 10.0.0.7, 172.16.5.4, fe80::1, fc00::2, '
               '169.254.0.1, 0.0.0.0, 224.0.0.1 and ff02::1 stay')
    not_pii = ('at 12:30:45 on 2024-05-21, ratio 3:2, v1.2.3, pi = 3.14159, 999.1.1.1 and 1.2.3.4.5 are no address; '
               'a@b is no email, nor is @handle; call +1 555 0100, ask Ann Lee')  # names and phones: not covered
    for text in (private, not_pii, small_text, 'caf\u00e9 \u2014 \U0001F600\r\n\t'):
        assert curate.redact(text) == (text, {})
    assert curate.redact('version 1.2.3.4 is out')[0] == 'version 192.0.2.1 is out'  # looks public: replaced


def test_a_conversation_is_redacted_message_by_message():
    chat = Conversation([{'role': 'user', 'content': 'I am ann@quill.net'},
                         {'role': 'assistant', 'content': 'Hi', 'weight': 0}])
    redacted, counts = curate.redact_item(chat)
    assert isinstance(redacted, Conversation) and counts == {'email': 1}
    assert redacted == [{'role': 'user', 'content': 'I am email@example.com'},
                        {'role': 'assistant', 'content': 'Hi', 'weight': 0}]


# -----------------------------------------------------------------------------
# all together: the report, and the same output for any number of workers

@needs_bpe
@needs_text
def test_every_option_gives_the_same_output_for_1_and_2_workers_and_a_report_that_adds_up(tmp_path):
    lines = [line for line in open(SHAKESPEARE).read().split('\n') if line.strip()]
    corpus = [text for text, _, _ in itertools.islice(planted_documents(lines, seed=2, near_duplicates=0.1), 600)]
    corpus += ['Home\nAbout\nContact\n' * 30, 'too short', corpus[3]]  # a menu, a short one, a duplicate
    (tmp_path / 'in.jsonl').write_text(''.join(json.dumps({'text': text}) + '\n' for text in corpus))
    outputs = []
    for workers in (1, 2):
        data_dir = prepare(f'all{workers}', str(tmp_path / 'in.jsonl'), workers=workers, min_length=20, quality='web',
                           near_dedup=0.8, redact_pii=True, data_root=str(tmp_path / 'data'))
        outputs.append({name: open(f'{data_dir}/{name}', 'rb').read()
                        for name in ('train.bin', 'val.bin', 'report.json', 'removed_samples.jsonl')})
    assert outputs[0] == outputs[1]
    report = json.loads(outputs[0]['report.json'])
    documents, n_bytes, removed = report['documents'], report['bytes'], report['documents']['removed']
    assert documents['read'] == len(corpus) and n_bytes['read'] == sum(len(text.encode()) for text in corpus)
    assert documents['kept'] + sum(removed.values()) == documents['read']
    assert n_bytes['kept'] + sum(n_bytes['removed'].values()) == n_bytes['read']
    assert documents['kept'] == report['splits']['train']['documents'] + report['splits']['val']['documents']
    assert removed['too short'] == 1 and removed['exact duplicate'] >= 1 and removed['near duplicate'] > 20
    assert removed['line punctuation'] >= 1
    assert set(removed) <= {'too short', 'exact duplicate', 'near duplicate', *curate.RULES}
    kept = [d for split in gpt2_documents(tmp_path / 'data' / 'all1').values() for d in split]
    assert len(kept) == documents['kept'] and sum(report['redactions'].values()) > 50
    assert not any('@mail.com' in d or '@quill.net' in d for d in kept) and any('email@example.com' in d for d in kept)
    samples = [json.loads(line) for line in outputs[0]['removed_samples.jsonl'].decode().splitlines()]
    assert {s['reason'] for s in samples} == set(removed)
    for sample in samples:
        assert sample['text'] == curate.redact(corpus[sample['document'] - 1][:curate.SAMPLE_CHARS])[0]
        assert sum(s['reason'] == sample['reason'] for s in samples) <= curate.SAMPLES_PER_REASON


@needs_bpe
def test_a_document_too_large_to_hold_is_kept_unjudged(tmp_path, monkeypatch, small_text):
    import documents
    monkeypatch.setattr(documents, 'LARGE_FILE', 10_000)  # bytes: files above it are read in chunks
    (tmp_path / 'in').mkdir()
    menu = 'Home\nAbout\nContact\n' * 1000  # fails the line punctuation rule
    texts = {'a.txt': small_text[:5000], 'b.txt': menu, 'c.txt': menu[:3000], 'd.txt': small_text[5000:9000]}
    for name, text in texts.items():
        (tmp_path / 'in' / name).write_text(text)
    prepare('large', str(tmp_path / 'in'), quality='web', near_dedup=0.8, val_fraction=0.3,
            data_root=str(tmp_path / 'data'))
    splits = gpt2_documents(tmp_path / 'data' / 'large')
    assert splits['val'] + splits['train'] == [small_text[:5000], menu, small_text[5000:9000]]
    report = json.load(open(tmp_path / 'data' / 'large' / 'report.json'))
    assert report['unjudged'] == 1 and report['documents']['removed'] == {'line punctuation': 1}
