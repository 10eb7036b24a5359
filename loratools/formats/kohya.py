"""kohya sd-scripts and the formats that share its flattened names: kohya itself (``lora_unet_…``, ``lora_te1_…``),
LyCORIS (kohya names with LyCORIS algorithms, or ``lycoris_…``), OneTrainer (``lora_transformer_…``), and ComfyUI's
dotted spelling of original names (``diffusion_model.…``: ai-toolkit, ComfyUI saves, musubi-tuner, diffusion-pipe).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from loratools.formats.codec import Codec, Stem, WriteOptions
from loratools.families.naming import DIFFUSERS, split_component
from loratools.formats.writing import a_b_items, common_alpha, down_up_items, peft_config
from loratools.io.writer import write_safetensors


class _DownUpWriter(Codec):
    """Writes ``lora_down``/``lora_up``/``.alpha`` tensors under the codec's stems."""

    writable = True

    def stores_alpha(self, family) -> bool:
        return True

    def write(self, mods, family, dest: Path, metadata: dict, options: WriteOptions) -> list[Path]:
        items = self.items(mods, family, options)
        write_safetensors(dest, list(items), metadata, overwrite=options.overwrite, sync=options.sync,
                          group_copies=True, finite=options.finite)
        return [dest]

    def items(self, mods, family, options: WriteOptions):
        alpha = common_alpha(mods) if options.uniform_alpha else None
        return down_up_items(mods, lambda om: self.stem(om, family), options.dtype, alpha)


class Kohya(_DownUpWriter):
    id = "kohya"
    flat = True
    suffix = ".kohya.safetensors"
    prefixes = (("lora_unet_", "model"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
                ("lora_te_", "te1"), ("lora_prior_unet_", "model"), ("lora_prior_te_", "te1"),
                ("oft_unet_", "model"), ("oft_te1_", "te1"), ("oft_te2_", "te2"), ("oft_te_", "te1"))

    def claims(self, st: Stem) -> bool:
        return st.naming == "kohya" and not st.lycoris_algo and st.spelling not in ("xlabs", "cloneofsimo")

    def model_naming(self, family) -> str:
        return family.naming.kohya_model

    def stem(self, om, family) -> str:
        name = om.name.replace(".", "_").replace("/", "_")  # a diffusers "component/path" flattens whole
        if om.space == "model":
            return "lora_unet_" + name
        return f"lora_{family.encoder_slot(om.space, self.id)}_{name}"


class Lycoris(Codec):
    id = "lycoris"
    flat = True
    prefixes = (("lycoris_", "model"),)

    def claims(self, st: Stem) -> bool:
        return st.naming == "lycoris" or (st.naming == "kohya" and st.lycoris_algo)


class OneTrainer(Codec):
    """OneTrainer names the transformer ``lora_transformer_`` and its text encoders with kohya's prefixes."""

    id = "onetrainer"
    flat = True
    prefixes = (("lora_transformer_", "model"),)

    def score(self, stems) -> int:
        if not any(st.naming == "onetrainer" for st in stems):
            return 0
        return sum(1 for st in stems if st.adapter_roles and st.naming in ("onetrainer", "kohya"))


class Comfy(_DownUpWriter):
    id = "comfy"
    suffix = ".comfy.safetensors"
    prefixes = (("model.diffusion_model.", "model"), ("diffusion_model.", "model"),
                ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_g.transformer.", "te2"),
                ("text_encoders.t5xxl.transformer.", "te3"))

    def model_naming(self, family) -> str:
        return "native"

    def stem(self, om, family) -> str:
        if om.space == "model":
            return "diffusion_model." + om.name
        return f"text_encoders.{family.encoder_slot(om.space, self.id)}.transformer.{om.name}"

    def stores_alpha(self, family) -> bool:
        return family.naming.comfy_factors != "lora_A"

    def items(self, mods, family, options: WriteOptions):
        if family.naming.comfy_factors == "lora_A":  # PEFT spelling: the scale is folded, no .alpha
            return a_b_items(mods, lambda om: self.stem(om, family), options.dtype, self.id, True)
        return super().items(mods, family, options)

    def write(self, mods, family, dest: Path, metadata: dict, options: WriteOptions) -> list[Path]:
        if family.naming.comfy_factors == "lora_A":
            metadata = {**metadata, "lora_adapter_metadata": _diffusers_config(mods, family)}
        return super().write(mods, family, dest, metadata, options)


def _diffusers_config(mods, family) -> str:
    """The LoraConfig diffusers' readers build the transformer's adapter from, in the diffusers names they rename
    these modules to: fused weights (block-diagonal, so of a larger rank than the rest) would otherwise get the
    scale of the file's first rank. ComfyUI ignores it."""
    groups: dict[str, list] = {}
    for om in mods:
        for d in family.naming.spell("model", om.native, DIFFUSERS) if om.space == "model" else ():
            component, path = split_component(d, family.model_component)
            groups.setdefault(component, []).append(
                SimpleNamespace(name=path, rank=om.rank, scale=1.0, magnitude=om.magnitude, bias=om.bias))
    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")
    return json.dumps({f"{component}.{k}": cfg[k] for component, parts in groups.items()
                       for cfg in [peft_config(parts, folded=True)] for k in keys}, indent=2, sort_keys=True)
