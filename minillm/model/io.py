"""Saving and reloading pruned models: safetensors only, written atomically.

A uniformly pruned model whose sizes plain transformers can express gets a plain config
(loadable by ``AutoModelForCausalLM.from_pretrained``) plus a ``minillm`` entry with the
per-layer records. Any other pruned model gets the dense config with ``"model_type":
"minillm_pruned"`` and ``minillm.base_model_type``, one record per layer (kept ``heads``,
``kv_heads``, ``channels`` and the original ``head_ids`` of surviving heads) and the linears
with added ``biases``; ``modeling_minillm.py`` is copied beside it and named in ``auto_map``,
so stock ``from_pretrained(DIR, trust_remote_code=True)`` loads it without minillm, and
``load_pruned`` rebuilds it with minillm's own surgery.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from minillm.model import modeling_minillm
from minillm.model.adapters import adapter_for
from minillm.model.dtypes import parse_dtype
from minillm.model.shards import DEFAULT_SHARD_BYTES, check_shards, load_sharded, save_sharded
from minillm.model.surgery import layer_records, resize_to_records

PRUNED_MODEL_TYPE = modeling_minillm.MODEL_TYPE
MODELING_FILE = Path(modeling_minillm.__file__).name


class OutputError(ValueError):
    """The output directory cannot be written (names ``--out``, not a temporary path)."""


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """FileExistsError unless ``path`` is absent, empty, or ``overwrite`` is set; OutputError
    if it cannot be created (its nearest existing ancestor is not a writable directory)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out: '{path}' exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out: '{path}' exists and is not empty; pass --overwrite or choose another path"
        )
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out: cannot create '{path}': '{parent}' is not a writable directory")


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds.

    An OSError while creating or filling it (no permission, disk full) removes it and is raised
    as :class:`OutputError` naming ``--out``.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise OutputError(f"--out: cannot create '{path}': {err.strerror or err}") from None
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"--out: writing '{path}' failed: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def _untied_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied parameters (e.g. a tied lm_head)."""
    every = dict(model.named_parameters(remove_duplicate=False))
    tied = every.keys() - dict(model.named_parameters()).keys()
    return {
        k: v.detach().contiguous() if v.is_meta else v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k not in tied
    }


def _base_config(model: PreTrainedModel) -> dict:
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    for key in ("minillm", "quantization_config", "_name_or_path"):
        config.pop(key, None)
    return config


def _reference_shapes(config: dict) -> dict[str, torch.Size] | None:
    """Tensor shapes plain transformers builds from ``config`` (None if it rejects it)."""
    config = dict(config)
    try:
        plain = AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(plain)
    except (ValueError, TypeError, KeyError):
        return None
    return {k: v.shape for k, v in _untied_state_dict(reference).items()}


def _plain_matches(config: dict, state: dict[str, torch.Tensor]) -> bool:
    """Whether plain transformers builds exactly these tensors from ``config``: catches
    configs it rejects and tensors it lacks (e.g. biases added by FLAP compensation)."""
    return _reference_shapes(config) == {k: v.shape for k, v in state.items()}


def _remote_code_config(base: dict, records: list[dict], state: dict) -> dict:
    """The config of an output that needs ``modeling_minillm.py`` (see module docstring)."""
    dense = _reference_shapes(base) or {}
    biases = [k.removesuffix(".bias") for k in state if k.endswith(".bias") and k not in dense]
    config_cls, model_cls = modeling_minillm.CLASSES[base["model_type"]]
    module = Path(MODELING_FILE).stem
    return {
        **base,
        "model_type": PRUNED_MODEL_TYPE,
        "architectures": [model_cls.__name__],
        "auto_map": {
            "AutoConfig": f"{module}.{config_cls.__name__}",
            "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
        },
        "minillm": {"base_model_type": base["model_type"], "layers": records, "biases": biases},
    }


def _dense_config(config: dict) -> dict:
    """The dense model's config of a ``minillm_pruned`` config (also the nested older form)."""
    extra = config["minillm"]
    if "base_config" in extra:
        return dict(extra["base_config"])
    dense = {k: v for k, v in config.items() if k not in ("minillm", "auto_map", "architectures")}
    return {**dense, "model_type": extra["base_model_type"]}


def _add_missing_biases(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Create bias parameters that a saved model has and the rebuilt one lacks."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and isinstance(module, torch.nn.Linear) and module.bias is None:
            module.bias = torch.nn.Parameter(torch.zeros_like(value))


def save_pruned(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    write_weights: bool = True,
) -> dict:
    """Write config.json, the weights (:mod:`minillm.model.shards`: ``model.safetensors``, or shards
    of at most ``max_shard_bytes`` plus an index) and the tokenizer into ``out_dir``.
    ``write_weights=False``: the caller wrote them (a streamed run; ``model`` may be on meta).

    Returns the config dict that was written (see module docstring for its two forms).
    """
    out_dir = Path(out_dir)
    adapter = adapter_for(model)
    records = layer_records(model, adapter)
    base = _base_config(model)
    state = _untied_state_dict(model)
    plain = adapter.plain_config(model.config, records)
    if plain is not None and _plain_matches({**base, **plain}, state):
        config = {**base, **plain, "minillm": {"layers": records}}
    else:
        config = _remote_code_config(base, records, state)
        shutil.copyfile(modeling_minillm.__file__, out_dir / MODELING_FILE)
    if write_weights:
        save_sharded(state, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return config


def load_pruned(
    path: str | os.PathLike, dtype: str | None = None, device: str = "cpu"
) -> PreTrainedModel:
    """Rebuild a model saved by minillm (uniform or per-layer sizes), in eval mode."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"'{path}' has no config.json: not a saved minillm model")
    config = json.loads(config_file.read_text())
    torch_dtype = parse_dtype(dtype) if dtype else None
    if config.get("model_type") != PRUNED_MODEL_TYPE:
        check_shards(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto")
        return model.to(device).eval()
    base = _dense_config(config)
    base_config = AutoConfig.for_model(base.pop("model_type"), **base)
    model = AutoModelForCausalLM.from_config(base_config, dtype=torch_dtype or torch.float32)
    adapter = adapter_for(model)
    resize_to_records(model, adapter, config["minillm"]["layers"])
    state = load_sharded(path)
    _add_missing_biases(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k, state)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"'{path}': weights do not match its config: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    return model.to(device).eval()


def _is_tied(model: PreTrainedModel, key: str, state: dict) -> bool:
    """Whether parameter ``key`` shares storage with a parameter present in ``state``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(
        params[k].data_ptr() == target.data_ptr() for k in state if k in params
    )
