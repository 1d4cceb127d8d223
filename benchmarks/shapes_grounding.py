"""Can the shapes world's tiny MLLM learn to name the object a group is about, when taught exactly that?

    python benchmarks/shapes_grounding.py WORK [--chunks 1500 1500 1500] [--out runs/shapes-grounding]

WORK is a `make bundled-model` work folder; its `qwen2vl/` (vision- and caption-pretrained) is copied to
OUT and trained further on `easyref.shapes.mllm.grounding_batch`: each group's references and the
encoder's instruction with the group's prompt, answered with the name of the object the target shows
("a red dotted star"). Held-in subjects only; every kind (plain, rival, repeat, pick), 2-5 references.
After each chunk of steps it prints, per kind and split, the share of 64 groups whose answer is wholly
right (teacher-forced). This is the probe of `benchmarks/shapes_probe.py` turned into a training target:
if the trunk cannot be taught to say which object is meant, stage 3 cannot find it in the trunk either.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from easyref.shapes.mllm import GROUNDING_KINDS, grounding_accuracy, pretrain_grounding


def accuracies(folder: Path) -> dict[tuple[str, str], float]:
    return {
        (kind, split): grounding_accuracy(folder, kind, split=split)
        for split in ("held-in", "held-out")
        for kind in GROUNDING_KINDS
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1500, 1500, 1500])
    parser.add_argument("--out", type=Path, default=Path("runs/shapes-grounding"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = args.out / "qwen2vl"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(args.work / "qwen2vl", folder)
    rows, done = [(0, 0.0, None, accuracies(folder))], 0
    for chunk in args.chunks:
        started = time.perf_counter()
        losses = pretrain_grounding(folder, chunk, seed=done)
        done += chunk
        rows.append((done, time.perf_counter() - started, sum(losses[-100:]) / 100, accuracies(folder)))
    columns = [(kind, split) for split in ("held-in", "held-out") for kind in GROUNDING_KINDS]
    print("| steps | seconds | loss (last 100) | " + " | ".join(f"{k} {s}" for k, s in columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for steps, seconds, loss, acc in rows:
        cells = " | ".join(f"{100 * acc[c]:.0f}" for c in columns)
        print(f"| {steps} | {seconds:.0f} | {'-' if loss is None else f'{loss:.3f}'} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
