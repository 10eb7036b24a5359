"""Reading kohya `ss_*` and `modelspec.*` training metadata into a short summary."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

# (label, keys tried in order)
_SETTINGS = [
    ("trainer", ("ss_network_module", "software")),
    ("base model", ("ss_base_model_version", "modelspec.architecture")),
    ("base checkpoint", ("ss_sd_model_name",)),
    ("network dim / alpha", ("ss_network_dim",)),
    ("network args", ("ss_network_args",)),
    ("resolution", ("ss_resolution", "modelspec.resolution")),
    ("images", ("ss_num_train_images",)),
    ("epochs", ("ss_num_epochs", "ss_epoch")),
    ("steps", ("ss_max_train_steps", "ss_steps")),
    ("batch size", ("ss_total_batch_size", "ss_batch_size_per_device")),
    ("learning rate", ("ss_learning_rate",)),
    ("unet / te lr", ("ss_unet_lr",)),
    ("optimizer", ("ss_optimizer",)),
    ("scheduler", ("ss_lr_scheduler",)),
    ("precision", ("ss_mixed_precision",)),
    ("clip skip", ("ss_clip_skip",)),
    ("noise offset", ("ss_noise_offset",)),
    ("min-SNR gamma", ("ss_min_snr_gamma",)),
    ("trained", ("ss_training_started_at",)),
    ("title", ("modelspec.title", "ss_output_name")),
    ("author", ("modelspec.author",)),
    ("trigger", ("modelspec.trigger_phrase",)),
]


def _when(value: str) -> str:
    try:
        return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, OverflowError, OSError):
        return value


def training_summary(metadata: dict[str, str]) -> dict[str, str]:
    """The training settings a user asks about first, as label -> value."""
    out: dict[str, str] = {}
    for label, keys in _SETTINGS:
        for key in keys:
            value = metadata.get(key)
            if value in (None, "", "None"):
                continue
            if key == "ss_network_dim":
                value = f"{value} / {metadata.get('ss_network_alpha', '?')}"
            elif key == "ss_unet_lr":
                value = f"{value} / {metadata.get('ss_text_encoder_lr', '?')}"
            elif key == "ss_training_started_at":
                end = metadata.get("ss_training_finished_at")
                value = _when(value) + (f" -> {_when(end)}" if end else "")
            elif key == "software":
                value = _software(value)
            out[label] = value
            break
    return out


def _software(value: str) -> str:
    try:
        d = json.loads(value)
        return f"{d.get('name', '?')} {d.get('version', '')}".strip() if isinstance(d, dict) else value
    except ValueError:
        return value


def tag_frequencies(metadata: dict[str, str], top: int = 20) -> list[tuple[str, int]]:
    """The most frequent caption tags across datasets (kohya `ss_tag_frequency`)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    counts: Counter = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[str(tag).strip()] += int(n)
    return counts.most_common(top)


def training_keys(metadata: dict[str, str]) -> dict[str, str]:
    """All kohya and ModelSpec entries (the rest of the header is shown only with --json)."""
    return {k: v for k, v in sorted(metadata.items()) if k.startswith(("ss_", "modelspec.", "sshs_"))}
