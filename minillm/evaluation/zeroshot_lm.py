"""An lm-eval model that scores the choices of a question on one forward of their shared prefix.

``SharedPrefixLM`` is lm-eval's ``HFLM`` (same tokenization: context + continuation encoded
together and split, same truncation, same log-softmax dtype) with a different
``_loglikelihood_tokens``: the requests of one document (``task_name, doc_id``; or, without
that, the requests with the same context tokens) form a group; the longest common token
prefix of the group's inputs runs once with ``use_cache=True`` and only each request's
remaining tokens run on its KV cache. Questions are sorted by the length of their shared
prefix and cut into batches of at most ``batch_tokens`` input tokens where the padded cost is
least (``split_runs``: a forward's fixed cost against the padding of its right-padded rows);
a batch's prefixes run as one right-padded batch, then its requests' remaining tokens, sorted by
length and cut the same way, each run on the cache rows of its groups with the padding between
prefix and rest masked out. The LM head runs only at positions that score a continuation token
(``logits_to_keep``); a question whose choices share their whole input (e.g. one-token answers)
takes no second forward.

Registered with lm-eval as ``minillm`` (``simple_evaluate(model="minillm", ...)``).
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]

# a forward's fixed cost in token-forwards: ~50 ms against ~1.1 ms per token for SmolLM2 on this
# project's 2-core CPU (reading every weight once); padding a batch costs a token-forward per cell
FORWARD_COST_TOKENS = 48


def common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def shared_len(inputs: list[list[int]]) -> int:
    """Tokens of a question's inputs that run once for all its choices: all of them when the
    inputs are equal (e.g. one-token answers), else their common prefix, leaving every input at
    least one token to run on the prefix's cache."""
    if all(x == inputs[0] for x in inputs):
        return len(inputs[0])
    return min(common_prefix_len(inputs), min(len(x) for x in inputs) - 1)


def split_runs(
    widths: list[int],
    sizes: list[int] | None = None,
    cap: float = float("inf"),
    overhead: int = FORWARD_COST_TOKENS,
) -> list[range]:
    """Cut items sorted by ``widths`` (descending) into contiguous runs, one padded forward
    each, minimizing ``sum(overhead + len(run) * widths[run.start])`` (token-forwards, padding
    included); a run's ``sizes`` sum to at most ``cap`` unless it holds a single item."""
    sizes = widths if sizes is None else sizes
    n = len(widths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        total = 0
        for start in range(end - 1, -1, -1):
            total += sizes[start]
            if total > cap and start < end - 1:
                break
            cost = best[start] + overhead + (end - start) * widths[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], n
    while end > 0:
        runs.append(range(cut[end], end))
        end = cut[end]
    return runs[::-1]


def _cache_rows(cache, rows: torch.Tensor):
    """A KV cache holding batch rows ``rows`` of ``cache``; ``cache`` itself is left as it is
    (its layers are copied shallowly: selecting rows and appending tokens replace tensors)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(rows)
    return out


@register_model("minillm")
class SharedPrefixLM(HFLM):
    """``HFLM`` whose log-likelihoods share each question's context (see module docstring).

    ``batch_tokens``: questions are packed into one forward up to about this many input
    tokens (a forward reads every weight once, which dominates short forwards on a CPU).
    """

    def __init__(self, *args, batch_tokens: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_tokens = int(batch_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # HFLM tokenizes and calls _loglikelihood_tokens in request order; remember which
        # document every request belongs to so its choices can share one context forward
        self._doc_keys = [(r.task_name, r.doc_id) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._doc_keys = None

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs=None
    ) -> list[tuple[float, bool]]:
        keys = getattr(self, "_doc_keys", None)
        if keys is None or len(keys) != len(requests):
            keys = [tuple(ctx) for _, ctx, _ in requests]
        # exactly HFLM's input: (context + continuation), left-truncated to max_length + 1,
        # minus the last token; the continuation is scored on the last len(cont) logits
        inputs = [(c + x)[-(self.max_length + 1) :][:-1] for _, c, x in requests]
        by_key: dict = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        groups = [(shared_len([inputs[i] for i in g]), g) for g in by_key.values()]
        # longest shared prefix first: batches of similar prefixes pad little, and memory
        # errors come early
        groups.sort(key=lambda sg: -sg[0])
        sizes = [s + sum(len(inputs[i]) - s for i in g) for s, g in groups]
        runs = split_runs([s for s, _ in groups], sizes, cap=self.batch_tokens)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for run in runs:
            batch = [groups[k] for k in run]
            members = [i for _, g in batch for i in g]
            scored = self._score_groups(
                [[(inputs[i], requests[i][2]) for i in g] for _, g in batch],
                [s for s, _ in batch],
            )
            for i, answer in zip(members, scored, strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(members))
        bar.close()
        return results

    @torch.no_grad()
    def _score_groups(
        self, groups: list[list[tuple[list[int], list[int]]]], shared: list[int]
    ) -> list[tuple[float, bool]]:
        """(sum log p(continuation), continuation is greedy) of every (input, continuation)
        of ``groups``, group by group; ``shared[g]`` leading input tokens are common to group g.

        The shared prefixes run once, as one right-padded batch ``[G, P]``; the requests'
        remaining tokens run on the prefix cache rows of their group, in runs of similar
        length (each a right-padded batch ``[R, S]``, the padding between prefix and rest
        masked out).
        """
        device = self.device
        rows = [x for g in groups for x, _ in g]
        conts = [c for g in groups for _, c in g]
        owner = [k for k, g in enumerate(groups) for _ in g]
        starts = [shared[k] for k in owner]
        width = max(shared)
        prefix_logits, cache, first = None, None, torch.zeros((len(groups), 1), dtype=torch.long)
        if width > 0:
            # prefix positions that score a continuation token: the last `keep` of each prefix
            lows = [len(x) - len(c) for x, c in zip(rows, conts, strict=True)]
            keep = max(1, *(s - lo for s, lo in zip(starts, lows, strict=True)))
            ids = self._padded([g[0][0][:n] for g, n in zip(groups, shared, strict=True)], width)
            first = torch.tensor(shared)[:, None] - keep  # position of prefix_logits[:, 0]
            positions = (first + torch.arange(keep)).clamp(min=0).to(device)
            needs_cache = any(len(x) > s for x, s in zip(rows, starts, strict=True))
            out = self.model(ids, use_cache=needs_cache, logits_to_keep=positions)
            prefix_logits, cache = out.logits, out.cache
        rest = self._rest_logits(rows, conts, starts, owner, width, cache)
        answers = []
        for r, (x, cont) in enumerate(zip(rows, conts, strict=True)):
            lo, hi, s = len(x) - len(cont), len(x), starts[r]
            parts = []
            if lo < s:
                offset = int(first[owner[r]])
                parts.append(prefix_logits[owner[r], lo - offset : s - offset])
            if hi > s:
                parts.append(rest[r])
            logp = F.log_softmax(torch.cat(parts), dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor(cont, device=device)
            greedy = bool((logp.argmax(dim=-1) == target).all())
            answers.append((float(logp.gather(1, target[:, None]).sum()), greedy))
        return answers

    def _rest_logits(self, rows, conts, starts, owner, width, cache) -> dict[int, torch.Tensor]:
        """Row -> logits ``[n, V]`` of its scored positions after its prefix (the last
        ``n = min(len(cont), len(row) - start)``), for every row with tokens after its prefix;
        rows run in runs of similar remaining length, each one forward on its cache rows."""
        device = self.device
        todo = sorted(
            (r for r, (x, s) in enumerate(zip(rows, starts, strict=True)) if len(x) > s),
            key=lambda r: -(len(rows[r]) - starts[r]),
        )
        out: dict[int, torch.Tensor] = {}
        for run in split_runs([len(rows[r]) - starts[r] for r in todo]):
            batch = [todo[k] for k in run]
            rest = self._padded([rows[r][starts[r] :] for r in batch])
            mask = torch.ones((len(batch), width + rest.shape[1]), dtype=torch.long)
            for k, r in enumerate(batch):
                mask[k, starts[r] : width] = 0
            kwargs = {}
            if self._takes_positions:
                base = torch.tensor([starts[r] for r in batch])[:, None]
                kwargs["position_ids"] = (base + torch.arange(rest.shape[1])).to(device)
            # LM head only at each row's scored positions: the last `n` before its end
            ends = torch.tensor([len(rows[r]) - starts[r] for r in batch])
            scored = [min(len(conts[r]), int(e)) for r, e in zip(batch, ends, strict=True)]
            keep = max(scored)
            positions = (ends[:, None] - keep + torch.arange(keep)).clamp(min=0).to(device)
            rows_cache = None
            if cache is not None:
                rows_cache = _cache_rows(
                    cache, torch.tensor([owner[r] for r in batch], device=device)
                )
            logits = self.model(
                rest,
                attention_mask=mask.to(device),
                cache=rows_cache,
                logits_to_keep=positions,
                **kwargs,
            ).logits
            for k, (r, n) in enumerate(zip(batch, scored, strict=True)):
                out[r] = logits[k, keep - n :]
        return out

    def _padded(self, seqs: list[list[int]], width: int | None = None) -> torch.Tensor:
        """``LongTensor[len(seqs), width]`` of ``seqs`` right-padded with the pad token."""
        width = width or max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id or 0
        out = torch.full((len(seqs), width), pad, dtype=torch.long)
        for row, x in enumerate(seqs):
            out[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        return out.to(self.device)

    @property
    def _takes_positions(self) -> bool:
        return "position_ids" in inspect.signature(self.model.forward).parameters
