"""Benchmark manifests: groups of reference images with prompts, as JSON Lines under a root folder.

One group per line::

    {"id": "cat-01", "domain": "character", "split": "held-out",
     "references": ["cat-01/a.png", "cat-01/b.png"], "target": "cat-01/target.png",
     "prompts": ["a cat on the beach", "a cat in the snow"]}

`domain` defaults to "default", `split` to "held-in", `target` is optional and a single `prompt` string
may stand in for `prompts`. Paths are relative to the root (the manifest's folder unless given) and may
not resolve outside it unless the caller allows it.

Besides loading and writing, two converters build manifests from common layouts: a folder of group
folders (`manifest_from_folders`) and COCO captions with one reference per item, the paper's Table 2
protocol (`manifest_from_coco`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..images import ImageFileError, check_group, open_image, open_regular, read_header, verify_image
from ..safe_io import JSONFileError, atomic_write_text, iter_jsonl, parse_json

logger = logging.getLogger(__name__)

SPLITS = ("held-in", "held-out")
DEFAULT_DOMAIN = "default"
DEFAULT_SPLIT = "held-in"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
TARGET_STEM = "target"
PROMPTS_FILE = "prompts.txt"

_KNOWN_KEYS = frozenset({"id", "domain", "split", "references", "target", "prompts", "prompt"})
# Beyond this many lines the message stops being readable; the count in the summary still says all.
_MAX_LISTED_PROBLEMS = 20
# The one-line form (what the command line prints) lists fewer.
_MAX_INLINE_PROBLEMS = 5
# Values quoted in messages are cut to this many characters (a manifest may hold megabytes in one field).
_MAX_QUOTED = 80
# Formats whose PIL `verify` reads the whole file (PNG checks every chunk's CRC; WebP decodes on open);
# any other format is decoded in full by `check_images` to find truncation.
_VERIFY_READS_ALL = frozenset({"PNG", "WEBP"})


@dataclass(frozen=True)
class BenchItem:
    """One benchmark group: absolute, resolved reference paths, an optional target and its prompts."""

    id: str
    domain: str
    split: str
    references: tuple[Path, ...]
    target: Path | None
    prompts: tuple[str, ...]


class ManifestError(ValueError):
    """A manifest (or a layout being converted to one) has problems; `problems` lists every one."""

    def __init__(self, source: str | os.PathLike, problems: Sequence[str]):
        self.source = str(source)
        self.problems = list(problems)
        super().__init__(_format_problems(self.source, self.problems))

    def one_line(self) -> str:
        """The same report on one line (the command line's rule: one line per error), shortened."""
        count = len(self.problems)
        shown = "; ".join(" ".join(p.split()) for p in self.problems[:_MAX_INLINE_PROBLEMS])
        more = f"; ... and {count - _MAX_INLINE_PROBLEMS} more" if count > _MAX_INLINE_PROBLEMS else ""
        return f"manifest {self.source}: {count} problem{'' if count == 1 else 's'}: {shown}{more}"


def _is_text(value) -> bool:
    """A non-empty string of valid Unicode (JSON's \\ud800 escapes can make lone surrogates, which no
    file, tokenizer or UTF-8 writer accepts)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value) -> str:
    """repr of a value from a user's file, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."


def _format_problems(source: str, problems: Sequence[str]) -> str:
    count = len(problems)
    lines = [f"manifest {source}: {count} problem{'' if count == 1 else 's'}"]
    lines += [f"  {p}" for p in problems[:_MAX_LISTED_PROBLEMS]]
    if count > _MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {count - _MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- paths


def _resolve_inside(
    raw: str, root: Path, allow_outside_root: bool, check_files: bool
) -> tuple[Path | None, str | None]:
    """(resolved path, None) or (None, why not). `root` must already be resolved."""
    if not raw:
        return None, "empty path"
    try:
        candidate = Path(raw)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, ValueError, RuntimeError) as err:
        return None, f"unusable path {_short(raw)}: {err}"
    # Checked before touching the file, so that a manifest cannot make us stat arbitrary locations.
    if not allow_outside_root and not resolved.is_relative_to(root):
        return None, f"path {_short(raw)} resolves outside the root {root}"
    if check_files:
        try:
            found = resolved.is_file()
        except OSError as err:  # a name too long for the file system, and the like
            return None, f"unusable path {_short(raw)}: {err.strerror or err}"
        if not found:
            if resolved.is_dir():
                return None, f"{_short(raw)} is a folder, not an image file ({resolved})"
            if resolved.exists():
                return None, f"{_short(raw)} is not a regular file (a pipe, device or socket: {resolved})"
            return None, f"image file not found: {_short(raw)} ({resolved})"
    return resolved, None


def _relative_text(path: Path, root: Path) -> str:
    """Root-relative POSIX text so manifests move between machines; absolute only if outside root."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ load / write


def _check_text(record: dict, key: str, default: str, problems: list[str], where: str) -> str:
    value = record.get(key, default)
    if not _is_text(value):
        problems.append(f"{where}: {key!r} must be a non-empty string of valid Unicode, got {_short(value)}")
        return default
    return value


def _check_prompts(record: dict, problems: list[str], where: str) -> tuple[str, ...]:
    if "prompt" in record and "prompts" in record:
        problems.append(f"{where}: give either 'prompt' or 'prompts', not both")
        return ()
    if "prompt" in record:
        value = record["prompt"]
        if not _is_text(value):
            problems.append(f"{where}: 'prompt' must be a non-empty string of valid Unicode, got {_short(value)}")
            return ()
        return (value,)
    value = record.get("prompts")
    if value is None:
        problems.append(f"{where}: missing 'prompts' (or 'prompt')")
        return ()
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: 'prompts' must be a non-empty list of strings, got {_short(value)}")
        return ()
    bad = [p for p in value if not _is_text(p)]
    if bad:
        problems.append(f"{where}: 'prompts' entries must be non-empty strings of valid Unicode, got {_short(bad)}")
        return ()
    return tuple(value)


def _check_paths(
    record: dict, root: Path, allow_outside_root: bool, check_files: bool, problems: list[str], where: str
) -> tuple[tuple[Path, ...], Path | None]:
    references: list[Path] = []
    value = record.get("references")
    if value is None:
        problems.append(f"{where}: missing 'references'")
    elif not isinstance(value, list) or not value:
        problems.append(f"{where}: 'references' must be a non-empty list of paths, got {_short(value)}")
    else:
        for i, raw in enumerate(value):
            if not isinstance(raw, str):
                problems.append(f"{where}: references[{i}] must be a string path, got {_short(raw)}")
                continue
            path, why = _resolve_inside(raw, root, allow_outside_root, check_files)
            if why:
                problems.append(f"{where}: references[{i}]: {why}")
            else:
                references.append(path)
    target = None
    raw_target = record.get("target")
    if raw_target is not None:
        if not isinstance(raw_target, str):
            problems.append(f"{where}: 'target' must be a string path or null, got {_short(raw_target)}")
        else:
            target, why = _resolve_inside(raw_target, root, allow_outside_root, check_files)
            if why:
                problems.append(f"{where}: target: {why}")
    return tuple(references), target


def _parse_record(
    record: dict, root: Path, allow_outside_root: bool, check_files: bool, problems: list[str], where: str
) -> BenchItem | None:
    before = len(problems)
    unknown = sorted(set(record) - _KNOWN_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {_short(unknown)}; allowed: {sorted(_KNOWN_KEYS)}")
    item_id = record.get("id")
    if not _is_text(item_id):
        problems.append(f"{where}: 'id' must be a non-empty string of valid Unicode, got {_short(item_id)}")
    domain = _check_text(record, "domain", DEFAULT_DOMAIN, problems, where)
    split = record.get("split", DEFAULT_SPLIT)
    if split not in SPLITS:
        problems.append(f"{where}: 'split' must be one of {list(SPLITS)}, got {_short(split)}")
    references, target = _check_paths(record, root, allow_outside_root, check_files, problems, where)
    prompts = _check_prompts(record, problems, where)
    if len(problems) > before:
        return None
    return BenchItem(item_id, domain, split, references, target, prompts)


def load_manifest(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    check_files: bool = True,
) -> list[BenchItem]:
    """Read and fully validate a JSON Lines manifest; every problem is reported in one ManifestError.

    `root` defaults to the manifest's folder. `check_files=False` skips the existence checks (paths are
    still resolved and kept inside the root), for manifests of images not fetched yet.
    """
    path = Path(path)
    root = (Path(root) if root is not None else path.parent).resolve()
    text = read_text_file(path, "manifest")
    problems: list[str] = []
    items: list[BenchItem] = []
    first_line_of: dict[str, int] = {}
    for lineno, record, problem in iter_jsonl(text):
        where = f"{path}:{lineno}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        item_id = record.get("id")
        if isinstance(item_id, str) and item_id.strip():
            if item_id in first_line_of:
                problems.append(f"{where}: duplicate id {item_id!r} (first on line {first_line_of[item_id]})")
            else:
                first_line_of[item_id] = lineno
        item = _parse_record(record, root, allow_outside_root, check_files, problems, where)
        if item is not None:
            items.append(item)
    if not problems and not items:
        problems.append(f"{path}: the manifest has no groups")
    if problems:
        raise ManifestError(path, problems)
    logger.debug("Loaded %d groups from %s (root %s)", len(items), path, root)
    return items


def read_text_file(path: Path, what: str) -> str:
    """A user's UTF-8 text file (a BOM is allowed); anything else, a pipe or a folder included, is a
    one-problem ManifestError, never a hang. FileNotFoundError passes through for the caller to word."""
    path = Path(path)
    try:
        missing = not path.exists() and not path.is_symlink()
    except OSError as err:  # a name too long for the file system, and the like
        raise ManifestError(path, [f"{path}: cannot read the {what} ({err.strerror or err})"]) from None
    if missing:
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except ImageFileError as err:  # open_regular's one-line reasons (not a regular file, cannot open)
        raise ManifestError(path, [str(err).replace(" an image file", " a file")]) from None
    except OSError as err:
        raise ManifestError(path, [f"{path}: cannot read the {what} ({err.strerror or err})"]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        why = f"{path}: the {what} is not UTF-8 text ({err.reason} at byte {err.start})"
        raise ManifestError(path, [why]) from None


def check_images(items: Sequence[BenchItem], source: str | os.PathLike) -> None:
    """Every reference and target must be an image that decodes, within the pixel bounds (each file, and
    each group's references together): refused up front, before any model loads.

    Cheap: PIL's `verify` for PNG and WebP (it reads the whole file); other formats (JPEG, BMP, ...),
    whose `verify` reads only the header, are decoded in full (a few ms each); a file over the bound is
    refused from its header.
    """
    problems: list[str] = []
    bad: dict[Path, str | None] = {}
    for item in items:
        for path in (*item.references, *((item.target,) if item.target else ())):
            if path in bad:
                continue
            bad[path] = image_problem(path)
            if bad[path]:
                problems.append(f"group {_short(item.id)}: {bad[path]}")
        if not any(bad[path] for path in item.references):
            why = group_problem(item.references)
            if why:
                problems.append(f"group {_short(item.id)}: {why}")
    if problems:
        raise ManifestError(source, problems)


def group_problem(references: Sequence[Path]) -> str | None:
    """None if a group's references together are within the group bound (headers only), else why not."""
    try:
        check_group(references)
    except ImageFileError as err:
        return str(err)
    return None


def image_problem(path: Path) -> str | None:
    """None if `path` is a complete image file, else why not (one line naming the file)."""
    try:
        verify_image(path)
        if _format(path) not in _VERIFY_READS_ALL:
            open_image(path)
    except ImageFileError as err:
        return str(err)
    return None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as stored, from the header alone (an EXIF turn swaps them; ratios do not care)."""
    try:
        return read_header(path).size
    except ImageFileError:
        raise
    except Exception as err:  # PIL's many exception types for a header it cannot read
        raise ImageFileError(f"{path} is not an image PIL can read ({type(err).__name__})") from None


def _format(path: Path) -> str | None:
    try:
        return read_header(path).format
    except Exception:  # verify_image has just read it; a file that changed since is decoded in full
        return None


def _item_record(item: BenchItem, root: Path) -> dict:
    record = {
        "id": item.id,
        "domain": item.domain,
        "split": item.split,
        "references": [_relative_text(p, root) for p in item.references],
    }
    if item.target is not None:
        record["target"] = _relative_text(item.target, root)
    record["prompts"] = list(item.prompts)
    return record


def write_manifest(items: Iterable[BenchItem], path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Write `items` as JSON Lines with paths relative to `root` (absolute where outside it)."""
    path, root = Path(path), Path(root).resolve()
    items = list(items)
    counts = Counter(item.id for item in items)
    duplicates = sorted(item_id for item_id, count in counts.items() if count > 1)
    # Caught here rather than on the next load, while the caller still knows where the items came from.
    if duplicates:
        raise ManifestError(path, [f"duplicate id {d!r}" for d in duplicates])
    lines = [json.dumps(_item_record(item, root), ensure_ascii=False) for item in items]
    # readers never see a half-written manifest: a unique temporary name beside it, then a rename
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    # debug, as the other steps here: `easyref bench convert` reports the written manifest itself, once
    logger.debug("Wrote %d groups to %s (root %s)", len(items), path, root)
    return path


# ------------------------------------------------------------------------------------ folder converter


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _read_prompts_file(path: Path) -> list[str]:
    lines = (line.strip() for line in read_text_file(path, "prompts file").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _group_from_folder(folder: Path, root: Path, split: str, domain: str, problems: list[str]) -> BenchItem | None:
    if not folder.resolve().is_relative_to(root):
        problems.append(f"{folder}: resolves outside the root {root}")
        return None
    before = len(problems)
    references: list[Path] = []
    targets: list[Path] = []
    for file in sorted(folder.iterdir(), key=lambda p: p.name):
        if not _is_image(file):
            continue
        resolved = file.resolve()
        # A symlinked image may point anywhere; the benchmark must stay inside its root.
        if not resolved.is_relative_to(root):
            problems.append(f"{file}: resolves outside the root {root}")
            continue
        (targets if file.stem.lower() == TARGET_STEM else references).append(resolved)
    if not references:
        problems.append(f"{folder}: no reference images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if len(targets) > 1:
        problems.append(f"{folder}: several target images: {[t.name for t in targets]}")
    prompts_path = folder / PROMPTS_FILE
    prompts: list[str] = []
    if not prompts_path.is_file():
        problems.append(f"{folder}: missing {PROMPTS_FILE}")
    else:
        try:
            prompts = _read_prompts_file(prompts_path)
        except ManifestError as err:
            problems.extend(err.problems)
            return None
        if not prompts:
            problems.append(f"{prompts_path}: no prompts (blank and '#' lines are ignored)")
    if len(problems) > before:
        return None
    return BenchItem(folder.name, domain, split, tuple(references), targets[0] if targets else None, tuple(prompts))


def _split_folders(root: Path, split: str, problems: list[str]) -> list[tuple[Path, str]]:
    """(group folder, split) pairs: one level of held-in/held-out folders if present, else `split`."""
    subfolders = _visible_subfolders(root)
    split_level = [p for p in subfolders if p.name in SPLITS]
    if not split_level:
        return [(group, split) for group in subfolders]
    # Mixing split folders with group folders is ambiguous, so it is refused rather than guessed at.
    for stray in (p for p in subfolders if p.name not in SPLITS):
        problems.append(f"{stray}: beside {[p.name for p in split_level]}, only split folders are allowed")
    return [(group, level.name) for level in split_level for group in _visible_subfolders(level)]


def manifest_from_folders(
    root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    split: str = DEFAULT_SPLIT,
    domain: str | None = None,
) -> list[BenchItem]:
    """Build a manifest from `root/<group>/{*.png, target.png, prompts.txt}` (optionally under
    `root/held-in/` and `root/held-out/`, which then give the split). Written to `out` if given, with paths
    relative to `root`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(root, [f"{root}: not a folder"])
    domain = domain or DEFAULT_DOMAIN
    problems: list[str] = []
    items: list[BenchItem] = []
    inputs: list[Path] = []
    first_folder_of: dict[str, Path] = {}
    for folder, group_split in _split_folders(root, split, problems):
        if folder.name in first_folder_of:
            problems.append(f"{folder}: duplicate id {folder.name!r} (also {first_folder_of[folder.name]})")
            continue
        first_folder_of[folder.name] = folder
        inputs.append(folder / PROMPTS_FILE)
        item = _group_from_folder(folder, root, group_split, domain, problems)
        if item is not None:
            items.append(item)
    logger.debug("Found %d groups under %s", len(items), root)
    return _finish_conversion(items, problems, root, f"{root}: no group folders", out, root, inputs)


# -------------------------------------------------------------------------------------- COCO converter


def _read_coco(captions_json: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    text = read_text_file(captions_json, "captions file")
    try:
        data = parse_json(text, str(captions_json))
    except JSONFileError as err:
        raise ManifestError(captions_json, [str(err)]) from None
    try:
        files = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        captions: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            captions.setdefault(int(annotation["image_id"]), []).append(str(annotation["caption"]).strip())
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        detail = " ".join(str(err).split())[:_MAX_QUOTED]
        raise ManifestError(
            captions_json, [f"{captions_json}: not a COCO captions file: {type(err).__name__}: {detail}"]
        ) from None
    return files, captions


def manifest_from_coco(
    captions_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    limit: int | None = None,
    captions_per_image: int = 1,
) -> list[BenchItem]:
    """Single-reference items from COCO captions (e.g. `captions_val2017.json`): the image is both the
    reference and the target, its first `captions_per_image` captions the prompts. Sorted by image id;
    `limit` keeps the first N. Written to `out` if given, with paths relative to `images_dir`.
    """
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    captions_json = Path(captions_json)
    root = Path(images_dir).resolve()
    files, captions = _read_coco(captions_json)
    image_ids = sorted(files)[:limit]
    problems: list[str] = []
    items: list[BenchItem] = []
    for image_id in image_ids:
        where = f"{captions_json}: image {image_id}"
        path, why = _resolve_inside(files[image_id], root, allow_outside_root=False, check_files=True)
        if why:
            problems.append(f"{where}: {why}")
        prompts = [c for c in captions.get(image_id, []) if _is_text(c)][:captions_per_image]
        if not prompts:
            problems.append(f"{where}: no captions")
        if path is not None and prompts:
            items.append(BenchItem(str(image_id), "coco", "held-in", (path,), path, tuple(prompts)))
    logger.debug("Built %d COCO items from %s", len(items), captions_json)
    return _finish_conversion(items, problems, captions_json, f"{captions_json}: no images", out, root, [captions_json])


def _item_files(item: BenchItem) -> tuple[Path, ...]:
    return (*item.references, *((item.target,) if item.target else ()))


def _output_problems(out: Path, inputs: Sequence[Path]) -> list[str]:
    if out.is_dir():
        return [f"{out} is a folder; give the manifest's file name"]
    if not out.exists():
        return []
    for source in inputs:
        try:
            if out.samefile(source):
                return [f"{out} is one of the inputs ({source}); writing the manifest there would destroy it"]
        except OSError:
            continue
    return []


def _finish_conversion(
    items: list[BenchItem],
    problems: list[str],
    source,
    empty: str,
    out: str | os.PathLike | None,
    root: Path,
    inputs: Sequence[Path] = (),
) -> list[BenchItem]:
    """What every converter ends with: report all problems (an empty result is one), else write and return.

    The output may replace an older manifest, never one of the files it was built from."""
    if not problems and not items:
        problems.append(empty)
    if out is not None:
        problems.extend(_output_problems(Path(out), [*inputs, *(p for i in items for p in _item_files(i))]))
    if problems:
        raise ManifestError(source, problems)
    if out is not None:
        write_manifest(items, out, root)
    return items
