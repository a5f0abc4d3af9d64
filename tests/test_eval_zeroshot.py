"""lm-eval integration: accuracy on local toy data equals an independent log-likelihood argmax."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_lm import byte_tokenizer, tiny_model

from minillm.zeroshot import TASKS, check_tasks, zero_shot

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
    assert lm_eval_results[task] == reference_accuracy(model, tokenizer, task)


def test_unknown_task_error_lists_valid_tasks():
    with pytest.raises(ValueError, match="unknown task.*lambada.*valid: boolq, piqa"):
        check_tasks(["piqa", "lambada"])


def test_missing_local_task_file_is_named(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(FileNotFoundError, match="no data for task piqa; expected piqa.jsonl"):
        zero_shot(model, tokenizer, ["piqa"], task_data_dir=tmp_path)
