"""Synthetic LoRA files from real layouts: real key names and shapes, random values, small ranks."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from loratools.formats.keys import parse_key
from loratools.io.arrays import numpy_to_bf16_bytes
from loratools.io.writer import write_safetensors

LAYOUTS = Path(__file__).resolve().parents[1] / "fixtures" / "layouts"
# Key spaces (module weight shapes) used to fill in shapes a keys-only layout leaves out.
KEYSPACES = {
    "sd15": "sd15__kohya_keyspace__sdmecha.json",
    "sdxl": "sdxl__kohya_keyspace__sdmecha-diffusers-names.json",
}
DEFAULT_DIM = 64
DEFAULT_RANK = 2


def layout(name: str) -> dict:
    return json.loads((LAYOUTS / name).read_text())


def lora_layouts() -> list[str]:
    return sorted(p.name for p in LAYOUTS.glob("*__*__*.json") if json.loads(p.read_text())["kind"] == "lora")


def other_layouts() -> list[str]:
    return sorted(p.name for p in LAYOUTS.glob("*__*__*.json") if json.loads(p.read_text())["kind"] == "other")


@lru_cache(maxsize=None)
def _keyspace(family: str) -> dict[str, list[int]]:
    """Flattened module path -> weight shape, e.g. 'down_blocks_0_attentions_0_proj_in' -> [320, 320, 1, 1]."""
    name = KEYSPACES.get(family)
    if not name:
        return {}
    out = {}
    for key, t in layout(name)["tensors"].items():
        if key.endswith(".weight") and t.get("shape"):
            path = key[: -len(".weight")]
            for head in ("unet.", "te.", "te1.", "te2."):
                if path.startswith(head):
                    out[path[len(head):].replace(".", "_")] = t["shape"]
                    if head in ("te.", "te1."):  # kohya lora_te_/lora_te1_ both name the first encoder
                        out.setdefault("te:" + path[len(head):].replace(".", "_"), t["shape"])
    return out


def _module_shape(family: str, stem: str) -> list[int] | None:
    flat = stem.replace(".", "_")
    for prefix in ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "unet_", "transformer_"):
        if flat.startswith(prefix):
            flat = flat[len(prefix):]
            break
    return _keyspace(family).get(flat)


def fill_shape(family: str, key: str, rank: int = DEFAULT_RANK) -> list[int]:
    """A plausible shape for a key whose layout gives none (real module shape when a key space has it)."""
    kp = parse_key(key)
    if kp.role == "alpha" or kp.role == "on_input":
        return []
    w = _module_shape(family, kp.stem) or [DEFAULT_DIM, DEFAULT_DIM]
    out, rest = w[0], w[1:]
    if kp.role == "lora_down":
        return [rank, *rest]
    if kp.role == "lora_up":
        return [out, rank] + [1] * (len(rest) - 1)
    if kp.role in ("diff",):
        return list(w)
    return [out]


def small_shape(key: str, shape: list[int], rank: int, cap: int | None) -> list[int]:
    """The layout's shape with the LoRA rank cut to ``rank`` (and every dim capped for non-LoRA files)."""
    if cap is not None:
        return [min(d, cap) for d in shape]
    role = parse_key(key).role
    shape = list(shape)
    if role == "lora_down" and shape:
        shape[0] = min(shape[0], rank)
    elif role == "lora_up" and len(shape) > 1:
        shape[1] = min(shape[1], rank)
    elif role == "lora_mid" and len(shape) > 1:
        shape[0], shape[1] = min(shape[0], rank), min(shape[1], rank)
    return shape


def synthesize(name: str, dest: Path, *, seed: int = 0, rank: int = DEFAULT_RANK, metadata: dict | None = None,
               dtype: str | None = None, layout_data: dict | None = None, cap: int | None = None) -> Path:
    """Write a safetensors file with the layout's keys, dims and dtypes and random values.

    LoRA ranks are cut to ``rank`` to keep files small (real names and module dims stay); files that
    are not LoRAs (``kind: other``) get every dim capped at 8, since only their names matter.
    """
    lay = layout_data or layout(name)
    if cap is None and lay.get("kind") == "other":
        cap = 8
    rng = np.random.default_rng(seed)
    items = []
    for key, t in lay["tensors"].items():
        shape = t.get("shape")
        if shape is None:
            shape = fill_shape(lay["family"], key, rank)
        shape = small_shape(key, shape, rank, cap)
        dt = dtype or t.get("dtype") or "F16"
        items.append((key, dt, tuple(shape), _values(rng, key, dt, shape)))
    meta = dict(lay.get("metadata") or {}) if metadata is None else metadata
    write_safetensors(dest, items, meta, overwrite=True)
    return dest


def _values(rng, key: str, dtype: str, shape) -> bytes:
    n = int(np.prod(shape)) if shape else 1
    if key.endswith(".alpha"):
        vals = np.full(n, 8.0, dtype=np.float32)  # a fixed alpha so tests can predict the scale
    elif key.endswith(".on_input"):
        vals = np.zeros(n, dtype=np.float32)
    else:
        vals = (rng.standard_normal(n) * 0.05).astype(np.float32)
    if dtype == "BF16":
        return numpy_to_bf16_bytes(vals)
    if dtype.startswith("F8"):
        return rng.integers(0, 0x70, n, dtype=np.uint8).tobytes()
    np_dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                "BOOL": np.bool_, "U8": np.uint8}[dtype]
    return vals.astype(np_dtype).tobytes()


def write_peft_folder(name: str, dest: Path, seed: int = 0, rank: int = 4) -> Path:
    """A PEFT adapter folder (adapter_config.json from the layout's sidecar + adapter_model.safetensors)."""
    lay = layout(name)
    dest.mkdir(parents=True, exist_ok=True)
    synthesize(name, dest / "adapter_model.safetensors", seed=seed, rank=rank)
    (dest / "adapter_config.json").write_text(json.dumps(lay["sidecar_files"]["adapter_config.json"]))
    return dest
