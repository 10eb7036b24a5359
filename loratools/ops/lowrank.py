"""Exact SVD of a low-rank product B @ A without forming it, dense SVD for the lossy paths, and rank selection.

With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), B @ A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the singular values of
the m×n product are those of the small r×r core: O((m+n)·r²) instead of O(m·n·min(m, n)).
Truncating that SVD to k terms is the best rank-k approximation of B @ A (Eckart–Young), so rank
reduction and SVD merging never need the dense ΔW. Q_B and Q_A stay as Householder reflectors: only the k
columns kept are ever built, which costs O((m+n)·r·k) rather than forming two full Q's.
"""

from __future__ import annotations

import contextlib
import math
import numbers

from loratools.errors import FormatError, UsageError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")

# A threshold that a cumulative sum meets exactly in real arithmetic must not be missed by one rounding
# step of the sum (that would keep one more singular value than the definition says).
_SLACK = 1e-12

# Factors whose largest value lies outside [2**-30, 2**30] are scaled into it first (by a power of two: exact), so
# that the core product R_B R_Aᵀ neither overflows nor loses its small values; others are taken as they are.
_UNIT_EXPONENTS = (-30, 30)


class NoSVD(FormatError):
    """Values whose SVD is not defined (NaN or Inf), does not converge, or does not fit the compute dtype.
    ``index``: which module of a batch (0 for one module)."""

    def __init__(self, message: str, path=None, index: int = 0):
        super().__init__(message, path)
        self.index = index


@contextlib.contextmanager
def svd_of(name: str, path=None):
    """Name the module (and its file) in a NoSVD raised within."""
    try:
        yield
    except NoSVD as e:
        raise NoSVD(f"module {name}: {e.message}", path if path is not None else e.path) from None


def _check_finite(*tensors) -> None:
    import torch

    for t in tensors:  # min and max in one pass, no temporaries: a NaN makes both NaN, an Inf is one of them
        if t.numel() and not all(math.isfinite(v.item()) for v in torch.aminmax(t)):
            raise NoSVD("its values hold NaN or Inf, which have no SVD")


def _unit(t):
    """``(t / c, c)`` with ``c`` a power of two that brings the largest magnitude near 1, or ``(t, 1.0)`` when it
    is already within ``_UNIT_EXPONENTS``."""
    import torch

    if not t.numel():
        return t, 1.0
    lo, hi = torch.aminmax(t)  # one pass, no |t| copy
    peak = max(-lo.item(), hi.item())
    e = math.frexp(peak)[1]
    if peak == 0.0 or _UNIT_EXPONENTS[0] <= e <= _UNIT_EXPONENTS[1]:
        return t, 1.0
    return t * math.ldexp(1.0, -e), math.ldexp(1.0, e)


def _scaled_values(s, c: float):
    """Singular values ``s`` of a matrix divided by ``c``, as the matrix's own; NoSVD when they overflow."""
    import torch

    if c != 1.0:
        s = s * c
    if not bool(torch.isfinite(s).all()):
        raise NoSVD(f"its singular values exceed the range of {str(s.dtype).removeprefix('torch.')}")
    return s


def svd(mat):
    """``torch.linalg.svd(mat, full_matrices=False)`` for a finite matrix of any magnitude; NoSVD otherwise."""
    import torch

    _check_finite(mat)
    unit, c = _unit(mat)
    try:
        u, s, vh = torch.linalg.svd(unit, full_matrices=False)
    except torch.linalg.LinAlgError:
        raise NoSVD("its SVD does not converge") from None
    return u, _scaled_values(s, c), vh


def _exponents(x):
    """Per module of the batch ``x`` [N, ...]: the power of two (int) that ``_UNIT_EXPONENTS`` asks to divide it
    by (0 for most), and whether it holds NaN or Inf (a NaN makes the min and the max NaN, an Inf is one of
    them), from each module's min and max alone."""
    import torch

    if not x[0].numel():
        zero = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        return zero, zero.bool()
    flat = x.flatten(1)  # amin and amax: aminmax along a dim is ~20x slower than both (torch 2.13, CPU)
    peak = torch.maximum(-flat.amin(1), flat.amax(1))
    e = torch.frexp(peak).exponent
    inside = (peak == 0) | ((e >= _UNIT_EXPONENTS[0]) & (e <= _UNIT_EXPONENTS[1]))
    return torch.where(inside, 0, e), ~torch.isfinite(peak)


def _first(bad) -> int | None:
    """The index of the first True of a bool vector, None when there is none (one transfer)."""
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _times_power_of_two(x, e):
    """``x * 2**e`` per module (``e`` [N] int), exact: in two halves, so that neither factor overflows."""
    import torch

    half = torch.div(e, 2, rounding_mode="floor")
    shape = (-1,) + (1,) * (x.dim() - 1)
    ones = torch.ones(e.shape, dtype=x.dtype, device=x.device)
    return x * torch.ldexp(ones, half).view(shape) * torch.ldexp(ones, e - half).view(shape)


def _batched_svd(core):
    """Thin SVD of every matrix of ``core``; NoSVD with the index of one that does not converge."""
    import torch

    try:
        return torch.linalg.svd(core, full_matrices=False)
    except torch.linalg.LinAlgError:
        for i in range(core.shape[0]):
            try:
                torch.linalg.svd(core[i], full_matrices=False)
            except torch.linalg.LinAlgError:
                raise NoSVD("its SVD does not converge", index=i) from None
        raise NoSVD("its SVD does not converge") from None


class FactorSVD:
    """The SVD of ``up @ down`` kept in factored form, for one module (``up`` [m, r], ``down`` [r, n]) or a batch
    of modules of one shape (``up`` [N, m, r], ``down`` [N, r, n]: each step is one batched call).

    The R factors of the QRs of both factors give the small core R_B R_Aᵀ, whose SVD U_c S V_cᵀ gives ``s``, the
    whole spectrum ([q] or [N, q], q = min(m, n, r)). :meth:`top` builds the top k terms from the inputs and that
    SVD alone: U_k = B R_Aᵀ V_c,k S_k⁻¹ and V_kᵀ = S_k⁻¹ U_c,kᵀ R_B A, two products by r×k matrices (no Q is
    applied). A module of a batch whose values have no SVD raises NoSVD with its position as ``index``.
    ``keep_q`` keeps the Householder reflectors for :meth:`left` and :meth:`right` (whole U and V).
    """

    def __init__(self, up, down, keep_q: bool = False):
        import torch

        dtype = torch.float64 if up.dtype == torch.float64 else torch.float32
        self.batched = up.dim() == 3
        if not self.batched:
            up, down = up[None], down[None]
        up, down = up.to(dtype), down.to(dtype)
        # power-of-two scales (exact) bring each factor's peak near 1: the core neither overflows nor loses its
        # small values; they come back in ``s`` and in :meth:`top`
        (e_up, bad_up), (e_down, bad_down) = _exponents(up), _exponents(down)
        first = _first(bad_up | bad_down)
        if first is not None:
            raise NoSVD("its values hold NaN or Inf, which have no SVD", index=first)
        if bool((e_up != 0).any()):
            up = _times_power_of_two(up, -e_up)
        if bool((e_down != 0).any()):
            down = _times_power_of_two(down, -e_down)
        self._up, self._down, self._e = up, down, e_up + e_down
        b, a = torch.geqrf(up), torch.geqrf(down.mT)  # up = Q_B R_B, downᵀ = Q_A R_A
        m, r, n = up.shape[1], up.shape[2], down.shape[2]
        # R is the upper triangle of geqrf's column-major output: tril of its transpose reads it in order (3x faster)
        self._rb, self._ra = b[0][:, : min(m, r)].mT.tril().mT, a[0][:, : min(n, r)].mT.tril().mT
        self._qr = (b, a) if keep_q else None
        self._u, s, self._vh = _batched_svd(self._rb @ self._ra.mT)
        self._s_unit = s
        s = _times_power_of_two(s, self._e)
        first = _first(~torch.isfinite(s).all(dim=1))
        if first is not None:
            raise NoSVD(f"its singular values exceed the range of {str(s.dtype).removeprefix('torch.')}",
                        index=first)
        self._s = s
        self.s = s if self.batched else s[0]

    def top(self, k: int):
        """``(B', A')`` of the top ``k`` terms, B' = U√S and A' = √S·Vᵀ: balanced, so fp16/bf16 storage keeps
        its range; B'·A' is the best rank-k approximation of ``up @ down`` (Eckart–Young). A term whose singular
        value the core's rounding cannot tell from zero (below ε·‖R_B‖·‖R_A‖) comes out as zeros: dividing by
        it would only magnify that rounding."""
        import torch

        s = self._s_unit[:, :k]
        floor = torch.finfo(s.dtype).eps * (torch.linalg.matrix_norm(self._rb) * torch.linalg.matrix_norm(self._ra))
        kept = s > floor[:, None]
        w = torch.where(kept, self._s[:, :k].clamp_min(0).sqrt() / torch.where(kept, s, 1), 0)  # √S_k·S_k⁻¹
        y = self._ra.mT @ (self._vh[:, :k].mT * w[:, None, :])  # R_Aᵀ V_c,k S_k⁻¹ √S_k: [N, r, k]
        z = (self._u[:, :, :k] * w[:, None, :]).mT @ self._rb  # √S_k S_k⁻¹ U_c,kᵀ R_B: [N, k, r]
        left, right = self._up @ y, z @ self._down
        return (left, right) if self.batched else (left[0], right[0])

    @staticmethod
    def _apply_q(qr, small):
        """Q @ [small; 0] without forming Q: O(rows·r·k) instead of O(rows·r²) for Q itself."""
        import torch

        reflectors, tau = qr
        padded = small.new_zeros(*small.shape[:-2], reflectors.shape[-2], small.shape[-1])
        padded[..., : small.shape[-2], :] = small
        return torch.ormqr(reflectors, tau, padded)

    def _whole(self, qr, small):
        if self._qr is None:
            raise ValueError("FactorSVD(keep_q=True) keeps the reflectors that left() and right() apply")
        out = self._apply_q(qr, small if self.batched else small[None])
        return out if self.batched else out[0]

    def left(self, small):
        """Q_B @ [small; 0] (U = left(U_c)), without the power-of-two scale of ``up``."""
        return self._whole(self._qr[0] if self._qr else None, small)

    def right(self, small):
        """Q_A @ [small; 0] (V = right(V_c))."""
        return self._whole(self._qr[1] if self._qr else None, small)

    @property
    def core_u(self):
        return self._u if self.batched else self._u[0]

    @property
    def core_vh(self):
        return self._vh if self.batched else self._vh[0]


def factor_svd(up, down, compute_uv: bool = True):
    """SVD of ``up @ down`` (2-D float tensors [m, r] and [r, n]) from its factors.

    Returns ``(U, S, Vh)`` with U [m, k], S [k], Vh [k, n], k = min(r, m, n); only ``S`` when
    ``compute_uv`` is False. Computed in float64 when the inputs are float64, else float32.
    """
    svd = FactorSVD(up, down, keep_q=compute_uv)
    if not compute_uv:
        return svd.s
    return svd.left(svd.core_u), svd.s, svd.right(svd.core_vh.mT).mT


def effective_rank(s) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    import torch

    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def resolve_device(device: object = "auto"):
    """``"auto"`` (CUDA when torch sees one, else CPU), ``"cpu"`` or ``"cuda[:N]"`` as a torch.device."""
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("CUDA was requested but torch sees no CUDA device")
        return torch.device(name)
    raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")


def compute_dtype(*tensors):
    """float64 when an input is float64 (exact tests), else float32 whatever the storage (fp16 SVD is unstable)."""
    import torch

    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dense_svd(mat, k: int | None = None):
    """Thin SVD of a dense 2-D matrix, cut to its top ``k`` terms when ``k`` is given (ops/randomized.py: large
    matrices with a small target use a randomised range finder; the top-k terms it returns are still an orthogonal
    projection of ``mat``, so ‖mat‖² − Σ S² is exactly the squared error of the truncation)."""
    from loratools.ops.randomized import top_svd

    u, s, vh = top_svd(mat[None], k)
    return u[0], s[0], vh[0]


def split_factors(u, s, vh, k: int):
    """New factors B = U√S, A = √S·Vᵀ of the top ``k`` terms (balanced, so fp16/bf16 storage keeps its range)."""
    root = s[:k].clamp_min(0).sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def _floats(s) -> list[float]:
    """Singular values as Python floats: from a list, or from a 1-D tensor in one transfer."""
    return [float(x) for x in s] if isinstance(s, (list, tuple)) else s.double().cpu().tolist()


def truncation(s, k: int, total: float | None = None, residual: float = 0.0) -> tuple[float, float]:
    """(retained fraction of ‖ΔW‖², relative Frobenius error) when the top ``k`` of ``s`` are kept.

    ``s`` may be only the top of the spectrum of ΔW (a lossy conversion): then ``total`` is ‖ΔW‖² and
    ``residual`` the squared error already made, orthogonal to what ``s`` describes, so errors add in squares.
    """
    values = _floats(s)
    c = max(values, default=0.0)  # squares taken relative to the largest: finite for any finite s
    c = c if 0 < c < math.inf else 1.0
    sq = [(x / c) ** 2 for x in values]
    kept = math.fsum(sq[:k])
    dropped = math.fsum(sq[k:]) + residual / c / c
    whole = kept + dropped if total is None else total / c / c
    if whole <= 0:
        return 1.0, 0.0
    return min(kept / whole, 1.0), math.sqrt(min(dropped / whole, 1.0))


def parse_dynamic(text: object) -> tuple[str, float]:
    """``"sv_fro:0.9"`` -> ``("sv_fro", 0.9)``, checked; a ``(method, value)`` pair is checked too."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        method, raw = str(text[0]), text[1]
    else:
        method, sep, raw = str(text).partition(":")
        if not sep:
            raise UsageError(f"dynamic rank must be METHOD:VALUE (sv_ratio, sv_fro or sv_cumulative), got {text!r}")
    method = method.strip()
    if method not in DYNAMIC_METHODS:
        raise UsageError(f"unknown dynamic method {method!r}: use sv_ratio, sv_fro or sv_cumulative")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{method} needs a number, got {raw!r}") from None
    if method == "sv_ratio":
        if not (math.isfinite(value) and value > 1):
            raise UsageError(f"sv_ratio needs a value above 1 (largest/smallest kept singular value), got {raw}")
    elif not (0 < value <= 1):
        raise UsageError(f"{method} needs a value in (0, 1], got {raw}")
    return method, value


def check_rank(value: object, what: str = "rank") -> int | None:
    """A positive integer rank option, or None when not given."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def select_rank(s, *, rank: int | None = None, dynamic: tuple[str, float] | None = None,
                max_rank: int | None = None) -> int:
    """How many of the descending singular values ``s`` to keep: ``rank``, or the dynamic rule, capped.

    The dynamic rules keep the smallest k their definition allows (sd-scripts keeps one more):
    ``sv_ratio`` keeps σᵢ ≥ σ₁/V; ``sv_fro`` the smallest k with Σᵢ≤k σᵢ²/Σσ² ≥ V; ``sv_cumulative`` the
    smallest k with Σᵢ≤k σᵢ/Σσ ≥ V. The result is at least 1 and at most len(s).
    """
    vals = _floats(s)
    if not vals:
        return 1
    k = len(vals) if rank is None else rank
    if dynamic is not None:
        k = _dynamic_k(vals, *dynamic)
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, len(vals)))


def _dynamic_k(vals: list[float], method: str, value: float) -> int:
    if vals[0] <= 0:
        return 1  # a zero ΔW: one (zero) term keeps the module present
    if method == "sv_ratio":
        # σᵢ·V ≥ σ₁ rather than σᵢ ≥ σ₁/V: no division rounding at the boundary
        return sum(1 for v in vals if v * value >= vals[0] * (1 - _SLACK))
    terms = [v * v for v in vals] if method == "sv_fro" else vals
    goal = value * math.fsum(terms) * (1 - _SLACK)
    acc = 0.0
    for i, t in enumerate(terms):
        acc += t
        if acc >= goal:
            return i + 1
    return len(terms)
