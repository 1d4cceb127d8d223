"""Self-describing EasyRef checkpoints: `easyref_config.json` + `easyref.safetensors`.

Tensor groups (prefixes): `aggregator.*` (reference tokens, last decoder layer, norm), `unet.*`
(per cross-attention `to_k_ip`/`to_v_ip`, `encoder_hid_proj.*` projection, `lora.*` UNet LoRA),
and, when `config.has_trunk`, `trunk.*` (a finetuned MLLM trunk). The config alone says which groups
exist and their shapes come from the modules it rebuilds; nothing is inferred from key names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import struct
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .config import CONFIG_NAME, EasyRefConfig
from .parameter_groups import CHECKPOINT_PREFIXES
from .safe_io import JSONFileError

if TYPE_CHECKING:
    import torch

# torch, safetensors and the adapter (diffusers) are imported where tensors are handled, so that the
# names, the config and CheckpointError serve the CLI's up-front checks without loading them.

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "easyref.safetensors"
FORMAT_TAG = "easyref"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (message names the culprit)."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint tensor holding NaN or Inf (found when the tensor is read; the message names it)."""


def state_dict_for_checkpoint(config: EasyRefConfig, encoder, unet) -> dict[str, torch.Tensor]:
    from .adapter import adapter_state_dict

    tensors = {f"aggregator.{k}": v for k, v in encoder.aggregator.state_dict().items()}
    tensors.update({f"unet.{k}": v for k, v in adapter_state_dict(unet).items()})
    if config.has_trunk:
        tensors.update({f"trunk.{k}": v for k, v in encoder.trunk_state_dict().items()})
    return tensors


def save_checkpoint(directory: str | Path, config: EasyRefConfig, encoder, unet) -> Path:
    """Write config + weights atomically (temporary names, then rename), so no half checkpoint is left."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict_for_checkpoint(config, encoder, unet).items()}
    write_checkpoint(directory, config, tensors)
    return directory


def write_checkpoint(directory: Path, config: EasyRefConfig, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    weights_tmp = _temp_path(directory, WEIGHTS_NAME)
    config_tmp = _temp_path(directory, CONFIG_NAME)
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": FORMAT_TAG, "version": str(config.version)})
        config_tmp.write_text(config.to_json())
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        for leftover in (weights_tmp, config_tmp):
            leftover.unlink(missing_ok=True)


def _temp_path(directory: Path, name: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(path)


def is_easyref_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_own_checkpoint(path: str | Path) -> tuple[EasyRefConfig, CheckpointTensors]:
    """Our checkpoint folder's config and tensors, read when used (`release.read_checkpoint` reads the
    release's format too)."""
    path = Path(path)
    return read_config(path), CheckpointTensors.open(path / WEIGHTS_NAME, source=path)


class CheckpointTensors(Mapping):
    """A checkpoint's tensors by name, each read from its safetensors file when asked for, and checked then.

    Nothing is held: loading a checkpoint tensor by tensor holds one of its tensors at a time, never the whole
    file (at real size a converted release is 5.5 GB). Keys and shapes come from the file's header, so a
    checkpoint is checked against a model (`stand_ins`) before any tensor is read. Each tensor read is refused
    if it holds NaN or Inf (`DamagedCheckpointError`, naming it): that turns every image black."""

    def __init__(self, file, names: dict[str, tuple[str, str]], source: str | Path):
        self._file = file  # `easyref.adapter.TensorFile`
        self._names = names  # key here -> (key in the file, key in the checkpoint, named in errors)
        self.source = source

    @classmethod
    def open(cls, path: Path, source: str | Path | None = None, names: dict[str, str] | None = None):
        """The tensors of safetensors file `path` (only the header is read), under their own names or as
        `names` maps them (checkpoint key -> key in the file)."""
        from .adapter import TensorFile

        try:
            file = TensorFile(path)
            keys = file.keys()
        except Exception as err:  # safetensors raises several types for damaged files
            raise CheckpointError(f"cannot read {path}: {err}") from None
        names = names if names is not None else {key: key for key in keys}
        return cls(file, {key: (in_file, key) for key, in_file in names.items()}, source or path)

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        in_file, name = self._names[key]
        try:
            tensor = self._file.read(in_file)
        except Exception as err:  # a file cut short or changed since its header was read
            raise CheckpointError(f"cannot read tensor {name} from {self.source}: {err}") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DamagedCheckpointError(damaged_message(self.source, name))
        return tensor

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def subset(self, names: dict[str, str]) -> CheckpointTensors:
        """These tensors under new keys (new key -> key here), read from the same file."""
        return CheckpointTensors(self._file, {new: self._names[old] for new, old in names.items()}, self.source)

    def stand_ins(self) -> dict[str, torch.Tensor]:
        """Empty (meta) tensors of each tensor's shape: what checks keys and shapes reads, at no cost."""
        import torch

        return {key: torch.empty(self._file.shape(in_file), device="meta") for key, (in_file, _) in self._names.items()}


def read_config(path: str | Path) -> EasyRefConfig:
    """The config of our checkpoint folder alone (no tensors read); every problem is one CheckpointError."""
    path = Path(path)
    try:
        return EasyRefConfig.load(path)
    except JSONFileError as err:  # already names the file
        raise CheckpointError(str(err)) from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """A NaN or Inf in any weight turns every image black: refuse it at load, naming the tensor."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DamagedCheckpointError(damaged_message(source, key))


def damaged_message(source: str | Path, key: str) -> str:
    return f"{source}: tensor {key} holds NaN or Inf values; the checkpoint is damaged"


def split_groups(tensors: Mapping[str, torch.Tensor]) -> dict[str, Mapping[str, torch.Tensor]]:
    """The tensors by group (`CHECKPOINT_PREFIXES`), keyed without their prefix; from the keys alone, so
    that tensors read on access (`CheckpointTensors`) are not read here."""
    names: dict[str, dict[str, str]] = {prefix: {} for prefix in CHECKPOINT_PREFIXES}
    for key in tensors:
        prefix, _, rest = key.partition(".")
        if prefix not in names:
            raise CheckpointError(f"unexpected tensor {key} (known groups: {', '.join(CHECKPOINT_PREFIXES)})")
        names[prefix][rest] = key
    if isinstance(tensors, CheckpointTensors):
        return {prefix: tensors.subset(group) for prefix, group in names.items()}
    return {prefix: {rest: tensors[key] for rest, key in group.items()} for prefix, group in names.items()}


def apply_checkpoint(config: EasyRefConfig, tensors: Mapping[str, torch.Tensor], encoder, unet) -> None:
    """Load checkpoint tensors into an encoder and an adapted UNet; any mismatch is a one-line error.

    Keys and shapes are checked before a tensor is loaded, then tensors are read and loaded one at a time.
    An encoder built without weights (`ReferenceEncoder.from_pretrained(weights=False)`) gets its trunk and
    aggregation layer from here: every one of its tensors must be in the checkpoint."""
    from .adapter import load_adapter_state_dict

    groups = split_groups(tensors)
    if groups["trunk"] and not config.has_trunk:
        raise CheckpointError("checkpoint has trunk.* tensors but its config says has_trunk=false")
    try:
        _load_strict(encoder.aggregator, groups["aggregator"], "aggregator")
        if config.has_trunk:
            _load_trunk(encoder, groups["trunk"])
        _check_all_loaded(encoder)
        load_adapter_state_dict(unet, groups["unet"])
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _load_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    from .adapter import _check_keys

    current = module.state_dict()
    _check_keys(current, tensors, what)
    _load_each(module, current, tensors)


def _load_trunk(encoder, tensors: Mapping[str, torch.Tensor]) -> None:
    from .adapter import _check_keys

    expected = encoder.trunk_state_dict()
    _check_keys(expected, tensors, "trunk")
    _load_each(encoder, expected, tensors)


def _load_each(module: torch.nn.Module, current: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Each tensor into `module` (whose state dict is `current`), read and loaded one at a time: copied into
    the tensor there, converted to its dtype, or, where there is none yet (meta), put in its place."""
    import torch

    with torch.no_grad():
        for key in tensors:
            if current[key].is_meta:
                set_tensor(module, key, tensors[key].to(current[key].dtype))
            else:
                current[key].copy_(tensors[key])


def set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put `value` in place of a module's parameter or buffer (keeping whether it requires grad); returns the
    tensor the module now holds."""
    import torch

    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner)
    current = getattr(holder, leaf)
    if isinstance(current, torch.nn.Parameter):
        setattr(holder, leaf, torch.nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        holder.register_buffer(leaf, value, persistent=leaf not in holder._non_persistent_buffers_set)
    return getattr(holder, leaf)


def _check_all_loaded(encoder) -> None:
    """An encoder built without weights holds none left empty (the checkpoint must have held them all)."""
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(f"the checkpoint holds no tensor for the MLLM's {name}")


# ---------------------------------------------------------------------------- the stored negative branch
# The negative branch (a black image with the negative instruction, through the MLLM and the aggregation
# layer: `ReferenceEncoder.encode_negative`) is the same for every call of a model in a given dtype on a given
# kind of device, yet costs a whole MLLM pass (78 s at real size on a CPU). `negative.safetensors`, beside
# `easyref.safetensors`, keeps its tokens: one (1, tokens, width) tensor per (dtype, device type, config),
# each with what it was computed from. An entry is used only when all of that matches this process:
#   - the weights: a fingerprint of the adapter's weights file and of the MLLM folder (`folder_fingerprint`);
#   - the config fields that can change the tokens (all but NEGATIVE_UNUSED_FIELDS, so that a field added
#     later errs towards recomputing);
#   - the runtime: easyref, torch and transformers versions and the device (CPU instruction set, GPU model),
#     whose kernels decide the last bits.
# Anything else (no file, another model, a damaged or hostile file) means: compute as before, and store the
# result where the folder may be written. The file is parsed as safetensors only (never unpickled).
NEGATIVE_NAME = "negative.safetensors"
NEGATIVE_FORMAT = "easyref-negative"
NEGATIVE_VERSION = "1"
NEGATIVE_MAX_BYTES = 64 * 1024**2  # an entry at real size is 64 x 1536 x 4 bytes (393 KB)
NEGATIVE_MAX_ENTRIES = 16  # dtypes x device types x configs (overrides) of one set of weights
NEGATIVE_UNUSED_FIELDS = frozenset(
    {"base", "mllm", "instruction", "negative_prompt", "max_references", "cross_attention_dim", "lora_rank"}
)
# What a model folder computes with besides its weights: configs, tokenizer, chat template, image processor
FINGERPRINTED_SUFFIXES = (".safetensors", ".json", ".txt", ".jinja", ".model", ".tiktoken")
FULL_HASH_BYTES = 64 * 1024**2
SAMPLE_BYTES = 4096
SAFETENSORS_MAX_HEADER = 100 * 1024**2  # the safetensors library's own bound


def file_fingerprint(path: str | Path) -> str:
    """A digest of a file that changes whenever its contents change in a normal workflow, without reading
    gigabytes. Files up to FULL_HASH_BYTES (configs, tokenizers, the bundled model's weights) are hashed
    whole. A larger safetensors file is hashed by its size, its header (every tensor's name, dtype, shape and
    offsets) and three 4 KiB windows (start, middle, end) of every tensor's data: about 12 KiB per tensor,
    some 30 MB for a 12 GB model of 2,500 tensors, against a full hash that would read all 12 GB for each
    process. Retraining, converting again or swapping the model rewrites every tensor it touches, so the
    windows change with it; what this does not see is a hand edit of a few bytes inside one tensor."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        elif path.suffix == ".safetensors":
            _sample_safetensors(handle, size, digest)
        else:
            _sample_spans(handle, [(0, size)], size, digest)
    return digest.hexdigest()


def _sample_safetensors(handle, size: int, digest) -> None:
    (length,) = struct.unpack("<Q", handle.read(8).ljust(8, b"\0"))
    if length > min(size - 8, SAFETENSORS_MAX_HEADER):  # not a safetensors file: sample it as plain bytes
        _sample_spans(handle, [(0, size)], size, digest)
        return
    header = handle.read(length)
    digest.update(header)
    try:
        entries = json.loads(header)
    except ValueError:
        entries = None
    start = 8 + length
    spans = []
    for key, value in entries.items() if isinstance(entries, dict) else ():
        offsets = value.get("data_offsets") if isinstance(value, dict) and key != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            spans.append((start + offsets[0], start + offsets[1]))
    _sample_spans(handle, sorted(spans) or [(start, size)], size, digest)


def _sample_spans(handle, spans: list[tuple[int, int]], size: int, digest) -> None:
    for first, end in spans:
        first, end = max(first, 0), min(end, size)
        if end <= first:
            continue
        middle = first + (end - first) // 2 - SAMPLE_BYTES // 2
        for offset in sorted({first, max(first, middle), max(first, end - SAMPLE_BYTES)}):
            handle.seek(offset)
            digest.update(handle.read(min(SAMPLE_BYTES, end - offset)))


def folder_fingerprint(folder: str | Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """name -> `file_fingerprint` of the files of `folder` that decide what it computes: `names`, or every
    weights, config and tokenizer file at its top (a model's own files: not subfolders, not hidden files)."""
    folder = Path(folder)
    if names is None:
        found = [p for p in folder.iterdir() if p.suffix in FINGERPRINTED_SUFFIXES and not p.name.startswith(".")]
        names = tuple(sorted(p.name for p in found if p.is_file()))
    return {name: file_fingerprint(folder / name) for name in names}


def negative_config_key(config: EasyRefConfig) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in NEGATIVE_UNUSED_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def negative_runtime(device) -> dict:
    """What, besides the model, decides the negative tokens' last bits: versions and the device's kernels."""
    import torch
    import transformers

    from . import __version__

    device = torch.device(device)
    if device.type == "cpu":
        kind = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    elif device.type == "cuda":
        kind = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        kind = device.type
    versions = {"easyref": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    return {**versions, "device": kind}


def negative_entry_name(config: EasyRefConfig, dtype, device_type: str) -> str:
    return f"{str(dtype).removeprefix('torch.')}.{device_type}.{negative_config_key(config)[:16]}"


class NegativeStore:
    """`negative.safetensors` of one adapter folder, for an MLLM folder (see the comment above NEGATIVE_NAME).

    `writable`: whether `save` may write the folder (False for the package's own model and the hub cache,
    which belong to pip and huggingface_hub). Reading and writing never raise: a file that cannot be used is
    a log line and a recomputation."""

    def __init__(self, folder: str | Path, mllm: str | Path, writable: bool = True):
        self.folder, self.mllm, self.writable = Path(folder), Path(mllm), writable
        self._weights: tuple[str, dict] | None = None

    @property
    def path(self) -> Path:
        return self.folder / NEGATIVE_NAME

    def weights(self) -> tuple[str, dict] | None:
        """(key, the files' fingerprints) of the adapter's weights and the MLLM folder; None where they
        cannot be read (then nothing is stored or used). Computed once per store."""
        if self._weights is None:
            try:
                files = {
                    "adapter": folder_fingerprint(self.folder, (WEIGHTS_NAME,)),
                    "mllm": folder_fingerprint(self.mllm),
                }
            except OSError as err:
                logger.debug("cannot fingerprint %s or %s: %s", self.folder, self.mllm, err)
                return None
            key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
            self._weights = (key, files)
        return self._weights

    def load(self, config: EasyRefConfig, dtype, device) -> torch.Tensor | None:
        """The stored tokens for this config, dtype and device (on the CPU), or None (logged)."""
        import torch

        weights = self.weights()
        found = self._read()
        if weights is None or found is None:
            return None
        metadata, tensors = found
        device = torch.device(device)
        name = negative_entry_name(config, dtype, device.type)
        if metadata.get("weights") != weights[0] or name not in tensors:
            logger.debug("%s holds no negative branch for these weights, %s and %s", self.path, dtype, device.type)
            return None
        entry = _entry_metadata(metadata, name)
        if entry is None or entry.get("runtime") != negative_runtime(device):
            logger.debug("%s: the negative branch was computed with other versions or on another device", self.path)
            return None
        tokens = tensors[name]
        expected = (1, config.mode.tokens_per_group(1, config.num_reference_tokens), config.mllm_hidden_size)
        if tokens.dtype != dtype or tuple(tokens.shape) != expected or not bool(torch.isfinite(tokens).all()):
            logger.warning(
                "%s: ignored its negative branch (%s %s, expected %s %s, or not finite); computing it again",
                self.path,
                tokens.dtype,
                tuple(tokens.shape),
                dtype,
                expected,
            )
            return None
        return tokens

    def save(self, config: EasyRefConfig, tokens: torch.Tensor) -> bool:
        """Add `tokens` (as `encode_negative` returned them) to the file, atomically; entries of other
        weights go, those of other dtypes, devices and configs stay (the newest NEGATIVE_MAX_ENTRIES).
        Returns whether it was written: a read-only folder is a debug line, never an error."""
        from safetensors.torch import save

        from .safe_io import atomic_write_bytes

        weights = self.weights()
        if not self.writable or weights is None:
            return False
        name = negative_entry_name(config, tokens.dtype, tokens.device.type)
        entry = {
            "config": negative_config_key(config),
            "runtime": negative_runtime(tokens.device),
            "written": time.time(),
        }
        kept: dict[str, tuple[dict, torch.Tensor]] = {}
        found = self._read(quiet=True)
        if found is not None and found[0].get("weights") == weights[0]:
            for other, tensor in found[1].items():
                meta = _entry_metadata(found[0], other)
                if other != name and meta is not None:
                    kept[other] = (meta, tensor)
        newest = sorted(kept, key=lambda k: -_written(kept[k][0]))[: NEGATIVE_MAX_ENTRIES - 1]
        kept = {k: kept[k] for k in newest}
        kept[name] = (entry, tokens.detach().to("cpu").contiguous())
        metadata = {
            "format": NEGATIVE_FORMAT,
            "version": NEGATIVE_VERSION,
            "weights": weights[0],
            "files": json.dumps(weights[1], sort_keys=True),
            **{k: json.dumps(meta, sort_keys=True) for k, (meta, _) in kept.items()},
        }
        try:
            atomic_write_bytes(self.path, save({k: t for k, (_, t) in kept.items()}, metadata=metadata), fsync=False)
        except (OSError, ValueError) as err:  # read-only, full, a symlink planted in its place
            logger.debug("could not store the negative branch in %s: %s", self.path, err)
            return False
        logger.debug("stored the negative branch (%s) in %s", name, self.path)
        return True

    def _read(self, quiet: bool = False) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(metadata, tensors) of the file, or None: absent (silently), or unusable (a warning unless `quiet`)."""
        path = self.path
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as err:
            return self._unusable(f"cannot read it ({err.strerror})", quiet)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read, a folder cannot be one
            return self._unusable("not a regular file", quiet)
        if info.st_size > NEGATIVE_MAX_BYTES:
            return self._unusable(f"larger than {NEGATIVE_MAX_BYTES // 1024**2} MiB", quiet)
        try:
            with open(path, "rb") as handle:
                data = handle.read(NEGATIVE_MAX_BYTES + 1)
        except OSError as err:
            return self._unusable(f"cannot read it ({err.strerror})", quiet)
        if len(data) > NEGATIVE_MAX_BYTES:
            return self._unusable(f"larger than {NEGATIVE_MAX_BYTES // 1024**2} MiB", quiet)
        metadata = _safetensors_metadata(data)
        if metadata is None:
            return self._unusable("not a safetensors file", quiet)
        if metadata.get("format") != NEGATIVE_FORMAT or metadata.get("version") != NEGATIVE_VERSION:
            return self._unusable(f"not a {NEGATIVE_FORMAT} file of version {NEGATIVE_VERSION}", quiet)
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as err:  # the library raises several types for damaged files
            return self._unusable(f"damaged ({_first_line(err)})", quiet)
        return metadata, tensors

    def _unusable(self, why: str, quiet: bool) -> None:
        log = logger.debug if quiet else logger.warning
        log("ignored %s: %s; the negative branch is computed instead", self.path, why)
        return None


def _safetensors_metadata(data: bytes) -> dict | None:
    """The `__metadata__` of safetensors bytes (a dict of strings), or None where they are not safetensors."""
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, SAFETENSORS_MAX_HEADER):
        return None
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    return metadata


def _entry_metadata(metadata: dict, name: str) -> dict | None:
    try:
        entry = json.loads(metadata.get(name, ""))
    except (ValueError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _written(entry: dict) -> float:
    value = entry.get("written")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def negative_store_for(parts) -> NegativeStore | None:
    """The store of a resolved model's adapter (`easyref.resolve.Parts`): None without an adapter of ours
    (none, or the release's format); read-only for the bundled model (the package's folder belongs to pip)
    and a hub snapshot (the cache belongs to huggingface_hub)."""
    adapter = getattr(parts, "adapter", None)
    if adapter is None or not is_easyref_checkpoint(adapter.path):
        return None
    return NegativeStore(adapter.path, parts.mllm.path, writable=adapter.source == "local")


def store_negative(directory: str | Path, encoder, mllm: str | Path) -> bool:
    """Compute the negative branch with `encoder` (as loaded from `directory`'s checkpoint over the MLLM
    folder `mllm`, on its device and dtype) and store it in `directory`; returns whether it was written."""
    import torch

    with torch.no_grad():
        tokens = encoder.encode_negative()
    return NegativeStore(directory, mllm).save(encoder.config, tokens)


def store_converted_negative(directory: str | Path, mllm: str | Path, device, dtype) -> bool:
    """`store_negative` for a checkpoint folder of ours over the MLLM folder `mllm`, its encoder loaded as
    `EasyRefPipeline.from_parts` loads it (the MLLM from safetensors in `dtype`, its own weights not read where
    the checkpoint holds a finetuned trunk, then the checkpoint's aggregation layer and trunk, then moved to
    `device`) without the SDXL that the negative branch never reads."""
    from .encoder import ReferenceEncoder

    config, tensors = read_own_checkpoint(directory)
    own_weights = not config.has_trunk
    encoder = ReferenceEncoder.from_pretrained(
        mllm, config, dtype=dtype, weights=own_weights, use_safetensors=True, trust_remote_code=False
    )
    groups = split_groups(tensors)
    _load_strict(encoder.aggregator, groups["aggregator"], "aggregator")
    if config.has_trunk:
        _load_trunk(encoder, groups["trunk"])
    _check_all_loaded(encoder)
    encoder.to(device, dtype)
    return store_negative(directory, encoder, mllm)
