"""Calibration text: a ``datasets`` name, a local text/JSON/JSONL file, or ``self``
(the model writes its own calibration text: the offline default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minillm.recovery.loss import teacher_topk

HUB_CALIBRATION = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
    "c4": ("allenai/c4", "en", "train", "text"),
    "bookcorpus": ("bookcorpus", None, "train", "text"),
}


def _record_text(row: dict) -> str:
    if "text" in row:
        return str(row["text"])
    parts = [row.get(k, "") for k in ("instruction", "input", "output")]
    return "\n".join(str(p) for p in parts if p)


def read_text(path: str | os.PathLike) -> str:
    """Text of a plain file, or of the ``text`` (or instruction/input/output) fields of a
    ``.json`` list or ``.jsonl`` file. FileNotFoundError names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file '{path}'")
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return "\n\n".join(_record_text(json.loads(x)) for x in lines if x.strip())
    if path.suffix == ".json":
        return "\n\n".join(_record_text(r) for r in json.loads(path.read_text(encoding="utf-8")))
    return path.read_text(encoding="utf-8")


def _hub_text(name: str) -> str:
    import datasets

    path, config, split, field = HUB_CALIBRATION[name]
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=name == "c4")
    except Exception as err:  # offline: no hub, no cache
        raise ValueError(
            f"--calib: cannot fetch '{name}' through datasets ({type(err).__name__}); "
            "pass a local text/JSON/JSONL file or 'self'"
        ) from err
    rows = ds.take(20000) if name == "c4" else ds
    return "\n\n".join(r[field] for r in rows)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    if ids.numel() <= seqlen:
        raise ValueError(
            f"--calib: text has {ids.numel()} tokens, need more than --seqlen {seqlen}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


SELF_TOP_K = 50  # calibration text samples among the model's 50 most likely tokens
SELF_BATCH = 256  # sequences written at once: the fastest per sequence on a 2-core CPU


Targets = tuple[torch.Tensor, torch.Tensor]  # a model's top-k log-probs and token ids


@torch.no_grad()
def self_generated(
    model,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    quiet: bool = True,
    keep_topk: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = SELF_TOP_K,
) -> tuple[torch.Tensor, Targets | None]:
    """``[nsamples, seqlen]`` tokens sampled from the model itself, each sequence started
    from BOS and a random vocabulary token (temperature 1, never EOS), among the ``top_k`` most
    likely tokens or, with ``top_k=None``, from the whole distribution.

    A plain KV-cache loop over ``SELF_BATCH`` sequences at a time that draws one uniform
    variate per row and step (``generate``'s sampling draws an exponential variate for every
    vocabulary entry of every row and step). A progress bar counts sequences unless ``quiet``.
    With ``keep_topk=k``, the second output is the model's ``teacher_topk`` at ``temperature``
    at every position, ``([nsamples, seqlen, k] float32, [nsamples, seqlen, k] int32)``, taken
    from the logits the sampling computes anyway (the last position's is -inf / 0: it predicts
    nothing); else None.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), model.config.vocab_size)
    first = torch.randint(0, vocab, (nsamples, 1), generator=gen)
    bos = tokenizer.bos_token_id
    prompt = first if bos is None else torch.cat([torch.full_like(first, bos), first], 1)
    rows, kept = [], []
    with tqdm(total=nsamples, desc="writing", unit="seq", disable=quiet) as bar:
        for part in prompt.split(SELF_BATCH):
            ids, topk = _sample(
                model, part, seqlen, tokenizer.eos_token_id, gen, keep_topk, temperature, top_k
            )
            rows.append(ids)
            kept.append(topk)
            bar.update(len(part))
    ids = torch.cat(rows)[:, :seqlen]
    if keep_topk is None:
        return ids, None
    return ids, tuple(torch.cat(t)[:, :seqlen] for t in zip(*kept, strict=True))


def _sample(
    model,
    ids: torch.Tensor,
    seqlen: int,
    eos: int | None,
    gen: torch.Generator,
    keep_topk: int | None,
    temperature: float,
    top_k: int | None,
) -> tuple[torch.Tensor, Targets | None]:
    """``ids [B, P]`` continued to ``[B, max(P, seqlen)]`` by ``_draw``, and the kept
    top-k of every position (see ``self_generated``)."""

    kept: list[list[torch.Tensor]] = []

    def keep(logits: torch.Tensor) -> None:
        if keep_topk:
            kept.append([t.cpu() for t in teacher_topk(logits, keep_topk, temperature)])

    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), use_cache=True, logits_to_keep=0 if keep_topk else 1)
    keep(out.logits)
    while ids.shape[1] < seqlen:
        logits = out.logits[:, -1].float()
        if eos is not None:
            logits[:, eos] = -torch.inf
        token = _draw(logits, top_k, gen)
        ids = torch.cat([ids, token], 1)
        if ids.shape[1] < seqlen:  # the last token predicts nothing: no forward for it
            out = model(input_ids=token.to(device), cache=out.cache, logits_to_keep=1)
            keep(out.logits)
    if not keep_topk:
        return ids, None
    logp, top_ids = (torch.cat(t, dim=1) for t in zip(*kept, strict=True))
    missing = (0, 0, 0, ids.shape[1] - logp.shape[1])
    return ids, (F.pad(logp, missing, value=-torch.inf), F.pad(top_ids, missing))


def _draw(logits: torch.Tensor, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits [B, V]``, ``[B, 1]`` on the CPU: among the ``top_k`` most
    likely, or from the whole softmax by inverting its CDF at one uniform variate per row."""
    if top_k:
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=gen)
        return top.indices.cpu().gather(-1, pick)
    cdf = logits.softmax(-1).cpu().cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)


def calibration_batches(
    source: str, tokenizer, nsamples: int, seqlen: int, seed: int, model=None
) -> torch.Tensor:
    """Calibration token ids ``LongTensor[nsamples, seqlen]`` from ``source`` (see module)."""
    if source == "self":
        return self_generated(model, tokenizer, nsamples, seqlen, seed)[0]
    if source in HUB_CALIBRATION:
        text = _hub_text(source)
    elif Path(source).is_file():
        text = read_text(source)
    else:
        valid = ", ".join(["self", *HUB_CALIBRATION])
        raise ValueError(f"--calib: '{source}' is neither a file nor one of: {valid}")
    ids = tokenizer(text, return_tensors="pt").input_ids.reshape(-1)
    return random_windows(ids, nsamples, seqlen, seed)
