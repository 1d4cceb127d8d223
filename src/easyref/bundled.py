"""The bundled model: a tiny EasyRef trained on the synthetic shapes world, shipped in the package.

`assets/bundled_model/` holds `sdxl/`, `qwen2vl/` and `adapter/`, loaded through the same
`from_pretrained` code as real weights; `easyref.shapes.build` makes it. Wherever a model is named
(`easyref.resolve`), the name `default` means this model or one of its parts. `world.json` beside
them lists the backgrounds and places its prompts were written with, so that the library can state
the model's limits without importing the shapes experiment.

Light on purpose (no torch): `easyref info` and the CLI's argument checks read it.
"""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "assets" / "bundled_model"
WORLD_FILE = "world.json"
NOTICE = (
    "using the bundled default model: a tiny EasyRef trained on CPU on the synthetic shapes world "
    "(64 px; references of one coloured, patterned shape; prompts like "
    "'an object on a white background, at the top left'). "
    "It keeps the references' subject about half the time, not yet the asked place (see README, Status)"
)


class BundledModelMissing(FileNotFoundError):
    """This copy of the package was installed without its model files."""


def bundled_model_dir() -> Path:
    """The folder with `sdxl/`, `qwen2vl/` and `adapter/`."""
    if not (BUNDLED_DIR / "adapter" / "easyref_config.json").is_file():
        raise BundledModelMissing(
            f"this copy of easyref has no bundled model ({BUNDLED_DIR} is missing or incomplete): reinstall the "
            "package, or name a model with --base/--mllm/--adapter"
        )
    return BUNDLED_DIR


def is_bundled(folder: str | Path) -> bool:
    """Whether `folder` is the bundled model or one of its parts."""
    try:
        folder = Path(folder).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    root = BUNDLED_DIR.resolve()
    return folder == root or root in folder.parents


def trained_world() -> dict[str, list[str]]:
    """The backgrounds and places (`center`, `top left`, ...) the bundled model's prompts used."""
    return json.loads((bundled_model_dir() / WORLD_FILE).read_text())


def trained_prompts() -> str:
    """The bundled model's prompt template ({a|b} is a choice). Its stage 3 saw plain groups only, so only
    the plain form."""
    world = trained_world()
    places = ["in the center" if p == "center" else f"at the {p}" for p in world["positions"]]
    return f"an object on a {{{'|'.join(world['backgrounds'])}}} background, {{{'|'.join(places)}}}"
