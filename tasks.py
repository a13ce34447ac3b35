"""
Tasks: what a model can do, beyond how well it predicts text. A task is a .jsonl file, one record per line,
scored by eval.py (--task=FILE) and, during training, by train.py (eval_tasks).

Multiple choice: {"context": ..., "choices": [...], "answer": index}, or HellaSwag's own {"ctx": ...,
"endings": [...], "label": index}. Each choice is scored as lm-evaluation-harness scores it: the sum of the
log-probabilities of its tokens after the context's, the choice tokenized with a space before it
(" Paris" after "The capital of France is"; whitespace that ends the context goes before that space). acc: the best sum picks the right choice; acc_norm: the best
sum per UTF-8 byte of the choice does (longer choices are not penalised for their length). Both come with
their standard errors. The text is scored as the file has it: lm-evaluation-harness's hellaswag task also
rewrites HellaSwag's (its activity label first, [title] markers removed), so its figures differ a little.

Generation: {"prompt": ..., "answer": ...} or, for a chat model, {"messages": [...], "answer": ...}; answer
may be a list of right answers, and "stop" a string or list of stop strings (default for a prompt: a new
line). The model answers greedily, up to max_new_tokens; a chat model through its chat template, a prompt
becoming the user's message. Metrics: exact match (after stripping whitespace), SQuAD's token F1, BLEU
(sacrebleu, 0-100) and ROUGE-L (rouge-score), each against the best of the right answers, and the stop
rate: the answers that ended (end token or stop string) within max_new_tokens.
"""

import importlib.util
import json
import math
import re
import string
from collections import Counter
from contextlib import nullcontext

import torch
from torch.nn import functional as F

from common import die
from decode import KVCache


def read_task(path):
    """A task file -> (path, 'choice' or 'generate', records). Records are normalised to
    {'context', 'choices', 'answer'} or {'prompt', 'messages', 'answers', 'stop'}. A bad file is a one-line
    error naming the file and line."""
    kinds, records = set(), []
    try:
        with open(path, encoding='utf-8') as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read task file {path} ({e}): pass a .jsonl file, one JSON record per line")
    if not lines:
        die(f"task file {path} has no records")
    for n, line in lines:
        where = f"{path}, line {n}"
        try:
            record = json.loads(line)
        except ValueError as e:
            die(f"{where}: not valid JSON ({e})")
        if not isinstance(record, dict):
            die(f"{where}: a record must be a JSON object")
        if {'ctx', 'endings', 'label'} <= record.keys():  # HellaSwag's own fields
            kind, record = 'choice', multiple_choice_record(record['ctx'], record['endings'], record['label'], where)
        elif {'context', 'choices', 'answer'} <= record.keys():
            kind, record = 'choice', multiple_choice_record(record['context'], record['choices'], record['answer'], where)
        elif ('prompt' in record or 'messages' in record) and 'answer' in record:
            kind, record = 'generate', generation_record(record, where)
        else:
            die(f"{where}: unknown format: a record needs context, choices and answer (or HellaSwag's ctx, endings "
                f"and label) for multiple choice, or prompt (or messages) and answer for generation; it has "
                f"{', '.join(sorted(record)) or 'no fields'}")
        kinds.add(kind)
        if len(kinds) > 1:
            die(f"{where}: a {kind} record in a file of {'generation' if kind == 'choice' else 'multiple-choice'} "
                "records: one kind of task per file")
        records.append(record)
    if 'generate' in kinds and not (importlib.util.find_spec('sacrebleu') and importlib.util.find_spec('rouge_score')):
        die(f"{path} is a generation task, scored with sacrebleu and rouge-score: pip install sacrebleu rouge-score")
    return path, kinds.pop(), records


def multiple_choice_record(context, choices, answer, where):
    if not isinstance(context, str):
        die(f"{where}: the context must be a string")
    if not isinstance(choices, list) or not choices:
        die(f"{where}: the choices must be a non-empty list of strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        die(f"{where}: every choice must be a non-empty string")
    if isinstance(answer, str) and answer.strip().isdigit():  # HellaSwag's label is a string on the Hub
        answer = int(answer)
    if type(answer) is not int or not 0 <= answer < len(choices):
        die(f"{where}: the answer (label) must be the index of the right choice, 0..{len(choices) - 1}, got "
            f"{json.dumps(answer)}")
    return {'context': context, 'choices': choices, 'answer': answer}


def generation_record(record, where):
    answers = record['answer'] if isinstance(record['answer'], list) else [record['answer']]
    if not answers or not all(isinstance(a, str) for a in answers):
        die(f"{where}: the answer must be a string or a non-empty list of strings")
    prompt, messages = record.get('prompt'), record.get('messages')
    if not (isinstance(prompt, str) and prompt) and not (isinstance(messages, list) and messages):
        die(f"{where}: the prompt must be a non-empty string, or messages a non-empty list")
    stop = record.get('stop')
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        die(f"{where}: stop must be a string or a list of non-empty strings")
    return {'prompt': prompt if messages is None else None, 'messages': messages, 'answers': answers, 'stop': stop}


def split_choice(context, choice):
    """(context, continuation): the texts whose tokens are read and scored for a choice, as lm-evaluation-harness
    makes them: the choice after a space (its target delimiter), and the whitespace that ends the context moved
    to the continuation, where BPE tokenizers put it (" Paris", not " " + "Paris")."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + ' ' + choice


@torch.no_grad()
def token_logprobs(model, rows, vocab_size, device='cpu', cache=None):
    """Each row of ids (a list) predicting its own next tokens, in one batch padded at the end -> (log-probabilities
    over the tokenizer's vocab_size ids as sampling draws them (B, T, vocab_size), the predicted ids (B, T): -1 past a
    row's end). With a cache, the rows continue the sequence it holds. eval.py's scores and the server's logprobs."""
    x = torch.zeros(len(rows), max(max(map(len, rows)) - 1, 1), dtype=torch.long)
    y = torch.full_like(x, -1)
    for r, ids in enumerate(rows):
        x[r, :len(ids) - 1], y[r, :len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    x, y = x.to(device), y.to(device)
    logits, _ = model(x, y, cache=cache)  # (B, T, vocab): with targets, every position's logits
    return F.log_softmax(logits[..., :vocab_size].float(), dim=-1), y


@torch.no_grad()
def score_choices(model, context, choices, vocab_size, device='cpu', ctx=nullcontext()):
    """Sum of the log-probabilities of each choice's tokens after the context's (lists of ids) -> list.

    The context runs once, into a KV cache that its choices then share, all in one batch. It is cut from the
    left so that it and the longest choice fit the model's context (the choice's last token is predicted, not
    read; multiple_choice scores a record that needs the cut one choice at a time, so that each keeps all the
    context that fits with it)."""
    longest = max(len(c) for c in choices)
    context = context[max(0, len(context) - (model.config.block_size + 1 - longest)):]  # (caller: longest <= block_size)
    cache = KVCache(model.config.n_layer, len(context) + longest - 1)
    with ctx:
        logits, _ = model(torch.tensor([context], device=device), cache=cache)  # (1, 1, vocab): the first choice token's
        scores = F.log_softmax(logits[0, -1, :vocab_size].float(), dim=-1)[[c[0] for c in choices]]  # (n,)
        if longest > 1:  # the choices' other tokens, one row each
            cache.repeat(len(choices))
            logprobs, y = token_logprobs(model, choices, vocab_size, device, cache)
            scores = scores + (logprobs.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y >= 0)).sum(dim=1)
    return scores.tolist()


def mean_and_stderr(values):
    """The mean and its standard error (sample standard deviation / sqrt(n)), as lm-evaluation-harness."""
    n, mean = len(values), sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None  # None: one record


def encode(tokenizer, text, where):
    try:
        return tokenizer.encode(text)
    except SystemExit as e:  # a character outside a char vocabulary
        die(f"{where}: {str(e).removeprefix('error: ')}")


def multiple_choice(model, tokenizer, path, records, device='cpu', ctx=nullcontext()):
    """Score each record's choices -> (results: acc, acc_norm and their standard errors, one dict per record)."""
    rows = []
    for index, record in enumerate(records):
        where = f"{path}, record {index + 1}"
        pairs = [split_choice(record['context'], c) for c in record['choices']]
        context = encode(tokenizer, pairs[0][0], where)
        if not context:  # the first choice token is predicted from the start of a text
            if tokenizer.eot is None:
                die(f"{where}: an empty context needs a tokenizer with an end-of-text token to start from")
            context = [tokenizer.eot]
        choices = [encode(tokenizer, continuation, where) for _, continuation in pairs]
        if max(map(len, choices)) > model.config.block_size:
            die(f"{where}: a choice of {max(map(len, choices))} tokens is longer than the model's context "
                f"({model.config.block_size})")
        if len(context) + max(map(len, choices)) <= model.config.block_size + 1:
            logprobs = score_choices(model, context, choices, tokenizer.vocab_size, device, ctx)
        else:  # too long to share: each choice keeps as much context as fits with it, as lm-evaluation-harness
            logprobs = [score_choices(model, context, [c], tokenizer.vocab_size, device, ctx)[0] for c in choices]
        sizes = [len(c.encode('utf-8')) for c in record['choices']]
        pred = max(range(len(choices)), key=lambda i: logprobs[i])
        pred_norm = max(range(len(choices)), key=lambda i: logprobs[i] / sizes[i])
        rows.append({'index': index, 'answer': record['answer'], 'pred': pred, 'pred_norm': pred_norm,
                     'acc': int(pred == record['answer']), 'acc_norm': int(pred_norm == record['answer']),
                     'logprobs': logprobs, 'bytes': sizes})
    results = {'records': len(rows)}
    for metric in ('acc', 'acc_norm'):
        results[metric], results[f'{metric}_stderr'] = mean_and_stderr([row[metric] for row in rows])
    return results, rows


@torch.no_grad()
def generate_answer(model, tokenizer, record, max_new_tokens, device='cpu', ctx=nullcontext()):
    """The model's greedy answer to a generation record -> (text, whether it ended within max_new_tokens)."""
    if record['messages'] is not None or tokenizer.chat:  # a chat model answers through its template
        messages = record['messages'] or [{'role': 'user', 'content': record['prompt']}]
        ids, _ = tokenizer.fit_prompt(messages, model.config.block_size, max_new_tokens)
        ends, stops = tokenizer.reply_ends, record['stop'] or []  # (the end token ends a reply)
    else:
        ids = tokenizer.encode(record['prompt'])
        ends, stops = {tokenizer.eot} - {None}, ['\n'] if record['stop'] is None else record['stop']
    out, text = [], ''
    with ctx:
        for token in model.generate_stream(torch.tensor([ids], device=device), max_new_tokens, temperature=0,
                                           vocab_size=tokenizer.vocab_size):
            if token.item() in ends:
                return text, True
            out.append(token.item())
            text = tokenizer.decode(out)
            found = [i for i in (text.find(s) for s in stops) if i >= 0]
            if found:
                return text[:min(found)], True
    return text, False


def normalize(text):
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = ''.join(ch for ch in text.lower() if ch not in string.punctuation)
    return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', text).split())


def token_f1(prediction, truth):
    """SQuAD's F1 over the words two normalised answers share (as multisets)."""
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(outputs, answers, stopped):
    """Each output against the best of its answers -> (the means: exact match, token F1, ROUGE-L, and the corpus
    BLEU and stop rate; each record's exact match and F1)."""
    import sacrebleu  # imported here: only generation tasks need them (read_task checks they are installed)
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(['rougeL'])
    rows = [{'exact_match': int(any(o.strip() == a.strip() for a in answer)), 'f1': max(token_f1(o, a) for a in answer),
             'rougeL': scorer.score_multi(answer, o)['rougeL'].fmeasure} for o, answer in zip(outputs, answers)]
    n = len(outputs)
    results = {'records': n, **{k: sum(row[k] for row in rows) / n for k in ('exact_match', 'f1', 'rougeL')}}
    streams = [[answer[k] if k < len(answer) else None for answer in answers] for k in range(max(map(len, answers)))]
    results['bleu'] = sacrebleu.corpus_bleu(outputs, streams).score  # sacrebleu takes None for a missing reference
    results['stop_rate'] = sum(stopped) / n
    return results, rows


def generation(model, tokenizer, path, records, max_new_tokens, device='cpu', ctx=nullcontext()):
    """Answer each record -> (results: generation_metrics, one dict per record)."""
    if not tokenizer.chat and any(r['messages'] is not None for r in records):
        die(f"{path} has records with messages, which need a chat model (one fine-tuned on conversations): "
            "give a base model prompts instead")
    rows = []
    for index, record in enumerate(records):
        try:
            text, ended = generate_answer(model, tokenizer, record, max_new_tokens, device, ctx)
        except (ValueError, SystemExit) as e:  # messages that break the template, or do not fit, or a bad character
            die(f"{path}, record {index + 1}: {str(e).removeprefix('error: ')}")
        rows.append({'index': index, 'output': text, 'answers': record['answers'], 'stopped': ended})
    results, scores = generation_metrics([r['output'] for r in rows], [r['answers'] for r in rows],
                                         [r['stopped'] for r in rows])
    return results, [{**row, **score} for row, score in zip(rows, scores)]


def run_task(model, tokenizer, task, limit=0, max_new_tokens=256, device='cpu', ctx=nullcontext()):
    """Evaluate a task (read_task's) on its first `limit` records (0: all) -> (results, per-record rows, a line).
    results['metric'] names the headline figure: acc_norm, or exact_match."""
    path, kind, records = task
    records = records[:limit or len(records)]
    training = model.training
    model.eval()
    if kind == 'choice':
        results, rows = multiple_choice(model, tokenizer, path, records, device, ctx)
        results['metric'] = 'acc_norm'
        line = f"{path}: {len(rows):,} records" + ''.join(
            f" | {m} {results[m]:.4f} ± " + ('n/a' if results[f'{m}_stderr'] is None else f"{results[f'{m}_stderr']:.4f}")
            for m in ('acc', 'acc_norm'))
    else:
        results, rows = generation(model, tokenizer, path, records, max_new_tokens, device, ctx)
        results['metric'] = 'exact_match'
        line = (f"{path}: {len(rows):,} records | exact match {results['exact_match']:.4f} | F1 {results['f1']:.4f} | "
                f"BLEU {results['bleu']:.2f} | ROUGE-L {results['rougeL']:.4f} | stop rate {results['stop_rate']:.1%}")
    model.train(training)
    return results, rows, line
