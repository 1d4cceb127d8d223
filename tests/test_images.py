"""The one image reader: headers agree with what the decoder returns."""

from __future__ import annotations

import pytest
from PIL import Image

from easyref.images import ImageFileError, open_image, read_header


@pytest.mark.parametrize("orientation, upright", [(1, (20, 10)), (6, (10, 20)), (8, (10, 20)), (None, (20, 10))])
def test_header_sizes_match_the_decoded_image(tmp_path, orientation, upright):
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.new("RGB", (20, 10), "red").save(path, exif=exif)
    header = read_header(path, orientation=True)
    assert header.size == (20, 10) and header.format == "JPEG"
    assert header.upright_size == upright == open_image(path).size


def test_headers_are_read_from_regular_files_only(tmp_path):
    with pytest.raises(ImageFileError, match="is a folder"):
        read_header(tmp_path)
