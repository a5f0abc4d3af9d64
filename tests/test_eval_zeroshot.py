"""lm-eval integration: accuracy on local toy data equals an independent log-likelihood argmax."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_lm import byte_tokenizer, tiny_model
from conftest import random_text, tiny_tokenizer
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from minillm.evaluation.zeroshot import (
    TASKS,
    check_task_file,
    check_tasks,
    make_lm,
    run_tasks,
    zero_shot,
)
from minillm.evaluation.zeroshot_lm import SharedPrefixLM, split_runs

TASK_DATA = Path(__file__).parent / "data" / "zeroshot"


def prompts(task: str, doc: dict) -> tuple[list[str], list[str], int]:
    """(contexts, continuations, gold) of one example, written from the task definitions."""

    def choices_of(doc):
        return doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])

    if task == "boolq":
        ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [ctx, ctx], ["no", "yes"], doc["label"]
    if task == "piqa":
        ctx = f"Question: {doc['goal']}\nAnswer:"
        return [ctx, ctx], [doc["sol1"], doc["sol2"]], doc["label"]
    if task == "hellaswag":
        ctx = f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}"
        return [ctx] * 4, doc["endings"], int(doc["label"])
    if task == "winogrande":
        cut = doc["sentence"].index("_")
        contexts = [doc["sentence"][:cut] + doc[f"option{i}"] for i in (1, 2)]
        rest = doc["sentence"][cut + 1 :].strip()
        return contexts, [rest, rest], int(doc["answer"]) - 1
    if task in ("arc_easy", "arc_challenge"):
        texts, gold = choices_of(doc)
        return [f"Question: {doc['question']}\nAnswer:"] * len(texts), texts, gold
    if task == "openbookqa":
        texts, gold = choices_of(doc)
        return [doc["question_stem"]] * len(texts), texts, gold
    raise ValueError(task)


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), continuation prefixed by one space."""
    ctx_ids = tokenizer(context).input_ids
    all_ids = tokenizer(context + " " + continuation).input_ids
    logits = model(torch.tensor([all_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[pos - 1, all_ids[pos]].item() for pos in range(len(ctx_ids), len(all_ids)))


def reference_accuracy(model, tokenizer, task: str) -> dict[str, float]:
    rows = [json.loads(line) for line in (TASK_DATA / f"{task}.jsonl").read_text().splitlines()]
    hits, hits_norm = 0, 0
    for doc in rows:
        contexts, conts, gold = prompts(task, doc)
        scores = [
            loglikelihood(model, tokenizer, c, x) for c, x in zip(contexts, conts, strict=True)
        ]
        hits += max(range(len(scores)), key=scores.__getitem__) == gold
        normed = [s / len(x) for s, x in zip(scores, conts, strict=True)]
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == gold
    out = {"acc": hits / len(rows)}
    if task not in ("boolq", "winogrande"):
        out["acc_norm"] = hits_norm / len(rows)
    return out


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama", seed=3), byte_tokenizer()


@pytest.fixture(scope="module")
def lm_eval_results(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return zero_shot(model, tokenizer, list(TASKS), task_data_dir=TASK_DATA, batch_size=4)


@pytest.mark.parametrize("task", list(TASKS))
def test_lm_eval_accuracy_equals_independent_loglikelihood_argmax(
    task, model_and_tokenizer, lm_eval_results
):
    model, tokenizer = model_and_tokenizer
    expected = reference_accuracy(model, tokenizer, task)
    assert {m: lm_eval_results[task][m] for m in expected} == expected
    assert lm_eval_results[task]["n"] == 2


@pytest.fixture(scope="module")
def per_request(model_and_tokenizer):
    """lm-eval's logged (log-likelihood, is_greedy) of every request: HFLM and the fast class."""
    model, tokenizer = model_and_tokenizer
    out = {}
    for name in ("hf", "minillm"):
        lm = make_lm(model, tokenizer, name, batch_size=3)
        samples = run_tasks(lm, list(TASKS), TASK_DATA, log_samples=True)["samples"]
        out[name] = {
            task: [(s["doc_id"], s["resps"]) for s in rows] for task, rows in samples.items()
        }
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_shared_prefix_requests_equal_hflm_on_every_task_format(task, per_request):
    ref, got = per_request["hf"][task], per_request["minillm"][task]
    assert [d for d, _ in got] == [d for d, _ in ref] and len(ref) == 2
    for (_, ref_resps), (_, got_resps) in zip(ref, got, strict=True):
        assert len(got_resps) == len(ref_resps) >= 2
        for [(ll_ref, greedy_ref)], [(ll, greedy)] in zip(ref_resps, got_resps, strict=True):
            assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
            assert greedy == greedy_ref


def _requests(model, tokenizer) -> list[Instance]:
    """Documents of 1-4 choices over the word vocabulary: shared and unshared prefixes, an
    empty context, one-token answers, a continuation longer than the context, a greedy
    continuation, and inputs longer than max_length (left-truncated)."""
    docs = []
    for doc in range(6):
        ctx = random_text(3 + 5 * doc, seed=doc)
        conts = [" " + random_text(1 + (doc + k) % 4, seed=100 + 10 * doc + k) for k in range(4)]
        docs.append([(ctx, c) for c in conts[: 1 + doc % 4]])
    docs.append([("", " " + random_text(3, seed=7)), ("", " " + random_text(2, seed=8))])
    ctx = random_text(6, seed=9)
    docs.append([(ctx + " w1", " w2 w3"), (ctx + " w2", " w2 w3")])  # winogrande-like
    docs.append([(ctx, " w7"), (ctx, " w8")])  # boolq-like: one-token answers
    ids = torch.tensor([tokenizer(ctx).input_ids])
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(
                model(
                    torch.cat([ids, torch.tensor([greedy], dtype=torch.long)], 1) if greedy else ids
                )
                .logits[0, -1]
                .argmax()
                .item()
            )
    docs.append([(ctx, " " + tokenizer.decode(greedy)), (ctx, " w4 w5 w6")])
    return [
        Instance("loglikelihood", {}, args, k, metadata=("toy", doc_id, 1))
        for doc_id, doc in enumerate(docs)
        for k, args in enumerate(doc)
    ]


@pytest.mark.parametrize("batch_tokens", [1, 40, 4096])  # one question per batch .. all
def test_shared_prefix_loglikelihoods_equal_hflm_on_tiny_models(tiny_model, family, batch_tokens):
    tokenizer = tiny_tokenizer()
    requests = _requests(tiny_model, tokenizer)
    kwargs = dict(pretrained=tiny_model, tokenizer=tokenizer, max_length=24)
    ref = HFLM(**kwargs, batch_size=3).loglikelihood(requests, disable_tqdm=True)
    lm = SharedPrefixLM(**kwargs, batch_size=1, batch_tokens=batch_tokens)
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert any(greedy for _, greedy in ref)  # the greedy continuation is recognised
    for (ll_ref, greedy_ref), (ll, greedy) in zip(ref, got, strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
        assert greedy == greedy_ref


def _all_splits(n: int):
    """Every way to cut ``range(n)`` into contiguous runs."""
    if n == 0:
        yield []
        return
    for first in range(1, n + 1):
        for rest in _all_splits(n - first):
            yield [range(0, first)] + [range(r.start + first, r.stop + first) for r in rest]


@pytest.mark.parametrize("seed", range(6))
def test_split_runs_is_the_cheapest_split_within_the_cap(seed):
    gen = torch.Generator().manual_seed(seed)
    widths = sorted(torch.randint(1, 60, (7,), generator=gen).tolist(), reverse=True)
    sizes = [w + int(torch.randint(0, 30, (1,), generator=gen)) for w in widths]
    cap, overhead = 150, 20

    def cost(runs):
        return sum(overhead + len(r) * widths[r.start] for r in runs)

    def fits(runs):
        return all(len(r) == 1 or sum(sizes[i] for i in r) <= cap for r in runs)

    got = split_runs(widths, sizes, cap=cap, overhead=overhead)
    assert [i for r in got for i in r] == list(range(7)) and fits(got)
    assert cost(got) == min(cost(runs) for runs in _all_splits(7) if fits(runs))


def test_unknown_task_error_lists_valid_tasks():
    with pytest.raises(ValueError, match="unknown task.*lambada.*valid: boolq, piqa"):
        check_tasks(["piqa", "lambada"])


def test_missing_local_task_file_is_named(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(FileNotFoundError, match="no data for task piqa; expected piqa.jsonl"):
        zero_shot(model, tokenizer, ["piqa"], task_data_dir=tmp_path)


@pytest.mark.parametrize(
    ("task", "row", "message"),
    [
        ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "missing field 'sol2'"),
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "field 'label' is 2, not"),
        ("winogrande", {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "3"},
         "field 'answer' is '3'"),
        ("arc_easy", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                      "answerKey": "E"}, "field 'answerKey' is 'E', not one of its 2 choices"),
        ("hellaswag", {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "label": "0"},
         "missing field 'endings'"),
    ],
)  # fmt: skip
def test_bad_task_rows_are_one_line_errors_naming_file_and_field(tmp_path, task, row, message):
    good = json.loads((TASK_DATA / f"{task}.jsonl").read_text().splitlines()[0])
    path = tmp_path / f"{task}.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"^--task-data-dir: {path}: row 2: {message}") as err:
        check_task_file(task, path)
    assert "\n" not in str(err.value)
