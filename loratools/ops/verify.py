"""Comparing the effective ΔW of two LoRA files of any formats, module by module, in factor space.

Both files are brought to canonical identities (native module path + part). For each adapted weight the
difference ΔW_a − ΔW_b = [B_a, −B_b] @ [A_a; A_b] is itself low-rank, so its Frobenius norm comes from a QR
of the stacked factors (float64) — no dense matrix larger than the factors is formed for LoRA modules.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from loratools.families import Family, get_family
from loratools.families.naming import NATIVE
from loratools.model import Lora
from loratools.ops.canonical import canonicalize, swap_halves


@dataclass
class VerifyResult:
    a: str
    b: str
    family: str
    rtol: float
    compared: int
    max_rel_error: float
    equal: bool
    modules: list[dict] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)


def _pieces(lora: Lora, family: Family) -> dict[tuple[str, str], list]:
    """(space, native) -> [(up_scaled [rows, r] placed at its row offset, down [r, n], total rows) or dense]."""
    out = defaultdict(list)
    for m, c in canonicalize(lora, family, lora_only=False):
        a = m.adapter
        if a.needs_base:
            from loratools.errors import UsageError

            raise UsageError(f"{m.name}: a {a.label} module's ΔW depends on the base weights; verify compares "
                             "LoRA files on their own", lora.path)
        factors = a.low_rank()
        if factors is not None:
            up, down = factors[0].double() * m.scale, factors[1].double()
        else:
            up, down = m.delta().double().flatten(1), None
        rule = family.naming.rule(c.space, c.native)
        if rule.swaps(c.naming, NATIVE, up.shape[0], a.in_dim or 0):
            up = swap_halves(up)
        if m.magnitude is not None:
            out[(c.space, c.native, "magnitude")].append(m.magnitude.torch().double().reshape(-1))
        out[(c.space, c.native)].append((up, down, c.part.index if c.part else None, rule, a.in_dim))
    return out


def _layout(pieces) -> tuple[list[int], int]:
    """Row offset of each part and the total rows of one native weight, from the pieces of both files: a whole
    (fused) piece gives the exact split; otherwise the parts seen give their own rows (a shared-size part that
    neither file has gets none: it is zero in both)."""
    whole = next((p for p in pieces if p[2] is None), None)
    _, _, _, rule, in_dim = pieces[0]
    if not rule.fused:
        return [0], whole[0].shape[0]
    if whole is not None:
        bounds = rule.bounds(in_dim, whole[0].shape[0], rule.native)
        return [lo for lo, _ in bounds], bounds[-1][1]
    rows = [r or 0 for r in rule.part_rows(in_dim, {p[2]: p[0].shape[0] for p in pieces})]
    return [sum(rows[:k]) for k in range(len(rows))], sum(rows)


def _as_factors(pieces, offsets: list[int], rows: int):
    """Stack pieces into one (B, A) pair of ΔW (dense pieces become B = ΔW, A = I)."""
    import torch

    ups, downs = [], []
    for up, down, part, _, _ in pieces:
        offset = offsets[part] if part is not None else 0
        if down is None:
            down = torch.eye(up.shape[1], dtype=up.dtype)
        placed = torch.zeros(rows, up.shape[1], dtype=up.dtype)
        placed[offset: offset + up.shape[0]] = up
        ups.append(placed)
        downs.append(down)
    cols = {d.shape[1] for d in downs}
    if len(cols) != 1:
        return None
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _norm(up, down) -> float:
    """‖up @ down‖_F from the R factors of thin QRs (no Gram matrix: keeps tiny differences accurate)."""
    import torch

    if up.numel() == 0:
        return 0.0
    r_b = torch.linalg.qr(up, mode="r").R
    r_a = torch.linalg.qr(down.T, mode="r").R
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def verify(a: Lora, b: Lora, *, rtol: float = 1e-5, family: str | None = None) -> VerifyResult:
    from loratools.ops.threads import small_matrix_threads

    with small_matrix_threads():
        return _verify(a, b, rtol, family)


def _verify(a: Lora, b: Lora, rtol: float, family: str | None) -> VerifyResult:
    """Compared in the family's tables; for an undecided family, in every candidate's, which must agree."""
    from loratools.errors import LoraToolsError, UnknownFamily
    from loratools.ops.convert import family_of

    try:
        return _compare(a, b, rtol, get_family(family_of(a, family)))
    except UnknownFamily as undecided:
        results = []
        for fid in getattr(a.family, "candidates", None) or []:
            try:
                results.append(_compare(a, b, rtol, get_family(fid)))
            except LoraToolsError:
                continue
        verdicts = {(r.equal, r.compared, tuple(r.only_in_a), tuple(r.only_in_b)) for r in results}
        if len(verdicts) != 1:
            raise undecided from None
        return results[0]


def _compare(a: Lora, b: Lora, rtol: float, fam: Family) -> VerifyResult:
    fid = fam.id
    pa, pb = _pieces(a, fam), _pieces(b, fam)
    rows_out, worst = [], 0.0
    for key in sorted(set(pa) & set(pb), key=str):
        if len(key) == 3:  # DoRA magnitudes compare directly
            x, y = pa[key][0], pb[key][0]
            err = float((x - y).norm() / max(float(y.norm()), float(x.norm()), 1e-30)) if x.shape == y.shape else 1.0
        else:
            offsets, rows = _layout(pa[key] + pb[key])
            fa, fb = _as_factors(pa[key], offsets, rows), _as_factors(pb[key], offsets, rows)
            if fa is None or fb is None or fa[1].shape[1] != fb[1].shape[1]:
                err = float("inf")
            else:
                import torch

                diff = _norm(torch.cat([fa[0], -fb[0]], dim=1), torch.cat([fa[1], fb[1]], dim=0))
                scale = max(_norm(*fa), _norm(*fb))
                err = 0.0 if diff == 0 else diff / scale if scale > 0 else float("inf")
        if err != err:  # NaN (a NaN or Inf in either file): no number says they are the same
            err = float("inf")
        worst = max(worst, err)
        rows_out.append({"target": f"{key[0]}:{key[1]}" + (" (DoRA magnitude)" if len(key) == 3 else ""),
                         "rel_error": err})
    only_a = sorted(f"{k[0]}:{k[1]}" for k in set(pa) - set(pb) if len(k) == 2)
    only_b = sorted(f"{k[0]}:{k[1]}" for k in set(pb) - set(pa) if len(k) == 2)
    equal = worst <= rtol and not only_a and not only_b
    return VerifyResult(a.path, b.path, fid, rtol, len(rows_out), worst, equal, rows_out, only_a, only_b)
