"""The optimisation loop every shapes-world pretraining phase shares (VAE, base, MLLM vision, captions)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def optimise(
    name: str,
    steps: int,
    parameters: list,
    optimizer,
    schedule,
    loss_of_a_batch: Callable[[], torch.Tensor],
    clip: float | None = 1.0,
) -> list[float]:
    """`steps` times: a fresh batch's loss, gradients clipped to norm `clip` (None: not clipped), a
    step of the optimiser and the schedule. Returns the loss curve; logs its mean every 100 steps."""
    losses, started = [], time.perf_counter()
    for step in range(steps):
        loss = loss_of_a_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            logger.info(
                "%s step %d/%d loss %.4f (%.0fs)",
                name,
                step + 1,
                steps,
                sum(losses[-100:]) / 100,
                time.perf_counter() - started,
            )
    return losses
