"""The shapes-world oracle: a small CNN that reads a generated target image back into attributes.

Generated images are scored by asking the oracle what it sees (subject shape, colour, pattern, background
colour, position) and comparing with what the group asked for. The oracle is trained here, on renders from
`world.py`, with placement jitter and mild blur/noise/tone augmentation so that imperfect generations still
read right; its numbers only mean something while its accuracy on clean renders stays near 100%.

    python -m easyref.shapes.oracle train [--steps N] [--out DIR]
    python -m easyref.shapes.oracle accuracy [--count N]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from . import world

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "colour", "pattern", "background", "position")
CLASSES: dict[str, tuple[str, ...]] = {
    "shape": tuple(world.SHAPES),
    "colour": tuple(world.COLOURS),
    "pattern": tuple(world.PATTERNS),
    "background": tuple(world.BACKGROUNDS),
    "position": tuple(world.POSITIONS),
}
SUBJECT_ATTRIBUTES = ("shape", "colour", "pattern")
SCENE_ATTRIBUTES = ("background", "position")

ASSETS_DIR = Path(__file__).parent / "assets"
WEIGHTS_NAME = "oracle.safetensors"
CONFIG_NAME = "oracle.json"

# Placement jitter around the target layout: generations are rarely pixel-exact.
CENTRE_JITTER = 0.06
SIZE_RANGE = (0.32, 0.52)
# Each augmentation fires with this probability, so plenty of examples stay clean.
AUGMENT_PROBABILITY = 0.3


# ---------------------------------------------------------------------------- model
def _conv_block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    # a strided conv rather than conv + max-pool: several times cheaper on CPU, and as accurate here
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=2, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class OracleNet(nn.Module):
    """Four conv blocks (64 -> 4 px), then two branches.

    The subject branch pools over space, so its features (the `embed`) describe *what* the object is
    wherever it sits; the scene branch keeps the 4x4 layout, because position is a spatial question.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 96, 128),
        embed_dim: int = 128,
        scene_dim: int = 64,
        scene_reduce: int = 16,
    ) -> None:
        super().__init__()
        self.config = {
            "channels": list(channels),
            "embed_dim": embed_dim,
            "scene_dim": scene_dim,
            "scene_reduce": scene_reduce,
        }
        widths = [3, *channels]
        # a 4x4 stem keeps the 2-pixel dots and stripes visible after the first stride
        self.features = nn.Sequential(
            *[_conv_block(a, b, 4 if i == 0 else 3) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
        )
        last = channels[-1]
        self.subject = nn.Sequential(nn.Linear(2 * last, embed_dim), nn.ReLU(inplace=True))
        grid = (world.IMAGE_SIZE // 2 ** len(channels)) ** 2
        self.scene = nn.Sequential(
            nn.Conv2d(last, scene_reduce, 1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(scene_reduce * grid, scene_dim),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict(
            {a: nn.Linear(embed_dim if a in SUBJECT_ATTRIBUTES else scene_dim, len(CLASSES[a])) for a in ATTRIBUTES}
        )

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        # mean and max pooling: max keeps small telltale details (dots, star tips) that a mean dilutes
        pooled = torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)
        return self.subject(pooled), self.scene(fmap)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        subject, scene = self._branches(x)
        return {a: self.heads[a](subject if a in SUBJECT_ATTRIBUTES else scene) for a in ATTRIBUTES}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised subject features (B, embed_dim): a DINO-I-like subject similarity via dot products."""
        subject, _ = self._branches(x)
        return F.normalize(subject, dim=1)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, 64, 64) float in [-1, 1]; other sizes are resized bilinearly."""
    side = world.IMAGE_SIZE
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


# ---------------------------------------------------------------------------- training data
def _augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Mild blur, tone shifts and noise: the ways a diffusion sample usually differs from a render."""
    if rng.random() < AUGMENT_PROBABILITY:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < AUGMENT_PROBABILITY:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))
    if rng.random() < AUGMENT_PROBABILITY:
        # numpy noise seeded from `rng`, so the whole example stays a function of the caller's seed
        noise_rng = np.random.default_rng(rng.getrandbits(32))
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + noise_rng.normal(0.0, rng.uniform(2.0, 10.0), pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return image


def training_example(rng: random.Random) -> tuple[Image.Image, dict[str, int]]:
    """A jittered, possibly augmented target-like render and its class indices.

    Subjects come from both splits: the oracle is the evaluator, not the model under test.
    """
    subject = rng.choice(world.all_subjects())
    background = rng.choice(CLASSES["background"])
    position = rng.choice(CLASSES["position"])
    cx, cy = world.POSITIONS[position]
    placement = world.Placement(
        subject,
        cx + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
        cy + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER),
        rng.uniform(*SIZE_RANGE),
    )
    image = _augment(world.render(world.Scene(background, placement)), rng)
    names = {
        "shape": subject.shape,
        "colour": subject.colour,
        "pattern": subject.pattern,
        "background": background,
        "position": position,
    }
    return image, {a: CLASSES[a].index(names[a]) for a in ATTRIBUTES}


def _batch(rng: random.Random, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    examples = [training_example(rng) for _ in range(size)]
    images = images_to_tensor([image for image, _ in examples])
    labels = {a: torch.tensor([label[a] for _, label in examples]) for a in ATTRIBUTES}
    return images, labels


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)


def train_oracle(
    steps: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 3e-3,
    on_step: Callable[[int, float], None] | None = None,
    log_every: int = 100,
) -> OracleNet:
    """Train from scratch; the same seed (and thread count) gives the same weights.

    `on_step(step, loss)` is called after every optimiser step (tests use it to watch the loss fall).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OracleNet()
    # a string seed keeps training data apart from the clean-accuracy sets, which use another prefix
    rng = random.Random(f"oracle-train-{seed}")
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        images, labels = _batch(rng, batch_size)
        loss = _loss(model(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        value = loss.item()
        running += value
        if on_step is not None:
            on_step(step, value)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            count = (step % log_every) + 1
            logger.info(
                "oracle step %d/%d loss %.4f (%.0fs)", step + 1, steps, running / count, time.perf_counter() - start
            )
            running = 0.0
    return model.eval()


# ---------------------------------------------------------------------------- saving and loading
def save_oracle(model: OracleNet, directory: str | Path, extra: dict | None = None) -> Path:
    """float32 safetensors plus a json config (architecture, class lists, and any `extra` notes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {"architecture": model.config, "classes": {a: list(CLASSES[a]) for a in ATTRIBUTES}, **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    logger.info("saved oracle to %s", directory)
    return directory


def load_oracle(directory: str | Path | None = None) -> OracleNet:
    """Load saved weights (default: the bundled ones) in eval mode."""
    directory = Path(directory) if directory is not None else ASSETS_DIR
    config = json.loads((directory / CONFIG_NAME).read_text())
    saved = {a: tuple(v) for a, v in config["classes"].items()}
    # class indices are meaningless if world.py's attribute lists changed since training
    if saved != CLASSES:
        raise ValueError(f"oracle at {directory} was trained for other classes: {saved} != {CLASSES}")
    model = OracleNet(**config["architecture"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return model.eval()


# ---------------------------------------------------------------------------- reading images
@dataclass
class Reading:
    shape: str
    colour: str
    pattern: str
    background: str
    position: str


@torch.no_grad()
def predict(model: OracleNet, images: Sequence[Image.Image], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Class indices per attribute, in eval mode, batched to bound memory."""
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
    for begin in range(0, len(images), batch_size):
        logits = model(images_to_tensor(images[begin : begin + batch_size]))
        for a in ATTRIBUTES:
            chunks[a].append(logits[a].argmax(dim=1))
    return {a: torch.cat(chunks[a]) if chunks[a] else torch.empty(0, dtype=torch.long) for a in ATTRIBUTES}


def read_images(model: OracleNet, images: Sequence[Image.Image]) -> list[Reading]:
    indices = predict(model, list(images))
    return [Reading(**{a: CLASSES[a][int(indices[a][i])] for a in ATTRIBUTES}) for i in range(len(images))]


def clean_scenes(count: int, seed: int) -> list[tuple[world.Subject, str, str]]:
    """`count` (subject, background, position) triples, alternating held-in and held-out subjects."""
    rng = random.Random(f"oracle-clean-{seed}")
    pools = [world.subjects_in(split) for split in world.SPLITS]
    return [
        (rng.choice(pools[i % 2]), rng.choice(CLASSES["background"]), rng.choice(CLASSES["position"]))
        for i in range(count)
    ]


def clean_accuracy(model: OracleNet, count: int, seed: int) -> dict[str, float]:
    """Per-attribute and all-correct accuracy on exact target renders (no jitter, no augmentation)."""
    scenes = clean_scenes(count, seed)
    images = [world.render(world.target_scene(*scene)) for scene in scenes]
    predicted = predict(model, images)
    truth = {
        "shape": [CLASSES["shape"].index(s.shape) for s, _, _ in scenes],
        "colour": [CLASSES["colour"].index(s.colour) for s, _, _ in scenes],
        "pattern": [CLASSES["pattern"].index(s.pattern) for s, _, _ in scenes],
        "background": [CLASSES["background"].index(b) for _, b, _ in scenes],
        "position": [CLASSES["position"].index(p) for _, _, p in scenes],
    }
    correct = {a: predicted[a] == torch.tensor(truth[a]) for a in ATTRIBUTES}
    every = torch.stack(list(correct.values())).all(dim=0)
    result = {a: correct[a].float().mean().item() for a in ATTRIBUTES}
    result["all"] = every.float().mean().item()
    return result


# ---------------------------------------------------------------------------- command line
EVAL_SEED = 1234  # any seed works (the clean sets use their own rng prefix); fixed so reports compare


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easyref.shapes.oracle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the oracle, save it, report clean accuracy")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, default=ASSETS_DIR)
    train.add_argument("--count", type=int, default=2000, help="clean renders for the accuracy report")
    # one thread: on a small shared CPU, two threads ran this small net several times slower, and a fixed
    # thread count keeps the bundled weights reproducible
    train.add_argument("--threads", type=int, default=1)
    accuracy = sub.add_parser("accuracy", help="clean accuracy of saved weights")
    accuracy.add_argument("--dir", type=Path, default=None, help="weights folder (default: bundled)")
    accuracy.add_argument("--count", type=int, default=2000)
    accuracy.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "train":
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        model = train_oracle(steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr)
        seconds = time.perf_counter() - start
        result = clean_accuracy(model, args.count, EVAL_SEED)
        training = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(),
        }
        save_oracle(
            model,
            args.out,
            {"training": training, "clean_accuracy": {"count": args.count, "seed": EVAL_SEED, **result}},
        )
    else:
        result = clean_accuracy(load_oracle(args.dir), args.count, args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
