"""`EasyRefConfig`: everything needed to rebuild an EasyRef model, validated and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from .reference_modes import ReferenceMode, reference_mode
from .safe_io import load_json

CONFIG_NAME = "easyref_config.json"

DEFAULT_INSTRUCTION = (
    "Visualize a scene that closely resembles the provided images, "
    "capturing the essence and details described in this prompt:\n{prompt}"
)
# The release's negative branch: the same instruction with an empty prompt, on a black image.
DEFAULT_NEGATIVE_INSTRUCTION = DEFAULT_INSTRUCTION.format(prompt="")
DEFAULT_NEGATIVE_PROMPT = "A collage of images, monochrome, lowres, bad anatomy, worst quality, low quality"
ATTENTION_MODES = ("official", "bidirectional")
PATCH_FACTOR = 28  # Qwen2-VL: 14 px patches merged 2x2
MAX_INSTRUCTION_CHARS = 4096
MAX_NAME_CHARS = 4096  # a model name: a hub id ("owner/name[@revision]"), "default" or a path (PATH_MAX)
# The longest prompt the MLLM is given. Beyond it a prompt costs quadratic memory in the dense
# attention masks and says nothing SDXL's 77-token text encoders could follow anyway.
MAX_PROMPT_TOKENS = 1024
# Bounds of every integer field: a config is a file a user may hand in, and these sizes decide how
# much memory is allocated before anything else can go wrong (the release uses 64 tokens, 336 px
# references, 512 px negatives, widths 1536 / 2048, LoRA rank 128).
_INT_BOUNDS = {
    "num_reference_tokens": (1, 1024),
    "reference_image_size": (2 * PATCH_FACTOR, 2048),
    "max_references": (1, 64),
    "negative_image_size": (PATCH_FACTOR, 2048),
    "mllm_hidden_size": (1, 16384),
    "cross_attention_dim": (1, 16384),
    "lora_rank": (0, 1024),
    "version": (1, 1),
}


@dataclass
class EasyRefConfig:
    """Configuration of an EasyRef model (paper, Sec. 3; defaults = the released SDXL model).

    `base` and `mllm` name the SDXL and Qwen2-VL-Instruct the weights were made with (a hub id,
    `default` for the bundled model's, or a folder), so a checkpoint alone says what to load it on.
    """

    mllm: str = "Qwen/Qwen2-VL-2B-Instruct"
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"
    num_reference_tokens: int = 64
    reference_image_size: int = 336
    max_references: int = 28
    instruction: str = DEFAULT_INSTRUCTION
    negative_instruction: str = DEFAULT_NEGATIVE_INSTRUCTION
    negative_image_size: int = 512
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    attention_mode: str = "official"
    reference_mode: str = "joint"
    mllm_hidden_size: int = 1536
    cross_attention_dim: int = 2048
    lora_rank: int = 0
    has_trunk: bool = False
    version: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (low, high) in _INT_BOUNDS.items():
            _check_int(name, getattr(self, name), low, high)
        for name in (
            "mllm",
            "base",
            "instruction",
            "negative_instruction",
            "negative_prompt",
            "attention_mode",
            "reference_mode",
        ):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("mllm", "base"):
            if not 1 <= len(getattr(self, name)) <= MAX_NAME_CHARS:
                raise ValueError(
                    f"{name} must name a model in 1 to {MAX_NAME_CHARS} characters, "
                    f"got {len(getattr(self, name))} characters"
                )
        if not isinstance(self.has_trunk, bool):
            raise ValueError(f"has_trunk must be true or false, got {self.has_trunk!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a JSON object, got {type(self.extra).__name__}")
        reference_mode(self.reference_mode)
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {', '.join(ATTENTION_MODES)}, got {self.attention_mode!r}")
        _check_instruction(self.instruction)
        if len(self.negative_instruction) > MAX_INSTRUCTION_CHARS or len(self.negative_prompt) > MAX_INSTRUCTION_CHARS:
            raise ValueError(
                f"negative_instruction and negative_prompt must be at most {MAX_INSTRUCTION_CHARS} characters"
            )

    @property
    def mode(self) -> ReferenceMode:
        """How a group of references becomes one set of tokens (`easyref.reference_modes`)."""
        return reference_mode(self.reference_mode)

    @property
    def min_pixels(self) -> int:
        """Lower pixel bound of a resized reference (the release's rule: 121 * 28^2 for 336)."""
        side = self.reference_image_size // PATCH_FACTOR
        return (side - 1) ** 2 * PATCH_FACTOR**2

    @property
    def max_pixels(self) -> int:
        """Upper pixel bound of a resized reference (145 * 28^2 for 336)."""
        side = self.reference_image_size // PATCH_FACTOR
        return (side**2 + 1) * PATCH_FACTOR**2

    @property
    def lora_alpha(self) -> int:
        """alpha = rank: the release's LoRA has scale 1."""
        return self.lora_rank

    def format_instruction(self, prompt: str) -> str:
        return self.instruction.format(prompt=prompt)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EasyRefConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EasyRefConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EasyRefConfig:
        path = Path(directory) / CONFIG_NAME
        data = load_json(path, "EasyRef config")
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data)


def _check_int(name: str, value, low: int, high: int) -> None:
    # bool is an int subclass and 112.0 is not an int: both are refused, a JSON file must say 112
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def _check_instruction(template: str) -> None:
    """The instruction may hold literal text and `{prompt}` fields only (no other names, specs or conversions)."""
    if len(template) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"instruction must be at most {MAX_INSTRUCTION_CHARS} characters")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(
            f"instruction is not a valid template ({err}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    if not fields:
        raise ValueError("instruction must contain the placeholder '{prompt}'")
    for name, spec, conv in fields:
        if name != "prompt" or spec or conv:
            field_text = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"instruction may only use the field '{{prompt}}', found {field_text!r}")
