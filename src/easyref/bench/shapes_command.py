"""`easyref bench shapes`: the miniature MRBench on the synthetic shapes world, from nothing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("easyref")

# What each preset costs, timed on this project's 2-core CPU machine (the Makefile's bench-shapes comment and
# benchmarks/RESULTS.md 5 have the breakdown). No preset is assumed: the `cpu` one, the old default, trains
# for hours, so a forgotten flag would start a 4-hour run.
PRESET_COSTS = (
    "smoke (a check of the whole chain with tiny models, 1 group x 2 steps per cell: about 36 s from nothing), "
    "cpu (the benchmark on a CPU: about 4 h from nothing on 2 cores, 2 h 10 min after `make bundled-model` "
    "with its work folder as --work, 46 min of it scoring), "
    "gpu (sized to train in under ten minutes on one GPU; not yet run), "
    "full (the largest recipe, for a GPU; not timed)"
)
PRESET_HELP = (
    f"training and scoring sizes, required unless --models-dir: {PRESET_COSTS}. With --models-dir "
    "it sets only the scoring sizes (default 64 groups x 30 steps per cell)"
)


def add_shapes_parser(bench_sub) -> None:
    p = bench_sub.add_parser(
        "shapes",
        help="miniature MRBench: EasyRef vs mean vs concat on the synthetic shapes world",
        description="Train (unless --models-dir has them) and evaluate EasyRef, EasyRef with bidirectional "
        "aggregation and the two tuning-free baselines on the shapes world, each method's stage 3 once per "
        "training seed: identity, attribute and prompt accuracy and similarity, read by the bundled oracle, by "
        "distractors, by number of references and by group kind (plain, rival, repeat, pick), with seed means, "
        "seed spreads and paired sign tests. Writes summary.md, summary.json, items.jsonl, by_references.png and "
        "example sheets into --out. --preset is required (what to spend: from 36 s to hours), unless --models-dir "
        "holds the trained models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/bench-shapes"), help="output folder (default runs/bench-shapes)"
    )
    p.add_argument("--preset", metavar="smoke|cpu|gpu|full", help=PRESET_HELP)
    p.add_argument(
        "--models-dir",
        type=Path,
        help="evaluate the existing model-METHOD-sSEED/ folders here (a finished run's work folder)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="training seeds: each method's stage 3 is trained once per seed (default 0 1)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="easyref, easyref-bi (bidirectional aggregation), mean, concat (default: all four)",
    )
    p.add_argument(
        "--kinds", nargs="+", metavar="KIND", help="score only these group kinds: plain, rival, repeat, pick"
    )
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="score only these splits: held-in, held-out")
    p.add_argument("--groups", type=int, help="groups per cell (default: the preset's; 64, smoke 1)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's; 30, smoke 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work",
        type=Path,
        help="training folder to create or reuse (default OUT/work); "
        "a finished bundled-model build's work folder skips straight to the baselines",
    )
    p.set_defaults(func=cmd_shapes)


def cmd_shapes(args) -> int:
    from ..errors import UserError
    from ..shapes.build import PRESETS
    from ..shapes.world import KINDS, SPLITS
    from .shapes import EVAL_SIZES, METHODS, evaluate_methods, find_models, run, select_cells

    if args.preset is None and not args.models_dir:
        raise UserError(f"bench shapes needs --preset, to say what to spend: {PRESET_COSTS}")
    if args.preset is not None and args.preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    if (args.groups is not None and args.groups < 1) or (args.steps is not None and args.steps < 1):
        raise UserError("--groups and --steps must be >= 1")
    methods = tuple(dict.fromkeys(args.methods or METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    if any(s < 0 or s >= 2**31 for s in args.seeds):
        raise UserError("--seeds must be between 0 and 2^31 - 1")
    seeds = tuple(dict.fromkeys(args.seeds))
    for flag, given, known in (("--kinds", args.kinds, KINDS), ("--splits", args.splits, SPLITS)):
        wrong = [value for value in given or () if value not in known]
        if wrong:
            raise UserError(f"{flag}: unknown {wrong[0]!r} (known: {', '.join(known)})")
    cells = select_cells(args.kinds, args.splits)
    # scoring existing models with no preset: the benchmark's sizes (those of cpu, gpu and full alike)
    preset_groups, preset_steps = EVAL_SIZES[args.preset or "cpu"]
    groups, steps = args.groups or preset_groups, args.steps or preset_steps
    if args.models_dir:
        folders = {
            key: path for key, path in find_models(args.models_dir).items() if key[0] in methods and key[1] in seeds
        }
        if not folders:
            raise UserError(
                f"--models-dir: no model-METHOD-sSEED/ folder under {args.models_dir} for "
                f"{', '.join(methods)} and seeds {' '.join(map(str, seeds))}"
            )
        evaluate_methods(folders, args.out, groups=groups, steps=steps, seed=args.seed, cells=cells)
    else:
        run(
            args.out,
            preset=args.preset,
            groups=groups,
            steps=steps,
            work=args.work,
            seed=args.seed,
            seeds=seeds,
            methods=methods,
            cells=cells,
        )
    logger.info("wrote %s", args.out / "summary.md")
    print((args.out / "summary.md").read_text(), end="")
    return 0
