"""The miniature MRBench: EasyRef against the mean and concat baselines on the shapes world.

All three methods share the base model, the MLLM, the data and the first two stages (with one
reference they are the same computation); only stage 3 differs, trained from the same stage-2
checkpoint for the same number of steps, with `reference_mode` joint / mean / concat.

Cells (each `groups` groups, one image per group, the same seeds for every method):
- by distractors: held-in and held-out subjects, 3 references, 0 / 1 / 2 distractors per reference;
- by references: held-out subjects, 1 distractor, 1 / 2 / 3 / 5 / 8 references.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .evaluate import METRICS, generate_for_groups, score_images, summarize
from .world import make_groups

logger = logging.getLogger(__name__)

METHODS = ("easyref", "mean", "concat")
MODES = {"easyref": "joint", "mean": "mean", "concat": "concat"}
DISTRACTOR_CELLS = [(split, 3, d) for split in ("held-in", "held-out") for d in (0, 1, 2)]
REFERENCE_CELLS = [("held-out", n, 1) for n in (1, 2, 3, 5, 8)]
CELLS = list(dict.fromkeys(DISTRACTOR_CELLS + REFERENCE_CELLS))  # 10: (held-out, 3, 1) is in both lists
# scoring sizes per preset, (groups per cell, denoising steps): what --groups / --steps default to.
# smoke only checks that the chain runs, so its scoring is as small as its training
# (3 methods x 10 cells x 2 groups x 2 steps; the full sizes were 64 x 30, over 10 minutes on 2 cores)
EVAL_SIZES = {"smoke": (2, 2), "cpu": (64, 30), "gpu": (64, 30), "full": (64, 30)}


# ---------------------------------------------------------------------- training the baselines
def train_methods(work: Path, recipe, cpu: bool = True) -> dict[str, Path]:
    """Stage 3 once per reference mode from the shared stage-2 checkpoint; returns model folders."""
    from ..train.trainer import Trainer
    from .demo_model import package, stage_config

    folders = {}
    for method in METHODS:
        # EasyRef's stage 3 is the demo model's own (work/stage3); the baselines get their own runs
        stage_dir = work / ("stage3" if method == "easyref" else f"stage3-{method}")
        if not (stage_dir / "final" / "easyref.safetensors").is_file():
            config = stage_config(recipe, 3, work, cpu)
            config = dataclasses.replace(config, output_dir=str(stage_dir), reference_mode=MODES[method])
            Trainer(config, cpu=cpu).train()
        folders[method] = work / f"model-{method}"
        package(work, folders[method], recipe, {}, adapter=stage_dir / "final")
    return folders


# ---------------------------------------------------------------------- evaluation
def load_method(folder: Path, device: str = "cpu"):
    from ..pipeline import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(folder / "sdxl", mllm=folder / "qwen2vl", adapter=folder / "adapter")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def cell_groups(split: str, refs: int, distractors: int, count: int, seed: int):
    return make_groups(split, count, refs, distractors, seed=seed + 1000)  # never the training seeds


def evaluate_methods(folders: dict[str, Path], out: Path, groups: int = 64, steps: int = 30,
                     guidance: float = 5.0, seed: int = 0, device: str = "cpu") -> dict:
    """Generate and score every cell for every method; write items.jsonl, summary.json, table and plot."""
    from .oracle import load_oracle

    out.mkdir(parents=True, exist_ok=True)
    oracle = load_oracle()
    cells = CELLS
    summary: dict = {"settings": {"groups": groups, "steps": steps, "guidance": guidance, "seed": seed}, "cells": []}
    outcomes: dict[tuple, list[bool]] = {}
    with open(out / "items.jsonl", "w") as items:
        for method, folder in folders.items():
            pipe = load_method(folder, device)
            for split, refs, distractors in cells:
                started = time.perf_counter()
                batch = cell_groups(split, refs, distractors, groups, seed)
                images = generate_for_groups(pipe, batch, seed=seed, steps=steps, guidance=guidance)
                scores = score_images(oracle, batch, images)
                outcomes[(method, split, refs, distractors)] = [s.identity for s in scores]
                for s in scores:
                    items.write(json.dumps({"method": method, "refs": refs, "distractors": distractors, **dataclasses.asdict(s)}) + "\n")
                row = {"method": method, "split": split, "refs": refs, "distractors": distractors, **summarize(scores)}
                summary["cells"].append(row)
                logger.info("%s %s refs=%d distractors=%d identity %.3f prompt %.3f (%.0fs)", method, split, refs,
                            distractors, row["identity"], row["prompt"], time.perf_counter() - started)
                _save_examples(out / "examples" / f"{method}-{split}-{refs}-{distractors}.png", batch[:6], images[:6])
    if "easyref" in folders and len(folders) > 1:
        summary["paired"] = paired_identity(outcomes)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown_tables(summary))
    plot_by_references(summary, out / "by_references.png")
    # colour is the attribute a weak model gets first: this plot still separates methods when identity is near zero
    plot_by_references(summary, out / "by_references_colour.png", metric="colour")
    return summary


def _save_examples(path: Path, groups, images) -> None:
    """One row per group: its references, the target render, the generated image."""
    from .world import render

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(len(g.references) for g in groups) + 2
    sheet = Image.new("RGB", (64 * cols, 64 * len(groups)), "white")
    for row, (group, image) in enumerate(zip(groups, images)):
        tiles = [render(s) for s in group.references]
        tiles += [Image.new("RGB", (64, 64), "white")] * (cols - 2 - len(tiles)) + [render(group.target), image.resize((64, 64))]
        for col, tile in enumerate(tiles):
            sheet.paste(tile, (64 * col, 64 * row))
    sheet.save(path)


# ---------------------------------------------------------------------- reporting
def markdown_tables(summary: dict) -> str:
    cells = summary["cells"]
    lines = ["### By distractors (3 references)", "",
             "| split | distractors | method | identity | shape | colour | pattern | prompt | similarity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, refs, d in DISTRACTOR_CELLS:
        for row in (c for c in cells if (c["split"], c["refs"], c["distractors"]) == (split, refs, d)):
            lines.append(_row([split, d, row["method"]], row))
    lines += ["", "### By number of references (held-out, 1 distractor)", "",
              "| references | method | identity | shape | colour | pattern | prompt | similarity |",
              "|---|---|---|---|---|---|---|---|"]
    for split, refs, d in REFERENCE_CELLS:
        for row in (c for c in cells if (c["split"], c["refs"], c["distractors"]) == (split, refs, d)):
            lines.append(_row([refs, row["method"]], row))
    if summary.get("paired"):
        lines += ["", "### EasyRef against each baseline, paired by group (identity)", "",
                  "Groups only EasyRef drew right, groups only the baseline did, and the exact sign test's p.", "",
                  "| baseline | cell | only EasyRef | only baseline | p |", "|---|---|---|---|---|"]
        lines += [f"| {r['baseline']} | {r['cell']} | {r['only_method']} | {r['only_baseline']} | {_p_text(r['p'])} |"
                  for r in summary["paired"]]
    return "\n".join(lines) + "\n"


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: how likely a split at least this uneven is if neither side is better."""
    total = wins + losses
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**total)


def paired_identity(outcomes: dict[tuple, list[bool]], method: str = "easyref") -> list[dict]:
    """`method` against each other method, group by group (same group, same seed): per cell and pooled,
    the groups only one of the two got right, and the sign test's p. Cells are compared by pairs
    because their groups are shared, which is much less noisy than comparing two accuracies."""
    rows = []
    for baseline in dict.fromkeys(key[0] for key in outcomes if key[0] != method):
        total = [0, 0]
        for (name, split, refs, distractors), ours in outcomes.items():
            if name != method or (baseline, split, refs, distractors) not in outcomes:
                continue
            theirs = outcomes[(baseline, split, refs, distractors)]
            wins = sum(a and not b for a, b in zip(ours, theirs))
            losses = sum(b and not a for a, b in zip(ours, theirs))
            total = [total[0] + wins, total[1] + losses]
            rows.append({"baseline": baseline, "cell": f"{split}, {refs} refs, {distractors} distractors",
                         "only_method": wins, "only_baseline": losses, "p": sign_test_p(wins, losses)})
        rows.append({"baseline": baseline, "cell": "all cells", "only_method": total[0],
                     "only_baseline": total[1], "p": sign_test_p(*total)})
    return rows


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def _row(keys: list, row: dict) -> str:
    values = [f"{100 * row[m]:.1f}" if m != "similarity" else f"{row[m]:.3f}" for m in METRICS]
    return "| " + " | ".join(str(k) for k in [*keys, *values]) + " |"


def plot_by_references(summary: dict, path: Path, metric: str = "identity") -> None:
    """Identity accuracy against the number of references, one line per method (drawn with PIL)."""
    colours = {"easyref": (200, 40, 40), "mean": (40, 90, 200), "concat": (40, 150, 60)}
    width, height, margin = 520, 340, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [n for _, n, _ in REFERENCE_CELLS]
    to_x = lambda n: margin + (xs.index(n)) * (width - 2 * margin) / (len(xs) - 1)
    to_y = lambda v: height - margin - v * (height - 2 * margin)
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, to_y(tick) - 6), f"{int(tick * 100)}%", fill="black")
        draw.line([(margin, to_y(tick)), (width - margin, to_y(tick))], fill=(225, 225, 225))
    for n in xs:
        draw.text((to_x(n) - 3, height - margin + 8), str(n), fill="black")
    draw.text((width // 2 - 60, height - 20), "number of references", fill="black")
    draw.text((margin, 12), f"{metric} accuracy, held-out subjects, 1 distractor", fill="black")
    for i, method in enumerate(METHODS):
        rows = {c["refs"]: c[metric] for c in summary["cells"]
                if c["method"] == method and (c["split"], c["refs"], c["distractors"]) in REFERENCE_CELLS}
        if not rows:
            continue
        points = [(to_x(n), to_y(rows[n])) for n in xs if n in rows]
        draw.line(points, fill=colours[method], width=3)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[method])
        draw.text((width - margin - 60, margin + 14 * i), method, fill=colours[method])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------------- the command
def run(out: Path, preset: str = "cpu", groups: int | None = None, steps: int | None = None,
        work: Path | None = None, cpu: bool = True, seed: int = 0) -> dict:
    """From nothing: the demo-model build (base + stages 1-3), the two baselines' stage 3, the evaluation.
    `groups` / `steps` default to the preset's scoring sizes (`EVAL_SIZES`)."""
    from .demo_model import PRESETS, build

    recipe = PRESETS[preset]
    groups = groups or EVAL_SIZES[preset][0]
    steps = steps or EVAL_SIZES[preset][1]
    work = work or out / "work"
    if not (work / "stage2" / "final" / "easyref.safetensors").is_file():
        build(out / "model-demo", recipe, work, cpu)
    folders = train_methods(work, recipe, cpu)
    summary = evaluate_methods(folders, out, groups=groups, steps=steps, seed=seed)
    if work == out / "work":
        shutil.rmtree(work / "data", ignore_errors=True)  # thousands of renders, easy to make again
    return summary
