"""An lm-eval model that scores the choices of a question on one forward of their shared prefix.

``SharedPrefixLM`` is lm-eval's ``HFLM`` (same tokenization: context + continuation encoded
together and split, same truncation, same log-softmax dtype) with a different
``_loglikelihood_tokens``: the requests of one document (``task_name, doc_id``; or, without
that, the requests with the same context tokens) form a group; the longest common token
prefix of the group's inputs runs once with ``use_cache=True`` and only each request's
remaining tokens run on its KV cache. Groups are packed, longest first, up to ``batch_tokens``
input tokens per batch: their prefixes run as one right-padded batch, then every request's
remaining tokens as one right-padded batch on the cache rows of its group, the padding between
prefix and rest masked out. So a batch of questions costs two forwards, whatever the number of
choices (on a CPU a short forward costs mostly the reading of every weight). The LM head runs
only at positions that score a continuation token (``logits_to_keep``); a batch whose groups
share their whole input (e.g. one-token answers) takes a single forward.

Registered with lm-eval as ``minillm`` (``simple_evaluate(model="minillm", ...)``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]


def common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


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
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        # longest first, so that a batch of groups pads little and memory errors come early
        order = sorted(groups.values(), key=lambda g: -max(len(requests[i][1]) for i in g))
        batches, tokens = [], self.batch_tokens
        for g in order:
            size = sum(len(requests[i][1]) + len(requests[i][2]) for i in g)
            if tokens + size > self.batch_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(g)
            tokens += size
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for batch in batches:
            scored = self._score_groups([[requests[i] for i in g] for g in batch])
            for i, answer in zip([i for g in batch for i in g], scored, strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(sum(len(g) for g in batch))
        bar.close()
        return results

    @torch.no_grad()
    def _score_groups(self, groups: list[list[Request]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation), continuation is greedy) of every request, group by group.

        Each group's shared prefix runs once (right-padded batch ``[G, P]``); its cache rows
        are repeated for the group's requests, whose remaining tokens run as one right-padded
        batch ``[R, S]`` with the padding between prefix and rest masked out.
        """
        device = self.device
        # exactly HFLM's input: (context + continuation), left-truncated to max_length + 1,
        # minus the last token; the continuation is scored on the last len(cont) logits
        inputs = [[(c + x)[-(self.max_length + 1) :][:-1] for _, c, x in g] for g in groups]
        conts = [x for g in groups for _, _, x in g]
        # when every group's inputs are one sequence (e.g. one-token answers), one forward
        # scores them all; otherwise each row keeps at least one token to run on the cache
        whole = all(all(x == g[0] for x in g) for g in inputs)
        shared = [
            len(g[0]) if whole else min(common_prefix_len(g), min(len(x) for x in g) - 1)
            for g in inputs
        ]
        rows = [x for g in inputs for x in g]
        owner = [k for k, g in enumerate(inputs) for _ in g]
        width = max(shared)
        prefix_logits, cache, first = None, None, 0
        if width > 0:
            # prefix positions that score a continuation token: the last `keep` of each prefix
            lows = [len(x) - len(c) for x, c in zip(rows, conts, strict=True)]
            keep = max(1, *(shared[owner[r]] - lo for r, lo in enumerate(lows)))
            ids = self._padded([g[0][:n] for g, n in zip(inputs, shared, strict=True)], width)
            ends = torch.tensor(shared, device=device)[:, None]
            first = ends - keep  # [G, 1]: position of prefix_logits[:, 0]
            positions = (first + torch.arange(keep, device=device)).clamp(min=0)
            out = self.model(ids, use_cache=not whole, logits_to_keep=positions)
            prefix_logits, cache = out.logits, out.past_key_values
        starts = [shared[owner[r]] for r in range(len(rows))]
        scored = [
            (max(len(x) - len(c), s), len(x)) for x, c, s in zip(rows, conts, starts, strict=True)
        ]
        rest = (
            [None] * len(rows)
            if whole
            else self._rest_logits(rows, starts, owner, width, cache, scored)
        )
        answers = []
        for r, (x, cont) in enumerate(zip(rows, conts, strict=True)):
            lo, hi, s = len(x) - len(cont), len(x), starts[r]
            parts = []
            if lo < s:
                g = owner[r]
                offset = int(first[g]) if torch.is_tensor(first) else 0
                parts.append(prefix_logits[g, lo - offset : s - offset])
            if hi > s:
                parts.append(rest[r])
            logp = F.log_softmax(torch.cat(parts), dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor(cont, device=device)
            greedy = bool((logp.argmax(dim=-1) == target).all())
            answers.append((float(logp.gather(1, target[:, None]).sum()), greedy))
        return answers

    def _rest_logits(self, rows, starts, owner, width, cache, scored) -> list[torch.Tensor]:
        """Per row, the logits ``[b - a, V]`` of its scored positions ``scored[r] = (a, b)``
        after its prefix, from one right-padded forward of every row's rest on the cache."""
        device = self.device
        if cache is not None:
            cache.batch_select_indices(torch.tensor(owner, device=device))
        rest = self._padded([x[s:] for x, s in zip(rows, starts, strict=True)])
        mask = torch.ones((len(rows), width + rest.shape[1]), dtype=torch.long, device=device)
        for r, s in enumerate(starts):
            mask[r, s:width] = 0
        kwargs = {}
        if self._takes_positions:
            base = torch.tensor(starts, device=device)[:, None]
            kwargs["position_ids"] = base + torch.arange(rest.shape[1], device=device)
        # LM head only at each row's scored positions: the last `keep` before its end
        ends = torch.tensor([b - s for (_, b), s in zip(scored, starts, strict=True)])
        keep = max(b - a for a, b in scored)
        positions = (ends[:, None] - keep + torch.arange(keep)).clamp(min=0).to(device)
        logits = self.model(
            rest, attention_mask=mask, cache=cache, logits_to_keep=positions, **kwargs
        ).logits
        return [logits[r, keep - (b - a) :] for r, (a, b) in enumerate(scored)]

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
