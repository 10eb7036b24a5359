"""`loratools inspect`: human and JSON output, hashes, stats, and one-line errors on bad input."""

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from synth import synthesize

from loratools.cli import cli
from loratools.io.writer import write_safetensors

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "examples", "sdxl_slider_kohya.safetensors")


def run(*args):
    return CliRunner().invoke(cli, ["inspect", *map(str, args)])


def run_process(*args):
    return subprocess.run([sys.executable, "-m", "loratools", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_json_has_the_documented_fields():
    r = run(EXAMPLE, "--json")
    assert r.exit_code == 0, r.output
    [info] = json.loads(r.output)
    for field in ("path", "format", "family", "adapters", "modules", "components", "rank", "alpha", "dtypes",
                  "tensors", "parameters", "size_bytes", "metadata", "warnings"):
        assert field in info
    assert info["format"] == "kohya" and info["family"]["id"] == "sdxl"
    assert set(info["family"]) >= {"id", "variant", "confidence", "evidence", "alternatives"}
    assert info["rank"]["common"] == 4 and info["alpha"]["missing"] == 0
    assert info["components"] == {"unet": 280} and info["tensors"] == 840
    assert info["size_bytes"] == os.path.getsize(EXAMPLE)


def test_human_output_names_the_essentials():
    r = run(EXAMPLE, "--metadata")
    assert r.exit_code == 0
    for text in ("kohya", "sdxl", "unet 280", "Prodigy", "pepper"):
        assert text in r.output


def test_hashes_match_hashlib():
    r = run(EXAMPLE, "--hash", "--json")
    h = json.loads(r.output)[0]["hashes"]
    data = open(EXAMPLE, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    assert h["sha256"] == hashlib.sha256(data).hexdigest()
    assert h["autov2"] == h["sha256"][:10]
    assert h["autov3"] == hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_a_folder_of_peft_adapters_gets_the_hashes_of_each_weights_file(tmp_path):
    """`convert --to peft` writes one adapter folder per component; the folder has no single file to hash."""
    import loratools

    out = loratools.convert(EXAMPLE, to="peft", output=tmp_path / "bundle/").output
    weights = os.path.join(out, "unet", "adapter_model.safetensors")
    r = run(out, "--hash", "--json")
    assert r.exit_code == 0, r.output
    files = json.loads(r.output)[0]["hashes"]["files"]
    data = open(weights, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    assert list(files) == [os.path.join("unet", "adapter_model.safetensors")]
    assert files[os.path.join("unet", "adapter_model.safetensors")]["sha256"] == hashlib.sha256(data).hexdigest()
    assert files[os.path.join("unet", "adapter_model.safetensors")]["autov3"] == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    r = run(out, "--hash")
    assert r.exit_code == 0 and hashlib.sha256(data).hexdigest()[:20] in r.output


def test_layers_lists_every_module():
    [info] = json.loads(run(EXAMPLE, "--layers", "--json").output)
    assert len(info["layers"]) == 280
    row = info["layers"][0]
    assert row["type"] == "lora" and row["rank"] == 4 and row["alpha"] == 8.0 and row["scale"] == 2.0


def _kohya(path, tensors):
    items = []
    for stem, (up, down, alpha) in tensors.items():
        items += [(f"{stem}.lora_up.weight", "F32", up.shape, up), (f"{stem}.lora_down.weight", "F32", down.shape, down),
                  (f"{stem}.alpha", "F32", (), np.array(alpha, dtype=np.float32))]
    write_safetensors(path, items)
    return path


def test_stats_norm_is_alpha_aware_and_flags_bad_modules(tmp_path):
    rng = np.random.default_rng(0)
    up, down = rng.standard_normal((32, 4)).astype(np.float32), rng.standard_normal((4, 16)).astype(np.float32)
    nan_up = up.copy()
    nan_up[0, 0] = np.nan
    path = _kohya(tmp_path / "s.safetensors", {
        "lora_unet_a": (up, down, 2.0),
        "lora_unet_b": (nan_up, down, 4.0),
        "lora_unet_c": (np.zeros_like(up), np.zeros_like(down), 4.0),
    })
    [info] = json.loads(run(path, "--stats", "--json").output)
    rows = {r["name"]: r for r in info["stats"]["modules"]}
    dense = (2.0 / 4) * (up.astype(np.float64) @ down.astype(np.float64))
    assert rows["a"]["norm"] == pytest.approx(np.linalg.norm(dense), rel=1e-5)
    s = np.linalg.svd(dense, compute_uv=False)
    p = s / s.sum()
    assert rows["a"]["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-3)
    assert rows["b"]["flags"] == ["nan_or_inf"] and rows["c"]["flags"] == ["all_zero"]
    assert info["stats"]["summary"]["nan_or_inf"] == 1


def test_inspect_does_not_import_torch():
    code = ("import sys; from loratools.cli import main; sys.argv=['loratools','inspect','--json',%r,'--hash',"
            "'--metadata','--layers']\ntry: main()\nexcept SystemExit as e: assert not e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'" % EXAMPLE)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _good_header(tensors=None):
    tensors = tensors or {"a.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    raw = json.dumps(tensors).encode()
    return struct.pack("<Q", len(raw)) + raw


BAD_FILES = {
    "empty.safetensors": (b"", "empty file"),
    "truncated.safetensors": (b"\x10\x00\x00", "file too short for a safetensors header (3 bytes)"),
    "header_too_long.safetensors": (struct.pack("<Q", 4096) + b"{}", "runs past the end of the file"),
    "invalid_json.safetensors": (struct.pack("<Q", 5) + b"{nope", "header is not valid json"),
    "unknown_dtype.safetensors": (_good_header({"t": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}})
                                  + b"\0" * 4, "unknown dtype 'F17'"),
    "size_mismatch.safetensors": (_good_header({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})
                                  + b"\0" * 8, "span 8 bytes but F32 [3] needs 12"),
    "out_of_range.safetensors": (_good_header() + b"\0" * 8, "past the data region"),
    "overlap.safetensors": (_good_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})
                            + b"\0" * 12, "overlap"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_one_line_and_exit_2(tmp_path, name):
    data, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    r = run_process(path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"loratools: error: {path}: ") and message in r.stderr


def test_folder_without_adapter_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    r = run_process(tmp_path)
    assert r.returncode == 2 and "no adapter_config.json" in r.stderr and "Traceback" not in r.stderr


def test_pickle_is_refused_without_the_flag_and_loaded_with_it(tmp_path):
    import torch

    path = tmp_path / "lora.pt"
    torch.save({"lora_unet_a.lora_up.weight": torch.randn(8, 2), "lora_unet_a.lora_down.weight": torch.randn(2, 4),
                "lora_unet_a.alpha": torch.tensor(2.0)}, path)
    r = run_process(path)
    assert r.returncode == 2 and "--allow-pickle" in r.stderr and "Traceback" not in r.stderr
    r = run(path, "--allow-pickle", "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)[0]
    assert info["format"] == "kohya" and info["alpha"]["common"] == 2.0


def test_malformed_and_non_lora_files(tmp_path):
    bad = synthesize("sd15__malformed__timohavdk-bad-convert.json", tmp_path / "bad.safetensors")
    r = run_process(bad)
    assert r.returncode == 2 and "broken conversion" in r.stderr
    cn = synthesize("flux1__diffusers_controlnet__invokeai-instantx.json", tmp_path / "cn.safetensors")
    r = run_process(cn)
    assert r.returncode == 2 and "not a LoRA" in r.stderr


def test_one_bad_file_does_not_stop_the_others(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    r = run_process(EXAMPLE, bad, "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out[0]["format"] == "kohya" and out[1] == {"path": str(bad), "error": "empty file"}
    assert r.stderr.strip() == f"loratools: error: {bad}: empty file"


def test_folders_are_searched(tmp_path):
    (tmp_path / "sub").mkdir()
    synthesize("sd15__diffusers_peft__faithsang.json", tmp_path / "sub" / "a.safetensors")
    synthesize("sd2__diffusers_lora_linear__justinjiang.json", tmp_path / "b.safetensors")
    out = json.loads(run(tmp_path, "--json").output)
    assert sorted(i["family"]["id"] for i in out) == ["sd1", "sd2"]


def test_a_file_name_with_a_newline_stays_on_one_line(tmp_path):
    """A name cannot print a second line, or forge one that looks like another file's error."""
    bad = tmp_path / "evil\nloratools: error: fake.safetensors"
    bad.write_bytes(b"")
    r = run_process(bad)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "evil\\nloratools: error: fake.safetensors" in r.stderr, r.stderr


def test_folders_without_a_lora_say_which_case_they_are(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_process(tmp_path / "empty")
    assert r.returncode == 2 and "no LoRA in the folder" in r.stderr, r.stderr
    (tmp_path / "many").mkdir()
    write_safetensors(tmp_path / "many" / "a.safetensors", [("x", "F32", (1,), np.zeros(1, np.float32))])
    r = subprocess.run([sys.executable, "-m", "loratools", "resize", str(tmp_path / "many"), "--rank", "2", "-o",
                        str(tmp_path / "o.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the folder is not one LoRA" in r.stderr and "name a file in it" in r.stderr


def test_a_base_checkpoint_is_named_as_one_not_only_refused(tmp_path):
    """inspect reads LoRAs: a checkpoint is still refused (exit 2, one line), and the line says which family's
    base it is when its weights tell; a tensor file of no known base gets the plain refusal."""
    from test_bake import SDXL_KEYS, shapes, write_base

    write_base(tmp_path / "sdxl.safetensors", shapes("sdxl__sgm__sdmecha.json", SDXL_KEYS))
    write_base(tmp_path / "other.safetensors", {"encoder.layer.0.weight": (8, 8)})
    for name, says in (("sdxl", "it is a base checkpoint of Stable Diffusion XL (sdxl), told by its weights' names "
                                "and shapes (scan catalogues checkpoints, bake patches them)"),
                       ("other", "it looks like a full model or another kind of network (e.g. encoder.layer.0.weight)")):
        run = subprocess.run([sys.executable, "-m", "loratools", "inspect", str(tmp_path / f"{name}.safetensors")],
                             capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.rstrip().endswith(says), run.stderr
