"""The options of a recovery run (``minillm recover``), with their defaults."""

from __future__ import annotations

from dataclasses import dataclass

SELF_DATA_STEPS = 400  # default budget on self-written text: ~27 min on 2 CPU cores with AMX


@dataclass
class RecoverConfig:
    """Flags of one recovery run; stored in ``report.json``."""

    model: str
    out: str
    gguf_file: str | None = None
    data: str = "self"
    teacher: str | None = None  # None: the dense model of report.json; "none": no KD
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_topk: int = 128
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seqlen: int = 128
    max_samples: int | None = None
    self_samples: int = 2048
    self_top_k: int = 0  # 0: the writer samples from the whole distribution
    save_every: int = 50
    work_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    precision: str = "auto"  # auto | float32 | bfloat16: dtype of the frozen weights and matmuls
    seed: int = 0
    quiet: bool = False
