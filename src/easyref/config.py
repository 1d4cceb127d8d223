"""`EasyRefConfig`: everything needed to rebuild an EasyRef model, validated and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "easyref_config.json"

DEFAULT_INSTRUCTION = (
    "Visualize a scene that closely resembles the provided images, "
    "capturing the essence and details described in this prompt:\n{prompt}"
)
# The release's negative branch: the same instruction with an empty prompt, on a black image.
DEFAULT_NEGATIVE_INSTRUCTION = DEFAULT_INSTRUCTION.format(prompt="")
DEFAULT_NEGATIVE_PROMPT = "A collage of images, monochrome, lowres, bad anatomy, worst quality, low quality"
ATTENTION_MODES = ("official", "bidirectional")
# joint: EasyRef, the MLLM reads the whole group at once. mean / concat: the baselines of the paper's
# comparison, each reference read alone, then the token sets averaged (IP-Adapter style) or concatenated.
REFERENCE_MODES = ("joint", "mean", "concat")
PATCH_FACTOR = 28  # Qwen2-VL: 14 px patches merged 2x2


@dataclass
class EasyRefConfig:
    """Configuration of an EasyRef model (paper, Sec. 3; defaults = the released SDXL model)."""

    mllm: str = "Qwen/Qwen2-VL-2B-Instruct"
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
        self._check_positive("num_reference_tokens", "max_references", "mllm_hidden_size", "cross_attention_dim")
        self._check_positive("negative_image_size")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = no UNet LoRA), got {self.lora_rank}")
        if self.reference_image_size < 2 * PATCH_FACTOR:
            raise ValueError(f"reference_image_size must be >= {2 * PATCH_FACTOR}, got {self.reference_image_size}")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}")
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.attention_mode!r}")
        if "{prompt}" not in self.instruction:
            raise ValueError("instruction must contain the placeholder '{prompt}'")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

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
    def from_dict(cls, data: dict) -> "EasyRefConfig":
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
    def load(cls, directory: str | Path) -> "EasyRefConfig":
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data)
