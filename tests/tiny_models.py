"""Tiny random models the tests need beyond `easyref.tiny`: the benchmark's IP-Adapter baselines and
its CLIP and DINO metric models, saved in their real layouts so that the loading paths under test are
the ones real folders take."""

from __future__ import annotations

from pathlib import Path

import torch

from easyref.tiny import tiny_clip_tokenizer

# A tiny IP-Adapter for the benchmark's baselines, in the original h94 file layout so that diffusers'
# own `load_ip_adapter` (and its key conversion) is the loading path the tests exercise.

TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)


def save_tiny_ip_adapter(path: str | Path, sdxl, seed: int = 0, plus: bool = False) -> Path:
    """Write a tiny random IP-Adapter folder for the UNet of `sdxl` (a folder, pipeline or UNet).

    Layout, as `pipe.load_ip_adapter(path, subfolder="", weight_name="ip_adapter.safetensors")` expects:
    `ip_adapter.safetensors` ("image_proj.*" + "ip_adapter.{1,3,5,..}.to_{k,v}_ip.weight") and
    `image_encoder/` (a `CLIPVisionModelWithProjection`). `plus`: a Resampler image projection over
    the encoder's penultimate hidden states (IP-Adapter Plus) instead of the pooled image embedding.
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    unet = _unet_of(sdxl)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION))
    encoder.save_pretrained(path / "image_encoder")
    cross_dim = unet.config.cross_attention_dim
    if plus:
        image_proj = _tiny_plus_projection(TINY_CLIP_VISION["hidden_size"], cross_dim)
    else:
        image_proj = _tiny_plain_projection(TINY_CLIP_VISION["projection_dim"], cross_dim)
    tensors = {f"image_proj.{k}": v for k, v in image_proj.items()}
    tensors.update({f"ip_adapter.{k}": v for k, v in _tiny_ip_attention(unet).items()})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path / "ip_adapter.safetensors")
    return path


def _unet_of(sdxl):
    """The UNet of an SDXL folder (built from its config: only shapes are needed), pipeline or UNet."""
    from diffusers import UNet2DConditionModel

    if isinstance(sdxl, UNet2DConditionModel):
        return sdxl
    if hasattr(sdxl, "unet"):
        return sdxl.unet
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sdxl, subfolder="unet"))


def _tiny_plain_projection(clip_dim: int, cross_dim: int) -> dict:
    """IP-Adapter's `ImageProjModel` keys (proj, norm): 4 tokens from the pooled CLIP embedding."""
    from diffusers.models.embeddings import ImageProjection

    module = ImageProjection(image_embed_dim=clip_dim, cross_attention_dim=cross_dim, num_image_text_embeds=4)
    # diffusers renames proj -> image_embeds when loading; write the original name
    return {k.replace("image_embeds", "proj"): v for k, v in module.state_dict().items()}


def _tiny_plus_projection(embed_dim: int, cross_dim: int, num_queries: int = 4) -> dict:
    """IP-Adapter Plus's `Resampler` keys: diffusers' module with its load-time renaming undone.

    diffusers reads the heads as to_q rows // 64 and always builds 4 blocks with ffn ratio 4."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    module = IPAdapterPlusImageProjection(
        embed_dims=embed_dim, output_dims=cross_dim, hidden_dims=64, heads=1, num_queries=num_queries
    )
    state = module.state_dict()
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        block, rest = f"layers.{parts[1]}", ".".join(parts[2:])
        if rest.startswith("attn.to_k."):
            v = state[key.replace("to_k", "to_v")]
            out[f"{block}.0.to_kv.weight"] = torch.cat([value, v])  # the original fuses k and v
            continue
        if rest.startswith("attn.to_v."):
            continue
        out[f"{block}.{_PLUS_BLOCK_NAMES[rest]}"] = value
    return out


# diffusers' Resampler block names -> the original IP-Adapter Plus names
_PLUS_BLOCK_NAMES = {
    "ln0.weight": "0.norm1.weight",
    "ln0.bias": "0.norm1.bias",
    "ln1.weight": "0.norm2.weight",
    "ln1.bias": "0.norm2.bias",
    "attn.to_q.weight": "0.to_q.weight",
    "attn.to_out.0.weight": "0.to_out.weight",
    "ff.0.weight": "1.0.weight",
    "ff.0.bias": "1.0.bias",
    "ff.1.net.0.proj.weight": "1.1.weight",
    "ff.1.net.2.weight": "1.3.weight",
}


def _tiny_ip_attention(unet) -> dict:
    """Random to_k_ip / to_v_ip for every cross-attention, numbered as diffusers reads them (1, 3, 5, ..)."""
    cross_dim = unet.config.cross_attention_dim
    channels = list(unet.config.block_out_channels)
    out = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue  # self-attention: IP-Adapter adds nothing there
        # the hidden size rule of diffusers' `_convert_ip_adapter_attn_to_diffusers`
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        for proj in ("to_k_ip", "to_v_ip"):
            # 4x nn.Linear's default range: at that size the image prompt visibly steers the tiny UNet,
            # so tests can tell averaged from concatenated references
            out[f"{key_id}.{proj}.weight"] = torch.empty(hidden, cross_dim).uniform_(-0.5, 0.5)
        key_id += 2
    return out


# ---------------------------------------------------------------------------------------------------
# Tiny metric encoders for the benchmark: CLIP (CLIP-I, CLIP-T) and DINO (DINO-I)


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A tiny CLIPModel folder with its tokenizer and PIL image processor (32 px, projection 16)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return Path(path)


def save_tiny_dino(path: str | Path, kind: str = "vit", seed: int = 1) -> Path:
    """A tiny DINO folder: `vit` (ViTModel without pooler, as facebook/dino-vits16 ships) or `dinov2`."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(seed)
    if kind == "vit":
        config = ViTConfig(
            hidden_size=24,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        ViTModel(config, add_pooling_layer=False).save_pretrained(path)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    elif kind == "dinov2":
        config = Dinov2Config(
            hidden_size=24, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
        )
        Dinov2Model(config).save_pretrained(path)
        BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    else:
        raise ValueError(f"kind must be vit or dinov2, got {kind!r}")
    return Path(path)
