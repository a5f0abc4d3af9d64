"""Block streaming: a model larger than memory, one decoder block resident at a time.

:class:`StreamedModel` is the model's skeleton on the meta device (parameters without storage,
buffers such as rotary frequencies real) plus a safetensors checkpoint (one file or shards with
an index; every file is checked through ``safe_open`` on construction, then each tensor is read
with plain file I/O when its part is loaded: a memory map would add the file's pages to the
resident size, doubling a part while it is copied). It is a block source of
:mod:`minillm.blocks.loop`: ``load(part)`` materializes ``"embed"``, block ``i`` or ``"head"``
on the compute device, ``release(part)`` returns it to meta. The pruning steps
(:mod:`minillm.pipeline`) run over it as over a resident model; :meth:`StreamedModel.writing`
writes each part of the pruned model as it is released, and :meth:`StreamedModel.reopen` reads
the written model back for the perplexity after pruning.

Peak memory is one block, the embedding or LM head, and the calibration hidden states of one
boundary (``taylor`` keeps one per block, spilled to disk), whatever the depth.

When to stream (:func:`stream_reason`): always with ``--offload``; automatically for a local
safetensors checkpoint whose weights at ``--dtype`` exceed half the memory available on
``--device`` (free CUDA memory, or ``MemAvailable`` on CPU): the in-memory path needs the
weights plus activations, statistics and (``taylor``) gradients. A GGUF model (the embedded
default) is de-quantized once by transformers and cached as safetensors under
``$MINILLM_CACHE`` (default ``~/.cache/minillm``), then streamed from there.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from minillm.blocks.loop import resident
from minillm.memory import trim_heap
from minillm.model import shards
from minillm.model.adapters import adapter_for
from minillm.model.dtypes import parse_dtype
from minillm.model.io import atomic_output_dir
from minillm.model.loading import load_model

log = logging.getLogger("minillm")


def _skeleton(config, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The model of ``config`` with parameters on meta and buffers on ``device``."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # not done under init_empty_weights
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval()


class StreamedModel:
    """A meta skeleton whose parts are read from the checkpoint at ``path`` on demand.

    Checks on construction (one-line errors naming the file): every shard opens, every
    parameter of the config has a tensor of the same shape.
    """

    def __init__(self, path: str | os.PathLike, dtype: str, device: str) -> None:
        self.path = Path(path)
        self.dtype, self.device = parse_dtype(dtype), torch.device(device)
        self.files = shards.weight_map(self.path)
        try:
            config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise ValueError(f"--model: '{path}': {str(err).splitlines()[0]}") from None
        self.model = _skeleton(config, self.dtype, self.device)
        self.adapter = adapter_for(self.model)
        self._module_name = {m: n for n, m in self.model.named_modules()}
        self._entries = self._partition()
        self._originals: dict[tuple[nn.Module, str], nn.Parameter] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self.writer: shards.ShardWriter | None = None  # set: each part is written on release
        self.written: set[int | str] = set()
        every = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        self._tied = every - {n for n, _ in self.model.named_parameters()}  # second names
        self._check_shapes()

    def _partition(self) -> dict[int | str, list[tuple[nn.Module, str, list[str]]]]:
        """``part -> [(module, leaf, checkpoint names of that parameter)]``."""
        blocks = self.adapter.layers(self.model)
        part_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
        head = [self.adapter.final_norm(self.model), self.model.get_output_embeddings()]
        aliases: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        entries: dict[int | str, list] = {"embed": [], "head": []}
        entries.update({i: [] for i in range(len(blocks))})
        head_modules = {m for h in head for m in h.modules()}
        for mod_name, module in self.model.named_modules():
            for leaf, p in module._parameters.items():
                if p is None:
                    continue
                if id(p) in part_of:
                    part = part_of[id(p)]
                elif module in head_modules:
                    part = "head"
                else:
                    part = "embed"
                own = f"{mod_name}.{leaf}" if mod_name else leaf
                names = [own] + [a for a in aliases[id(p)] if a != own]
                entries[part].append((module, leaf, names))
        return entries

    def _name_in_checkpoint(self, names: list[str]) -> str:
        for name in names:
            if name in self.files:
                return name
        raise ValueError(f"'{self.path}': no tensor '{names[0]}' although the config needs it")

    def _check_shapes(self) -> None:
        wanted: dict[Path, dict[str, tuple]] = {}
        for entries in self._entries.values():
            for module, leaf, names in entries:
                name = self._name_in_checkpoint(names)
                shape = tuple(module._parameters[leaf].shape)
                wanted.setdefault(self.files[name], {})[name] = shape
        for file, expected in wanted.items():
            with shards.open_checked(file) as f:
                for name, shape in expected.items():
                    got = tuple(f.get_slice(name).get_shape())
                    if got != shape:
                        raise ValueError(
                            f"'{file}': tensor '{name}' has shape {list(got)}, "
                            f"the config needs {list(shape)}"
                        )

    def load(self, part: int | str) -> None:
        """Materialize ``part`` (``"embed"``, a block index, ``"head"``) on the device."""
        for module, leaf, names in self._entries[part]:
            name = self._name_in_checkpoint(names)
            file = self.files[name]
            if file not in self._headers:
                self._headers[file] = shards.read_header(file)
            start, header = self._headers[file]
            t = shards.read_tensor(file, start, header[name]).to(self.device, self.dtype)
            self._originals.setdefault((module, leaf), module._parameters[leaf])
            module._parameters[leaf] = nn.Parameter(t, requires_grad=False)

    def release(self, part: int | str) -> None:
        """Return ``part`` to meta; a parameter pruned or created meanwhile keeps its new shape.

        With a ``writer`` attached, a part not written yet is written first (as it is now)."""
        if self.writer is not None and part not in self.written:
            self.writer.add_all(self.state(part))
            self.written.add(part)
        for module in {m for m, _, _ in self._entries[part]}:
            for leaf, p in list(module._parameters.items()):
                if p is None or p.is_meta:
                    continue
                old = self._originals.pop((module, leaf), None)
                if old is None or old.shape != p.shape:
                    old = nn.Parameter(p.detach().to("meta"), requires_grad=False)
                module._parameters[leaf] = old
        trim_heap()

    @contextmanager
    def writing(self, out_dir: Path) -> Iterator[None]:
        """Inside the context each part is written into ``out_dir`` (safetensors shards and
        their index) when released; on exit the parts not written yet are loaded and written."""
        with shards.ShardWriter(out_dir, shards.DEFAULT_SHARD_BYTES) as self.writer:
            yield
            for part in ("embed", *range(len(self.adapter.layers(self.model))), "head"):
                if part not in self.written:
                    with resident(self, part):
                        pass
        self.writer = None

    def reopen(self, path: str | os.PathLike) -> None:
        """Read the parts from the checkpoint at ``path`` from now on (the pruned model this
        skeleton was written to: its shapes and the biases the refit added)."""
        self.path, self.files = Path(path), shards.weight_map(path)
        self._headers.clear()
        self._entries = self._partition()
        self._check_shapes()

    def state(self, part: int | str) -> dict[str, torch.Tensor]:
        """Checkpoint names and tensors of a resident ``part`` (tied duplicates left out)."""
        out = {}
        for module in dict.fromkeys(m for m, _, _ in self._entries[part]):
            prefix = self._module_name[module]
            for leaf, p in module._parameters.items():
                name = f"{prefix}.{leaf}" if prefix else leaf
                if p is not None and name not in self._tied:
                    out[name] = p.detach()
        return out


def weights_bytes(path: str | os.PathLike, dtype: str) -> int | None:
    """Bytes of a local safetensors checkpoint's weights at ``dtype`` (None if not one)."""
    try:
        files = shards.weight_map(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    numel = 0
    for file in dict.fromkeys(files.values()):
        with shards.open_checked(file) as f:
            numel += sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    return numel * parse_dtype(dtype).itemsize


def available_bytes(device: str) -> int:
    """Free memory of ``device``: CUDA free memory, or ``MemAvailable`` on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**63


def stream_reason(cfg) -> str | None:
    """Why the run of ``cfg`` streams its blocks (``--offload``, ``--resume``, or a local
    safetensors checkpoint bigger than half the free memory), or None when it does not."""
    if cfg.offload or cfg.resume:
        return "--offload" if cfg.offload else "--resume"
    if cfg.model is None or cfg.gguf_file is not None or not Path(cfg.model).is_dir():
        return None
    size = weights_bytes(cfg.model, cfg.dtype)
    free = available_bytes(cfg.device)
    if size is None or size <= free // 2:
        return None
    gib = 2**30
    reason = f"its weights, {size / gib:.1f} GiB, exceed half the free {free / gib:.1f} GiB"
    log.info("streaming blocks: %s", reason)
    return reason


def cached_gguf(model: str | None, gguf_file: str | None) -> Path:
    """A GGUF model de-quantized once into a float32 safetensors directory (cached)."""
    root = Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm"))
    key = f"{Path(model).name if model else 'embedded'}-{Path(gguf_file or 'default').stem}"
    path = root / "gguf" / key
    if not (path / "config.json").is_file():
        log.info("converting the GGUF model once to safetensors in %s", path)
        net, tokenizer = load_model(model, gguf_file, "float32", "cpu")
        net.hf_quantizer = None  # de-quantized to float32 already: save as plain weights
        with atomic_output_dir(path, overwrite=True) as tmp:
            net.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return path


def open_streamed(cfg) -> tuple[StreamedModel, object]:
    """The streamed model of ``cfg.model`` (a GGUF through its safetensors cache) and its
    tokenizer."""
    path = cfg.model
    if cfg.model is None or cfg.gguf_file is not None:
        path = cached_gguf(cfg.model, cfg.gguf_file)
    sm = StreamedModel(path, cfg.dtype, cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return sm, tokenizer
