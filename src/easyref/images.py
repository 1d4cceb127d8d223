"""Image files -> the upright RGB pictures every part of easyref sees; PNGs and contact sheets written from them.

One decoding rule everywhere, so a reference means the same pixels to the CLI, the trainer and the
benchmark:
- only regular files are opened (a FIFO or device would block or stream forever);
- the decoded size is bounded from the header before any pixel is decoded (`limits.MAX_IMAGE_PIXELS`
  each, `limits.MAX_GROUP_PIXELS` for a group read by `open_images`): a 10 kB file can declare gigabytes,
  and an icon or container can declare a small size and embed a large image (see `_check_embedded`);
- the file is decoded in full, so a truncated file fails here and not halfway through a run;
- the EXIF orientation is applied (phones store portraits sideways);
- 16-bit and float greyscale are scaled to 8 bits (PIL's own conversion clips them to white);
- transparency is composited on white, as the release's Qwen2-VL preprocessing did.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import (
    IcnsImagePlugin,
    IcoImagePlugin,
    Image,
    ImageOps,
    Jpeg2KImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
)

from . import limits
from .safe_io import current_umask

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageFileError(ValueError):
    """An image file that cannot be used; the message is one line and names the file."""


def open_regular(path: str | Path):
    """A binary file object for `path`, refusing anything that is not a regular file without blocking."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path} is a folder, not an image file") from None
    except OSError as err:
        raise ImageFileError(f"{path}: cannot open ({err.strerror or err})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ImageFileError(f"{path} is a folder, not an image file")
        raise ImageFileError(f"{path} is not a regular file (a pipe, device or socket)")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


_ORIENTATION_TAG = 0x0112  # EXIF
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # turned by 90 degrees: width and height swap


@dataclass(frozen=True)
class ImageHeader:
    size: tuple[int, int]  # (width, height) as stored
    format: str | None
    orientation: int | None  # EXIF orientation, when asked for

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) once the EXIF turn is applied, as `open_image` returns the pixels."""
        width, height = self.size
        return (height, width) if self.orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def read_header(path: str | Path, orientation: bool = False) -> ImageHeader:
    """Size and format (and EXIF orientation) from the header alone: PIL opens lazily, so no pixels are
    decoded. Regular files only, like every read here."""
    with open_regular(path) as handle, _lazy_open(handle, str(path), strict=False) as image:
        turn = image.getexif().get(_ORIENTATION_TAG) if orientation else None
        return ImageHeader(image.size, image.format, turn)


def open_image(path: str | Path, name: str | None = None) -> Image.Image:
    """Decode an image file completely -> upright RGB (see the module docstring for the rule).

    ImageFileError (one line, naming the file as `name`, else its path) for a file over
    `limits.MAX_IMAGE_PIXELS`, refused before decoding, and for every other way it is unusable."""
    label = str(path) if name is None else name
    with _opened(path, label) as image:
        check_image_pixels(image.size, label)
        decoded = _decode(image, label)
    return _finish(decoded, label)


def open_images(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Image.Image]:
    """A group of references, decoded as `open_image` does, once every header is within the bounds.

    `names`: what to call each file in messages (e.g. the user's own file names of uploads stored under
    temporary paths); the paths by default. ImageFileError (one line) for the first unusable file, or
    for a group over `limits.MAX_GROUP_PIXELS`, raised before any of the group is decoded."""
    labels = _labels(paths, names)
    check_group(paths, labels)
    images: list[Image.Image] = []
    total = 0
    for path, label in zip(paths, labels):
        with _opened(path, label, "references") as image:
            # checked again on this opening: a file replaced since its header was read is still bounded
            check_image_pixels(image.size, label, "references")
            total += _pixels(image.size)
            _check_group_total(len(labels), total)
            decoded = _decode(image, label, "references")
        total += _pixels(decoded.size) - _pixels(image.size)
        _check_group_total(len(labels), total)
        images.append(_finish(decoded, label))
    return images


def check_group(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[ImageHeader]:
    """Every header of a group read and checked against both bounds; not one pixel is decoded.
    ImageFileError (one line) for the first unreadable or oversized file, or for the group's total."""
    labels = _labels(paths, names)
    headers = []
    for path, label in zip(paths, labels):
        with _opened(path, label, "references") as image:
            check_image_pixels(image.size, label, "references")
            headers.append(ImageHeader(image.size, image.format, None))
    _check_group_total(len(labels), sum(_pixels(h.size) for h in headers))
    return headers


def check_image_pixels(size: tuple[int, int], name: str, what: str = "images") -> None:
    """ImageFileError unless an image of `size` (width, height) is within `limits.MAX_IMAGE_PIXELS`."""
    width, height = size
    if width * height > limits.MAX_IMAGE_PIXELS:
        raise ImageFileError(
            f"{name} is {width} x {height} = {_count(width * height)}; "
            f"{what} may be at most {_count(limits.MAX_IMAGE_PIXELS)} each"
        )


def _check_group_total(count: int, total: int) -> None:
    if total > limits.MAX_GROUP_PIXELS:
        raise ImageFileError(
            f"the {count} references hold {_count(total)} in all; "
            f"one group of references may hold at most {_count(limits.MAX_GROUP_PIXELS)}"
        )


def _pixels(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _count(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} M pixels" if pixels >= 100_000 else f"{pixels} pixels"


def _labels(paths: Sequence[str | Path], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [str(p) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names given for {len(paths)} paths")
    return [str(n) for n in names]


# PIL's many exception types for a file it cannot parse; all of them mean "this file is unusable".
_PARSE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


@contextmanager
def _opened(path: str | Path, label: str, what: str = "images") -> Iterator[Image.Image]:
    """The lazily opened image (header parsed, no pixels): every failure an ImageFileError naming `label`;
    `what` the images are called in a refusal of an embedded image over the bound."""
    try:
        handle = open_regular(path)
    except ImageFileError as err:
        raise ImageFileError(str(err).replace(str(path), label, 1)) from None
    with handle, _lazy_open(handle, label, strict=True, what=what) as image:
        yield image


@contextmanager
def _lazy_open(handle, label: str, strict: bool, what: str = "images") -> Iterator[Image.Image]:
    """`Image.open` without PIL's own bomb warning: the header checks here are stricter and name the size.
    `strict`: PIL's parse errors become ImageFileError (read_header lets them through, as callers expect).
    Embedded images that decode to another size than the header declares are checked here, before PIL
    decodes them (ImageFileError, whatever `strict`)."""
    _check_icon_frames(handle, label, what)  # before `Image.open`: PIL decodes an icon as it opens it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
    except Image.DecompressionBombError:
        # PIL refuses past twice its own bound before the size can be read
        raise ImageFileError(
            f"{label} is over {_count(2 * (Image.MAX_IMAGE_PIXELS or 0))}; "
            f"images may be at most {_count(limits.MAX_IMAGE_PIXELS)} each"
        ) from None
    except UnidentifiedImageError:
        if not strict:
            raise
        raise ImageFileError(f"{label} is not an image PIL can read") from None
    except MemoryError:
        raise ImageFileError(f"{label} could not be read within this machine's memory") from None
    except _PARSE_ERRORS as err:
        if not strict:
            raise
        raise ImageFileError(f"{label} is damaged or truncated ({_one_line(err)})") from None
    with image:
        _check_embedded(image, label, what)
        yield image


@contextmanager
def _reading(label: str) -> Iterator[None]:
    """PIL reading pixels: each way it fails becomes an ImageFileError naming `label`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageFileError(
            f"{label} is too large (decompression bomb guard: more than {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except MemoryError:
        raise ImageFileError(f"{label} could not be decoded within this machine's memory") from None
    except _PARSE_ERRORS as err:
        raise ImageFileError(f"{label} is damaged or truncated ({_one_line(err)})") from None


# ---------------------------------------------------------------------------- embedded images
# Formats whose pixels PIL decodes at another size than `image.size` reports from the header (checked
# against Pillow 12.3's plugins): an ICO's directory declares each frame's size, but the frame (a PNG or
# a BMP) decodes at its own; ICNS and IPTC/NAA files and BLP1 textures embed a PNG, JPEG 2000 or JPEG
# with a size of its own; a masked CUR decodes its XOR and AND bitmaps as one image twice as tall. Each
# real size is read from the embedded image's own header; nothing is decoded. What cannot be parsed is
# left to PIL, which fails on it the same way before decoding, except an IPTC image that is not a JPEG.
_ICO_MAGIC = b"\0\0\1\0"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DIB_HEADER_SIZES = (40, 52, 56, 64, 108, 124)  # BmpImagePlugin's; 12 is the OS/2 core header
_BLP1_JPEG = 0  # BlpImagePlugin.Format.JPEG
_ICNS_EMBEDDED = frozenset(  # the ICNS resources that hold a PNG or a JPEG 2000 of any size
    code
    for readers in IcnsImagePlugin.IcnsFile.SIZES.values()
    for code, reader in readers
    if reader is IcnsImagePlugin.read_png_or_jpeg2000
)
_EMBEDDED_PARSE_ERRORS = (*_PARSE_ERRORS, IndexError, TypeError, KeyError)


def _check_icon_frames(handle, label: str, what: str) -> None:
    """An ICO: every frame of its directory within the bound at the size the frame itself declares.

    Called before `Image.open`, which decodes the largest frame at once. Every frame, not only the one
    PIL picks: a caller may ask for another (`image.size = ...`), and a directory can lie about which
    is largest. The handle is left where it was."""
    start = handle.tell()
    try:
        if handle.read(len(_ICO_MAGIC)) != _ICO_MAGIC:
            return
        handle.seek(start)
        try:
            icons = IcoImagePlugin.IcoFile(handle)
            sizes = [_icon_frame_size(handle, entry.offset) for entry in icons.entry]
        except _EMBEDDED_PARSE_ERRORS:
            return  # PIL's own parse of the directory fails the same way, before any frame is decoded
    finally:
        handle.seek(start)
    _check_largest(sizes, label, what)


def _icon_frame_size(handle, offset: int) -> tuple[int, int] | None:
    """(width, height) an ICO frame at `offset` decodes to, from its own header; None if PIL cannot read it."""
    handle.seek(offset)  # from the file's start, as IcoFile.frame seeks
    head = handle.read(24)
    if head.startswith(_PNG_MAGIC):
        return _png_size(head)
    if len(head) < 12:
        return None
    header_size = int.from_bytes(head[:4], "little")
    if header_size == 12:
        width, height = struct.unpack("<HH", head[4:8])
    elif header_size in _DIB_HEADER_SIZES:
        width, height = struct.unpack("<II", head[4:12])
        if head[11] == 0xFF:  # a top-down bitmap's negative height, read as BmpImagePlugin does
            height = 2**32 - height
    else:
        return None
    return width, height // 2  # the XOR image: PIL halves the height, which counts the AND mask too


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR: the big-endian uint32s at bytes 16..24."""
    if len(head) < 24 or not head.startswith(_PNG_MAGIC):
        return None
    return struct.unpack(">II", head[16:24])


def _check_embedded(image: Image.Image, label: str, what: str) -> None:
    """The real size of an image embedded in a lazily opened ICNS, IPTC or BLP1 file (or a masked CUR's
    whole bitmap) within the bound, read from its own header before PIL decodes it."""
    handle = image.fp
    if image.format not in ("ICNS", "IPTC", "BLP", "CUR") or handle is None:
        return
    start = handle.tell()
    try:
        if image.format == "ICNS":
            sizes = [_icns_size(handle, *image.icns.dct[code]) for code in _ICNS_EMBEDDED & image.icns.dct.keys()]
        elif image.format == "IPTC" and image.tile and image.tile[0].args[0] == "jpeg":
            sizes = [_iptc_size(image, label)]
        elif image.format == "BLP" and image.tile and image.tile[0].codec_name == "BLP1":
            sizes = [_blp1_size(handle, image.tile[0].offset)] if image.tile[0].args[0] == _BLP1_JPEG else []
        elif image.format == "CUR" and image.mode == "LA":
            sizes = [(image.width, 2 * image.height)]  # decoded as one "1" or "L" image, then split
        else:
            return
    except ImageFileError:
        raise  # a ValueError too
    except _EMBEDDED_PARSE_ERRORS:
        return  # PIL reads these headers the same way, and fails the same way before decoding
    finally:
        handle.seek(start)
    _check_largest(sizes, label, what)


def _icns_size(handle, start: int, length: int) -> tuple[int, int] | None:
    """The PNG or JPEG 2000 in the ICNS resource at `start`, read as `read_png_or_jpeg2000` reads it."""
    handle.seek(start)
    head = handle.read(24)
    if head.startswith(_PNG_MAGIC):
        return _png_size(head)
    handle.seek(start)  # JPEG 2000 (or not an image, which PIL refuses): PIL parses the whole resource
    with Jpeg2KImagePlugin.Jpeg2KImageFile(BytesIO(_read_up_to(handle, length))) as embedded:
        return embedded.size


def _iptc_size(image, label: str) -> tuple[int, int]:
    """The embedded image of an IPTC/NAA file, gathered from its (8, 10) records as the plugin's `load`
    does (PIL then opens it as any format, so anything but a JPEG is refused here)."""
    image.fp.seek(image.tile[0].offset)
    data = BytesIO()
    while True:
        tag, size = image.field()
        if tag != (8, 10):
            break
        data.write(_read_up_to(image.fp, size))
    data.seek(0)
    try:
        with JpegImagePlugin.JpegImageFile(data) as embedded:
            return embedded.size
    except _EMBEDDED_PARSE_ERRORS:
        raise ImageFileError(f"{label} is an IPTC/NAA file whose embedded image is not a JPEG") from None


def _blp1_size(handle, offset: int) -> tuple[int, int] | None:
    """The JPEG of a BLP1 texture, read as BlpImagePlugin's decoder reads it: the mipmap offsets and
    lengths, a shared JPEG header, then the first mipmap's data."""
    handle.seek(offset)
    table = handle.read(16 * 4 * 2)
    length_of_header = handle.read(4)
    if len(table) < 128 or len(length_of_header) < 4:
        return None
    first_offset, first_length = struct.unpack_from("<I", table, 0)[0], struct.unpack_from("<I", table, 64)[0]
    jpeg = _read_up_to(handle, int.from_bytes(length_of_header, "little"))
    if first_offset > handle.tell():
        handle.seek(first_offset)
    jpeg += _read_up_to(handle, first_length)
    with JpegImagePlugin.JpegImageFile(BytesIO(jpeg)) as embedded:
        return embedded.size


def _read_up_to(handle, size: int) -> bytes:
    """At most `size` bytes, read in pieces: a size field can claim gigabytes the file does not hold."""
    pieces = []
    while size > 0:
        piece = handle.read(min(size, 1 << 20))
        if not piece:
            break
        pieces.append(piece)
        size -= len(piece)
    return b"".join(pieces)


def _check_largest(sizes, label: str, what: str) -> None:
    known = [size for size in sizes if size is not None]
    if known:
        check_image_pixels(max(known, key=_pixels), label, what)


def _decode(image: Image.Image, label: str, what: str = "images") -> Image.Image:
    """All pixels of a lazily opened image, detached from its file."""
    with _reading(label):
        image.load()
        decoded = image.copy()
    # a few formats (an icon's embedded PNG, say) decode to another size than their header declares
    check_image_pixels(decoded.size, label, what)
    return decoded


def _finish(image: Image.Image, label: str) -> Image.Image:
    """Upright RGB from a freshly decoded image this module owns, without copies that are not needed."""
    try:
        image = _upright_in_place(image)
        if image.mode == "RGB" and "transparency" not in image.info:
            return image
        return to_rgb(image)
    except MemoryError:
        raise ImageFileError(f"{label} could not be decoded within this machine's memory") from None
    except _PARSE_ERRORS as err:
        raise ImageFileError(f"{label} cannot be converted to RGB ({_one_line(err)})") from None


def _upright_in_place(image: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to turn
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        pass  # a broken EXIF block: keep the pixels as stored, as `upright` does
    return image


def verify_image(path: str | Path) -> None:
    """Cheap check that a file is a complete, readable image within the pixel bound (header + PIL's
    verify, no full decode)."""
    path = Path(path)
    with _opened(path, str(path)) as image, _reading(str(path)):
        check_image_pixels(image.size, str(path))
        image.verify()


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (a no-op for images without one, and for already-upright ones)."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return image  # a broken EXIF block: keep the pixels as stored


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16-bit and float data scaled to 8 bits, transparency composited on white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _high_depth_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # alpha_composite leaves it as it is
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # 16-bit containers hold 0..65535; an "I" image whose values all fit 8 bits is taken as 8-bit data,
    # and float ("F") images are taken as 0..255 (PIL's convention for them).
    import numpy as np  # here, not at the top: the CLI checks references before any heavy import

    # float32, worked in place: one 4-byte copy of a large image rather than several 8-byte ones. It is
    # exact enough: 0..65535 are exact in float32, and no k / 257 lies within float32's error of a .5 tie.
    values = np.array(image, dtype=np.float32)
    np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.size and values.max() > 255):
        np.divide(values, 257.0, out=values)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------- writing
def save_png(image: Image.Image, path: Path, params: dict) -> None:
    """A PNG with `params` as its `easyref` text chunk, written under a temporary name and renamed."""
    tmp = stage_png(image, path, params)
    try:
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def stage_png(image: Image.Image, path: Path, params: dict) -> str:
    """Write a PNG with its settings as text metadata to a unique temporary name beside `path`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("easyref", json.dumps(params, sort_keys=True, default=str))  # default: a Path in `sources`
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get ordinary permissions
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def contact_sheet(references, outputs, cell: int | None = None) -> Image.Image:
    """References in the top row, generated images in the bottom row, all as square cells."""
    return grid_sheet([references, outputs], cell or max(im.width for im in outputs))


def grid_sheet(rows, cell: int) -> Image.Image:
    """Rows of images as square cells of `cell` px, each image shrunk to fit and centred in its cell."""
    cols = max(len(row) for row in rows)
    sheet = Image.new("RGB", (cols * cell, len(rows) * cell), "white")
    for y, images in enumerate(rows):
        for x, image in enumerate(images):
            thumb = to_rgb(image)
            thumb.thumbnail((cell, cell))
            sheet.paste(thumb, (x * cell + (cell - thumb.width) // 2, y * cell + (cell - thumb.height) // 2))
    return sheet
