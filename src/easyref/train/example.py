"""A small synthetic dataset in all three released formats, to try `easyref train` end to end."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..safe_io import atomic_write_bytes, check_no_symlink


class ExampleDataError(ValueError):
    """The example data cannot be written where asked (one line)."""


# Words the bundled model's text encoders know (`easyref info` lists them), and colour names PIL draws, so
# that every caption and prompt of this data, and the command the trainer prints from it, is one the bundled
# model can read (tests/test_vocabulary.py). The backgrounds are the shapes world's four.
COLOURS = ["red", "blue", "green", "orange", "purple", "cyan"]
BACKGROUNDS = ["white", "gray", "tan", "black"]
SHAPES = ["circle", "square", "triangle"]


def draw_subject(
    shape: str, colour: str, background: str, size: int, rng: random.Random
) -> tuple[Image.Image, list[int]]:
    """One subject at a random place and size; returns the image and the subject's box."""
    image = Image.new("RGB", (size, size), background)
    side = rng.randint(size // 3, size // 2)
    x, y = rng.randint(0, size - side - 1), rng.randint(0, size - side - 1)
    box = [x, y, x + side, y + side]
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=colour)
    return image, box


def write_example_data(
    root: str | Path, subjects: int = 6, per_subject: int = 4, size: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Images under root/images and pairs.json (stage 1), faces.json (stage 2), groups.jsonl (stage 3).

    The data is deterministic, so writing it again into the same folder changes nothing; a file there
    that holds anything else (the user's own pairs.json, say) is refused, never overwritten.
    """
    root = Path(root)
    files = _example_files(subjects, per_subject, size, seed)
    _check_targets(root, files)
    for name, data in files.items():
        atomic_write_bytes(root / name, data, root=root, fsync=False)
    return {"pairs": root / "pairs.json", "faces": root / "faces.json", "groups": root / "groups.jsonl"}


def _check_targets(root: Path, files: dict[str, bytes]) -> None:
    if root.exists() and not root.is_dir():
        raise ExampleDataError(f"{root} exists and is not a folder")
    for name, data in files.items():
        path = root / name
        check_no_symlink(path, root)
        if not path.exists():
            continue
        if not path.is_file() or path.stat().st_size != len(data) or path.read_bytes() != data:
            raise ExampleDataError(
                f"{path} exists and is not this example data; refusing to overwrite it (choose a new or empty folder)"
            )


def _example_files(subjects: int, per_subject: int, size: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    pairs, faces, groups = [], [], []
    for s in range(subjects):
        shape, colour = SHAPES[s % len(SHAPES)], COLOURS[s % len(COLOURS)]
        files, backgrounds = [], []
        for i in range(per_subject):
            background = rng.choice(BACKGROUNDS)
            backgrounds.append(background)
            image, box = draw_subject(shape, colour, background, size, rng)
            name = f"images/{s:03d}_{i}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out[name] = buffer.getvalue()
            files.append(name)
            caption = f"a {colour} {shape} on a {background} background"
            pairs.append({"image_file": name, "text": [caption], "target": name})
            faces.append({"face": [[[*box, 0.99]]], "text": [caption], "target": name})
        for target, background in zip(files, backgrounds):
            refs = [f for f in files if f != target]
            # as EasyRef's prompts in the shapes world: the subject comes from the references, the prompt
            # asks for the target's background
            text = f"an object on a {background} background"
            groups.append({"image_file": refs, "text": [text], "target": target})
    out["pairs.json"] = json.dumps(pairs, indent=1).encode()
    out["faces.json"] = json.dumps(faces, indent=1).encode()
    out["groups.jsonl"] = "".join(json.dumps(g) + "\n" for g in groups).encode()
    return out
