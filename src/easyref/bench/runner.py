"""Generate and score a manifest's groups, resumably and in shards; merge the records into tables.

A run folder holds:
- `run.json`: the method's description, the generation settings, the manifest and sample count;
- `images/<item>/p<prompt>-s<sample>.png`: one image per prompt and sample;
- `records-r<rank>w<world>.jsonl`: one line per image (item, split, domain, prompt, seed, metrics);
- `sheets/<item>.png`: the references above the item's images;
- `summary.md`, `summary.csv`, `summary.json`: the paper's table, one row per split.

Resuming: an image counts as done when its record exists and its file is there, so a crash at any
point costs at most the group in flight. Sharding: process r of w takes items r, r+w, ...; every
process reads every records file, so the merged summary does not depend on how the work was split.
Seeds come from (seed, item id, prompt, sample), the same for every method and every split of work.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from .manifest import BenchItem

logger = logging.getLogger(__name__)

METRIC_COLUMNS = (
    ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino_i", "DINO-I"),
    ("clip_i_target", "CLIP-I (target)"), ("dino_i_target", "DINO-I (target)"),
)
SHEET_TILE = 192


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
    return [[Unit(item, p, s, unit_seed(seed, item.id, p, s)) for p in range(len(item.prompts)) for s in range(samples)]
            for item in items]


def shard(groups: Sequence, rank: int, world: int) -> list:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(groups[rank::world])


# ---------------------------------------------------------------------- records
def read_records(out: Path) -> dict[str, dict]:
    """Every finished image's record from every process's file; a torn last line is ignored."""
    records = {}
    for path in sorted(out.glob("records-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: its image is simply made again
            if (out / record["image"]).is_file():
                records[record["key"]] = record
    return records


def append_record(path: Path, record: dict) -> None:
    with open(path, "a+b") as f:
        # after a crash mid-line, start a fresh line, or this record would be glued to the torn one
        if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def save_image(image: Image.Image, path: Path) -> None:
    """Written beside and renamed, so a crash never leaves a half-written PNG that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def start_run(out: Path, header: dict, main_process: bool = True) -> None:
    """Write `run.json`, or check that the existing one describes the same run."""
    path = out / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in header if saved.get(k) != header[k])
        if changed:
            raise RunError(f"{out} holds a run with different {', '.join(changed)}; use another --out to start afresh")
        return
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".run.json.tmp")
        tmp.write_text(json.dumps(header, indent=1))
        os.replace(tmp, path)


# ---------------------------------------------------------------------- generation and scoring
def run_bench(items: Sequence[BenchItem], method, settings, out: Path, samples: int = 1, scorer=None,
              rank: int = 0, world: int = 1, progress: bool = True, sheets: bool = True) -> int:
    """Make (and score, when `scorer` is given) this process's share of the images; returns how many it made."""
    from tqdm.auto import tqdm

    from ..train.data import load_image

    out = Path(out)
    done = read_records(out)
    mine = [units for units in shard(plan(items, samples, settings.seed), rank, world)
            if any(u.key not in done for u in units)]
    records_file = out / f"records-r{rank}w{world}.jsonl"
    made = 0
    for units in tqdm(mine, desc=f"bench {rank}/{world}", unit="group", disable=not progress):
        item = units[0].item
        todo = [u for u in units if u.key not in done]
        references = [load_image(p) for p in item.references]
        images = method.generate(references, [u.prompt for u in todo], [u.seed for u in todo], settings)
        for unit, image in zip(todo, images):
            save_image(image, out / unit.image)
            record = base_record(unit, getattr(method, "name", "?"))
            if scorer is not None:
                record.update(score_unit(scorer, unit, image))
            append_record(records_file, record)
            made += 1
        if sheets:
            write_sheet(out, item, references)
    return made


def base_record(unit: Unit, method: str) -> dict:
    item = unit.item
    return {"key": unit.key, "item": item.id, "split": item.split, "domain": item.domain, "method": method,
            "prompt_index": unit.prompt_index, "prompt": unit.prompt, "sample": unit.sample, "seed": unit.seed,
            "image": unit.image}


def score_unit(scorer, unit: Unit, image: Image.Image) -> dict:
    """CLIP-I / DINO-I to the references (and target), CLIP-T to the prompt."""
    references = scorer.embed_image_files(unit.item.references)
    target = scorer.embed_image_files([unit.item.target]) if unit.item.target else None
    return scorer.score_embedded(image, references, unit.prompt, target)


def score_folder(items: Sequence[BenchItem], images: Path, out: Path, scorer, method: str = "external",
                 rank: int = 0, world: int = 1, progress: bool = True) -> int:
    """Score images made elsewhere, laid out as `images/<item>/p<prompt>-s<sample>.png` (as `run` writes them)."""
    from tqdm.auto import tqdm

    from ..train.data import load_image

    images, out = Path(images), Path(out)
    found = discover_images(items, images)
    done = read_records(out)
    records_file = out / f"records-r{rank}w{world}.jsonl"
    mine = [u for u in shard(found, rank, world) if u.key not in done]
    for unit in tqdm(mine, desc=f"score {rank}/{world}", unit="image", disable=not progress):
        source = images / Path(unit.image).relative_to("images")
        image = load_image(source)
        # the record points at a copy inside the run folder, so the run is self-contained and resumable
        save_image(image, out / unit.image)
        record = base_record(unit, method)
        record.update(score_unit(scorer, unit, image))
        append_record(records_file, record)
    return len(mine)


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
        logger.warning("%d images are not named p<prompt>-s<sample>.png for a prompt of their item and were "
                       "skipped, e.g. %s", len(unknown), unknown[0])
    if not units:
        raise RunError(f"no images named <item>/p<prompt>-s<sample>.png for this manifest under {images}")
    return units


# ---------------------------------------------------------------------- sheets and summaries
def write_sheet(out: Path, item: BenchItem, references: Sequence[Image.Image]) -> None:
    """References on the first row, the item's images below (one row per prompt)."""
    made = sorted((out / "images" / safe_name(item.id)).glob("p*-s*.png"))
    rows = [list(references)]
    for p in range(len(item.prompts)):
        rows.append([Image.open(f) for f in made if f.name.startswith(f"p{p:02d}-")])
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (columns * SHEET_TILE, len(rows) * SHEET_TILE), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            tile = image.convert("RGB")
            tile.thumbnail((SHEET_TILE, SHEET_TILE))
            sheet.paste(tile, (x * SHEET_TILE, y * SHEET_TILE))
    save_image(sheet, out / "sheets" / f"{safe_name(item.id)}.png")


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
        writer.writerow([r["method"], r["split"], r["groups"], r["images"],
                         *(repr(r[k]) if k in r else "" for k, _ in metrics)])
    return "\n".join(lines) + "\n", buffer.getvalue()


def write_summary(out: Path) -> list[dict]:
    """Merge every process's records into summary.{md,csv,json}."""
    out = Path(out)
    records = read_records(out)
    rows = summarize(records.values())
    markdown, table = summary_tables(rows)
    for name, text in (("summary.md", markdown), ("summary.csv", table),
                       ("summary.json", json.dumps({"rows": rows, "images": len(records)}, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if any(math.isnan(v) for r in rows for v in r.values() if isinstance(v, float)):
        logger.warning("some metrics are NaN (an image or prompt the models could not embed?)")
    return rows


def settings_header(method, settings, manifest: Path, samples: int) -> dict:
    # the device differs between the processes of one sharded run, and may change on resume
    described = {k: v for k, v in method.describe().items() if k != "device"}
    return {"method": described, "settings": asdict(settings), "manifest": str(Path(manifest).resolve()),
            "samples": samples}
