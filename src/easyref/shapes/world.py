"""The shapes world: subjects (shape x colour x pattern) rendered on backgrounds, grouped like MRBench.

Everything is a pure function of a seed. A **subject** is what a group of references shares; each
reference has its own background, placement, size and distractor objects. A group's **target** shows
the subject as its prompt asks (background colour and position); the prompt never names the subject,
so the subject can only come from the references.

Held-out subjects are attribute *combinations* never used in training, while every single attribute
value still appears in training (the paper's zero-shot split in miniature).
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


def prompt_for(background: str, position: str) -> str:
    """What the target must show, without naming the subject."""
    where = "in the center" if position == "center" else f"at the {position}"
    return f"an object on a {background} background, {where}"


def caption_for(subject: Subject, background: str, position: str) -> str:
    """A full description (base-model pretraining only; never a group's prompt)."""
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {subject.key} on a {background} background, {where}"


@dataclass
class Group:
    id: str
    split: str
    subject: Subject
    references: list[Scene]
    target: Scene
    background: str
    position: str
    prompt: str


def make_group(group_id: str, subject: Subject, num_references: int, distractors: int, rng: random.Random,
               pool: list[Subject] | None = None) -> Group:
    pool = pool or all_subjects()
    background, position = rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS))
    return Group(
        id=group_id,
        split=split_of(subject),
        subject=subject,
        references=[reference_scene(subject, distractors, rng, pool) for _ in range(num_references)],
        target=target_scene(subject, background, position),
        background=background,
        position=position,
        prompt=prompt_for(background, position),
    )


def make_groups(split: str, count: int, num_references: int, distractors: int, seed: int) -> list[Group]:
    """`count` groups cycling over the split's subjects; distractors come from the same split only."""
    rng = random.Random(f"shapes-groups-{split}-{num_references}-{distractors}-{seed}")
    subjects = subjects_in(split)
    rng.shuffle(subjects)
    return [
        make_group(f"{split}-{seed}-{i:05d}", subjects[i % len(subjects)], num_references, distractors, rng, subjects)
        for i in range(count)
    ]
