"""Tiny random EasyRef components, built from configs and saved like real model folders.

The tests and the bundled untrained default model use these so that every loading path
(`from_pretrained` of SDXL, Qwen2-VL, tokenizers, processor) is the one a user's real
folder takes. Nothing here downloads anything.

    python -m easyref.tiny OUT_DIR     # writes OUT_DIR/{sdxl,qwen2vl}
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

logger = logging.getLogger(__name__)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The same turn layout as Qwen2-VL-Instruct's own template (default system turn, images as
# vision_start/image_pad/vision_end, generation prompt), written out small for the tiny model.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_qwen_tokenizer():
    """Byte-level BPE with Qwen2-VL's special tokens and no merges."""
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for tok in QWEN_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], errors="replace")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    return tok


def tiny_clip_tokenizer():
    """CLIP-style BPE over single bytes (with and without the end-of-word marker)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_qwen2vl_config(vocab_size: int, initializer_range: float = 0.2, vision_width: int = 32,
                        vision_depth: int = 2):
    """`vision_width`/`vision_depth`: the shapes-world model needs a wider, deeper vision tower than
    the tests do (a 2-layer, width-32 ViT does not learn shape in a CPU budget)."""
    from transformers import Qwen2VLConfig

    tok = tiny_qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            rms_norm_eps=1e-6,
            # tests use 0.2 (sharper attention than the 0.02 default, so that positions and masks
            # visibly matter); a model that is going to be trained starts from the usual 0.02
            initializer_range=initializer_range,
            tie_word_embeddings=True,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=vision_width,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def save_tiny_qwen2vl(path: str | Path, seed: int = 0, for_training: bool = False, vision_width: int = 32,
                      vision_depth: int = 2) -> Path:
    """Write a tiny random Qwen2-VL-Instruct folder (model, tokenizer, processor, chat template).

    `for_training`: the usual initialisation (0.02, unit norms) instead of the test-friendly one."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config(len(tok), 0.02 if for_training else 0.2, vision_width, vision_depth))
    with torch.no_grad():  # trained norms are not all ones; random ones make norm placement observable
        for name, param in model.named_parameters():
            if not for_training and (name.endswith("norm.weight") or "layernorm" in name):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil().save_pretrained(path)
    return path


def save_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL folder that `StableDiffusionXLPipeline.from_pretrained` loads."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=len(tiny_clip_tokenizer()),
        hidden_act="gelu",
        projection_dim=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_cfg),
        text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------
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
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
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
    from transformers import (BitImageProcessorPil, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessorPil,
                              ViTModel)

    torch.manual_seed(seed)
    if kind == "vit":
        config = ViTConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
        ViTModel(config, add_pooling_layer=False).save_pretrained(path)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    elif kind == "dinov2":
        config = Dinov2Config(hidden_size=24, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                              patch_size=8)
        Dinov2Model(config).save_pretrained(path)
        BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    else:
        raise ValueError(f"kind must be vit or dinov2, got {kind!r}")
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    out = Path((argv if argv is not None else sys.argv[1:])[0])
    save_tiny_sdxl(out / "sdxl")
    save_tiny_qwen2vl(out / "qwen2vl")
    logger.info("wrote tiny components to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
