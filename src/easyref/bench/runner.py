"""Generate and score a manifest's groups, resumably and in shards; merge the records into tables.

A run folder holds:
- `run.json`: the method's description (model names, their resolved paths and hub commits, dtype), the
  generation settings, the image size made, the manifest (path and SHA-256), the sample count and the
  package versions;
- `images/<item>/p<prompt>-s<sample>.png`: one image per prompt and sample;
- `records-r<rank>w<world>.jsonl`: one line per image (item, split, domain, prompt, seed, metrics);
- `sheets/<item>.png`: the references above the item's images;
- `summary.md`, `summary.csv`, `summary.json`: the paper's table, one row per split.

Resuming: an image counts as done when its record exists and its file is there, so a crash at any
point costs at most the image in flight. Every image is generated alone (one prompt and seed per call),
so it depends on its seed, prompt and references only, never on which others shared its batch: a
resumed run makes exactly the pixels an uninterrupted one would. Sharding: process r of w takes items
r, r+w, ...; every process reads every records file, so the merged summary does not depend on how
the work was split. Seeds come from (seed, item id, prompt, sample), the same for every method and
every split of work.

Safety: one process per run folder (the command holds `safe_io.RunLock`); every file is written under
a unique temporary name and renamed (temporary files of a killed run are removed by the next one);
nothing is written through a symlink planted in the folder; a run folder's `run.json` that cannot be
read is refused, never replaced.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..images import ImageFileError, grid_sheet, open_image, open_images, open_regular
from ..safe_io import (
    LOCK_NAME,
    TEMP_SUFFIX,
    JSONFileError,
    append_line,
    atomic_write_bytes,
    atomic_write_text,
    check_no_symlink,
    clean_stale_temps,
    parse_json,
)
from .manifest import BenchItem

logger = logging.getLogger(__name__)

METRIC_COLUMNS = (
    ("clip_i", "CLIP-I"),
    ("clip_t", "CLIP-T"),
    ("dino_i", "DINO-I"),
    ("clip_i_target", "CLIP-I (target)"),
    ("dino_i_target", "DINO-I (target)"),
)
SHEET_TILE = 192
RUN_FILE = "run.json"
UNCHECKED_KEYS = ("environment",)  # recorded in run.json, not required to match on resume
SUMMARY_FILES = ("summary.md", "summary.csv", "summary.json")
_RECORDS = re.compile(r"records-r\d+w\d+\.jsonl")
# the top-level names a run folder may hold besides records files and temporary files
_RUN_NAMES = frozenset({RUN_FILE, "images", "sheets", LOCK_NAME, *SUMMARY_FILES})
_IMAGE_PATH = re.compile(r"images/[A-Za-z0-9_-][A-Za-z0-9._-]*/p\d+-s\d+\.png")  # as `Unit.image` makes them


class RunError(ValueError):
    """A run folder that cannot be continued with these settings (a user mistake, one line)."""


@dataclass(frozen=True)
class Unit:
    """One image to make: an item's prompt and sample, with its seed and file."""

    item: BenchItem
    prompt_index: int
    sample: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.item.id}\t{self.prompt_index}\t{self.sample}"

    @property
    def image(self) -> str:
        return f"images/{safe_name(self.item.id)}/p{self.prompt_index:02d}-s{self.sample:02d}.png"

    @property
    def prompt(self) -> str:
        return self.item.prompts[self.prompt_index]


# ---------------------------------------------------------------------- planning
def safe_name(item_id: str) -> str:
    """A file name for an item id; ids with other characters get a hash so two never collide."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)[:80].lstrip(".") or "item"
    return slug if slug == item_id else f"{slug}-{zlib.crc32(item_id.encode()):08x}"


def unit_seed(seed: int, item_id: str, prompt_index: int, sample: int) -> int:
    """Independent of the method, the batch and the shard, so every method sees the same noise."""
    return (seed + zlib.crc32(f"{item_id}\t{prompt_index}\t{sample}".encode())) % 2**31


def plan(items: Sequence[BenchItem], samples: int, seed: int) -> list[list[Unit]]:
    """Per item, the units it needs."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return [
        [Unit(item, p, s, unit_seed(seed, item.id, p, s)) for p in range(len(item.prompts)) for s in range(samples)]
        for item in items
    ]


def shard(groups: Sequence, rank: int, world: int) -> list:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(groups[rank::world])


# ---------------------------------------------------------------------- records
def read_records(out: Path) -> dict[str, dict]:
    """Every finished image's record from every process's file; lines that are not whole records
    (a line cut short by a crash, or anything else) are ignored, so their images are simply made again."""
    records = {}
    for path in sorted(out.glob("records-*.jsonl")):
        for line in _read_text(path).splitlines():
            record = _parse_record(line)
            if record is not None and (out / record["image"]).is_file():
                records[record["key"]] = record
    return records


def _read_text(path: Path) -> str:
    try:
        with open_regular(path) as handle:
            return handle.read().decode("utf-8", errors="replace")
    except ImageFileError as err:  # a pipe or a folder where a file should be: never read (it could block)
        raise RunError(str(err)) from None
    except OSError as err:
        raise RunError(f"cannot read {path} ({err.strerror or err})") from None


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    if not all(isinstance(record.get(k), str) for k in ("key", "image", "item", "split", "method")):
        return None
    if not _IMAGE_PATH.fullmatch(record["image"]):  # never a path out of the run folder
        return None
    if any(k in record and not _is_number(record[k]) for k, _ in METRIC_COLUMNS):
        return None
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def append_record(path: Path, record: dict, root: Path | None = None) -> None:
    """One line, fsynced; refuses a symlink at `path` (or between `root` and it)."""
    append_line(path, json.dumps(record) + "\n", root, fsync=True)


def drop_torn_line(path: Path, root: Path | None = None) -> None:
    """Cut a last line that a killed process left without its newline (only the writer of `path` may)."""
    if not path.is_file():
        return
    check_no_symlink(path, root)
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            logger.info("dropped an unfinished last line of %s (its image is made again)", path)


def save_image(image: Image.Image, path: Path, root: Path | None = None) -> None:
    """A unique temporary name beside `path`, then a rename: a crash never leaves a half-written PNG
    that looks finished, and two processes never share a temporary file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue(), root=root)


def read_run_header(out: Path) -> dict | None:
    """The saved `run.json`, or None when there is none; one that cannot be read is a RunError."""
    path = Path(out) / RUN_FILE
    if not path.exists() and not path.is_symlink():
        return None
    check_no_symlink(path, out)
    try:
        saved = parse_json(_read_text(path), str(path))
    except JSONFileError as err:
        raise RunError(f"{err}; this run folder cannot be resumed: use another --out") from None
    if not isinstance(saved, dict):
        raise RunError(
            f"{path} is not a run description (a JSON object); this run folder cannot be resumed: use another --out"
        )
    return saved


def check_run_header(out: Path, header: dict) -> dict | None:
    """Refuse a run folder whose `run.json` differs from `header` in any of `header`'s keys (also a
    part of the header, checked before the method loads); returns the saved header, if any."""
    out = Path(out)
    saved = read_run_header(out)
    if saved is not None:
        changed = sorted(k for k in header if k not in UNCHECKED_KEYS and saved.get(k) != header[k])
        if changed:
            raise RunError(f"{out} holds a run with different {', '.join(changed)}; use another --out to start afresh")
    return saved


def start_run(out: Path, header: dict, main_process: bool = True) -> None:
    """Write `run.json`, or check that the existing one describes the same run."""
    out = Path(out)
    if check_run_header(out, header) is not None:
        return
    if main_process:
        atomic_write_text(out / RUN_FILE, json.dumps(header, indent=1), root=out)


# ---------------------------------------------------------------------- the run folder
def check_run_folder(out: Path) -> None:
    """An existing --out must be a run folder (or empty): never fill, say, a home folder with run files."""
    out = Path(out)
    if not out.exists():
        if out.is_symlink():
            raise RunError(f"--out {out} is a broken symlink")
        return
    if not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    names = [entry.name for entry in out.iterdir()]
    if RUN_FILE in names or any(_RECORDS.fullmatch(n) for n in names):
        return
    strange = sorted(n for n in names if n not in _RUN_NAMES and not _is_temp(n))
    if strange:
        raise RunError(
            f"--out {out} already holds files that are not a bench run's (e.g. {strange[0]!r}); "
            "use a new or empty folder"
        )


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def check_item_names(items: Sequence[BenchItem]) -> None:
    """No two items may share an images/ folder (ids that differ only in case, or a crafted id that
    equals another's hashed name)."""
    by_name: dict[str, str] = {}
    for item in items:
        name = safe_name(item.id).casefold()  # casefold: names one case-insensitive disk would merge
        if name in by_name:
            raise RunError(
                f"groups {by_name[name]!r} and {item.id!r} would share the folder "
                f"images/{safe_name(item.id)}; rename one"
            )
        by_name[name] = item.id


def check_run_paths(out: Path, units: Iterable[Unit], rank: int = 0, world: int = 1, sheets: bool = True) -> None:
    """Before any work: no file this process may write in `out` (run.json, its records, the summaries,
    the units' images and their groups' sheets) is a symlink or has one on the way, or is a folder."""
    out = Path(out)
    paths = [out / RUN_FILE, out / f"records-r{rank}w{world}.jsonl", *(out / n for n in SUMMARY_FILES)]
    items: dict[str, BenchItem] = {}
    for unit in units:
        paths.append(out / unit.image)
        items.setdefault(unit.item.id, unit.item)
    if sheets:
        paths.extend(_sheet_path(out, item) for item in items.values())
    checked: set[Path] = set()
    for path in paths:
        check_no_symlink(path, out)
        if path.is_dir():
            raise RunError(f"{path} is a folder where the run writes a file; remove it or use another --out")
        if path.exists() and not path.is_file():
            raise RunError(f"{path} is not a regular file (a pipe, device or socket); remove it or use another --out")
        for folder in path.relative_to(out).parents:
            folder = out / folder
            if folder != out and folder not in checked:
                checked.add(folder)
                if folder.exists() and not folder.is_dir():
                    raise RunError(f"{folder} is a file where the run needs a folder; remove it or use another --out")


def clean_run_temps(out: Path) -> list[Path]:
    """Temporary files a killed run left in `out`, `out/sheets` and `out/images/*` (hold the lock)."""
    out = Path(out)
    folders = [out, out / "sheets"]
    images = out / "images"
    if images.is_dir() and not images.is_symlink():
        folders += [f for f in sorted(images.iterdir()) if f.is_dir() and not f.is_symlink()]
    return [removed for folder in folders if not folder.is_symlink() for removed in clean_stale_temps(folder)]


# ---------------------------------------------------------------------- generation and scoring
def run_bench(
    items: Sequence[BenchItem],
    method,
    settings,
    out: Path,
    samples: int = 1,
    scorer=None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    sheets: bool = True,
) -> int:
    """Make (and score, when `scorer` is given) this process's share of the images; returns how many it made."""
    from tqdm.auto import tqdm

    out = Path(out)
    done = read_records(out)
    # a group whose images are all there may still lack its sheet (a run killed just before it)
    mine = [
        units
        for units in shard(plan(items, samples, settings.seed), rank, world)
        if any(u.key not in done for u in units) or (sheets and not _sheet_path(out, units[0].item).is_file())
    ]
    records_file = out / f"records-r{rank}w{world}.jsonl"
    drop_torn_line(records_file, out)
    made = 0
    for units in tqdm(mine, desc=f"bench {rank}/{world}", unit="group", disable=not progress):
        item = units[0].item
        references = open_images(item.references)
        for unit in (u for u in units if u.key not in done):
            # one image per call: its pixels depend on its seed, never on what shared its batch
            [image] = method.generate(references, [unit.prompt], [unit.seed], settings)
            save_image(image, out / unit.image, out)
            record = base_record(unit, getattr(method, "name", "?"))
            if scorer is not None:
                record.update(score_unit(scorer, unit, image))
            append_record(records_file, record, out)
            made += 1
        if sheets:
            write_sheet(out, item, references)
    return made


def base_record(unit: Unit, method: str) -> dict:
    item = unit.item
    return {
        "key": unit.key,
        "item": item.id,
        "split": item.split,
        "domain": item.domain,
        "method": method,
        "prompt_index": unit.prompt_index,
        "prompt": unit.prompt,
        "sample": unit.sample,
        "seed": unit.seed,
        "image": unit.image,
    }


def score_unit(scorer, unit: Unit, image: Image.Image) -> dict:
    """CLIP-I / DINO-I to the references (and target), CLIP-T to the prompt."""
    references = scorer.embed_image_files(unit.item.references)
    target = scorer.embed_image_files([unit.item.target]) if unit.item.target else None
    return scorer.score_embedded(image, references, unit.prompt, target)


def score_folder(
    items: Sequence[BenchItem],
    images: Path,
    out: Path,
    scorer,
    method: str = "external",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    found: Sequence[Unit] | None = None,
) -> int:
    """Score images made elsewhere, laid out as `images/<item>/p<prompt>-s<sample>.png` (as `run` writes them).

    `found`: the units of `discover_images(items, images)`, when the caller has already listed (and checked) them.
    """
    from tqdm.auto import tqdm

    images, out = Path(images), Path(out)
    found = discover_images(items, images) if found is None else found
    done = read_records(out)
    records_file = out / f"records-r{rank}w{world}.jsonl"
    drop_torn_line(records_file, out)
    mine = [u for u in shard(found, rank, world) if u.key not in done]
    for unit in tqdm(mine, desc=f"score {rank}/{world}", unit="image", disable=not progress):
        image = open_image(source_image(images, unit))
        # the record points at a copy inside the run folder, so the run is self-contained and resumable
        save_image(image, out / unit.image, out)
        record = base_record(unit, method)
        record.update(score_unit(scorer, unit, image))
        append_record(records_file, record, out)
    return len(mine)


def source_image(images: Path, unit: Unit) -> Path:
    """Where `bench score` reads a unit's image from (`images/<item>/p<prompt>-s<sample>.png`)."""
    return Path(images) / Path(unit.image).relative_to("images")


def discover_images(items: Sequence[BenchItem], images: Path) -> list[Unit]:
    """The units whose files exist under `images`; names that do not parse are reported, not guessed."""
    pattern = re.compile(r"p(\d+)-s(\d+)\.png")
    units, unknown = [], []
    for item in items:
        folder = images / safe_name(item.id)
        for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            match = pattern.fullmatch(path.name)
            if not match or int(match[1]) >= len(item.prompts):
                unknown.append(str(path))
                continue
            p, s = int(match[1]), int(match[2])
            units.append(Unit(item, p, s, -1))
    if unknown:
        logger.warning(
            "%d images are not named p<prompt>-s<sample>.png for a prompt of their item and were skipped, e.g. %s",
            len(unknown),
            unknown[0],
        )
    if not units:
        raise RunError(f"no images named <item>/p<prompt>-s<sample>.png for this manifest under {images}")
    return units


# ---------------------------------------------------------------------- sheets and summaries
def _sheet_path(out: Path, item: BenchItem) -> Path:
    return Path(out) / "sheets" / f"{safe_name(item.id)}.png"


def write_sheet(out: Path, item: BenchItem, references: Sequence[Image.Image]) -> None:
    """References on the first row, the item's images below (one row per prompt)."""
    made = sorted((out / "images" / safe_name(item.id)).glob("p*-s*.png"))
    rows = [list(references)]
    for p in range(len(item.prompts)):
        rows.append([open_image(f) for f in made if f.name.startswith(f"p{p:02d}-")])
    save_image(grid_sheet(rows, SHEET_TILE), _sheet_path(out, item), out)


def summarize(records: Iterable[dict]) -> list[dict]:
    """Mean of every metric per method and split (held-in, held-out, then all)."""
    records = sorted(records, key=lambda r: r["key"])  # the same sum whichever process wrote what
    rows = []
    for method in sorted({r["method"] for r in records}):
        mine = [r for r in records if r["method"] == method]
        for split in ("held-in", "held-out", "all"):
            chosen = [r for r in mine if split == "all" or r["split"] == split]
            if not chosen or (split == "all" and len({r["split"] for r in mine}) < 2):
                continue
            row = {"method": method, "split": split, "groups": len({r["item"] for r in chosen}), "images": len(chosen)}
            for key, _ in METRIC_COLUMNS:
                values = [r[key] for r in chosen if key in r]
                if values:
                    row[key] = math.fsum(values) / len(values)
            rows.append(row)
    return rows


def summary_tables(rows: list[dict]) -> tuple[str, str]:
    """The paper's layout as Markdown, and the same rows as CSV."""
    metrics = [(k, name) for k, name in METRIC_COLUMNS if any(k in r for r in rows)]
    head = ["method", "split", "groups", "images", *(name for _, name in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["split"], str(r["groups"]), str(r["images"])]
        cells += [f"{r[k]:.3f}" if k in r else "" for k, _ in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "split", "groups", "images", *(k for k, _ in metrics)])
    for r in rows:
        writer.writerow(
            [r["method"], r["split"], r["groups"], r["images"], *(repr(r[k]) if k in r else "" for k, _ in metrics)]
        )
    return "\n".join(lines) + "\n", buffer.getvalue()


def write_summary(out: Path) -> list[dict]:
    """Merge every process's records into summary.{md,csv,json}."""
    out = Path(out)
    records = read_records(out)
    rows = summarize(records.values())
    markdown, table = summary_tables(rows)
    for name, text in (
        ("summary.md", markdown),
        ("summary.csv", table),
        ("summary.json", json.dumps({"rows": rows, "images": len(records)}, indent=1)),
    ):
        atomic_write_text(out / name, text, root=out)
    if any(math.isnan(v) for r in rows for v in r.values() if isinstance(v, float)):
        logger.warning("some metrics are NaN (an image or prompt the models could not embed?)")
    return rows


def settings_header(method, settings, manifest: Path, samples: int) -> dict:
    """What `run.json` holds; `method` None: all but what the method says of itself (known once it loads).

    A resumed run must match every key but `environment` (package versions: a resume after an upgrade
    is allowed, and the versions of the first start stay recorded)."""
    from ..info import environment

    manifest = Path(manifest)
    header = {
        "settings": asdict(settings),
        "manifest": str(manifest.resolve()),
        "manifest_sha256": file_sha256(manifest),
        "samples": samples,
    }
    if method is None:
        return header
    # the device differs between the processes of one sharded run, and may change on resume
    described = {k: v for k, v in method.describe().items() if k != "device"}
    side = described.get("default_size")
    size = {"height": settings.height or side, "width": settings.width or side}  # what the images come out at
    return {"method": described, **header, "image_size": size, "environment": environment()}


def file_sha256(path: Path) -> str:
    """Of the manifest: its paths and prompts decide what a run makes (the images it names are not hashed)."""
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
