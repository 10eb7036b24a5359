"""One layout per fused weight across merge inputs.

A fused native weight (FLUX's ``img_attn.qkv``, a DiT's ``linear1``) is adapted whole in one naming and in parts
(``to_q``/``to_k``/``to_v``) in another. Both are exact: the parts of a whole module are its A with B's row
slices, and parts make a whole module of A stacked along rank with a block-diagonal B, each part's scale folded
into its block. ``align`` brings every input to the layout of the first input that adapts the weight, so that
merge meets module with module.
"""

from __future__ import annotations

from collections import defaultdict

from loratools.adapters import LoRA
from loratools.errors import UsageError
from loratools.families import get_family
from loratools.families.naming import Part
from loratools.model import Lora, MemorySource, Module


def align(items: list[tuple[Lora, float]], mem: MemorySource) -> list[list[Module]]:
    """Each input's modules, those of a weight the first adapting input adapts whole made whole, those of a
    weight it adapts in parts split into parts (new tensors in ``mem``)."""
    whole_first: dict[str, bool] = {}
    for lora, _ in items:
        for m in lora.modules:
            if m.target:
                whole_first.setdefault(m.target, m.part is None)
    out = []
    for lora, _ in items:
        parts = defaultdict(list)
        for m in lora.modules:
            if m.target and m.part is not None:
                parts[m.target].append(m)
        mods: list[Module] = []
        for m in lora.modules:
            if not m.target or (m.part is None) == whole_first[m.target]:
                mods.append(m)
            elif m.part is None:
                mods += _split(lora, m, mem)
            elif m is parts[m.target][0]:
                mods.append(_fuse(lora, parts[m.target], mem))
        out.append(mods)
    return out


def _rule(lora: Lora, target: str):
    space, native = target.split(":", 1)
    return get_family(lora.family.id).naming.rule(space, native)


def _plain(m: Module, lora: Lora, mine: str, theirs: str) -> None:
    a = m.adapter
    if not a.exact_lora or a.plain_factors() is None or m.magnitude is not None or a.has("lora_up_bias") \
            or a.has("diff_b"):
        raise UsageError(f"'{m.name}' ({lora.path}) adapts {m.target.split(':', 1)[1]} {mine}, the first input "
                         f"that adapts it {theirs}; only plain LoRA modules (no bias, no DoRA) are split or fused: "
                         "convert the inputs to one naming first (loratools convert --to FORMAT), then merge")


def _split(lora: Lora, m: Module, mem: MemorySource) -> list[Module]:
    """A whole module as its parts: the same A, B's rows of each part."""
    _plain(m, lora, "whole", "in parts")
    rule, a = _rule(lora, m.target), m.adapter
    up = a.up.torch()
    key = f"{len(mem.keys())}:{m.component}.{m.name}"
    out = []
    for k, (lo, hi) in enumerate(rule.bounds(a.in_dim, a.out_dim, m.name)):
        tensors = {"lora_up": mem.add(f"{key}.{k}.lora_up", up[lo:hi].contiguous()), "lora_down": a.down}
        out.append(Module(name=m.name, component=m.component, adapter=LoRA(tensors), alpha=m.alpha,
                          rslora=m.rslora, keys=[], target=m.target, part=Part(k, rule.sizes)))
    return out


def _fuse(lora: Lora, members: list[Module], mem: MemorySource) -> Module:
    """Parts as one whole module: A stacked along rank, B block-diagonal with each part's scale in its block, alpha
    the total rank (scale 1). A part the input lacks has zero rows."""
    import torch

    first = members[0]
    for m in members:
        _plain(m, lora, "in parts", "whole")
    rule = _rule(lora, first.target)
    by_index = {m.part.index: m for m in members}
    in_dim = first.adapter.in_dim
    rows = rule.part_rows(in_dim, {k: m.adapter.out_dim for k, m in by_index.items()})
    if None in rows:
        raise UsageError(f"'{first.name}' ({lora.path}): cannot make {rule.native} whole without its other parts "
                         "(their rows depend on the model's configuration): convert the inputs to one naming first")
    ups, downs = [], []
    total = sum(m.rank for m in by_index.values())
    for k in sorted(by_index):
        m = by_index[k]
        block = torch.zeros(sum(rows), m.rank, dtype=torch.float32)
        at = sum(rows[:k])
        block[at: at + rows[k]] = m.adapter.up.torch().float().reshape(rows[k], -1) * m.scale
        ups.append(block)
        downs.append(m.adapter.down.torch().float().reshape(m.rank, -1))
    key = f"{len(mem.keys())}:{first.component}.{rule.native}"
    tensors = {"lora_up": mem.add(f"{key}.lora_up", torch.cat(ups, dim=1)),
               "lora_down": mem.add(f"{key}.lora_down", torch.cat(downs))}
    return Module(name=first.name, component=first.component, adapter=LoRA(tensors), alpha=float(total), keys=[],
                  target=first.target, part=None)
