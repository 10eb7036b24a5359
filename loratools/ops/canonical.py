"""Bringing a LoRA to canonical identities, and re-planning its modules for another naming.

``canonicalize`` looks every module up in the family's naming table. ``plan`` turns canonical modules
into output modules for a target naming: 1:1 renames, splitting a fused native weight into its diffusers
parts (copy A, slice B's rows), or fusing parts into the native weight (A stacked along rank, B
block-diagonal, each part's scale folded into its block) — all exact.
"""

from __future__ import annotations

from collections import defaultdict

from loratools.errors import FormatError, UsageError
from loratools.families import Family
from loratools.families.naming import DIFFUSERS, NATIVE, Canon
from loratools.formats import get_codec
from loratools.model import Lora, Module, OutModule, Rows

MODEL_COMPONENTS = ("unet", "transformer", "model")


def _spaces(lora: Lora, family: Family) -> dict[str, str]:
    """Component -> naming space: 'model' or the encoder id of each text-encoder component."""
    kinds = family.encoder_spaces(lora.format, ((m.component, m.name, m.adapter.in_dim) for m in lora.modules))
    return {**kinds, **{c: "model" for c in MODEL_COMPONENTS}}


def _flat(fmt: str) -> bool:
    try:
        return get_codec(fmt).flat
    except KeyError:
        return False


def canonicalize(lora: Lora, family: Family, lora_only: bool = True) -> list[tuple[Module, Canon]]:
    """Each module with its canonical identity; FormatError listing the modules the family's tables lack."""
    bad_types = sorted({m.adapter.label for m in lora.modules if not m.adapter.exact_lora})
    if bad_types and lora_only:
        raise FormatError(f"cannot convert {', '.join(bad_types)} modules exactly to LoRA; only LoRA/LoCon "
                          "files convert exactly (LoHa, LoKr and full-diff modules convert with --lossy-rank N, a "
                          "lossy SVD that is reported)", lora.path)
    spaces = _spaces(lora, family)
    # text-encoder modules keep transformers names in every format: only the denoiser needs the family's rules
    if not family.has_naming and any(spaces.get(m.component) == "model" for m in lora.modules):
        raise FormatError(f"loratools has no naming tables for {family.name} ({family.id}) yet: it can inspect "
                          "these files but not rename them", lora.path)
    table = family.naming
    flat = _flat(lora.format)
    out, unmatched, seen = [], [], {}
    for m in lora.modules:
        space = spaces.get(m.component)
        canon = None
        if space:  # kohya names are flat; a name in a mixed file is looked up as it is, then flattened (Wan-Fun
            # files write `lora_unet__blocks_0_…`: a leading underscore too many)
            canon = table.resolve(space, m.name, flat and "." not in m.name) or (
                table.resolve(space, m.name.replace(".", "_").lstrip("_"), True))
        if canon is None:
            unmatched.append(f"{m.component}:{m.name}")
            continue
        key = (canon.space, canon.native, canon.part)
        if key in seen:
            raise FormatError(f"modules '{seen[key]}' and '{m.name}' both adapt {canon.native}"
                              + (f" part {canon.part.index}" if canon.part else "") + " (conflicting keys)",
                              lora.path)
        seen[key] = m.name
        m.target, m.part = f"{canon.space}:{canon.native}", canon.part
        m.halves_swapped = table.rule(canon.space, canon.native).swaps(canon.naming, NATIVE, m.adapter.out_dim or 0,
                                                                       m.adapter.in_dim or 0)
        out.append((m, canon))
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f" and {len(unmatched) - 20} more" if len(unmatched) > 20 else "")
        raise FormatError(f"{len(unmatched)} modules are not in the {family.id} tables: {shown} — is the "
                          f"family right? (detected {lora.family.id if lora.family else '?'}; --family overrides)",
                          lora.path)
    return out


def _factors(m: Module):
    """The module's factors in their storage dtype (renames and splits need no arithmetic)."""
    a = m.adapter
    mid = a.t("lora_mid").torch() if a.has("lora_mid") else None
    return a.up.torch(), a.down.torch(), mid


def swap_halves(up):
    """The two row halves of ``up`` traded (shift/scale order of adaLN modulations differs between namings)."""
    import torch

    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def plan(pairs: list[tuple[Module, Canon]], family: Family, target_naming: str) -> list[OutModule]:
    """Output modules for ``target_naming`` (native or diffusers) in source order."""
    groups: dict[tuple[str, str], list[tuple[Module, Canon]]] = defaultdict(list)
    for m, c in pairs:
        groups[(c.space, c.native)].append((m, c))
    table = family.naming
    out: list[OutModule] = []
    for (space, native), members in groups.items():
        rule = table.rule(space, native)
        naming = target_naming if space == "model" else NATIVE
        whole = [mc for mc in members if mc[1].part is None]
        if whole:
            m, c = whole[0]
            if rule.fused and naming == DIFFUSERS:
                out += _split(m, c, rule)
            else:
                out.append(_rename(m, c, rule, naming))
        elif naming == NATIVE or not rule.fused:
            out.append(_fuse(members, rule))
        else:
            out += [_rename(m, c, rule, naming) for m, c in members]
    return out


def _dora(m: Module):
    if m.magnitude is None:
        return None, None
    ref = m.magnitude
    return (lambda: ref.torch().float()), m.dora_axis


def _rename(m: Module, c: Canon, rule, naming: str) -> OutModule:
    a = m.adapter
    if c.part is not None:
        name = rule.diffusers[c.part.index]
    else:
        name = rule.native if naming == NATIVE else rule.diffusers[0]
    swap = rule.swaps(c.naming, naming, a.out_dim or 0, a.in_dim or 0)
    if swap and (m.magnitude is not None or a.has("lora_up_bias") or a.has("diff_b")):
        raise UsageError(f"{m.name}: swapping shift/scale halves of a DoRA or bias module is not supported")

    def factors():
        up, down, mid = _factors(m)
        return (swap_halves(up) if swap else up), down, mid

    magnitude, axis = _dora(m)
    mid = a.t("lora_mid").shape if a.has("lora_mid") else None
    raw = (Rows(a.up, 0, a.up.shape[0], swap), Rows(a.down, 0, a.down.shape[0]),
           Rows(a.t("lora_mid"), 0, mid[0]) if mid else None)
    return OutModule(c.space, c.native, name, factors, m.rank, m.scale, a.up.dtype, magnitude, axis,
                     _bias(m), [m.name], (a.up.shape, a.down.shape, mid), raw,
                     m.alpha_ref if m.alpha is not None and m.scale * m.rank == m.alpha else None)


def _bias(m: Module):
    a = m.adapter
    if a.has("diff_b"):
        ref = a.t("diff_b")
        return lambda: ref.torch().float()
    if a.has("lora_up_bias"):  # PEFT scales lora_B.bias like the product
        ref, s = a.t("lora_up_bias"), m.scale
        return lambda: ref.torch().float() * s
    return None


def _plain(m: Module, what: str) -> None:
    if m.magnitude is not None or m.adapter.has("lora_mid") or _bias(m) is not None:
        raise UsageError(f"{m.name}: {what} a DoRA, Tucker or bias module is not supported")


def _split(m: Module, c: Canon, rule) -> list[OutModule]:
    """A fused native LoRA as its diffusers parts: A copied, B sliced by rows."""
    _plain(m, "splitting")
    a = m.adapter
    in_dim, out_dim = a.in_dim, a.out_dim
    bounds = rule.bounds(in_dim, out_dim, m.name)
    parts = []
    for k, name in enumerate(rule.diffusers):
        lo, hi = bounds[k]

        def factors(lo=lo, hi=hi):
            up, down, _ = _factors(m)
            return up[lo:hi].contiguous(), down, None

        shapes = ((hi - lo,) + tuple(a.up.shape[1:]), a.down.shape, None)
        raw = (Rows(a.up, lo, hi), Rows(a.down, 0, a.down.shape[0]), None)
        parts.append(OutModule(c.space, c.native, name, factors, m.rank, m.scale, a.up.dtype, sources=[m.name],
                               shapes=shapes, raw=raw))
    return parts


def _fuse(members: list[tuple[Module, Canon]], rule) -> OutModule:
    """Diffusers parts as one LoRA of the fused native weight (exact, block-diagonal)."""
    for m, _ in members:
        _plain(m, "fusing")
    by_index = {c.part.index: m for m, c in members}
    first = members[0][0]
    in_dim = first.adapter.in_dim
    rows = rule.part_rows(in_dim, {k: m.adapter.out_dim for k, m in by_index.items()})
    if None in rows:
        missing = [rule.diffusers[k] for k, r in enumerate(rows) if r is None]
        raise UsageError(f"{first.name}: cannot fuse into {rule.native} without {', '.join(missing)}: their rows "
                         "depend on the model's configuration (write the diffusers naming instead)")
    offsets = [sum(rows[:k]) for k in range(len(rows))]
    mods = [by_index[k] for k in sorted(by_index)]
    # every part present with one shared A and scale: the diffusers split of a fused LoRA, re-fused at its rank
    same = len(mods) == len(rows) and len({(m.rank, m.scale) for m in mods}) == 1 and _same_down(mods)
    total_rank = sum(m.rank for m in mods)

    def factors():
        import torch

        ups, downs = zip(*[_factors(m)[:2] for m in mods])
        if same:
            return torch.cat(ups), downs[0], None
        up = torch.zeros(sum(rows), total_rank)
        col = 0
        for k, m, u in zip(sorted(by_index), mods, ups):
            up[offsets[k]: offsets[k] + rows[k], col: col + m.rank] = u.float() * m.scale
            col += m.rank
        return up, torch.cat([d.float() for d in downs]), None

    rank, scale = (mods[0].rank, mods[0].scale) if same else (total_rank, 1.0)
    shapes = ((sum(rows), rank), (rank, in_dim), None)
    return OutModule(members[0][1].space, rule.native, rule.native, factors, rank, scale, first.adapter.up.dtype,
                     sources=[m.name for m in mods], shapes=shapes)


def _same_down(mods: list[Module]) -> bool:
    """Whether every part shares one A (decided before writing, since it sets the output rank)."""
    import torch

    downs = [m.adapter.down.torch() for m in mods]
    return all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs[1:])
