"""The bundled default model.

When the package ships trained weights (`assets/default_model/`: a tiny EasyRef trained on the
shapes world by `python -m easyref.shapes.demo_model`), those are used. Otherwise a tiny *untrained*
EasyRef is built deterministically from configs (`easyref.tiny`) into a cache folder once; its
images are noise-like by design and only show the whole path running end to end.
Either way the folders load through the same `from_pretrained` code as real weights, and the
name `default` means this model (or one of its parts) wherever a model is named (`easyref.resolve`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import EasyRefConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "tiny-untrained-v1"
BUNDLED_DIR = Path(__file__).parent / "assets" / "default_model"
UNTRAINED_NOTICE = "using the bundled default model: a tiny UNTRAINED EasyRef (outputs are not meaningful)"
BUNDLED_NOTICE = (
    "using the bundled default model: a tiny EasyRef trained on CPU on the synthetic shapes world "
    "(64 px; references of one coloured, patterned shape; prompts like 'an object on a white background, at the top left'). "
    "It keeps the references' subject about half the time, not yet the asked place (see README, Status)"
)


def cache_root() -> Path:
    return Path(os.environ.get("EASYREF_HOME", Path.home() / ".cache" / "easyref"))


def tiny_config(mllm: str, base: str = "sdxl") -> EasyRefConfig:
    return EasyRefConfig(mllm=mllm, base=base, mllm_hidden_size=64, cross_attention_dim=64, reference_image_size=56,
                         lora_rank=4)


def bundled_model_dir() -> Path | None:
    """The trained weights shipped with the package, if this copy has them."""
    return BUNDLED_DIR if (BUNDLED_DIR / "adapter" / "easyref_config.json").is_file() else None


def default_model_dir() -> Path:
    """Folder with `sdxl/`, `qwen2vl/`, `adapter/`: the shipped trained model, else the untrained one."""
    return bundled_model_dir() or untrained_model_dir()


def untrained_model_dir() -> Path:
    """The untrained fallback, built on first use (atomically: temp dir, then rename)."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / "adapter" / "easyref_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        _build(work)
        try:
            os.replace(work, target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _build(folder: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from .encoder import ReferenceEncoder
    from .pipeline import EasyRefPipeline
    from .tiny import save_tiny_qwen2vl, save_tiny_sdxl

    logger.info("building the bundled default model in %s", folder)
    save_tiny_sdxl(folder / "sdxl", seed=0)
    save_tiny_qwen2vl(folder / "qwen2vl", seed=1)
    torch.manual_seed(2)
    # the config records the parts by their folder names, taken beside adapter/, so the cached folder can move
    encoder = ReferenceEncoder.from_pretrained(folder / "qwen2vl", tiny_config("qwen2vl"))
    pipe = EasyRefPipeline.from_components(StableDiffusionXLPipeline.from_pretrained(folder / "sdxl"), encoder)
    pipe.save_adapter(folder / "adapter")

