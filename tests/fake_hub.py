"""A Hugging Face cache on disk, laid out as huggingface_hub writes it, holding tiny random models
under the real hub ids: what `HF_HUB_OFFLINE=1` commands by hub id read in the tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from conftest import randomize_adapter, tiny_config
from safetensors.torch import save_file

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
QWEN_ID = "Qwen/Qwen2-VL-2B-Instruct"
RELEASE_ID = "zongzhuofan/EasyRef"
IP_ADAPTER_ID = "h94/IP-Adapter"
CLIP_ID = "openai/clip-vit-large-patch14"
DINO_ID = "facebook/dino-vits16"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def into_cache(
    folder: Path, cache: Path, repo_id: str, commit: str = COMMIT, ref: str = "main", under: str = ""
) -> Path:
    """Lay `folder` out as huggingface_hub's cache does (in the repository's `under` folder):
    content-addressed blobs, a snapshot of relative symlinks to them, and refs/<ref> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / under / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def release_pipeline(tiny_dirs):
    """A tiny EasyRef with a finetuned trunk and LoRA: what the release file is, at tiny size."""
    from diffusers import StableDiffusionXLPipeline

    from easyref import EasyRefPipeline, ReferenceEncoder

    torch.manual_seed(0)
    encoder = ReferenceEncoder.from_pretrained(
        tiny_dirs["qwen"], tiny_config(tiny_dirs["qwen"], lora_rank=4, has_trunk=True)
    )
    pipe = EasyRefPipeline.from_components(StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"]), encoder)
    randomize_adapter(pipe.unet, 0)
    return pipe


def build_hub(cache: Path, scratch: Path, tiny_dirs, metrics: bool = False) -> Path:
    """SDXL, Qwen2-VL and the release (in its own file format) under their ids; with `metrics`, also
    the bench's defaults: h94's SDXL IP-Adapter (`sdxl_models/`), CLIP ViT-L/14 and DINO ViT-S/16."""
    from model_checks import to_release_state_dict

    into_cache(tiny_dirs["sdxl"], cache, SDXL_ID)
    into_cache(tiny_dirs["qwen"], cache, QWEN_ID)
    release = scratch / "release"
    release.mkdir(parents=True)
    save_file(to_release_state_dict(release_pipeline(tiny_dirs)), str(release / "model.safetensors"))
    into_cache(release, cache, RELEASE_ID)
    if metrics:
        from tiny_models import save_tiny_clip, save_tiny_dino, save_tiny_ip_adapter

        from easyref.bench import DEFAULT_IP_ADAPTER_SUBFOLDER, DEFAULT_IP_ADAPTER_WEIGHTS

        ip = save_tiny_ip_adapter(scratch / "ip", tiny_dirs["sdxl"])
        (ip / "ip_adapter.safetensors").rename(ip / DEFAULT_IP_ADAPTER_WEIGHTS)
        into_cache(ip, cache, IP_ADAPTER_ID, under=DEFAULT_IP_ADAPTER_SUBFOLDER)
        into_cache(save_tiny_clip(scratch / "clip"), cache, CLIP_ID)
        into_cache(save_tiny_dino(scratch / "dino"), cache, DINO_ID)
    return cache
