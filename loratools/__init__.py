"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

from loratools._version import __version__
from loratools.api import bake, convert, extract, inspect, load, merge, resize, save, verify

__all__ = ["load", "inspect", "convert", "verify", "save", "resize", "merge", "bake", "extract", "__version__"]
