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

# Decoded size of an image file, checked on its header before any pixel is decoded (a 10 kB PNG can
# declare 9000 x 9000 pixels; PIL itself only warns above ~89 M). 50 M passes the common phone sensors
# at full resolution (48 MP = 8000 x 6000, 50 MP = 8160 x 6120) and most cameras, and refuses the 81 M of
# 9000 x 9000; larger originals (100 MP+ sensors, panoramas) must be scaled down first, which loses
# nothing here: the MLLM reads references at a few hundred pixels a side.
MAX_IMAGE_PIXELS = 50_000_000
# All references of one request together: four images at the bound, or 16 of today's 12 MP photos.
# PIL stores RGB in 4 bytes a pixel, so a group at the bound holds 0.8 GB once decoded. Peak while reading
# it (`images.open_images`, measured): that plus the transient copies of the image being decoded (the
# decoder's buffer and its copy; for transparency, the RGBA, white, composite and RGB images, about 5 x
# 0.2 GB at 50 M pixels): 1.0 GB for four 50 M RGB images, 1.5 GB for four 50 M RGBA images, the worst case.
MAX_GROUP_PIXELS = 200_000_000


def check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high}, got {_shown(value)}")


def check_finite_range(flag: str, value: float, low: float, high: float) -> None:
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond any float (a record's 10**400, say)
        finite = False
    if not finite or not low <= value <= high:
        raise UserError(f"{flag} must be a finite number between {low:g} and {high:g}, got {_shown(value)}")


def _shown(value) -> str:
    """A number from a user, cut short: a record may hold an integer of hundreds of digits."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
