"""loratools: inspect, convert, merge, resize and bake LoRA files of image and video models."""

__version__ = "0.1.0"
