"""Exact SVD of a low-rank product B @ A without forming it.

With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), B @ A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the singular values of
the m×n product are those of the small r×r core: O((m+n)·r²) instead of O(m·n·min(m, n)).
"""

from __future__ import annotations


def factor_svd(up, down, compute_uv: bool = True):
    """SVD of ``up @ down`` (2-D float tensors [m, r] and [r, n]) from its factors.

    Returns ``(U, S, Vh)`` with U [m, k], S [k], Vh [k, n], k = min(r, m, n); only ``S`` when
    ``compute_uv`` is False. Computed in float64 when the inputs are float64, else float32.
    """
    import torch

    dtype = torch.float64 if up.dtype == torch.float64 else torch.float32
    up, down = up.to(dtype), down.to(dtype)
    q_b, r_b = torch.linalg.qr(up)
    q_a, r_a = torch.linalg.qr(down.T)
    core = r_b @ r_a.T
    if not compute_uv:
        return torch.linalg.svdvals(core)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_c, s, vh_c @ q_a.T


def effective_rank(s) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    import torch

    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
