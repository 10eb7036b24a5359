"""Adapter types, one small class per file, in detection order (first claim wins per stem)."""

from loratools.adapters.base import MODIFIER_ROLES, Adapter, registry
from loratools.adapters.lora import LoRA
from loratools.adapters.loha import LoHa
from loratools.adapters.lokr import LoKr
from loratools.adapters.glora import GLoRA
from loratools.adapters.oft import OFT
from loratools.adapters.ia3 import IA3
from loratools.adapters.full import Full, Norm, Replace

__all__ = ["MODIFIER_ROLES", "Adapter", "registry", "LoRA", "LoHa", "LoKr", "GLoRA", "OFT", "IA3", "Full", "Norm", "Replace"]
