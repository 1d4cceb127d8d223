"""Periodic validation: the fixed group and prompt through the real inference pipeline, as a grid PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .config import TrainConfig

logger = logging.getLogger(__name__)


def load_validation_references(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(ImageOps.exif_transpose(image).convert("RGB"))
    return images


def write_validation_grid(models, config: TrainConfig, output_dir: Path, step: int, seeds=(0, 1)) -> Path:
    """References on the top row, one generated image per seed below; written atomically."""
    from diffusers import EulerDiscreteScheduler

    from ..cli import contact_sheet, save_png
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
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(contact_sheet(references, images, cell=size), path, {"step": step, "prompt": config.validation_prompt})
    logger.info("validation grid: %s", path)
    return path
