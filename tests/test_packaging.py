"""What users install is what the tests test: a built wheel holds every module and data file the package opens,
and (unless this is an editable development install) the package under test is the installed one."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import loratools
from loratools import families

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "fixtures" / "examples" / "sdxl_slider_kohya.safetensors"


def _editable() -> bool:
    try:
        text = importlib.metadata.distribution("loratools").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return True  # a bare source tree on sys.path
    return bool(text and json.loads(text).get("dir_info", {}).get("editable"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("src")
    # build from a copy: an in-tree build leaves build/ and *.egg-info behind in the checkout
    shutil.copytree(ROOT, build / "loratools", ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "fixtures", "benchmarks", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(build / "loratools")], check=True)
    (path,) = out.glob("loratools-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_holds_every_data_file_the_package_opens(wheel):
    names = set(wheel.namelist())
    opened = [f"loratools/families/{name}" for name in families.data_files()]
    assert len(opened) == len(families.FAMILY_IDS) + 1  # one file per family, one shared encoders file
    missing = [p for p in opened if p not in names]
    assert not missing, missing
    # and every module of the source tree
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "loratools").rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_wheel_version_is_the_package_version(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    assert f"\nVersion: {loratools.__version__}\n" in wheel.read(meta).decode()


def test_the_package_under_test_is_the_installed_one():
    if _editable():
        pytest.skip("editable development install: the source tree is the package")
    where = Path(loratools.__file__).resolve()
    assert ROOT not in where.parents, f"tests import the source tree ({where}), not the installed wheel"
    assert all((where.parent / "families" / name).is_file() for name in families.data_files())


def test_installed_command_converts_the_bundled_example(tmp_path):
    """The step that failed for a normal install: convert reads the family's naming table."""
    exe = shutil.which("loratools", path=str(Path(sys.executable).parent)) or shutil.which("loratools")
    if exe is None:
        pytest.skip("no loratools command on PATH")
    out = tmp_path / "slider.diffusers.safetensors"
    run = subprocess.run([exe, "convert", str(EXAMPLE), "--to", "diffusers", "-o", str(out)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 0 and "Traceback" not in run.stderr
    info = subprocess.run([exe, "inspect", "--json", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)[0]["format"] == "diffusers"
