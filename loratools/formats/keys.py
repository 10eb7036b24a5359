"""Parsing one tensor key: adapter suffix -> role, then prefix -> component and module name.

Suffix spellings are one table, not a chain of `elif`s. A key is split into ``stem`` (what names the
module, prefix included) and ``role`` (which tensor of the adapter it is). Roles are canonical:
``lora_down``/``lora_up`` whatever the file calls A/B.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Suffixes of one dot-component: key = "<stem>.<suffix>".
ONE = {
    "alpha": "alpha", "dora_scale": "dora_scale", "lora_magnitude_vector": "dora_scale",
    "lora_A": "lora_down", "lora_B": "lora_up",  # Mochi's trainer omits ".weight"
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "w_norm", "b_norm": "b_norm",
    "on_input": "on_input", "oft_blocks": "oft_blocks", "rescale": "rescale",
    "set_weight": "set_weight", "reshape_weight": "reshape_weight",
    "weight": "plain_weight", "bias": "plain_bias", "scale": "plain_scale",
}
# Suffixes of two dot-components.
TWO = {
    ("lora_down", "weight"): "lora_down", ("lora_up", "weight"): "lora_up", ("lora_mid", "weight"): "lora_mid",
    ("lora_A", "weight"): "lora_down", ("lora_B", "weight"): "lora_up", ("lora_B", "bias"): "lora_up_bias",
    ("lora_magnitude_vector", "weight"): "dora_scale",
    ("a1", "weight"): "glora_a1", ("a2", "weight"): "glora_a2", ("b1", "weight"): "glora_b1",
    ("b2", "weight"): "glora_b2", ("bm", "weight"): "glora_bm",
}
# How a suffix is spelled, for telling formats apart.
SPELLING = {"lora_down": "kohya", "lora_up": "kohya", "lora_mid": "kohya", "alpha": "kohya"}
LYCORIS_ROLES = frozenset(v for v in ONE.values() if v.startswith(("hada_", "lokr_", "oft_", "glora_")))
LEGACY_UPDOWN = {"down": "lora_down", "up": "lora_up"}
_XLABS = re.compile(r"^(qkv|proj)_lora([12])$")
_CLONEOFSIMO = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")


class KeyParts(NamedTuple):
    stem: str
    role: str
    spelling: str  # kohya | peft | legacy | lycoris | xlabs | cloneofsimo | plain
    adapter_name: str | None = None


def parse_key(key: str) -> KeyParts:
    """Split a tensor key into stem, role and suffix spelling."""
    m = _CLONEOFSIMO.match(key) if ":" in key else None
    if m:
        return KeyParts(f"{m[1]}:{m[2]}", LEGACY_UPDOWN[m[3]], "cloneofsimo")
    parts = key.split(".")
    n = len(parts)
    if n >= 4 and parts[-1] == "weight" and parts[-2] in LEGACY_UPDOWN:
        head, role = parts[-3], LEGACY_UPDOWN[parts[-2]]
        if head in ("lora", "lora_linear_layer"):  # LoRACompatibleLinear, transformers text encoders
            return KeyParts(".".join(parts[:-3]), role, "legacy")
        x = _XLABS.match(head)
        if x and parts[-4] == "processor":  # XLabs: lora1 = image stream, lora2 = text stream
            stream = "img" if x[2] == "1" else "txt"
            return KeyParts(".".join(parts[:-4] + [f"{stream}_attn", x[1]]), role, "xlabs")
        if head.endswith("_lora"):  # attention processor: <block>.processor.to_q_lora.down.weight
            stem = parts[:-3]
            if stem and stem[-1] == "processor":
                stem = stem[:-1]
            name = head[: -len("_lora")]
            stem = stem + (["to_out", "0"] if name == "to_out" else [name])
            return KeyParts(".".join(stem), role, "legacy")
    if n >= 4 and parts[-3] in ("lora_A", "lora_B") and parts[-1] in ("weight", "bias"):
        role = TWO[(parts[-3], parts[-1])]  # PEFT adapter name infix: lora_A.default.weight
        return KeyParts(".".join(parts[:-3]), role, "peft", parts[-2])
    if n >= 3 and parts[-2] == "lora_magnitude_vector":
        return KeyParts(".".join(parts[:-2]), "dora_scale", "peft", None if parts[-1] == "weight" else parts[-1])
    if n >= 3 and (parts[-2], parts[-1]) in TWO:
        role = TWO[(parts[-2], parts[-1])]
        spelling = "peft" if parts[-2].startswith("lora_") and parts[-2][-1] in "AB" else "kohya"
        if role.startswith("glora_"):
            spelling = "lycoris"
        elif parts[-2] == "lora_magnitude_vector":
            spelling = "peft"
        return KeyParts(".".join(parts[:-2]), role, spelling)
    if n >= 2 and parts[-1] in ONE:
        role = ONE[parts[-1]]
        if role.startswith("plain_"):
            spelling = "plain"
        elif role in LYCORIS_ROLES:
            spelling = "lycoris"
        elif parts[-1] in ("lora_A", "lora_B", "lora_magnitude_vector"):
            spelling = "peft"
        else:
            spelling = SPELLING.get(role, "lycoris" if role not in ("dora_scale",) else "kohya")
        return KeyParts(".".join(parts[:-1]), role, spelling)
    return KeyParts(key, "unknown", "plain")


# Prefixes, longest first: (prefix, component, naming). Kohya-style prefixes end in "_" and are
# followed by a flattened module path; dotted ones by a dotted path.
PREFIXES = [
    ("transformer.base_model.model.", "model", "peft"),
    ("unet.base_model.model.", "model", "peft"),
    ("base_model.model.transformer.", "model", "peft"),
    ("base_model.model.unet.", "model", "peft"),
    ("base_model.model.", "model", "peft"),
    ("model.diffusion_model.", "model", "comfy"),
    ("diffusion_model.", "model", "comfy"),
    ("text_encoders.clip_l.transformer.", "te1", "comfy"),
    ("text_encoders.clip_g.transformer.", "te2", "comfy"),
    ("text_encoders.t5xxl.transformer.", "te3", "comfy"),
    ("text_encoder_2.", "te2", "diffusers"),
    ("text_encoder_3.", "te3", "diffusers"),
    ("text_encoder.", "te1", "diffusers"),
    ("transformer.", "model", "diffusers"),
    ("unet.", "model", "diffusers"),
    ("lora_unet_", "model", "kohya"),
    ("lora_te1_", "te1", "kohya"),
    ("lora_te2_", "te2", "kohya"),
    ("lora_te3_", "te3", "kohya"),
    ("lora_te_", "te1", "kohya"),
    ("lora_transformer_", "model", "onetrainer"),
    ("lora_prior_unet_", "model", "kohya"),
    ("lora_prior_te_", "te1", "kohya"),
    ("lycoris_", "model", "lycoris"),
    ("oft_unet_", "model", "kohya"),
    ("oft_te1_", "te1", "kohya"),
    ("oft_te2_", "te2", "kohya"),
    ("oft_te_", "te1", "kohya"),
    ("unet:", "model", "cloneofsimo"),
    ("text_encoder:", "te1", "cloneofsimo"),
]
# Module paths that name a text encoder even without a text-encoder prefix.
_TE_HEADS = ("text_model.", "text_model_", "encoder.block.", "encoder_block_")


class StemParts(NamedTuple):
    component: str
    name: str
    naming: str  # kohya | onetrainer | lycoris | diffusers | peft | comfy | cloneofsimo | plain


def split_stem(stem: str) -> StemParts:
    for prefix, component, naming in PREFIXES:
        if stem.startswith(prefix):
            name = stem[len(prefix):]
            if naming == "cloneofsimo":
                name = stem
            elif component == "model" and name.startswith(_TE_HEADS) and naming in ("peft", "diffusers"):
                component = "te1"
            return StemParts(component, name, naming)
    component = "te1" if stem.startswith(_TE_HEADS) else "model"
    return StemParts(component, stem, "plain")
