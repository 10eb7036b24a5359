"""Thread settings for loops over many small matrices."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def small_matrix_threads():
    """One intra-op thread while working module by module: QRs of r-column matrices gain nothing from more
    threads, and when the cores are busy, extra BLAS threads make them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
