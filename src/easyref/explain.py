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

import numpy as np
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


# ---------------------------------------------------------------------------- drawing
# The sheet is read in a browser column or an image viewer at a fraction of its size: its text is drawn
# large relative to a tile, and the tiles wrap into rows so that many references do not shrink it to a sliver.
SHEET_COLUMNS = 4
# inferno's ends and quarters: dark for little attention, bright for much, and in colour, so that a map
# reads on a black reference as on a white one
HEAT_STOPS = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))
HEAT_WEIGHT = 0.5  # the rest is the reference, dimmed: the map is seen, and what it lies on still is


def label_sizes(cell: int) -> tuple[int, int]:
    """Pixel sizes of a tile's share (the number that matters, large) and of its name."""
    return max(10, cell // 6), max(8, cell // 12)


def heat_colours(values) -> np.ndarray:
    """Values in [0, 1] as RGB colours of the heat scale (uint8, one more axis of 3)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    stops = np.asarray(HEAT_STOPS, dtype=np.float64)
    where = np.linspace(0.0, 1.0, len(stops))
    channels = [np.interp(values, where, stops[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(image, grid: torch.Tensor, cell: int = 256):
    """The reference (fitted into a `cell` box), dimmed, under its map in the heat scale, on the map's own
    min-max range: dark where the reference tokens attended least, bright yellow where most. Cells are drawn
    as blocks, the map's real resolution; the map covers the whole image, as the processor's resize does."""
    from PIL import Image

    from .images import to_rgb

    base = to_rgb(image)
    base.thumbnail((cell, cell))
    factor = cell // max(base.width, base.height)
    if factor >= 2:  # small references are shown larger, pixels kept sharp
        base = base.resize((base.width * factor, base.height * factor), Image.NEAREST)
    low, high = grid.min(), grid.max()
    heat = ((grid - low) / (high - low) if high > low else torch.ones_like(grid)).float().numpy()
    colours = Image.fromarray(heat_colours(heat), "RGB").resize(base.size, Image.NEAREST)
    blend = (1 - HEAT_WEIGHT) * np.asarray(base, dtype=np.float64) + HEAT_WEIGHT * np.asarray(colours)
    return Image.fromarray(blend.round().astype(np.uint8), "RGB")


def explain_sheet(references, maps: list[torch.Tensor], cell: int = 256):
    """One group: each reference with its map and, under it, the share of attention it received in large
    type; up to SHEET_COLUMNS a row; the heat scale's legend at the bottom."""
    from PIL import Image, ImageDraw

    if len(references) != len(maps):
        raise ValueError(f"{len(references)} references but {len(maps)} maps")
    share_px, name_px = label_sizes(cell)
    tile_h = cell + share_px + name_px + cell // 16  # the image, its share, its name, a gap
    columns = min(len(references), SHEET_COLUMNS)
    rows = -(-len(references) // columns)
    legend_h = 2 * name_px + cell // 8
    sheet = Image.new("RGB", (cell * columns, tile_h * rows + legend_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, grid) in enumerate(zip(references, maps)):
        x, y = (i % columns) * cell, (i // columns) * tile_h
        tile = overlay(image, grid, cell)
        sheet.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
        draw.text((x + 6, y + cell + 2), f"{100 * float(grid.sum()):.0f}%", fill="black", font=_font(share_px))
        draw.text((x + 6, y + cell + share_px + 4), f"reference {i + 1}", fill="black", font=_font(name_px))
    _draw_legend(sheet, top=tile_h * rows, height=legend_h, text_px=name_px)
    return sheet


def _draw_legend(sheet, top: int, height: int, text_px: int) -> None:
    """Low to high attention as a bar across the sheet's bottom, its ends named."""
    from PIL import Image, ImageDraw

    draw, font = ImageDraw.Draw(sheet), _font(text_px)
    low, high = "low", "high attention"
    margin = text_px // 2
    left = margin + int(draw.textlength(low, font=font)) + margin
    right = sheet.width - margin - int(draw.textlength(high, font=font)) - margin
    bar_h = max(4, height - 2 * text_px)
    bar_top = top + (height - bar_h) // 2
    if right - left >= 8:  # the bar between its two names
        bar = heat_colours(np.linspace(0.0, 1.0, right - left))[None].repeat(bar_h, axis=0)
        sheet.paste(Image.fromarray(bar, "RGB"), (left, bar_top))
    middle = bar_top + bar_h // 2
    draw.text((margin, middle), low, fill="black", font=font, anchor="lm")
    draw.text((sheet.width - margin, middle), high, fill="black", font=font, anchor="rm")


def _font(size: int):
    """Pillow's own scalable font (no font file on the machine needed)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)
