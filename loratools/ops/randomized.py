"""Top-k SVD of dense matrices, one or a batch of one shape (extract's ΔW, the lossy conversions).

Large matrices with a small target go through a randomised range finder (Halko, Martinsson & Tropp 2011,
algorithm 4.4): Q spans mat·Ω after ``POWER_ITERATIONS`` rounds of (mat·matᵀ), re-orthonormalised each time, and
the SVD of the small Qᵀ·mat gives the top terms. They are an orthogonal projection of ``mat``, so ‖mat‖² − Σ S² is
exactly the squared error of the truncation. Where the spectrum has a gap after k, the values equal the dense SVD's
to float32 rounding; where the kept terms reach a flat tail (noise), the smallest kept values come out low and the
energy kept a little short of the optimum (benchmarks/RESULTS.md, extract, has the measurements). Ω is one fixed
Gaussian matrix per shape (seeded): a module's result does not depend on the batch it was in, nor on the run.
Smaller matrices take LAPACK's full SVD.
"""

from __future__ import annotations

OVERSAMPLE = 16
POWER_ITERATIONS = 2
# below this side LAPACK's SVD is as fast; above it the range finder is 4-20x faster when k + 16 <= side / 4
# (640x640 at k=64: 13 ms against 98 ms; benchmarks/RESULTS.md, extract)
MIN_SIDE = 256
_SEED = 0


def randomised(shape: tuple[int, ...], k: int | None) -> bool:
    """Whether the top ``k`` terms of a matrix of ``shape`` ([..., m, n]) come from the randomised range finder."""
    side = min(shape[-2:])
    return k is not None and side > MIN_SIDE and 4 * (k + OVERSAMPLE) <= side


def top_svd(mat, k: int | None):
    """``(U, S, Vh)`` of the top ``k`` terms (all with ``k=None``) of each matrix of ``mat`` ([N, m, n]) in float32
    (float64 for float64 input): U [N, m, k], S [N, k], Vh [N, k, n]. Each matrix is scaled by a power of two
    first (exact), so any finite magnitude works; NoSVD (``index``: which matrix) for NaN or Inf, or values beyond
    the dtype."""
    import torch

    from loratools.ops.lowrank import NoSVD, _batched_svd, _exponents, _first, _times_power_of_two

    dtype = torch.float64 if mat.dtype == torch.float64 else torch.float32
    mat = mat.to(dtype)
    e, bad = _exponents(mat)
    first = _first(bad)
    if first is not None:
        raise NoSVD("its values hold NaN or Inf, which have no SVD", index=first)
    if bool((e != 0).any()):
        mat = _times_power_of_two(mat, -e)
    if randomised(mat.shape, k):
        u, s, vh = _range_finder(mat, k)
    else:
        u, s, vh = _batched_svd(mat)
        if k is not None:
            u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    s = _times_power_of_two(s, e)
    first = _first(~torch.isfinite(s).all(dim=1))
    if first is not None:
        raise NoSVD(f"its singular values exceed the range of {str(s.dtype).removeprefix('torch.')}", index=first)
    return u, s, vh


def _range_finder(mat, k: int):
    import torch

    from loratools.ops.lowrank import _batched_svd

    n = mat.shape[-1]
    g = torch.Generator(device=mat.device).manual_seed(_SEED)
    omega = torch.randn(n, k + OVERSAMPLE, generator=g, dtype=mat.dtype, device=mat.device)
    q = torch.linalg.qr(mat @ omega).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(mat @ torch.linalg.qr(mat.mT @ q).Q).Q
    u, s, vh = _batched_svd(q.mT @ mat)
    return (q @ u[..., :k]), s[..., :k], vh[..., :k, :]
