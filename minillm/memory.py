"""Wall time and peak memory per phase of a run.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (bytes), reset at each phase. On
CPU it is the process's resident high-water mark (VmHWM, bytes), reset at each phase by
writing 5 to ``/proc/self/clear_refs``; where that is not possible it is the peak since
the process started (``ru_maxrss``), which the report marks with ``cpu_peak_resettable``.
"""

from __future__ import annotations

import ctypes
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def unmap_freed_blocks() -> None:
    """Have glibc map every block of 128 KiB or more on its own and unmap it when freed.

    Its default threshold adapts upwards to 32 MiB after the first such block is freed, so
    later temporaries of up to tens of MiB (a linear's output, a slab of a Gram matrix) land on
    the heap beside small long-lived tensors (statistics), and freed heap below those is never
    returned: measured on SmolLM2, the statistics pass alone grew the resident size by 1.1 GiB.
    With the threshold fixed a run peaks at what it holds. The cost is a page fault per fresh
    page of such blocks. A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed blocks at the heap's top)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseMeter:
    """Records ``time_s`` and ``peak_memory_bytes`` for named phases; see module docstring."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.time_s: dict[str, float] = {}
        self.peak_memory_bytes: dict[str, int] = {}
        self.cpu_peak_resettable = True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.cpu_peak_resettable &= _reset_cpu_peak()
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _cpu_peak_bytes()
        self.time_s[name] = time.perf_counter() - start
        self.peak_memory_bytes[name] = peak

    def summary(self) -> dict:
        """Per-phase figures plus ``total`` (sum of times, max of peaks)."""
        return {
            "time_s": {**self.time_s, "total": sum(self.time_s.values())},
            "peak_memory_bytes": {
                **self.peak_memory_bytes,
                "total": max(self.peak_memory_bytes.values(), default=0),
            },
            "cpu_peak_resettable": self.cpu_peak_resettable,
        }
