"""Image files -> the upright RGB pictures every part of easyref sees; PNGs and contact sheets written from them.

One decoding rule everywhere, so a reference means the same pixels to the CLI, the trainer and the
benchmark:
- only regular files are opened (a FIFO or device would block or stream forever);
- the file is decoded in full, so a truncated file fails here and not halfway through a run;
- the EXIF orientation is applied (phones store portraits sideways);
- 16-bit and float greyscale are scaled to 8 bits (PIL's own conversion clips them to white);
- transparency is composited on white, as the release's Qwen2-VL preprocessing did.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

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
    with open_regular(path) as handle, Image.open(handle) as image:
        turn = image.getexif().get(_ORIENTATION_TAG) if orientation else None
        return ImageHeader(image.size, image.format, turn)


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file completely -> upright RGB (see the module docstring for the rule)."""
    path = Path(path)
    with open_regular(path) as handle:
        image = _decode(handle, path)
    return to_rgb(upright(image))


def _decode(handle, path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageFileError(
            f"{path} is too large (decompression bomb guard: more than {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{path} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageFileError(f"{path} is damaged or truncated ({_one_line(err)})") from None


def verify_image(path: str | Path) -> None:
    """Cheap check that a file is a complete, readable image (header + PIL's verify, no full decode)."""
    path = Path(path)
    with open_regular(path) as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    image.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageFileError(f"{path} is too large (decompression bomb guard)") from None
        except UnidentifiedImageError:
            raise ImageFileError(f"{path} is not an image PIL can read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageFileError(f"{path} is damaged or truncated ({_one_line(err)})") from None


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
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # 16-bit containers hold 0..65535; an "I" image whose values all fit 8 bits is taken as 8-bit data,
    # and float ("F") images are taken as 0..255 (PIL's convention for them).
    import numpy as np  # here, not at the top: the CLI checks references before any heavy import

    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.size and values.max() > 255):
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


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
