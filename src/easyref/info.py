"""`easyref info [MODEL]`: what a model folder is, read from its files alone.

MODEL is nothing or `default` (the bundled model), a folder laid out like it (`sdxl/`, `qwen2vl/`,
`adapter/`), an EasyRef adapter folder, an SDXL (diffusers) folder, a Qwen2-VL folder, or the hub id
of one of these that is in the local Hugging Face cache. Nothing is loaded: parameter counts come from
the safetensors headers (names, dtypes and shapes), so a 7 GB model is described in a blink, and
neither torch nor numpy is imported.

The bundled model's limits are read here too (`vocabulary`, `native_size`): `easyref generate`
warns with them, and `info` lists them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from pathlib import Path

from .bundled import BUNDLED_DIR, bundled_model_dir, trained_prompts

ADAPTER_CONFIG = "easyref_config.json"  # config.CONFIG_NAME (config.py is light, but this keeps info standalone)
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on its JSON header
# the `tokenizers` Whitespace pre-tokenizer (what the bundled model's word-level tokenizers split on)
WORD = re.compile(r"\w+|[^\w\s]+")
QWEN2_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
RECORDED_PACKAGES = ("torch", "diffusers", "transformers")  # the ones that decide the pixels


class NotAModelError(ValueError):
    """MODEL is not something `info` can describe (one line)."""


# ---------------------------------------------------------------------- entry point
def describe(model: str | None) -> list[str]:
    """The lines `easyref info MODEL` prints."""
    folder = model_folder(model)
    kind = model_kind(folder)
    if kind is None:
        raise NotAModelError(
            f"{model or folder} is not a model folder: expected an EasyRef adapter ({ADAPTER_CONFIG}), an SDXL "
            "folder (model_index.json), a Qwen2-VL folder (config.json) or sdxl/ + qwen2vl/ + adapter/"
        )
    return DESCRIBE[kind](folder)


def model_folder(model: str | None) -> Path:
    if model in (None, "default"):
        try:
            return bundled_model_dir()
        except FileNotFoundError as err:
            raise NotAModelError(str(err)) from None
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotAModelError(f"{model} is a file; give the model's folder")
    snapshot = _cached_hub_snapshot(model)
    if snapshot is None:
        raise NotAModelError(f"{model}: no such folder (nor a hub id in the local Hugging Face cache)")
    return snapshot


def _cached_hub_snapshot(name: str) -> Path | None:
    """The cached snapshot of `owner/name[@revision]`, without the network (info never downloads)."""
    if name.split("@", 1)[0].count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from .resolve import cached_snapshot, split_revision

        repo_id, revision = split_revision(name)
        return cached_snapshot(repo_id, revision, ("model_index.json", ADAPTER_CONFIG, "config.json"), label=name)
    except (ImportError, ValueError):
        return None


def model_kind(folder: Path) -> str | None:
    if (folder / "sdxl" / "model_index.json").is_file() and (folder / "adapter" / ADAPTER_CONFIG).is_file():
        return "set"
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "model_index.json").is_file():
        return "sdxl"
    if (folder / "config.json").is_file() and _read_json(folder / "config.json").get("model_type") in QWEN2_VL_TYPES:
        return "mllm"
    return None


# ---------------------------------------------------------------------- the four kinds
def describe_set(folder: Path) -> list[str]:
    """The bundled layout: the model's limits first (what a user of it must know), then its parts."""
    bundled = folder.resolve() == BUNDLED_DIR.resolve()
    title = "the bundled default model" if bundled else "an EasyRef model (sdxl/ + qwen2vl/ + adapter/)"
    lines = [f"EasyRef model: {folder}  ({title})"]
    size = native_size(folder / "sdxl")
    if size:
        lines.append(
            f"  trained at: {size[1]} x {size[0]} px (width x height); other sizes are outside what it learned"
        )
    words = vocabulary(folder / "sdxl")
    if words is not None:
        lines.append(f"  vocabulary ({len(words)} words; any other word reads as unknown): {' '.join(words)}")
    if bundled:
        lines.append(f"  prompts it was trained on: {trained_prompts()}")
    recipe = _read_json(folder / "recipe.json") if (folder / "recipe.json").is_file() else {}
    if isinstance(recipe.get("recipe"), dict):
        lines.append(f"  recipe (recipe.json): {_recipe_line(recipe['recipe'])}")
    total_params = total_bytes = 0
    for part in ("sdxl", "qwen2vl", "adapter"):
        if (folder / part).is_dir():
            lines.append("")
            lines += DESCRIBE[model_kind(folder / part) or "files"](folder / part)
            total_params += sum(parameter_counts(folder / part, recursive=True).values())
            total_bytes += folder_bytes(folder / part)
    lines += ["", f"total: {_count(total_params)} parameters, {_bytes(total_bytes)} on disk"]
    return lines


def describe_sdxl(folder: Path) -> list[str]:
    index = _read_json(folder / "model_index.json")
    version = index.get("_diffusers_version")
    lines = [f"SDXL base: {folder}  ({index.get('_class_name', '?')}" + (f", diffusers {version})" if version else ")")]
    size = native_size(folder)
    if size:
        lines.append(f"  native size: {size[1]} x {size[0]} px (the default --width x --height)")
    scheduler = index.get("scheduler")
    if isinstance(scheduler, list) and len(scheduler) == 2:
        lines.append(f"  scheduler: {scheduler[1]}")
    lines.append(f"  tokenizers: {_tokenizer_line(folder)}")
    lines.append("  components:")
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue
        if name in ("scheduler", "tokenizer", "tokenizer_2"):
            continue
        counts = parameter_counts(folder / name)
        lines.append(f"    {name:<15} {entry[1]:<28} {_params_field(counts):<22} {_bytes(folder_bytes(folder / name))}")
    lines.append(
        f"  total: {_count(sum(parameter_counts(folder, recursive=True).values()))} parameters, "
        f"{_bytes(folder_bytes(folder))} on disk"
    )
    return lines


def describe_mllm(folder: Path) -> list[str]:
    config = _read_json(folder / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    arch = ", ".join(config.get("architectures") or []) or "?"
    lines = [f"Qwen2-VL (MLLM): {folder}  ({arch}, {config.get('model_type')})"]
    lines.append(
        f"  text: hidden size {text.get('hidden_size')}, {text.get('num_hidden_layers')} layers, "
        f"{text.get('num_attention_heads')} heads, vocabulary {text.get('vocab_size')} tokens"
    )
    if vision:
        lines.append(
            f"  vision: depth {vision.get('depth')}, width {vision.get('embed_dim')}, "
            f"patch {vision.get('patch_size')} px merged {vision.get('spatial_merge_size')}x"
            f"{vision.get('spatial_merge_size')}"
        )
    counts = parameter_counts(folder)
    lines.append(f"  parameters: {_params_field(counts)}; {_bytes(folder_bytes(folder))} on disk")
    training = _read_json(folder / "training.json") if (folder / "training.json").is_file() else {}
    if "steps" in training:
        loss = training.get("final_loss")
        lines.append(
            f"  trained here (training.json): {training['steps']} steps"
            + (f", final loss {loss:.3g}" if isinstance(loss, (int, float)) else "")
        )
    return lines


def describe_adapter(folder: Path) -> list[str]:
    config = _read_json(folder / ADAPTER_CONFIG)
    lines = [f"EasyRef adapter: {folder}  ({ADAPTER_CONFIG} version {config.get('version', '?')})"]
    made_with = [f"{k} {config[k]}" for k in ("base", "mllm") if config.get(k)]
    if made_with:
        lines.append(f"  made with: {', '.join(made_with)}")
    lines.append(
        f"  reference tokens {config.get('num_reference_tokens')}, reference images "
        f"{config.get('reference_image_size')} px, at most {config.get('max_references')} references, "
        f"mode {config.get('reference_mode')}, attention {config.get('attention_mode')}"
    )
    trunk = "yes" if config.get("has_trunk") else "no"
    lines.append(
        f"  LoRA rank {config.get('lora_rank')}, finetuned MLLM trunk: {trunk}, widths: MLLM "
        f"{config.get('mllm_hidden_size')} -> cross-attention {config.get('cross_attention_dim')}"
    )
    counts = parameter_counts(folder)
    groups = Counter()
    for key, n in counts.items():
        groups[key.split(".", 1)[0]] += n
    split = ", ".join(f"{g} {_count(n)}" for g, n in sorted(groups.items()))
    lines.append(
        f"  parameters: {_params_field(counts)}"
        + (f" ({split})" if split else "")
        + f"; {_bytes(folder_bytes(folder))} on disk"
    )
    return lines


def describe_files(folder: Path) -> list[str]:
    return [f"{folder}: not a model folder ({_bytes(folder_bytes(folder))})"]


DESCRIBE = {
    "set": describe_set,
    "sdxl": describe_sdxl,
    "mllm": describe_mllm,
    "adapter": describe_adapter,
    "files": describe_files,
}


# ---------------------------------------------------------------------- limits (generate warns with these)
def native_size(sdxl: Path) -> tuple[int, int] | None:
    """(height, width) an SDXL folder draws by default: UNet sample size x the VAE's downsampling, as diffusers
    computes it; for the bundled model, the only size it was trained at."""
    try:
        unet = _read_json(sdxl / "unet" / "config.json")
        vae = _read_json(sdxl / "vae" / "config.json")
    except NotAModelError:
        return None
    sample, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        return None
    factor = 2 ** (len(blocks) - 1)
    if isinstance(sample, int):
        return sample * factor, sample * factor
    if isinstance(sample, list) and len(sample) == 2 and all(isinstance(s, int) for s in sample):
        return sample[0] * factor, sample[1] * factor
    return None


def vocabulary(sdxl: Path) -> list[str] | None:
    """The words a closed-vocabulary (word-level) tokenizer knows, special tokens left out; None for
    the open vocabularies of real CLIP tokenizers (byte-level BPE: no word is unknown to them)."""
    words = None
    for name in ("tokenizer", "tokenizer_2"):
        path = sdxl / name / "tokenizer.json"
        if not path.is_file():
            continue
        model = _read_json(path).get("model") or {}
        if model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
            return None
        known = {w for w in model["vocab"] if not (w.startswith("<") and w.endswith(">"))}
        words = known if words is None else words & known  # a word must reach both text encoders
    return sorted(words) if words is not None else None


def unknown_words(prompt: str, words: list[str]) -> list[str]:
    """The words of `prompt` (split as the word-level tokenizer splits) that it does not know, in order, once."""
    known = set(words)
    return list(dict.fromkeys(w for w in WORD.findall(prompt) if w not in known))


# ---------------------------------------------------------------------- weights and files
def parameter_counts(folder: Path, recursive: bool = False) -> dict[str, int]:
    """Tensor name -> element count, from the headers of the folder's safetensors files (one variant:
    the full-precision files when a hub folder also holds fp16 ones)."""
    files = sorted(folder.rglob("*.safetensors") if recursive else folder.glob("*.safetensors"))
    counts: dict[str, int] = {}
    by_folder: dict[Path, list[Path]] = {}
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
    for paths in by_folder.values():
        for path in _one_variant(paths):
            for key, (_, shape) in tensor_shapes(path).items():
                counts[f"{path}:{key}" if recursive else key] = math.prod(shape)
    return counts


def _one_variant(paths: list[Path]) -> list[Path]:
    """`x.safetensors` and `x-00001-of-00002.safetensors` over `x.fp16.safetensors` (diffusers' variants)."""
    plain = [p for p in paths if "." not in p.name.removesuffix(".safetensors")]
    if plain:
        return plain
    first = paths[0].name.removesuffix(".safetensors").rsplit(".", 1)[-1]
    return [p for p in paths if p.name.removesuffix(".safetensors").endswith(f".{first}")]


def tensor_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} from a safetensors header: 8 bytes of length, then JSON; no tensor is read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise NotAModelError(f"{path}: not a safetensors file (damaged header)")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise NotAModelError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, RecursionError):
        raise NotAModelError(f"{path}: not a safetensors file (damaged header)") from None
    if not isinstance(header, dict):
        raise NotAModelError(f"{path}: not a safetensors file (damaged header)")
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise NotAModelError(f"{path}: tensor {key} has no valid shape (damaged header)")
        out[key] = (str(entry.get("dtype")), shape)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------- formatting
def _params_field(counts: dict[str, int]) -> str:
    if not counts:
        return "no safetensors weights"
    return f"{_count(sum(counts.values()))} params"


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for size, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _tokenizer_line(sdxl: Path) -> str:
    words = vocabulary(sdxl)
    if words is not None:
        return f"closed vocabulary of {len(words)} words (word-level; any other word reads as unknown)"
    config = sdxl / "tokenizer" / "tokenizer.json"
    if config.is_file():
        model = _read_json(config).get("model") or {}
        vocab = model.get("vocab")
        return f"{model.get('type', '?')}, {len(vocab) if isinstance(vocab, (dict, list)) else '?'} tokens"
    return "vocab.json + merges.txt (CLIP BPE)" if (sdxl / "tokenizer" / "vocab.json").is_file() else "?"


def _recipe_line(recipe: dict) -> str:
    keys = ("groups", "stage_steps", "batch_size", "lora_rank", "reference_image_size", "seed")
    return ", ".join(f"{k} {recipe[k]}" for k in keys if k in recipe)


def _read_json(path: Path) -> dict:
    from .safe_io import JSONFileError, load_json

    try:
        value = load_json(path, "config")
    except JSONFileError as err:
        raise NotAModelError(str(err)) from None
    if not isinstance(value, dict):
        raise NotAModelError(f"{path}: not a JSON object")
    return value


# ---------------------------------------------------------------------- this machine, for records
def package_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """{"torch", "diffusers", "transformers"}: what generation records (PNG metadata, a bench run.json) keep."""
    return {name: package_version(name) for name in RECORDED_PACKAGES}


def environment() -> dict[str, str | None]:
    """easyref's version and `package_versions()`: what a run was made with."""
    return {"easyref": package_version("easyref"), **package_versions()}
