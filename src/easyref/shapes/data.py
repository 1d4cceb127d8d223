"""Write the shapes world to disk in the training data formats, so `easyref train` reads it unchanged.

One folder holds the images and four record files, all over held-in subjects only:
- `base.jsonl`: target renders with full captions (subject named), for the base model's pretraining;
- `pairs.jsonl`: stage 1, the target is its own reference, the text is the group's prompt;
- `faces.jsonl`: stage 2, the "face" box is the subject's box in the target;
- `groups.jsonl`: stage 3, references + target + prompt (the MRBench-style groups).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

from .world import IMAGE_SIZE, KINDS, Group, caption_for, make_groups, pick_prompt, render

logger = logging.getLogger(__name__)


def subject_box(group: Group, side: int = IMAGE_SIZE) -> list[int]:
    """The subject's bounding box in the target, in pixels (the stage-2 "face")."""
    p = group.target.subject
    half = p.size * side / 2
    return [round(p.cx * side - half), round(p.cy * side - half), round(p.cx * side + half), round(p.cy * side + half)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


# other objects per reference for each group kind (plain: the `distractors` argument); rival and repeat
# have at least one rival, pick's two subjects leave room for at most one small distractor
KIND_DISTRACTORS = {"rival": (1, 2), "repeat": (1, 2), "pick": (0, 1)}


def write_training_data(
    root: str | Path,
    groups: int = 2000,
    min_refs: int = 2,
    max_refs: int = 5,
    distractors: tuple[int, ...] = (0, 1, 2),
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
) -> dict[str, Path]:
    """Render `groups` held-in groups (kinds, reference counts and distractor counts varied, in equal
    shares) with their records."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"shapes-training-{seed}")
    base, pairs, faces, stage3 = [], [], [], []
    settings = [
        (kind, d, n)
        for kind in kinds
        for d in KIND_DISTRACTORS.get(kind, distractors)
        for n in range(min_refs, max_refs + 1)
    ]
    per_setting = max(1, groups // len(settings))
    for kind, d, n in settings:
        for group in make_groups("held-in", per_setting, n, d, seed=rng.randrange(2**31), kind=kind):
            target = f"images/{group.id}-{n}-{d}-target.png"
            render(group.target).save(root / target)
            refs = []
            for i, scene in enumerate(group.references):
                name = f"images/{group.id}-{n}-{d}-ref{i}.png"
                render(scene).save(root / name)
                refs.append(name)
            caption = caption_for(group.subject, group.background, group.position)
            base.append({"image_file": target, "text": caption, "target": target})
            pairs.append({"image_file": target, "text": group.prompt, "target": target})
            faces.append({"face": [[[*subject_box(group), 1.0]]], "text": group.prompt, "target": target})
            stage3.append({"image_file": refs, "text": group.prompt, "target": target})
    paths = {name: root / f"{name}.jsonl" for name in ("base", "pairs", "faces", "groups")}
    for name, records in zip(paths, (base, pairs, faces, stage3)):
        _write_jsonl(paths[name], records)
    logger.info("wrote %d groups under %s", len(stage3), root)
    return paths


DEMO_SPLIT, DEMO_SEED = "held-out", 0
# the demo's plain groups, by name: held-out subjects, 3 references, this many distractors in each
DEMO_CELLS = {"subject": (0,), "distractors": (2,)}
# each cell's first group that meets `demo_rule` and whose subject the cells before it do not show (the
# distractors cell's group 4 is the subject example's cyan striped circle); benchmarks/demo_groups.py scored them
DEMO_CHOICE = {"subject": 7, "distractors": 20}


@dataclasses.dataclass(frozen=True)
class DemoExample:
    """A group the demo, the README and the page's examples row show, with its prompts."""

    name: str  # its folder under examples/
    group: Group
    prompts: tuple[str, ...]
    note: str  # what it shows, in a line


def demo_examples() -> list[DemoExample]:
    """What works first (one subject with and without references; the subject kept among distractors), then
    the pick group, the case this miniature cannot solve."""
    subject, distractors = (
        demo_candidates(DEMO_CELLS[name][0], DEMO_CHOICE[name] + 1)[-1] for name in ("subject", "distractors")
    )
    pick = demo_group()
    return [
        DemoExample("subject", subject, (subject.prompt,), "three references of one held-out subject"),
        DemoExample("distractors", distractors, (distractors.prompt,), "the subject among two distractors in each"),
        DemoExample("pick", pick, demo_prompts(pick), "two subjects in every reference; each prompt names one"),
    ]


def demo_candidates(distractors: int, count: int) -> list[Group]:
    """The first `count` plain held-out groups of 3 references at the demo's seed, in the benchmark's order."""
    return make_groups(DEMO_SPLIT, count, 3, distractors, seed=DEMO_SEED)


def demo_rule(hits: int, stray: int, images: int) -> bool:
    """A group the demo may show: all its images show the subject with the references (`hits` of `images`)
    and none without them has its shape or colour (`stray`), so the picture shows what the references did."""
    return hits == images and stray == 0


def demo_group() -> Group:
    """The pick group of the demo (`examples/pick`): the first held-out *pick* group, at a seed nobody tuned to,
    whose prompt names the shape. Every reference holds the same two subjects, so what is drawn is chosen
    by the prompt alone."""
    groups = make_groups(DEMO_SPLIT, 64, 3, 0, seed=DEMO_SEED, kind="pick")
    return next(g for g in groups if g.attribute == "shape")


def demo_prompts(group: Group) -> tuple[str, str]:
    """Two prompts, same background and place, each naming one of the group's two subjects by its shape."""
    return tuple(pick_prompt(s, "shape", group.background, group.position) for s in (group.subject, group.other))


def write_demo_references(folder: str | Path, group: Group | None = None) -> list[Path]:
    """`group`'s references (default: the pick group) as `1.png`, `2.png`, ... in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate((group or demo_group()).references):
        paths.append(folder / f"{i + 1}.png")
        render(scene).save(paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m easyref.shapes.data DIR`: write each demo example's references to DIR/NAME/ and log its prompts."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path((argv if argv is not None else sys.argv[1:])[0])
    for example in demo_examples():
        write_demo_references(folder / example.name, example.group)
        for prompt in example.prompts:
            logger.info("%s: %s", example.name, prompt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
