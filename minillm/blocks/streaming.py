"""Block streaming: prune a model larger than memory, one decoder block resident at a time.

:class:`StreamedModel` is the model's skeleton on the meta device (parameters without storage,
buffers such as rotary frequencies real) plus a safetensors checkpoint (one file or shards with
an index; every file is checked through ``safe_open`` on construction, then each tensor is read
with plain file I/O when its part is loaded: a memory map would add the file's pages to the
resident size, doubling a part while it is copied). It is
the block source of :mod:`minillm.blocks.loop`: ``load(part)`` materializes ``"embed"``, block
``i`` or ``"head"`` on the compute device, ``release(part)`` returns it to meta.

:func:`run` (``python -m minillm.prune --offload``) does what the in-memory run does, in two
passes over the checkpoint:

1. score: embeddings -> block 0 -> ... through :func:`minillm.blocks.loop.sweep`; each pruned
   block's input statistics are reduced while it runs on the hidden states of every calibration
   sequence and its groups are scored right away (``magnitude``, ``wanda-sp``, ``flap`` need only
   that block); ``taylor`` runs the block-by-block exact gradients with this source; ``fms``
   adds a sweep of its SPSA passes as streams through every block (and, per weight, a third
   pass for the scores); ``random`` needs no weights. Blocks above the last pruned one are not
   loaded for the statistics-only criteria.
2. allocate (uniform or global, as in memory), then load each block again, compensate (FLAP),
   prune it, release it: with a :class:`~minillm.model.shards.ShardWriter` attached, a part is
   written when released. ``--reconstruct`` runs :func:`minillm.blocks.reconstruct.prune_sequential`
   (a :func:`~minillm.blocks.loop.sweep` visit per block) unchanged with this source.

Peak memory is one block, the embedding or LM head, and the calibration hidden states of one
boundary (``taylor`` keeps one per block, spilled to disk), whatever the depth.

When to stream: always with ``--offload``; automatically for a local safetensors checkpoint
whose weights at ``--dtype`` exceed half the memory available on ``--device`` (free CUDA memory,
or ``MemAvailable`` on CPU): the in-memory path needs the weights plus activations, statistics
and (``taylor``) gradients. A GGUF model (the embedded default) is de-quantized once by
transformers and cached as safetensors under ``$MINILLM_CACHE`` (default
``~/.cache/minillm``), then streamed from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from minillm.blocks import distributed
from minillm.blocks.loop import capture, resident, run_block, sweep
from minillm.blocks.reconstruct import prune_sequential
from minillm.blocks.resume import ResumeState
from minillm.data import calibration_batches
from minillm.evaluation.perplexity import HELDOUT_TEXT
from minillm.memory import PhaseMeter, trim_heap
from minillm.model import shards
from minillm.model.adapters import adapter_for
from minillm.model.dtypes import parse_dtype
from minillm.model.io import atomic_output_dir, save_pruned
from minillm.model.loading import load_model
from minillm.model.surgery import count_params, prune_layer
from minillm.scoring import allocation, spsa
from minillm.scoring.criteria import (
    CRITERIA,
    ScoringContext,
    compensate,
    fms_from_multipliers,
    fms_weight_scores,
    linears_of,
    spsa_options,
    wanda_sp,
)
from minillm.scoring.stats import InputStats, collected_stats

log = logging.getLogger("minillm")
BLOCK_CRITERIA = ("magnitude", "wanda-sp", "flap")  # a layer's scores need only its block
STREAMED_FMS = ("weight", "unit", "layer")  # fms variants with a block-by-block SPSA


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

    def module_name(self, module: nn.Module) -> str:
        return self._module_name[module]

    def write_rest(self) -> None:
        """Load and release (so write) every part not written yet."""
        for part in ("embed", *range(len(self.adapter.layers(self.model))), "head"):
            if part not in self.written:
                with resident(self, part):
                    pass

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


def should_stream(cfg) -> bool:
    """``--offload``, or a local safetensors checkpoint bigger than half the free memory."""
    if cfg.offload or cfg.resume:
        return True
    if cfg.model is None or cfg.gguf_file is not None or not Path(cfg.model).is_dir():
        return False
    size = weights_bytes(cfg.model, cfg.dtype)
    free = available_bytes(cfg.device)
    if size is None or size <= free // 2:
        return False
    gib = 2**30
    log.info("weights %.1f GiB > half of free %.1f GiB: streaming blocks", size / gib, free / gib)
    return True


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


def _validate(cfg) -> None:
    if cfg.criterion == "fms" and (cfg.fms_variant not in STREAMED_FMS or cfg.gradients != "spsa"):
        raise ValueError(
            f"--fms-variant/--gradients: fms streams with --gradients spsa and --fms-variant "
            f"{', '.join(STREAMED_FMS)} (got {cfg.fms_variant}, {cfg.gradients})"
        )
    needs_text = cfg.compensate or cfg.reconstruct is not False
    if cfg.calib == "self" and (needs_text or cfg.criterion not in ("random", "magnitude")):
        raise ValueError(
            "--calib: 'self' generates text with the whole model; with --offload "
            "pass a text/JSON/JSONL file (random/magnitude with --no-reconstruct need none)"
        )
    if cfg.eval_text is not None and Path(cfg.eval_text) != HELDOUT_TEXT:  # the default is skipped
        raise ValueError("--eval-text: perplexity needs the whole model; drop it with --offload")


def _block_groups(sm: StreamedModel, layer: int, kinds: list[str], gqa: str) -> list:
    groups = sm.adapter.groups(sm.model, layer, gqa)
    return [groups[k] for k in kinds]


def _score(
    sm: StreamedModel, cfg, groups, tokens, options, resume: ResumeState | None
) -> tuple[dict, ScoringContext]:
    """Scores of every group and the context holding counters and statistics (pass 1)."""
    model, adapter = sm.model, sm.adapter
    ctx = ScoringContext(
        model, adapter, groups, tokens, cfg.seed, options=options, source=sm, checkpoint=resume
    )
    if cfg.criterion == "fms":
        return _score_fms(sm, cfg, tokens, ctx, resume), ctx
    if cfg.criterion not in BLOCK_CRITERIA:  # random (no weights) or taylor (exact gradients)
        scores = CRITERIA[cfg.criterion](ctx)
        if cfg.compensate and "stats" not in ctx.cache:
            ctx.cache["stats"], _ = _stream_stats(sm, cfg, tokens, ctx, None, resume)
        return scores, ctx

    def score(block_ctx: ScoringContext) -> dict:
        return CRITERIA[cfg.criterion](block_ctx)

    if cfg.criterion == "magnitude" and not cfg.compensate:  # no forward: nothing to resume
        scores = {}
        for layer in sorted({g.layer for g in groups}):
            with resident(sm, layer):
                block_groups = _block_groups(sm, layer, _kinds(cfg), cfg.gqa)
                scores.update(score(replace(ctx, groups=block_groups, cache={})))
        return scores, ctx
    ctx.cache["stats"], scores = _stream_stats(sm, cfg, tokens, ctx, score, resume)
    return scores, ctx


def _score_fms(sm: StreamedModel, cfg, tokens, ctx: ScoringContext, resume) -> dict:
    """``fms`` in three passes over the checkpoint: the statistics and wanda-sp scores of the
    pruned blocks (resumable), the SPSA passes as streams through every block
    (:func:`minillm.scoring.spsa.spsa_by_block`), then for the ``weight`` variant each pruned
    block again for its scores from the estimate (the multiplier variants need no weights)."""
    variant = ctx.option("fms_variant")
    stats, a = _stream_stats(sm, cfg, tokens, ctx, wanda_sp, resume)
    ctx.cache["stats"] = stats
    per_weight = variant == "weight"
    kw = spsa_options(ctx, per_weight)
    rounds, half = kw.pop("n_perturbations"), kw.pop("batch_size")
    linears = dict(enumerate(linears_of(ctx.groups)))

    def make_pass(k: int, bi: int, i0: int, b: int) -> spsa.Pass:
        if per_weight:
            return spsa.weight_pass(list(linears.items()), k, bi, b, **kw)
        return spsa.multiplier_pass(ctx.groups, k, bi, i0, b, resolution=variant, **kw)

    estimate, passes = spsa.spsa_by_block(
        sm.model,
        tokens,
        make_pass,
        n_perturbations=rounds,
        batch_size=half,
        first_row=distributed.first_row(tokens.shape[0]),
        source=sm,
    )
    ctx.count(passes, 2 * rounds)
    if not per_weight:
        grads = [
            spsa.multiplier_gradient(estimate, gi, spsa.n_coords(g, variant), kw["dist"])
            for gi, g in enumerate(ctx.groups)
        ]
        for g in grads:
            distributed.all_reduce_sum(g)
        return fms_from_multipliers(ctx, a, grads, variant)
    # one seed per round on every rank: all-reduce the coefficients
    coeffs = torch.tensor([c for _, c in estimate], dtype=torch.float64)
    distributed.all_reduce_sum(coeffs)
    estimate = list(zip([s for s, _ in estimate], coeffs.tolist(), strict=True))
    scores = {}
    for layer in sorted({g.layer for g in ctx.groups}):
        with resident(sm, layer):
            block_groups = _block_groups(sm, layer, _kinds(cfg), cfg.gqa)
            mine = set(linears_of(block_groups))
            block_linears = {tid: lin for tid, lin in linears.items() if lin in mine}
            scores.update(
                fms_weight_scores(block_groups, block_linears, stats, estimate, kw["dist"])
            )
    return scores


def _kinds(cfg) -> list[str]:
    return ["heads", "channels"] if cfg.target == "both" else [cfg.target]


def _stream_stats(
    sm: StreamedModel, cfg, tokens, ctx: ScoringContext, score, resume: ResumeState | None = None
) -> tuple[dict, dict]:
    """Run the calibration hidden states up to the last pruned block; returns the statistics of
    the pruned blocks' linears and the scores ``score(block_ctx)`` (``{(layer, kind): scores}``)
    returns while each pruned block is resident. With ``resume``, the state is checkpointed
    after every block and a checkpoint found there is continued from."""
    model, adapter = sm.model, sm.adapter
    layers = sorted({g.layer for g in ctx.groups})
    all_stats: dict = {}
    scores: dict = {}
    with torch.no_grad():
        boundary = capture(model, adapter, tokens, ctx.option("batch_size"), sm)
    first = 0
    saved = resume.load() if resume is not None else None
    if saved is not None:
        done, tensors, meta = saved
        boundary = boundary.with_hidden(
            [tensors[f"hidden.{j}"].to(sm.device) for j in range(len(boundary.hidden))]
        )
        all_stats, scores = _unpack(sm, tensors, meta)
        first = done + 1
        log.info("resuming after block %d from %s", done, resume.dir)

    def visit(i: int, boundary) -> list[torch.Tensor]:
        block = adapter.layers(model)[i]
        if i not in layers:
            out = run_block(block, boundary)
        else:
            block_groups = _block_groups(sm, i, _kinds(cfg), cfg.gqa)
            linears = list(
                dict.fromkeys(b.linear for g in block_groups for b in g.producers + g.consumers)
            )
            with collected_stats(linears) as stats:
                out = run_block(block, boundary)
            distributed.all_reduce_stats(stats)
            all_stats.update(stats)
            if score is not None:
                scores.update(score(replace(ctx, groups=block_groups, cache={"stats": stats})))
        if resume is not None:
            resume.save(i, *_pack(sm, out, all_stats, scores))
        return out

    with torch.no_grad():
        sweep(model, adapter, boundary, range(first, layers[-1] + 1), visit, source=sm)
    ctx.count(len(boundary.hidden))
    return all_stats, scores


def _pack(sm: StreamedModel, hidden, stats, scores) -> tuple[dict, dict]:
    tensors = {f"hidden.{j}": h for j, h in enumerate(hidden)}
    counts = {}
    for lin, st in stats.items():
        name = sm.module_name(lin)
        tensors[f"stats.{name}.sum_sq"], tensors[f"stats.{name}.sum"] = st.sum_sq, st.sum
        counts[name] = st.count
    for (layer, kind), sc in scores.items():
        tensors[f"scores.{layer}.{kind}"] = sc
    return tensors, {"counts": counts}


def _unpack(sm: StreamedModel, tensors: dict, meta: dict) -> tuple[dict, dict]:
    modules = dict(sm.model.named_modules())
    stats = {
        modules[name]: InputStats(tensors[f"stats.{name}.sum_sq"], tensors[f"stats.{name}.sum"], n)
        for name, n in meta["counts"].items()
    }
    scores = {}
    for key, t in tensors.items():
        if key.startswith("scores."):
            _, layer, kind = key.split(".")
            scores[(int(layer), kind)] = t
    return stats, scores


def _write(sm: StreamedModel, cfg, keep, ctx: ScoringContext, layers: list[int]) -> None:
    """Pass 2 (``sm.writer`` attached): prune the blocks of ``layers`` (compensated, or refit
    bottom-up with ``--reconstruct``), each written when released, then write the other parts."""
    model, adapter = sm.model, sm.adapter
    if cfg.reconstruct:
        prune_sequential(
            model,
            adapter,
            ctx.batches,
            keep,
            layers,
            cfg.gqa,
            cfg.batch_size,
            cfg.ridge,
            select=cfg.select,
            source=sm,
        )
    else:
        for i in layers:
            with resident(sm, i):
                if cfg.compensate:
                    groups = _block_groups(sm, i, _kinds(cfg), cfg.gqa)
                    compensate(replace(ctx, groups=groups), keep)
                prune_layer(
                    model, adapter, i, keep.get((i, "heads")), keep.get((i, "channels")), cfg.gqa
                )
    sm.write_rest()


def run(cfg, pruning_report: Callable[..., dict]) -> dict:
    """``python -m minillm.prune`` with blocks streamed from the checkpoint; same report.

    ``cfg`` is the prune command's config (``--reconstruct`` settled); ``pruning_report`` (the
    report.json fields) is the in-memory run's own, passed in by :func:`minillm.prune.run` so
    both paths report alike."""
    _validate(cfg)
    rank, world = distributed.setup(cfg.device)
    if world > 1 and cfg.resume:
        raise ValueError("--resume: checkpoints are per process; resume runs in one process")
    meter = PhaseMeter(cfg.device)
    with meter.phase("load"):
        path = cfg.model
        if cfg.model is None or cfg.gguf_file is not None:
            path = cached_gguf(cfg.model, cfg.gguf_file)
        sm = StreamedModel(path, cfg.dtype, cfg.device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model, adapter = sm.model, sm.adapter
    n_blocks = len(adapter.layers(model))
    layers = allocation.parse_layers(cfg.layers, n_blocks)
    with meter.phase("calibrate"):
        tokens = torch.empty(0, cfg.seqlen, dtype=torch.long)
        if cfg.compensate or cfg.reconstruct or cfg.criterion not in ("random", "magnitude"):
            tokens = calibration_batches(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
            tokens = distributed.my_rows(tokens, rank, world)
    params_before = count_params(model)
    groups = [adapter.groups(model, i, cfg.gqa)[k] for i in layers for k in _kinds(cfg)]
    options = {k: v for k, v in asdict(cfg).items() if v is not None}
    options["spill"] = True  # taylor: block inputs on disk, so memory does not grow with depth
    with meter.phase("score"):
        resume = ResumeState(cfg.out, asdict(cfg), cfg.resume) if world == 1 else None
        scores, ctx = _score(sm, cfg, groups, tokens, options, resume)
    with meter.phase("prune"):
        keep = allocation.allocate(
            groups,
            scores,
            cfg.ratio,
            cfg.criterion,
            options,
            per_layer=cfg.uniform,
            together=cfg.rank_together,
        )
        multiples = allocation.parse_round_to(cfg.round_to)
        if multiples:
            keep = allocation.round_to_multiples(groups, scores, keep, multiples)
        prunable = allocation.prunable_params(groups)
        prunable_removed = prunable - allocation.prunable_params(groups, keep)
    output = atomic_output_dir(cfg.out, cfg.overwrite) if rank == 0 else nullcontext()
    with output as tmp:  # only rank 0 writes; the others prune their skeleton for the report
        with meter.phase("save"):
            if tmp is None:
                _write(sm, cfg, keep, ctx, layers)
            else:
                with shards.ShardWriter(tmp, shards.DEFAULT_SHARD_BYTES) as sm.writer:
                    _write(sm, cfg, keep, ctx, layers)
                save_pruned(model, tokenizer, tmp, write_weights=False)
        report = {
            **pruning_report(
                cfg, model, adapter, ctx, layers, params_before, prunable, prunable_removed, tokens
            ),
            "streamed": {"checkpoint": str(path), "world_size": world},
            **meter.summary(),
        }
        for phase in ("score", "save"):
            report["streamed"][f"{phase}_s_per_block"] = report["time_s"][phase] / n_blocks
        if tmp is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if resume is not None:
        resume.clear()
    return report
