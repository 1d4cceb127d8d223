"""Reference images and prompt -> Qwen2-VL inputs (resize rule, chat template, image-token expansion)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .config import MAX_PROMPT_TOKENS, PATCH_FACTOR, EasyRefConfig
from .images import to_rgb, upright

# qwen_vl_utils' defaults, which the release ran every image through before the processor.
_PRE_MIN_PIXELS = 4 * PATCH_FACTOR**2
_PRE_MAX_PIXELS = 16384 * PATCH_FACTOR**2
IMAGE_PAD = "<|image_pad|>"
# The row length of the authors' training script in its single-reference stages (1-2): finetune_sdxl.py
# runs its processor with `max_length=256, padding="max_length", truncation=True`, so every row is
# right-padded or cut to 256 tokens and the reference tokens follow the padding (positions 256..319).
# Only `TrainConfig.replicate_release` asks for it; stage 3 and inference never pad to a fixed length.
RELEASE_ROW_LENGTH = 256


@dataclass
class MLLMInputs:
    """A padded batch of MLLM inputs; images of all groups are concatenated for one vision call."""

    input_ids: torch.LongTensor  # (B, L), right-padded
    attention_mask: torch.LongTensor  # (B, L)
    pixel_values: torch.Tensor  # (sum of patches, C * T * P * P)
    image_grid_thw: torch.LongTensor  # (num images, 3)
    group_sizes: list[int] | None = None  # mean/concat modes: rows are single references, this many per group
    # rows padded (and cut) to this fixed length, with the reference tokens placed after the padding as the
    # release trained stages 1-2; None: rows as long as the longest, reference tokens after each row's own
    padded_to: int | None = None

    def to(self, device: torch.device) -> MLLMInputs:
        tensors = (self.input_ids, self.attention_mask, self.pixel_values, self.image_grid_thw)
        return MLLMInputs(*(t.to(device) for t in tensors), group_sizes=self.group_sizes, padded_to=self.padded_to)


def normalize_image(image: Image.Image) -> Image.Image:
    """EXIF-upright RGB, rounded to multiples of 28 px as the release's qwen_vl_utils step did."""
    image = to_rgb(upright(image))
    height, width = smart_resize(
        image.height, image.width, factor=PATCH_FACTOR, min_pixels=_PRE_MIN_PIXELS, max_pixels=_PRE_MAX_PIXELS
    )
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def check_prompt(prompt: str, tokenizer, what: str = "prompt") -> None:
    """Refuse a prompt the MLLM cannot read as plain text: its control tokens, or more than MAX_PROMPT_TOKENS.

    Control tokens such as `<|image_pad|>` would be read as structure (an image slot with no image),
    so they are refused rather than silently dropped or escaped.
    """
    found = sorted(t for t in special_token_strings(tokenizer) if t and t in prompt)
    if found:
        raise ValueError(f"{what} contains the MLLM control token {found[0]!r}; remove it")
    count = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if count > MAX_PROMPT_TOKENS:
        raise ValueError(f"{what} is {count} tokens long; at most {MAX_PROMPT_TOKENS} are allowed")


def special_token_strings(tokenizer) -> set[str]:
    """Every string the tokenizer turns into a control token (special and added tokens)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    tokens.update(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    return tokens


def negative_image(config: EasyRefConfig) -> Image.Image:
    """The black image of the classifier-free-guidance branch."""
    return Image.new("RGB", (config.negative_image_size, config.negative_image_size))


def chat_prompt(tokenizer, num_images: int, text: str) -> str:
    """One user turn: every image in order, then the instruction; generation prompt appended."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def expand_image_tokens(prompt: str, tokens_per_image: list[int]) -> str:
    """Replace the i-th `<|image_pad|>` with as many pads as image i has merged visual tokens."""
    pieces = prompt.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(
            f"chat template produced {len(pieces) - 1} image placeholders for {len(tokens_per_image)} images"
        )
    out = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:]):
        out.append(IMAGE_PAD * count + piece)
    return "".join(out)


def build_inputs(
    groups, instructions, tokenizer, image_processor, config: EasyRefConfig, pad_to: int | None = None
) -> MLLMInputs:
    """Tokenize every group's chat prompt (images, then its instruction) and preprocess all images at once.
    `pad_to`: every row right-padded or cut to exactly this many tokens (`RELEASE_ROW_LENGTH`)."""
    images = [normalize_image(im) for group in groups for im in group]
    vision = image_processor(
        images, return_tensors="pt", size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
    )
    grid = vision["image_grid_thw"]
    counts = (grid.prod(-1) // image_processor.merge_size**2).tolist()
    ids = chat_ids(tokenizer, instructions, [len(group) for group in groups], counts)
    if pad_to is not None:
        ids = _truncate(ids, pad_to, tokenizer.convert_tokens_to_ids(IMAGE_PAD))
    padded = _right_pad(ids, tokenizer.pad_token_id or 0, length=pad_to)
    return MLLMInputs(*padded, vision["pixel_values"], grid, padded_to=pad_to)


def chat_ids(tokenizer, texts: list[str], group_sizes: list[int], tokens_per_image: list[int]) -> list[list[int]]:
    """Each row's chat prompt as token ids, unpadded: its images (each as its merged visual tokens; the
    counts run over all rows' images in order), then its text."""
    rows, start = [], 0
    for text, n in zip(texts, group_sizes):
        prompt = expand_image_tokens(chat_prompt(tokenizer, n, text), tokens_per_image[start : start + n])
        rows.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        start += n
    return rows


def prepare_inputs(
    groups, prompts, tokenizer, image_processor, config: EasyRefConfig, pad_to: int | None = None
) -> MLLMInputs:
    """MLLM inputs for groups and their prompts, in rows laid out by the config's reference mode;
    `group_sizes` tells the encoder how to put the rows back together (None: a row is a group).
    `pad_to`: rows of exactly this many tokens, the reference tokens after the padding (`build_inputs`)."""
    rows, texts, group_sizes = config.mode.rows(groups, [config.format_instruction(p) for p in prompts])
    inputs = build_inputs(rows, texts, tokenizer, image_processor, config, pad_to=pad_to)
    inputs.group_sizes = group_sizes
    return inputs


def _truncate(ids: list[list[int]], length: int, image_token_id: int) -> list[list[int]]:
    """Rows cut at `length` tokens, as the release's tokenizer cut them (the end of the text goes). A cut
    through a row's image tokens would leave visual features without their slots, so it is refused."""
    for row, seq in enumerate(ids):
        if image_token_id in seq[length:]:
            raise ValueError(
                f"MLLM row {row} is {len(seq)} tokens long: cutting it at {length} would cut its images; "
                "use smaller references"
            )
    return [seq[:length] for seq in ids]


def _right_pad(
    ids: list[list[int]], pad_id: int, length: int | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(input ids, attention mask), each row right-padded to `length` (None: the longest row's)."""
    length = max(len(x) for x in ids) if length is None else length
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask
