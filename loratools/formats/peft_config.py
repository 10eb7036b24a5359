"""Alpha, rank and rsLoRA from a PEFT `adapter_config.json` or diffusers' `lora_adapter_metadata`.

PEFT and diffusers files keep no `.alpha` tensors: the scale lives in a LoraConfig. diffusers packs one
config per component into the header, each key prefixed with the component (`transformer.r`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_COMPONENT_PREFIXES = {"model": ("unet", "transformer"), "te1": ("text_encoder",),
                       "te2": ("text_encoder_2",), "te3": ("text_encoder_3",)}


@dataclass
class LoraConfig:
    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        return cls(r=d.get("r"), lora_alpha=d.get("lora_alpha"), rank_pattern=d.get("rank_pattern") or {},
                   alpha_pattern=d.get("alpha_pattern") or {}, use_rslora=bool(d.get("use_rslora")),
                   use_dora=bool(d.get("use_dora")), raw=d)

    def rank_for(self, name: str) -> int | None:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float | None:
        return _pattern_value(self.alpha_pattern, name, self.lora_alpha)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern matching the end of the module path wins; '^' anchors it."""
    for pattern, value in patterns.items():
        try:
            if pattern.startswith("^"):
                hit = re.fullmatch(pattern[1:], name)
            else:
                hit = re.match(rf"(.*\.)?({pattern})$", name)
        except re.error:
            hit = pattern == name
        if hit:
            return value
    return default


@dataclass
class AdapterConfig:
    """Configs by component prefix (None: applies to every component)."""

    configs: dict[str | None, LoraConfig]
    origin: str  # "adapter_config.json" or "lora_adapter_metadata"

    @classmethod
    def from_peft(cls, d: dict) -> AdapterConfig:
        return cls({None: LoraConfig.from_dict(d)}, "adapter_config.json")

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> AdapterConfig | None:
        text = metadata.get("lora_adapter_metadata")
        if not text:
            return None
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict):
            return None
        grouped: dict[str | None, dict] = {}
        for key, value in d.items():
            head, _, rest = key.partition(".")
            if rest and head in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
                grouped.setdefault(head, {})[rest] = value
            else:
                grouped.setdefault(None, {})[key] = value
        return cls({k: LoraConfig.from_dict(v) for k, v in grouped.items()}, "lora_adapter_metadata")

    def for_component(self, component: str) -> LoraConfig | None:
        for prefix in _COMPONENT_PREFIXES.get(component, ()):
            if prefix in self.configs:
                return self.configs[prefix]
        return self.configs.get(None)

    def apply(self, module, stem, conflicts: list[str]) -> None:
        cfg = self.for_component(module.component)
        if cfg is None:
            return
        module.rslora = cfg.use_rslora
        if module.alpha is None:
            module.alpha = cfg.alpha_for(module.name)
        expected = cfg.rank_for(module.name)
        if expected is not None and module.rank is not None and expected != module.rank:
            conflicts.append(f"{module.name}: {self.origin} says rank {expected}, the tensors have rank "
                             f"{module.rank}")
