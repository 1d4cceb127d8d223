"""Score generated images against their groups with the oracle: the miniature MRBench's metrics.

- identity accuracy: shape, colour and pattern all read as the group's subject;
- per-attribute accuracy: shape, colour, pattern separately;
- prompt accuracy: background and position as the prompt asked;
- similarity: cosine of the oracle's subject embeddings, generated vs the target render (DINO-I analogue).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .world import Group, render

if TYPE_CHECKING:
    from .oracle import OracleNet

logger = logging.getLogger(__name__)

METRICS = ("identity", "shape", "colour", "pattern", "prompt", "similarity")


@dataclass
class ItemScore:
    group_id: str
    split: str
    identity: bool
    shape: bool
    colour: bool
    pattern: bool
    prompt: bool
    similarity: float


def score_images(oracle: OracleNet, groups: list[Group], images) -> list[ItemScore]:
    """One generated image per group, in the same order."""
    import torch

    from .oracle import images_to_tensor, read_images

    if len(groups) != len(images):
        raise ValueError(f"{len(groups)} groups but {len(images)} images")
    readings = read_images(oracle, images)
    with torch.no_grad():
        generated = oracle.embed(images_to_tensor(images))
        targets = oracle.embed(images_to_tensor([render(g.target) for g in groups]))
    similarity = (generated * targets).sum(-1)
    scores = []
    for group, reading, sim in zip(groups, readings, similarity.tolist()):
        s = group.subject
        shape, colour, pattern = reading.shape == s.shape, reading.colour == s.colour, reading.pattern == s.pattern
        prompt = reading.background == group.background and reading.position == group.position
        scores.append(
            ItemScore(group.id, group.split, shape and colour and pattern, shape, colour, pattern, prompt, sim)
        )
    return scores


def summarize(scores: list[ItemScore]) -> dict[str, float]:
    """Mean of each metric (accuracies as fractions); `count` items."""
    if not scores:
        return {"count": 0, **{m: float("nan") for m in METRICS}}
    out = {"count": len(scores)}
    for metric in METRICS:
        out[metric] = sum(float(getattr(s, metric)) for s in scores) / len(scores)
    return out


def generate_for_groups(
    pipe,
    groups: list[Group],
    seed: int = 0,
    steps: int = 30,
    guidance: float = 5.0,
    batch_size: int = 16,
    scale: float = 1.0,
):
    """EasyRef's image for each group (its references and prompt), batched, fixed seeds."""
    import torch

    images = []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        references = [[render(scene) for scene in g.references] for g in chunk]
        generator = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(
            references,
            [g.prompt for g in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            scale=scale,
        )
        images.extend(out.images)
    return images
