"""The legacy cloneofsimo/lora (`lora_diffusion`) format: positional keys `unet:N:up`, `text_encoder:N:down`.

Its keys carry no module names, so the family cannot come from names. `lora_diffusion` only trained Stable
Diffusion 1.x/2.x, whose text encoders differ in width; that width is the evidence.
"""

from __future__ import annotations

from collections import Counter

# text-encoder attention width -> (family, what it is)
TEXT_ENCODER_WIDTHS = {768: ("sd1", "CLIP-L (SD 1.x)"), 1024: ("sd2", "OpenCLIP-H (SD 2.x)")}


def family_evidence(modules) -> tuple[str | None, list[str]]:
    """The family the text-encoder width says, with the evidence; (None, reason) when it cannot tell."""
    widths = Counter(m.adapter.in_dim for m in modules if m.component.startswith("te") and m.adapter.in_dim)
    if not widths:
        return None, ["cloneofsimo keys carry no module names and the file has no text-encoder modules"]
    width = widths.most_common(1)[0][0]
    if width not in TEXT_ENCODER_WIDTHS:
        return None, [f"cloneofsimo file whose text encoder is {width} wide (lora_diffusion trained SD 1.x/2.x)"]
    family, what = TEXT_ENCODER_WIDTHS[width]
    return family, ["cloneofsimo/lora (lora_diffusion) trained only Stable Diffusion 1.x/2.x",
                    f"text encoder width {width}: {what}"]
