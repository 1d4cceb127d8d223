"""Does training stage 3 on the hard group kinds cost identity on plain groups? EasyRef's stage 3 trained
on the plain groups alone, beside the same stage 3 trained on every kind (the demo build's), both from the
same stage-2 checkpoint with the same steps, batch and seed, scored on the benchmark's plain cells.

Run (from the repository root, after `make bundled-model` and `make bench-shapes` scored seed 0):

    .venv/bin/python benchmarks/shapes_plain_only.py runs/bundled-model.work --bench runs/bench-shapes

Writes `WORK/data/groups-plain.jsonl` (the plain records of `groups.jsonl`), trains
`WORK/stage3-plain-only-s0`, packages `WORK/model-easyref-plain-only-s0`, and scores the plain cells into
`BENCH/plain-only/` next to the bench's own seed-0 EasyRef cells (kept cells are reused, not re-scored).
Prints the bench's tables for the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def plain_records(groups_file: Path, out: Path) -> int:
    """The records whose images are plain groups (their files are named after the split, not a kind)."""
    kept = [
        line
        for line in groups_file.read_text().splitlines()
        if json.loads(line)["target"].startswith(("images/held-in", "images/held-out"))
    ]
    out.write_text("".join(line + "\n" for line in kept))
    return len(kept)


def main() -> None:
    from easyref.bench.shapes import CELLS, evaluate_methods, markdown_tables, model_folder
    from easyref.shapes.build import PRESETS, package, stage_config
    from easyref.train.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the demo build's work folder")
    parser.add_argument("--bench", type=Path, default=Path("runs/bench-shapes"))
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    recipe = PRESETS[args.preset]
    data = args.work / "data"
    count = plain_records(data / "groups.jsonl", data / "groups-plain.jsonl")
    print(f"{count} plain groups of {len((data / 'groups.jsonl').read_text().splitlines())}")
    stage_dir = args.work / "stage3-plain-only-s0"
    if not (stage_dir / "final" / "easyref.safetensors").is_file():
        config = dataclasses.replace(
            stage_config(recipe, 3, args.work), output_dir=str(stage_dir), data=str(data / "groups-plain.jsonl")
        )
        Trainer(config, cpu=True).train()
    plain_only = args.work / "model-easyref-plain-only-s0"
    if not (plain_only / "adapter").is_dir():
        package(args.work, plain_only, recipe, {}, adapter=stage_dir / "final")
    out = args.bench / "plain-only"
    # the mixed model's cells are the bench's own: copy its kept records so they are not scored again
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for record in (args.bench / "cells").glob("easyref-s0-plain-*.json"):
        (out / "cells" / record.name).write_text(record.read_text())
    folders = {("easyref", 0): model_folder(args.work, "easyref", 0), ("easyref-plain-only", 0): plain_only}
    summary = evaluate_methods(folders, out, cells=[c for c in CELLS if c[0] == "plain"])
    print(markdown_tables(summary))


if __name__ == "__main__":
    main()
