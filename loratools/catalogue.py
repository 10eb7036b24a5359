"""An inventory of a LoRA collection: one record per file (what ``inspect --json`` says, plus size, mtime, hashes
when asked, and the file's problems), kept in a JSON-lines catalogue that a rerun updates incrementally, and a
summary: files per family and format, duplicates by content, broken files, metadata that contradicts the keys.

Torch is never imported: records come from headers, and checkpoints are told apart from LoRAs by their keys.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from loratools.errors import LoraToolsError
from loratools.io.atomic import atomic_file
from loratools.io.pickled import PICKLE_SUFFIXES
from loratools.io.sources import DIFFUSERS_WEIGHTS, PEFT_CONFIG, peft_bundle
from loratools.record_memo import RecordMemo

RECORD_VERSION = 1  # bumped when a record's fields change: older records are then read again


def walk(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Every LoRA-like file, adapter folder and diffusers pipeline folder under ``paths``, each once: symlinked
    folders are followed, but a folder already seen (a loop, or two links to one place) is not walked again, and a
    file reached twice (a link, or a root inside another) is listed once. A folder that cannot be listed is listed
    itself, so that its record says why (the inventory is never silently incomplete)."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set = set()

    def emit(p: str) -> Iterator[str]:
        try:
            st = os.stat(p)
            key: object = (st.st_dev, st.st_ino)  # cheaper than realpath, which looks at every component
        except OSError:
            key = p  # listed, to be reported as unreadable
        if key not in seen_files:
            seen_files.add(key)
            yield p

    unreadable: list[str] = []  # folders os.walk could not list: listed, to be reported as unreadable

    for raw in paths:
        root = os.fspath(raw)
        if not os.path.isdir(root):
            yield from emit(root)
            continue
        for folder, dirs, files in os.walk(root, followlinks=True, onerror=lambda e: unreadable.append(e.filename)):
            while unreadable:
                yield from emit(unreadable.pop(0))
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirs.sort()
            if (PEFT_CONFIG in files or MODEL_INDEX in files or peft_bundle(folder)
                    or any(w in files for w in DIFFUSERS_WEIGHTS)):
                yield from emit(folder)
                dirs[:] = []
                continue
            for name in sorted(files):
                if name.endswith(".safetensors") or _pickle_name(name):
                    yield from emit(os.path.join(folder, name))
        while unreadable:
            yield from emit(unreadable.pop(0))


def _pickle_name(path: str) -> bool:
    """``is_pickle_path`` without building a Path (the same suffix rule: a leading dot starts no suffix)."""
    return os.path.splitext(path)[1].lower() in PICKLE_SUFFIXES


def file_stat(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file, or of an adapter folder's newest entry and total size."""
    return _stat_entry(path)[:2]


def _stat_entry(path: str) -> tuple[int, int, bool]:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size, st.st_mtime_ns, False
    size, mtime = 0, st.st_mtime_ns
    for folder, _, files in os.walk(path, onerror=_raise):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime, True


def _raise(exc: OSError) -> None:
    raise exc


def _contradictions(info: dict) -> list[str]:
    """What a LoRA's training metadata says that its tensors do not."""
    meta = info.get("metadata") or {}
    out = []
    rank = info.get("rank") or {}
    dim = meta.get("ss_network_dim")
    if dim and str(dim).isdigit() and rank.get("values") and str(int(dim)) not in rank["values"]:
        out.append(f"ss_network_dim {dim}, but the tensors have rank {rank.get('common')}")
    alpha = meta.get("ss_network_alpha")
    alphas = (info.get("alpha") or {}).get("values") or {}
    try:
        if alpha is not None and alphas and float(alpha) not in {float(a) for a in alphas}:
            out.append(f"ss_network_alpha {alpha}, but the stored alphas are {', '.join(sorted(alphas))}")
    except ValueError:
        out.append(f"ss_network_alpha {alpha!r} is not a number")
    for claim in (info.get("family") or {}).get("metadata_claims", []):
        if claim.get("agrees") is False:
            out.append(f"{claim['key']}={claim['value']} claims {claim['family']}; the keys say "
                       f"{info['family']['id']}")
    return out


MODEL_INDEX = "model_index.json"  # a diffusers pipeline folder: one checkpoint, its family told by this file too


def _checkpoint(path: str, hashes: bool, told: dict | None = None) -> dict:
    """The record of a base checkpoint (a file, or a diffusers pipeline folder), from what ``api.checkpoint``
    told already when given; LoraToolsError when it is not one."""
    from loratools import api
    from loratools.io.hashing import file_hashes

    record = dict(told or api.checkpoint(path))
    files = record.pop("files")
    if hashes:
        record["hashes"] = ({"files": {rel: file_hashes(full, None) for rel, full in files.items()}} if files
                            else file_hashes(path, None))
    return record


def _inspect(path: str) -> dict:
    from loratools import api

    return api.inspect(path, metadata=False)


_MEMO = RecordMemo()  # per process: each worker of a parallel scan keeps its own


def inspect_one(path: str, hashes: bool = False) -> dict:
    """The catalogue record of one path; problems become ``error`` (one line), never an exception."""
    from loratools import api

    size, mtime, is_dir = _stat_entry(path)
    record: dict = {"path": path, "size": size, "mtime_ns": mtime, "version": RECORD_VERSION, "kind": None,
                    "error": None, "problems": []}
    if _pickle_name(path):
        record.update(kind="pickle", error="pickled file: not read (convert it to safetensors, or inspect it with "
                                           "--allow-pickle)")
        return record
    try:
        if is_dir and os.path.isfile(os.path.join(path, MODEL_INDEX)):
            record.update(_checkpoint(path, hashes))
            return record
        if hashes or is_dir:
            info = api.inspect(path, hashes=hashes, metadata=False)
        else:
            info = _MEMO.inspect(path, _inspect)
    except LoraToolsError as exc:
        try:
            if "not a LoRA" not in exc.message and "no usable module" not in exc.message:
                raise
            record.update(_checkpoint(path, hashes, getattr(exc, "checkpoint", None)))  # inspect may have told
        except LoraToolsError:
            record.update(kind="broken", error=exc.message)
        return record
    record.update(kind="lora", info=info, problems=_contradictions(info))
    if hashes:
        record["hashes"] = info.get("hashes")
    return record


def _safe_one(args: tuple[str, bool]) -> dict:
    path, hashes = args
    try:
        return inspect_one(path, hashes)
    except OSError as exc:  # vanished or unreadable between the walk and the read
        return {"path": path, "kind": "broken", "error": f"cannot read ({exc.strerror or exc})", "problems": [],
                "version": RECORD_VERSION}


def read_catalogue(path: str | os.PathLike, *, strict: bool = False, missing_ok: bool = True) -> dict[str, dict]:
    """Records of an existing catalogue by path, a relative path taken from the catalogue's folder. A file that is
    not a catalogue (a line that is not a record: no ``path`` and ``version``) is refused. A record that is not
    what scan writes is kept, for a rerun to read its file again; ``strict`` refuses it instead, naming its line.
    A missing catalogue is empty, or refused when not ``missing_ok``."""
    out: dict[str, dict] = {}
    parquet = str(path).endswith(".parquet")
    try:
        if parquet:
            texts = _parquet_records(path)
        else:
            with open(path, encoding="utf-8") as f:
                texts = f.read().splitlines()
    except FileNotFoundError:
        if missing_ok:
            return out
        raise LoraToolsError("no such catalogue (write one with loratools scan -o)", path) from None
    except UnicodeDecodeError:
        raise LoraToolsError("not a loratools scan catalogue (not UTF-8 text)", path) from None
    except OSError as exc:
        raise LoraToolsError(f"cannot read the catalogue ({exc.strerror or exc})", path) from None
    folder = os.path.dirname(os.path.abspath(path))
    for number, text in enumerate(texts, 1):
        where = f"{'row' if parquet else 'line'} {number}"
        if not parquet and not text.strip():
            continue
        try:
            rec = json.loads(text)
        except (TypeError, ValueError):
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("path"), str) and "version" in rec):
            raise LoraToolsError(f"not a loratools scan catalogue ({where} is not a scan record); remove it or "
                                 "choose another name", path)
        problem = record_problem(rec)
        if problem and strict:
            raise LoraToolsError(f"{where}: not a record scan writes ({problem}); rerun loratools scan -o on it to "
                                 "refresh it", path)
        rec["path"] = os.path.abspath(os.path.join(folder, rec["path"]))  # an absolute one stays as it is
        out[rec["path"]] = rec
    return out


KINDS = ("lora", "checkpoint", "pickle", "broken")


def _hashes_shape(hashes: object) -> bool:
    """Hash names to hex text (and whether an embedded hash matches); for a folder (PEFT adapters per component,
    a diffusers pipeline), ``files``: each weights file's relative path to such a map."""
    if not isinstance(hashes, dict):
        return False
    files = hashes.get("files")
    if files is not None:
        return len(hashes) == 1 and isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, dict) and all(isinstance(h, str) for h in v.values())
            for k, v in files.items())
    return all(v is None or isinstance(v, (str, bool)) for v in hashes.values())  # embedded_matches: a bool


def record_problem(r: dict) -> str | None:
    """What is wrong with the shape of a record (the fields summaries and catalogues read), or None."""
    def num(v, optional=True) -> bool:
        return (v is None and optional) or (isinstance(v, int) and not isinstance(v, bool))

    def text(v) -> bool:
        return v is None or isinstance(v, str)

    info, hashes = r.get("info"), r.get("hashes")
    checks = [
        (r.get("kind") in KINDS, "kind"), (num(r.get("version"), False), "version"),
        (num(r.get("size")) and num(r.get("mtime_ns")), "size"), (text(r.get("error")), "error"),
        (isinstance(r.get("problems", []), list) and all(isinstance(x, str) for x in r.get("problems", [])),
         "problems"),
        (hashes is None or _hashes_shape(hashes), "hashes"),
        (info is None or r.get("kind") == "lora", "info"), (r.get("kind") != "checkpoint" or text(r.get("family")),
                                                           "family"),
    ]
    if r.get("kind") == "lora":
        family = info.get("family") if isinstance(info, dict) else None
        rank = info.get("rank") if isinstance(info, dict) else None
        checks += [(isinstance(info, dict), "info"),
                   (isinstance(family, dict) and isinstance(family.get("id"), str) and text(family.get("variant")),
                    "info.family"),
                   (isinstance(info, dict) and isinstance(info.get("format"), str), "info.format"),
                   (isinstance(info, dict) and num(info.get("modules")), "info.modules"),
                   (isinstance(info, dict) and isinstance(info.get("adapters") or {}, dict)
                    and all(num(n, False) for n in (info.get("adapters") or {}).values()), "info.adapters"),
                   (rank is None or (isinstance(rank, dict) and num(rank.get("common"))), "info.rank")]
    bad = [name for ok, name in checks if not ok]
    return f"{bad[0]} has the wrong type or value" if bad else None


def _pyarrow(path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise LoraToolsError("a .parquet catalogue needs pyarrow: pip install 'loratools[parquet]'", path) from None
    return pyarrow


def _parquet_records(path) -> list:
    """The ``record`` column (each record's JSON) of a Parquet catalogue."""
    pa = _pyarrow(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        return pa.parquet.read_table(path, columns=["record"]).column("record").to_pylist()
    except (pa.ArrowException, KeyError) as exc:
        raise LoraToolsError(f"not a loratools scan catalogue ({str(exc).splitlines()[0][:200]})", path) from None


# The Parquet catalogue's columns: what collections are queried by (one per record), and the whole record as JSON.
_COLUMNS = (("path", "string"), ("kind", "string"), ("size", "int64"), ("format", "string"), ("family", "string"),
            ("variant", "string"), ("modules", "int64"), ("rank", "int64"), ("sha256", "string"),
            ("autov3", "string"), ("error", "string"), ("record", "string"))


def _row(r: dict) -> dict:
    info, hashes = r.get("info") or {}, r.get("hashes") or {}
    family = info.get("family") or {}
    return {"path": r["path"], "kind": r.get("kind"), "size": r.get("size"), "format": info.get("format"),
            "family": family.get("id"), "variant": family.get("variant"), "modules": info.get("modules"),
            "rank": (info.get("rank") or {}).get("common"), "sha256": hashes.get("sha256"),
            "autov3": hashes.get("addnet"), "error": r.get("error"), "record": json.dumps(r, ensure_ascii=False)}


def _unchanged(old: dict | None, path: str, hashes: bool) -> bool:
    if old is None or old.get("version") != RECORD_VERSION or record_problem(old) or (
            hashes and old.get("kind") not in ("broken", "pickle") and not old.get("hashes")):  # pickles get none
        return False
    try:
        return (old.get("size"), old.get("mtime_ns")) == file_stat(path)
    except OSError:
        return False


def scan(paths: Iterable[str | os.PathLike], catalogue: str | os.PathLike | None = None, *, hashes: bool = False,
         jobs: int = 1) -> list[dict]:
    """Records for every LoRA-like file under ``paths`` (see ``inspect_one``), by absolute path. With ``catalogue``
    (a .jsonl or .parquet path), files whose size and mtime did not change keep their old record, and the catalogue
    is rewritten atomically with the new records when any changed (files that are gone are dropped). A path that
    does not exist, or a catalogue file that is not one, is refused (LoraToolsError) before anything is read."""
    given = [os.fspath(p) for p in paths]
    for path in given:
        if not os.path.exists(path):
            raise LoraToolsError("no such file or folder" + (" (a broken link)" if os.path.islink(path) else ""),
                                 path)
    roots = [os.path.abspath(p) for p in given]
    old = read_catalogue(catalogue) if catalogue is not None else {}
    files = list(walk(roots))
    todo = [p for p in files if not _unchanged(old.get(p), p, hashes)]
    fresh: dict[str, dict] = {}
    if jobs > 1 and len(todo) > 1:
        from loratools.executors import local_executor  # workers started clean, never forked from our threads

        with local_executor(jobs) as pool:
            for rec in pool.map(_safe_one, [(p, hashes) for p in todo], chunksize=64):
                fresh[rec["path"]] = rec
    else:
        for p in todo:
            fresh[p] = _safe_one((p, hashes))
    records = [fresh.get(p) or {**old[p], "reused": True} for p in files]
    if catalogue is not None and (fresh or list(old) != files):  # an unchanged catalogue is not rewritten
        write_catalogue(catalogue, records)
    return records


def write_catalogue(path: str | os.PathLike, records: list[dict]) -> None:
    """One JSON record per line, or (``.parquet``) a table of the columns collections are queried by plus each
    record as JSON; written atomically."""
    kept = [{k: v for k, v in r.items() if k != "reused"} for r in records]
    if str(path).endswith(".parquet"):
        pa = _pyarrow(path)
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _COLUMNS])
        sink = pa.BufferOutputStream()
        pa.parquet.write_table(pa.Table.from_pylist([_row(r) for r in kept], schema=schema), sink)
        lines = sink.getvalue().to_pybytes()
    else:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode("utf-8")
    with atomic_file(path, overwrite=True) as fd:
        view = memoryview(lines)
        while view:
            view = view[os.write(fd, view):]


def summarize(records: list[dict]) -> dict:
    """Counts per family × format, adapter types, size, duplicates by content hash, broken files (unreadable or
    invalid), pickles (listed, never read) and files whose metadata contradicts their tensors."""
    by_family_format: Counter = Counter()
    adapters: Counter = Counter()
    kinds: Counter = Counter()
    by_content: dict[str, list[str]] = defaultdict(list)
    for r in records:
        kinds[r.get("kind") or "unknown"] += 1
        info = r.get("info")
        if info:
            by_family_format[f"{info['family']['id']} / {info['format']}"] += 1
            adapters.update(info.get("adapters") or {})
        content = (r.get("hashes") or {}).get("addnet") or (r.get("hashes") or {}).get("sha256")
        if content:
            by_content[content].append(r["path"])
    return {
        "files": len(records), "kinds": dict(kinds), "size_bytes": sum(r.get("size") or 0 for r in records),
        "family_format": dict(by_family_format.most_common()), "adapters": dict(adapters.most_common()),
        "duplicates": [sorted(paths) for paths in by_content.values() if len(paths) > 1],
        "broken": [{"path": r["path"], "error": r["error"]} for r in records if r.get("kind") == "broken"],
        "pickles": [r["path"] for r in records if r.get("kind") == "pickle"],  # listed, never read: not broken
        "contradictions": [{"path": r["path"], "problems": r["problems"]} for r in records if r.get("problems")],
        "reused": sum(1 for r in records if r.get("reused")),
    }


def catalogue_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix not in (".jsonl", ".parquet"):
        raise LoraToolsError("the catalogue is a .jsonl file (one JSON record per line) or a .parquet table", p)
    return p
