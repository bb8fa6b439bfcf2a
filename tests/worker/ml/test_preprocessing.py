import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from worker.ml import preprocessing
from worker.ml.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    ImageCache,
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    model_preprocess_spec,
    preprocess_spec_for,
    to_model_input,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size; its pixel data never gets read if the size is refused."""
    data = bytearray(_encode(Image.new("L", (1, 1))))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def real_face(johns_dir: Path) -> Path:
    return sorted((johns_dir / "aligned_112").glob("*/*.png"))[0]


@pytest.fixture(scope="module")
def real_photo(johns_dir: Path) -> Path:
    return sorted((johns_dir / "original").glob("*/*.jpg"))[0]


def test_specs_follow_the_model() -> None:
    for arch in ("iresnet18", "iresnet34", "iresnet50", "iresnet100"):
        assert preprocess_spec_for(arch) == PreprocessSpec("BGR", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 112)
    assert preprocess_spec_for("mobilefacenet") == PreprocessSpec("RGB", IMAGENET_MEAN, IMAGENET_STD, 112)
    with pytest.raises(ValueError, match="mobilefacenet"):
        preprocess_spec_for("resnet50")


def test_a_model_uses_its_recorded_spec_else_its_architecture_default() -> None:
    recorded = PreprocessSpec("RGB", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 96)
    assert model_preprocess_spec("iresnet50", recorded.to_dict()) == recorded
    for nothing in (None, {}, "BGR"):
        assert model_preprocess_spec("mobilefacenet", nothing) == preprocess_spec_for("mobilefacenet")
    for broken in ({"mean": [0, 0, 0]}, {**recorded.to_dict(), "channel_order": "GBR"}):
        with pytest.raises(ValueError, match="recorded preprocess metadata is not usable"):
            model_preprocess_spec("iresnet50", broken)


def test_spec_round_trips_through_json() -> None:
    spec = preprocess_spec_for("mobilefacenet")
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError):
        PreprocessSpec("BRG", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        PreprocessSpec("RGB", (0.0, 0.0, 0.0), (1.0, 0.0, 1.0))


def test_channel_order_and_normalisation_per_model() -> None:
    decoded = decode_image(_encode(Image.new("RGB", (112, 112), (200, 100, 50))))
    assert decoded.pixels[:, 5, 7].tolist() == [200, 100, 50]
    batch = decoded.pixels.unsqueeze(0)

    magface = to_model_input(batch, preprocess_spec_for("iresnet50"))
    assert magface.dtype == torch.float32 and magface.shape == (1, 3, 112, 112)
    assert magface[0, :, 0, 0].tolist() == pytest.approx([50 / 255, 100 / 255, 200 / 255])

    mobile = to_model_input(batch, preprocess_spec_for("mobilefacenet"))
    expected = [
        (v / 255 - m) / s for v, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    assert mobile[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)

    single = to_model_input(decoded.pixels, preprocess_spec_for("iresnet50"))
    assert torch.equal(single, magface[0])
    assert torch.equal(decoded.pixels, batch[0])


def test_model_input_checks_its_pixels() -> None:
    spec = preprocess_spec_for("iresnet18")
    with pytest.raises(TypeError):
        to_model_input(torch.zeros(1, 3, 112, 112), spec)
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), spec)
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(1, 112, 112, 3, dtype=torch.uint8), spec)


def test_exif_orientation_is_applied() -> None:
    """Orientation 6 means 'rotate 90° clockwise to display': the stored left edge ends up on top."""
    stored = Image.new("RGB", (96, 48))
    for box, colour in (((0, 0, 48, 24), RED), ((48, 0, 96, 24), GREEN), ((0, 24, 48, 48), BLUE)):
        stored.paste(colour, box)
    stored.paste(WHITE, (48, 24, 96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_encode(stored, "JPEG", quality=95, exif=exif))
    assert decoded.original_size == (48, 96) and decoded.resized

    def colour_at(row: int, col: int) -> list[int]:
        return decoded.pixels[:, row, col].tolist()

    displayed = {(28, 28): BLUE, (28, 84): RED, (84, 84): GREEN, (84, 28): WHITE}  # (row, col) → colour
    for (row, col), colour in displayed.items():
        assert np.allclose(colour_at(row, col), colour, atol=30), (row, col)

    upright = decode_image(_encode(stored, "JPEG", quality=95))
    assert upright.original_size == (96, 48)
    assert np.allclose(upright.pixels[:, 28, 28].tolist(), RED, atol=30)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (112, 112), 77), [77, 77, 77]),
        (Image.new("1", (112, 112), 1), [255, 255, 255]),
        (Image.fromarray(np.full((112, 112), 32896, dtype=np.uint16)), [128, 128, 128]),
        (Image.new("CMYK", (112, 112), (0, 255, 255, 0)), [255, 0, 0]),
    ],
    ids=["L", "1", "I;16", "CMYK"],
)
def test_other_modes_become_rgb(image: Image.Image, expected: list[int]) -> None:
    fmt = "TIFF" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(_encode(image, fmt))
    assert decoded.pixels.shape == (3, 112, 112) and decoded.pixels.dtype == torch.uint8
    assert decoded.pixels[:, 50, 50].tolist() == expected
    assert not decoded.resized


def test_transparency_is_composited_on_black() -> None:
    rgba = Image.new("RGBA", (112, 112), (200, 100, 50, 0))
    rgba.paste((200, 100, 50, 255), (0, 0, 56, 112))
    rgba.paste((200, 100, 50, 128), (56, 0, 84, 112))
    pixels = decode_image(_encode(rgba)).pixels
    assert pixels[:, 10, 10].tolist() == [200, 100, 50]
    assert pixels[:, 10, 100].tolist() == [0, 0, 0]
    assert np.allclose(pixels[:, 10, 70].tolist(), [100, 50, 25], atol=1)

    grey_alpha = Image.new("LA", (112, 112), (90, 0))
    grey_alpha.paste((90, 255), (0, 0, 56, 112))
    pixels = decode_image(_encode(grey_alpha)).pixels
    assert pixels[:, 10, 10].tolist() == [90, 90, 90] and pixels[:, 10, 100].tolist() == [0, 0, 0]


def test_palette_with_a_transparent_colour() -> None:
    palette = Image.new("P", (112, 112), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 56, 112))
    pixels = decode_image(_encode(palette, transparency=0)).pixels
    assert pixels[:, 10, 10].tolist() == [0, 255, 0]
    assert pixels[:, 10, 100].tolist() == [0, 0, 0]
    opaque = decode_image(_encode(palette)).pixels
    assert opaque[:, 10, 100].tolist() == [255, 0, 0]


def test_a_real_aligned_face_decodes_without_resize(real_face: Path) -> None:
    decoded = decode_image(real_face)
    assert decoded.pixels.shape == (3, 112, 112) and decoded.pixels.dtype == torch.uint8
    assert not decoded.resized and decoded.original_size == (112, 112)
    with Image.open(real_face) as reference:
        expected = np.asarray(reference.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(decoded.pixels.numpy(), expected)


def test_other_sizes_are_resized_and_counted(real_face: Path, real_photo: Path) -> None:
    decoded = decode_image(real_photo)
    assert decoded.resized and decoded.original_size == (150, 150) and decoded.pixels.shape == (3, 112, 112)
    cache = ImageCache()
    cache.get(real_face)
    cache.get(real_photo)
    cache.get(real_photo)
    assert cache.resized_count == 1 and cache.resized_paths == [real_photo.resolve()] and len(cache) == 2


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_file_is_an_error_naming_it(
    kind: str, real_face: Path, real_photo: Path, tmp_path: Path
) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = (real_face if kind == "png" else real_photo).read_bytes()
    half = tmp_path / f"half-face.{kind}"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="half-face") as raised:
        decode_image(half)
    assert "truncated" in str(raised.value) or "corrupt" in str(raised.value)
    with pytest.raises(ImageDecodeError, match="upload-7"):
        decode_image(data[: len(data) // 2], name="upload-7")


def test_something_else_is_not_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels")
    with pytest.raises(ImageDecodeError, match=r"notes\.png.*not an image"):
        decode_image(text)
    with pytest.raises(ImageDecodeError, match=r"absent\.png.*cannot read"):
        decode_image(tmp_path / "absent.png")
    with pytest.raises(ImageDecodeError, match="<image bytes>"):
        decode_image(b"")


@pytest.mark.parametrize("side", [8_000, 10_000, 20_000], ids=["over-ours", "pillow-warns", "pillow-refuses"])
def test_decompression_bombs_are_refused(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert side * side > MAX_PIXELS
    with pytest.raises(ImageDecodeError, match=r"bomb\.png"):
        decode_image(_png_header_claiming(side, side), name="bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(_png_header_claiming(side, side), name="bomb.png")


def test_the_cache_decodes_each_image_once(real_face: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded_paths: list[Path] = []
    real_decode = preprocessing.decode_image

    def counting_decode(source: Path, **options: object) -> preprocessing.DecodedImage:
        decoded_paths.append(source)
        return real_decode(source, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(preprocessing, "decode_image", counting_decode)
    cache = ImageCache()
    first = cache.get(real_face)
    again = cache.get(real_face.parent / ".." / real_face.parent.name / real_face.name)
    assert again is first
    assert cache.get(str(real_face)) is first
    assert decoded_paths == [real_face.resolve()]
    assert len(cache) == 1 and real_face in cache and cache.resized_count == 0
