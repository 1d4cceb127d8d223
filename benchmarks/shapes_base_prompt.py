"""How well a shapes-world base model follows its prompt, read by the oracle: the limit of every
EasyRef method's prompt accuracy, since the stages only add the references.

Run (from the repository root):

    .venv/bin/python benchmarks/shapes_base_prompt.py                         # the bundled model's base
    .venv/bin/python benchmarks/shapes_base_prompt.py runs/bundled-model.work/base --count 96

For `--count` held-out subjects, each with a random background and position, the base draws the
image from three prompts: the full caption ("a red solid star on a tan background, at the top left"),
the subject-less prompt EasyRef's groups use ("an object on ..."), and a pick prompt naming one
attribute ("a striped object on ..."). Columns: background, position, corners (position over the
images asked for a corner, chance 25%), prompt (background and position both), identity (all three
attributes; for the subject-less prompt chance, since nothing names the subject). Seeds are fixed
per image, so two bases are compared on the same draws.

A second table shows what the text encoders give the UNet for the five positions: cosine similarity
of the pooled embedding (the one added to the time embedding) and of the token embedding at the
position words, between "top left" and the other corners.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table  # noqa: E402


def items(count: int, seed: int):
    from easyref.shapes.world import BACKGROUNDS, PICK_ATTRIBUTES, POSITIONS, subjects_in

    rng = random.Random(f"base-prompt-{seed}")
    subjects = subjects_in("held-out")
    return [
        (rng.choice(subjects), rng.choice(list(BACKGROUNDS)), rng.choice(list(POSITIONS)), rng.choice(PICK_ATTRIBUTES))
        for _ in range(count)
    ]


def measure(pipe, oracle, draws, prompt_of, steps: int, guidance: float) -> dict:
    from easyref.shapes.oracle import read_images

    images = []
    for start in range(0, len(draws), 16):
        chunk = draws[start : start + 16]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images += pipe(
            [prompt_of(*d) for d in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=generators
        ).images
    reads = list(zip(read_images(oracle, images), draws))
    corners = [r.position == d[2] for r, d in reads if d[2] != "center"]
    share = lambda hits: f"{100 * sum(hits) / max(1, len(hits)):.1f}"
    return {
        "background": share([r.background == d[1] for r, d in reads]),
        "position": share([r.position == d[2] for r, d in reads]),
        "corners": share(corners),
        "prompt": share([r.background == d[1] and r.position == d[2] for r, d in reads]),
        "identity": share(
            [(r.shape, r.colour, r.pattern) == (d[0].shape, d[0].colour, d[0].pattern) for r, d in reads]
        ),
    }


@torch.no_grad()
def text_similarity(pipe) -> list[dict]:
    from easyref.shapes.world import Subject, caption_for

    subject = Subject("star", "red", "solid")
    positions = ("top left", "top right", "bottom left", "bottom right", "center")
    prompts = [caption_for(subject, "tan", p) for p in positions]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompts[0])["input_ids"])
    first = tokens.index("top")
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    rows = []
    for i, position in enumerate(positions[1:], start=1):
        rows.append(
            {
                "'top left' against": position,
                "pooled": f"{cos(pooled[0], pooled[i]):.3f}",
                "first position word": f"{cos(embeds[0, first], embeds[i, first]):.3f}",
                "second position word": f"{cos(embeds[0, first + 1], embeds[i, first + 1]):.3f}",
            }
        )
    return rows


def main() -> None:
    from diffusers import StableDiffusionXLPipeline

    from easyref.bundled import bundled_model_dir
    from easyref.shapes.oracle import load_oracle
    from easyref.shapes.world import caption_for, pick_prompt, prompt_for

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", type=Path, help="an SDXL folder (default: the bundled model's sdxl/)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = args.base or bundled_model_dir() / "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle()
    draws = items(args.count, args.seed)
    prompts = {
        "full caption": lambda s, bg, pos, attr: caption_for(s, bg, pos),
        "subject-less": lambda s, bg, pos, attr: prompt_for(bg, pos),
        "one attribute (pick)": lambda s, bg, pos, attr: pick_prompt(s, attr, bg, pos),
    }
    rows = [
        {"prompt form": name, **measure(pipe, oracle, draws, make, args.steps, args.guidance)}
        for name, make in prompts.items()
    ]
    levels = len(pipe.unet.config.down_block_types)
    print(
        f"base {folder} ({levels}-level UNet), {args.count} held-out subjects, {args.steps} steps, "
        f"guidance {args.guidance}; accuracies in %; {machine_line('cpu')}"
    )
    print(_table(rows))
    print()
    print(_table(text_similarity(pipe)))


def _table(rows: list[dict]) -> str:
    return markdown_table(list(rows[0]), [list(r.values()) for r in rows])


if __name__ == "__main__":
    main()
