"""Peak memory of a stage: CUDA's allocator peak on a GPU, the process's sampled resident set size on the CPU."""

from __future__ import annotations

import os
import threading
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float | None:
    """Resident set size of this process in MiB, from ``/proc/self/statm`` (None where there is no procfs)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager measuring the peak memory of the code it wraps.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset (``kind = "cuda_allocated"``). On the CPU: the
    largest resident set size seen by a sampling thread (every ``interval`` s) and at entry/exit
    (``kind = "cpu_rss_sampled"``): the whole process, so the model weights the stage holds are included; a
    spike shorter than the interval can be missed. ``peak_mb`` is None where neither is available.

    Args:
        interval: seconds between RSS samples (CPU kind).
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``: force the CPU kind for code that runs
            on the CPU in a process that also sees a GPU (e.g. streaming retrieval over a sketch cache).
    """

    def __init__(self, interval: float = 0.05, device: str = "auto") -> None:
        self.interval = interval
        self.peak_mb: float | None = None
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        self.kind = "cuda_allocated" if use_cuda else "cpu_rss_sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        v = rss_mb()
        if v is not None and (self.peak_mb is None or v > self.peak_mb):
            self.peak_mb = v

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.kind == "cuda_allocated":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._sample()
