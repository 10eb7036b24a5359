"""Every command has an API twin, help text with an example, and a section in the docs."""

from pathlib import Path

import pytest
from click.testing import CliRunner

import loratools
from loratools.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md")) + (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_is_documented(name):
    cmd = cli.commands[name]
    assert hasattr(loratools, name.replace("-", "_")), f"no loratools.{name} API twin"
    assert cmd.help and "Example:" in cmd.help
    assert f"loratools {name}" in DOCS
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_readme_commands_point_at_real_files():
    readme = (ROOT / "README.md").read_text()
    assert "fixtures/examples/sdxl_slider_kohya.safetensors" in readme
    assert (ROOT / "fixtures" / "examples" / "sdxl_slider_kohya.safetensors").is_file()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    main, tests = blocks
    # users install the package, not the source tree: no editable installs, and pytest run as a command
    assert "pip install . && loratools inspect fixtures/examples/" in main and " -e " not in main + tests
    assert tests == "pip install torch==2.13.0 && pip install '.[test]' && pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [line.replace("python -m pip", "pip").replace(" -q", "").split(" -p ")[0] for line in ci.splitlines()
             if line and not line.startswith("#") and line.split()[0] in ("python", "pytest")]
    assert steps == ["pip install torch==2.13.0", "pip install '.[test]'", "pytest"], steps
