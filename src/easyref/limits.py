"""The bounds of one generation request, and the range checks that enforce them, shared by every
front end that takes a request (`generate`, `serve`, `bench run`)."""

from __future__ import annotations

import math

from .errors import UserError

# Bounds checked before anything loads. They keep one command within a machine's memory (a 100 kB
# prompt or 10^6 images would otherwise run until the kernel kills it) and are far above real use.
MAX_STEPS = 1000  # SDXL's scheduler has 1000 training timesteps
MAX_IMAGES = 16
MAX_SIDE = 4096
MAX_PIXELS = 2048 * 2048  # one image
MAX_BATCH_PIXELS = 16 * 1024 * 1024  # all images of one call
MAX_GUIDANCE = 100.0
MAX_SCALE = 10.0
MAX_SEED = 2**63 - 1
MAX_REFERENCES = 64  # the largest max_references a checkpoint may declare
# A cheap bound before any tokenizer loads; the exact limit (MAX_PROMPT_TOKENS) is checked on tokens.
MAX_PROMPT_CHARS = 16 * 1024


def check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high}, got {value}")


def check_finite_range(flag: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{flag} must be a finite number between {low:g} and {high:g}, got {value}")
