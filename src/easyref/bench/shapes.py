"""The miniature MRBench: EasyRef against the mean and concat baselines on the shapes world.

Every method shares the base model, the MLLM, the data and the first two stages (with one reference
they are the same computation); only stage 3 differs, trained from the same stage-2 checkpoint for the
same number of steps:
- `easyref`: the MLLM reads the whole group (`reference_mode` joint), causal aggregation as released;
- `easyref-bi`: the same with bidirectional aggregation (`attention_mode`), beyond the release;
- `mean` / `concat`: each reference read alone, its tokens averaged or concatenated.

Each method's stage 3 is trained once per seed (`seeds`: data order, dropout and noise; same data and
budget), so a method gap can be set against the same method's seed-to-seed gap.

Cells (kind, split, references, distractors; each `groups` groups, one image per group, the same groups
and noise for every method and seed):
- plain by distractors: held-in and held-out subjects, 3 references, 0 / 1 / 2 distractors;
- plain by references: held-out subjects, 1 distractor, 1 / 2 / 3 / 5 / 8 references;
- by kind: rival and repeat (2 rivals) and pick (no distractor), held-in and held-out, 3 references.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

from ..safe_io import atomic_write_text
from ..shapes.evaluate import METRICS, ItemScore, generate_for_groups, score_images, summarize
from ..shapes.world import SPLITS, make_groups

logger = logging.getLogger(__name__)

METHODS = ("easyref", "easyref-bi", "mean", "concat")
# (reference_mode, attention_mode) of each method's stage 3
MODES = {
    "easyref": ("joint", "official"),
    "easyref-bi": ("joint", "bidirectional"),
    "mean": ("mean", "official"),
    "concat": ("concat", "official"),
}
DEFAULT_SEEDS = (0, 1)
DISTRACTOR_CELLS = [("plain", split, 3, d) for split in SPLITS for d in (0, 1, 2)]
REFERENCE_CELLS = [("plain", "held-out", n, 1) for n in (1, 2, 3, 5, 8)]
KIND_CELLS = [(kind, split, 3, d) for kind, d in (("rival", 2), ("repeat", 2), ("pick", 0)) for split in SPLITS]
CELLS = list(dict.fromkeys(DISTRACTOR_CELLS + REFERENCE_CELLS + KIND_CELLS))  # 16: one cell is in two lists
# scoring sizes per preset, (groups per cell, denoising steps): what --groups / --steps default to.
# smoke only checks that the chain runs, so its scoring is as small as its training
EVAL_SIZES = {"smoke": (1, 2), "cpu": (64, 30), "gpu": (64, 30), "full": (64, 30)}


def cell_name(cell) -> str:
    kind, split, refs, distractors = cell
    return f"{kind}, {split}, {refs} refs, {distractors} {'rivals' if kind in ('rival', 'repeat') else 'distractors'}"


# ---------------------------------------------------------------------- training the methods
def model_folder(work: Path, method: str, seed: int) -> Path:
    return work / f"model-{method}-s{seed}"


def train_methods(work: Path, recipe, cpu: bool = True, methods=METHODS, seeds=DEFAULT_SEEDS) -> dict:
    """Stage 3 once per method and seed from the shared stage-2 checkpoint; returns {(method, seed): model folder}.
    A finished stage 3 is reused and a stopped one resumed, so an interrupted benchmark goes on where it stopped."""
    from ..shapes.build import package, stage_config
    from ..train.trainer import Trainer, list_checkpoints

    folders = {}
    for method in methods:
        reference_mode, attention_mode = MODES[method]
        for seed in seeds:
            # the bundled-model build's own stage 3 (work/stage3) is EasyRef's at the recipe's seed
            own = method == "easyref" and seed == recipe.seed
            stage_dir = work / ("stage3" if own else f"stage3-{method}-s{seed}")
            if not (stage_dir / "final" / "easyref.safetensors").is_file():
                config = dataclasses.replace(
                    stage_config(recipe, 3, work),
                    output_dir=str(stage_dir),
                    seed=seed,
                    reference_mode=reference_mode,
                    attention_mode=attention_mode,
                )
                # a run stopped part way goes on from its newest checkpoint, exactly as `--resume latest`
                resume = "latest" if stage_dir.is_dir() and list_checkpoints(stage_dir) else None
                Trainer(config, resume=resume, cpu=cpu).train()
            folders[method, seed] = model_folder(work, method, seed)
            if not (folders[method, seed] / "adapter").is_dir():
                package(work, folders[method, seed], recipe, {}, adapter=stage_dir / "final")
    return folders


def find_models(folder: Path) -> dict:
    """{(method, seed): model folder} for the `model-METHOD-sSEED/` folders under `folder`."""
    found = {}
    for method in METHODS:
        for path in sorted(folder.glob(f"model-{method}-s*")):
            seed = path.name.removeprefix(f"model-{method}-s")
            if seed.isdigit() and (path / "adapter").is_dir():
                found[method, int(seed)] = path
    return found


# ---------------------------------------------------------------------- evaluation
def load_method(folder: Path, device: str = "cpu"):
    from ..pipeline import EasyRefPipeline

    pipe = EasyRefPipeline.from_pretrained(folder / "sdxl", mllm=folder / "qwen2vl", adapter=folder / "adapter")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def cell_groups(cell, count: int, seed: int):
    kind, split, refs, distractors = cell
    return make_groups(split, count, refs, distractors, seed=seed + 1000, kind=kind)  # never the training seeds


def select_cells(kinds=None, splits=None) -> list[tuple]:
    """The cells of these group kinds and splits (None: all)."""
    return [c for c in CELLS if (kinds is None or c[0] in kinds) and (splits is None or c[1] in splits)]


def evaluate_methods(
    folders: dict,
    out: Path,
    groups: int = 64,
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    device: str = "cpu",
    cells=None,
) -> dict:
    """Generate and score every cell (or `cells`) for every (method, training seed); write items.jsonl,
    summary.json, summary.md and the plots. Each scored cell is kept under `out/cells/`, so a stopped
    benchmark, or one run again with more methods, scores only what it has not scored with these weights
    and settings."""
    from ..shapes.oracle import load_oracle

    out.mkdir(parents=True, exist_ok=True)
    settings = {"groups": groups, "steps": steps, "guidance": guidance, "seed": seed}
    oracle, runs, outcomes, items = None, [], {}, []
    for (method, train_seed), folder in folders.items():
        key = {**settings, "adapter_sha256": _adapter_digest(folder)}
        pipe = None
        for cell in cells or CELLS:
            record = out / "cells" / f"{method}-s{train_seed}-{_cell_slug(cell)}.json"
            scores = cached_scores(record, key)
            if scores is None:
                oracle = oracle or load_oracle()
                pipe = pipe or load_method(folder, device)
                examples = out / "examples" / f"{record.stem}.png"
                scores = _score_cell(pipe, oracle, cell, settings, examples)
                atomic_write_text(record, json.dumps({"key": key, "scores": [dataclasses.asdict(s) for s in scores]}))
            outcomes[method, train_seed, cell] = [s.identity for s in scores]
            kind, split, refs, distractors = cell
            cell_fields = {"method": method, "seed": train_seed, "kind": kind, "refs": refs, "distractors": distractors}
            items += [json.dumps({**cell_fields, **dataclasses.asdict(s)}) for s in scores]
            runs.append({**cell_fields, "split": split, **summarize(scores)})
            logger.info(
                "%s seed %d %s: identity %.3f prompt %.3f",
                method,
                train_seed,
                cell_name(cell),
                runs[-1]["identity"],
                runs[-1]["prompt"],
            )
    summary = {
        "settings": {**settings, "training_seeds": sorted({s for _, s in folders})},
        "runs": runs,
        "cells": aggregate(runs),
    }
    if any(m == "easyref" for m, _ in folders) and len({m for m, _ in folders}) > 1:
        summary["paired"] = paired_identity(outcomes, summary["cells"])
    atomic_write_text(out / "items.jsonl", "".join(line + "\n" for line in items))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "summary.md", markdown_tables(summary))
    plot_by_references(summary, out / "by_references.png")
    # colour is the attribute a weak model gets first: this plot still separates methods when identity is near zero
    plot_by_references(summary, out / "by_references_colour.png", metric="colour")
    return summary


def _cell_slug(cell) -> str:
    kind, split, refs, distractors = cell
    return f"{kind}-{split}-{refs}-{distractors}"


def _adapter_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((folder / "adapter").glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cached_scores(record: Path, key: dict) -> list[ItemScore] | None:
    """The scores kept for this cell if they were made with the same weights and settings."""
    if not record.is_file():
        return None
    try:
        kept = json.loads(record.read_text())
        if kept.get("key") == key:
            return [ItemScore(**s) for s in kept["scores"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        logger.warning("%s is unreadable; scoring its cell again", record)
    return None


def _score_cell(pipe, oracle, cell, settings: dict, examples: Path) -> list[ItemScore]:
    started = time.perf_counter()
    batch = cell_groups(cell, settings["groups"], settings["seed"])
    images = generate_for_groups(
        pipe, batch, seed=settings["seed"], steps=settings["steps"], guidance=settings["guidance"]
    )
    scores = score_images(oracle, batch, images)
    _save_examples(examples, batch[:6], images[:6])
    logger.info("scored %s in %.0fs", cell_name(cell), time.perf_counter() - started)
    return scores


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (method, cell): each metric's mean over the training seeds, and for identity and
    prompt the per-seed values and their spread (largest minus smallest)."""
    rows: dict[tuple, list[dict]] = {}
    for run in runs:
        rows.setdefault((run["method"], run["kind"], run["split"], run["refs"], run["distractors"]), []).append(run)
    out = []
    for (method, kind, split, refs, distractors), seeds in rows.items():
        row = {
            "method": method,
            "kind": kind,
            "split": split,
            "refs": refs,
            "distractors": distractors,
            "seeds": [r["seed"] for r in seeds],
            "count": sum(r["count"] for r in seeds),
        }
        for metric in METRICS:
            row[metric] = sum(r[metric] for r in seeds) / len(seeds)
        for metric in ("identity", "prompt"):
            values = [r[metric] for r in seeds]
            row[f"{metric}_by_seed"] = values
            row[f"{metric}_spread"] = max(values) - min(values)
        out.append(row)
    return out


def _save_examples(path: Path, groups, images) -> None:
    """One row per group: its references, the target render, the generated image."""
    from ..images import grid_sheet, save_png
    from ..shapes.world import render

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(len(g.references) for g in groups) + 2
    blank = Image.new("RGB", (64, 64), "white")  # keeps the target and output columns aligned
    rows = [
        [render(s) for s in group.references]
        + [blank] * (cols - 2 - len(group.references))
        + [render(group.target), image.resize((64, 64))]
        for group, image in zip(groups, images)
    ]
    save_png(grid_sheet(rows, 64), path, {"columns": "references, target, generated"})


# ---------------------------------------------------------------------- reporting
TABLES = (
    ("By distractors (plain groups, 3 references)", DISTRACTOR_CELLS, ("split", "distractors")),
    ("By number of references (plain groups, held-out, 1 distractor)", REFERENCE_CELLS, ("refs",)),
    ("By group kind (3 references)", KIND_CELLS, ("kind", "split")),
)


def markdown_tables(summary: dict) -> str:
    """Seed means of every metric per cell, identity per seed, and the paired comparisons."""
    cells, lines = summary["cells"], []
    for title, wanted, keys in TABLES:
        rows = [row for cell in wanted for row in cells if _cell_of(row) == cell]
        if not rows:  # a run that scored some kinds or splits only
            continue
        lines += [
            f"### {title}",
            "",
            "| " + " | ".join([*keys, "method", "identity", "identity by seed", *METRICS[1:]]) + " |",
            "|" + "---|" * (len(keys) + 2 + len(METRICS)),
        ]
        for row in rows:
            by_seed = " / ".join(f"{100 * v:.1f}" for v in row["identity_by_seed"])
            lines.append(_row([row[k] for k in keys] + [row["method"]], row, by_seed))
        lines.append("")
    if summary.get("paired"):
        lines += [
            "### EasyRef against each other method, paired by group (identity)",
            "",
            "Groups only EasyRef drew right and groups only the other method did, summed over the training "
            "seeds (each seed's runs compared on the same groups), the exact sign test's p, the gap of the seed "
            "means, and whether it is larger than either method's own seed-to-seed spread.",
            "",
            "| method | cell | only EasyRef | only method | p | gap (points) | larger than seed spread |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in summary["paired"]:
            gap = "" if r.get("gap") is None else f"{100 * r['gap']:+.1f}"
            beyond = {None: "", True: "yes", False: "no"}[r.get("beyond_spread")]
            lines.append(
                f"| {r['baseline']} | {r['cell']} | {r['only_method']} | {r['only_baseline']} | "
                f"{_p_text(r['p'])} | {gap} | {beyond} |"
            )
    return "\n".join(lines) + "\n"


def _cell_of(row: dict) -> tuple:
    return row["kind"], row["split"], row["refs"], row["distractors"]


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: how likely a split at least this uneven is if neither side is better."""
    total = wins + losses
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**total)


def paired_identity(outcomes: dict, cells: list[dict] | None = None, method: str = "easyref") -> list[dict]:
    """`method` against each other method, group by group: for each cell and pooled over cells, the groups
    only one of the two got right, summed over the training seeds both were run with (the same groups and
    noise in every run), and the sign test's p. With `cells` (the seed aggregates), also the gap of the seed
    means and whether it exceeds the larger of the two methods' seed spreads.

    `outcomes`: {(method, seed, cell): [identity right, per group]}."""
    means = {(c["method"], _cell_of(c)): c for c in cells or []}
    rows = []
    others = dict.fromkeys(key[0] for key in outcomes if key[0] != method)
    for baseline in others:
        total = [0, 0]
        for cell in dict.fromkeys(key[2] for key in outcomes):
            seeds = [s for (m, s, c) in outcomes if m == method and c == cell and (baseline, s, cell) in outcomes]
            if not seeds:
                continue
            wins = losses = 0
            for seed in seeds:
                ours, theirs = outcomes[method, seed, cell], outcomes[baseline, seed, cell]
                wins += sum(a and not b for a, b in zip(ours, theirs))
                losses += sum(b and not a for a, b in zip(ours, theirs))
            total = [total[0] + wins, total[1] + losses]
            row = {
                "baseline": baseline,
                "cell": cell_name(cell),
                "seeds": seeds,
                "only_method": wins,
                "only_baseline": losses,
                "p": sign_test_p(wins, losses),
            }
            a, b = means.get((method, cell)), means.get((baseline, cell))
            if a and b:
                row["gap"] = a["identity"] - b["identity"]
                row["seed_spread"] = max(a["identity_spread"], b["identity_spread"])
                # one seed gives no spread to compare with
                row["beyond_spread"] = None if len(seeds) < 2 else abs(row["gap"]) > row["seed_spread"]
            rows.append(row)
        rows.append(
            {
                "baseline": baseline,
                "cell": "all cells",
                "only_method": total[0],
                "only_baseline": total[1],
                "p": sign_test_p(*total),
            }
        )
    return rows


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def _row(keys: list, row: dict, by_seed: str) -> str:
    values = [f"{100 * row[m]:.1f}" if m != "similarity" else f"{row[m]:.3f}" for m in METRICS]
    return "| " + " | ".join(str(k) for k in [*keys, values[0], by_seed, *values[1:]]) + " |"


def plot_by_references(summary: dict, path: Path, metric: str = "identity") -> None:
    """Accuracy (seed mean) against the number of references, one line per method (drawn with PIL)."""
    colours = {"easyref": (200, 40, 40), "easyref-bi": (230, 140, 20), "mean": (40, 90, 200), "concat": (40, 150, 60)}
    width, height, margin = 520, 340, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [n for _, _, n, _ in REFERENCE_CELLS]
    to_x = lambda n: margin + (xs.index(n)) * (width - 2 * margin) / (len(xs) - 1)
    to_y = lambda v: height - margin - v * (height - 2 * margin)
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, to_y(tick) - 6), f"{int(tick * 100)}%", fill="black")
        draw.line([(margin, to_y(tick)), (width - margin, to_y(tick))], fill=(225, 225, 225))
    for n in xs:
        draw.text((to_x(n) - 3, height - margin + 8), str(n), fill="black")
    draw.text((width // 2 - 60, height - 20), "number of references", fill="black")
    draw.text((margin, 12), f"{metric} accuracy, held-out subjects, 1 distractor (mean over seeds)", fill="black")
    for i, method in enumerate(METHODS):
        rows = {
            c["refs"]: c[metric] for c in summary["cells"] if c["method"] == method and _cell_of(c) in REFERENCE_CELLS
        }
        if not rows:
            continue
        points = [(to_x(n), to_y(rows[n])) for n in xs if n in rows]
        draw.line(points, fill=colours[method], width=3)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[method])
        draw.text((width - margin - 80, margin + 14 * i), method, fill=colours[method])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------------- the command
def run(
    out: Path,
    preset: str = "cpu",
    groups: int | None = None,
    steps: int | None = None,
    work: Path | None = None,
    cpu: bool = True,
    seed: int = 0,
    seeds=DEFAULT_SEEDS,
    methods=METHODS,
    cells=None,
) -> dict:
    """From nothing: the bundled-model build (base + stages 1-3), every method's stage 3 per training seed,
    the evaluation. `groups` / `steps` default to the preset's scoring sizes (`EVAL_SIZES`)."""
    from ..shapes.build import PRESETS, build

    recipe = PRESETS[preset]
    groups = groups or EVAL_SIZES[preset][0]
    steps = steps or EVAL_SIZES[preset][1]
    work = work or out / "work"
    if not (work / "stage2" / "final" / "easyref.safetensors").is_file():
        build(out / "model-demo", recipe, work, cpu)
    folders = train_methods(work, recipe, cpu, methods=methods, seeds=seeds)
    summary = evaluate_methods(folders, out, groups=groups, steps=steps, seed=seed, cells=cells)
    if work == out / "work":
        shutil.rmtree(work / "data", ignore_errors=True)  # thousands of renders, easy to make again
    return summary
