"""Adapter types, one small class per file, in detection order (first claim wins per stem)."""

from loratools.adapters.base import Adapter, registry
from loratools.adapters.lora import LoRA
from loratools.adapters.loha import LoHa
from loratools.adapters.lokr import LoKr
from loratools.adapters.glora import GLoRA
from loratools.adapters.oft import OFT
from loratools.adapters.ia3 import IA3
from loratools.adapters.full import Full, Norm, Replace

__all__ = ["Adapter", "registry", "LoRA", "LoHa", "LoKr", "GLoRA", "OFT", "IA3", "Full", "Norm", "Replace"]

# Module-level roles that modify whatever adapter a stem has, rather than being an adapter themselves.
MODIFIER_ROLES = frozenset({"alpha", "dora_scale"})
