"""Image decoding, validation and normalization: the one preprocessing path.

The service, the batch CLI, evaluation and training's data loader all call these
functions, so a CIFAR-10 image becomes the same tensor everywhere. Decoding has two
steps, so a caller can judge the cost from the header before paying it: `open_image`
(header and limits) and `to_pixels` (the pixels).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from core.contract import INPUT_SIZE
from core.errors import ImageError, ImageTooLarge, UnsupportedImage

DEFAULT_MAX_PIXELS = 40_000_000
# Formats Pillow cannot decode but that users plausibly send.
_UNSUPPORTED_SIGNATURES = {
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xml": "SVG/XML",
}
SUPPORTED = "send JPEG, PNG, WebP, GIF, BMP or TIFF"
# Every image's size is checked against the caller's own limit (open_image) before its pixels are decoded, so
# Pillow's decompression-bomb check, with its limit and wording (and a warning printed on stderr), stays off.
Image.MAX_IMAGE_PIXELS = None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header of `data` and check its size; the pixels are not decoded yet."""
    if not data:
        raise ImageError("empty file (0 bytes): send an image")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except (OSError, SyntaxError, ValueError) as exc:  # a header Pillow recognised but could not read
        raise ImageError(f"corrupt or truncated image file ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    if image.format == "JPEG":
        # Decode JPEGs at the smallest DCT scale that still covers the 32x32 output.
        image.draft("RGB", (INPUT_SIZE, INPUT_SIZE))
    return image


def to_pixels(image: Image.Image) -> np.ndarray:
    """Decode an opened image: uint8 array of shape (32, 32, 3), oriented, converted and cropped."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated {image.format or 'image'} file ({exc})") from None
    return np.asarray(resize_center_crop(to_rgb(image)), dtype=np.uint8)


def _unidentified(data: bytes) -> ImageError:
    head = data[:256].lstrip()
    for signature, kind in _UNSUPPORTED_SIGNATURES.items():
        if head.startswith(signature) or (kind.startswith("SVG") and b"<svg" in head):
            return UnsupportedImage(f"{kind} is not a supported image type; {SUPPORTED}")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ImageError("not an image, or a corrupt one: Pillow cannot identify it")
    return UnsupportedImage(f"text is not a supported image type; {SUPPORTED}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to 8-bit RGB (transparency over white)."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: keep the top byte of 16-bit data instead of clipping.
        array = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(array >> 8, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_center_crop(image: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """Resize the shorter side to `size` and center-crop; a size x size input is returned as is."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes of any supported image -> uint8 array of shape (32, 32, 3)."""
    pixels = decode_plain_jpeg(data)
    if pixels is not None:
        return pixels
    return to_pixels(open_image(data, max_pixels))


def decode_plain_jpeg(data: bytes) -> np.ndarray | None:
    """A 32x32 RGB or grayscale JPEG without EXIF, decoded by libjpeg-turbo directly; None for anything else.

    CIFAR-sized JPEGs are the common input; Pillow spends ~150 us per image parsing their
    headers in Python, this path ~15 us, and its pixels equal Pillow's (tests/test_preprocess.py).
    """
    if not data.startswith(b"\xff\xd8\xff") or b"Exif\x00" in data[:65536]:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (height, width) != (INPUT_SIZE, INPUT_SIZE) or colorspace not in ("YCbCr", "RGB", "Gray"):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:  # corrupt or unusual: Pillow decides, and words the error
        return None


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Per-channel lookup table (3, 256): float32 value of each uint8 pixel after normalization.

    Training gathers from this same table on its device, which makes its input
    bit-identical to the service's for the same image.
    """
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return ((levels[None, :] - mean32) / std32).astype(np.float32)


def normalize(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) or (32, 32, 3) -> float32 NCHW (or CHW) through the lookup table."""
    planes = np.ascontiguousarray(np.moveaxis(pixels, -1, -3))
    out = np.empty(planes.shape, np.float32)
    for channel in range(3):  # one 256-entry table per channel: ~6x faster than one 2-D gather
        out[..., channel, :, :] = table[channel][planes[..., channel, :, :]]
    return out
