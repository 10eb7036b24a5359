"""Family detection against real LoRA and checkpoint layouts (key names and shapes of real files)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from loratools.errors import UnknownFamily
from loratools.families import FAMILY_IDS, ModuleEvidence, detect_family, get_family, load_families

_HERE = Path(__file__).resolve()
LAYOUTS = next((p for p in (_HERE.parents[1] / "fixtures" / "layouts", _HERE.parents[2] / "shared" / "lora-layouts")
                if p.is_dir() and any(p.glob("*__*__*.json"))), None)

REQUIRED = {"sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "sd35_large", "flux1", "flux2", "chroma", "hunyuan_video",
            "wan21", "wan22", "ltxv", "mochi", "qwen_image", "hidream", "lumina2", "z_image", "anima", "krea2", "ltx2"}

# ----------------------------------------------------------------------------------------- layout -> evidence

_PREFIXES = [  # (prefix, component); the first that matches wins
    ("lora_unet_", "model"), ("lora_transformer_", "model"), ("lycoris_", "model"),
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te1"),
    ("base_model.model.", "model"), ("model.diffusion_model.", "model"), ("diffusion_model.", "model"),
    ("transformer.", "model"), ("unet.", "model"), ("net.", "model"),
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
    ("conditioner.embedders.0.transformer.", "te1"), ("cond_stage_model.transformer.", "te1"),
    ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.t5xxl.transformer.", "te3"),
]
_SKIP = ("first_stage_model.", "vae.", "conditioner.embedders.1.", "conditioner.embedders.0.model.",
         "cond_stage_model.model.", "text_encoders.clip_g.", "model_ema.")
_ROLE = re.compile(
    r"\.(?P<role>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|lora_A|lora_B|lora\.down\.weight"
    r"|lora\.up\.weight|down\.weight|up\.weight|lokr_w[12](?:_[ab])?|hada_w[12]_[ab]|alpha|dora_scale|diff|diff_b"
    r"|lora_B\.bias|scale)$")


def layout_evidence(layout: dict) -> list[ModuleEvidence]:
    """Turn a layout's key -> shape table into the evidence the format layer would produce."""
    checkpoint = layout["kind"] == "checkpoint"
    mods: dict[tuple[str, str], dict] = {}
    for key, info in layout["tensors"].items():
        if key.startswith(_SKIP):
            continue
        comp, rest = "model", key
        for prefix, c in _PREFIXES:
            if key.startswith(prefix):
                comp, rest = c, key[len(prefix):]
                break
        shape = info.get("shape")
        if checkpoint:
            if not rest.endswith(".weight") or (shape is not None and len(shape) < 2):
                continue
            name, role = rest[: -len(".weight")], "weight"
        else:
            m = _ROLE.search(rest)
            name, role = (rest[: m.start()], m["role"]) if m else (rest.rsplit(".", 1)[0], "other")
        name = re.sub(r"\.processor\.(to_(?:q|k|v|out))_lora$", r".\1", name)
        mods.setdefault((comp, name), {})[role] = shape
    out = []
    for (comp, name), roles in mods.items():
        out.append(ModuleEvidence(comp, name, *_dims(roles)))
    return out


def _dims(roles: dict) -> tuple[int | None, int | None]:
    def get(*names):
        return next((roles[n] for n in names if roles.get(n)), None)
    if "weight" in roles and roles["weight"]:
        return roles["weight"][1], roles["weight"][0]
    down = get("lora_down.weight", "lora_A.weight", "lora_A", "lora.down.weight", "down.weight")
    up = get("lora_up.weight", "lora_B.weight", "lora_B", "lora.up.weight", "up.weight")
    if down or up:
        return (down[1] if down else None), (up[0] if up else None)
    w1 = get("lokr_w1") or (lambda a, b: a and b and [a[0], b[1]])(get("lokr_w1_a"), get("lokr_w1_b"))
    w2 = get("lokr_w2") or (lambda a, b: a and b and [a[0], b[1]])(get("lokr_w2_a"), get("lokr_w2_b"))
    if w1 and w2:
        return w1[1] * w2[1], w1[0] * w2[0]
    return None, None


def _layouts(kind: str):
    if LAYOUTS is None:
        return []
    return sorted(p for p in LAYOUTS.glob("*__*__*.json") if json.loads(p.read_text())["kind"] == kind)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())
