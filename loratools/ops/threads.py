"""Thread settings for loops over many small matrices and for pipelines of compute threads."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_matrix_threads():
    """One intra-op thread while working module by module: QRs of r-column matrices gain nothing from more
    threads, and when the cores are busy, extra BLAS threads make them many times slower."""
    return _torch_threads(1)


def compute_threads():
    """Intra-op threads for a compute thread that runs beside a reader and a writer: one core fewer than the
    machine has. Idle OpenMP threads spin for a while after each product, so with a thread on every core they
    take the cores the reader and writer need (benchmarks/RESULTS.md, bake, has the measurements)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return _torch_threads(max(1, cpus - 1))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)
