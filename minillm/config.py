"""The options of a pruning run and their defaults, in one place.

:class:`PruneConfig` holds what decides the pruned model: the keyword options of
:func:`minillm.prune`. :class:`RunConfig` adds what the command needs around it: the model,
where the calibration text comes from, the before/after check, the output directory. Both are
printed into ``report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

CRITERIA = ("flap", "wanda-sp", "taylor", "fms", "magnitude", "random")
CHOICES = {
    "criterion": CRITERIA,
    "target": ("both", "heads", "channels"),
    "gqa": ("query", "kv"),
    "allocation": ("damage", "global", "uniform"),
    "select": ("scores", "refit"),
    "gradients": ("spsa", "backprop"),
    "fms_variant": ("weight", "unit", "layer", "removal"),
    "dist": ("rademacher", "gaussian"),
}
# the default --eval-text: ~2,800 tokens of WikiText-2 test shipped with minillm (CC BY-SA 3.0)
HELDOUT_TEXT = Path(__file__).parent / "texts" / "wikitext2_test_excerpt.txt"
PROMPT = "The capital of France is"


@dataclass
class PruneConfig:
    """What is removed, how units are scored and how the survivors are repaired."""

    ratio: float = 0.2  # fraction of the prunable parameters of the pruned layers removed
    criterion: str = "flap"
    target: str = "both"  # heads, channels or both
    layers: str | None = None  # "a-b"; None: LLM-Pruner's range, or every layer with uniform
    # how many units each layer loses: the least measured damage after the refit ("damage"),
    # one ranking of scores per kind ("global"), the same ratio everywhere ("uniform");
    # None: damage with the refit, global without
    allocation: str | None = None
    gqa: str = "query"  # GQA: query heads evenly per KV group, or whole KV groups ("kv")
    nsamples: int = 32  # calibration sequences
    seqlen: int = 128  # tokens per calibration sequence
    seed: int = 0
    reconstruct: bool | None = None  # least-squares refit; None: on unless compensate
    compensate: bool = False  # FLAP's bias compensation instead of the refit
    ridge: float = 0.1  # refit: pull toward the dense weights, x mean Gram diagonal
    select: str = "scores"  # refit: which units go, by score or by the refit's error
    round_to: str | None = None  # "N" or "heads=N,channels=M": kept counts at multiples
    rank_together: bool = False  # global ranking: heads and channels in one list
    batch_size: int = 8  # sequences per scoring forward
    damage_subset: int = 8  # damage: calibration sequences the KL is measured on
    damage_steps: int = 8  # damage: removal grid per group, fractions k/steps of its units
    damage_at: float = 0.5  # damage: the fraction removed where the KL is measured
    gradients: str = "spsa"  # fms: forward-only SPSA, or exact gradients
    fms_variant: str = "weight"  # fms: the gradient's resolution
    perturbations: int | None = None  # SPSA rounds over the calibration set (None: 4)
    eps: float | None = None  # SPSA perturbation size (None: per variant)
    dist: str = "rademacher"  # SPSA noise
    spill: bool = True  # exact gradients: block inputs in a temporary directory

    @property
    def refit(self) -> bool:
        """Whether the survivors are refit (``reconstruct``, on unless ``compensate``)."""
        return self.reconstruct if self.reconstruct is not None else not self.compensate

    @property
    def allocator(self) -> str:
        """``allocation``, settled: damage with the refit, global without."""
        return self.allocation or ("damage" if self.refit else "global")

    @property
    def kinds(self) -> list[str]:
        return ["heads", "channels"] if self.target == "both" else [self.target]


@dataclass
class RunConfig(PruneConfig):
    """A run of ``minillm prune``: a :class:`PruneConfig` plus model, text and output."""

    model: str | None = None  # hub id, local dir, or None: the embedded SmolLM2-135M GGUF
    gguf_file: str | None = None
    calib: str = "self"  # 'self', a text/JSON/JSONL file, or a datasets name
    eval_text: str | None = str(HELDOUT_TEXT)  # perplexity before/after; None: skipped
    eval_tokens: int = 8192
    eval_seqlen: int = 512
    prompt: str = PROMPT  # greedy continuation before/after; "": skipped
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "float32"
    out: str | None = None
    overwrite: bool = False
    quiet: bool = False
    offload: bool = False  # stream one block at a time from the checkpoint
    resume: bool = False  # streamed: continue a killed run of the same command


def option_names() -> set[str]:
    """The keyword options :func:`minillm.prune` takes."""
    return {f.name for f in fields(PruneConfig)}


def check(cfg: PruneConfig) -> None:
    """ValueError naming the option (as its flag) for a value no run can use."""
    for name, valid in CHOICES.items():
        value = getattr(cfg, name)
        if value not in valid and not (name == "allocation" and value is None):
            raise ValueError(f"--{_flag(name)}: '{value}' is not one of {', '.join(valid)}")
    if not 0.0 < cfg.ratio < 1.0:
        raise ValueError(f"--ratio: {cfg.ratio} is out of range; use a fraction in (0, 1)")
    if cfg.ridge < 0:
        raise ValueError(f"--ridge: {cfg.ridge} is negative; use a value >= 0 such as 0.1")
    if cfg.reconstruct and cfg.compensate:
        raise ValueError("--compensate: not needed with --reconstruct, which refits the biases too")
    if cfg.nsamples < 1 or cfg.seqlen < 2:
        raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {cfg.batch_size}")
    if cfg.allocator == "damage" and not cfg.refit:
        raise ValueError(
            "--allocation damage: measures the damage after the refit; drop --no-reconstruct/"
            "--compensate or pass --allocation global"
        )
    if cfg.rank_together and cfg.allocator != "global":
        raise ValueError(
            f"--rank-together: only with --allocation global (got {cfg.allocator}; damage "
            "already weighs heads against channels)"
        )
    if cfg.damage_subset < 1 or cfg.damage_steps < 2 or not 0 < cfg.damage_at < 1:
        raise ValueError(
            "--damage-subset must be >= 1, --damage-steps >= 2 and --damage-at in (0, 1)"
        )


def _flag(name: str) -> str:
    return name.replace("_", "-")
