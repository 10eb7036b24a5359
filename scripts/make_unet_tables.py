"""Generate the UNet naming tables (original LDM/SGM module path <-> diffusers module path).

The pairs come from public rename maps of real checkpoints (ostris/ai-toolkit `toolkit/keymaps`, as
copied into the project's shared layouts folder). Usage:

    python scripts/make_unet_tables.py PATH/TO/lora-layouts/keymaps

Writes loratools/families/naming/{sd1,sd2,sdxl,sdxl_refiner}.unet.json (data only; the naming engine
reads them).
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "loratools" / "families" / "naming"
SOURCES = {
    "sd1": "sd15__ldm_to_diffusers__aitoolkit.json",
    "sd2": "sd2__ldm_to_diffusers__aitoolkit.json",
    "sdxl": "sdxl__ldm_to_diffusers__aitoolkit.json",
    "sdxl_refiner": "sdxl_refiner__ldm_to_diffusers__aitoolkit.json",
}
NATIVE, DIFFUSERS = "model.diffusion_model.", "unet_"


def pairs(keymap: dict) -> list[list[str]]:
    out = []
    for native, diffusers in keymap["map"].items():
        if native.startswith(NATIVE) and diffusers.startswith(DIFFUSERS) and native.endswith(".weight"):
            out.append([native[len(NATIVE):-len(".weight")], diffusers[len(DIFFUSERS):-len(".weight")]])
    return sorted(out)


def main(folder: str) -> None:
    for family, name in SOURCES.items():
        keymap = json.loads((Path(folder) / name).read_text())
        data = {"family": family, "source": keymap["source"], "pairs": pairs(keymap)}
        path = OUT / f"{family}.unet.json"
        path.write_text(json.dumps(data, indent=0) + "\n")
        print(path, len(data["pairs"]))


if __name__ == "__main__":
    main(sys.argv[1])
