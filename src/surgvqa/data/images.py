"""Opening images: one decoder for prepare (validation) and for training and prediction (loading).

``open_rgb`` decodes an image completely and converts it to the RGB image the processor is given. ``prepare``
runs every image through it, so an image that prepare keeps is one that training and prediction can load, and
both see the same pixels. ``resolve_within`` keeps every image read inside the folders a run is allowed to read.
"""

from __future__ import annotations

import errno
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
SIXTEEN_BIT_MAX = 65535
# Transparent areas become white, as the processor's own ``convert_to_rgb`` composites them.
ALPHA_BACKGROUND = (255, 255, 255, 255)


class ImageProblem(ValueError):
    """An image that cannot be used; ``reason`` is the reject code prepare records."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _high_bit_depth_to_grey(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale scaled to 8 bit.

    PIL's ``convert("L")`` clips these values at 255 (a 16-bit scan turns almost all white) and has no scaling
    conversion, so the values are mapped with ``point``, the linear transform PIL supports for I and F images.
    """
    values = image.convert("I") if image.mode in SIXTEEN_BIT_MODES else image
    high = values.getextrema()[1]
    if image.mode in SIXTEEN_BIT_MODES or 255 < high <= SIXTEEN_BIT_MAX:
        scale = 255 / SIXTEEN_BIT_MAX  # 16-bit content: the full 16-bit range maps to the full 8-bit range
    elif high > SIXTEEN_BIT_MAX:
        scale = 255 / high  # wider than 16 bit: the bit depth is unknown, so the image's own maximum maps to 255
    else:
        scale = 1.0  # already within 0..255
    if scale != 1.0:
        values = values.point(lambda value: value * scale)
    return values.convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: high bit depth scaled, transparency composited on white, palette and CMYK converted."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_grey(image)
    try:
        if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND)
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:  # a mode PIL cannot convert to RGB (e.g. LAB)
        raise ImageProblem("unsupported_image_mode", f"image mode {image.mode} cannot be converted to RGB "
                                                     f"({exc})") from None


def open_rgb(source: bytes | str | Path) -> Image.Image:
    """Decode an image completely and return it as RGB; see :func:`decode_image`."""
    return decode_image(source)[0]


def decode_image(source: bytes | str | Path) -> tuple[Image.Image, str]:
    """Decode an image completely (``verify()`` does not decode pixels); return it as RGB with its file format.

    Raises :class:`ImageProblem` for a decompression bomb, a file that is not an image, truncated or damaged
    pixel data and a mode with no RGB conversion. Of a multi-frame image (animated GIF, multi-page TIFF) the
    first frame is used: endoscopy stills exported as GIF carry the picture in frame 0, and a fixed frame keeps
    training and prediction on the same pixels. An EXIF orientation is applied here, once, as every image viewer
    applies it: a camera's portrait JPEG is stored sideways with a tag saying so.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; make that a rejection too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(stream)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageProblem("image_too_large", f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise ImageProblem("not_an_image", "not an image file PIL can identify") from None
        except (SyntaxError, ValueError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ImageProblem("corrupt_image", f"image header cannot be parsed ({exc})") from None
        with image:
            try:
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageProblem("image_too_large", f"decompression bomb refused: {exc}") from None
            except (SyntaxError, ValueError, OSError) as exc:
                raise ImageProblem("truncated_image",
                                   f"{image.format or 'image'} {image.width}x{image.height}: pixel data is "
                                   f"truncated or damaged ({exc})") from None
            image_format = (image.format or "png").lower()
            try:
                upright = ImageOps.exif_transpose(image)
            except (SyntaxError, ValueError, OSError, TypeError) as exc:  # a damaged EXIF block
                raise ImageProblem("corrupt_image", f"image EXIF data cannot be read ({exc})") from None
            return to_rgb(upright), image_format


def is_link_loop(path: str | Path) -> bool:
    """``path`` is a symbolic link that leads back to itself (directly or through others): no file to read."""
    try:
        Path(path).resolve()
    except RuntimeError:  # Python 3.11's Path.resolve says "Symlink loop from ..."
        return True
    except (OSError, ValueError):
        return False
    try:
        Path(path).stat()
    except OSError as exc:  # later Pythons resolve a loop without raising; stat() meets ELOOP
        return exc.errno == errno.ELOOP
    except ValueError:
        return False
    return False


def resolve_within(path: str | Path, roots: Sequence[str | Path]) -> Path | None:
    """The path with links and ``..`` resolved, or None when it lies outside every one of ``roots``."""
    try:
        resolved = Path(path).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL in the path, a link loop: no file to allow
        return None
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    return None


def resolve_image_path(value: Any, base: Path) -> str | None:
    """The image as an absolute path; `base` (the predictions file's folder) is already absolute."""
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value)
    return str(path if path.is_absolute() else base / path)
