"""The package's layers import only downwards: io and families know nothing of formats or operations, formats
know nothing of operations, and the command line goes through the Python API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loratools"

# what each layer may import besides itself (errors and _version are leaves anyone may use)
ALLOWED = {
    "errors": set(),
    "_version": set(),
    "io": set(),
    "families": set(),
    "adapters": {"model", "io", "families"},
    "model": {"adapters", "io", "families"},
    "formats": {"adapters", "model", "io", "families"},
    "ops": {"formats", "adapters", "model", "io", "families"},
    "metadata": {"io"},
    "summary": {"io", "metadata", "model"},
    "terminal": {"io", "model", "metadata", "summary"},
    "api": {"ops", "formats", "adapters", "model", "io", "families", "summary", "terminal", "metadata", "catalogue",
            "visual", "batch"},
    "catalogue": {"api", "ops", "io", "families", "record_memo", "executors"},
    "record_memo": {"io", "families"},
    # batch jobs call the API in workers; executors only wrap concurrent.futures and Dask
    "batch": {"api", "ops", "io", "catalogue"},
    "executors": set(),
    # the HTML report: measures with ops, loads through api (lazily, as catalogue does), draws with matplotlib
    "visual": {"api", "ops", "model", "io", "families", "summary", "metadata", "catalogue"},
    "cli": {"api", "cli_ops", "cli_bake", "cli_convert", "cli_scan", "io", "summary", "terminal", "metadata",
            "catalogue", "visual", "batch", "executors"},
}
LEAVES = {"errors", "_version"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts == ["loratools"]:
        return "api"  # the package's __init__ is the API
    name = parts[1]
    if name.startswith("api_"):
        return "api"  # the API's own modules (api_checkpoints: bake and extract)
    return "cli" if name.startswith("cli") or name == "__main__" else name


def _imports(path: Path) -> set[str]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "loratools"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] == "loratools":
                out.add(name)
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_go_down_the_layers(path):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    layer = _layer(module)
    allowed = ALLOWED.get(layer)
    assert allowed is not None, f"{module}: no layer rule for {layer!r}; add one to ALLOWED"
    wrong = sorted(name for name in _imports(path)
                   if _layer(name) not in allowed | LEAVES | {layer} and name != "loratools")
    assert not wrong, f"{module} ({layer}) imports {wrong}"


def test_the_rules_are_not_vacuous():
    """Each rule is checked against modules that exist and imports that were found."""
    layers = {_layer(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
              for p in SOURCES}
    assert {"io", "families", "formats", "ops", "api", "cli", "model", "adapters"} <= layers
    found = set().union(*(_imports(p) for p in SOURCES))
    assert "loratools.io.reader" in found and any(n.startswith("loratools.ops") for n in found)
