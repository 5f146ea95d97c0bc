"""The one preprocessing path: decoding, conversions, resizing, errors, and parity with training."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from core.contract import MEAN, STD
from core.errors import ImageError, ImageTooLarge, UnsupportedImage
from core.preprocess import decode_plain_jpeg, decode_rgb, normalization_table, normalize, open_image, to_pixels
from training.data import load_split
from training.train import Augmenter


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_service_input_is_bit_identical_to_training_input(tiny_data) -> None:
    split = load_split(tiny_data, "test")
    files = sorted((tiny_data / "test").rglob("*.jpg"))
    table = normalization_table(MEAN, STD)
    service_input = np.stack([normalize(decode_rgb(f.read_bytes()), table) for f in files])
    training_input = Augmenter(torch.device("cpu")).normalize(torch.from_numpy(split.images)).numpy()
    assert service_input.dtype == training_input.dtype == np.float32
    assert np.array_equal(service_input.view(np.uint32), np.ascontiguousarray(training_input).view(np.uint32))


def jpeg_variants() -> list[tuple[str, bytes]]:
    """32x32 JPEGs in the encodings a client may produce: qualities, chroma subsampling, progressive, gray."""
    pixels = np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    variants = [
        (f"q{q}-ss{ss}", encode(rgb, "JPEG", quality=q, subsampling=ss)) for q in (30, 75, 95, 100) for ss in (0, 1, 2)
    ]
    variants += [("progressive", encode(rgb, "JPEG", progressive=True)), ("gray", encode(rgb.convert("L"), "JPEG"))]
    return variants


def test_fast_jpeg_path_gives_pillows_pixels(samples) -> None:
    for name, data in jpeg_variants() + samples:
        fast = decode_plain_jpeg(data)
        assert fast is not None, name
        assert np.array_equal(fast, to_pixels(open_image(data, 40_000_000))), name


@pytest.mark.parametrize("kind", ["exif", "cmyk", "64x64", "png"])
def test_fast_jpeg_path_leaves_the_rest_to_pillow(kind: str) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = {
        "exif": encode(image, "JPEG", exif=exif),
        "cmyk": encode(image.convert("CMYK"), "JPEG"),
        "64x64": encode(image.resize((64, 64)), "JPEG"),
        "png": encode(image, "PNG"),
    }[kind]
    assert decode_plain_jpeg(data) is None
    assert decode_rgb(data).shape == (32, 32, 3)


def test_augmenter_without_crop_shift_or_flip_is_plain_normalization() -> None:
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    aug = Augmenter(torch.device("cpu"), cutout=0)
    still = torch.tensor([[4, 4, 0, 0]] * 4)
    assert torch.equal(aug(pixels, still, torch.zeros(4, dtype=torch.bool)), aug.normalize(pixels))
    flipped = aug(pixels, still, torch.ones(4, dtype=torch.bool))
    assert torch.equal(flipped, aug.normalize(pixels).flip(3))


def test_reflected_translation_mirrors_the_image_at_its_edges() -> None:
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    aug = Augmenter(torch.device("cpu"), pad=2, reflect=True)
    plain = aug.normalize(pixels)
    assert torch.equal(aug(pixels, torch.tensor([[2, 2, 0, 0]] * 2), torch.zeros(2, dtype=torch.bool)), plain)
    moved = aug(pixels, torch.tensor([[0, 4, 0, 0]] * 2), torch.zeros(2, dtype=torch.bool))
    # Two rows down (rows -2, -1 mirror rows 2, 1) and two columns left (columns 32, 33 mirror 30, 29).
    assert torch.equal(moved[:, :, 2:, :30], plain[:, :, :30, 2:])
    assert torch.equal(moved[:, :, :2, :30], plain[:, :, [2, 1], 2:])
    assert torch.equal(moved[:, :, 2:, 30:], plain[:, :, :30, [30, 29]])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = Image.new("RGB", (40, 36), (200, 30, 90)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    pixels = decode_rgb(encode(image, fmt))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_transparent_pixels_are_composited_over_white() -> None:
    pixels = decode_rgb(encode(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG"))
    assert (pixels == 255).all()


def test_32x32_input_passes_through_untouched() -> None:
    original = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(decode_rgb(encode(Image.fromarray(original), "PNG")), original)


def test_large_photo_is_resized_on_its_shorter_side_and_centre_cropped() -> None:
    # 1000x800 -> 40x32 -> centre 32x32: a red band in the left 10% (4 of 40 columns) is cropped away.
    array = np.zeros((800, 1000, 3), np.uint8)
    array[:, :100] = (255, 0, 0)
    array[:, 100:] = (0, 0, 255)
    pixels = decode_rgb(encode(Image.fromarray(array), "JPEG", quality=95))
    assert pixels.shape == (32, 32, 3)
    assert pixels[:, 1:, 2].min() > 200 and pixels[:, 1:, 0].max() < 60


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = 255  # white left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: white ends up on the right
    data = encode(Image.fromarray(array), "PNG", exif=exif.tobytes())
    pixels = decode_rgb(data)
    assert pixels[:, -1].mean() > 200 and pixels[:, 0].mean() < 50


@pytest.mark.parametrize(
    ("data", "kind", "words"),
    [
        (b"", ImageError, "empty"),
        (b"hello, this is text", UnsupportedImage, "text"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', UnsupportedImage, "SVG"),
        (b"%PDF-1.4 ...", UnsupportedImage, "PDF"),
        (bytes(range(128, 256)) * 2, ImageError, "not an image"),
    ],
)
def test_bad_input_raises_the_image_error_of_its_kind(data: bytes, kind: type, words: str) -> None:
    with pytest.raises(ImageError, match=words) as info:
        decode_rgb(data)
    assert type(info.value) is kind


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.95])
def test_truncated_jpeg_is_a_400(keep: float) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated") as info:
        decode_rgb(jpeg[: int(len(jpeg) * keep)])
    assert type(info.value) is ImageError


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageTooLarge, match="6,000,000 pixels"):
        decode_rgb(data, max_pixels=5_000_000)


def test_a_decompression_bomb_header_is_refused_with_the_services_limit(recwarn) -> None:
    """A 100000x100000 PNG header (a few dozen bytes): the service's limit and wording, no Pillow warning."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    with pytest.raises(ImageTooLarge, match=r"100000x100000 = 10,000,000,000 pixels; the limit is 40,000,000"):
        decode_rgb(bomb)
    assert not recwarn.list
