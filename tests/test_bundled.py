"""The bundled model: where it is, what it says of itself, what it weighs."""

from __future__ import annotations

from easyref.bundled import BUNDLED_DIR, bundled_model_dir, is_bundled


def test_the_bundled_model_describes_the_world_it_learned():
    """`world.json` beside the bundled model (what generate's warnings and `info` quote) is the shapes
    world's own vocabulary."""
    from easyref.bundled import trained_world
    from easyref.shapes.world import BACKGROUNDS, POSITIONS

    assert trained_world() == {"backgrounds": list(BACKGROUNDS), "positions": list(POSITIONS)}


def test_the_shipped_model_fits_its_size_budget():
    """The budget for the weights that ship inside the package: 25 MB in all (raised from 15 MB for a base
    UNet with a third level, which places objects where the prompt asks)."""
    files = [f for f in BUNDLED_DIR.rglob("*") if f.is_file()]
    assert any(f.name.endswith(".safetensors") for f in files)
    assert sum(f.stat().st_size for f in files) <= 25_000_000


def test_is_bundled_knows_the_folder_and_its_parts(tmp_path):
    assert bundled_model_dir() == BUNDLED_DIR
    assert is_bundled(BUNDLED_DIR) and is_bundled(BUNDLED_DIR / "sdxl") and is_bundled(str(BUNDLED_DIR / "adapter"))
    assert not is_bundled(tmp_path) and not is_bundled(BUNDLED_DIR.parent)
