"""Periodic validation: the fixed group and prompt through the real inference pipeline, as a grid PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from ..images import open_images
from ..safe_io import check_no_symlink
from .config import TrainConfig

logger = logging.getLogger(__name__)


def load_validation_references(paths: list[str]) -> list[Image.Image]:
    """The fixed validation group, decoded by the one rule (`easyref.images.open_images`, with its pixel
    bounds): ImageFileError if unusable."""
    return open_images(paths)


def write_validation_grid(
    models, config: TrainConfig, output_dir: Path, step: int, seeds=(0, 1), references: list[Image.Image] | None = None
) -> Path:
    """References on the top row, one generated image per seed below; written atomically, never through a
    symlink in `output_dir`. `references`: the group loaded at start-up (read again from its files if None)."""
    from diffusers import EulerDiscreteScheduler

    from ..images import contact_sheet, save_png
    from ..pipeline import EasyRefPipeline

    pipe = EasyRefPipeline(
        reference_encoder=models.encoder,
        vae=models.vae,
        text_encoder=models.text_pipe.text_encoder,
        text_encoder_2=models.text_pipe.text_encoder_2,
        tokenizer=models.text_pipe.tokenizer,
        tokenizer_2=models.text_pipe.tokenizer_2,
        unet=models.unet,
        scheduler=EulerDiscreteScheduler.from_config(models.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    if references is None:
        references = load_validation_references(config.validation_references)
    size = config.resolution
    with torch.no_grad():
        images = [
            pipe(
                references,
                config.validation_prompt,
                num_inference_steps=config.validation_steps,
                guidance_scale=config.validation_guidance,
                seed=seed,
                height=size,
                width=size,
            ).images[0]
            for seed in seeds
        ]
    path = output_dir / "validation" / f"step-{step:07d}.png"
    check_no_symlink(path, output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(contact_sheet(references, images, cell=size), path, {"step": step, "prompt": config.validation_prompt})
    logger.info("validation grid: %s", path)
    return path
