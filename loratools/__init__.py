"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

from loratools._version import __version__
from loratools.api import (bake, convert, extract, inspect, load, merge, resize, save, scan, summarize_catalogue,
                           verify)

__all__ = ["load", "inspect", "convert", "verify", "save", "resize", "merge", "bake", "extract", "scan",
           "summarize_catalogue", "__version__"]
