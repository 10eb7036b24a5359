"""File hashes users compare against model sites: sha256, AutoV2, AutoV3/addnet and A1111's legacy hash."""

from __future__ import annotations

import hashlib

_CHUNK = 1 << 20


def file_hashes(path: str, data_start: int | None) -> dict[str, str]:
    """Hash a file in one streaming pass.

    ``data_start`` is where a safetensors data region begins (8 + header size); AutoV3 (the
    "addnet" hash kohya writes as ``sshs_model_hash``) covers only those bytes, so it survives
    metadata edits.
    """
    full = hashlib.sha256()
    data = hashlib.sha256() if data_start is not None else None
    legacy = hashlib.sha256()
    pos = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            full.update(chunk)
            if data is not None:
                start = max(0, data_start - pos)
                if start < len(chunk):
                    data.update(chunk[start:])
            lo, hi = max(pos, 0x100000), min(pos + len(chunk), 0x110000)
            if lo < hi:  # A1111's legacy model hash: 64 KiB at offset 1 MiB
                legacy.update(chunk[lo - pos: hi - pos])
            pos += len(chunk)
    sha = full.hexdigest()
    out = {"sha256": sha, "autov2": sha[:10], "legacy": legacy.hexdigest()[:8]}
    if data is not None:
        addnet = data.hexdigest()
        out["addnet"] = addnet
        out["autov3"] = addnet[:12]
    return out
