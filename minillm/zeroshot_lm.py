"""An lm-eval model that scores the choices of a question on one forward of their shared prefix.

``SharedPrefixLM`` is lm-eval's ``HFLM`` (same tokenization: context + continuation encoded
together and split, same truncation, same log-softmax dtype) with a different
``_loglikelihood_tokens``: the requests of one document (``task_name, doc_id``; or, without
that, the requests with the same context tokens) form a group; the longest common token
prefix of the group's inputs runs once with ``use_cache=True``, its KV cache is repeated for
the group's rows, and only the rows' remaining tokens run on it, as one right-padded batch.
The LM head runs only at positions that score a continuation token (``logits_to_keep``).

Registered with lm-eval as ``minillm`` (``simple_evaluate(model="minillm", ...)``).
"""

from __future__ import annotations

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
    """``HFLM`` whose log-likelihoods share each question's context (see module docstring)."""

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
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for rows in groups.values():
            scored = self._score_group([requests[i] for i in rows])
            for i, answer in zip(rows, scored, strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(rows))
        bar.close()
        return results

    @torch.no_grad()
    def _score_group(self, group: list[Request]) -> list[tuple[float, bool]]:
        """(sum log p(continuation), continuation is greedy) of each request of one group."""
        # exactly HFLM's input: (context + continuation), left-truncated to max_length + 1,
        # minus the last token; the continuation is scored on the last len(cont) logits
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in group]
        conts = [cont for _, _, cont in group]
        shared = min(common_prefix_len(inputs), min(len(x) for x in inputs) - 1)
        first_scored = min(len(x) - len(c) for x, c in zip(inputs, conts, strict=True))
        model, device = self.model, self.device
        prefix_logits, cache = None, None
        if shared > 0:
            keep = max(1, shared - first_scored)  # prefix positions that score a token
            out = model(
                torch.tensor([inputs[0][:shared]], device=device),
                use_cache=True,
                logits_to_keep=keep,
            )
            prefix_logits, cache = out.logits[0], out.past_key_values
            cache.batch_repeat_interleave(len(group))
        width = max(len(x) for x in inputs) - shared
        pad = self.tokenizer.pad_token_id or 0
        rest = torch.full((len(group), width), pad, dtype=torch.long, device=device)
        for row, x in enumerate(inputs):
            rest[row, : len(x) - shared] = torch.tensor(x[shared:], device=device)
        mask = torch.ones((len(group), shared + width), dtype=torch.long, device=device)
        logits = model(rest, attention_mask=mask, cache=cache).logits
        answers = []
        for row, (x, cont) in enumerate(zip(inputs, conts, strict=True)):
            lo, hi = len(x) - len(cont), len(x)  # positions whose logits score cont
            parts = []
            if lo < shared:
                parts.append(prefix_logits[prefix_logits.shape[0] - (shared - lo) :])
            parts.append(logits[row, max(lo, shared) - shared : hi - shared])
            logp = F.log_softmax(torch.cat(parts), dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor(cont, device=device)
            greedy = bool((logp.argmax(dim=-1) == target).all())
            answers.append((float(logp.gather(1, target[:, None]).sum()), greedy))
        return answers
