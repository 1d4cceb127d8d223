"""`easyref info [MODEL]`: what a model folder is, read from its files alone.

MODEL is nothing or `default` (the bundled model), a folder laid out like it (`sdxl/`, `qwen2vl/`,
`adapter/`), an EasyRef adapter folder, an SDXL (diffusers) folder, a Qwen2-VL folder, or the hub id
of one of these that is in the local Hugging Face cache. Nothing is loaded: parameter counts come from
the safetensors headers (names, dtypes and shapes), so a 7 GB model is described in a blink, and
neither torch nor numpy is imported. A folder is read as a stranger's: nothing outside it is opened or
counted (links that lead out are not followed), a component of model_index.json must be a plain name,
and a value of the wrong type is shown as '?' rather than trusted.

The bundled model's limits are read here too (`vocabulary`, `native_size`): `easyref generate`
warns with them, and `info` lists them.
"""

from __future__ import annotations

import json
import math
import os
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
SHOWN_CHARS = 80  # a value read from a model's files is cut to this on screen
MAX_SAMPLE_SIZE = 2**16  # latents per side; beyond it a UNet config is damaged, not big
MAX_VAE_BLOCKS = 16  # each block past the first halves the resolution once
MAX_SHOWN_INT = 10**15  # no count or size in a model's config comes near; past it a value is damaged, not big
# bits per element of every dtype the safetensors format defines (as the installed safetensors 0.8 reads
# them; F4 and F6 pack several elements into a byte), so a header's byte counts can be checked exactly
DTYPE_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0"), 8),
    **dict.fromkeys(("F4",), 4),
    **dict.fromkeys(("F6_E2M3", "F6_E3M2"), 6),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 16),
    **dict.fromkeys(("I32", "U32", "F32"), 32),
    **dict.fromkeys(("I64", "U64", "F64", "C64"), 64),
}


class NotAModelError(ValueError):
    """MODEL is not something `info` can describe (one line)."""


class Tree:
    """The folder `info` was given, and the one place it reads: links that lead out of it are not
    followed. A Hugging Face cache snapshot's files link to `../../blobs/`, so the bound of a snapshot
    (or of a folder inside one) is its repository folder, `models--owner--name/`."""

    def __init__(self, folder: Path):
        real = _real(folder) or Path(os.path.abspath(folder))
        repo = next(
            (p.parent for p in real.parents if p.name == "snapshots" and p.parent.name.startswith("models--")), None
        )
        self.root = repo or real

    def inside(self, path: Path) -> bool:
        real = _real(path)
        return real is not None and real.is_relative_to(self.root)

    def is_file(self, path: Path) -> bool:
        """A regular file (not a pipe, a device or a folder) inside the tree."""
        return _is(path, Path.is_file) and self.inside(path)

    def is_dir(self, path: Path) -> bool:
        return _is(path, Path.is_dir) and self.inside(path)

    def files(self, folder: Path, recursive: bool = False, suffix: str = "") -> list[Path]:
        """The regular files in `folder` (and below it, with `recursive`) whose names end with `suffix`;
        each folder is read once, however many links lead to it."""
        found, seen, todo = [], set(), [folder]
        while todo:
            current = todo.pop()
            real = _real(current)
            if real is None or real in seen or not real.is_relative_to(self.root):
                continue
            seen.add(real)
            for entry in _entries(current):
                path = Path(entry.path)
                if _entry_is(entry, "dir"):
                    if recursive:
                        todo.append(path)
                elif entry.name.endswith(suffix) and _entry_is(entry, "file") and self.inside(path):
                    found.append(path)
        return sorted(found)

    def read_json(self, path: Path) -> dict:
        """A JSON object from a file of the tree; anything else is one NotAModelError naming the file."""
        if not self.is_file(path):
            raise NotAModelError(f"{path}: not a file inside {self.root}")
        return _read_json(path)


def _real(path: Path) -> Path | None:
    """Where `path` leads, links followed; None for a loop of links or a name the system refuses."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _is(path: Path, test) -> bool:
    try:
        return test(path)
    except (OSError, ValueError):  # a name too long, an embedded NUL
        return False


def _entry_is(entry: os.DirEntry, kind: str) -> bool:
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError:
        return False


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:  # unreadable: it holds nothing that can be counted
        return []


# ---------------------------------------------------------------------- entry point
def describe(model: str | None) -> list[str]:
    """The lines `easyref info MODEL` prints."""
    folder = model_folder(model)
    tree = Tree(folder)
    kind = model_kind(folder, tree)
    if kind is None:
        raise NotAModelError(
            f"{model or folder} is not a model folder: expected an EasyRef adapter ({ADAPTER_CONFIG}), an SDXL "
            "folder (model_index.json), a Qwen2-VL folder (config.json) or sdxl/ + qwen2vl/ + adapter/"
        )
    return DESCRIBE[kind](folder, tree)


def model_folder(model: str | None) -> Path:
    if model in (None, "default"):
        try:
            return bundled_model_dir()
        except FileNotFoundError as err:
            raise NotAModelError(str(err)) from None
    path = _local_path(model)
    if _exists(path, model):
        if not _is(path, Path.is_dir):
            raise NotAModelError(f"{model} is a file; give the model's folder")
        return path
    snapshot = _cached_hub_snapshot(model)
    if snapshot is None:
        raise NotAModelError(f"{model}: no such folder (nor a hub id in the local Hugging Face cache)")
    return snapshot


def _local_path(model: str) -> Path:
    """MODEL as a path (`~user` expanded); an unknown user or an over-long name is one line."""
    from .resolve import ResolveError, local_path

    try:
        return local_path(model)
    except ResolveError as err:
        raise NotAModelError(f"{model}: {err}") from None


def _exists(path: Path, model: str) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:  # a path too long in all, no permission to look, a loop of links
        raise NotAModelError(f"{model}: {err.strerror or type(err).__name__}") from None
    return True


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


def model_kind(folder: Path, tree: Tree | None = None) -> str | None:
    tree = tree or Tree(folder)
    if tree.is_file(folder / "sdxl" / "model_index.json") and tree.is_file(folder / "adapter" / ADAPTER_CONFIG):
        return "set"
    if tree.is_file(folder / ADAPTER_CONFIG):
        return "adapter"
    if tree.is_file(folder / "model_index.json"):
        return "sdxl"
    if (
        tree.is_file(folder / "config.json")
        and tree.read_json(folder / "config.json").get("model_type") in QWEN2_VL_TYPES
    ):
        return "mllm"
    return None


# ---------------------------------------------------------------------- the four kinds
def describe_set(folder: Path, tree: Tree) -> list[str]:
    """The bundled layout: the model's limits first (what a user of it must know), then its parts."""
    bundled = _real(folder) == _real(BUNDLED_DIR)
    title = "the bundled default model" if bundled else "an EasyRef model (sdxl/ + qwen2vl/ + adapter/)"
    lines = [f"EasyRef model: {folder}  ({title})"]
    size = native_size(folder / "sdxl", tree)
    if size:
        lines.append(
            f"  trained at: {size[1]} x {size[0]} px (width x height); other sizes are outside what it learned"
        )
    words = vocabulary(folder / "sdxl", tree)
    if words is not None:
        lines.append(f"  vocabulary ({len(words)} words; any other word reads as unknown): {' '.join(words)}")
    if bundled:
        lines.append(f"  prompts it was trained on: {trained_prompts()}")
    recipe = tree.read_json(folder / "recipe.json") if tree.is_file(folder / "recipe.json") else {}
    if isinstance(recipe.get("recipe"), dict):
        lines.append(f"  recipe (recipe.json): {_recipe_line(recipe['recipe'])}")
    total_params = total_bytes = 0
    for part in ("sdxl", "qwen2vl", "adapter"):
        path = folder / part
        if not _is(path, Path.is_dir):
            continue
        lines.append("")
        if not tree.inside(path):
            lines.append(f"{path}: a link out of {tree.root} (not followed)")
            continue
        lines += DESCRIBE[model_kind(path, tree) or "files"](path, tree)
        total_params += sum(parameter_counts(path, recursive=True, tree=tree).values())
        total_bytes += folder_bytes(path, tree)
    lines += ["", f"total: {_count(total_params)} parameters, {_bytes(total_bytes)} on disk"]
    return lines


def describe_sdxl(folder: Path, tree: Tree) -> list[str]:
    index = tree.read_json(folder / "model_index.json")
    version = index.get("_diffusers_version")
    lines = [
        f"SDXL base: {folder}  ({_text(index.get('_class_name'))}"
        + (f", diffusers {_text(version)})" if version else ")")
    ]
    size = native_size(folder, tree)
    if size:
        lines.append(f"  native size: {size[1]} x {size[0]} px (the default --width x --height)")
    scheduler = index.get("scheduler")
    if isinstance(scheduler, list) and len(scheduler) == 2:
        lines.append(f"  scheduler: {_text(scheduler[1])}")
    lines.append(f"  tokenizers: {_tokenizer_line(folder, tree)}")
    lines.append("  components:")
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue
        _check_component_name(name, folder)
        if name not in ("scheduler", "tokenizer", "tokenizer_2"):
            lines.append(_component_line(folder / name, name, entry[1], tree))
    lines.append(
        f"  total: {_count(sum(parameter_counts(folder, recursive=True, tree=tree).values()))} parameters, "
        f"{_bytes(folder_bytes(folder, tree))} on disk"
    )
    return lines


def _check_component_name(name: str, folder: Path) -> None:
    """A component is a folder beside model_index.json, named as a Python argument (diffusers passes it as
    one): `/`, `..` or `a/b` would lead out of the model."""
    if not name.isidentifier():
        raise NotAModelError(
            f"{folder / 'model_index.json'}: component {_text(name)} is not a plain folder name (damaged or hostile)"
        )


def _component_line(path: Path, name: str, class_name, tree: Tree) -> str:
    if _is(path, Path.exists) and not tree.inside(path):
        return f"    {name:<15} {_text(class_name):<28} a link out of {tree.root} (not followed)"
    counts = parameter_counts(path, tree=tree)
    return f"    {name:<15} {_text(class_name):<28} {_params_field(counts):<22} {_bytes(folder_bytes(path, tree))}"


def describe_mllm(folder: Path, tree: Tree) -> list[str]:
    config = tree.read_json(folder / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    lines = [
        f"Qwen2-VL (MLLM): {folder}  ({_architectures(config.get('architectures'))}, {_text(config.get('model_type'))})"
    ]
    lines.append(
        f"  text: hidden size {_number(text.get('hidden_size'))}, {_number(text.get('num_hidden_layers'))} layers, "
        f"{_number(text.get('num_attention_heads'))} heads, vocabulary {_number(text.get('vocab_size'))} tokens"
    )
    if vision:
        merge = _number(vision.get("spatial_merge_size"))
        lines.append(
            f"  vision: depth {_number(vision.get('depth'))}, width {_number(vision.get('embed_dim'))}, "
            f"patch {_number(vision.get('patch_size'))} px merged {merge}x{merge}"
        )
    counts = parameter_counts(folder, tree=tree)
    lines.append(f"  parameters: {_params_field(counts)}; {_bytes(folder_bytes(folder, tree))} on disk")
    training = tree.read_json(folder / "training.json") if tree.is_file(folder / "training.json") else {}
    if "steps" in training:
        loss = _number(training.get("final_loss"), ".3g")
        lines.append(
            f"  trained here (training.json): {_shown(training['steps'])} steps"
            + (f", final loss {loss}" if loss != "?" else "")
        )
    return lines


def _architectures(value) -> str:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return _text(", ".join(value))
    return "?"


def describe_adapter(folder: Path, tree: Tree) -> list[str]:
    config = tree.read_json(folder / ADAPTER_CONFIG)
    lines = [f"EasyRef adapter: {folder}  ({ADAPTER_CONFIG} version {_shown(config.get('version'))})"]
    made_with = [f"{k} {_text(config[k])}" for k in ("base", "mllm") if config.get(k)]
    if made_with:
        lines.append(f"  made with: {', '.join(made_with)}")
    lines.append(
        f"  reference tokens {_number(config.get('num_reference_tokens'))}, reference images "
        f"{_number(config.get('reference_image_size'))} px, at most {_number(config.get('max_references'))} "
        f"references, mode {_text(config.get('reference_mode'))}, attention {_text(config.get('attention_mode'))}"
    )
    trunk = "yes" if config.get("has_trunk") is True else "no"
    lines.append(
        f"  LoRA rank {_number(config.get('lora_rank'))}, finetuned MLLM trunk: {trunk}, widths: MLLM "
        f"{_number(config.get('mllm_hidden_size'))} -> cross-attention {_number(config.get('cross_attention_dim'))}"
    )
    counts = parameter_counts(folder, tree=tree)
    groups = Counter()
    for key, n in counts.items():
        groups[key.split(".", 1)[0]] += n
    split = ", ".join(f"{_text(g)} {_count(n)}" for g, n in sorted(groups.items()))
    lines.append(
        f"  parameters: {_params_field(counts)}"
        + (f" ({split})" if split else "")
        + f"; {_bytes(folder_bytes(folder, tree))} on disk"
    )
    return lines


def describe_files(folder: Path, tree: Tree) -> list[str]:
    return [f"{folder}: not a model folder ({_bytes(folder_bytes(folder, tree))})"]


DESCRIBE = {
    "set": describe_set,
    "sdxl": describe_sdxl,
    "mllm": describe_mllm,
    "adapter": describe_adapter,
    "files": describe_files,
}


# ---------------------------------------------------------------------- limits (generate warns with these)
def native_size(sdxl: Path, tree: Tree | None = None) -> tuple[int, int] | None:
    """(height, width) an SDXL folder draws by default: UNet sample size x the VAE's downsampling, as diffusers
    computes it; for the bundled model, the only size it was trained at. None when the configs do not say."""
    tree = tree or Tree(sdxl)
    try:
        unet = tree.read_json(sdxl / "unet" / "config.json")
        vae = tree.read_json(sdxl / "vae" / "config.json")
    except NotAModelError:
        return None
    sample, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_VAE_BLOCKS or not all(_positive(b) for b in blocks):
        return None
    factor = 2 ** (len(blocks) - 1)
    sides = sample if isinstance(sample, list) else [sample, sample]
    if len(sides) != 2 or not all(_positive(s) and s <= MAX_SAMPLE_SIZE for s in sides):
        return None
    return sides[0] * factor, sides[1] * factor


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_zero(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == 0


def vocabulary(sdxl: Path, tree: Tree | None = None) -> list[str] | None:
    """The words a closed-vocabulary (word-level) tokenizer knows, special tokens left out; None for
    the open vocabularies of real CLIP tokenizers (byte-level BPE: no word is unknown to them)."""
    tree = tree or Tree(sdxl)
    words = None
    for name in ("tokenizer", "tokenizer_2"):
        path = sdxl / name / "tokenizer.json"
        if not tree.is_file(path):
            continue
        model = tree.read_json(path).get("model")
        if not isinstance(model, dict) or model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
            return None
        known = {w for w in model["vocab"] if not (w.startswith("<") and w.endswith(">"))}
        words = known if words is None else words & known  # a word must reach both text encoders
    return sorted(_text(w, limit=None) for w in words) if words is not None else None


def unknown_words(prompt: str, words: list[str]) -> list[str]:
    """The words of `prompt` (split as the word-level tokenizer splits) that it does not know, in order, once."""
    known = set(words)
    return list(dict.fromkeys(w for w in WORD.findall(prompt) if w not in known))


# ---------------------------------------------------------------------- weights and files
def parameter_counts(folder: Path, recursive: bool = False, tree: Tree | None = None) -> dict[str, int]:
    """Tensor name -> element count, from the headers of the folder's safetensors files (one variant:
    the full-precision files when a hub folder also holds fp16 ones)."""
    tree = tree or Tree(folder)
    counts: dict[str, int] = {}
    by_folder: dict[Path, list[Path]] = {}
    for path in tree.files(folder, recursive, ".safetensors"):
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
    """{name: (dtype, shape)} from a safetensors header: 8 bytes of length, then JSON; no tensor is read.
    The header is checked as the safetensors format requires (as `easyref convert` and every loader
    would): a header they refuse is damaged here too, never counted."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise NotAModelError(f"{path}: not a safetensors file (damaged header)")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise NotAModelError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, RecursionError):
        raise NotAModelError(f"{path}: not a safetensors file (damaged header)") from None
    if not isinstance(header, dict):
        raise NotAModelError(f"{path}: not a safetensors file (damaged header)")
    _check_metadata(path, header.get("__metadata__", {}))
    shapes, spans = _shapes(path, header, data_bytes=size - 8 - length)
    _check_spans(path, spans, data_bytes=size - 8 - length)
    return shapes


def _check_metadata(path: Path, metadata) -> None:
    """The format's free-form metadata is text to text; safetensors refuses a file with anything else."""
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotAModelError(f"{path}: __metadata__ is not a mapping of text to text (damaged header)")


def _shapes(
    path: Path, header: dict, data_bytes: int
) -> tuple[dict[str, tuple[str, list[int]]], list[tuple[int, int, str]]]:
    """The header's tensors, each valid on its own: ({name: (dtype, shape)}, [(begin, end, name)])."""
    out, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if not isinstance(shape, list) or not all(_positive(n) or _is_zero(n) for n in shape):
            raise NotAModelError(f"{path}: tensor {_text(key)} has no valid shape (damaged header)")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise NotAModelError(f"{path}: tensor {_text(key)} has unknown dtype {_shown(dtype)} (damaged header)")
        begin, end = _offsets(path, key, entry.get("data_offsets"), data_bytes)
        _check_size(path, key, shape, DTYPE_BITS[dtype], end - begin)
        out[key] = (dtype, shape)
        spans.append((begin, end, key))
    return out, spans


def _offsets(path: Path, key: str, offsets, data_bytes: int) -> tuple[int, int]:
    """`data_offsets`: [begin, end] of the tensor's bytes, counted from the end of the header."""
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_positive(n) or _is_zero(n) for n in offsets)
        or not offsets[0] <= offsets[1] <= data_bytes
    ):
        raise NotAModelError(
            f"{path}: tensor {_text(key)} has data_offsets {_shown(offsets)}, not within the file's "
            f"{data_bytes} bytes of data (damaged header)"
        )
    return offsets[0], offsets[1]


def _check_size(path: Path, key: str, shape: list[int], bits: int, nbytes: int) -> None:
    """A tensor's bytes are exactly its elements x its dtype's size (safetensors reads them so)."""
    elements = _elements(shape, 8 * nbytes // bits)
    if elements * bits > 8 * nbytes:
        raise NotAModelError(
            f"{path}: tensor {_text(key)} declares more elements than its {nbytes} bytes hold (damaged header)"
        )
    if elements * bits != 8 * nbytes:
        raise NotAModelError(
            f"{path}: tensor {_text(key)} takes {nbytes} bytes, not what its shape and dtype need (damaged header)"
        )


def _check_spans(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' bytes follow each other from the start of the data to its end, as safetensors requires:
    an overlap would let two tensors share bytes, a gap or a tail would hide bytes no tensor declares."""
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise NotAModelError(
                f"{path}: tensor {_text(key)} starts at byte {begin} of the data, not {at} where the tensor "
                "before it ends (overlapping or with a gap: damaged header)"
            )
        at = end
    if at != data_bytes:
        raise NotAModelError(
            f"{path}: the tensors cover {at} of the file's {data_bytes} bytes of data (damaged header)"
        )


def _elements(shape: list[int], bound: int) -> int:
    """The product of `shape`, or anything over `bound` once it passes it (a product of huge declared
    sides would take a long time and overflow every later sum)."""
    if 0 in shape:
        return 0
    count = 1
    for side in shape:
        count *= side
        if count > bound:
            return bound + 1
    return count


def folder_bytes(folder: Path, tree: Tree | None = None) -> int:
    tree = tree or Tree(folder)
    return sum(_size(p) for p in tree.files(folder, recursive=True))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone since it was listed
        return 0


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


def _shown(value, limit: int | None = SHOWN_CHARS) -> str:
    """A value from a model's files on one short printable line: text as it is, anything else as JSON."""
    if value is None:
        return "?"
    if isinstance(value, str):
        return _text(value, limit)
    try:
        return _text(_json(value), limit)
    except RecursionError:  # nested too deep to write out
        return "?"


def _json(value) -> str:
    """`value` (as json.loads made it) written as JSON, with '?' for each integer too big to be true."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    if _huge(value):
        return "?"
    return json.dumps(value)


def _huge(value) -> bool:
    """An integer past MAX_SHOWN_INT: a damaged or hostile value, not one to print (or to write out:
    an integer of thousands of digits takes long to turn into text)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SHOWN_INT


def _text(value, limit: int | None = SHOWN_CHARS) -> str:
    """Text from a model's files with control characters escaped (a newline or a terminal escape in a
    name must not break the line or drive the terminal); '?' for anything that is not text."""
    if not isinstance(value, str):
        return "?"
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return shown if limit is None or len(shown) <= limit else shown[: limit - 3] + "..."


def _number(value, spec: str = "") -> str:
    """A number from a model's files (a bool is not one, nor an integer too big to be true); '?' for
    anything else."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or _huge(value):
        return "?"
    return _text(format(value if not spec else float(value), spec))


def _tokenizer_line(sdxl: Path, tree: Tree) -> str:
    words = vocabulary(sdxl, tree)
    if words is not None:
        return f"closed vocabulary of {len(words)} words (word-level; any other word reads as unknown)"
    config = sdxl / "tokenizer" / "tokenizer.json"
    if tree.is_file(config):
        model = tree.read_json(config).get("model")
        model = model if isinstance(model, dict) else {}
        vocab = model.get("vocab")
        return f"{_text(model.get('type'))}, {len(vocab) if isinstance(vocab, (dict, list)) else '?'} tokens"
    return "vocab.json + merges.txt (CLIP BPE)" if tree.is_file(sdxl / "tokenizer" / "vocab.json") else "?"


def _recipe_line(recipe: dict) -> str:
    keys = ("groups", "stage_steps", "batch_size", "lora_rank", "reference_image_size", "seed")
    return ", ".join(f"{k} {_shown(recipe[k])}" for k in keys if k in recipe)


def _read_json(path: Path) -> dict:
    from .safe_io import JSONFileError, load_json

    try:
        value = load_json(path, "config")
    except JSONFileError as err:
        raise NotAModelError(str(err)) from None
    except ValueError:  # json's own limit: an integer of over 4300 digits
        raise NotAModelError(f"{path} is not valid JSON: a number too long") from None
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
