"""Tiny random SDXL and Qwen2-VL folders (and their tokenizers), built from configs in code.

Saved like real model folders, so that whatever loads them takes the `from_pretrained` path a
user's real folder takes: the shapes world's stand-in MLLM starts from one, the benchmarks time the
real code paths on them, and the tests run the whole package on them. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import pre_tokenizers

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


def tiny_qwen2vl_config(vocab_size: int, initializer_range: float = 0.2, vision_width: int = 32, vision_depth: int = 2):
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


def save_tiny_qwen2vl(
    path: str | Path, seed: int = 0, for_training: bool = False, vision_width: int = 32, vision_depth: int = 2
) -> Path:
    """Write a tiny random Qwen2-VL-Instruct folder (model, tokenizer, processor, chat template).

    `for_training`: the usual initialisation (0.02, unit norms) instead of the test-friendly one."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tok = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(
        tiny_qwen2vl_config(len(tok), 0.02 if for_training else 0.2, vision_width, vision_depth)
    )
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
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet, vae, text_config = _tiny_unet(), _tiny_vae(), _tiny_clip_text_config()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return Path(path)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
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


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def _tiny_clip_text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
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
