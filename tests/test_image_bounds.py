"""Pixel bombs: a file of a few kB declaring 9000 x 9000 pixels is refused from its header, alone and in
groups, by every reader (`open_image`, `open_images`, `generate`, training, the bench), before decoding."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BOMB_SIDE, bomb_png
from PIL import Image, ImageFile

from easyref import cli, limits
from easyref.images import ImageFileError, check_group, open_image, open_images, read_header, verify_image
from easyref.pipeline import EasyRefPipeline


@pytest.fixture(scope="module")
def bomb_bytes() -> bytes:
    return bomb_png()


@pytest.fixture
def bombs(tmp_path, bomb_bytes):
    """A folder of 24 bombs (~0.3 MB on disk, 1944 M pixels declared)."""
    folder = tmp_path / "bombs"
    folder.mkdir()
    for i in range(24):
        (folder / f"bomb_{i:02d}.png").write_bytes(bomb_bytes)
    return folder


@pytest.fixture
def no_decoding(monkeypatch):
    """Any decoding of a file fails the test: refusals must come from the header alone."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of {self!r} were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture
def small_bounds(monkeypatch):
    """Bounds small enough that real, tiny files cross them: 100 x 100 each, 3 x 100 x 100 a group."""
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(limits, "MAX_GROUP_PIXELS", 30_000)


def _pngs(folder: Path, sizes) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"img_{i}.png"
        Image.new("RGB", size, (10 * i, 0, 0)).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- the bounds themselves
def test_bounds_pass_real_photos_and_refuse_the_bomb():
    assert 8000 * 6000 <= limits.MAX_IMAGE_PIXELS < BOMB_SIDE * BOMB_SIDE  # a 48 MP phone photo passes
    assert limits.MAX_GROUP_PIXELS >= 4 * limits.MAX_IMAGE_PIXELS


def test_the_bomb_is_small_on_disk_and_what_it_declares(tmp_path, bomb_bytes):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_bytes)
    assert len(bomb_bytes) < 20_000
    assert read_header(path).size == (BOMB_SIDE, BOMB_SIDE)


# ---------------------------------------------------------------------- open_image / open_images
def test_open_image_refuses_a_bomb_from_its_header(tmp_path, bomb_bytes, no_decoding):
    path = tmp_path / "big.png"
    path.write_bytes(bomb_bytes)
    with pytest.raises(ImageFileError) as caught:
        open_image(path)
    message = str(caught.value)
    assert message == f"{path} is 9000 x 9000 = 81.0 M pixels; images may be at most 50.0 M pixels each"
    with pytest.raises(ImageFileError, match="may be at most 50.0 M pixels each"):
        verify_image(path)


def test_open_image_names_the_file_as_asked(tmp_path, bomb_bytes):
    path = tmp_path / "tmp8f3k2" / "upload.bin"
    path.parent.mkdir()
    path.write_bytes(bomb_bytes)
    with pytest.raises(ImageFileError, match=r"^holiday\.png is 9000 x 9000") as caught:
        open_image(path, name="holiday.png")
    assert str(path) not in str(caught.value)
    with pytest.raises(ImageFileError, match=r"^missing\.png: file not found$"):
        open_images([tmp_path / "nothing.png"], names=["missing.png"])


def test_a_bomb_past_pils_own_guard_is_refused_in_the_same_words(tmp_path):
    side = 20_000  # 400 M pixels: PIL itself refuses at open, before the size can be read
    path = tmp_path / "huge.png"
    path.write_bytes(bomb_png(side, side, rows=1))
    with pytest.raises(ImageFileError, match=r"huge\.png is over .* M pixels; images may be at most 50.0 M"):
        open_image(path)


def test_a_group_over_the_total_is_refused_before_any_decoding(tmp_path, small_bounds, no_decoding):
    paths = _pngs(tmp_path / "refs", [(100, 100), (100, 100), (100, 100), (50, 50)])  # each within bounds
    with pytest.raises(ImageFileError) as caught:
        open_images(paths)
    assert str(caught.value) == (
        "the 4 references hold 32500 pixels in all; one group of references may hold at most 30000 pixels"
    )
    with pytest.raises(ImageFileError, match="the 4 references hold"):
        check_group(paths)


def test_one_bomb_in_a_group_is_named_before_any_decoding(tmp_path, bomb_bytes, no_decoding):
    paths = _pngs(tmp_path / "refs", [(8, 8), (8, 8)])
    bomb = tmp_path / "refs" / "zz.png"
    bomb.write_bytes(bomb_bytes)
    with pytest.raises(ImageFileError, match=r"^cat\.png is 9000 x 9000 = 81\.0 M pixels; references may be"):
        open_images([*paths, bomb], names=["a.png", "b.png", "cat.png"])


def test_a_group_within_the_bounds_decodes_as_open_image_does(tmp_path, small_bounds):
    paths = _pngs(tmp_path / "refs", [(100, 100), (100, 50), (60, 100)])  # 26000 pixels: within 30000
    images = open_images(paths)
    assert [im.size for im in images] == [(100, 100), (100, 50), (60, 100)]
    for path, image in zip(paths, images):
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(open_image(path)))


def test_a_file_swapped_for_a_bomb_after_its_header_was_read_is_still_refused(tmp_path, bomb_bytes, monkeypatch):
    import easyref.images as images

    paths = _pngs(tmp_path / "refs", [(8, 8), (8, 8)])
    real_check = images.check_group

    def check_then_swap(*args, **kwargs):
        headers = real_check(*args, **kwargs)
        paths[1].write_bytes(bomb_bytes)
        return headers

    monkeypatch.setattr(images, "check_group", check_then_swap)
    with pytest.raises(ImageFileError, match="img_1.png is 9000 x 9000"):
        open_images(paths)


def test_memory_error_while_decoding_is_one_line(tmp_path, monkeypatch):
    [path] = _pngs(tmp_path / "refs", [(8, 8)])

    def out_of_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(ImageFileError, match=r"img_0\.png could not be decoded within this machine's memory$"):
        open_image(path)


def test_a_truncated_bomb_is_still_damaged_when_under_the_bound(tmp_path):
    whole = bomb_png(4000, 4000)  # 16 M pixels: within the bound, so it is decoded, and found truncated
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageFileError, match="is damaged or truncated"):
        open_image(path)


def test_the_exif_turn_does_not_change_the_count(tmp_path, small_bounds):
    image = Image.new("RGB", (200, 40), "blue")  # 8000 pixels either way up
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.jpg", exif=exif)
    assert open_image(tmp_path / "turned.jpg").size == (40, 200)


# ---------------------------------------------------------------------- easyref generate
def _generate(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["generate", "--prompt", "x", "--steps", "2", "--seed", "1", *argv])
    return code, capsys.readouterr().err.strip()


def _one_error_line(err: str, phrase: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("easyref: error:") and "Traceback" not in err, err
    assert phrase in lines[0], err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the references were refused")

    monkeypatch.setattr(EasyRefPipeline, "from_parts", refuse)
    monkeypatch.setattr(EasyRefPipeline, "from_pretrained", refuse)


def test_generate_refuses_a_folder_of_bombs_before_the_model_loads(bombs, tmp_path, capsys, no_model_load):
    code, err = _generate(capsys, "--refs-dir", str(bombs), "--out", str(tmp_path / "o.png"))
    assert code == 2
    _one_error_line(err, "bomb_00.png is 9000 x 9000 = 81.0 M pixels; references may be at most 50.0 M pixels each")
    assert not (tmp_path / "o.png").exists()


def test_generate_refuses_a_group_over_the_total_before_decoding(
    tmp_path, capsys, small_bounds, no_model_load, no_decoding
):
    refs = tmp_path / "refs"
    _pngs(refs, [(100, 100)] * 4)
    code, err = _generate(capsys, "--refs-dir", str(refs), "--out", str(tmp_path / "o.png"))
    assert code == 2
    _one_error_line(err, "the 4 references hold 40000 pixels in all; one group of references may hold at most")


def _address_space_cap(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def test_generate_with_24_bombs_stays_within_a_memory_cap(bombs, tmp_path):
    """Decoded, the 24 bombs would need ~8 GB: under a 3 GB cap the refusal must come from the headers."""
    script = textwrap.dedent(
        f"""
        import sys
        from easyref.cli import main
        out = {str(tmp_path / "o.png")!r}
        sys.exit(main(["generate", "--prompt", "x", "--refs-dir", {str(bombs)!r}, "--out", out]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=_address_space_cap(3 * 2**30),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    _one_error_line(proc.stderr.strip().splitlines()[-1], "references may be at most 50.0 M pixels each")
