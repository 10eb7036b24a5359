"""Per-module weight statistics for `inspect --stats`: ‖ΔW‖_F in factor space, effective rank, health."""

from __future__ import annotations

import math

from loratools.model import Lora, Module
from loratools.ops.lowrank import effective_rank, factor_svd


def _singular_values(module: Module):
    """Singular values of the module's unscaled ΔW, or None when they need the base weights."""
    import torch

    a = module.adapter
    if a.needs_base:
        return None
    factors = a.low_rank()
    if factors is not None:
        return factor_svd(*factors, compute_uv=False)
    if a.kind == "lokr":  # singular values of a Kronecker product are the pairwise products
        w1, w2 = a.w1().flatten(1), a.w2().flatten(1)
        s = torch.outer(torch.linalg.svdvals(w1), torch.linalg.svdvals(w2)).flatten()
        return s.sort(descending=True).values
    delta = a.delta()
    if delta is None:
        return None
    return torch.linalg.svdvals(delta.float().flatten(1) if delta.dim() > 1 else delta.float()[None])


def _finite(module: Module) -> tuple[bool, bool]:
    """(has NaN or Inf, all factors zero) over the module's alpha and its own tensors."""
    import torch

    bad, zero = module.alpha is not None and not math.isfinite(module.alpha), True
    for ref in module.adapter.tensors.values():
        t = ref.torch()
        if not t.is_floating_point():
            continue
        t = t.float()
        bad |= not bool(torch.isfinite(t).all())
        zero &= not bool(t.abs().gt(0).any())
    return bad, zero


def module_stats(lora: Lora) -> dict:
    """Per-module ‖s·ΔW‖_F, effective rank and health flags, plus a summary."""
    rows, flagged = [], {"nan_or_inf": [], "all_zero": [], "needs_base": []}
    for m in lora.modules:
        bad, zero = _finite(m)
        s = None if bad else _singular_values(m)
        row = {"name": m.name, "component": m.component, "type": m.adapter.label, "norm": None,
               "effective_rank": None, "top_singular_value": None, "flags": []}
        if bad:
            row["flags"].append("nan_or_inf")
            flagged["nan_or_inf"].append(m.name)
        elif zero:
            row["flags"].append("all_zero")
            flagged["all_zero"].append(m.name)
        if s is None and not bad:
            row["flags"].append("needs_base")
            flagged["needs_base"].append(m.name)
        elif s is not None:
            scale = abs(m.scale)
            row["norm"] = float(s.double().pow(2).sum().sqrt()) * scale
            row["effective_rank"] = round(effective_rank(s), 3)
            row["top_singular_value"] = float(s[0]) * scale if s.numel() else 0.0
        rows.append(row)
    norms = [r["norm"] for r in rows if r["norm"] is not None and math.isfinite(r["norm"])]
    return {
        "modules": rows,
        "summary": {
            "total_norm": math.sqrt(sum(n * n for n in norms)) if norms else None,
            "max_norm": max(norms) if norms else None,
            "mean_norm": sum(norms) / len(norms) if norms else None,
            **{k: len(v) for k, v in flagged.items()},
        },
    }
