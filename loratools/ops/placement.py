"""Where a canonical LoRA module lands in a base checkpoint, from the family tables.

A module lands on a whole weight, on a row slice of a fused weight (a diffusers ``to_q`` in a BFL ``qkv``), or on
several diffusers weights that a fused native module splits into. Which layout a base uses is decided by which
candidate keys exist, so no layout has to be declared. Text encoders are found under the family's single-file
prefixes (HF naming, or the OpenCLIP layout with fused ``in_proj`` and a transposed ``text_projection``), a ComfyUI
bundle's ``text_encoders.*``, or a diffusers folder's component.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratools.families.naming import DIFFUSERS, NATIVE, Canon

# Where original single files keep the diffusion model's native names (ComfyUI's bundles and the originals).
MODEL_NATIVE_PREFIXES = ("model.diffusion_model.", "")
_OPENCLIP_MLP = {"fc1": "c_fc", "fc2": "c_proj"}


def model_native_prefixes(family) -> tuple[str, ...]:
    return (*family.native_prefixes, *MODEL_NATIVE_PREFIXES)


def model_diffusers_prefixes(family) -> tuple[str, ...]:
    return (f"{family.model_component}/", "")


@dataclass(frozen=True)
class Placement:
    """Where (part of) a module's ΔW goes: ``key`` rows ``rows`` (None = all) receive ΔW rows ``src``."""

    key: str
    bias_key: str | None
    rows: tuple[int, int] | None
    src: tuple[int, int] | None
    naming: str  # the naming the base spells this weight in (decides half swaps)
    transpose: bool = False


def locate(base, family, canon: Canon, out_dim: int) -> list[Placement]:
    """The placements of one canonical module in ``base``; [] when the base lacks it. ``out_dim`` is the row
    count of the module's ΔW."""
    if canon.space == "model":
        return _model(base, family, canon, out_dim)
    return _encoder(base, family, canon)


def _placement(base, stem: str, rows, src, naming: str) -> Placement:
    bias = stem + ".bias"
    return Placement(stem + ".weight", bias if bias in base.keys else None, rows, src, naming)


def _model(base, family, canon: Canon, out_dim: int) -> list[Placement]:
    rule = family.naming.rule("model", canon.native)
    for prefix in model_native_prefixes(family):
        for native in (canon.native, *rule.aliases):  # a base may spell the native name another way (ComfyUI)
            key = prefix + native + ".weight"
            if key in base.keys:
                rows = None
                if canon.part is not None:
                    shape = base.shape(key)
                    rows = rule.bounds(shape[1], shape[0], canon.native)[canon.part.index]
                return [_placement(base, prefix + native, rows, None, NATIVE)]
    for prefix in model_diffusers_prefixes(family):
        if canon.part is not None:
            stem = prefix + rule.diffusers[canon.part.index]
            if stem + ".weight" in base.keys:
                return [_placement(base, stem, None, None, DIFFUSERS)]
            continue
        stems = [prefix + d for d in rule.diffusers]
        if not all(s + ".weight" in base.keys for s in stems):
            continue
        if len(stems) == 1:
            return [_placement(base, stems[0], None, None, DIFFUSERS)]
        in_dim = base.shape(stems[0] + ".weight")[1]
        bounds = rule.bounds(in_dim, out_dim, canon.native)
        return [_placement(base, s, None, b, DIFFUSERS) for s, b in zip(stems, bounds)]
    return []


def encoder_prefixes(family, eid: str) -> tuple[str, ...]:
    """Where a base may keep encoder ``eid`` in HF naming: single-file prefixes, then a diffusers folder's
    component, then a bare component file."""
    enc = family.encoders.get(eid)
    if enc is None:
        return ()
    slot = enc.slot("diffusers")
    return enc.checkpoint_prefixes() + ((slot + "/",) if slot else ()) + ("",)


def _encoder(base, family, canon: Canon) -> list[Placement]:
    for prefix in encoder_prefixes(family, canon.space):
        stem = prefix + canon.native
        if stem + ".weight" in base.keys:
            return [_placement(base, stem, None, None, NATIVE)]
    enc = family.encoders.get(canon.space)
    for prefix in enc.openclip if enc else ():
        hit = _openclip(base, prefix, canon.native)
        if hit:
            return [hit]
    return []


def _openclip(base, prefix: str, path: str) -> Placement | None:
    """An HF CLIP module path in the OpenCLIP layout (fused in_proj, transposed text_projection)."""
    if path == "text_projection":
        key = prefix + "text_projection"
        return Placement(key, None, None, None, NATIVE, transpose=True) if key in base.keys else None
    parts = path.split(".")
    if len(parts) != 6 or parts[:3] != ["text_model", "encoder", "layers"]:
        return None
    block = f"{prefix}transformer.resblocks.{parts[3]}."
    group, name = parts[4], parts[5]
    if group == "self_attn" and name in ("q_proj", "k_proj", "v_proj"):
        key = block + "attn.in_proj_weight"
        if key not in base.keys:
            return None
        width = base.shape(key)[1]
        k = ("q_proj", "k_proj", "v_proj").index(name)
        bias = block + "attn.in_proj_bias"
        return Placement(key, bias if bias in base.keys else None, (k * width, (k + 1) * width), None, NATIVE)
    if group == "self_attn" and name == "out_proj":
        stem = block + "attn.out_proj"
    elif group == "mlp" and name in _OPENCLIP_MLP:
        stem = block + "mlp." + _OPENCLIP_MLP[name]
    else:
        return None
    return _placement(base, stem, None, None, NATIVE) if stem + ".weight" in base.keys else None


def openclip_modules(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """The HF CLIP modules an OpenCLIP weight (name after the encoder prefix) holds:
    [(HF module path, its rows or None, stored transposed)] — the inverse of ``_openclip``."""
    if name == "text_projection":
        return [("text_projection", None, True)]
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["transformer", "resblocks"]:
        return []
    layer = f"text_model.encoder.layers.{parts[2]}."
    if parts[3:] == ["attn", "in_proj_weight"]:
        width = shape[1]
        return [(layer + f"self_attn.{p}_proj", (k * width, (k + 1) * width), False) for k, p in enumerate("qkv")]
    if len(parts) != 6 or parts[5] != "weight":
        return []
    if parts[3:5] == ["attn", "out_proj"]:
        return [(layer + "self_attn.out_proj", None, False)]
    back = {v: k for k, v in _OPENCLIP_MLP.items()}
    if parts[3] == "mlp" and parts[4] in back:
        return [(layer + "mlp." + back[parts[4]], None, False)]
    return []


def _has(base, req: dict) -> bool:
    """Whether the base holds the signature key (under a ComfyUI/LDM prefix, or in a lone component file) with the
    given shape."""
    key = req["key"]
    names = [key, "model.diffusion_model." + key]
    if "/" in key and not base.is_folder:
        names.append(key.split("/", 1)[1])
    for name in names:
        if name in base.keys:
            return "shape" not in req or list(base.shape(name)) == list(req["shape"])
    return False


def base_family(base) -> tuple[str | None, list[str], str]:
    """(family id or None, the families that fit, how the base told) from the families' checkpoint signatures and,
    for a diffusers folder, its ``model_index.json`` pipeline class."""
    from loratools.families import load_families

    families = load_families().values()
    index = base.model_index()
    pipeline = index.get("_class_name") if index else None
    by_keys = [f.id for f in families if any(all(_has(base, r) for r in (alt if isinstance(alt, list) else [alt]))
                                             for alt in f.signature)]
    by_pipeline = [f.id for f in families if pipeline in f.pipelines] if isinstance(pipeline, str) else []
    fits = [f for f in by_keys if f in by_pipeline] if by_pipeline else by_keys
    how = "its weights' names and shapes"
    if by_pipeline and not fits:
        fits, how = by_pipeline, f"model_index.json ({pipeline})"
    elif by_pipeline:
        how = f"model_index.json ({pipeline}) and its weights"
    return (fits[0] if len(fits) == 1 else None), fits, how
