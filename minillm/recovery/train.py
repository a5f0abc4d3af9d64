"""LoRA training of a recovery run: the adapters, the loop with its checkpoints, and the merged
float32 model."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from minillm.data import Targets
from minillm.recovery.config import SELF_DATA_STEPS, RecoverConfig
from minillm.recovery.data import batch_order, collate, collate_targets
from minillm.recovery.loss import recovery_loss

CHECKPOINT = "checkpoint.pt"


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct names of the ``nn.Linear`` projections in the decoder (all but the LM head)."""
    out_emb = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not out_emb
    }
    return sorted(names)


def add_lora(model: nn.Module, cfg: RecoverConfig) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (base weights frozen); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or linear_module_names(model)
    available = set(linear_module_names(model))
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(
            f"--target-modules: {', '.join(missing)} not in the model; "
            f"valid: {', '.join(sorted(available))}"
        )
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def lr_at(step: int, total: int, base: float, warmup_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio * total`` steps, then linear decay to 0."""
    warmup = max(1, math.ceil(warmup_ratio * total))
    if step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, (total - step) / max(1, total - warmup))


def save_checkpoint(work: Path, peft_model: nn.Module, optimizer, step: int, curve: list) -> None:
    """Adapter weights, optimizer state, step and loss curve, written atomically."""
    from peft import get_peft_model_state_dict

    state = {
        "adapter": get_peft_model_state_dict(peft_model),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "curve": curve,
    }
    fd, tmp = tempfile.mkstemp(prefix=".ckpt.", dir=work)
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, work / CHECKPOINT)


def load_checkpoint(work: Path, peft_model: nn.Module, optimizer) -> tuple[int, list]:
    """Restore a checkpoint written by ``save_checkpoint``; returns (step, loss curve)."""
    from peft import set_peft_model_state_dict

    state = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=True)
    set_peft_model_state_dict(peft_model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["curve"])


def total_steps(n_examples: int, cfg: RecoverConfig) -> tuple[int, int]:
    """(optimizer steps, epochs of data needed): ``--max-steps`` wins over ``--epochs``.

    With ``--data self`` and no ``--max-steps``, ``SELF_DATA_STEPS`` steps.
    """
    per_epoch = max(1, math.ceil(n_examples / cfg.batch_size) // cfg.grad_accum)
    steps = cfg.max_steps
    if steps is None and cfg.data == "self":
        steps = SELF_DATA_STEPS
    if steps is None:
        return per_epoch * cfg.epochs, cfg.epochs
    return steps, math.ceil(steps / per_epoch)


def autocast_like(model: nn.Module):
    """Autocast to the dtype of ``model``'s frozen weights (a no-op in float32).

    Frozen weights in bfloat16 need it: the float32 adapters' outputs join their stream.
    """
    param = next((p for p in model.parameters() if not p.requires_grad), None)
    param = param if param is not None else next(model.parameters())
    return torch.autocast(
        param.device.type, dtype=param.dtype, enabled=param.dtype != torch.float32
    )


def compute_dtype(precision: str, device: str) -> str:
    """``--precision`` resolved to ``float32`` or ``bfloat16``.

    ``auto`` is bfloat16 where the device multiplies it natively (a CUDA GPU with bfloat16
    support; a CPU with AMX or AVX512-BF16, where it is ~7x faster than float32), else float32.
    """
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if "amx_bf16" in flags or "avx512_bf16" in flags else "float32"


def train(
    peft_model: nn.Module,
    targets: list[Targets] | None,
    examples: list[list[int]],
    pad_id: int,
    cfg: RecoverConfig,
    work: Path,
) -> list[dict]:
    """LoRA training loop; checkpoints into ``work`` every ``save_every`` steps.

    ``targets``: the teacher's ``teacher_targets`` of ``examples``, or None (CE only).
    Returns the loss curve: one dict per optimizer step (``step``, ``loss``, ``ce``[, ``kl``],
    ``lr``, ``tokens`` trained on), losses averaged over the step's micro-batches, in nats per
    token.
    """
    steps, epochs = total_steps(len(examples), cfg)
    order = batch_order(len(examples), cfg.batch_size, epochs, cfg.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, curve = 0, []
    if cfg.resume and (work / CHECKPOINT).is_file():
        start, curve = load_checkpoint(work, peft_model, optimizer)
        print(f"resuming from step {start} ({work / CHECKPOINT})", file=sys.stderr)
    device = next(peft_model.parameters()).device
    autocast = autocast_like(peft_model)
    peft_model.train()
    bar = tqdm(range(start, steps), desc="recover", disable=cfg.quiet, initial=start, total=steps)
    for step in bar:
        lr = lr_at(step, steps, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            rows = order[(step * cfg.grad_accum + micro) % len(order)]
            tokens += sum(len(examples[i]) for i in rows)
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id).items()
            }
            with autocast:
                logits = peft_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            teacher = None
            if targets is not None:
                teacher = tuple(t.to(device) for t in collate_targets([targets[i] for i in rows]))
            loss, parts = recovery_loss(
                logits, batch["labels"], teacher, cfg.kd_weight, cfg.kd_temperature
            )
            (loss / cfg.grad_accum).backward()
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, **sums, "lr": lr, "tokens": tokens})
        bar.set_postfix(loss=f"{sums['loss']:.3f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            save_checkpoint(work, peft_model, optimizer, step + 1, curve)
    peft_model.eval()
    return curve


def merged_float32(peft_model: nn.Module, cfg: RecoverConfig, dtype: str) -> nn.Module:
    """The recovered model in float32: adapters merged into float32 base weights.

    Training in bfloat16 keeps its frozen copy in bfloat16; the adapters (float32) are merged
    into the model reloaded in float32 instead, so rounding does not touch the saved weights.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from minillm.model.loading import load_model

    if dtype == "float32":
        return peft_model.merge_and_unload()
    adapters = get_peft_model_state_dict(peft_model)
    base, _ = load_model(cfg.model, cfg.gguf_file, "float32", cfg.device)
    full = add_lora(base, cfg)
    set_peft_model_state_dict(full, adapters)
    return full.merge_and_unload()
