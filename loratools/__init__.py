"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

__version__ = "0.1.0"

from loratools.api import bake, convert, extract, inspect, load, merge, resize, save, verify  # noqa: E402

__all__ = ["load", "inspect", "convert", "verify", "save", "resize", "merge", "bake", "extract", "__version__"]
