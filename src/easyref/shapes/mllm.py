"""Teach the tiny Qwen2-VL to see the shapes world before EasyRef's stages: our stand-in for the
vision-language pretraining a real Qwen2-VL arrives with.

EasyRef's stage 1 freezes the MLLM trunk and trains only the final layer, reference tokens and
adapter; that presumes a trunk whose visual tokens already carry shape, colour and pattern. A
randomly initialised tiny Qwen2-VL does not, and stage 1 then learns nothing about the subject.
So the model learns in two phases, as Qwen2-VL itself did (its ViT started from a pretrained
image encoder before any vision-language training):

1. **vision**: the vision tower alone learns to name a lone subject's shape, colour and pattern and
   the background (linear heads on its mean-pooled output, thrown away afterwards). Through a
   caption loss alone a ViT trained from scratch takes thousands of steps to see shape at all; fed
   straight, it does within the budget;
2. **captions**: the language model (the vision tower now frozen) learns to caption single reference
   renders, every object in them, left to right ("a red striped star and a blue solid circle on a tan
   background"), with the ordinary next-token loss on the caption, through the same chat template and
   image preprocessing EasyRef uses.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path

import torch

from ..config import EasyRefConfig
from ..prompting import chat_ids, normalize_image
from ..safe_io import replace_folder
from .loop import optimise
from .world import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, Scene, all_subjects, reference_scene, render, subjects_in

logger = logging.getLogger(__name__)

INSTRUCTION = "Describe the image."
IGNORE = -100


def scene_caption(scene: Scene) -> str:
    """Every object, left to right, with its attributes, then the background."""
    objects = sorted([scene.subject, *scene.distractors], key=lambda p: (p.cx, p.cy))
    names = " and ".join(f"a {p.subject.key}" for p in objects)
    return f"{names} on a {scene.background} background"


def random_scene(rng: random.Random, subjects, max_distractors: int = 2) -> Scene:
    return reference_scene(rng.choice(subjects), rng.randint(0, max_distractors), rng, subjects)


def load(folder: str | Path):
    """Model, tokenizer and PIL image processor, as `ReferenceEncoder.from_pretrained` loads them
    (AutoProcessor would also want the video processor, which needs torchvision)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder), Qwen2VLImageProcessorPil.from_pretrained(folder)


# Both phases see every subject, held-out ones included: they stand in for Qwen2-VL's web-scale
# pretraining, which has seen red stars and blue striped squares. What the held-out split holds out
# is EasyRef's own training data (the base model's captions and the three stages), as MRBench's
# held-out domains are absent from EasyRef's training set, not from Qwen2-VL's. Trained on held-in
# subjects only, the tower learned to rule out each colour-and-pattern's held-out shape and named
# held-out shapes right 0% of the time.
def pretraining_subjects():
    return all_subjects()


# colour, pattern and background are learned within a few hundred steps; shape is what is slow
VISION_WEIGHTS = {"shape": 3.0}
VISION_ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "background": tuple(BACKGROUNDS)}


def _attribute_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    values = {
        "shape": lambda sc: sc.subject.subject.shape,
        "colour": lambda sc: sc.subject.subject.colour,
        "pattern": lambda sc: sc.subject.subject.pattern,
        "background": lambda sc: sc.background,
    }
    return {
        name: torch.tensor([VISION_ATTRIBUTES[name].index(values[name](sc)) for sc in scenes])
        for name in VISION_ATTRIBUTES
    }


def _pixels(scenes: list[Scene], image_processor, config: EasyRefConfig):
    return image_processor(
        [normalize_image(render(scene)) for scene in scenes],
        return_tensors="pt",
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
    )


class VisionProbe(torch.nn.Module):
    """Linear attribute heads on the vision tower's mean-pooled (merged) tokens."""

    def __init__(self, visual, width: int):
        super().__init__()
        self.visual = visual
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(width, len(values)) for name, values in VISION_ATTRIBUTES.items()}
        )

    def forward(self, pixel_values, image_grid_thw) -> dict[str, torch.Tensor]:
        tokens = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
        per_image = (image_grid_thw.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        pooled = torch.stack([chunk.mean(0) for chunk in tokens.split(per_image)])
        return {name: head(pooled) for name, head in self.heads.items()}


def _warmup_cosine(optimizer, steps: int):
    warmup = max(1, min(200, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )


def pretrain_vision(
    folder: str | Path,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    reference_image_size: int = 112,
    device: str = "cpu",
) -> tuple[list[float], dict[str, float]]:
    """Phase 1: train the folder's vision tower in place on lone subjects; returns the loss curve and
    the attribute accuracies on a fixed check set of held-out subjects."""
    model, _, image_processor = load(folder)
    config = EasyRefConfig(reference_image_size=reference_image_size)
    probe = VisionProbe(model.model.visual, model.config.text_config.hidden_size).to(device).train()
    subjects = pretraining_subjects()
    rng = random.Random(f"shapes-vision-{seed}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, steps)

    def loss_of_a_batch():
        scenes = [random_scene(rng, subjects, max_distractors=0) for _ in range(batch_size)]
        vision, labels = _pixels(scenes, image_processor, config), _attribute_labels(scenes)
        logits = probe(vision["pixel_values"].to(device), vision["image_grid_thw"].to(device))
        return sum(
            VISION_WEIGHTS.get(k, 1.0) * torch.nn.functional.cross_entropy(logits[k], labels[k].to(device))
            for k in logits
        )

    losses = optimise("vision", steps, list(probe.parameters()), optimizer, schedule, loss_of_a_batch)
    accuracy = vision_accuracy(probe.to("cpu").eval(), image_processor, config)
    logger.info("vision held-out accuracy %s", {k: f"{100 * v:.0f}%" for k, v in accuracy.items()})
    model.to("cpu").save_pretrained(folder)
    return losses, accuracy


@torch.no_grad()
def vision_accuracy(
    probe: VisionProbe, image_processor, config: EasyRefConfig, count: int = 192, split: str = "held-out"
) -> dict[str, float]:
    subjects = subjects_in(split)
    rng = random.Random(f"shapes-vision-check-{split}")
    scenes = [random_scene(rng, subjects, max_distractors=0) for _ in range(count)]
    vision, labels = _pixels(scenes, image_processor, config), _attribute_labels(scenes)
    logits = probe(vision["pixel_values"], vision["image_grid_thw"])
    return {k: float((logits[k].argmax(-1) == labels[k]).float().mean()) for k in logits}


def caption_batch(scenes: list[Scene], tokenizer, image_processor, config: EasyRefConfig) -> dict[str, torch.Tensor]:
    """Chat prompt (image + instruction) followed by the caption; the loss sees only the caption."""
    vision = _pixels(scenes, image_processor, config)
    counts = _token_counts(vision, image_processor)
    prompts = chat_ids(tokenizer, [INSTRUCTION] * len(scenes), [1] * len(scenes), counts)
    return _answered(prompts, [scene_caption(scene) for scene in scenes], tokenizer, vision)


def _token_counts(vision, image_processor) -> list[int]:
    return (vision["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()


def _answered(prompts: list[list[int]], answers: list[str], tokenizer, vision) -> dict[str, torch.Tensor]:
    """Prompt ids followed by each answer, right-padded; labels on the answers only."""
    rows, labels = [], []
    for prompt_ids, answer in zip(prompts, answers):
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        labels.append([IGNORE] * len(prompt_ids) + answer_ids)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {
        "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([r + [IGNORE] * (length - len(r)) for r in labels]),
        "attention_mask": mask,
        # plain 1-D positions, as EasyRef's encoder feeds the trunk (the release's quirk), not M-RoPE
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def pretrain_mllm(
    folder: str | Path,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    reference_image_size: int = 112,
    device: str = "cpu",
    freeze_vision: bool = False,
) -> list[float]:
    """Train the Qwen2-VL folder's weights in place; returns the loss curve.

    `freeze_vision`: keep a pretrained vision tower as it is. Trained along with a language model
    that starts random, the tower's shape features faded: the captioner then named 55% of lone
    held-out shapes (78% with the tower frozen), where the tower's own heads had named 91%."""
    model, tokenizer, image_processor = load(folder)
    model.to(device).train()
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    config = EasyRefConfig(reference_image_size=reference_image_size)
    subjects = pretraining_subjects()
    rng = random.Random(f"shapes-mllm-{seed}")
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    # warm up, then decay linearly to 5%: the caption loss plateaus early at a constant rate
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(1, steps))
    )

    def loss_of_a_batch():
        batch = caption_batch(
            [random_scene(rng, subjects) for _ in range(batch_size)], tokenizer, image_processor, config
        )
        return model(**{k: v.to(device) for k, v in batch.items()}).loss

    losses = optimise("mllm", steps, trainable, optimizer, schedule, loss_of_a_batch)
    model.to("cpu").save_pretrained(folder)
    return losses


def build_mllm(
    out: str | Path,
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
    reference_image_size: int = 112,
    device: str = "cpu",
    vision_steps: int = 0,
    vision_width: int = 32,
    vision_depth: int = 2,
) -> Path:
    """A tiny Qwen2-VL-Instruct folder, vision- then caption-pretrained on the world (written
    aside, then renamed)."""
    from ..tiny import save_tiny_qwen2vl

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tiny_qwen2vl(tmp, seed=seed + 1, for_training=True, vision_width=vision_width, vision_depth=vision_depth)
    vision = (
        pretrain_vision(
            tmp, vision_steps, batch_size, seed=seed, reference_image_size=reference_image_size, device=device
        )[1]
        if vision_steps
        else {}
    )
    losses = pretrain_mllm(
        tmp,
        steps,
        batch_size,
        seed=seed,
        reference_image_size=reference_image_size,
        device=device,
        freeze_vision=bool(vision_steps),
    )
    accuracy, words = _caption_scores(tmp, steps, reference_image_size)
    record = {
        "steps": steps,
        "vision_steps": vision_steps,
        "batch_size": batch_size,
        "seed": seed,
        "vision_width": vision_width,
        "vision_depth": vision_depth,
        "vision_held_out_accuracy": vision,
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "caption_accuracy": accuracy,
        "caption_attribute_accuracy": words,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    replace_folder(tmp, out)
    return out


def _caption_scores(folder: Path, steps: int, reference_image_size: int) -> tuple[float, dict]:
    """Whole captions right, and caption words right per split (nothing to score without caption steps)."""
    if not steps:
        return 0.0, {}
    accuracy = caption_accuracy(folder, reference_image_size=reference_image_size)
    logger.info("mllm caption accuracy (every token right) %.1f%%", 100 * accuracy)
    words = {
        split: caption_attribute_accuracy(folder, split=split, reference_image_size=reference_image_size)
        for split in ("held-in", "held-out")
    }
    logger.info("mllm caption words right: %s", words)
    return accuracy, words


@torch.no_grad()
def caption_accuracy(folder: str | Path, count: int = 64, seed: int = 1, reference_image_size: int = 112) -> float:
    """Share of held-in scenes (0-2 objects beside the subject) whose every caption token the model
    predicts right from the tokens before it: a check that the pretraining took."""
    model, tokenizer, image_processor = load(folder)
    model.eval()
    config = EasyRefConfig(reference_image_size=reference_image_size)
    rng = random.Random(f"shapes-mllm-check-{seed}")
    scenes = [random_scene(rng, subjects_in("held-in")) for _ in range(count)]
    batch = caption_batch(scenes, tokenizer, image_processor, config)
    labels = batch.pop("labels")
    predicted = model(**batch).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    right = ((predicted == target) | (target == IGNORE)).all(-1)
    return float(right.float().mean())


@torch.no_grad()
def caption_attribute_accuracy(
    folder: str | Path, split: str = "held-out", count: int = 96, seed: int = 0, reference_image_size: int = 112
) -> dict[str, float]:
    """Share of lone subjects whose shape / colour / pattern / background word the captioner gets
    wholly right from the tokens before it: what the model sees, word by word."""
    model, tokenizer, image_processor = load(folder)
    model.eval()
    config = EasyRefConfig(reference_image_size=reference_image_size)
    rng = random.Random(f"shapes-mllm-words-{split}-{seed}")
    scenes = [random_scene(rng, subjects_in(split), max_distractors=0) for _ in range(count)]
    batch = caption_batch(scenes, tokenizer, image_processor, config)
    labels = batch.pop("labels")[:, 1:]
    right_tokens = model(**batch).logits[:, :-1].argmax(-1) == labels
    hits = dict.fromkeys(VISION_ATTRIBUTES, 0)
    for row, scene in enumerate(scenes):
        answer = (labels[row] != IGNORE).nonzero().flatten().tolist()
        spans, text = [], ""
        for position in answer:  # character span of every answer token, to find each word's tokens
            piece = tokenizer.decode([int(labels[row, position])])
            spans.append((len(text), len(text) + len(piece), bool(right_tokens[row, position])))
            text += piece
        subject = scene.subject.subject
        background_at = text.index(" on a ")
        for name, word in (
            ("shape", subject.shape),
            ("colour", subject.colour),
            ("pattern", subject.pattern),
            ("background", scene.background),
        ):
            start = text.index(word, background_at if name == "background" else 0)
            hits[name] += all(ok for a, b, ok in spans if a < start + len(word) and b > start)
    return {name: hit / count for name, hit in hits.items()}


# ---------------------------------------------------------------------------- grounding
# A third, optional phase: the group as EasyRef's encoder reads it (all references, then the
# instruction with the prompt), answered with the name of the object the target shows. It asks of
# the trunk what stage 3 needs from it: the object shared by every reference (rival, repeat) or the
# one the prompt names (pick), said in words, so that the information is in the trunk's output.
# Trained on held-in subjects only; measured on held-out ones.
GROUNDING_KINDS = ("plain", "rival", "repeat", "pick")


def grounding_groups(
    rng: random.Random, count: int, split: str = "held-in", kinds: tuple[str, ...] = GROUNDING_KINDS
) -> list:
    """`count` groups of the split, kind, reference count (2-5) and clutter drawn at random."""
    from .data import KIND_DISTRACTORS
    from .world import make_groups

    groups = []
    for _ in range(count):
        kind = rng.choice(kinds)
        distractors = rng.choice(KIND_DISTRACTORS.get(kind, (0, 1, 2)))
        groups += make_groups(split, 1, rng.randint(2, 5), distractors, seed=rng.randrange(2**31), kind=kind)
    return groups


def grounding_batch(groups: list, tokenizer, image_processor, config: EasyRefConfig) -> dict[str, torch.Tensor]:
    """Every group's chat prompt as the encoder builds it, followed by "a <subject>"; the loss sees the answer."""
    vision = _pixels([scene for group in groups for scene in group.references], image_processor, config)
    prompts = chat_ids(
        tokenizer,
        [config.format_instruction(group.prompt) for group in groups],
        [len(group.references) for group in groups],
        _token_counts(vision, image_processor),
    )
    return _answered(prompts, [f"a {group.subject.key}" for group in groups], tokenizer, vision)


def pretrain_grounding(
    folder: str | Path,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    reference_image_size: int = 112,
    device: str = "cpu",
) -> list[float]:
    """Train the folder's language model (vision tower frozen) on `grounding_batch`, in place."""
    model, tokenizer, image_processor = load(folder)
    model.to(device).train()
    model.model.visual.requires_grad_(False)
    config = EasyRefConfig(reference_image_size=reference_image_size)
    rng = random.Random(f"shapes-grounding-{seed}")
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, steps)

    def loss_of_a_batch():
        batch = grounding_batch(grounding_groups(rng, batch_size), tokenizer, image_processor, config)
        return model(**{k: v.to(device) for k, v in batch.items()}).loss

    losses = optimise("grounding", steps, trainable, optimizer, schedule, loss_of_a_batch)
    model.to("cpu").save_pretrained(folder)
    return losses


@torch.no_grad()
def grounding_accuracy(
    folder: str | Path,
    kind: str,
    split: str = "held-out",
    count: int = 64,
    seed: int = 0,
    reference_image_size: int = 112,
    batch_size: int = 16,
) -> float:
    """Share of groups whose subject the model names wholly right (every answer token, teacher-forced)."""
    model, tokenizer, image_processor = load(folder)
    model.eval()
    config = EasyRefConfig(reference_image_size=reference_image_size)
    groups = grounding_groups(random.Random(f"shapes-grounding-check-{kind}-{split}-{seed}"), count, split, (kind,))
    right = 0
    for start in range(0, count, batch_size):
        batch = grounding_batch(groups[start : start + batch_size], tokenizer, image_processor, config)
        labels = batch.pop("labels")[:, 1:]
        predicted = model(**batch).logits[:, :-1].argmax(-1)
        right += int(((predicted == labels) | (labels == IGNORE)).all(-1).sum())
    return right / count
