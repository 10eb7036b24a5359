"""Small JSON files that come with models (adapter configs, shard indexes), read with bounds: untrusted input."""

from __future__ import annotations

import json

from loratools.errors import FormatError


def read_json_object(path, name: str, limit: int, where) -> dict:
    """The JSON object in ``path``; a one-line ``FormatError`` naming ``name`` (and the file ``where``) when it is
    larger than ``limit`` bytes, nested too deeply, not JSON or not an object."""
    try:
        with open(path, "rb") as f:  # at most one byte past the limit, whatever the size says (/proc reports 0)
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise FormatError(f"{name} is larger than {limit} bytes", where)
        value = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise FormatError(f"{name} is nested too deeply", where) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{name} is not valid JSON ({exc})", where) from None
    if not isinstance(value, dict):
        raise FormatError(f"{name} is not a JSON object", where)
    return value
