import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth import synthesize  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Tests never touch the real home folder or hub caches."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="session")
def layout_file(tmp_path_factory):
    """Synthesise a layout once per session: layout_file('name.json') -> Path."""
    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("layouts")

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = synthesize(name, folder / (Path(name).stem + ".safetensors"))
        return cache[name]

    return make
