"""The README's first figure: EasyRef and the mean baseline side by side on groups averaging cannot solve.

Run (from the repository root, after `make bench-shapes` or a bench run that trained both methods):

    .venv/bin/python benchmarks/shapes_figure.py runs/demo-model.work --out examples/easyref_vs_mean.png

Rows: the demo *pick* group (`examples/refs`) under each of its two prompts, then the first held-out
*repeat* group of the benchmark's groups (a rival recurs in all references but one). Columns: the
references, then `--samples` images from EasyRef (`model-easyref-sSEED`) and from the mean baseline
(`model-mean-sSEED`), the same noise for both. Nothing is chosen by result: the groups are fixed before
any model is run.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from PIL import Image, ImageDraw

CELL = 96  # 64-px images drawn at 1.5x
LABEL = 34  # height of the text under each row


def figure_groups():
    from easyref.shapes.bench import cell_groups
    from easyref.shapes.data import demo_group, demo_prompts

    pick = demo_group()
    rows = [dataclasses.replace(pick, prompt=prompt) for prompt in demo_prompts(pick)]
    repeat = cell_groups(("repeat", "held-out", 3, 2), 1, seed=0)[0]
    return rows + [repeat]


def samples(pipe, group, count: int, steps: int) -> list[Image.Image]:
    from easyref.shapes.world import render

    references = [render(scene) for scene in group.references]
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    return pipe([references] * count, [group.prompt] * count, num_inference_steps=steps, guidance_scale=5.0,
                generator=generators).images


def compose(groups, outputs: dict[str, list[list[Image.Image]]]) -> Image.Image:
    from easyref.shapes.world import render

    refs = max(len(g.references) for g in groups)
    per_method = len(next(iter(outputs.values()))[0])
    cols = refs + len(outputs) * (per_method + 1)
    header = 20
    sheet = Image.new("RGB", (cols * CELL, header + len(groups) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), "references", fill="black")
    for m, method in enumerate(outputs):
        draw.text(((refs + m * (per_method + 1) + 1) * CELL + 4, 4), method, fill="black")
    for row, group in enumerate(groups):
        top = header + row * (CELL + LABEL)
        tiles = [render(s) for s in group.references]
        for col, tile in enumerate(tiles):
            sheet.paste(tile.resize((CELL, CELL), Image.NEAREST), (col * CELL, top))
        for m, images in enumerate(outputs.values()):
            for i, image in enumerate(images[row]):
                left = (refs + m * (per_method + 1) + 1 + i) * CELL
                sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (left, top))
        draw.text((4, top + CELL + 4), f'{group.kind}: "{group.prompt}"', fill="black")
        draw.text((4, top + CELL + 18), f"target: {group.subject.colour} {group.subject.pattern} {group.subject.shape}",
                  fill="dimgray")
    return sheet


def main() -> None:
    from easyref.shapes.bench import load_method, model_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path, help="the folder holding model-easyref-sSEED/ and model-mean-sSEED/")
    parser.add_argument("--out", type=Path, default=Path("examples/easyref_vs_mean.png"))
    parser.add_argument("--seed", type=int, default=0, help="training seed of the two models")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    groups = figure_groups()
    outputs = {}
    for method, label in (("easyref", "EasyRef (reads the group with the prompt)"), ("mean", "mean of per-reference tokens")):
        pipe = load_method(model_folder(args.models_dir, method, args.seed))
        outputs[label] = [samples(pipe, g, args.samples, args.steps) for g in groups]
    compose(groups, outputs).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
