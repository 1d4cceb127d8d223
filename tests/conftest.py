"""Shared fixtures: tiny random SDXL and Qwen2-VL folders, saved once and loaded like real ones."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from easyref import EasyRefConfig, EasyRefPipeline, ReferenceEncoder
from easyref.tiny import save_tiny_qwen2vl, save_tiny_sdxl

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second intra-op thread only waits on a busy core (70x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"sdxl": save_tiny_sdxl(root / "sdxl"), "qwen": save_tiny_qwen2vl(root / "qwen2vl")}


def tiny_config(qwen_dir, **overrides) -> EasyRefConfig:
    values = dict(
        mllm=str(qwen_dir), mllm_hidden_size=64, cross_attention_dim=64, reference_image_size=56, max_references=6
    )
    values.update(overrides)
    return EasyRefConfig(**values)


@pytest.fixture
def make_encoder(tiny_dirs):
    def make(seed: int = 0, **overrides) -> ReferenceEncoder:
        torch.manual_seed(seed)
        return ReferenceEncoder.from_pretrained(tiny_dirs["qwen"], tiny_config(tiny_dirs["qwen"], **overrides)).eval()

    return make


@pytest.fixture
def make_sdxl(tiny_dirs):
    def make(cls_name: str = "StableDiffusionXLPipeline"):
        import diffusers

        pipe = getattr(diffusers, cls_name).from_pretrained(tiny_dirs["sdxl"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture
def make_pipeline(make_encoder, make_sdxl):
    def make(seed: int = 0, lora_rank: int = 0, randomize: bool = True, **overrides) -> EasyRefPipeline:
        pipe = EasyRefPipeline.from_components(make_sdxl(), make_encoder(seed, lora_rank=lora_rank, **overrides))
        if randomize:
            randomize_adapter(pipe.unet, seed)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def randomize_adapter(unet, seed: int) -> None:
    """Give k/v and LoRA weights random values so that the reference path visibly matters."""
    from easyref.adapter import adapter_parameters

    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in adapter_parameters(unet):
            param.add_(0.2 * torch.randn(param.shape, generator=gen))


def shape_image(color, background="white", size=(60, 44), box=(10, 8, 40, 36)) -> Image.Image:
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).ellipse(box, fill=color)
    return image


@pytest.fixture
def groups():
    return [
        [shape_image("red"), shape_image("red", "gray", (40, 70)), shape_image("red", "yellow")],
        [shape_image("blue", "black", (50, 50))],
    ]
