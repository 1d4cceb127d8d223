"""The README's first figure: EasyRef and the mean baseline side by side on groups averaging cannot solve.

Run (from the repository root, after `make bench-shapes` or a bench run that trained both methods):

    .venv/bin/python benchmarks/shapes_figure.py runs/bundled-model.work --out examples/easyref_vs_mean.png

Rows: the demo *pick* group (`examples/pick`) under each of its two prompts, then the first held-out
*repeat* group of the benchmark's groups (a rival recurs in all references but one). Columns: the
references, the target (the oracle's answer key), then `--samples` images from EasyRef
(`model-easyref-sSEED`) and from the mean baseline (`model-mean-sSEED`), the same noise for both.
Nothing is chosen by result: the groups are fixed before any model is run.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from PIL import Image, ImageDraw

CELL = 96  # 64-px images drawn at 1.5x
LABEL = 34  # height of the text under each row


def figure_groups():
    from easyref.bench.shapes import cell_groups
    from easyref.shapes.data import demo_group, demo_prompts
    from easyref.shapes.world import target_scene

    pick = demo_group()
    first, second = demo_prompts(pick)
    swapped = dataclasses.replace(
        pick,
        prompt=second,
        subject=pick.other,
        other=pick.subject,
        target=target_scene(pick.other, pick.background, pick.position),
    )
    repeat = cell_groups(("repeat", "held-out", 3, 2), 1, seed=0)[0]
    return [dataclasses.replace(pick, prompt=first), swapped, repeat]


def compose(groups, outputs: dict[str, list[list[Image.Image]]]) -> Image.Image:
    """Per row: the references, the target, then each method's images; a gap between the blocks."""
    from easyref.shapes.world import render

    gap, header = CELL // 4, 20
    blocks = [max(len(g.references) for g in groups), 1] + [len(images[0]) for images in outputs.values()]
    starts = [sum(blocks[:i]) * CELL + i * gap for i in range(len(blocks))]
    sheet = Image.new("RGB", (starts[-1] + blocks[-1] * CELL, header + len(groups) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for start, title in zip(starts, ["references", "target", *outputs]):
        draw.text((start + 2, 4), title, fill="black")
    for row, group in enumerate(groups):
        top = header + row * (CELL + LABEL)
        tiles = [[render(s) for s in group.references], [render(group.target)]]
        tiles += [images[row] for images in outputs.values()]
        for start, block in zip(starts, tiles):
            for i, tile in enumerate(block):
                sheet.paste(tile.resize((CELL, CELL), Image.NEAREST), (start + i * CELL, top))
        draw.text((4, top + CELL + 4), f'{group.kind} group, prompt "{group.prompt}"', fill="black")
        subject = group.subject
        draw.text(
            (4, top + CELL + 18), f"to draw: the {subject.colour} {subject.pattern} {subject.shape}", fill="dimgray"
        )
    return sheet


def main() -> None:
    from easyref.bench.shapes import load_method, model_folder
    from easyref.shapes.evaluate import generate_for_groups

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path, help="the folder holding model-easyref-sSEED/ and model-mean-sSEED/")
    parser.add_argument("--out", type=Path, default=Path("examples/easyref_vs_mean.png"))
    parser.add_argument("--seed", type=int, default=0, help="training seed of the two models")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    groups = figure_groups()
    outputs = {}
    for method, label in (
        ("easyref", "EasyRef (reads the group with the prompt)"),
        ("mean", "mean of per-reference tokens"),
    ):
        pipe = load_method(model_folder(args.models_dir, method, args.seed))
        # one group repeated: the same references, noise seeds 0..samples-1
        outputs[label] = [generate_for_groups(pipe, [g] * args.samples, steps=args.steps) for g in groups]
    compose(groups, outputs).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
