"""Turn face crops into the tensors a given backbone expects.

Preprocessing belongs to the model, not to the code path: MagFace's iResNets were trained on images read
with OpenCV, so they see BGR in [0, 1] with no mean/std; MobileFaceNet sees RGB normalised with ImageNet
statistics.
Decoding is separate from that: every image is decoded once into RGB ``uint8`` pixels, and
:func:`to_model_input` applies a model's :class:`PreprocessSpec` to a batch of them on whatever device the
batch lives on.

Decoding rules (each one a decision users would otherwise trip over):

- Only the formats in :data:`ACCEPTED_FORMATS` are opened (no EPS/PDF-style plugins that shell out).
- EXIF orientation is applied before anything else; ``original_size`` is (width, height) after it.
- Greyscale (``1``, ``L``) is replicated to three channels; 16-bit greyscale (``I;16*``) and 32-bit integer
  (``I``, which Pillow uses for some 16-bit files) are scaled from 0..65535 to 0..255 rather than clipped.
- Transparency (``RGBA``, ``LA``, ``PA``, premultiplied modes, palette or greyscale images with a transparent
  colour) is composited onto **black**, the fill colour of the aligned-crop template, so transparent margins
  look like the margins of every other aligned face. ``CMYK`` and other modes use Pillow's conversion to RGB.
- Images that are not ``size`` × ``size`` are resized with bilinear filtering (non-square inputs are
  stretched, never cropped: the alignment owns the geometry) and flagged ``resized``.
- The whole file is decoded (``Image.load``), so a truncated or corrupt file fails here with
  :class:`ImageDecodeError` naming it, not later as a grey half-face. This module never enables Pillow's
  global ``ImageFile.LOAD_TRUNCATED_IMAGES``; a process that does weakens this check.
- Images above :data:`MAX_PIXELS` (40 megapixels, far beyond any face crop) are refused before their pixels
  are decoded, independently of Pillow's global ``Image.MAX_IMAGE_PIXELS``; Pillow's own
  ``DecompressionBombWarning`` is turned into the same error.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from app.domain import Architecture

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # JPEG covers MPO
MAX_PIXELS = 40_000_000
DEFAULT_SIZE = 112

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IRESNETS = frozenset(arch.value for arch in Architecture if arch.is_iresnet)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class PreprocessSpec:
    """How a backbone wants its input: channel order, then ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are given in the spec's own channel order (applied after any RGB → BGR flip).
    """

    channel_order: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = DEFAULT_SIZE

    def __post_init__(self) -> None:
        if self.channel_order not in ("BGR", "RGB"):
            raise ValueError(f"channel_order must be 'BGR' or 'RGB', not {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per channel (3 each)")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        return cls(
            channel_order=str(data["channel_order"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            size=int(data.get("size", DEFAULT_SIZE)),
        )


def preprocess_spec_for(arch: str) -> PreprocessSpec:
    """The preprocessing a backbone was trained with: MagFace's iResNets read images with OpenCV, so BGR in
    [0, 1] with no mean or std; MobileFaceNet RGB with ImageNet mean and std."""
    if arch in _IRESNETS:
        return PreprocessSpec(channel_order="BGR", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if arch == Architecture.MOBILEFACENET:
        return PreprocessSpec(channel_order="RGB", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    known = ", ".join(sorted(arch.value for arch in Architecture))
    raise ValueError(f"no preprocessing known for architecture {arch!r} (known: {known})")


def model_preprocess_spec(arch: str, recorded: object = None) -> PreprocessSpec:
    """A model's preprocessing: the spec its checkpoint or registry row records, else its architecture's.

    The one rule for every reader (job, validation, CLI), so a model is never fed differently by two paths.
    A recorded spec that cannot be used is a ValueError, never silently replaced by the default; anything
    other than a non-empty mapping means none was recorded.
    """
    if not isinstance(recorded, Mapping) or not recorded:
        return preprocess_spec_for(arch)
    try:
        return PreprocessSpec.from_dict(recorded)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the recorded preprocess metadata is not usable ({exc})") from None


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message names the file and says what is wrong with it."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    pixels: torch.Tensor  # uint8 [3, size, size], RGB
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    resized: bool


def decode_image(
    source: bytes | str | Path, *, name: str | None = None, size: int = DEFAULT_SIZE
) -> DecodedImage:
    """Decode a face crop into RGB ``uint8`` pixels of ``size`` × ``size`` (see the module rules)."""
    if isinstance(source, bytes | bytearray | memoryview):
        label = name or "<image bytes>"
        data = bytes(source)
    else:
        label = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(label, f"cannot read the file ({exc.strerror or exc})") from exc
    image = _open_fully(data, label)
    try:
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except Exception as exc:
        raise ImageDecodeError(label, f"cannot convert the image to RGB ({exc})") from exc
    original_size = (rgb.width, rgb.height)
    resized = original_size != (size, size)
    if resized:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    array = np.array(rgb, dtype=np.uint8)  # [H, W, 3], a private copy torch may own
    return DecodedImage(
        pixels=torch.from_numpy(array).permute(2, 0, 1).contiguous(),
        original_size=original_size,
        resized=resized,
    )


def _open_fully(data: bytes, label: str) -> Image.Image:
    Image.init()
    formats = tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=formats)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(label, f"refused as a decompression bomb ({exc})") from exc
        except Exception as exc:
            raise ImageDecodeError(
                label, f"not an image in a supported format ({', '.join(formats)}): {exc}"
            ) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            label, f"refused: {width}×{height} is over the limit of {MAX_PIXELS:,} pixels for a face crop"
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(label, f"empty image ({width}×{height})")
    try:
        image.load()
    except Exception as exc:
        raise ImageDecodeError(label, f"corrupt or truncated {image.format} image ({exc})") from exc
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "I" or mode.startswith("I;16"):
        samples = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(samples), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


class ImageCache:
    """Decoded pixels keyed by resolved path: each image is decoded once per job, however many pairs use it.

    Decode errors are not cached: asking again retries the file.
    """

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._pixels: dict[Path, torch.Tensor] = {}
        self._resized: list[Path] = []

    def get(self, path: str | Path) -> torch.Tensor:
        key = Path(path).resolve()
        pixels = self._pixels.get(key)
        if pixels is None:
            decoded = decode_image(key, size=self.size)
            pixels = decoded.pixels
            self._pixels[key] = pixels
            if decoded.resized:
                self._resized.append(key)
        return pixels

    @property
    def resized_count(self) -> int:
        return len(self._resized)

    @property
    def resized_paths(self) -> list[Path]:
        return list(self._resized)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str | Path) and Path(path).resolve() in self._pixels

    def __len__(self) -> int:
        return len(self._pixels)


def to_model_input(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """RGB ``uint8`` pixels ``[N, 3, H, W]`` (or ``[3, H, W]``) → float32 model input on the same device."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim not in (3, 4) or pixels.shape[-3] != 3:
        raise ValueError(f"expected pixels shaped [N, 3, H, W] or [3, H, W], got {list(pixels.shape)}")
    if pixels.shape[-2:] != (spec.size, spec.size):
        raise ValueError(f"pixels are {pixels.shape[-1]}×{pixels.shape[-2]}, the model expects {spec.size}²")
    x = pixels.to(torch.float32).div_(255.0)
    if spec.channel_order == "BGR":
        x = x.flip(-3)
    if spec.mean != (0.0, 0.0, 0.0) or spec.std != (1.0, 1.0, 1.0):
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        x = x.sub_(mean).div_(std)
    return x
