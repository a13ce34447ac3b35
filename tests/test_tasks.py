"""Tasks (tasks.py, eval.py --task, train.py eval_tasks) and the server's logprobs and echo, on a tiny character
model that has learnt test_serve's TEXT: its right answers are known."""

import json
import math
import re
import statistics

import pytest
import requests
import torch
from torch.nn import functional as F

import tasks
from conftest import gpt2_bpe_available, run
from checkpoint import load_checkpoint
from dataset import GPT2_META, checkpoint_meta
from test_serve import ckpt, greedy, server  # noqa: F401 (fixtures: the tiny model, and its server)
from tokenizer import Tokenizer

# the model has learnt these continuations; the other choices are its own characters in another order
RECORDS = [
    {'context': 'The quick brown fox jumps', 'choices': ['over the lazy dog.', 'of fish.', 'on the mat,'], 'answer': 0},
    {'context': 'A stitch in time saves', 'choices': ['fish', 'my cat?', 'nine!'], 'answer': 2},
    {'ctx': 'Where is my', 'endings': ['dog?', 'cat?', 'fox!', 'time'], 'label': '1'},  # HellaSwag's own fields
    {'context': 'She sleeps on the ', 'choices': ['mat, and', 'lazy dog.'], 'answer': 0},  # (its space goes to the choice)
    # a context longer than the model's 32 positions: it is cut from the left, for each choice as it fits
    {'context': 'The quick brown fox jumps over the lazy dog. A stitch in time saves nine!\nWhere is my',
     'choices': ['cat?', 'dog. She sleeps'], 'answer': 0},
]


@pytest.fixture(scope='module')
def model_and_tokenizer(ckpt):
    model, checkpoint = load_checkpoint(ckpt)
    return model.eval(), Tokenizer(checkpoint_meta(checkpoint))


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return str(path)


def plain_scores(model, tokenizer, context, choices):
    """The independent computation: for each choice, one plain forward pass of context + choice (no cache, no
    batch, no sharing), the sum of log-softmax at the choice's tokens. Context and choice are cut to their last
    block_size + 1 tokens, as lm-evaluation-harness does."""
    scores = []
    for choice in choices:
        # lm-evaluation-harness's pair: context, " " + choice; then the context's last whitespace goes to the choice
        text = context + ' ' + choice
        n = len(context) - len(context.rstrip(' \n'))
        ctx, cont = tokenizer.encode(context[:len(context) - n]), tokenizer.encode(text[len(context) - n:])
        ctx = ctx[len(ctx) - min(len(ctx), model.config.block_size + 1 - len(cont)):]
        ids = torch.tensor([ctx + cont])
        logits, _ = model(ids[:, :-1], ids[:, 1:])  # every position's logits
        logprobs = F.log_softmax(logits[0].double(), dim=-1)
        scores.append(sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return scores


def test_multiple_choice_against_a_plain_forward_pass_per_choice(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    task = tasks.read_task(write_jsonl(tmp_path / 'mc.jsonl', RECORDS))
    results, rows, line = tasks.run_task(model, tokenizer, task)
    assert results['acc'] == results['acc_norm'] == 1.0 and results['records'] == len(RECORDS)
    assert line.startswith(f"{task[0]}: 5 records | acc 1.0000 ± 0.0000 | acc_norm 1.0000 ± 0.0000")
    for record, row in zip(task[2], rows):
        expected = plain_scores(model, tokenizer, record['context'], record['choices'])
        assert max(abs(a - b) for a, b in zip(row['logprobs'], expected)) < 1e-5
        assert row['bytes'] == [len(c.encode()) for c in record['choices']]
        sizes = [len(c.encode('utf-8')) for c in record['choices']]  # acc_norm divides by each choice's bytes
        assert row['pred'] == max(range(len(expected)), key=lambda i: expected[i])
        assert row['pred_norm'] == max(range(len(expected)), key=lambda i: expected[i] / sizes[i])


def test_accuracy_and_standard_errors_against_an_independent_count(model_and_tokenizer, tmp_path):
    """Records with the right answer moved to a wrong choice: acc and its standard error as statistics computes them."""
    model, tokenizer = model_and_tokenizer
    wrong = [dict(r, answer=(r.get('answer', 1) + 1) % len(r.get('choices') or r['endings'])) for r in RECORDS[:3]]
    for r in wrong:
        r.pop('label', None)
        r.setdefault('context', r.pop('ctx', None))
        r.setdefault('choices', r.pop('endings', None))
    records = RECORDS + wrong
    results, rows, _ = tasks.run_task(model, tokenizer, tasks.read_task(write_jsonl(tmp_path / 'mc.jsonl', records)))
    correct = [int(row['pred'] == row['answer']) for row in rows]
    assert correct == [1] * 5 + [0] * 3
    assert results['acc'] == pytest.approx(5 / 8)
    assert results['acc_stderr'] == pytest.approx(statistics.stdev(correct) / math.sqrt(len(correct)))


def test_shuffled_choices_give_the_same_scores(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    path, kind, records = tasks.read_task(write_jsonl(tmp_path / 'mc.jsonl', RECORDS))
    base, base_rows, _ = tasks.run_task(model, tokenizer, (path, kind, records))
    shuffled = []
    for record in records:
        order = list(reversed(range(len(record['choices']))))  # a permutation that moves every right answer
        shuffled.append({'context': record['context'], 'choices': [record['choices'][i] for i in order],
                         'answer': order.index(record['answer'])})
    results, rows, _ = tasks.run_task(model, tokenizer, (path, kind, shuffled))
    assert results['acc'] == base['acc'] == 1.0 and results['acc_norm'] == base['acc_norm']
    for row, base_row in zip(rows, base_rows):
        assert row['logprobs'] == pytest.approx(list(reversed(base_row['logprobs'])), abs=1e-5)


def test_split_choice_moves_the_space_to_the_choice():
    assert tasks.split_choice('The capital of France is', 'Paris') == ('The capital of France is', ' Paris')
    assert tasks.split_choice('The capital of France is ', 'Paris') == ('The capital of France is', '  Paris')
    assert tasks.split_choice('Question?\nAnswer:\n', 'Paris') == ('Question?\nAnswer:', '\n Paris')
    assert tasks.split_choice('', 'b') == ('', ' b')


def test_one_record_has_no_standard_error_and_the_output_is_strict_json(ckpt, tmp_path):
    path = write_jsonl(tmp_path / 'mc.jsonl', RECORDS[:1])
    out = run('eval.py', f'--out_dir={ckpt}', f'--task={path}', '--output=one.json', '--device=cpu', cwd=tmp_path).stdout
    assert '| acc 1.0000 ± n/a | acc_norm 1.0000 ± n/a |' in out
    saved = json.loads((tmp_path / 'one.json').read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert saved['results']['acc_stderr'] is None


def test_eval_py_task_output_and_limit(ckpt, tmp_path):
    path = write_jsonl(tmp_path / 'mc.jsonl', RECORDS)
    out = run('eval.py', f'--out_dir={ckpt}', f'--task={path}', '--limit=2', '--output=scores.json', '--device=cpu',
              cwd=tmp_path).stdout
    assert re.fullmatch(rf"{path}: 2 records \| acc 1.0000 ± 0.0000 \| acc_norm 1.0000 ± 0.0000 \| [\d.]+ s", out.strip())
    saved = json.loads((tmp_path / 'scores.json').read_text())
    assert saved['results']['acc'] == 1.0 and len(saved['records']) == 2
    assert saved['records'][1]['answer'] == 2 and len(saved['records'][1]['logprobs']) == 3


def test_generation_metrics_against_hand_computed_values():
    assert tasks.normalize('The  Cat, sat!') == 'cat sat'
    assert tasks.token_f1('the cat sat', 'a cat sat down') == pytest.approx(0.8)  # P 2/2, R 2/3
    assert tasks.token_f1('dog', 'cat') == 0.0 and tasks.token_f1('', '') == 1.0
    results, rows = tasks.generation_metrics([' w b c d', 'x'], [['w b c e'], ['y', ' x ']], [True, False])
    assert [r['exact_match'] for r in rows] == [0, 1] and rows[0]['f1'] == pytest.approx(0.75)
    assert results['exact_match'] == 0.5  # ' x ' stripped is 'x'
    assert results['f1'] == pytest.approx((0.75 + 1.0) / 2)  # w b c d / w b c e: 3 of 4 words each way
    assert results['rougeL'] == pytest.approx((0.75 + 1.0) / 2)  # longest common subsequence 3 of 4
    assert results['stop_rate'] == 0.5
    # BLEU of 'a b c d' against 'a b c e' alone: precisions 3/4, 2/3, 1/2 and (exp-smoothed) 1/2 for 0/1,
    # brevity penalty 1: 100 * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4)
    alone, _ = tasks.generation_metrics(['a b c d'], [['a b c e']], [True])
    assert alone['bleu'] == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)


def test_generation_task_answers_as_the_model_generates(model_and_tokenizer, ckpt, tmp_path):
    model, tokenizer = model_and_tokenizer
    records = [{'prompt': 'The quick brown fox jumps over the', 'answer': 'lazy dog', 'stop': '.'},
               {'prompt': 'Where is my', 'answer': ['cat?', 'cat'], 'stop': ['?', '!']},
               {'prompt': 'A stitch in', 'answer': 'time'}]  # no stop: a new line ends it, or max_new_tokens
    path = write_jsonl(tmp_path / 'qa.jsonl', records)
    results, rows, _ = tasks.run_task(model, tokenizer, tasks.read_task(path), max_new_tokens=12)
    for record, row in zip(records, rows):  # the reference: the model's own greedy generate()
        ids = torch.tensor([tokenizer.encode(record['prompt'])])
        text = tokenizer.decode(model.generate(ids, 12, temperature=0)[0, ids.size(1):].tolist())
        stops = record.get('stop', '\n')
        cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=None)
        assert row['output'] == text[:cut] and row['stopped'] == (cut is not None)
    assert [r['output'] for r in rows[:2]] == [' lazy dog', ' cat']
    assert rows[2]['stopped'] is False and results['stop_rate'] == pytest.approx(2 / 3)
    assert results['exact_match'] == pytest.approx(2 / 3)
    out = run('eval.py', f'--out_dir={ckpt}', f'--task={path}', '--max_new_tokens=12', '--device=cpu', cwd=tmp_path).stdout
    assert out.startswith(f"{path}: 3 records | exact match 0.6667 | F1 ") and 'stop rate 66.7%' in out


def test_a_chat_model_answers_through_its_template(chat_model, tmp_path):
    from conftest import chat_conversations
    conversation = chat_conversations()[0]
    question, right = conversation['messages'][0]['content'], conversation['messages'][1]['content']
    path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': [{'role': 'user', 'content': question}], 'answer': right},
                                                  {'prompt': question, 'answer': right}])
    model, checkpoint = load_checkpoint(chat_model)
    tokenizer = Tokenizer(checkpoint_meta(checkpoint))
    results, rows, _ = tasks.run_task(model, tokenizer, tasks.read_task(path), max_new_tokens=80)
    assert rows[0]['output'] == rows[1]['output']  # a prompt becomes the user's message
    reply = model.generate(torch.tensor([tokenizer.render([{'role': 'user', 'content': question}], True)[0]]), 80,
                           temperature=0)[0].tolist()
    assert rows[0]['stopped'] and results['stop_rate'] == 1.0  # it ended with the assistant's end token
    assert rows[0]['output'] == tokenizer.decode(reply[reply.index(tokenizer.special['<|assistant_start|>']) + 1:
                                                       reply.index(tokenizer.special['<|assistant_end|>'])])


@pytest.mark.parametrize('lines,message', [
    (['{"context": "a", "choices": ["b"], "answer": 1}'], r"line 1: the answer \(label\) must be the index of the right "
                                                          r"choice, 0..0, got 1"),
    (['{"ctx": "a", "endings": [], "label": 0}'], 'line 1: the choices must be a non-empty list'),
    (['', '{"context": "a", "choices": ["b", ""], "answer": 0}'], 'line 2: every choice must be a non-empty string'),
    (['{"question": "a", "target": "b"}'], 'line 1: unknown format: .* it has question, target'),
    (['{"prompt": "a", "answer": "b"}', '{"context": "a", "choices": ["b"], "answer": 0}'],
     'line 2: a choice record in a file of generation records'),
    (['{"prompt": "a", "answer": 3}'], 'line 1: the answer must be a string or a non-empty list of strings'),
    (['{"prompt": "a",'], 'line 1: not valid JSON'),
    ([], 'has no records'),
])
def test_bad_task_files_are_one_line_errors_naming_file_and_line(tmp_path, lines, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text(''.join(line + '\n' for line in lines))
    with pytest.raises(SystemExit, match=f"{path}(, )?.*{message}"):
        tasks.read_task(str(path))


def test_bad_task_from_the_command_line_and_messages_for_a_base_model(ckpt, tmp_path):
    (tmp_path / 'bad.jsonl').write_text('{"context": "a", "choices": ["b"], "answer": 5}\n')
    proc = run('eval.py', f'--out_dir={ckpt}', '--task=bad.jsonl', '--device=cpu', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert 'bad.jsonl, line 1: the answer (label)' in proc.stderr
    write_jsonl(tmp_path / 'chat.jsonl', [{'messages': [{'role': 'user', 'content': 'hi'}], 'answer': 'hello'}])
    proc = run('eval.py', f'--out_dir={ckpt}', '--task=chat.jsonl', '--device=cpu', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'need a chat model' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run('eval.py', f'--out_dir={ckpt}', '--task=missing.jsonl', '--device=cpu', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'cannot read task file missing.jsonl' in proc.stderr


def test_train_py_scores_tasks_at_each_eval(tmp_path, small_text):
    (tmp_path / 'input.txt').write_text(small_text, encoding='utf-8')
    run('prepare.py', 'tiny_char', '--input=input.txt', cwd=tmp_path)
    write_jsonl(tmp_path / 'mc.jsonl', [{'context': 'The king', 'choices': ['shall', 'speak', 'of'], 'answer': 0}] * 3)
    write_jsonl(tmp_path / 'qa.jsonl', [{'prompt': 'First', 'answer': 'Citizen'}])
    out = run('train.py', '--dataset=tiny_char', '--out_dir=out', '--max_iters=4', '--eval_interval=2', '--eval_iters=1',
              '--n_layer=1', '--n_head=2', '--n_embd=16', '--block_size=32', '--batch_size=4', '--device=cpu',
              '--eval_tasks=mc.jsonl,qa.jsonl', '--eval_task_limit=2', '--compile=False', cwd=tmp_path).stdout
    evals = [line for line in out.splitlines() if line.startswith('step ')]
    assert len(evals) == 3  # steps 0, 2, 4
    for line in evals:
        assert ', mc acc_norm ' in line and ', qa exact_match ' in line, line
    proc = run('train.py', '--dataset=tiny_char', '--out_dir=out2', '--eval_tasks=nothing.jsonl', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'cannot read task file nothing.jsonl' in proc.stderr and 'Traceback' not in proc.stderr


# -----------------------------------------------------------------------------
# the server: logprobs and echo, as lm-evaluation-harness asks for them

def completion(server, **body):
    r = requests.post(server.url + '/v1/completions', json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echoed_logprobs_equal_eval_py_scores(server, ckpt, tmp_path):
    path = write_jsonl(tmp_path / 'mc.jsonl', RECORDS[1:4])  # (prompts within the model's 32 positions)
    run('eval.py', f'--out_dir={ckpt}', f'--task={path}', '--output=scores.json', '--device=cpu', cwd=tmp_path)
    scores = json.loads((tmp_path / 'scores.json').read_text())['records']
    _, _, records = tasks.read_task(path)
    for record, row in zip(records, scores):
        context = tasks.split_choice(record['context'], record['choices'][0])[0]
        prompts = [''.join(tasks.split_choice(record['context'], choice)) for choice in record['choices']]
        # as lm-evaluation-harness asks: every prompt echoed with its logprobs, plus one generated token it ignores
        answer = completion(server, prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0)
        assert [c['index'] for c in answer['choices']] == list(range(len(prompts)))
        for choice, expected, prompt in zip(answer['choices'], row['logprobs'], prompts):
            logprobs = choice['logprobs']
            assert choice['text'].startswith(prompt) and len(logprobs['tokens']) == len(prompt) + 1
            assert logprobs['token_logprobs'][0] is None and logprobs['top_logprobs'][0] is None
            assert sum(logprobs['token_logprobs'][len(context):-1]) == pytest.approx(expected, abs=1e-5)
            assert ''.join(logprobs['tokens'][:-1]) == prompt and logprobs['text_offset'][:3] == [0, 1, 2]
            # the generated token is greedy: its log-probability is the top one's
            assert logprobs['token_logprobs'][-1] == max(logprobs['top_logprobs'][-1].values())


def test_logprobs_top_alternatives_echo_and_token_prompts(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answer = completion(server, prompt='Where is my', max_tokens=6, logprobs=5, temperature=0)
    logprobs = answer['choices'][0]['logprobs']
    assert ''.join(logprobs['tokens']) == answer['choices'][0]['text'] and len(logprobs['tokens']) == 6
    assert logprobs['text_offset'] == list(range(len('Where is my'), len('Where is my') + 6))  # after the prompt
    for chosen, top in zip(logprobs['token_logprobs'], logprobs['top_logprobs']):
        values = list(top.values())
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6 and chosen == values[0]  # greedy
    # echo with max_tokens 0: the prompt, nothing generated; a list of token ids is a prompt too
    ids = tokenizer.encode('The quick')
    answer = completion(server, prompt=[ids, 'A stitch'], max_tokens=0, echo=True, logprobs=0)
    assert [c['text'] for c in answer['choices']] == ['The quick', 'A stitch']
    assert answer['usage']['completion_tokens'] == 0 and answer['usage']['prompt_tokens'] == len(ids) + 8
    assert all(t == {} for t in answer['choices'][0]['logprobs']['top_logprobs'][1:])
    # the model's own log-probabilities, from an independent forward pass
    x = torch.tensor([ids])
    logits, _ = model(x[:, :-1], x[:, 1:])
    expected = F.log_softmax(logits[0], dim=-1).gather(-1, x[0, 1:, None])[:, 0].tolist()
    assert answer['choices'][0]['logprobs']['token_logprobs'][1:] == pytest.approx(expected, abs=1e-5)
    # echo without logprobs: the text only
    answer = completion(server, prompt='The quick', max_tokens=3, echo=True, temperature=0)
    assert answer['choices'][0]['text'].startswith('The quick') and answer['choices'][0]['logprobs'] is None


@pytest.mark.parametrize('body,message', [
    (dict(logprobs=6), "'logprobs' must be an integer in 0..5, got 6"),
    (dict(logprobs=-1), "'logprobs' must be an integer in 0..5"),
    (dict(logprobs='2'), "'logprobs' must be an integer in 0..5"),
    (dict(logprobs=True), "'logprobs' must be an integer in 0..5, got true"),
    (dict(echo='yes'), "'echo' must be true or false"),
    (dict(max_tokens=0), "'max_tokens' must be an integer in 1.."),
    (dict(logprobs=1, stream=True), 'logprobs and echo are answered whole here'),
    (dict(logprobs=1, max_tokens=30), "must fit the model's context of 32 tokens"),
    (dict(prompt=[]), "'prompt' must be a string, a list of token ids, or a list of up to 64"),
    (dict(prompt=['a', 5]), "'prompt' must be a string, or a list of token ids"),
])
def test_bad_logprobs_requests_are_400(server, body, message):
    r = requests.post(server.url + '/v1/completions', json={'prompt': 'The quick brown', **body}, timeout=30)
    assert r.status_code == 400 and message in r.json()['error']['message'], r.text


def test_several_prompts_with_n_completions_each_come_in_order(server, ckpt):
    answer = completion(server, prompt=['The quick', 'Where is'], n=2, max_tokens=6, temperature=0)
    texts = [c['text'] for c in sorted(answer['choices'], key=lambda c: c['index'])]
    assert texts == [greedy(ckpt, 'The quick', 6)] * 2 + [greedy(ckpt, 'Where is', 6)] * 2  # prompt p's i-th: p * n + i
    assert answer['usage'] == {'prompt_tokens': 17, 'completion_tokens': 24, 'total_tokens': 41}


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_special_token_names_are_those_tokens_in_tokenize():
    tokenizer = Tokenizer(GPT2_META)
    assert tokenizer.encode_special('a<|endoftext|>b') == tokenizer.encode('a') + [50256] + tokenizer.encode('b')
    assert tokenizer.encode('<|endoftext|>') != [50256]  # a prompt's text stays text


def test_tokenizer_endpoints_for_lm_evaluation_harness(server, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    info = requests.get(server.url + '/tokenizer_info', timeout=10).json()
    assert info['eos_token'] is None and info['vocab_size'] == tokenizer.vocab_size and info['max_model_len'] == 32
    tokens = requests.post(server.url + '/tokenize', json={'prompt': 'Where is my cat?'}, timeout=10).json()['tokens']
    assert tokens == tokenizer.encode('Where is my cat?')
    assert requests.post(server.url + '/detokenize', json={'tokens': tokens}, timeout=10).json() == {'prompt': 'Where is my cat?'}
    r = requests.post(server.url + '/detokenize', json={'tokens': [999]}, timeout=10)
    assert r.status_code == 400 and "'tokens' must be a list of token ids in 0..35" in r.text
