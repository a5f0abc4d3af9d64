"""Sharded safetensors in transformers' layout, written tensor by tensor and read by the index.

One shard is ``model.safetensors``; several are ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name:
file}}``), what ``from_pretrained`` reads. :class:`ShardWriter` streams each tensor's bytes to
disk as it is added (memory: one tensor), so a caller can write a model block by block; shard
file names get their final ``-of-0000n`` only in :meth:`ShardWriter.close`, so an interrupted
write never leaves a set of shards that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class _Shard:
    """One shard being written: raw data in ``<name>.data``, header composed on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.file = open(self.data_path, "wb")  # noqa: SIM115 (closed in finish)
        self.header: dict[str, dict] = {}
        self.size = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be saved as safetensors")
        data = _raw_bytes(t)
        self.file.write(data)
        self.header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.size, self.size + data.nbytes],
        }
        self.size += data.nbytes

    def finish(self) -> None:
        """Write ``path``: 8-byte header length, JSON header (padded to 8 bytes), the data."""
        self.file.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self.data_path.unlink()


class ShardWriter:
    """Write tensors into ``out_dir`` as transformers-style safetensors shards.

    ``add(name, tensor)`` appends a tensor (its bytes go to disk at once); a new shard starts
    when the current one would exceed ``max_shard_bytes``. ``close()`` names the shards
    ``model-0000k-of-0000n.safetensors`` and writes the index (one shard: ``model.safetensors``,
    no index). Use as a context manager; an exception leaves only ``.part`` files behind.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._done: list[_Shard] = []
        self._current: _Shard | None = None
        self._names: set[str] = set()
        self.paths: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor '{name}' written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        cur = self._current
        if cur is not None and cur.size > 0 and cur.size + nbytes > self.max_shard_bytes:
            cur.finish()
            self._done.append(cur)
            cur = None
        if cur is None:
            cur = self._current = _Shard(self.out_dir / f"shard-{len(self._done) + 1:05d}.part")
        cur.write(name, tensor)

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def close(self) -> list[Path]:
        """Finish the last shard, give every shard its final name, write the index."""
        if self._current is not None:
            self._current.finish()
            self._done.append(self._current)
            self._current = None
        n = len(self._done)
        if n == 0:
            raise ValueError("no tensors were written")
        if n == 1:
            names = [WEIGHTS]
        else:
            names = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        index = {"metadata": {"total_size": sum(s.size for s in self._done)}, "weight_map": {}}
        for shard, name in zip(self._done, names, strict=True):
            shard.path.rename(self.out_dir / name)
            index["weight_map"].update(dict.fromkeys(shard.header, name))
        if n > 1:
            tmp = self.out_dir / (INDEX + ".part")
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            tmp.rename(self.out_dir / INDEX)
        self.paths = [self.out_dir / name for name in names]
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._current is not None:
            self._current.file.close()


def save_sharded(
    state: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write ``state`` as shards (see :class:`ShardWriter`); returns the shard paths."""
    with ShardWriter(out_dir, max_shard_bytes) as writer:
        writer.add_all(state)
    return writer.paths


def weight_map(path: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: shard file}`` of a checkpoint directory (index, or one file).

    FileNotFoundError names the missing index, file or shard; ValueError a malformed index.
    """
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"'{index}': not a safetensors index ({err})") from None
        files = {name: path / f for name, f in mapping.items()}
        for f in dict.fromkeys(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"'{f}': shard listed in '{index}' is missing")
        return files
    single = path / WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"'{path}' has neither {WEIGHTS} nor {INDEX}")
    with open_checked(single) as f:
        return dict.fromkeys(f.keys(), single)


@contextmanager
def open_checked(path: Path, device: str = "cpu") -> Iterator:
    """``safe_open(path)``; a truncated or corrupt file is one ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"'{path}': not a valid safetensors file ({err})") from None
    with handle as f:
        yield f


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, dict]]:
    """``(offset of the data, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file
    (the file is assumed checked by :func:`open_checked`)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def read_tensor(path: str | os.PathLike, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor read with plain file I/O into fresh memory (``entry`` from :func:`read_header`).

    Unlike a memory map, nothing of the file stays mapped into the process: its resident size
    grows by the tensor alone (mapped pages count in the resident high-water mark).
    """
    t = torch.empty(entry["shape"], dtype=_TORCH_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    if buf.nbytes != end - begin:
        raise ValueError(f"'{path}': tensor size does not match its offsets")
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + begin)
        done = 0
        while done < buf.nbytes:
            n = f.readinto(buf[done:])
            if not n:
                raise ValueError(f"'{path}': file ends inside a tensor (truncated)")
            done += n
    return t


def check_shards(path: str | os.PathLike) -> None:
    """Raise the one-line error of :func:`weight_map`/:class:`open_checked` for a checkpoint
    directory with a missing, truncated or corrupt shard (headers only: nothing is read)."""
    for shard in dict.fromkeys(weight_map(path).values()):
        with open_checked(shard):
            pass


def load_sharded(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory written by :class:`ShardWriter` (or transformers)."""
    state = {}
    files = weight_map(path)
    for shard in dict.fromkeys(files.values()):
        with open_checked(shard) as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
    return state
