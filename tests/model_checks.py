"""What the checkpoint and release tests compare between a saved model and its reload."""

from __future__ import annotations

import torch

PROMPTS = ["a cat"]
# the release's settings are the real ones (336 px references); the tiny pipelines use smaller ones
TINY_SETTINGS = {"reference_image_size": 56, "max_references": 6}


def unet_output(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, e = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 64, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 32, generator=gen),
        "time_ids": torch.randn(2, 6, generator=gen),
        "image_embeds": [torch.randn(2, 1, 64, 64, generator=gen)],
    }
    with torch.no_grad():
        return pipe.unet(x, 10, e, added_cond_kwargs=added).sample


def tokens(pipe, groups):
    return pipe.encode_references(groups[:1], PROMPTS)


def perturb_trunk(pipe):
    """Stand-in for a stage 2-3 finetuned MLLM trunk: differs from the stock Qwen2-VL folder."""
    with torch.no_grad():
        for param in list(pipe.reference_encoder.layers.parameters()) + list(
            pipe.reference_encoder.visual.parameters()
        ):
            param.add_(0.05 * torch.randn_like(param))
