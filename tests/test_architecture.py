"""The layers of ARCHITECTURE.md cover the whole package: `lint-imports` constrains only the modules its
layers contract names, so a new module left out of it would escape every rule."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import tomllib

import easyref

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [name.strip() for layer in layers for name in layer.replace(":", "|").split("|")]


def test_every_module_has_a_layer():
    placed = set(_layers())
    top = {f"easyref.{m.name}" for m in pkgutil.iter_modules(easyref.__path__) if m.name != "__main__"}
    assert sorted(top - placed) == []
    assert sorted(placed - top) == []  # and the contract names no module that is gone


def test_the_architecture_document_names_every_layer_module():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for name in _layers():
        short = name.removeprefix("easyref.")
        assert f"{short}.py" in text or f"{short}/" in text, short
