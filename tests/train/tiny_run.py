"""The settings of a seconds-long training run on the tiny models, shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_RUN = dict(
    resolution=32,
    bucket_stride=16,
    reference_image_size=56,
    max_references=4,
    num_workers=0,
    mixed_precision="no",
    gradient_checkpointing=False,
    batch_size=2,
    learning_rate=1e-3,
    lora_rank=4,
    max_steps=2,
    checkpoint_every=1000,
    log_every=1,
    tensorboard=False,
)


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path
