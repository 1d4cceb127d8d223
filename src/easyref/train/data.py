"""Training data for the three EasyRef stages: records, reproducible augmentation, batches, samplers.

Records come in the released formats (a `.json` list or a `.jsonl` file):
`{"image_file": [refs...] | "x.jpg", "text": [captions...] | "str", "target": "x.jpg"}` or, for face
crops, `{"face": [[x1, y1, x2, y2, score], ...], "text": ..., "target": "x.jpg"}` (what the authors'
training script reads) or the same boxes one level deeper, `[[[x1, y1, x2, y2, score], ...]]` (what
their README shows); the score is optional. Error messages
number records from 1: `data.json record 3` is the third list element, `data.jsonl line 3` the third
line of the file. Inside a `TrainDataset` a record is named by its 0-based `index` (the one in keys).

Every random choice of a sample comes from `sample_rng(seed, epoch, index)`, never from a global RNG,
so a sample is a pure function of its key: resuming, worker count and process count cannot change it.
Face boxes are taken in the coordinates of the upright image (after the EXIF orientation is applied).

Image files are decoded by `easyref.images.open_image`, the one rule shared with `generate` and the
benchmarks: a file declaring more than `limits.MAX_IMAGE_PIXELS` (or a sample's references together more
than `limits.MAX_GROUP_PIXELS`) is a bad image, refused from its header before decoding. Only regular
files are ever opened (a FIFO in the data folder cannot hang a run), and a sample's files are checked
against the data root again when they are opened, so a symlink swapped in after start-up is refused for
that sample (it is skipped with the reason, or fatal with `fail_on_bad_data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import operator
import os
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..images import ImageFileError, open_image, open_images, open_regular, read_header
from ..safe_io import iter_jsonl
from .config import check_data_file

logger = logging.getLogger(__name__)

Key = tuple[int, int]
Box = tuple[float, float, float, float]

# PIL decoders signal broken files with many exception types; all of them mean "this file is unusable".
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_CROP_MODES = ("random", "center")
_BUCKET_AREA_TOLERANCE = 0.10
_BUCKET_MAX_ASPECT = 4.0


class DataError(ValueError):
    """A user-facing data problem; the one-line message names the file and the record or line."""


# ----------------------------------------------------------------------------------------------
# Records


def load_records(path: str | Path) -> list[dict]:
    """Read and validate every record of a `.json` list or a `.jsonl` file, before any training."""
    path = Path(path)
    try:
        check_data_file(path)
    except ValueError as err:  # the same words whether the trainer's up-front check or this call finds it
        raise DataError(str(err)) from None
    try:
        with open_regular(path) as handle:  # a FIFO or device would block or stream forever
            raw = handle.read()
        text = raw.decode("utf-8-sig")  # utf-8-sig: tolerate a byte-order mark from editors
    except ImageFileError as exc:
        raise DataError(f"cannot read the data file: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read data file ({_one_line(exc)})") from None
    records = _parse_json_list(path, text) if path.suffix.lower() == ".json" else _parse_jsonl(path, text)
    if not records:
        raise DataError(f"{path}: contains no records")
    return records


def _parse_json_list(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:  # a few thousand nested brackets (safe_io.parse_json's wording)
        raise DataError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        check_record(record, f"{path} record {number}")
    return data


def _parse_jsonl(path: Path, text: str) -> list[dict]:
    records = []
    for number, record, problem in iter_jsonl(text):
        where = f"{path} line {number}"
        if problem:
            raise DataError(f"{where}: {problem}")
        check_record(record, where)
        records.append(record)
    return records


def check_record(record: Any, where: str) -> None:
    """Raise DataError (prefixed by `where`) unless `record` has a usable shape; files are not touched."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is not a JSON object")
    if "target" not in record:
        raise DataError(f"{where}: record has no 'target'")
    if not _is_path_string(record["target"]):
        raise DataError(f"{where}: 'target' must be a non-empty string")
    refs = record.get("image_file")
    if refs is not None and not (_is_path_string(refs) or _is_list_of(refs, _is_path_string)):
        raise DataError(f"{where}: 'image_file' must be a file name or a list of file names")
    text = record.get("text")
    if text is not None and not (isinstance(text, str) or _is_list_of(text, lambda t: isinstance(t, str))):
        raise DataError(f"{where}: 'text' must be a string or a list of strings")
    if record.get("face") is not None:
        face_box(record, where)


def face_box(record: dict, where: str) -> Box:
    """The first face box as (x1, y1, x2, y2); the score and any other boxes are ignored, as the
    authors' script ignores them."""
    box = _first_face_box(record.get("face"), where)
    if not (4 <= len(box) <= 5 and all(_is_number(v) for v in box)):
        raise DataError(
            f"{where}: face box must be 4 numbers x1, y1, x2, y2 and an optional score, got {_clip_repr(box)}"
        )
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    if not (x2 > x1 and y2 > y1):
        raise DataError(f"{where}: face box {box[:4]!r} is empty (needs x2 > x1 and y2 > y1)")
    return x1, y1, x2, y2


def _first_face_box(face: Any, where: str) -> list:
    """`face[0]` when `face` is a list of boxes (the authors' script takes `item["face"][0]`), or
    `face[0][0]` when it is a list holding a list of boxes (their README's form, which the script
    itself cannot read). A box is told from a list of boxes by its first element being a list."""
    first = face[0] if isinstance(face, list) and face else None
    if isinstance(first, list) and first:
        return first[0] if isinstance(first[0], list) else first
    raise DataError(
        f"{where}: 'face' must be a list of boxes [[x1, y1, x2, y2, score], ...] "
        f"(or that list inside a list), got {_clip_repr(face)}"
    )


def _clip_repr(value: Any, limit: int = 80) -> str:
    # A data file may hold a huge value where a box belongs; the error stays one short line.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_path_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_list_of(value: Any, check) -> bool:
    return isinstance(value, list) and all(check(item) for item in value)


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `true` in a box is a data bug, not a coordinate.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Paths


def resolve_path(root: Path, relative: str, allow_outside: bool = False) -> Path:
    """`root / relative`, refusing absolute paths, `..` escapes and symlinks that leave the root."""
    root = Path(root)
    candidate = Path(relative)
    if allow_outside:
        return candidate if candidate.is_absolute() else root / candidate
    escapes = candidate.is_absolute() or not _is_within(root / candidate, root)
    try:
        # resolve() follows existing symlinks, which is how a link inside the root could point out of it.
        escapes = escapes or not _is_within((root / candidate).resolve(), root.resolve())
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise DataError(f"path {relative!r} under {root} cannot be resolved ({_one_line(exc)})") from None
    if escapes:
        raise DataError(
            f"path {relative!r} escapes the data root {root}; pass --allow-outside-root "
            "(or set allow_outside_root: true) to permit"
        )
    return root / candidate


def _is_within(path: Path, root: Path) -> bool:
    # normpath, not resolve(): this lexical test is about `..`; symlinks are checked separately.
    path, root = Path(os.path.normpath(path)), Path(os.path.normpath(root))
    return path == root or root in path.parents


# ----------------------------------------------------------------------------------------------
# Settings and random streams


@dataclass
class DataSettings:
    stage: int = 1  # 1, 2 or 3
    resolution: int = 1024  # square side, or the target area side^2 with keep_aspect
    crop: str = "random"  # "random" | "center"
    keep_aspect: bool = False  # aspect-ratio buckets instead of square crops (the stage-3 recipe)
    bucket_stride: int = 64  # bucket sides are multiples of this
    max_references: int = 24
    truncate_rate: float = 0.0  # stage-3 recipe: 0.4
    image_drop_rate: float = 0.05
    text_drop_rate: float = 0.05
    both_drop_rate: float = 0.05
    drop_image_size: int = 512  # side of the black image that replaces dropped references
    face_expand_max: float = 0.5  # stage 2: the square face box grows by U[0, this) of its side per side
    flip_rate: float = 0.5  # stage 2: horizontal flip of the face crop
    # The data path of the authors' training script: resizes truncate, stage 3's SDXL original_size is
    # the resized size, and stage 2's face crop goes through their single-reference consistency crop.
    replicate_release: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, config) -> DataSettings:
        """A `TrainConfig`'s settings of the same names (the training config holds every one but
        `drop_image_size`)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.crop not in _CROP_MODES:
            raise ValueError(f"crop must be one of {_CROP_MODES}, got {self.crop!r}")
        for name in ("resolution", "bucket_stride", "max_references", "drop_image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.resolution % self.bucket_stride:
            raise ValueError(f"resolution {self.resolution} is not a multiple of bucket_stride {self.bucket_stride}")
        for name in ("truncate_rate", "image_drop_rate", "text_drop_rate", "both_drop_rate", "flip_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        total = self.image_drop_rate + self.text_drop_rate + self.both_drop_rate
        if total > 1.0 + 1e-9:
            raise ValueError(f"image_drop_rate + text_drop_rate + both_drop_rate must be <= 1, got {total:g}")
        if not (math.isfinite(self.face_expand_max) and self.face_expand_max >= 0):
            raise ValueError(f"face_expand_max must be >= 0, got {self.face_expand_max!r}")


def _stream_seed(*parts: object) -> int:
    # A cryptographic hash instead of hash(): stable across processes (no PYTHONHASHSEED) and
    # unrelated streams for neighbouring keys.
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The only source of randomness for one sample; independent streams per (seed, epoch, index)."""
    return random.Random(_stream_seed("sample", int(seed), int(epoch), int(index)))


def noise_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for the trainer's per-sample noise/timestep; separate from augmentation so either can change alone."""
    return _stream_seed("noise", int(seed), int(epoch), int(index)) & (2**63 - 1)


# ----------------------------------------------------------------------------------------------
# Augmentation pieces


def square_box(box: Sequence[float]) -> Box:
    """A square around the box centre whose side is the box's longer side."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    half = max(x2 - x1, y2 - y1) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - half, cy - half, cx + half, cy + half


def expand_box(box: Sequence[float], ratio: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Grow each side of a square box by `ratio * side`, capped at what fits, then shift it into the image.

    Shifting instead of clipping keeps the crop square and as large as asked, at the cost of the face
    no longer being centred when it sits near an edge.
    """
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1)
    if side <= 0 or ratio < 0 or width < 1 or height < 1:
        raise ValueError(f"cannot expand box {tuple(box[:4])} by {ratio} in a {width}x{height} image")
    size = min(max(1, round(side * (1 + 2 * ratio))), width, height)
    left = _shift_inside(round((x1 + x2) / 2 - size / 2), size, width)
    top = _shift_inside(round((y1 + y2) / 2 - size / 2), size, height)
    return left, top, left + size, top + size


def _shift_inside(start: int, size: int, limit: int) -> int:
    return min(max(start, 0), limit - size)


def choose_references(refs: list, rng: random.Random, max_references: int, truncate_rate: float) -> list:
    """Shuffle, keep at most `max_references`, and with probability `truncate_rate` keep only 2..n-1."""
    chosen = list(refs)
    rng.shuffle(chosen)
    chosen = chosen[:max_references]
    # Drawn even when it cannot apply, so the stream position does not depend on the group size.
    truncate = rng.random() < truncate_rate
    if truncate and len(chosen) > 2:
        chosen = chosen[: rng.randint(2, len(chosen) - 1)]
    return chosen


def choose_drop(rng: random.Random, settings: DataSettings) -> tuple[bool, bool]:
    """(drop_image, drop_text) from one uniform draw, so the three cases are mutually exclusive."""
    u = rng.random()
    image, text, both = settings.image_drop_rate, settings.text_drop_rate, settings.both_drop_rate
    if u < image:
        return True, False
    if u < image + text:
        return False, True
    if u < image + text + both:
        return True, True
    return False, False


def bucket_sizes(resolution: int, stride: int) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of `stride`, area within 10% of resolution^2, aspect 1:4..4:1.

    Landscape buckets are built and mirrored, so portrait and landscape images get symmetric choices.
    """
    if resolution < 1 or stride < 1 or resolution % stride:
        raise ValueError(f"resolution {resolution} must be a positive multiple of stride {stride}")
    area = resolution * resolution
    landscape = set()
    for width in range(resolution, int(resolution * 2 * 1.1) + stride, stride):
        height = max(stride, round(area / width / stride) * stride)
        if width / height <= _BUCKET_MAX_ASPECT and abs(width * height - area) <= _BUCKET_AREA_TOLERANCE * area:
            landscape.add((width, height))
    buckets = landscape | {(h, w) for w, h in landscape}
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log scale (so 2:1 and 1:2 are equally far from 1:1)."""
    if width < 1 or height < 1 or not buckets:
        raise ValueError(f"no bucket for a {width}x{height} image among {len(buckets)} buckets")
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))


def crop_target(
    image: Image.Image, size: tuple[int, int], rng: random.Random, mode: str, truncate: bool = False
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize (bilinear) to cover `size` = (width, height) keeping the aspect, then crop.

    Returns the crop and its (top, left) in the resized image, as SDXL's crop conditioning expects.
    `truncate` sizes the resize as the authors' script does (see `cover_size`).
    """
    if mode not in _CROP_MODES:
        raise ValueError(f"crop mode must be one of {_CROP_MODES}, got {mode!r}")
    width, height = size
    resized_w, resized_h = cover_size(image.width, image.height, size, truncate)
    resized = image.resize((resized_w, resized_h), Image.BILINEAR)
    if mode == "random":
        top, left = rng.randint(0, resized_h - height), rng.randint(0, resized_w - width)
    else:
        top, left = (resized_h - height) // 2, (resized_w - width) // 2
    return resized.crop((left, top, left + width, top + height)), (top, left)


def cover_size(width: int, height: int, size: tuple[int, int], truncate: bool = False) -> tuple[int, int]:
    """(width, height) of a `width` x `height` image resized, keeping its aspect, to just cover `size`.

    By default the other side is rounded; with `truncate` it is computed exactly as the authors' script
    gets it from torchvision's `Resize(side)` (`int(side * long / short)`), so crop offsets match theirs.
    """
    if truncate:
        return _cover_size_truncated(width, height, size)
    scale = max(size[0] / width, size[1] / height)
    # max() guards against rounding a covering side one pixel short.
    return max(size[0], round(width * scale)), max(size[1], round(height * scale))


def _cover_size_truncated(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    # For a square target this is torchvision's `Resize(side)` exactly: the short side becomes `side`, the
    # long one `int(side * long / short)`. For an aspect bucket the side with the larger scale plays the
    # short side's part. Integer cross-multiplication decides ties without float error, and int() of a
    # quotient that is at least the other target side never falls below it, so no max() guard is needed.
    target_w, target_h = size
    if target_w * height >= target_h * width:
        return target_w, int(target_w * height / width)
    return int(target_h * width / height), target_h


def consistency_crop(reference: Image.Image, size: tuple[int, int], offset: tuple[int, int]) -> Image.Image:
    """The authors' single-reference crop: the reference resized as the target was (`cover_size`,
    truncating) and cut at the target's crop offset (top, left), so it lines up with the target.

    A square face crop resizes to exactly the target's square, so a non-zero offset pushes the cut past
    its edge; PIL fills what lies outside with black (as torchvision's crop of a PIL image does in their
    script), which leaves a black band of `offset` pixels at the right or bottom.
    """
    width, height = size
    top, left = offset
    resized = reference.resize(cover_size(reference.width, reference.height, size, truncate=True), Image.BILINEAR)
    return resized.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the range the SDXL VAE expects."""
    array = np.array(image.convert("RGB"), dtype=np.float32)  # np.array copies: torch wants writable memory
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------
# Image files


def _failure_reason(path: Path, exc: BaseException, opened: Path | None = None) -> str:
    if isinstance(exc, FileNotFoundError) or not path.exists():
        return "file not found"
    if isinstance(exc, ImageFileError):
        # Its message starts with the file, which the Skipped record carries already: keep the rest.
        text = _one_line(exc)
        for name in {str(path), str(opened or path)}:
            if text.startswith(name):
                return text[len(name) :].lstrip(":").strip().removeprefix("is ") or text
        return text
    return f"unreadable image ({type(exc).__name__}: {_one_line(exc)})"


# ----------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Skipped:
    """A sample that could not be built; it travels to the batch so the trainer can report it."""

    key: Key
    path: str
    reason: str


@dataclass
class TrainSample:
    key: Key  # (epoch, index)
    references: list[Image.Image]  # RGB; one black drop_image_size square when the image is dropped
    text: str  # "" when the text is dropped
    pixel_values: torch.Tensor  # (3, H, W) in [-1, 1]
    time_ids: torch.Tensor  # float32 (6,): original (h, w), crop (top, left), target (h, w)
    noise_seed: int


@dataclass
class _Entry:
    target: Path
    references: list[Path]
    face: Box | None
    texts: list[str]


class _SampleFailed(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by (epoch, index) keys; every sample is a pure function of its key."""

    def __init__(
        self,
        records: list[dict],
        root: str | Path,
        settings: DataSettings,
        allow_outside_root: bool = False,
        strict: bool = False,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.strict = strict
        self.allow_outside_root = allow_outside_root
        self._real_root = None if allow_outside_root else (_resolved(self.root) or self.root)
        self.buckets = bucket_sizes(settings.resolution, settings.bucket_stride) if settings.keep_aspect else []
        self._entries = [self._entry(index, record) for index, record in enumerate(records)]
        self._sizes: dict[int, tuple[int, int] | None] = {}

    def _entry(self, index: int, record: dict) -> _Entry:
        where = f"record index {index}"
        check_record(record, where)
        where = f"record index {index} (target {record['target']!r})"
        stage = self.settings.stage
        if stage == 2 and record.get("face") is None:
            raise DataError(f"{where}: stage 2 needs a 'face' box")
        refs = _as_list(record.get("image_file")) if stage == 3 else []
        if stage == 3 and not refs:
            raise DataError(f"{where}: stage 3 needs at least one reference in 'image_file'")
        try:
            target = resolve_path(self.root, record["target"], self.allow_outside_root)
            references = [resolve_path(self.root, ref, self.allow_outside_root) for ref in refs]
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        face = face_box(record, where) if stage == 2 else None
        return _Entry(target, references, face, _as_list(record.get("text")))

    def __len__(self) -> int:
        return len(self._entries)

    def size_of(self, index: int) -> tuple[int, int] | None:
        """Upright (width, height) of the target from its header (cached), or None if unreadable."""
        if index not in self._sizes:
            try:
                self._sizes[index] = read_header(
                    self._contained(self._entries[index].target), orientation=True
                ).upright_size
            except (_SampleFailed, *_IMAGE_ERRORS):
                self._sizes[index] = None
        return self._sizes[index]

    def _contained(self, path: Path) -> Path:
        """The real path to open: the containment check of start-up, repeated when the file is opened.

        A symlink swapped in after start-up that now leads out of the data root fails this sample.
        Opening the resolved path keeps the window between this check and the open small.
        """
        if self._real_root is None:
            return path
        real = _resolved(path)
        if real is None:
            raise _SampleFailed(path, "cannot be resolved (a symlink loop)")
        if not _is_within(real, self._real_root):
            raise _SampleFailed(path, f"now leads outside the data root {self.root} (a symlink changed after start-up)")
        return real

    def _load(self, path: Path) -> Image.Image:
        real = self._contained(path)
        try:
            return open_image(real)
        except _IMAGE_ERRORS as exc:
            raise _SampleFailed(path, _failure_reason(path, exc, real)) from None

    def _load_group(self, paths: list[Path]) -> list[Image.Image]:
        """A sample's references: every header within the bounds before the first is decoded."""
        reals = [self._contained(path) for path in paths]
        try:
            return open_images(reals, names=[str(path) for path in paths])
        except _IMAGE_ERRORS as exc:
            text = str(exc)
            # the file the message names, else (the group's total) the first reference
            path = next((p for p in paths if text.startswith(str(p))), paths[0])
            raise _SampleFailed(path, _failure_reason(path, exc)) from None

    def bucket_of(self, index: int) -> tuple[int, int]:
        """(width, height) of this record's training crop; unreadable targets fall in the square bucket."""
        square = (self.settings.resolution, self.settings.resolution)
        if not self.settings.keep_aspect:
            return square
        size = self.size_of(index)
        return square if size is None else nearest_bucket(*size, self.buckets)

    def __getitem__(self, key: Key) -> TrainSample | Skipped:
        epoch, index = _check_key(key, len(self))
        try:
            return self._build(epoch, index)
        except _SampleFailed as failure:
            where = f"record index {index}"
            if self.strict:
                raise DataError(f"{failure.path} ({where}): {failure.reason}") from None
            return Skipped((epoch, index), str(failure.path), failure.reason)

    def _build(self, epoch: int, index: int) -> TrainSample:
        settings, entry = self.settings, self._entries[index]
        rng = sample_rng(settings.seed, epoch, index)
        raw = self._load(entry.target)
        width, height = self.bucket_of(index)
        truncate = settings.replicate_release
        target, (top, left) = crop_target(raw, (width, height), rng, settings.crop, truncate)
        # All random draws happen before reference files are read, so a dropped image costs no I/O.
        make_references = self._reference_plan(entry, raw, target, (top, left), rng)
        text = rng.choice(entry.texts) if entry.texts else ""
        drop_image, drop_text = choose_drop(rng, settings)
        size = settings.drop_image_size
        references = [Image.new("RGB", (size, size))] if drop_image else make_references()
        original = self._original_size(raw, (width, height))
        time_ids = torch.tensor([*original, top, left, height, width], dtype=torch.float32)
        return TrainSample(
            key=(epoch, index),
            references=references,
            text="" if drop_text else text,
            pixel_values=to_tensor(target),
            time_ids=time_ids,
            noise_seed=noise_seed(settings.seed, epoch, index),
        )

    def _original_size(self, raw: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
        """SDXL's original_size as (height, width): the file's upright size. With `replicate_release`,
        stage 3 feeds the resized size instead, because the authors' script resizes the target before
        it reads the size there (in stages 1-2 it reads it from the file, as here)."""
        if self.settings.replicate_release and self.settings.stage == 3:
            width, height = cover_size(raw.width, raw.height, size, truncate=True)
            return height, width
        return raw.height, raw.width

    def _reference_plan(
        self, entry: _Entry, raw: Image.Image, target: Image.Image, offset: tuple[int, int], rng: random.Random
    ):
        """Draw this stage's reference choices now; return a thunk that produces the images.

        `offset` is the target's crop (top, left), which the authors' consistency crop reuses.
        """
        settings = self.settings
        if settings.stage == 1:
            # The cropped target, i.e. the very pixels the UNet is trained on (the authors' single-reference setup).
            return lambda: [target]
        if settings.stage == 2:
            ratio = rng.uniform(0.0, settings.face_expand_max)
            box = expand_box(square_box(entry.face), ratio, raw.width, raw.height)
            flip = rng.random() < settings.flip_rate
            if settings.replicate_release:
                return lambda: [consistency_crop(_face_crop(raw, box, flip), target.size, offset)]
            return lambda: [_face_crop(raw, box, flip)]
        paths = choose_references(entry.references, rng, settings.max_references, settings.truncate_rate)
        return lambda: self._load_group(paths)


def _face_crop(raw: Image.Image, box: tuple[int, int, int, int], flip: bool) -> Image.Image:
    crop = raw.crop(box)
    return ImageOps.mirror(crop) if flip else crop


def _resolved(path: Path) -> Path | None:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # symlink loops
        return None


def _check_key(key: Any, length: int) -> Key:
    # A bare index would silently mean epoch 0 and repeat the same augmentation every epoch.
    try:
        epoch, index = (operator.index(k) for k in key)
    except (TypeError, ValueError):
        raise TypeError(f"dataset keys are (epoch, index) pairs of integers, got {key!r}") from None
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} records")
    return epoch, index


# ----------------------------------------------------------------------------------------------
# Batches


@dataclass
class TrainBatch:
    """Collated samples. With every item skipped, B = 0: pixel_values is (0, 3, 1, 1), time_ids (0, 6)."""

    keys: list[Key]
    references: list[list[Image.Image]]
    texts: list[str]
    pixel_values: torch.Tensor  # (B, 3, H, W)
    time_ids: torch.Tensor  # (B, 6)
    noise_seeds: list[int]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def collate(items: list[TrainSample | Skipped]) -> TrainBatch:
    samples = [item for item in items if isinstance(item, TrainSample)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    for item in skipped:
        logger.warning("skipping sample %s: %s: %s", item.key, item.path, item.reason)
    shapes = {tuple(sample.pixel_values.shape) for sample in samples}
    if len(shapes) > 1:
        raise ValueError(f"a batch must have one target size, got {sorted(shapes)}; batch with global_batches")
    if samples:
        pixel_values = torch.stack([sample.pixel_values for sample in samples])
        time_ids = torch.stack([sample.time_ids for sample in samples])
    else:
        pixel_values, time_ids = torch.zeros(0, 3, 1, 1), torch.zeros(0, 6)
    return TrainBatch(
        keys=[sample.key for sample in samples],
        references=[sample.references for sample in samples],
        texts=[sample.text for sample in samples],
        pixel_values=pixel_values,
        time_ids=time_ids,
        noise_seeds=[sample.noise_seed for sample in samples],
        skipped=skipped,
    )


def global_batches(dataset: TrainDataset, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches of indices, a function of (seed, epoch) only; each has one target size.

    Each bucket's leftover (fewer than global_batch_size indices) is dropped for this epoch; the
    shuffle differs per epoch, so different indices are left out each time.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    rng = random.Random(_stream_seed("batches", int(seed), int(epoch)))
    order = list(range(len(dataset)))
    rng.shuffle(order)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in order:
        by_bucket.setdefault(dataset.bucket_of(index), []).append(index)
    batches = []
    for bucket in sorted(by_bucket):  # sorted: the result must not depend on dict insertion details
        members = by_bucket[bucket]
        full = len(members) - len(members) % global_batch_size
        batches += [members[i : i + global_batch_size] for i in range(0, full, global_batch_size)]
    rng.shuffle(batches)
    return batches


class RankBatchSampler:
    """This rank's contiguous slice of each global batch, as (epoch, index) keys, from batch `start` on."""

    def __init__(
        self,
        dataset: TrainDataset,
        global_batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int,
        epoch: int,
        start: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in range for {num_replicas} replicas")
        if global_batch_size % num_replicas:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {num_replicas} replicas")
        self.epoch = epoch
        self.per_rank = global_batch_size // num_replicas
        self.rank = rank
        self.batches = global_batches(dataset, global_batch_size, seed, epoch)
        if not 0 <= start <= len(self.batches):
            raise ValueError(f"start {start} is outside epoch {epoch}, which has {len(self.batches)} batches")
        self.start = start

    def __iter__(self) -> Iterator[list[Key]]:
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for batch in self.batches[self.start :]:
            yield [(self.epoch, index) for index in batch[lo:hi]]

    def __len__(self) -> int:
        return len(self.batches) - self.start
