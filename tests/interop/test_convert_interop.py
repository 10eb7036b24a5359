"""Files we convert load in the real libraries and act like the original.

Sources are written by diffusers, PEFT and LyCORIS themselves (tiny models, random weights). Each is converted
to every target; diffusers/PEFT targets (and kohya SD1/SDXL files, which diffusers reads) are loaded with
`load_lora_weights` / `PeftModel.from_pretrained` into fresh models and must give the source library's own
outputs. Targets no installed library reads for these tiny models (comfy; kohya Flux, whose diffusers reader
assumes the released widths; kohya SD3, which diffusers has no reader for) are checked with `verify` against
the source, module by module.
"""

from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from interop import harness as h  # noqa: E402

import loratools  # noqa: E402

pytestmark = pytest.mark.interop
RTOL = 1e-5
TARGETS = ("kohya", "diffusers", "peft", "comfy")
DIFFUSERS_READS_KOHYA = ("sd1", "sdxl")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache, folder = {}, tmp_path_factory.mktemp("sources")

    def make(family, mixed=False):
        if (family, mixed) not in cache:
            cache[family, mixed] = h.diffusers_file(family, folder / f"{family}{int(mixed)}.safetensors", mixed=mixed)
        return cache[family, mixed]

    return make


def _load_all(family, source, out: Path, to: str):
    """Fresh components with the converted file loaded the way a user would; their outputs."""
    fresh = h.build(family)
    if to == "peft":
        folders = sorted(p for p in out.iterdir() if p.is_dir())
        assert {p.name for p in folders} == set(source.expect)
        for folder in folders:
            h.load_with_peft(fresh, folder.name, folder)
    else:
        h.load_with_diffusers(family, fresh, out, expect=source.expect)
    return fresh


def _check(family, source, out, to, src_path, mixed=False):
    assert loratools.verify(src_path, out, rtol=1e-6, family=family).equal
    # diffusers' kohya reader loses per-module alphas of attention layers when they differ (its alpha_pattern
    # keys name `processor.to_q_lora.down.weight`, which matches nothing), so mixed files are checked by verify
    if to in ("diffusers", "peft") or (to == "kohya" and family in DIFFUSERS_READS_KOHYA and not mixed):
        fresh = _load_all(family, source, Path(out), to)
        assert h.max_rel_diff(h.run(fresh), h.reference_outputs(fresh, source)) <= RTOL


@pytest.mark.parametrize("family", DIFFUSERS_READS_KOHYA)
def test_uniform_kohya_file_loads_in_diffusers(family, written, tmp_path):
    source = written(family, mixed=False)
    out = loratools.convert(source.path, "kohya", f"{tmp_path}/out/", family=family)
    _check(family, source, out.output, "kohya", source.path)


@pytest.mark.parametrize("family", h.FAMILIES)
@pytest.mark.parametrize("to", TARGETS)
def test_diffusers_written_file_converts(family, to, written, tmp_path):
    mixed = family in ("sd1", "flux1")
    source = written(family, mixed=mixed)
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family)
    _check(family, source, out.output, to, source.path, mixed)
    # and back to the format diffusers writes: still loads and acts the same
    back = loratools.convert(out.output, "diffusers", f"{tmp_path}/back/", family=family)
    fresh = _load_all(family, source, Path(back.output), "diffusers")
    assert h.max_rel_diff(h.run(fresh), h.reference_outputs(fresh, source)) <= RTOL


# A bare PEFT folder of a text encoder does not say which encoder it is, so only denoiser folders are converted.
@pytest.mark.parametrize("family,component", [("sd1", "unet"), ("flux1", "transformer"), ("sd3", "transformer")])
@pytest.mark.parametrize("to", ("kohya", "diffusers", "peft"))
def test_peft_folder_converts(family, component, to, tmp_path):
    source = h.peft_folder(family, component, tmp_path / "adapter", mixed=True)
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family)
    assert loratools.verify(source.path, out.output, rtol=1e-6, family=family).equal
    if to in ("diffusers", "peft"):  # these sources have mixed alphas: see _check about diffusers' kohya reader
        fresh = h.build(family)
        if to == "peft":
            h.load_with_peft(fresh, component, Path(out.output) / component)
        else:
            h.load_with_diffusers(family, fresh, out.output, expect=(component,))
        got, ref = h.run(fresh), h.reference_outputs(fresh, source)
        assert h.max_rel_diff({k: got[k] for k in ref if k.startswith(component)},
                              {k: ref[k] for k in ref if k.startswith(component)}) <= RTOL


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("family", ("sd1", "sdxl"))
@pytest.mark.parametrize("to", TARGETS)
def test_lycoris_written_file_converts(family, to, tmp_path):
    source = h.lycoris_file(family, tmp_path / "locon.safetensors", algo="locon")
    out = loratools.convert(source.path, to, f"{tmp_path}/out/", family=family)
    _check(family, source, out.output, to, source.path)


@pytest.mark.parametrize("family", DIFFUSERS_READS_KOHYA)
def test_mixed_alpha_kohya_file_with_uniform_alpha_loads_right_in_diffusers(family, tmp_path):
    """diffusers' kohya reader applies one alpha to every module: a PEFT adapter with rank/alpha patterns,
    written as kohya with --uniform-alpha (every alpha the same, each ratio folded into lora_up), acts as the
    original there; written plainly, diffusers misreads it and convert says so."""
    source = h.peft_folder(family, "unet", tmp_path / "adapter", mixed=True)
    plain = loratools.convert(source.path, "kohya", tmp_path / "plain.safetensors", family=family)
    assert any("--uniform-alpha" in w for w in plain.warnings)
    with pytest.raises(AssertionError):  # the alpha bug, seen by the loader check or in the outputs
        fresh = h.build(family)
        h.load_with_diffusers(family, fresh, plain.output, expect=("unet",))
        got, ref = h.run(fresh), h.reference_outputs(fresh, source)
        assert h.max_rel_diff({"unet": got["unet"]}, {"unet": ref["unet"]}) <= RTOL
    r = loratools.convert(source.path, "kohya", tmp_path / "uniform.safetensors", family=family, uniform_alpha=True)
    assert not any("--uniform-alpha" in w for w in r.warnings)
    meta = h.file_metadata(r.output)
    alphas = {float(v) for k, v in load_file(r.output).items() if k.endswith(".alpha")}
    assert len(alphas) == 1 and meta["loratools.uniform_alpha"] == f"{alphas.pop():g}"
    assert loratools.verify(source.path, r.output, rtol=1e-6, family=family).equal
    fresh = h.build(family)
    h.load_with_diffusers(family, fresh, r.output, expect=("unet",))
    got, ref = h.run(fresh), h.reference_outputs(fresh, source)
    assert h.max_rel_diff({"unet": got["unet"]}, {"unet": ref["unet"]}) <= RTOL


def test_uniform_alpha_is_refused_where_files_carry_scales(tmp_path, written):
    from loratools.errors import UsageError

    source = written("sd1")
    with pytest.raises(UsageError, match="--uniform-alpha applies to kohya and comfy"):
        loratools.convert(source.path, "diffusers", tmp_path / "x.safetensors", family="sd1", uniform_alpha=True)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("kind", ["lycoris", "diffusers"])
def test_sd1_kohya_file_loads_in_lycoris(kind, tmp_path):
    """SD 1.x kohya names are diffusers names flattened: a LyCORIS network on a diffusers UNet reads them all."""
    import torch

    if kind == "lycoris":
        source = h.lycoris_file("sd1", tmp_path / "src.safetensors", algo="locon")
    else:
        source = h.diffusers_file("sd1", tmp_path / "src.safetensors")
    out = loratools.convert(source.path, "kohya", tmp_path / "k.safetensors", family="sd1")
    target = h.lycoris_file("sd1", tmp_path / "net.safetensors", algo="locon")
    with torch.no_grad():
        for p in target.network.parameters():
            p.zero_()
    assert not target.network.load_weights(str(out.output)).get("unexpected keys")
    assert h.max_rel_diff(h.reference_outputs(target.adapted, target),
                          h.reference_outputs(source.adapted, source)) <= RTOL


@pytest.mark.skipif(not h.lycoris_available(), reason="lycoris-lora not installed")
@pytest.mark.parametrize("kind", ["lycoris", "diffusers"])
def test_sdxl_kohya_file_with_diffusers_names_loads_in_lycoris(kind, tmp_path):
    """LyCORIS matches kohya names against the module names of the model it is given. Our SDXL kohya files
    flatten the SGM names sd-scripts uses (its SDXL UNet is built that way; ComfyUI, A1111 and diffusers read them
    too), which a LyCORIS network on a diffusers UNet does not know. --kohya-names diffusers writes the names it
    knows, and the network then acts as the original, UNet and both text encoders."""
    import torch

    if kind == "lycoris":
        source = h.lycoris_file("sdxl", tmp_path / "src.safetensors", algo="locon")
    else:
        source = h.diffusers_file("sdxl", tmp_path / "src.safetensors")
    want = h.reference_outputs(source.adapted, source)
    for names in (None, "diffusers"):
        out = loratools.convert(source.path, "kohya", tmp_path / f"{names}.safetensors", family="sdxl",
                                kohya_names=names)
        assert loratools.verify(source.path, out.output, rtol=1e-6, family="sdxl").equal
        # a LyCORIS network on fresh models of the same base, built as a kohya trainer builds it, every factor
        # zeroed, then loaded from our file: only what it reads from the file acts
        target = h.lycoris_file("sdxl", tmp_path / f"net_{names}.safetensors", algo="locon")
        with torch.no_grad():
            for p in target.network.parameters():
                p.zero_()
        unexpected = target.network.load_weights(str(out.output)).get("unexpected keys", [])
        got = h.reference_outputs(target.adapted, target)
        if names is None:  # SGM names: the UNet's modules are not read, its output stays the base's
            assert unexpected and all(k.startswith("lora_unet_") for k in unexpected)
            assert h.max_rel_diff({"unet": got["unet"]}, {"unet": want["unet"]}) > 1e-3
        else:
            assert not unexpected
            assert h.max_rel_diff(got, want) <= RTOL
