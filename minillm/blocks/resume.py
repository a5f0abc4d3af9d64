"""Resuming a streamed run after a kill: its scoring state, checkpointed block by block.

The state after decoder block ``i`` (forward-only criteria: the hidden states leaving it, the
input statistics and scores of the blocks done; ``taylor``: after the forward sweep and after
each block of the backward sweep, ``dL/d input`` of that block, the statistics and the reduced
gradients of the blocks done, with the stored block inputs in ``hidden/``; ``fms``: its
statistics pass, its SPSA sweep restarts) is one safetensors file, ``state.safetensors`` in
``.<out>.resume/`` beside ``--out``, replaced atomically (temporary name + rename) after each
block, with the run's arguments in ``args.json``. ``--resume`` continues from it when the
arguments match (one-line error naming ``--resume`` otherwise); a run without ``--resume``
starts afresh; a finished run removes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# do not change the result; the streamed path evaluates nothing (the eval flags' defaults hold
# the installed package's path, which a reinstall between the kill and the resume changes)
IGNORED = ("out", "overwrite", "quiet", "resume", "offload")
IGNORED += ("eval_text", "eval_tokens", "eval_seqlen", "prompt")


class ResumeState:
    """Checkpoint of a streamed run's scoring state (see module docstring)."""

    def __init__(self, out: str | os.PathLike, args: dict, resume: bool) -> None:
        out = Path(out)
        self.dir = out.parent / f".{out.name}.resume"
        self.args = {k: v for k, v in args.items() if k not in IGNORED}
        saved_args = self.dir / "args.json"
        if not resume:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif saved_args.is_file():
            saved = json.loads(saved_args.read_text())
            diff = sorted(
                k for k in self.args.keys() | saved.keys() if saved.get(k) != self.args.get(k)
            )
            if diff:
                flags = ", ".join(f"--{k.replace('_', '-')}" for k in diff)
                raise ValueError(
                    f"--resume: the run in '{self.dir}' had other arguments ({flags}); "
                    "repeat its command or drop --resume"
                )

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """``(last finished block, tensors, metadata)``, or None when there is nothing to resume."""
        path = self.dir / "state.safetensors"
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["minillm"])
        return meta["done"], load_file(path), meta

    def save(self, done: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Record that blocks up to ``done`` are finished (atomic)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        args = self.dir / "args.json"
        if not args.is_file():
            args.with_suffix(".tmp").write_text(json.dumps(self.args, indent=2))
            args.with_suffix(".tmp").rename(args)
        tmp = self.dir / "state.safetensors.tmp"
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={"minillm": json.dumps({**meta, "done": done})})
        os.replace(tmp, self.dir / "state.safetensors")

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
