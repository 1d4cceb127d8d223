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

A base or MLLM folder (local, cached or just downloaded) is refused in one line when loading it would
unpickle weights (`.bin` and no `.safetensors`) or import or run code it names (a model_index.json
component from a library other than diffusers and transformers, an `auto_map`); see `check_contents`.

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
NAME_MAX = 255  # bytes in one file or folder name (Linux and macOS file systems); longer names cannot exist
# Weights stored with Python's pickle: reading them can run code, so a model folder must hold safetensors.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Where a diffusers component may come from: any other name in model_index.json makes diffusers import
# that module, or load a `<library>.py` from the folder itself.
COMPONENT_LIBRARIES = ("diffusers", "transformers")
# The files transformers' Auto classes read; an `auto_map` in one of them names code inside the folder.
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


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
    try:
        path = local_path(name)
    except ResolveError as err:
        raise ResolveError(f"{label}: {err}") from None
    sibling = _sibling(name, relative_to, label)
    if sibling is not None:
        return Resolved(name, str(_check_folder(sibling, kind, probes, label)), "local")
    if looks_local(name, label):
        return Resolved(name, str(_check_folder(path, kind, probes, label)), "local")
    repo_id, revision = split_revision(name, revision)
    snapshot = cached_snapshot(repo_id, revision, probes, cache_dir, label)
    if snapshot is not None:
        check_contents(snapshot, kind, label)
        return Resolved(name, str(snapshot), "hub")
    why = "local_files_only is set" if local_files_only else hub_unavailable()
    if why:
        raise ResolveError(
            f"{label}: not in the local Hugging Face cache ({_cache_folder(cache_dir)}) and {why}; "
            f"download it with `{download_command(repo_id, kind, revision)}`"
        )
    downloaded = _download(repo_id, revision, kind, cache_dir, label)
    check_contents(Path(downloaded), kind, label)  # a generic model's `downloaded` is its hub id: not checked
    return Resolved(name, downloaded, "hub")


def _resolve_default(spec: Kind, label: str) -> Resolved:
    if spec.part is None:
        raise ResolveError(f"{label}: there is no bundled {spec.what}; give a folder or a hub id")
    try:
        folder = bundled_model_dir()
    except BundledModelMissing as err:
        raise ResolveError(f"{label}: {err}") from None
    return Resolved(DEFAULT_NAME, str(folder / spec.part), "default")


def _sibling(name: str, folder: Path | None, label: str) -> Path | None:
    """A relative name recorded in a checkpoint that exists beside the checkpoint (the bundled
    model's layout: adapter/ records its MLLM as `qwen2vl`, the folder next to it)."""
    if folder is None or Path(name).is_absolute() or name.startswith("~"):
        return None
    candidate = Path(folder) / name
    return candidate if _exists(candidate, label) else None


def looks_local(value: str, label: str | None = None) -> bool:
    """Hub ids are 'owner/name' (optionally '@revision'); anything else, or anything that exists here, is a path."""
    if value.startswith((".", "/", "~")) or _exists(Path(value), label or value):
        return True
    return value.split("@", 1)[0].count("/") != 1


def local_path(name: str) -> Path:
    """`name` as a path, `~` and `~user` expanded; a user this machine lacks, or a name no file system
    can hold, is one ResolveError (pathlib raises RuntimeError and OSError for them)."""
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # `~someone` for an unknown user, or `~` with no HOME
        raise ResolveError(f"{name.split('/', 1)[0]}: no such user") from None
    except ValueError as err:  # an embedded NUL, from the Python API
        raise ResolveError(f"not a valid file name ({err})") from None
    for part in path.parts:
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ResolveError(f"a file or folder name in it is longer than {NAME_MAX} bytes ({part[:20]}...)")
    return path


def _exists(path: Path, label: str) -> bool:
    """Whether `path` exists; a failure other than 'not there' (a path too long, no permission to look,
    a loop of links) is one ResolveError rather than pathlib's OSError."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:
        raise ResolveError(f"{label}: {err.strerror or type(err).__name__}") from None
    except ValueError as err:  # an embedded NUL
        raise ResolveError(f"{label}: not a valid file name ({err})") from None
    return True


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """'owner/name@rev' -> ('owner/name', 'rev'); an explicit `revision` wins."""
    repo_id, _, given = name.partition("@")
    return repo_id, revision or given or None


def _check_folder(path: Path, kind: str, probes: tuple[str, ...], label: str) -> Path:
    """A local model must exist and be the model's root folder (a release file is the one file allowed)."""
    if not _exists(path, label):
        raise ResolveError(f"{label}: no such file or folder")
    if kind == "adapter":
        return _check_adapter(path, label)
    if not path.is_dir():
        raise ResolveError(f"{label}: is a file; give the model's folder")
    if probes and not any((path / p).is_file() for p in probes):
        raise ResolveError(f"{label}: no {probes[0]} in this folder (not the model folder?)")
    check_contents(path, kind, label)
    return path


# ---------------------------------------------------------------------- what a folder may make the loaders do
def check_contents(folder: Path, kind: str, label: str) -> None:
    """Refuse, before anything loads, a folder whose loading would unpickle its weights or import or run
    code it names: the loaders get `use_safetensors=True` and `trust_remote_code=False` too, but then fail
    with a traceback after a while instead of this one line."""
    if kind == "base":
        for name in _sdxl_components(folder, label):
            _check_weights(folder / name, label, f"its {name}/")
            _check_no_code(folder / name, label, name)
    elif kind == "mllm":
        _check_weights(folder, label, "it")
        _check_no_auto_map(folder, label)


def _sdxl_components(folder: Path, label: str) -> list[str]:
    """The component folders model_index.json names, each checked: a plain name, from diffusers or transformers."""
    if not (folder / "model_index.json").is_file():
        return []  # nothing to check: the loader says what is missing
    index = _read_json_object(folder / "model_index.json", label)
    class_name = index.get("_class_name")
    if class_name is not None and not isinstance(class_name, str):  # [module, class]: a custom pipeline's code
        raise ResolveError(
            f"{label}: model_index.json's _class_name {_short(class_name)} is not a diffusers pipeline name "
            "(custom pipeline code in a model folder is never run)"
        )
    return [name for name, entry in index.items() if not name.startswith("_") and _component(name, entry, label)]


def _component(name: str, entry, label: str) -> bool:
    """Whether a model_index.json entry is a component to load ([library, class]); a wrong one is refused."""
    if not isinstance(entry, list):
        return False  # a pipeline setting (force_zeros_for_empty_prompt, ...), not a component
    if entry == [None, None]:
        return False  # an optional component left out
    where = f"{label}: model_index.json's component {_short(name)}"
    if not name.isidentifier():
        raise ResolveError(f"{where} is not a plain folder name")
    if len(entry) != 2 or not all(isinstance(v, str) for v in entry) or not entry[1].isidentifier():
        raise ResolveError(f"{where} is {_short(entry)}, not [library, class]")
    if entry[0] not in COMPONENT_LIBRARIES:
        raise ResolveError(
            f"{where} comes from the library {_short(entry[0])}; only {' and '.join(COMPONENT_LIBRARIES)} "
            "components are loaded (code named by a model folder is never run)"
        )
    return True


def _check_weights(folder: Path, label: str, what: str) -> None:
    """A folder with pickled weights (.bin, .pt, ...) and no safetensors ones is refused: transformers and
    diffusers would unpickle them."""
    if not folder.is_dir():
        return
    names = [entry.name for entry in _entries(folder, label)]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHTS))
    if pickled:
        raise ResolveError(
            f"{label}: {what} holds {pickled[0]} (pickled weights) and no .safetensors; only safetensors "
            "weights are loaded from a model folder (convert them, or download the model's .safetensors files)"
        )


def _check_no_code(folder: Path, label: str, name: str) -> None:
    """diffusers imports `<component>/<library>.py` in place of the library when the folder holds one."""
    for library in COMPONENT_LIBRARIES:
        if (folder / f"{library}.py").exists():
            raise ResolveError(f"{label}: {name}/{library}.py is code in the model folder, which is never run")


def _check_no_auto_map(folder: Path, label: str) -> None:
    for file in AUTO_MAP_FILES:
        path = folder / file
        if path.is_file() and "auto_map" in _read_json_object(path, label):
            raise ResolveError(f"{label}: {file} names code of its own (auto_map); code in a model folder is never run")


def _entries(folder: Path, label: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as err:
        raise ResolveError(f"{label}: cannot list {folder} ({err.strerror or type(err).__name__})") from None


def _read_json_object(path: Path, label: str) -> dict:
    from .safe_io import JSONFileError, load_json

    try:
        value = load_json(path, "config")
    except JSONFileError as err:  # names the file
        raise ResolveError(f"{label}: {err}") from None
    if not isinstance(value, dict):
        raise ResolveError(f"{label}: {path.name} is not a JSON object")
    return value


def _short(value, limit: int = 60) -> str:
    """A value from a user's file, quoted on one line and cut short (it may be anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
