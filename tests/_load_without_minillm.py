"""Run by test_remote_code.py in a subprocess: load pruned outputs with stock transformers
(and lm-eval) while ``import minillm`` is impossible.

argv[1]: a JSON file ``{"dirs": {case: dir}, "ids": [[int]], "new_tokens": n, "lm_eval": case}``;
argv[2]: the safetensors file written with ``<case>.logits`` ``[batch, seq, vocab]``,
``<case>.greedy`` ``[batch, seq + n]`` and ``lm_eval.loglikelihood`` ``[1]``.
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class BlockMinillm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "minillm" or name.startswith("minillm."):
            raise ImportError(f"{name} is hidden from this process")


def main(spec_file: str, out_file: str) -> None:
    sys.meta_path.insert(0, BlockMinillm())
    try:
        import minillm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("minillm is importable: the check would prove nothing")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    spec = json.loads(open(spec_file).read())
    ids = torch.tensor(spec["ids"])
    out = {}
    for case, path in spec["dirs"].items():
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out[f"{case}.logits"] = model(ids).logits
            out[f"{case}.greedy"] = model.generate(
                ids, do_sample=False, max_new_tokens=spec["new_tokens"], pad_token_id=0
            )
    if spec.get("lm_eval"):
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=spec["dirs"][spec["lm_eval"]], trust_remote_code=True, device="cpu")
        request = Instance("loglikelihood", doc={}, arguments=tuple(spec["request"]), idx=0)
        loglikelihood, _ = lm.loglikelihood([request], disable_tqdm=True)[0]
        out["lm_eval.loglikelihood"] = torch.tensor([loglikelihood], dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
