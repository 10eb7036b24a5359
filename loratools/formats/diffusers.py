"""diffusers and PEFT: dotted module paths under the component (``unet.``, ``transformer.``, ``text_encoder.``) with
``lora_A``/``lora_B``; PEFT adapter folders (``base_model.model.…`` + ``adapter_config.json``); and the legacy
diffusers spellings (attention processors ``to_q_lora.down``, ``lora.down``, ``lora_linear_layer``), read only.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from loratools.families.naming import split_component
from loratools.formats.codec import Codec, KeyParts, Stem, WriteOptions
from loratools.formats.writing import a_b_items, peft_config
from loratools.io.atomic import atomic_folder
from loratools.io.writer import write_safetensors

_LEGACY_UPDOWN = {"down": "lora_down", "up": "lora_up"}


class DiffusersLegacy(Codec):
    id = "diffusers_legacy"

    def parse(self, key: str, parts: list[str]) -> KeyParts | None:
        n = len(parts)
        if n < 4 or parts[-1] != "weight" or parts[-2] not in _LEGACY_UPDOWN:
            return None
        head, role = parts[-3], _LEGACY_UPDOWN[parts[-2]]
        if head in ("lora", "lora_linear_layer"):  # LoRACompatibleLinear, transformers text encoders
            return KeyParts(".".join(parts[:-3]), role, "legacy")
        if head.endswith("_lora"):
            # attention processor: <block>.processor.to_q_lora.down.weight
            stem = parts[:-3]
            if stem and stem[-1] == "processor":
                stem = stem[:-1]
            name = head[: -len("_lora")]
            return KeyParts(".".join(stem + (["to_out", "0"] if name == "to_out" else [name])), role, "legacy")
        return None

    def claims(self, st: Stem) -> bool:
        return st.spelling == "legacy" and st.naming in ("diffusers", "plain")


class Peft(Codec):
    id = "peft"
    module_metadata = True
    writable = True
    suffix = ".peft"
    prefixes = (("transformer.base_model.model.", "model"), ("unet.base_model.model.", "model"),
                ("base_model.model.transformer.", "model"), ("base_model.model.unet.", "model"),
                ("base_model.model.", "model"))

    def parse(self, key: str, parts: list[str]) -> KeyParts | None:
        n = len(parts)
        if n >= 4 and parts[-3] in ("lora_A", "lora_B") and parts[-1] in ("weight", "bias"):
            role = {"lora_A": "lora_down", "lora_B": "lora_up"}[parts[-3]]  # adapter name infix: lora_A.<name>.weight
            return KeyParts(".".join(parts[:-3]), "lora_up_bias" if parts[-1] == "bias" else role, "peft", parts[-2])
        if n >= 3 and parts[-2] == "lora_magnitude_vector" and parts[-1] != "weight":
            return KeyParts(".".join(parts[:-2]), "dora_scale", "peft", parts[-1])
        return None

    def model_naming(self, family) -> str:
        return "diffusers"

    def stem(self, om, family) -> str:
        component, name = _place(om, family, self.id)
        return f"{component}/base_model.model.{name}"

    def write(self, mods, family, dest: Path, metadata: dict, options: WriteOptions) -> list[Path]:
        """One adapter folder per component, built in a temporary folder and moved into place together."""
        groups = _by_component(mods, family, self.id)
        with atomic_folder(dest, overwrite=options.overwrite) as tmp:
            for comp, group in groups.items():
                folder = tmp / comp
                folder.mkdir()
                items = a_b_items(group, lambda om: "base_model.model." + om.name, options.dtype, self.id, False)
                write_safetensors(folder / "adapter_model.safetensors", list(items), {**metadata, "format": "pt"},
                                  sync=options.sync, group_copies=True, finite=options.finite)
                (folder / "adapter_config.json").write_text(json.dumps(peft_config(group), indent=2, sort_keys=True))
        return [dest / comp for comp in groups]


def _place(om, family, fmt: str) -> tuple[str, str]:
    """(diffusers component, module path in it) of a planned module; a model module named ``component/path`` lives
    in a component of its own (Anima's LLM adapter in ``text_conditioner``)."""
    if om.space != "model":
        return family.encoder_slot(om.space, fmt), om.name
    return split_component(om.name, family.model_component)


def _by_component(mods, family, fmt: str) -> dict:
    """Planned modules by diffusers component, each named by its path in that component."""
    out: dict[str, list] = {}
    for om in mods:
        component, path = _place(om, family, fmt)
        out.setdefault(component, []).append(om if path == om.name else replace(om, name=path))
    return out


# The LoraConfig fields diffusers passes straight to LoraConfig(**metadata).
_DIFFUSERS_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")


class Diffusers(Codec):
    id = "diffusers"
    module_metadata = True
    writable = True
    suffix = ".diffusers.safetensors"
    prefixes = (("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te1"),
                ("transformer.", "model"), ("unet.", "model"))

    def claims(self, st: Stem) -> bool:
        return st.naming in ("diffusers", "plain") and st.spelling not in ("legacy", "xlabs", "cloneofsimo")

    def model_naming(self, family) -> str:
        return "diffusers"

    def stem(self, om, family) -> str:
        return ".".join(_place(om, family, self.id))

    def write(self, mods, family, dest: Path, metadata: dict, options: WriteOptions) -> list[Path]:
        items = a_b_items(mods, lambda om: self.stem(om, family), options.dtype, self.id, True)
        meta = {**metadata, "format": "pt", "lora_adapter_metadata": _adapter_metadata(mods, family)}
        write_safetensors(dest, list(items), meta, overwrite=options.overwrite, sync=options.sync, group_copies=True,
                          finite=options.finite)
        return [dest]


def _adapter_metadata(mods, family) -> str:
    """diffusers' ``lora_adapter_metadata``: one LoraConfig per component, keys prefixed by the component.

    Without it diffusers infers ranks and alphas from the tensors, and with mixed ranks gets some modules' scale
    wrong; with it every module gets exactly its rank and scale 1 (alpha is folded into the factors).
    """
    packed = {}
    for comp, group in _by_component(mods, family, "diffusers").items():
        cfg = peft_config(group, folded=True)
        packed.update({f"{comp}.{k}": cfg[k] for k in _DIFFUSERS_CONFIG_KEYS})
    return json.dumps(packed, indent=2, sort_keys=True)
