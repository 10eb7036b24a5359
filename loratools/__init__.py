"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

__version__ = "0.1.0"

from loratools.api import convert, inspect, load, verify  # noqa: E402

__all__ = ["load", "inspect", "convert", "verify", "__version__"]
