"""`loratools scan` and `convert --from-catalogue` on bad input: paths that do not exist, folders that cannot be
read, an -o file that is not a catalogue, records that were tampered with, catalogues used from another folder,
and a summary whose table, list and JSON agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synth import synthesize

import loratools
from loratools.catalogue import read_catalogue, walk

LAYOUT = "sd15__peft__faithsang.json"  # detected as sd1


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from loratools.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd)


def _one_error(run: subprocess.CompletedProcess, starts: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"loratools: error: {starts}"), run.stderr


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Two LoRAs (sd1) in two folders, a broken file and a pickle."""
    root = tmp_path_factory.mktemp("collection")
    for i, folder in enumerate(("a", "b")):
        (root / folder).mkdir()
        synthesize(LAYOUT, root / folder / f"l{i}.safetensors", seed=i)
    (root / "bad.safetensors").write_bytes(b"xx")
    (root / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    return root


def test_a_path_that_does_not_exist_is_an_error(collection, tmp_path):
    _one_error(_cli("scan", str(collection), "nonexist", "-o", "c.jsonl", cwd=tmp_path), "nonexist: no such file")
    assert not (tmp_path / "c.jsonl").exists()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(loratools.errors.LoraToolsError, match="no such file or folder .a broken link"):
        loratools.scan([tmp_path / "dangling"])


def test_a_folder_that_cannot_be_listed_is_a_broken_record(collection, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(collection / "a", work / "a")
    (work / "locked").mkdir()
    (work / "locked" / "hidden.safetensors").write_bytes(b"")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert str(work / "locked") in list(walk([work]))
    by_path = {r["path"]: r for r in loratools.scan([work])}
    locked = by_path[str(work / "locked")]
    assert locked["kind"] == "broken" and "Permission denied" in locked["error"]
    assert by_path[str(work / "a" / "l0.safetensors")]["kind"] == "lora"
    summary = loratools.summarize_catalogue(list(by_path.values()))
    assert [b["path"] for b in summary["broken"]] == [str(work / "locked")]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_without_permissions_is_a_broken_record(collection, tmp_path):
    shutil.copytree(collection / "a", tmp_path / "a")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        records = {r["path"]: r for r in loratools.scan([tmp_path])}
    finally:
        locked.chmod(0o755)
    assert records[str(locked)]["kind"] == "broken"


@pytest.mark.parametrize("content", [
    b'{"op": "convert", "input": "a.safetensors", "to": "comfy"}\n',  # a batch manifest
    b"some notes\n", b"\xff\xfe\x00garbage", b'{"path": "a.safetensors"}\n',
])
def test_scan_o_never_replaces_a_file_that_is_not_a_catalogue(collection, tmp_path, content):
    target = tmp_path / "myjobs.jsonl"
    target.write_bytes(content)
    _one_error(_cli("scan", str(collection), "-o", "myjobs.jsonl", cwd=tmp_path),
               "myjobs.jsonl: not a loratools scan catalogue")
    assert target.read_bytes() == content


def test_scan_o_accepts_an_empty_file_and_its_own_catalogue(collection, tmp_path):
    target = tmp_path / "c.jsonl"
    target.write_bytes(b"")
    assert len(loratools.scan([collection], target)) == 4 and len(target.read_text().splitlines()) == 4
    assert all(r.get("reused") for r in loratools.scan([collection], target))


def _tamper(record: dict, how: str) -> None:
    if how == "family":
        record["info"]["family"] = "wan21"
    elif how == "info":
        record["info"] = [1, 2]
    elif how == "hashes":
        record["hashes"] = "abc"
    elif how == "problems":
        record["problems"] = 5
    elif how == "size":
        record["size"] = "abc"


TAMPERINGS = ["family", "info", "hashes", "problems", "size"]


@pytest.mark.parametrize("how", TAMPERINGS)
def test_a_tampered_record_is_read_again(collection, tmp_path, how):
    cat = tmp_path / "c.jsonl"
    first = loratools.scan([collection], cat, hashes=True)
    lines = [json.loads(x) for x in cat.read_text().splitlines()]
    for r in lines:
        if r["kind"] == "lora":
            _tamper(r, how)
    cat.write_text("".join(json.dumps(r) + "\n" for r in lines))
    again = loratools.scan([collection], cat, hashes=True)
    assert [bool(r.get("reused")) for r in again] == [r["kind"] != "lora" for r in first]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "reused"} for r in rs]  # noqa: E731
    assert strip(again) == first and [json.loads(x) for x in cat.read_text().splitlines()] == first
    loratools.summarize_catalogue(again)


@pytest.mark.parametrize("how", TAMPERINGS)
def test_a_tampered_parquet_record_is_read_again(collection, tmp_path, how):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cat = tmp_path / "c.parquet"
    first = loratools.scan([collection], cat)
    rows = pq.read_table(cat).to_pylist()
    for row in rows:
        record = json.loads(row["record"])
        if record["kind"] == "lora":
            _tamper(record, how)
            row["record"] = json.dumps(record)
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(cat)), cat)
    again = loratools.scan([collection], cat)
    assert sum(1 for r in again if not r.get("reused")) == 2
    assert [json.loads(row["record"]) for row in pq.read_table(cat).to_pylist()] == first


def test_convert_from_a_tampered_catalogue_names_the_record(collection, tmp_path):
    cat = tmp_path / "c.jsonl"
    loratools.scan([collection], cat)
    lines = [json.loads(x) for x in cat.read_text().splitlines()]
    number = next(i for i, r in enumerate(lines, 1) if r["kind"] == "lora")
    _tamper(lines[number - 1], "family")
    cat.write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = _cli("convert", "--from-catalogue", "c.jsonl", "--family", "wan21", "--to", "comfy", "-o", "out/",
               cwd=tmp_path)
    _one_error(run, f"c.jsonl: line {number}: not a record scan writes (info.family ")
    assert not (tmp_path / "out").exists()


def test_convert_from_a_catalogue_that_does_not_exist(tmp_path):
    run = _cli("convert", "--from-catalogue", "nonexist.jsonl", "--to", "comfy", "-o", "out/", cwd=tmp_path)
    _one_error(run, "nonexist.jsonl: no such catalogue")


def test_a_catalogue_works_from_any_folder(collection, tmp_path):
    """scan records absolute paths; a relative one (written by hand, or a catalogue moved with its collection) is
    taken from the catalogue's folder, not from the current one."""
    work = tmp_path / "w"
    shutil.copytree(collection, work / "loras")
    assert _cli("scan", "loras", "-o", "cat.jsonl", cwd=work).returncode == 0
    records = [json.loads(x) for x in (work / "cat.jsonl").read_text().splitlines()]
    assert all(os.path.isabs(r["path"]) for r in records)
    (work / "elsewhere").mkdir()
    run = _cli("convert", "--from-catalogue", "../cat.jsonl", "--to", "comfy", "-o", "out/", "--json",
               cwd=work / "elsewhere")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["totals"]["done"] == 2
    assert sorted(p.name for p in (work / "elsewhere" / "out").rglob("*.safetensors")) == [
        "l0.comfy.safetensors", "l1.comfy.safetensors"]
    for r in records:
        r["path"] = os.path.relpath(r["path"], work)
    (work / "rel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sorted(read_catalogue(work / "rel.jsonl")) == sorted(str(work / "loras" / p) for p in (
        "a/l0.safetensors", "b/l1.safetensors", "bad.safetensors", "old.ckpt"))
    run = _cli("convert", "--from-catalogue", "../rel.jsonl", "--to", "kohya", "-o", "out2/", "--json",
               cwd=work / "elsewhere")
    assert run.returncode == 0 and json.loads(run.stdout)["totals"]["done"] == 2, run.stderr


def test_table_list_and_json_agree_on_broken_files_and_pickles(collection, tmp_path):
    summary = json.loads(_cli("scan", str(collection), "--json").stdout)
    assert summary["kinds"] == {"lora": 2, "broken": 1, "pickle": 1}
    assert [b["path"] for b in summary["broken"]] == [str(collection / "bad.safetensors")]
    assert summary["pickles"] == [str(collection / "old.ckpt")]
    table = _cli("scan", str(collection)).stdout
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.splitlines()
            if line.count("│") == 3}
    assert rows["broken"] == "1" and rows["pickle"] == "1"
    assert sum(line.startswith("broken ") for line in table.splitlines()) == 1
    assert sum(line.startswith("pickle ") for line in table.splitlines()) == 1
