"""What the reference tokens took from each reference: the aggregation layer's attention, as maps.

The 64 reference tokens see the group only through the aggregation layer's self-attention over the
trunk's output. For each reference image, its map is the attention from all reference tokens to that
image's visual tokens, summed over heads and over the reference tokens, laid out on the image's merged
patch grid (Qwen2-VL merges 2 x 2 patches of 14 px into one token, so a 112 px reference gives 4 x 4).
A group's maps are divided by their joint total, so they sum to 1 and each reference's *share* is the
sum of its map: attention to the instruction and prompt tokens is left out, since it says nothing about
the images. In the `mean` and `concat` modes each reference is read alone and weighs the same in the
result, so each reference's map is its own row's attention normalised to 1 / (group size).

The attention is captured from a second pass of the aggregation layer over the same trunk output
(`capture_attention`), run with transformers' eager attention, the only implementation that returns the
weights. The tokens the images are made from come from the ordinary pass, so asking for the maps never
changes a pixel (eager and SDPA attention differ in float rounding).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture_attention(layer: nn.Module):
    """Within the block, `layer.self_attn` runs eagerly and appends its (B, heads, L, L) weights to the
    yielded list."""
    attn = layer.self_attn
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_hook(lambda module, args, output: captured.append(output[1].detach()))
    saved = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        yield captured
    finally:
        attn.config._attn_implementation = saved
        handle.remove()


def image_token_maps(
    weights: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    grid_thw: torch.Tensor,
    merge: int,
    num_tokens: int,
) -> list[list[torch.Tensor]]:
    """Per row, per image in the row: the reference tokens' attention to that image's tokens, as a
    (height, width) grid, normalised so a row's images sum to 1."""
    received = weights[:, :, -num_tokens:, : input_ids.shape[1]].float().sum(dim=(1, 2))  # (rows, L)
    grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
    rows, image = [], 0
    for row in range(input_ids.shape[0]):
        mass = received[row][input_ids[row] == image_token_id]
        total, maps = mass.sum().clamp_min(1e-12), []
        while mass.numel():
            t, h, w = grids[image]
            maps.append((mass[: t * h * w].reshape(t, h, w).sum(0) / total).cpu())
            mass, image = mass[t * h * w :], image + 1
        rows.append(maps)
    return rows


def group_maps(row_maps: list[list[torch.Tensor]], group_sizes: list[int] | None) -> list[list[torch.Tensor]]:
    """Rows -> groups: a joint row is already its group; single-reference rows weigh 1 / (group size) each."""
    if group_sizes is None:
        return row_maps
    groups, start = [], 0
    for size in group_sizes:
        groups.append([maps[0] / size for maps in row_maps[start : start + size]])
        start += size
    return groups


def overlay(image, grid: torch.Tensor, cell: int = 256):
    """The reference (fitted into a `cell` box) lit by its map: cells the reference tokens attended to
    most at full brightness, the least at a quarter, on the map's own min-max range. Cells are drawn as
    blocks, the map's real resolution; the map covers the whole image, as the processor's resize does."""
    from PIL import Image

    from .images import to_rgb

    base = to_rgb(image)
    base.thumbnail((cell, cell))
    factor = cell // max(base.width, base.height)
    if factor >= 2:  # small references are shown larger, pixels kept sharp
        base = base.resize((base.width * factor, base.height * factor), Image.NEAREST)
    low, high = grid.min(), grid.max()
    heat = (grid - low) / (high - low) if high > low else torch.ones_like(grid)
    light = ((0.25 + 0.75 * heat) * 255).round().to(torch.uint8).numpy()
    mask = Image.fromarray(light, "L").resize(base.size, Image.NEAREST)
    return Image.composite(base, Image.new("RGB", base.size, "black"), mask)


def explain_sheet(references, maps: list[torch.Tensor], cell: int = 256):
    """One group: each reference with its map, and under it the share of attention it received."""
    from PIL import Image, ImageDraw

    if len(references) != len(maps):
        raise ValueError(f"{len(references)} references but {len(maps)} maps")
    label = 24
    sheet = Image.new("RGB", (cell * len(references), cell + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, grid) in enumerate(zip(references, maps)):
        tile = overlay(image, grid, cell)
        sheet.paste(tile, (i * cell + (cell - tile.width) // 2, (cell - tile.height) // 2))
        draw.text(
            (i * cell + 6, cell + 6),
            f"reference {i + 1}: {100 * float(grid.sum()):.0f}% of the attention",
            fill="black",
        )
    return sheet
