"""Image files and compressed bytes in, as arrays: only the formats the package reads, sizes checked first.

Every image the package opens goes through :func:`open_image`. PIL is told which formats it may
try (:data:`READ_FORMATS`; compressed ROS images only :data:`COMPRESSED_FORMATS`), so a file that
claims another format (EPS, which PIL hands to Ghostscript; PSD; ICO; ...) is refused instead of
decoded. The size comes from the header and is checked before a pixel is decoded. A colour image
must be 8 bits per channel: a 16-bit or float image is refused, not silently cut to 8 bits.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import MAX_IMAGE_SIDE

#: The file formats the package reads (PIL's names): colour images, 16-bit depth PNGs, object masks.
READ_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "TIFF", "WEBP")
#: What a ``sensor_msgs/CompressedImage`` may carry (image_transport's compressed formats).
COMPRESSED_FORMATS = ("JPEG", "PNG")
#: PIL modes with 8 bits per channel: the colour images the model takes.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


@contextmanager
def open_image(source: Path | bytes, what: str, formats: tuple[str, ...] = READ_FORMATS) -> Iterator[object]:
    """The PIL image of a file (``source`` a path) or of bytes, opened lazily: only its header is read.

    ``what`` names it in errors. InputError (one line) when it is missing, not one of ``formats``, corrupt,
    or larger than :data:`~depthvlm_ros.geometry.MAX_IMAGE_SIDE` on a side.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(handle, formats=list(formats)) as img:
            width, height = img.size
            if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
                raise InputError(f"{what}: size {width}x{height} outside 1..{MAX_IMAGE_SIDE} pixels")
            yield img
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{what}: no such image") from None
    except UnidentifiedImageError:
        raise InputError(f"{what}: cannot read image (not in a format this package reads: "
                         f"{', '.join(formats)})") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise InputError(f"{what}: cannot read image ({exc.__class__.__name__})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) pixels of an image file, from its header."""
    with open_image(path, str(path)) as img:
        return img.size


def read_rgb(source: Path | bytes, what: str, formats: tuple[str, ...] = READ_FORMATS) -> np.ndarray:
    """An 8-bit colour or grey image as RGB uint8 (H, W, 3); 16-bit and float images are refused."""
    with open_image(source, what, formats) as img:
        if img.mode not in EIGHT_BIT_MODES:
            raise InputError(f"{what}: {img.mode} pixels are not 8-bit colour (16-bit or float images are "
                             "depth, not camera images)")
        try:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise InputError(f"{what}: cannot decode ({exc.__class__.__name__})") from None


def read_integer_png(path: Path, what: str, allow_8bit: bool = True) -> np.ndarray:
    """A single-channel integer PNG (16-bit, or 8-bit when ``allow_8bit``) as a 2-D integer array."""
    modes = ("I;16", "I;16B", "I;16L", "I") + (("L",) if allow_8bit else ())
    if not Path(path).is_file():
        raise InputError(f"missing file {path}")
    with open_image(path, what, ("PNG",)) as img:
        if img.mode not in modes:
            raise InputError(f"{what}: expected a single-channel {'integer' if allow_8bit else '16-bit'} PNG, "
                             f"got mode {img.mode}")
        try:
            return np.asarray(img)
        except (OSError, ValueError) as exc:
            raise InputError(f"{what}: cannot decode ({exc.__class__.__name__})") from None
