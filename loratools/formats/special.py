"""Formats loratools reads but does not write: XLabs Flux LoRAs, BFL control LoRAs, and cloneofsimo/lora."""

from __future__ import annotations

import re
from collections import Counter

from loratools.formats.codec import Codec, KeyParts, Stem

_XLABS = re.compile(r"^(qkv|proj)_lora([12])$")
_CLONEOFSIMO = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
_UPDOWN = {"down": "lora_down", "up": "lora_up"}


class Cloneofsimo(Codec):
    """cloneofsimo/lora (``lora_diffusion``): positional keys ``unet:N:up``, ``text_encoder:N:down``."""

    id = "cloneofsimo"
    prefixes = (("unet:", "model"), ("text_encoder:", "te1"))

    def parse(self, key: str, parts: list[str]) -> KeyParts | None:
        m = _CLONEOFSIMO.match(key) if ":" in key else None
        return KeyParts(f"{m[1]}:{m[2]}", _UPDOWN[m[3]], "cloneofsimo") if m else None

    def claims(self, st: Stem) -> bool:
        return st.spelling == "cloneofsimo"


class XLabs(Codec):
    """XLabs Flux LoRAs: ``double_blocks.N.processor.qkv_lora1.down.weight`` (lora1: image stream, lora2: text)."""

    id = "xlabs"

    def parse(self, key: str, parts: list[str]) -> KeyParts | None:
        if len(parts) < 4 or parts[-1] != "weight" or parts[-2] not in _UPDOWN or parts[-4] != "processor":
            return None
        x = _XLABS.match(parts[-3])
        if not x:
            return None
        stream = "img" if x[2] == "1" else "txt"
        return KeyParts(".".join(parts[:-4] + [f"{stream}_attn", x[1]]), _UPDOWN[parts[-2]], "xlabs")

    def claims(self, st: Stem) -> bool:
        return st.spelling == "xlabs"


class BflControl(Codec):
    """BFL's control LoRAs (FLUX.1 Canny/Depth): diffusers-named LoRA modules, LoRA biases on the double blocks,
    and plain tensors that replace base weights (norms, the widened ``img_in``)."""

    id = "bfl_control"

    def score(self, stems) -> int:
        plain_full = [st for st in stems if not st.adapter_roles]
        biased = any("double_blocks" in st.name and "lora_up_bias" in st.roles for st in stems)
        if not plain_full or not biased:
            return 0
        return len(stems) + 1  # every stem, the replacements included: nothing else explains the file


def cloneofsimo_family(modules) -> tuple[str | None, list[str]]:
    """The family a cloneofsimo file's text-encoder width says, with the evidence; (None, reason) when it cannot
    tell. Its keys carry no module names; ``lora_diffusion`` only trained SD 1.x/2.x, whose encoders differ in
    width."""
    widths = Counter(m.adapter.in_dim for m in modules if m.component.startswith("te") and m.adapter.in_dim)
    if not widths:
        return None, ["cloneofsimo keys carry no module names and the file has no text-encoder modules"]
    width = widths.most_common(1)[0][0]
    from loratools.families import encoders, load_families

    known = encoders().by_id
    fits = [(f, known[e]) for f in load_families().values() if "cloneofsimo" in f.data["detect"].get("positional", ())
            for e in f.text_encoders.get("te1", ()) if e in known and known[e].width == width]
    if len(fits) != 1:
        return None, [f"cloneofsimo file whose text encoder is {width} wide (lora_diffusion trained SD 1.x/2.x)"]
    family, enc = fits[0]
    return family.id, ["cloneofsimo/lora (lora_diffusion) trained only Stable Diffusion 1.x/2.x",
                       f"text encoder width {width}: {enc.name} ({family.name})"]
