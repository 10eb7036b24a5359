"""Per-module weight statistics for `inspect --stats`: ‖ΔW‖_F in factor space, effective rank, health."""

from __future__ import annotations

import math

from loratools.model import Lora, Module
from loratools.ops.lowrank import NoSVD, effective_rank, factor_svd, svd


def _singular_values(module: Module):
    """Singular values of the module's unscaled ΔW (None when they need the base weights), and whether they come
    from low-rank factors (the spectrum resize works on)."""
    a = module.adapter
    if a.needs_base:
        return None, False
    factors = a.low_rank()
    if factors is not None:
        return factor_svd(*factors, compute_uv=False), True
    s = a.singular_values()
    if s is not None:
        return s, False
    delta = a.delta()
    if delta is None:
        return None, False
    return svd(delta.float().flatten(1) if delta.dim() > 1 else delta.float()[None])[1], False


def _finite(module: Module) -> tuple[bool, bool]:
    """(has NaN or Inf, all factors zero) over the module's alpha, its own tensors and its DoRA magnitude."""
    import torch

    bad, zero = module.alpha is not None and not math.isfinite(module.alpha), True
    tensors = [(ref, True) for ref in module.adapter.tensors.values()]
    if module.magnitude is not None:  # a DoRA magnitude is no factor: zeros there do not make ΔW zero
        tensors.append((module.magnitude, False))
    for ref, factor in tensors:
        t = ref.torch()
        if not t.is_floating_point():
            continue
        t = t.float()
        bad |= not bool(torch.isfinite(t).all())
        if factor:
            zero &= not bool(t.abs().gt(0).any())
    return bad, zero


def _number(x: float) -> float | None:
    """A finite number, or None (JSON has no Infinity): a norm beyond float64 is not a number to report."""
    return x if math.isfinite(x) else None


def module_stats(lora: Lora, spectra: list | None = None) -> dict:
    """Per-module ‖s·ΔW‖_F, effective rank and health flags, plus a summary. Never raises on the numbers: a
    module holding NaN or Inf, or whose ΔW overflows (no SVD), is flagged ``nan_or_inf`` and has no norm.
    ``spectra``: a list that gets each module's singular values from its low-rank factors (None for the rest), so
    a caller that draws them does not decompose every module a second time."""
    from loratools.ops.threads import small_matrix_threads

    with small_matrix_threads():  # module by module, small factor-space SVDs
        return _module_stats(lora, spectra)


def _module_stats(lora: Lora, spectra: list | None) -> dict:
    rows, flagged = [], {"nan_or_inf": [], "all_zero": [], "needs_base": []}
    for m in lora.modules:
        bad, zero = _finite(m)
        s, factored = None, False
        if not bad:
            try:
                s, factored = _singular_values(m)
            except NoSVD:  # finite factors whose product overflows float32
                bad = True
        if spectra is not None:
            spectra.append(s if factored and not bad else None)
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
            row["norm"] = _number(float(s.double().pow(2).sum().sqrt()) * scale)
            row["effective_rank"] = round(effective_rank(s), 3)
            row["top_singular_value"] = _number(float(s[0]) * scale if s.numel() else 0.0)
        rows.append(row)
    norms = [r["norm"] for r in rows if r["norm"] is not None and math.isfinite(r["norm"])]
    return {
        "modules": rows,
        "summary": {
            "total_norm": _number(math.hypot(*norms)) if norms else None,
            "max_norm": max(norms) if norms else None,
            "mean_norm": sum(norms) / len(norms) if norms else None,
            **{k: len(v) for k, v in flagged.items()},
        },
    }
