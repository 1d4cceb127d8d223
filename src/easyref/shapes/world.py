"""The shapes world: subjects (shape x colour x pattern) rendered on backgrounds, grouped like MRBench.

Everything is a pure function of a seed. A **subject** is what a group of references shares; each
reference has its own background, placement, size and distractor objects. A group's **target** shows
the subject as its prompt asks (background colour and position); the prompt never names the subject,
so the subject can only come from the references.

Held-out subjects are attribute *combinations* never used in training, while every single attribute
value still appears in training (the paper's zero-shot split in miniature).

Group kinds (`KINDS`), the cases that separate reading a group jointly from averaging its references:
- `plain`: the subject with 0-2 small distractors per reference, different in every reference;
- `rival`: the subject with 1-2 rivals at least as large as it, different in every reference;
- `repeat`: as rival, but one rival recurs in every reference but one; only the subject is in all of
  them, so an average of per-reference tokens gives the recurring rival almost the subject's weight;
- `pick`: two subjects recur in every reference, differing in shape, colour and pattern; the prompt
  names one attribute of the one to draw ("a striped object on a tan background, at the top left").
  The instruction-reading MLLM sees the prompt with the references; averaging can only resolve it later.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "magenta": (210, 40, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 130, 20),
    "purple": (120, 50, 170),
}
PATTERNS = ("solid", "striped", "dotted")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "tan": (205, 175, 130)}
POSITIONS = {  # centre of the subject, as a fraction of the image side
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
IMAGE_SIZE = 64
TARGET_SUBJECT_SIZE = 0.42  # subject side as a fraction of the image, in targets
SPLITS = ("held-in", "held-out")
KINDS = ("plain", "rival", "repeat", "pick")
PICK_ATTRIBUTES = ("shape", "colour", "pattern")


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str

    @property
    def key(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"


def all_subjects() -> list[Subject]:
    return [Subject(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]


def split_of(subject: Subject) -> str:
    """One combination in six is held out; each shape, colour and pattern value stays in training."""
    index = SHAPES.index(subject.shape) + list(COLOURS).index(subject.colour) + PATTERNS.index(subject.pattern)
    return "held-out" if index % 6 == 0 else "held-in"


def subjects_in(split: str) -> list[Subject]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [s for s in all_subjects() if split_of(s) == split]


# ---------------------------------------------------------------------- rendering
@dataclass
class Placement:
    """One object in an image: centre (fractions of the side) and side length (fraction)."""

    subject: Subject
    cx: float
    cy: float
    size: float


@dataclass
class Scene:
    background: str
    subject: Placement
    distractors: list[Placement] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (math.pi / 3 * k for k in range(6))]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _mask(shape: str, side: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    return mask


def _fill(pattern: str, colour: tuple[int, int, int], side: int, r: float) -> Image.Image:
    """The subject's surface: solid colour, diagonal stripes, or dots on a light version of the colour."""
    layer = Image.new("RGB", (side, side), colour)
    if pattern == "solid":
        return layer
    pale = tuple(int(0.35 * c + 0.65 * 255) for c in colour)
    draw = ImageDraw.Draw(layer)
    step = max(4, round(r / 2.2))
    if pattern == "striped":
        width = max(2, step // 2)
        for offset in range(-side, 2 * side, step):
            draw.line([(offset, 0), (offset + side, side)], fill=pale, width=width)
    else:  # dotted
        dot = max(1.2, step / 3.2)
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=pale)
    return layer


def render(scene: Scene, side: int = IMAGE_SIZE) -> Image.Image:
    """Distractors first, then the subject on top (so the subject is never hidden)."""
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    for placement in [*scene.distractors, scene.subject]:
        s = placement.subject
        cx, cy, r = placement.cx * side, placement.cy * side, placement.size * side / 2
        fill = _fill(s.pattern, COLOURS[s.colour], side, r)
        image.paste(fill, (0, 0), _mask(s.shape, side, cx, cy, r))
    return image


# ---------------------------------------------------------------------- scenes and groups
def target_scene(subject: Subject, background: str, position: str) -> Scene:
    cx, cy = POSITIONS[position]
    return Scene(background, Placement(subject, cx, cy, TARGET_SUBJECT_SIZE))


def reference_scene(subject: Subject, distractors: int, rng: random.Random, pool: list[Subject]) -> Scene:
    """The subject somewhere at some size on a random background, with distractors that are other subjects."""
    size = rng.uniform(0.3, 0.5)
    cx, cy = rng.uniform(size / 2 + 0.02, 0.98 - size / 2), rng.uniform(size / 2 + 0.02, 0.98 - size / 2)
    others = [s for s in pool if s != subject]
    placed = []
    for _ in range(distractors):
        placed.append(Placement(rng.choice(others), *_free_spot(rng, cx, cy, size)))
    return Scene(rng.choice(list(BACKGROUNDS)), Placement(subject, cx, cy, size), placed)


def _free_spot(rng: random.Random, cx: float, cy: float, size: float) -> tuple[float, float, float]:
    """(x, y, side) of a distractor whose box does not touch the subject's, so it never hides it."""
    while True:  # the subject covers at most half the side, so a free spot is found within a few tries
        d_size = rng.uniform(0.16, 0.24)
        dx, dy = rng.uniform(d_size / 2, 1 - d_size / 2), rng.uniform(d_size / 2, 1 - d_size / 2)
        if max(abs(dx - cx), abs(dy - cy)) > (size + d_size) / 2:
            return dx, dy, d_size


def rival_scene(subject: Subject, rivals: list[Subject], rng: random.Random) -> Scene:
    """The subject and `rivals` at least as large as it, on a random background, no two touching."""
    size = rng.uniform(0.26, 0.32)
    sizes = [size] + [rng.uniform(size, 0.38) for _ in rivals]
    spots = _apart(rng, sizes)
    (cx, cy, size), others = spots[0], spots[1:]
    placed = [Placement(rival, x, y, side) for rival, (x, y, side) in zip(rivals, others)]
    return Scene(rng.choice(list(BACKGROUNDS)), Placement(subject, cx, cy, size), placed)


def _apart(rng: random.Random, sizes: list[float]) -> list[tuple[float, float, float]]:
    """(x, y, side) for boxes of these sides inside the image with a gap between every two; shrunk
    by a tenth after every 200 failed draws, so three large objects always find room."""
    while True:
        for _ in range(200):
            spots = [
                (rng.uniform(s / 2 + 0.02, 0.98 - s / 2), rng.uniform(s / 2 + 0.02, 0.98 - s / 2), s) for s in sizes
            ]
            if all(
                max(abs(a[0] - b[0]), abs(a[1] - b[1])) > (a[2] + b[2]) / 2 + 0.02
                for i, a in enumerate(spots)
                for b in spots[i + 1 :]
            ):
                return spots
        sizes = [s * 0.9 for s in sizes]


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def prompt_for(background: str, position: str) -> str:
    """What the target must show, without naming the subject."""
    return f"an object on a {background} background, {_where(position)}"


def caption_for(subject: Subject, background: str, position: str) -> str:
    """A full description (base-model pretraining only; never a group's prompt)."""
    return f"a {subject.key} on a {background} background, {_where(position)}"


def pick_prompt(subject: Subject, attribute: str, background: str, position: str) -> str:
    """A prompt naming one attribute of the subject: "a star on ...", "a striped object on ..."."""
    value = getattr(subject, attribute)
    what = value if attribute == "shape" else f"{value} object"
    article = "an" if what[0] in "aeiou" else "a"
    return f"{article} {what} on a {background} background, {_where(position)}"


@dataclass
class Group:
    id: str
    split: str
    subject: Subject  # what the target shows
    references: list[Scene]
    target: Scene
    background: str
    position: str
    prompt: str
    kind: str = "plain"
    other: Subject | None = None  # pick: the second recurring subject, the one the prompt does not ask for
    attribute: str | None = None  # pick: the attribute the prompt names


def make_group(
    group_id: str,
    subject: Subject,
    num_references: int,
    distractors: int,
    rng: random.Random,
    pool: list[Subject] | None = None,
    kind: str = "plain",
) -> Group:
    """One group of `kind`; `distractors` is the number of other objects per reference (rival, repeat:
    the rivals, at least 1; pick: small distractors beside the two subjects)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    pool = pool or all_subjects()
    background, position = rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    other = attribute = None
    prompt = prompt_for(background, position)
    if kind == "plain":
        references = [reference_scene(subject, distractors, rng, pool) for _ in range(num_references)]
    elif kind in ("rival", "repeat"):
        references = _rival_references(subject, num_references, max(1, distractors), rng, pool, kind == "repeat")
    else:
        other = rng.choice([s for s in pool if _differs_in_all(s, subject)])
        attribute = rng.choice(PICK_ATTRIBUTES)
        references = [_pick_scene(subject, other, distractors, rng, pool) for _ in range(num_references)]
        prompt = pick_prompt(subject, attribute, background, position)
    return Group(
        id=group_id,
        split=split_of(subject),
        subject=subject,
        references=references,
        target=target_scene(subject, background, position),
        background=background,
        position=position,
        prompt=prompt,
        kind=kind,
        other=other,
        attribute=attribute,
    )


def _differs_in_all(a: Subject, b: Subject) -> bool:
    return a.shape != b.shape and a.colour != b.colour and a.pattern != b.pattern


def _rival_references(
    subject: Subject, count: int, rivals: int, rng: random.Random, pool: list[Subject], repeat: bool
) -> list[Scene]:
    """Rivals drawn without replacement across the group, so none recurs unless `repeat` makes one
    recur in every reference but one."""
    others = [s for s in pool if s != subject]
    rng.shuffle(others)
    fresh = iter(others * (1 + count * rivals // max(1, len(others))))
    recurring, absent = (next(fresh), rng.randrange(count)) if repeat else (None, -1)
    scenes = []
    for i in range(count):
        chosen = [recurring] if repeat and i != absent else []
        chosen += [next(fresh) for _ in range(rivals - len(chosen))]
        rng.shuffle(chosen)
        scenes.append(rival_scene(subject, chosen, rng))
    return scenes


def _pick_scene(subject: Subject, other: Subject, distractors: int, rng: random.Random, pool: list[Subject]) -> Scene:
    """Both recurring subjects at similar sizes, plus small distractors that are neither."""
    sizes = [rng.uniform(0.28, 0.36), rng.uniform(0.28, 0.36)] + [rng.uniform(0.16, 0.2) for _ in range(distractors)]
    spots = _apart(rng, sizes)
    extras = [s for s in pool if s not in (subject, other)]
    placed = [Placement(other, *spots[1])] + [Placement(rng.choice(extras), *spot) for spot in spots[2:]]
    return Scene(rng.choice(list(BACKGROUNDS)), Placement(subject, *spots[0]), placed)


def make_groups(
    split: str, count: int, num_references: int, distractors: int, seed: int, kind: str = "plain"
) -> list[Group]:
    """`count` groups cycling over the split's subjects; other objects come from the same split only."""
    name = (
        f"{split}-{num_references}-{distractors}-{seed}"
        if kind == "plain"
        else f"{kind}-{split}-{num_references}-{distractors}-{seed}"
    )
    rng = random.Random(f"shapes-groups-{name}")
    subjects = subjects_in(split)
    rng.shuffle(subjects)
    prefix = f"{split}-{seed}" if kind == "plain" else f"{kind}-{split}-{seed}"
    return [
        make_group(f"{prefix}-{i:05d}", subjects[i % len(subjects)], num_references, distractors, rng, subjects, kind)
        for i in range(count)
    ]
