"""Opening what a user points at: a .safetensors file, a PEFT adapter folder, or (only when asked) a pickle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loratools.errors import FormatError, LoraToolsError
from loratools.io.jsonfile import read_json_object
from loratools.io.pickled import load_pickled, looks_pickled
from loratools.io.reader import SafetensorsFile

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Opened:
    path: str           # what the user named
    weights: str        # the file holding the tensors
    source: object      # SafetensorsFile or TensorDictSource
    peft_config: dict | None
    size_bytes: int


def open_lora(path: str | os.PathLike, allow_pickle: bool = False) -> Opened:
    """Open a LoRA file or PEFT folder; the caller closes ``source``."""
    p = Path(path)
    if p.is_dir():
        return _open_folder(p, allow_pickle)
    if not p.exists():
        raise LoraToolsError("no such file or folder", p)
    # a pickle under any name (a renamed .ckpt is a common way to smuggle one in) gets the pickle rules
    if p.suffix.lower() in PICKLE_SUFFIXES or (p.is_file() and looks_pickled(p)):

        src = load_pickled(p, allow_pickle)
        return Opened(str(p), str(p), src, None, p.stat().st_size)
    src = SafetensorsFile(p)
    return Opened(str(p), str(p), src, None, p.stat().st_size)


def _open_folder(p: Path, allow_pickle: bool) -> Opened:
    cfg_path = p / PEFT_CONFIG
    if cfg_path.is_file():
        weights = next((p / w for w in PEFT_WEIGHTS if (p / w).is_file()), None)
        if weights is None:
            raise FormatError(f"PEFT folder has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}", p)
        config = _read_config(cfg_path)
        inner = open_lora(weights, allow_pickle)
        size = cfg_path.stat().st_size + inner.size_bytes
        return Opened(str(p), str(weights), inner.source, config, size)
    weights = next((p / w for w in DIFFUSERS_WEIGHTS if (p / w).is_file()), None)
    if weights is not None:  # a folder saved by diffusers' save_lora_weights
        inner = open_lora(weights, allow_pickle)
        return Opened(str(p), str(weights), inner.source, None, inner.size_bytes)
    if _scan(p):
        raise FormatError(f"the folder is not one LoRA (no {PEFT_CONFIG} or {DIFFUSERS_WEIGHTS[0]}); name a file in "
                          "it", p)
    raise FormatError(f"no LoRA in the folder (no .safetensors file, no {PEFT_CONFIG}, no {DIFFUSERS_WEIGHTS[0]})",
                      p)


MAX_CONFIG_BYTES = 1 << 20  # PEFT's own configs are a few KB; a bigger one is not an adapter config


def _read_config(path: Path) -> dict:
    config = read_json_object(path, PEFT_CONFIG, MAX_CONFIG_BYTES, path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FormatError(f"{PEFT_CONFIG}: peft_type {peft_type!r} is not supported (only LORA)", path)
    return config


def expand_paths(paths) -> list[str]:
    """Files and adapter folders named by ``paths``; plain folders are searched recursively."""
    out: list[str] = []
    for raw in paths:
        p = Path(raw)
        if (p.is_dir() and not (p / PEFT_CONFIG).is_file() and not peft_bundle(p)
                and not any((p / w).is_file() for w in DIFFUSERS_WEIGHTS)):
            found = _scan(p)
            out.extend(found if found else [str(p)])  # an empty folder still gets its own error
        else:
            out.append(str(p))
    return out


def _scan(folder: Path) -> list[str]:
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if PEFT_CONFIG in files or peft_bundle(root):
            found.append(root)
            dirs[:] = []
            continue
        found.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".safetensors"))
    return found


# Component folders `convert --to peft` writes, and the file component each stands for.
BUNDLE_COMPONENTS = {"unet": "model", "transformer": "model", "text_encoder": "te1", "text_encoder_2": "te2",
                     "text_encoder_3": "te3"}
# Folders of other parts of the diffusion model (Anima's LLM adapter is diffusers' `text_conditioner`): their modules
# are named with the folder as a dotted prefix, as diffusers single files spell them.
BUNDLE_MODEL_PARTS = ("text_conditioner",)


def peft_bundle(path) -> dict[str, Path]:
    """Folder name -> adapter folder, when ``path`` is a folder of PEFT adapters (one per component)."""
    p = Path(path)
    if not p.is_dir() or (p / PEFT_CONFIG).is_file():
        return {}
    return {name: p / name for name in (*BUNDLE_COMPONENTS, *BUNDLE_MODEL_PARTS) if (p / name / PEFT_CONFIG).is_file()}


def bundle_component(folder: str) -> tuple[str, str]:
    """(file component, module name prefix) of a bundle's adapter folder."""
    if folder in BUNDLE_MODEL_PARTS:
        return "model", folder + "."
    return BUNDLE_COMPONENTS[folder], ""
