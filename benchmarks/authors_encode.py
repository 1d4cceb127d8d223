"""Reference encoding: ours against the authors' own code, run under their pinned libraries.

Run (from the repository root; AUTHORS is a checkout of github.com/TempleX98/EasyRef, which this project
does not ship):

    .venv/bin/python benchmarks/authors_encode.py --authors-repo AUTHORS               # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/authors_encode.py --authors-repo AUTHORS --sizes 1 --num-layers 2 --vision-depth 2

The first run builds a venv (`--venv`, default `runs/authors-venv`) with their pins that matter here:
transformers 4.45.2, diffusers 0.22.1, huggingface-hub 0.23.3, qwen_vl_utils 0.0.8 (torch is this
machine's 2.13.0 wheel). `authors_worker.py` runs in it and calls their `EasyRef.get_image_embeds`
itself; this process drives it over a pipe, the two taking turns call by call.

Both load one random Qwen2-VL-2B-architecture folder (real widths; depth cut by `--num-layers` /
`--vision-depth`, by default 7 and 8, the real 28 : 32 proportion), written by transformers 4.45, the
layout the released model has. Ours gets their reference tokens and projection weights, so both compute
the same function in bfloat16, as their code does; `cos` and `max abs diff` compare the 64 projected
tokens. Both are timed from PIL images to projected tokens. "theirs per generation" adds their negative
branch (a black 512-px image), which they recompute on every call and ours caches; "ours again" is the
same group with a new prompt (the vision features cached).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from encode_scaling import PROMPT, PROMPT_AGAIN, make_images  # noqa: E402

logger = logging.getLogger("benchmarks.authors_encode")

HERE = Path(__file__).resolve().parent
PINS = [
    "torch==2.13.0",
    "transformers==4.45.2",
    "diffusers==0.22.1",
    "huggingface-hub==0.23.3",
    "qwen_vl_utils==0.0.8",
    "accelerate<1.1",
    "safetensors",
    "einops",
    "pillow",
    "numpy<2",
]
INPUT_SIZE = 672  # a multiple of 28: their qwen_vl_utils keeps it as it is, as our preprocessing does


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--authors-repo", type=Path, required=True, help="a checkout of TempleX98/EasyRef")
    p.add_argument("--venv", type=Path, default=Path("runs/authors-venv"), help="venv with their pins (built once)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8], help="numbers of references")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per point (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=7, help="text decoder layers (28 = real)")
    p.add_argument("--vision-depth", type=int, default=8, help="vision blocks (32 = real)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not (args.authors_repo / "ip_adapter" / "ip_adapter.py").is_file():
        p.error(
            f"--authors-repo {args.authors_repo}: no ip_adapter/ip_adapter.py there (a TempleX98/EasyRef checkout?)"
        )
    args.device, args.threads = "cpu", None  # their code runs on the CPU here only by our set-up of it
    return args


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        logger.info("building %s with the authors' pins (once)", venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    return python


def legacy_config(num_layers: int, vision_depth: int, seed: int) -> tuple[object, dict]:
    """(tokenizer, Qwen2-VL-2B's config as transformers 4.45 spells it, flat, with the tokenizer's ids)."""
    tokenizer, config = _common.qwen2vl_2b_with_tiny_tokenizer(num_layers, vision_depth)
    text = config.text_config
    ids = {k: getattr(text, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    flat = _common.legacy_qwen2vl_config(config, seed, **ids)
    return tokenizer, flat


def write_model_folder(python: Path, folder: Path, args) -> None:
    from easyref.tiny import QWEN_CHAT_TEMPLATE

    tokenizer, flat = legacy_config(args.num_layers, args.vision_depth, args.seed)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))
    worker = str(HERE / "authors_worker.py")
    subprocess.run([str(python), worker, "make-model", str(folder), json.dumps(flat)], check=True)


def load_ours(folder: Path, state_file: Path):
    """Our encoder over the same folder, and diffusers' projection, both holding their weights."""
    from diffusers.models.embeddings import IPAdapterFullImageProjection
    from safetensors.torch import load_file

    from easyref import EasyRefConfig, ReferenceEncoder
    from easyref.release import convert_release_tensors

    config = EasyRefConfig(mllm=str(folder), mllm_hidden_size=1536, reference_image_size=336)
    encoder = ReferenceEncoder.from_pretrained(folder, config, dtype=torch.bfloat16).eval()
    _, tensors, _ = convert_release_tensors(load_file(str(state_file)))
    projection = IPAdapterFullImageProjection(image_embed_dim=1536, cross_attention_dim=2048)
    prefix = "unet.encoder_hid_proj.image_projection_layers.0."
    projection.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    with torch.no_grad():
        encoder.aggregator.reference_tokens.copy_(tensors["aggregator.reference_tokens"])
    return encoder, projection.to(torch.bfloat16).eval()


def ours_call(encoder, projection, images, prompt):
    """Ours from PIL images to projected tokens, as their method goes."""
    return projection(encoder([images], [prompt]))


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(lowest per-token cosine, max abs diff) between two (1, 64, 2048) outputs, in float32."""
    a, b = ours.float().flatten(0, 1), theirs.float().flatten(0, 1)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item(), (a - b).abs().max().item()


def measure_size(n: int, encoder, projection, theirs: _common.AuthorsWorker, workdir: Path, args) -> list:
    from safetensors.torch import load_file

    images = make_images(n, INPUT_SIZE, args.seed + n)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(workdir / f"ref{n}-{i}.png"))
        image.save(paths[-1])
    text = encoder.config.format_instruction(PROMPT)
    out_file = workdir / f"theirs{n}.safetensors"
    theirs.ask(cmd="encode", images=paths, text=text, out=str(out_file))

    def cold():
        encoder.vision_cache.clear()
        return ours_call(encoder, projection, images, PROMPT)

    cosine, diff = compare(cold(), load_file(str(out_file))["embeds"])
    negative = encoder.config.negative_instruction
    t = _common.interleaved_times(
        {
            "ours": cold,
            "again": lambda: ours_call(encoder, projection, images, PROMPT_AGAIN),
            "theirs": lambda: theirs.ask(cmd="encode", images=paths, text=text),
            "theirs negative": lambda: theirs.ask(cmd="encode", black=True, text=negative),
        },
        args.repeats,
        args.warmup,
        args.device,
    )
    t["theirs per generation"] = [p + q for p, q in zip(t["theirs"], t["theirs negative"])]
    logger.info("N=%d ours %.2fs again %.2fs theirs %.2fs", n, t.median("ours"), t.median("again"), t.median("theirs"))
    ms = lambda name: f"{t.median(name) * 1e3:.0f}"  # noqa: E731
    return [
        n,
        ms("ours"),
        ms("again"),
        ms("theirs"),
        ms("theirs negative"),
        f"{t.ratio('theirs', 'ours'):.2f}x",
        f"{t.ratio('theirs per generation', 'ours'):.2f}x",
        f"{t.ratio('theirs per generation', 'again'):.2f}x",
        f"{cosine:.5f}",
        f"{diff:.1e}",
    ]


HEADERS = [
    "N refs",
    "ours ms",
    "ours again ms",
    "theirs ms",
    "theirs negative ms",
    "theirs/ours",
    "theirs per generation / ours",
    "theirs per generation / ours again",
    "min cos",
    "max abs diff",
]


def main(argv=None) -> int:
    args = parse_args(argv)
    device, busy = _common.start_run(args)
    python = ensure_venv(args.venv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = workdir / "qwen2vl"
        write_model_folder(python, folder, args)
        theirs = _common.AuthorsWorker(python, HERE / "authors_worker.py", args.authors_repo)
        try:
            state_file = workdir / "theirs_state.safetensors"
            load_s = theirs.ask(cmd="load", folder=str(folder), state_out=str(state_file), seed=args.seed)["load_s"]
            encoder, projection = load_ours(folder, state_file)
            with torch.inference_mode():
                rows = [measure_size(n, encoder, projection, theirs, workdir, args) for n in args.sizes]
        finally:
            theirs.close()
    print(
        f"### Reference encoding: ours vs the authors' `get_image_embeds` (transformers 4.45.2), Qwen2-VL-2B "
        f"widths, {args.num_layers} text layers / vision depth {args.vision_depth}, bfloat16\n"
    )
    print(
        f"{_common.machine_line(device, busy)}; median of {args.repeats} rounds after {args.warmup} warm-up; "
        f"their load {load_s:.1f} s (two copies)\n"
    )
    print(_common.markdown_table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
