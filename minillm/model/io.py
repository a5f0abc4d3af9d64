"""Saving and reloading pruned models: safetensors only, written atomically.

A pruned model whose sizes plain transformers can express (every layer the same sizes, as
``--uniform`` gives) gets a plain config that ``AutoModelForCausalLM.from_pretrained`` loads,
plus a ``minillm`` entry with the per-layer records. Biases the refit added to o_proj/down_proj
are expressed through the family's config flags (LLaMA's ``attention_bias``/``mlp_bias``,
:attr:`~minillm.model.adapters.base.Adapter.bias_flags`), with zero biases saved for the other
linears the flag gives one. Any other pruned model gets the dense config with ``"model_type":
"minillm_pruned"`` and ``minillm.base_model_type``, one record per layer (kept ``heads``,
``kv_heads``, ``channels`` and the original ``head_ids`` of surviving heads) and the linears
with added ``biases``; ``modeling_minillm.py`` is copied beside it and named in ``auto_map``,
so stock ``from_pretrained(DIR, trust_remote_code=True)`` loads it without minillm, and
``load_pruned`` rebuilds it with minillm's own surgery. Every output holds a model card
(``README.md``, :mod:`minillm.model.card`).
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
from minillm.model.card import model_card
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


def _plain_state(
    config: dict, state: dict[str, torch.Tensor], bias_flags: dict[str, str]
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(config, state)`` that plain transformers builds exactly, or None.

    ``config`` is tried as it is, then with the bias flags of the module paths that hold
    biases plain transformers lacks (turned on, and zero biases added for the other linears
    they give one). None where it rejects the config or the tensors still differ."""
    reference = _reference_shapes(config)
    if reference is None:
        return None
    added = [k for k in state if k.endswith(".bias") and k not in reference]
    flags = {f: True for f, path in bias_flags.items() if any(path in k for k in added)}
    if flags:
        config = {**config, **flags}
        reference = _reference_shapes(config) or {}
        state = dict(state)
        for key in reference.keys() - state.keys():
            if key.endswith(".bias"):
                weight = state[key.removesuffix("bias") + "weight"]
                state[key] = weight.new_zeros(reference[key])
    if reference != {k: v.shape for k, v in state.items()}:
        return None
    return config, state


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


def write_pruned(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | os.PathLike,
    report: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    write_weights: bool = True,
) -> dict:
    """Write config.json, the weights (:mod:`minillm.model.shards`: ``model.safetensors``, or
    shards of at most ``max_shard_bytes`` plus an index), the tokenizer and the model card into
    the existing directory ``out_dir``. ``write_weights=False``: the caller wrote them (a
    streamed run; ``model`` may be on meta); then biases the refit added make the output
    ``minillm_pruned``, since the zero biases of a plain form were not written.

    Returns the config dict that was written (see module docstring for its two forms).
    """
    out_dir = Path(out_dir)
    adapter = adapter_for(model)
    records = layer_records(model, adapter)
    base = _base_config(model)
    state = _untied_state_dict(model)
    plain = adapter.plain_config(model.config, records)
    flags = adapter.bias_flags if write_weights else {}  # written already: no zero biases
    found = None if plain is None else _plain_state({**base, **plain}, state, flags)
    if found is not None:
        config, state = found
        config["minillm"] = {"layers": records}
    else:
        config = _remote_code_config(base, records, state)
        shutil.copyfile(modeling_minillm.__file__, out_dir / MODELING_FILE)
    if write_weights:
        save_sharded(state, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(model_card(config, report))
    return config


def save_pruned(
    model: PreTrainedModel,
    tokenizer,
    path: str | os.PathLike,
    report: dict | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Save a pruned model (and ``tokenizer``, if given) into the new or empty directory
    ``path``, atomically (:func:`write_pruned` into a temporary sibling, then renamed).
    ``report``: what :func:`minillm.prune_model` returned, for the model card.

    Returns the config dict that was written."""
    with atomic_output_dir(path, overwrite) as tmp:
        return write_pruned(model, tokenizer, tmp, report, max_shard_bytes)


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
