"""`TrainConfig`: one validated file per stage (YAML or JSON), plus the shipped recipes."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..safe_io import JSONFileError, atomic_write_text, parse_json

RECIPES = Path(__file__).with_name("recipes")
MIXED_PRECISION = ("no", "fp16", "bf16")
STAGE_NAMES = {1: "alignment pretraining", 2: "single-reference finetuning", 3: "multi-reference finetuning"}


MODEL = {"section": "model"}
NEW_MODEL = {"section": "model", "new_model_only": True}
# EasyRefConfig fields a run decides itself: the parts it loads, their widths, what it trains
RUN_DECIDES = (
    "base",
    "mllm",
    "mllm_hidden_size",
    "cross_attention_dim",
    "max_references",
    "has_trunk",
    "version",
    "extra",
)


class ConfigError(ValueError):
    """A training configuration that cannot be used (one line naming the field)."""


@dataclass
class TrainConfig:
    """Everything one training stage needs; defaults follow the paper's recipe (its implementation details)."""

    stage: int = 1
    # models: SDXL folder/hub id, Qwen2-VL folder/hub id, the previous stage's checkpoint
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"
    mllm: str = "Qwen/Qwen2-VL-2B-Instruct"
    init_from: str | None = None
    output_dir: str = "runs/easyref"
    # data
    data: str = ""
    data_root: str = "."
    allow_outside_root: bool = False
    fail_on_bad_data: bool = False
    # Missing or unreadable images are skipped, but a run stops (exit 2, no final/) once more than this
    # share of an epoch's samples is skipped (judged as soon as that is certain, when all of the epoch's
    # first max(16, global batch) samples failed, and on the samples seen when the run ends mid-epoch).
    # 0 = stop at the first skipped sample; 1 = never stop for skipped samples.
    max_skip_fraction: float = 0.1
    resolution: int = 1024
    crop: str = "random"
    keep_aspect: bool = False
    bucket_stride: int = 64
    max_references: int = 24
    truncate_rate: float = 0.0
    image_drop_rate: float = 0.05
    text_drop_rate: float = 0.05
    both_drop_rate: float = 0.05
    face_expand_max: float = 0.5
    flip_rate: float = 0.5
    num_workers: int = 2
    # the model (`EasyRefConfig` settings, which the checkpoint records). Its shape is taken from the
    # init_from checkpoint when there is one, so these three apply to a new model only:
    num_reference_tokens: int = field(default=64, metadata=NEW_MODEL)
    reference_image_size: int = field(default=336, metadata=NEW_MODEL)
    lora_rank: int = field(default=0, metadata=NEW_MODEL)  # the UNet LoRA, trained from stage 2 on
    reference_mode: str = field(default="joint", metadata=MODEL)  # joint = EasyRef; mean / concat = baselines
    # the aggregation layer's attention: "official" (causal, what the released weights were trained with)
    # or "bidirectional" (the reference tokens also attend to each other and are attended to);
    # None: the previous stage's, else official
    attention_mode: str | None = field(default=None, metadata=MODEL)
    # any other `EasyRefConfig` setting, e.g. {instruction: "...{prompt}", negative_prompt: ""}
    model: dict = field(default_factory=dict)
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    cache_text_embeds: bool = False
    noise_offset: float = 0.0
    seed: int = 0
    # every stage's step as the authors' training script computes it (the path the released weights took):
    # stages 1-2 pad the MLLM rows to 256 tokens with the reference tokens after the padding; the stage-3
    # size conditioning is the resized size; resizing truncates; the stage-2 face crop goes through the
    # single-reference consistency crop; LoRA down-weights start gaussian. Off: this project's own choices
    replicate_release: bool = False
    # checkpoints, logs, validation
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool = True
    validation_every: int = 0
    validation_prompt: str = "a photo"
    validation_references: list[str] = field(default_factory=list)
    validation_steps: int = 30
    validation_guidance: float = 5.0

    def __post_init__(self) -> None:
        _check_types(self)
        if self.stage not in STAGE_NAMES:
            raise ConfigError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "log_every"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "lora_rank", "lr_warmup_steps", "validation_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        _require(
            0.0 <= self.max_skip_fraction <= 1.0,
            f"max_skip_fraction must be in [0, 1] (0 = stop at the first skipped sample), got {self.max_skip_fraction}",
        )
        self._check_model_settings()
        if self.stage > 1 and self.init_from is None:
            raise ConfigError(f"stage {self.stage} starts from the previous stage's checkpoint: set init_from")
        if self.validation_every and not self.validation_references:
            raise ConfigError("validation_every needs validation_references (image paths of a fixed group)")

    def model_settings(self, new_model: bool) -> dict:
        """The `EasyRefConfig` settings this run asks for; for a model continued from init_from, without
        the shape settings it takes from there."""
        settings = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("section") == "model" and (new_model or not f.metadata.get("new_model_only"))
        }
        return {k: v for k, v in settings.items() if v is not None} | self.model

    def _check_model_settings(self) -> None:
        """`EasyRefConfig` judges its own settings; here only which of them a run may choose."""
        from ..config import EasyRefConfig

        if not isinstance(self.model, dict) or not all(isinstance(k, str) for k in self.model):
            raise ConfigError(f"model must be a mapping of settings, got {_short(self.model)}")
        own = {f.name for f in dataclasses.fields(self) if f.metadata.get("section") == "model"}
        choosable = {f.name for f in dataclasses.fields(EasyRefConfig)} - set(RUN_DECIDES) - own
        for key in self.model:
            if key in own:
                raise ConfigError(f"model.{key}: set {key} at the top level of the config")
            if key not in choosable:
                known = ", ".join(sorted(choosable))
                raise ConfigError(f"model.{key}: not a model setting a run chooses (known: {known})")
        try:
            EasyRefConfig(**self.model_settings(new_model=True))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    @property
    def trains_trunk(self) -> bool:
        """Stages 2-3 train the whole MLLM and the UNet LoRA; stage 1 only the new modules."""
        return self.stage > 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None


def check_data_file(path: str | Path) -> None:
    """The data file's name and kind, checked without reading it (and without importing torch)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ConfigError(f"{path}: unsupported data file type {suffix or '(none)'!r}; use .json or .jsonl")
    if not path.exists():
        raise ConfigError(f"{path}: data file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a data file")


def check_data_root(root: str | Path) -> None:
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise ConfigError(f"data_root {root} {what}")


def check_paths(config: TrainConfig) -> None:
    """The files a run needs first, checked before the heavy imports so that a typo is reported at once."""
    check_data_file(config.data)
    check_data_root(config.data_root)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _check_types(config: TrainConfig) -> None:
    """Each setting has its annotated type (YAML reads `2024-01-01` as a date, `[` as a list, ...)."""
    if config.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
        config.mixed_precision = "no"
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if kind == "float" and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
                setattr(config, f.name, value)
            except ValueError:
                pass
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if value is None and optional:
            continue
        if kind == "list[str]":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            want = "a list of strings"
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif kind in _SCALARS:
            ok = isinstance(value, _SCALARS[kind])
            want = {"str": "a string", "bool": "true or false"}[kind]
        else:
            continue
        if not ok:
            raise ConfigError(f"{f.name} must be {want}, got {_short(value)}")


def _short(value) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def recipe_path(name: str) -> Path:
    """`stage1` / `stage2` / `stage3` name the shipped recipes; anything else is a file path."""
    candidate = RECIPES / f"{name}.yaml"
    return candidate if candidate.is_file() else Path(name)


def read_config_file(path: str | Path) -> dict:
    path = recipe_path(str(path))
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (or name a recipe: stage1, stage2, stage3)")
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, device or socket)"
        raise ConfigError(f"config file {path} is {kind}")
    try:
        text = path.read_text(encoding="utf-8")
        values = parse_json(text, str(path)) if path.suffix == ".json" else yaml.safe_load(text)
    except JSONFileError as err:
        raise ConfigError(_first_line(err)) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"cannot read {path}: nested too deeply") from None
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {_first_line(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: setting names must be strings, got {_short(bad[0])}")
    return values


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(err).__name__


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; values are read as YAML scalars/lists, so `lora_rank=8` is an int."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except RecursionError:
            raise ConfigError(f"--set {key.strip()}: value nested too deeply") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key.strip()}: the value is not valid YAML ({_first_line(err)})") from None
    return out


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    values = read_config_file(path)
    for key, value in (overrides or {}).items():
        section, dot, name = key.partition(".")
        if dot and section == "model":  # `--set model.negative_prompt=...`: one setting of the mapping
            model = values.get("model") if isinstance(values.get("model"), dict) else {}
            values["model"] = {**model, name: value}
        else:
            values[key] = value
    return TrainConfig.from_dict(values, source=str(path))


def save_config(config: TrainConfig, path: Path, root: Path | None = None) -> None:
    """Atomically; a symlink at `path` (or between `root` and it) is refused, not written through."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False), root=root)
