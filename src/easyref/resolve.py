"""One resolver for model names: what `default`, a folder and a hub id mean, for every entry point.

`easyref generate/convert/train/bench`, `EasyRefPipeline.from_pretrained` and the trainer all turn
the names they are given into local paths here, before any weights load:

- `default`: that part (`sdxl/`, `qwen2vl/`, `adapter/`) of the bundled model (`bundled.py`);
- an existing file or folder, or anything that looks like a path (starts with `.`, `/` or `~`, or
  does not have exactly one `/`);
- `owner/name` or `owner/name@revision`: a Hugging Face hub id, looked up in huggingface_hub's cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`; `refs/<revision>` -> `snapshots/<commit>/`), the folders
  diffusers and transformers read too. A cached snapshot is used as it is: no update check, so
  nothing waits on the network. A snapshot that is not cached is downloaded when the hub answers;
  with `HF_HUB_OFFLINE` set, or a hub that does not answer one short probe, the error is one line
  at once (not a minute of retries) naming the `hf download` command that fetches it.

An adapter (EasyRef checkpoint) records the base and MLLM it was made with (`EasyRefConfig.base`,
`.mllm`), so `resolve_parts(adapter=...)` alone finds all three parts; names given explicitly win.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .bundled import BundledModelMissing, bundled_model_dir

logger = logging.getLogger(__name__)

DEFAULT_NAME = "default"
PROBE_TIMEOUT_S = 5.0  # one HEAD request to the hub endpoint; refused or unresolvable hosts fail at once
# What `hf download` should fetch of a diffusers SDXL repo: configs, tokenizers and the full-precision
# safetensors that `from_pretrained` reads (a whole SDXL repo also holds fp16, ONNX, OpenVINO and
# Flax copies and single-file checkpoints: about five times as much).
SDXL_DOWNLOAD = (
    "*.json",
    "*.txt",
    "text_encoder*/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
# What an MLLM needs when we download it ourselves (weights, configs, tokenizer, chat template)
MLLM_DOWNLOAD = ("*.json", "*.safetensors", "*.txt", "*.jinja", "*.model")


class ResolveError(ValueError):
    """A name that does not lead to a usable model (one line, naming the flag or part and the value)."""


@dataclass(frozen=True)
class Kind:
    what: str  # in messages
    part: str | None  # the bundled model's folder for `default`; None: there is no bundled one
    probes: tuple[str, ...]  # files that mark the model's root folder (the first one found counts)


KINDS = {
    "base": Kind("SDXL base model", "sdxl", ("model_index.json",)),
    "mllm": Kind("Qwen2-VL-Instruct model", "qwen2vl", ("config.json",)),
    "adapter": Kind("EasyRef checkpoint", "adapter", ()),  # see adapter_probes()
    "model": Kind("model", None, ("config.json",)),
}


def adapter_probes() -> tuple[str, ...]:
    """Our config file, else one of the release's file names (imported here: release.py needs torch)."""
    from .config import CONFIG_NAME
    from .release import RELEASE_NAMES

    return (CONFIG_NAME, *RELEASE_NAMES)


@dataclass(frozen=True)
class Resolved:
    """A model name and what it means on this machine."""

    name: str  # as given or as recorded: "default", "owner/name[@revision]", a path
    path: str  # a local folder or file; for a hub model of kind "model" not yet cached, the hub id itself
    source: str  # "default" | "local" | "hub"

    @property
    def commit(self) -> str | None:
        """The hub commit of a cached snapshot (`.../snapshots/<commit>/...`); None for anything else."""
        parts = Path(self.path).parts
        if self.source != "hub" or "snapshots" not in parts:
            return None
        after = len(parts) - parts[::-1].index("snapshots")
        return parts[after] if after < len(parts) else None

    def record(self) -> dict:
        """What this name meant on this machine, for run records: the absolute path and the hub commit."""
        local = self.source != "hub" or Path(self.path).exists()
        return {"name": self.name, "path": os.path.abspath(self.path) if local else self.path, "commit": self.commit}


@dataclass(frozen=True)
class Parts:
    """The three parts of an EasyRef model."""

    base: Resolved
    mllm: Resolved
    adapter: Resolved | None  # None: the reference path starts from random weights

    @property
    def bundled_adapter(self) -> bool:
        return self.adapter is not None and self.adapter.source == "default"

    def names(self) -> dict:
        """{"base", "mllm", "adapter"} as given or recorded (for PNG metadata and run records)."""
        return {
            "base": self.base.name,
            "mllm": self.mllm.name,
            "adapter": None if self.adapter is None else self.adapter.name,
        }

    def record(self) -> dict:
        """{"base", "mllm", "adapter"}: each part's name, absolute path and hub commit (`Resolved.record`)."""
        return {
            "base": self.base.record(),
            "mllm": self.mllm.record(),
            "adapter": None if self.adapter is None else self.adapter.record(),
        }


API_LABELS = {"base": "base", "mllm": "mllm", "adapter": "adapter"}
CLI_LABELS = {"base": "--base", "mllm": "--mllm", "adapter": "--adapter"}


# ---------------------------------------------------------------------- one name
def resolve(
    name: str | Path,
    kind: str = "model",
    *,
    label: str | None = None,
    revision: str | None = None,
    relative_to: Path | None = None,
    probe: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
) -> Resolved:
    """`name` -> where its files are; one ResolveError otherwise (see the module docstring).

    `label` starts every message (default: "<kind> <name>"); `relative_to`: a folder that relative
    names are first looked up in (names recorded in a checkpoint are relative to its parent);
    `probe`: the file that marks the model's root, instead of the kind's.
    """
    name = str(name)
    spec = KINDS[kind]
    label = label or f"{kind} {name}"
    probes = (probe,) if probe else (adapter_probes() if kind == "adapter" else spec.probes)
    if name == DEFAULT_NAME:
        return _resolve_default(spec, label)
    sibling = _sibling(name, relative_to)
    if sibling is not None:
        return Resolved(name, str(_check_folder(sibling, kind, probes, label)), "local")
    if looks_local(name):
        return Resolved(name, str(_check_folder(Path(name).expanduser(), kind, probes, label)), "local")
    repo_id, revision = split_revision(name, revision)
    snapshot = cached_snapshot(repo_id, revision, probes, cache_dir, label)
    if snapshot is not None:
        return Resolved(name, str(snapshot), "hub")
    why = "local_files_only is set" if local_files_only else hub_unavailable()
    if why:
        raise ResolveError(
            f"{label}: not in the local Hugging Face cache ({_cache_folder(cache_dir)}) and {why}; "
            f"download it with `{download_command(repo_id, kind, revision)}`"
        )
    return Resolved(name, _download(repo_id, revision, kind, cache_dir, label), "hub")


def _resolve_default(spec: Kind, label: str) -> Resolved:
    if spec.part is None:
        raise ResolveError(f"{label}: there is no bundled {spec.what}; give a folder or a hub id")
    try:
        folder = bundled_model_dir()
    except BundledModelMissing as err:
        raise ResolveError(f"{label}: {err}") from None
    return Resolved(DEFAULT_NAME, str(folder / spec.part), "default")


def _sibling(name: str, folder: Path | None) -> Path | None:
    """A relative name recorded in a checkpoint that exists beside the checkpoint (the bundled
    model's layout: adapter/ records its MLLM as `qwen2vl`, the folder next to it)."""
    if folder is None or Path(name).is_absolute() or name.startswith("~"):
        return None
    candidate = Path(folder) / name
    return candidate if candidate.exists() else None


def looks_local(value: str) -> bool:
    """Hub ids are 'owner/name' (optionally '@revision'); anything else, or anything that exists here, is a path."""
    if value.startswith((".", "/", "~")) or Path(value).exists():
        return True
    return value.split("@", 1)[0].count("/") != 1


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """'owner/name@rev' -> ('owner/name', 'rev'); an explicit `revision` wins."""
    repo_id, _, given = name.partition("@")
    return repo_id, revision or given or None


def _check_folder(path: Path, kind: str, probes: tuple[str, ...], label: str) -> Path:
    """A local model must exist and be the model's root folder (a release file is the one file allowed)."""
    if not path.exists():
        raise ResolveError(f"{label}: no such file or folder")
    if kind == "adapter":
        return _check_adapter(path, label)
    if not path.is_dir():
        raise ResolveError(f"{label}: is a file; give the model's folder")
    if probes and not any((path / p).is_file() for p in probes):
        raise ResolveError(f"{label}: no {probes[0]} in this folder (not the model folder?)")
    return path


def _check_adapter(path: Path, label: str) -> Path:
    if adapter_format(path) is None:
        from .release import RELEASE_NAMES

        raise ResolveError(
            f"{label}: neither easyref_config.json + easyref.safetensors nor a release file "
            f"({', '.join(RELEASE_NAMES)}) is here (not an EasyRef checkpoint?)"
        )
    return path


def adapter_format(path: Path) -> str | None:
    """ "easyref" (our folder), "release" (the authors' file, or a folder holding one), or None."""
    from .checkpoint import is_easyref_checkpoint
    from .release import RELEASE_NAMES

    path = Path(path)
    if is_easyref_checkpoint(path):
        return "easyref"
    if path.is_file() or any((path / name).is_file() for name in RELEASE_NAMES):
        return "release"
    return None


# ---------------------------------------------------------------------- the hub
def cached_snapshot(
    repo_id: str, revision: str | None, probes: tuple[str, ...], cache_dir=None, label: str = ""
) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` in the Hugging Face cache, if it holds a probe file."""
    from huggingface_hub import try_to_load_from_cache

    for probe in probes:
        try:
            found = try_to_load_from_cache(repo_id, probe, cache_dir=cache_dir, revision=revision)
        except ValueError as err:  # HFValidationError: not a valid repo id (nor an existing path)
            raise ResolveError(
                f"{label}: no such file or folder, and not a valid hub id ({_first_line(err)})"
            ) from None
        if isinstance(found, str):  # else None, or the marker of a file known to be absent
            # snapshots/<commit>/ (not the blob the file links to), also for a probe in a subfolder
            return Path(found).parents[len(Path(probe).parts) - 1]
    return None


def _cache_folder(cache_dir) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def download_command(repo_id: str, kind: str = "model", revision: str | None = None) -> str:
    """The `hf download` command (huggingface_hub's CLI) that puts what `kind` needs into the cache."""
    words = ["hf", "download", repo_id]
    if revision:
        words += ["--revision", revision]
    if kind == "base":
        for pattern in SDXL_DOWNLOAD:
            words += ["--include", pattern]
    return shlex.join(words)


_probe_result: dict[str, str | None] = {}


def hub_unavailable() -> str | None:
    """None when the hub answers; else why not (offline mode, or the connection error), in words.

    Asked once per endpoint and process: loading a model through diffusers or transformers when the
    hub cannot be reached costs about a minute of retries before it fails; this costs one request.
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _probe_result:
        _probe_result[endpoint] = _probe(endpoint)
    return _probe_result[endpoint]


def _probe(endpoint: str) -> str | None:
    try:
        from huggingface_hub import get_session

        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)  # any HTTP answer means reachable
    except Exception as err:  # DNS failure, refused connection, timeout, proxy error ...
        reason = " ".join(str(err).split()) or type(err).__name__
        return f"{endpoint} cannot be reached ({reason})"
    return None


def _download(repo_id: str, revision: str | None, kind: str, cache_dir, label: str) -> str:
    """Fetch what `kind` needs into the cache; a generic model is left to its loader (returns the id)."""
    if kind == "model":
        return repo_id
    logger.info("downloading %s from the Hugging Face hub into %s", repo_id, _cache_folder(cache_dir))
    try:
        if kind == "base":  # diffusers' own choice of files (model_index.json's components, no variants)
            from diffusers import DiffusionPipeline

            return str(DiffusionPipeline.download(repo_id, revision=revision, cache_dir=cache_dir))
        from huggingface_hub import snapshot_download

        patterns = list(MLLM_DOWNLOAD) if kind == "mllm" else [*adapter_probes(), "easyref.safetensors"]
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as err:  # not found, gated, a revision that does not exist, a dropped connection ...
        raise ResolveError(
            f"{label}: could not download it from the hub ({_first_line(err)}); "
            f"try `{download_command(repo_id, kind, revision)}`"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(err).__name__


# ---------------------------------------------------------------------- an EasyRef model's three parts
@dataclass(frozen=True)
class Recorded:
    """The base and MLLM a checkpoint names, and the folder relative names in it are taken from."""

    base: str
    mllm: str
    folder: Path | None = None


def recorded_parts(adapter: Resolved) -> Recorded:
    """What an adapter says it was made with: our config's `base`/`mllm` (configs written before
    `base` existed get the release's SDXL), the release's own SDXL and Qwen2-VL for its files."""
    from .config import EasyRefConfig

    if adapter.source == "default":
        return Recorded(DEFAULT_NAME, DEFAULT_NAME)
    path = Path(adapter.path)
    if adapter_format(path) == "easyref":
        from .checkpoint import read_config

        config = read_config(path)
        return Recorded(config.base, config.mllm, path.parent)
    return Recorded(EasyRefConfig.base, EasyRefConfig.mllm)


def resolve_parts(
    base: str | Path | None = None,
    mllm: str | Path | None = None,
    adapter: str | Path | None = None,
    *,
    config=None,
    revision: str | None = None,
    labels: dict | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
) -> Parts:
    """Base, MLLM and adapter of an EasyRef model; names given explicitly win.

    - nothing, or only `base="default"`: the bundled model (its adapter too);
    - an adapter: the base and MLLM its config records;
    - `base="default"` with another adapter: the bundled SDXL and, unless `mllm` is given, its Qwen2-VL;
    - a base and no adapter (nor `config`): `mllm` or the release's Qwen2-VL, an untrained reference path.
    `revision` applies to the base (as diffusers' `revision=` does); others take `owner/name@revision`.
    """
    labels = labels or API_LABELS
    hub = {"local_files_only": local_files_only, "cache_dir": cache_dir}
    if adapter is None and config is None and (base is None or str(base) == DEFAULT_NAME):
        adapter = DEFAULT_NAME
    adapter_ref = None
    if adapter is not None:
        adapter_ref = resolve(adapter, "adapter", label=f"{labels['adapter']} {adapter}", **hub)
    recorded = _recorded(adapter_ref, config)
    if mllm is None and base is not None and str(base) == DEFAULT_NAME:
        mllm = DEFAULT_NAME  # `--base default`: the bundled model's SDXL with its Qwen2-VL
    base_ref = _resolve_part("base", base, recorded, adapter_ref, labels, revision=revision, **hub)
    mllm_ref = _resolve_part("mllm", mllm, recorded, adapter_ref, labels, **hub)
    return Parts(base_ref, mllm_ref, adapter_ref)


def _recorded(adapter: Resolved | None, config) -> Recorded:
    if adapter is not None:
        return recorded_parts(adapter)
    from .config import EasyRefConfig

    config = config or EasyRefConfig()
    return Recorded(config.base, config.mllm)


def _resolve_part(
    kind: str, given, recorded: Recorded, adapter: Resolved | None, labels: dict, revision: str | None = None, **hub
) -> Resolved:
    """An explicit name as given; else the recorded one, with a message that says where it came from."""
    if given is not None:
        return resolve(given, kind, label=f"{labels[kind]} {given}", revision=revision, **hub)
    name = getattr(recorded, kind)  # carries its own revision, if any (`owner/name@rev`)
    if adapter is None:
        label = f"the default {kind} {name}"
    else:
        label = f"{labels['adapter']} {adapter.name} was made with {kind} {name}"
    try:
        return resolve(name, kind, label=label, relative_to=recorded.folder, **hub)
    except ResolveError as err:
        raise ResolveError(f"{err} (or give {labels[kind]})") from None
