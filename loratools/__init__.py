"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

__version__ = "0.1.0"

from loratools.api import inspect, load  # noqa: E402

__all__ = ["load", "inspect", "__version__"]
