"""`loratools report` and `inspect --plot`: the page's numbers are inspect's, modules sit in the base model's
blocks, a resized copy compares on the same axes, and the page renders in a real browser without the network."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from synth import layout, synthesize

import loratools
from loratools.cli import cli
from loratools.errors import UsageError
from loratools.ops.threads import small_matrix_threads
from loratools.visual import render
from loratools.visual.blocks import Placer
from loratools.visual.html import DATA_ID

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "examples" / "sdxl_slider_kohya.safetensors"
WAN_DIMS = {"ffn.0": (13824, 5120), "ffn.2": (5120, 13824)}  # (out, in) of Wan 2.1 14B; attention is 5120²

# layout -> (family, {component: {stack: cells}}) the block axis must show
CASES = {
    "sd15__kohya__safetensorsutil-keys-only.json": (
        "sd1", {"unet": {"input_blocks": 12, "middle_block": 3, "output_blocks": 12},
                "te1": {"text_model.encoder.layers": 12}}),
    "sdxl__kohya__invokeai-slider-keys-only.json": (
        "sdxl", {"unet": {"input_blocks": 9, "middle_block": 3, "output_blocks": 9}}),
    "flux1__kohya__invokeai-pokemon.json": ("flux1", {"transformer": {"double blocks": 19, "single blocks": 38}}),
    # names and shapes cannot tell Wan 2.1 from 2.2 (only metadata can): undecided, with both block layouts equal
    "wan21__diffusion_model_peft__issue-fragment.json": ("unknown", {"transformer": {"transformer blocks": 40}}),
}


def _wan_layout() -> dict:
    """The Wan fragment's real key names with the 14B model's module shapes (the issue log gave names only)."""
    lay = copy.deepcopy(layout("wan21__diffusion_model_peft__issue-fragment.json"))
    for key, t in lay["tensors"].items():
        module = re.sub(r"^diffusion_model\.blocks\.\d+\.|\.lora_[AB]\.weight$", "", key)
        out_f, in_f = WAN_DIMS.get(module, (5120, 5120))
        t["shape"] = [4, in_f] if ".lora_A." in key else [out_f, 4]
        t["dtype"] = "BF16"
    return lay


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("visual")
    out = {}
    for name in CASES:
        data = _wan_layout() if name.startswith("wan21") else None
        out[name] = synthesize(name, folder / (Path(name).stem + ".safetensors"), rank=4, layout_data=data, seed=3)
    return out


def _embedded(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    m = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1).replace("<\\/", "</"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_numbers_are_inspect_stats_and_blocks_follow_the_model(name, files, tmp_path):
    path = files[name]
    family, expected_axis = CASES[name]
    result = loratools.report(path, tmp_path / "r.html")
    data = _embedded(Path(result.output))
    assert data == json.loads(json.dumps(result.data))
    [lora] = data["loras"]
    # the inspect summary is inspect's, and every module's numbers are `inspect --stats`'
    assert lora["inspect"] == json.loads(json.dumps(loratools.inspect(path, hashes=True, metadata=True)))
    # the report measures with one BLAS thread (ops/threads.py); the same thread count gives the same bits
    with small_matrix_threads():
        stats = loratools.inspect(path, stats=True)["stats"]
    assert lora["inspect"]["family"]["id"] == family
    if family == "unknown":
        assert "wan21" in lora["inspect"]["family"]["candidates"]
    assert len(lora["modules"]) == len(stats["modules"]) > 0
    for mine, theirs in zip(lora["modules"], stats["modules"]):
        for field in ("name", "component", "norm", "effective_rank", "top_singular_value", "flags"):
            assert mine[field] == theirs[field], (mine["name"], field)
    assert lora["stats"] == stats["summary"]
    # the block axis is the base model's: every block of each stack, in model order
    axis = {c["component"]: c["cells"] for c in data["axis"]}
    for component, stacks in expected_axis.items():
        counts: dict[str, int] = {}
        for cell in axis[component]:
            counts[cell["stack"]] = counts.get(cell["stack"], 0) + 1
        assert {k: v for k, v in counts.items() if k is not None} == stacks
        indices = [c["index"] for c in axis[component] if c["stack"] == next(iter(stacks))]
        assert indices == sorted(indices) == list(range(indices[0], indices[0] + len(indices)))
    assert [c["component"] for c in data["axis"]][0] in ("unet", "transformer")
    # a block's strength is the norm of all its modules' updates together
    by_block: dict[tuple, float] = {}
    for row in lora["modules"]:
        by_block[(row["component"], row["block"])] = by_block.get((row["component"], row["block"]), 0.0) + \
            row["norm"] ** 2
    for cell in lora["blocks"]:
        assert cell["norm"] == pytest.approx(math.sqrt(by_block[(cell["component"], cell["block"])]), rel=1e-12)


def test_modules_land_in_their_blocks():
    """Blocks come from canonical names: kohya and diffusers spellings of one module meet in one block."""
    sd1 = Placer("sd1", "kohya", [])
    assert sd1.place("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")[0].block == \
        "input_blocks 1"
    assert sd1.place("unet", "up_blocks_3_attentions_2_proj_out")[0].block == "output_blocks 11"
    assert sd1.place("unet", "mid_block_attentions_0_proj_in")[0].block == "middle_block 1"
    assert sd1.place("unet", "input_blocks_4_1_proj_in")[0].block == "input_blocks 4"
    assert sd1.place("unet", "time_embed_0")[0].stack is None  # outside the blocks
    assert sd1.place("te1", "text_model_encoder_layers_5_mlp_fc1")[0].block == "text_model.encoder.layers 5"
    flux = Placer("flux1", "diffusers", [])
    assert flux.place("transformer", "single_transformer_blocks.3.attn.to_q")[0].block == "single blocks 3"
    assert flux.place("transformer", "transformer_blocks.7.attn.add_k_proj")[0].block == "double blocks 7"
    assert Placer("flux1", "kohya", []).place("transformer", "double_blocks_7_img_attn_qkv")[0].block == \
        "double blocks 7"
    unknown = Placer(None, "comfy", [])
    assert unknown.place("transformer", "blocks.12.self_attn.q")[0].block == "blocks 12"  # the generic rule
    assert unknown.place("transformer", "lora_unet_blocks_3_x")[0].stack is None  # flat names are never split


def test_kohya_and_diffusers_spellings_give_the_same_map(files, tmp_path):
    src = files["sdxl__kohya__invokeai-slider-keys-only.json"]
    other = loratools.convert(src, to="diffusers", output=tmp_path / "d.safetensors").output
    data = loratools.visual.collect([src, other], hashes=False)
    a, b = ({c["block"]: c["norm"] for c in d["blocks"]} for d in data["loras"])
    assert a.keys() == b.keys() and len(a) > 5
    for block, norm in a.items():
        assert b[block] == pytest.approx(norm, rel=1e-3)


def test_comparison_with_a_resized_copy_agrees_with_resize(files, tmp_path):
    src = files["sdxl__kohya__invokeai-slider-keys-only.json"]
    with loratools.load(src) as lora:
        small, report = loratools.resize(lora, rank=2)
        loratools.save(small, tmp_path / "r2.safetensors")
    with loratools.load(src) as lora:
        _, dyn_report = loratools.resize(lora, dynamic="sv_fro:0.9")
    result = loratools.report([src, tmp_path / "r2.safetensors"], tmp_path / "cmp.html", ranks=[2],
                              dynamic=["sv_fro:0.9"])
    first, second = result.data["loras"]
    fixed, dyn = first["resize"]["predictions"]
    for pred, real in ((fixed, report["summary"]), (dyn, dyn_report["summary"])):
        assert pred["retained_mean"] == pytest.approx(real["retained_mean"], rel=1e-12)
        assert pred["retained_min"] == pytest.approx(real["retained_min"], rel=1e-12)
        for k in ("parameters_before", "parameters_after", "bytes_before", "bytes_after"):
            assert pred[k] == real[k], k
    # the copy holds the energy the prediction said it would keep (fp16 storage rounds a little)
    kept = (second["stats"]["total_norm"] / first["stats"]["total_norm"]) ** 2
    assert kept == pytest.approx(fixed["energy_retained"], rel=1e-2)
    page = Path(result.output).read_text(encoding="utf-8")
    assert 'id="comparison"' in page and page.count("<svg") == 2 + 2 * 2
    assert [c["component"] for c in result.data["axis"]] == ["unet"]


def test_strength_scales_the_norms(files, tmp_path):
    src = files["flux1__kohya__invokeai-pokemon.json"]
    data = loratools.visual.collect([src, f"{src}:0.5"], hashes=False)
    full, half = data["loras"]
    assert half["label"].endswith("×0.5") and half["strength"] == 0.5
    for a, b in zip(full["modules"], half["modules"]):
        assert b["norm"] == pytest.approx(a["norm"] / 2, rel=1e-12)
    assert half["retained_energy"] == full["retained_energy"]  # fractions do not depend on strength


def test_flags_nan_zero_and_contradicting_metadata(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = synthesize("sd15__kohya__safetensorsutil-keys-only.json", tmp_path / "a.safetensors", rank=4,
                     metadata={"ss_network_dim": "64", "ss_network_alpha": "32"})
    tensors = load_file(src)
    downs = sorted(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[downs[0]] = np.full_like(tensors[downs[0]], np.nan)
    for k in (downs[1], downs[1].replace("lora_down", "lora_up")):
        tensors[k] = np.zeros_like(tensors[k])
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_network_dim": "64", "ss_network_alpha": "32"})
    data = loratools.report(tmp_path / "b.safetensors", tmp_path / "b.html").data["loras"][0]
    flags = data["flags"]
    stem = lambda k: k.removeprefix("lora_unet_").removeprefix("lora_te_").split(".")[0]  # noqa: E731
    assert [stem(n) for n in flags["nan_or_inf"]] == [stem(downs[0])]
    assert [stem(n) for n in flags["all_zero"]] == [stem(downs[1])]
    assert any("ss_network_dim 64" in c for c in flags["contradictions"])
    assert any("ss_network_alpha 32" in c for c in flags["contradictions"])
    flagged = [c for c in data["blocks"] if c["flags"]]
    assert sorted(f for c in flagged for f in c["flags"]) == ["all_zero", "nan_or_inf"]
    assert any("NaN/Inf" in r for r in data["resize"]["refused"])
    page = (tmp_path / "b.html").read_text(encoding="utf-8")
    assert 'class="flags bad"' in page and "hold NaN or Inf" in page


class _Resources(HTMLParser):
    """Every tag or attribute that would make a browser fetch something."""

    def __init__(self):
        super().__init__()
        self.fetches, self.scripts = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a.get("type"))
        if tag in ("link", "iframe", "img", "object", "embed", "audio", "video", "source"):
            self.fetches.append(tag)
        for name in ("src", "srcset", "xlink:href", "href"):
            if a.get(name) and not a[name].startswith("#"):
                self.fetches.append(f"{tag} {name}={a[name]}")


def test_page_is_self_contained(tmp_path):
    page = Path(loratools.report(EXAMPLE, tmp_path / "x.html").output).read_text(encoding="utf-8")
    parser = _Resources()
    parser.feed(page)
    assert parser.fetches == [] and parser.scripts == ["application/json"]
    assert not re.search(r"url\(\s*['\"]?(?!#)", page) and "@import" not in page  # url(#clip) stays in the page
    # the example's metadata says dim 32 / alpha 32; its tensors are rank 4, alpha 8
    assert "ss_network_dim 32, but the tensors have rank 4" in page


def test_cli_report_json_and_refusals(files, tmp_path):
    src = files["flux1__kohya__invokeai-pokemon.json"]
    runner = CliRunner()
    r = runner.invoke(cli, ["report", str(src), "-o", str(tmp_path / "p.html"), "--json", "--no-hash", "--rank", "2"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["output"] == str(tmp_path / "p.html") and doc["loras"][0]["inspect"].get("hashes") is None
    assert [p["label"] for p in doc["loras"][0]["resize"]["predictions"]][0] == "--rank 2"
    again = subprocess.run([shutil.which("loratools") or "loratools", "report", str(src), "-o",
                            str(tmp_path / "p.html")], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    same = runner.invoke(cli, ["report", str(src), "-o", str(src)])
    assert same.exit_code != 0 and os.path.getsize(src) > 0


def test_a_folder_stands_for_its_loras(files, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("sdxl__kohya__invokeai-slider-keys-only.json", "flux1__kohya__invokeai-pokemon.json"):
        shutil.copy(files[name], folder / files[name].name)
    result = loratools.report(folder, hashes=False)
    assert result.output == str(tmp_path / "loras.report.html") and os.path.isfile(result.output)
    assert sorted(d["inspect"]["family"]["id"] for d in result.data["loras"]) == ["flux1", "sdxl"]
    assert [c["component"] for c in result.data["axis"]] == ["transformer", "unet"]


def test_inspect_plot_writes_the_block_map(files, tmp_path):
    src = files["sd15__kohya__safetensorsutil-keys-only.json"]
    png = tmp_path / "blocks.png"
    r = CliRunner().invoke(cli, ["inspect", str(src), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[1] == render.WIDTH * 150 and pixels.shape[0] == render.MAP_HEIGHT * 150
    assert pixels[..., :3].std() > 0.05
    again = CliRunner().invoke(cli, ["inspect", str(src), "--plot", str(png)])
    assert isinstance(again.exception, UsageError) and "--overwrite" in str(again.exception)  # exit 2 from main()


def test_report_entry_point_is_the_html_report():
    """`loratools.report` is the HTML report; the terminal renderer has a module of its own."""
    from loratools import terminal

    from loratools.visual import report as report_function

    assert loratools.report is report_function and callable(terminal.print_inspect)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]
_PROBE = ("<script>document.body.setAttribute('data-svg', JSON.stringify([...document.querySelectorAll('svg')]"
          ".map(s => {const r = s.getBoundingClientRect(); return [r.width, r.height, s.getAttribute('width'), "
          "s.getAttribute('height')]})));</script>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not found (Debian: apt-get install chromium); "
                                             "the browser check of the HTML report is skipped")
def test_page_renders_in_headless_chromium(files, tmp_path):
    src = files["flux1__kohya__invokeai-pokemon.json"]
    with loratools.load(src) as lora:
        small, _ = loratools.resize(lora, rank=2)
        loratools.save(small, tmp_path / "r2.safetensors")
    page = Path(loratools.report([src, tmp_path / "r2.safetensors"], tmp_path / "cmp.html").output)
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--enable-logging=stderr",
                    "--v=0", page.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line]
    assert console == [], console
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.1  # not a blank page
    assert (pixels.min(axis=2) < 0.5).mean() > 0.01  # ink: text, bars and lines
    # the figures are laid out at their own aspect ratio across the page's width
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", "--window-size=1200,2000", probe.as_uri()).stdout
    sizes = json.loads(re.search(r'data-svg="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert len(sizes) == 2 + 2 * 2
    for width, height, w_attr, h_attr in sizes:
        assert w_attr == f"{render.WIDTH * 72:g}pt"
        assert width > 900 and height > 150
        assert height / width == pytest.approx(float(h_attr[:-2]) / float(w_attr[:-2]), rel=0.01)
