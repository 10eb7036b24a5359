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
    """A development install: no installed distribution, or an editable one among those found (an editable
    install leaves a ``loratools.egg-info`` in the tree, which is found first from the tree's root)."""
    dists = [d for d in importlib.metadata.distributions() if d.metadata["Name"] == "loratools"]
    texts = [d.read_text("direct_url.json") for d in dists]
    return not dists or any(t and json.loads(t).get("dir_info", {}).get("editable") for t in texts)


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


def _tiny_sdxl_base(path: Path) -> Path:
    """An SGM checkpoint slice with the four attention weights of one block the example LoRA adapts (real shapes,
    so the base's signature says SDXL); every other module of the LoRA is unmatched."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    block = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
    shapes = {"attn2.to_k.weight": (640, 2048), **{f"attn1.{n}.weight": (640, 640)
                                                   for n in ("to_q", "to_k", "to_v", "to_out.0")}}
    save_file({block + k: rng.standard_normal(v).astype(np.float16) for k, v in shapes.items()}, str(path))
    return path


def test_installed_command_runs_every_operation_on_the_bundled_example(tmp_path):
    """What failed for a normal install (convert, bake and extract read the family files), end to end through
    the installed command: inspect, convert, resize, merge, bake, extract."""
    exe = shutil.which("loratools", path=str(Path(sys.executable).parent)) or shutil.which("loratools")
    if exe is None:
        pytest.skip("no loratools command on PATH")

    def run(*args) -> str:
        done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
        assert "Traceback" not in done.stderr
        return done.stdout

    info = json.loads(run("inspect", "--json", EXAMPLE))[0]
    assert (info["format"], info["family"]["id"], info["modules"]) == ("kohya", "sdxl", 280)
    run("convert", EXAMPLE, "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert json.loads(run("inspect", "--json", tmp_path / "d.safetensors"))[0]["format"] == "diffusers"
    run("resize", EXAMPLE, "--rank", "2", "-o", tmp_path / "r.safetensors")
    assert json.loads(run("inspect", "--json", tmp_path / "r.safetensors"))[0]["rank"]["max"] == 2
    run("merge", EXAMPLE, tmp_path / "d.safetensors", "-o", tmp_path / "m.safetensors")
    assert json.loads(run("inspect", "--json", tmp_path / "m.safetensors"))[0]["rank"]["max"] == 8
    base = _tiny_sdxl_base(tmp_path / "base.safetensors")
    run("bake", base, EXAMPLE, "-o", tmp_path / "baked.safetensors", "--allow-unmatched")
    run("extract", base, tmp_path / "baked.safetensors", "-o", tmp_path / "x.safetensors", "--rank", "4")
    extracted = json.loads(run("inspect", "--json", tmp_path / "x.safetensors"))[0]
    assert extracted["modules"] == 4 and extracted["family"]["id"] in ("sdxl", "unknown")
