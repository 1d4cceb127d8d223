"""One training step: ours (`easyref.train.trainer.Trainer`) against the authors' `finetune_sdxl.py`.

Run (from the repository root; AUTHORS is a checkout of github.com/TempleX98/EasyRef, never shipped here):

    .venv/bin/python benchmarks/authors_train_step.py --authors-repo AUTHORS [--stages 1 2 3]

Both sides read one tiny random SDXL folder and one tiny random Qwen2-VL folder written by transformers
4.45 (the authors' layout), the same example data on disk (their JSON formats), fp32, batch 2, drop
rates 0, no flips, no face expansion, no truncation. The authors' side (`authors_train_worker.py`, in the
venv of `authors_encode.py`) builds their model as their `main()` does and saves its whole state dict;
ours starts from that file (`init_from`, read by `easyref.release`), so both hold the same weights. Ours
draws the VAE eps, the noise and the timesteps from its per-sample generators; the worker is handed the
same tensors. Each side runs forward, MSE and backward once; the table gives the two losses and, per
parameter group, the cosine of the two flattened gradients (their names mapped to ours by
`easyref.release`). Each stage runs with `replicate_release` on and off (theirs is the same both times).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from authors_encode import ensure_venv  # noqa: E402

logger = logging.getLogger("benchmarks.authors_train_step")
HERE = Path(__file__).resolve().parent
GROUPS = ("aggregator", "reference_attention", "projection", "trunk", "lora")
STAGE_FLAGS = {  # their command-line flags per stage (README / paper recipe)
    1: dict(random_crop=True, multi_ref_finetuning=False, unfreeze_mllm=False, use_lora=False),
    2: dict(random_crop=True, multi_ref_finetuning=False, unfreeze_mllm=True, use_lora=True),
    3: dict(random_crop=False, multi_ref_finetuning=True, unfreeze_mllm=True, use_lora=True),
}
DATA = {1: "pairs", 2: "faces", 3: "groups"}
INDICES = [0, 1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors-repo", type=Path, required=True)
    p.add_argument("--venv", type=Path, default=Path("runs/authors-venv"))
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--reference-size", type=int, default=336)
    p.add_argument(
        "--image-size",
        type=int,
        default=48,
        help="side of the example images; at --resolution, resizing is the identity and the two sides' "
        "stage-3 data choices (size conditioning, rounding) coincide",
    )
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dump", type=Path, default=None, help="save both sides' intermediate tensors here (.pt)")
    return p.parse_args(argv)


def write_models(python: Path, work: Path) -> tuple[Path, Path]:
    from transformers import AutoConfig, AutoTokenizer

    from easyref.tiny import QWEN_CHAT_TEMPLATE, save_tiny_qwen2vl, save_tiny_sdxl

    sdxl = save_tiny_sdxl(work / "sdxl")
    ours = save_tiny_qwen2vl(work / "qwen-new")
    config, tokenizer = AutoConfig.from_pretrained(ours), AutoTokenizer.from_pretrained(ours)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    flat = _common.legacy_qwen2vl_config(config, 0, **ids)
    qwen = work / "qwen"
    tokenizer.save_pretrained(qwen)
    (qwen / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))
    worker = str(HERE / "authors_worker.py")
    subprocess.run([str(python), worker, "make-model", str(qwen), json.dumps(flat)], check=True)
    config_file = qwen / "config.json"  # written in bfloat16; both sides are to load it in float32
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"torch_dtype": "float32"}))
    return sdxl, qwen


def write_data(root: Path, image_size: int) -> dict:
    """Our example data, and the same records in their formats (a JSON list; faces nested twice)."""
    from easyref.train.example import write_example_data

    paths = write_example_data(root, subjects=2, per_subject=3, size=image_size)
    faces = json.loads(paths["faces"].read_text())
    for record in faces:
        record["face"] = record["face"][0]  # their code reads item["face"][0] as the box
    groups = [json.loads(line) for line in paths["groups"].read_text().splitlines() if line.strip()]
    (root / "theirs_faces.json").write_text(json.dumps(faces))
    (root / "theirs_groups.json").write_text(json.dumps(groups))
    theirs = {1: paths["pairs"], 2: root / "theirs_faces.json", 3: root / "theirs_groups.json"}
    return {"ours": {s: paths[DATA[s]] for s in (1, 2, 3)}, "theirs": theirs, "records": {3: groups}}


def our_config(stage: int, replicate: bool, sdxl, qwen, data, root, init_from, out, args):
    from easyref.train.config import TrainConfig

    return TrainConfig(
        stage=stage,
        base=str(sdxl),
        mllm=str(qwen),
        init_from=str(init_from),
        output_dir=str(out),
        data=str(data),
        data_root=str(root),
        resolution=args.resolution,
        crop="center",  # their MyDataset's default (center_crop=True), which main() does not change
        keep_aspect=stage == 3,
        bucket_stride=64 if stage == 3 else 16,  # stages 1-2 crop squares: any resolution a multiple of 16
        max_references=4,
        truncate_rate=0.0,
        image_drop_rate=0.0,
        text_drop_rate=0.0,
        both_drop_rate=0.0,
        face_expand_max=0.0,
        flip_rate=0.0,
        num_workers=0,
        reference_image_size=args.reference_size,
        mixed_precision="no",
        gradient_checkpointing=False,
        batch_size=len(INDICES),
        max_steps=1,
        tensorboard=False,
        replicate_release=replicate,
        seed=args.seed,
    )


def reference_orders(batch, records, root: Path) -> list[list[int]]:
    """Per sample, which of the record's reference files each of our references is (stage 3 shuffles)."""
    from PIL import Image

    orders = []
    for refs, index in zip(batch.references, INDICES):
        files = records[index]["image_file"] if records else None
        if not isinstance(files, list):
            orders.append([0])
            continue
        arrays = [np.asarray(Image.open(root / f).convert("RGB")) for f in files]
        order = []
        for ref in refs:
            a = np.asarray(ref.convert("RGB"))
            match = [i for i, b in enumerate(arrays) if a.shape == b.shape and np.array_equal(a, b) and i not in order]
            order.append(match[0] if match else len(order))
        orders.append(order)
    return orders


def our_draws(trainer, batch) -> dict[str, torch.Tensor]:
    """The VAE eps, noise and timesteps `Trainer._loss` draws from each sample's generator, in its order."""
    with torch.no_grad():
        shape = trainer.models.vae.encode(batch.pixel_values.float()).latent_dist.mean.shape[1:]
    eps, noise, steps = [], [], []
    total = trainer.models.noise_scheduler.config.num_train_timesteps
    for seed in batch.noise_seeds:
        g = torch.Generator().manual_seed(seed)
        eps.append(torch.randn(shape, generator=g))
        noise.append(torch.randn(shape, generator=g))
        steps.append(torch.randint(0, total, (1,), generator=g))
    return {"eps": torch.stack(eps), "noise": torch.stack(noise), "timesteps": torch.cat(steps)}


def our_key(name: str) -> str:
    """Our parameter's name (`parameter_groups.named_parameters`) in the converted release's key space."""
    if name.startswith("encoder.aggregator."):
        return name.removeprefix("encoder.")
    if name.startswith("encoder."):
        return "trunk." + name.removeprefix("encoder.")
    if ".lora_" in name:  # peft's adapter name sits between lora_A/lora_B and weight
        name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
        return name if name.startswith("unet.lora.") else "unet.lora." + name.removeprefix("unet.")
    return name


def their_group(key: str) -> str | None:
    if key.startswith("aggregator."):
        return "aggregator"
    if key.startswith("trunk."):
        return "trunk"
    if key.startswith("unet.lora."):
        return "lora"
    if key.startswith("unet.encoder_hid_proj."):
        return "projection"
    if "_ip." in key:
        return "reference_attention"
    return None


def our_step(trainer, batch, dump=None):
    from easyref.parameter_groups import named_parameters, trained_groups

    for _, p in trainer.trainables:
        p.grad = None
    tensors, hooks = {}, []
    if dump is not None:  # optional: the intermediate tensors of this step, for diagnosing a mismatch
        inputs = batch.mllm_inputs
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
            tensors[k] = getattr(inputs, k).detach().clone()
        enc, unet = trainer.models.encoder, trainer.models.unet

        def keep(name):
            def hook(mod, args, out):
                out = out[0] if isinstance(out, (list, tuple)) else out
                tensors[name] = out.detach().clone()

            return hook

        def unet_in(mod, args, kw):
            names = ("unet_latents", "unet_timesteps")
            for name, a in zip(names, args):
                tensors[name] = a.detach().clone()
            tensors["unet_encoder_hidden_states"] = kw["encoder_hidden_states"].detach().clone()
            for k, v in kw["added_cond_kwargs"].items():
                if torch.is_tensor(v):
                    tensors["unet_" + k] = v.detach().clone()

        hooks.append(enc.norm.register_forward_hook(keep("trunk_out")))
        hooks.append(enc.aggregator.norm.register_forward_hook(keep("reference_tokens_out")))
        hooks.append(unet.encoder_hid_proj.register_forward_hook(keep("unet_encoder_hid_proj_out")))
        hooks.append(unet.register_forward_pre_hook(unet_in, with_kwargs=True))
        hooks.append(
            unet.register_forward_hook(lambda mod, args, out: tensors.__setitem__("pred", out.sample.detach().clone()))
        )
    loss = trainer._loss(batch)
    for h in hooks:
        h.remove()
    if dump is not None:
        torch.save(tensors, dump)
    loss.backward()
    grads = {}
    for group in trained_groups(trainer.config.stage):
        for name, p in named_parameters(group, trainer.models.encoder, trainer.models.unet):
            if p.requires_grad:
                grads[our_key(name)] = (group, torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return float(loss), grads


def cosines(ours: dict, theirs: dict) -> dict[str, str]:
    from easyref.release import _convert_key

    mapped = {}
    for key, grad in theirs.items():
        new, _ = _convert_key(key)
        if new is not None and their_group(new):
            mapped[new] = grad
    out = {}
    for group in GROUPS:
        keys = sorted(k for k, (g, _) in ours.items() if g == group)
        if not keys:
            continue
        missing = [k for k in keys if k not in mapped]
        both = [k for k in keys if k in mapped]
        if not both:
            out[group] = "no match"
            continue
        a = torch.cat([ours[k][1].flatten().double() for k in both])
        b = torch.cat([mapped[k].flatten().double() for k in both])
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        out[group] = f"{cos:.6f}" + (f" ({len(missing)}/{len(keys)} unmatched)" if missing else "")
    return out


def run_stage(stage, worker, sdxl, qwen, data, root, work, args) -> list:
    from safetensors.torch import load_file, save_file

    from easyref.train.trainer import Trainer

    state = work / f"theirs-stage{stage}" / "model.safetensors"
    state.parent.mkdir()
    worker.ask(
        cmd="build",
        base=str(sdxl),
        mllm=str(qwen),
        seed=args.seed,
        num_reference_tokens=64,
        lora_rank=args.lora_rank,
        state_out=str(state),
        data=str(data["theirs"][stage]),
        data_root=str(root),
        resolution=args.resolution,
        max_num_images=4,
        cond_image_size=args.reference_size,
        **STAGE_FLAGS[stage],
    )
    rows = []
    theirs_loss = theirs_grads = None
    for replicate in (True, False):
        cfg = our_config(stage, replicate, sdxl, qwen, data["ours"][stage], root, state.parent, work / "out", args)
        trainer = Trainer(cfg)
        batch = trainer.fixed_batch(INDICES)
        if theirs_loss is None:
            inject = work / f"inject{stage}.safetensors"
            save_file(our_draws(trainer, batch), str(inject))
            orders = reference_orders(batch, data["records"].get(stage), root)
            grads_file, batch_file = work / f"grads{stage}.safetensors", work / f"batch{stage}.safetensors"
            reply = worker.ask(
                cmd="step",
                indices=INDICES,
                orders=orders,
                inject=str(inject),
                grads_out=str(grads_file),
                batch_out=str(batch_file),
                **({"dump": str(args.dump / f"theirs{stage}.pt")} if args.dump else {}),
            )
            theirs_loss, theirs_grads = reply["loss"], load_file(str(grads_file))
            theirs_batch = load_file(str(batch_file))
            same = torch.allclose(theirs_batch["images"], batch.pixel_values.float(), atol=1e-5)
            logger.info(
                "stage %d: target pixels equal: %s; their time ids %s, ours %s",
                stage,
                same,
                theirs_batch["time_ids"].tolist(),
                batch.time_ids.tolist(),
            )
        dump = args.dump / f"ours{stage}-{'on' if replicate else 'off'}.pt" if args.dump else None
        loss, grads = our_step(trainer, batch, dump)
        rel = abs(loss - theirs_loss) / abs(theirs_loss)
        cos = cosines(grads, theirs_grads)
        rows.append(
            [stage, "on" if replicate else "off", f"{loss:.6f}", f"{theirs_loss:.6f}", f"{rel:.1e}"]
            + [cos.get(g, "-") for g in GROUPS]
        )
        logger.info("stage %d replicate_release=%s: %s", stage, replicate, rows[-1])
    return rows


HEADERS = ["stage", "replicate_release", "loss ours", "loss theirs", "rel err"] + [f"cos {g}" for g in GROUPS]


def main(argv=None) -> int:
    args = parse_args(argv)
    _common.setup_logging(False)
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    torch.set_num_threads(2)
    python = ensure_venv(args.venv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sdxl, qwen = write_models(python, work)
        root = work / "data"
        data = write_data(root, args.image_size)
        for stage in args.stages:
            worker = _common.AuthorsWorker(python, HERE / "authors_train_worker.py", args.authors_repo)
            try:
                rows += run_stage(stage, worker, sdxl, qwen, data, root, work, args)
            finally:
                worker.close()
    print(f"### One training step: ours vs the authors' `finetune_sdxl.py` (tiny models, fp32, batch {len(INDICES)})\n")
    print(f"{_common.machine_line('cpu')}\n")
    print(_common.markdown_table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
