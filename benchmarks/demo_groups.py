"""Which held-out groups the demo shows: the bundled model on the first groups of two plain cells, scored.

For each group of a cell (held-out subjects, 3 references, at the demo's seed), four images are made as
`easyref generate --refs-dir DIR --prompt P --seed 0 --num-images 4` makes them, at scale 1 and at scale 0
(the references unused), and the oracle reads each. The demo takes, in each cell, the first group whose four
images all show the subject (shape, colour and pattern) and whose four scale-0 images show neither its shape
nor its colour, so that the picture shows what the references changed, and whose subject an earlier cell's
figure does not already show. (The rule first asked only that no
scale-0 image show the whole subject; it chose a group whose base already drew triangles of its colour.) It
is a case the model gets right: the table says how many groups were passed over, and `benchmarks/RESULTS.md`
5c says how often the model succeeds over a whole cell.

    .venv/bin/python benchmarks/demo_groups.py [--groups 24] [--start N] [--cells subject distractors]
"""

from __future__ import annotations

import argparse

import torch

from easyref.pipeline import EasyRefPipeline
from easyref.shapes.data import DEMO_CELLS, DEMO_SEED, demo_candidates, demo_rule
from easyref.shapes.evaluate import score_images
from easyref.shapes.oracle import load_oracle
from easyref.shapes.world import render

IMAGES = 4


def images_for(pipe, group, scale: float):
    references = [render(scene) for scene in group.references]
    generator = torch.Generator("cpu").manual_seed(DEMO_SEED)
    return pipe(references, group.prompt, scale=scale, num_images_per_prompt=IMAGES, generator=generator).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=24, help="groups scored per cell (default 24)")
    parser.add_argument("--start", type=int, default=0, help="skip the cell's groups before this one")
    parser.add_argument("--cells", nargs="+", choices=list(DEMO_CELLS), default=list(DEMO_CELLS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = EasyRefPipeline.from_pretrained("default")
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle()
    print(
        "| cell | group | subject | identity at scale 1 (of 4) | identity at scale 0 "
        "| its shape or colour at scale 0 | prompt at scale 1 | chosen |"
    )
    print("|---|---|---|---|---|---|---|---|")
    shown = set()  # subjects chosen for earlier cells: each figure shows another
    for name in args.cells:
        (distractors,) = DEMO_CELLS[name]
        chosen, totals = None, [0, 0, 0]
        for index, group in enumerate(demo_candidates(distractors, args.groups)):
            if index < args.start:
                continue
            with_refs = score_images(oracle, [group] * IMAGES, images_for(pipe, group, 1.0))
            without = score_images(oracle, [group] * IMAGES, images_for(pipe, group, 0.0))
            hits = sum(s.identity for s in with_refs)
            stray = sum(s.shape or s.colour for s in without)  # the subject's look, met without the references
            counts = (hits, sum(s.identity for s in without), sum(s.prompt for s in with_refs))
            totals = [t + c for t, c in zip(totals, counts)]
            picked = chosen is None and demo_rule(hits, stray, IMAGES) and group.subject not in shown
            chosen = index if picked else chosen
            subject = f"{group.subject.colour} {group.subject.pattern} {group.subject.shape}"
            row = [name, index, subject, counts[0], counts[1], stray, counts[2], "yes" if picked else ""]
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
        if chosen is not None:
            shown.add(demo_candidates(distractors, chosen + 1)[-1].subject)
        images = IMAGES * (args.groups - args.start)
        print(
            f"\n{name}: first group meeting the rule: {chosen}; subject drawn right in {totals[0]} of {images} images "
            f"with the references, {totals[1]} without; place and background as asked in {totals[2]} with them\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
