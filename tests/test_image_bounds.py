"""Pixel bombs: a file of a few kB declaring 9000 x 9000 pixels is refused from its header, alone and in
groups, by every reader (`open_image`, `open_images`, `generate`, training, the bench), before decoding."""

from __future__ import annotations

import io
import os
import resource
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BOMB_SIDE, bomb_png
from PIL import Image, ImageFile, features

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


# ---------------------------------------------------------------------- embedded images
# Icons and a few containers declare one size and embed an image of another: each is refused from the
# embedded image's own header, before PIL decodes it.
BOMB_MESSAGE = "is 9000 x 9000 = 81.0 M pixels; images may be at most 50.0 M pixels each"


def _ico(frame: bytes, magic: bytes = b"\0\0\1\0") -> bytes:
    """One frame behind a directory entry that declares 256 x 256 (0 = 256), 32 bits."""
    return magic + struct.pack("<H", 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(frame), 22) + frame


def _icns(code: bytes, resource: bytes) -> bytes:
    return b"icns" + struct.pack(">I", 16 + len(resource)) + code + struct.pack(">I", 8 + len(resource)) + resource


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare `width` x `height`."""
    out = io.BytesIO()
    Image.new("L", (8, 8), 128).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _iptc(jpeg: bytes, width: int = 16, height: int = 16) -> bytes:
    """An IPTC/NAA image: 1 band, JPEG-compressed (3,120 = 5), declaring `width` x `height`."""

    def field(record: int, dataset: int, data: bytes) -> bytes:
        return bytes([0x1C, record, dataset]) + struct.pack(">H", len(data)) + data

    return (
        field(3, 60, bytes([1, 0]))
        + field(3, 20, struct.pack(">H", width))
        + field(3, 30, struct.pack(">H", height))
        + field(3, 120, bytes([5]))
        + field(8, 10, jpeg)
    )


def _blp1(jpeg: bytes, width: int = 16, height: int = 16) -> bytes:
    """A BLP1 texture (JPEG compression) declaring `width` x `height`: the JPEG split into the shared
    header and the first mipmap, as the format stores it."""
    split = 20
    header, mipmap = jpeg[:split], jpeg[split:]
    offsets = [28 + 128 + 4 + len(header)] + [0] * 15
    lengths = [len(mipmap)] + [0] * 15
    return (
        b"BLP1"
        + struct.pack("<iIIIiI", 0, 0, width, height, 5, 0)
        + struct.pack("<16I", *offsets)
        + struct.pack("<16I", *lengths)
        + struct.pack("<I", len(header))
        + header
        + mipmap
    )


@pytest.fixture
def embedded_bombs(tmp_path, bomb_bytes) -> dict[str, Path]:
    """Each declares at most 256 x 256 and embeds a 9000 x 9000 image."""
    files = {
        "bomb.ico": _ico(bomb_bytes),
        "bomb.icns": _icns(b"ic07", bomb_bytes),  # ic07: a 128 x 128 slot
        "bomb.iim": _iptc(_jpeg_declaring(BOMB_SIDE, BOMB_SIDE)),
        "bomb.blp": _blp1(_jpeg_declaring(BOMB_SIDE, BOMB_SIDE)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_the_embedded_bombs_are_small_and_declare_small_sizes(embedded_bombs):
    assert all(path.stat().st_size < 20_000 for path in embedded_bombs.values())
    declared = {"bomb.icns": (128, 128), "bomb.iim": (16, 16), "bomb.blp": (16, 16)}
    for name, size in declared.items():  # not the ICO: PIL decodes its largest frame as it opens it
        with Image.open(embedded_bombs[name]) as image:
            assert (image.format, image.size) == ({"icns": "ICNS", "iim": "IPTC", "blp": "BLP"}[name[5:]], size)


@pytest.mark.parametrize("name", ["bomb.ico", "bomb.icns", "bomb.iim", "bomb.blp"])
def test_an_image_embedded_larger_than_declared_is_refused_before_decoding(embedded_bombs, name, no_decoding):
    path = embedded_bombs[name]
    with pytest.raises(ImageFileError) as caught:
        open_image(path)
    assert str(caught.value) == f"{path} {BOMB_MESSAGE}"
    with pytest.raises(ImageFileError, match=f"^{name} is 9000 x 9000 = 81.0 M pixels; references may be at most"):
        open_images([path], names=[name])
    with pytest.raises(ImageFileError, match="is 9000 x 9000"):
        check_group([path])
    with pytest.raises(ImageFileError, match="is 9000 x 9000"):
        verify_image(path)
    with pytest.raises(ImageFileError, match="is 9000 x 9000"):
        read_header(path)


def test_an_icns_jpeg_2000_larger_than_declared_is_refused(tmp_path, no_decoding):
    if not features.check_codec("jpg_2000"):
        pytest.skip("PIL built without JPEG 2000")
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, format="JPEG2000")
    jp2 = bytearray(out.getvalue())
    ihdr = jp2.index(b"ihdr")  # the JP2 header box PIL reads the size from: height, then width
    jp2[ihdr + 4 : ihdr + 12] = struct.pack(">II", BOMB_SIDE, BOMB_SIDE)
    (tmp_path / "jp2.icns").write_bytes(_icns(b"ic08", bytes(jp2)))
    with pytest.raises(ImageFileError, match=BOMB_MESSAGE):
        open_image(tmp_path / "jp2.icns")


def test_every_icon_frame_counts_and_bmp_frames_are_read_too(tmp_path, bomb_bytes, no_decoding):
    # a second, small frame listed first does not hide the bomb
    small = io.BytesIO()
    Image.new("RGB", (16, 16)).save(small, format="PNG")
    frames = [small.getvalue(), bomb_bytes]
    directory = struct.pack("<HHH", 0, 1, 2)
    offset = 6 + 2 * 16
    for side, frame in zip((16, 0), frames):
        directory += struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(frame), offset)
        offset += len(frame)
    (tmp_path / "two.ico").write_bytes(directory + b"".join(frames))
    with pytest.raises(ImageFileError, match=BOMB_MESSAGE):
        open_image(tmp_path / "two.ico")
    # a BMP frame: BITMAPINFOHEADER of 9000 x 18000 (the XOR image above the AND mask), 1 bit deep
    dib = struct.pack("<IiiHHIIiiII", 40, BOMB_SIDE, 2 * BOMB_SIDE, 1, 1, 0, 0, 0, 0, 0, 0) + bytes(8)
    (tmp_path / "bmp.ico").write_bytes(_ico(dib))
    with pytest.raises(ImageFileError, match=BOMB_MESSAGE):
        open_image(tmp_path / "bmp.ico")


def test_a_masked_cursor_counts_its_whole_bitmap(tmp_path, small_bounds):
    # 100 x 80 shown, decoded as one 100 x 160 1-bit bitmap (XOR and AND masks)
    width, height = 100, 80
    row = (width + 31) // 32 * 4
    dib = struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 1, 0, 0, 0, 0, 2, 0) + bytes(4) + b"\xff\xff\xff\0"
    dib += bytes(row * 2 * height)
    entry = struct.pack("<BBBBHHII", width, height, 2, 0, 0, 0, len(dib), 22)
    (tmp_path / "big.cur").write_bytes(b"\0\0\2\0" + struct.pack("<H", 1) + entry + dib)
    with pytest.raises(ImageFileError, match=r"big\.cur is 100 x 160 = 16000 pixels; images may be at most 10000"):
        open_image(tmp_path / "big.cur")


def test_ordinary_icons_and_embedded_images_still_open(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "small.ico", format="ICO")
    Image.new("RGBA", (48, 48), "red").save(tmp_path / "bmp.ico", format="ICO", bitmap_format="bmp")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "small.icns")
    small_jpeg = io.BytesIO()
    Image.new("L", (16, 16), 200).save(small_jpeg, format="JPEG")
    (tmp_path / "small.iim").write_bytes(_iptc(small_jpeg.getvalue()))
    (tmp_path / "small.blp").write_bytes(_blp1(small_jpeg.getvalue()))
    expected = {"small.ico": (32, 32), "bmp.ico": (48, 48), "small.icns": (1024, 1024)}
    expected |= {"small.iim": (16, 16), "small.blp": (16, 16)}
    for name, size in expected.items():
        image = open_image(tmp_path / name)
        assert image.size == size and image.mode == "RGB", name
        verify_image(tmp_path / name)
    assert [im.size for im in open_images([tmp_path / n for n in expected])] == list(expected.values())


def test_an_iptc_image_that_is_not_a_jpeg_is_refused(tmp_path, bomb_bytes, no_decoding):
    (tmp_path / "png.iim").write_bytes(_iptc(bomb_bytes))
    with pytest.raises(ImageFileError, match=r"png\.iim is an IPTC/NAA file whose embedded image is not a JPEG"):
        open_image(tmp_path / "png.iim")


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
