"""Validation of uploaded face images with Pillow, before anything is stored.

Only JPEG, PNG, WebP and BMP are opened at all (a smaller parser surface than every format Pillow knows). The
pixel count is checked from the header, before decoding, so a decompression bomb costs nothing; then the whole
image is decoded, because a truncated file only shows itself there (`ImageFile.LOAD_TRUNCATED_IMAGES` stays
False).

A decode holds the whole bitmap, up to `max_image_pixels` × 4 bytes, so its memory is bounded across
requests too: a JPEG is decoded at an eighth of its size (Pillow's draft mode still reads every byte of the
file, so damage is still found, into 1/64 of the pixels), and a decode of another format over
`LARGE_DECODE_PIXELS` waits for one of `max_concurrent_decodes` slots, answering 503 `decoder-busy` with
`Retry-After` when none frees up within `decode_wait_s`.
"""

import math
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image

from app.problems import Problem

MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
_OPENERS = ("JPEG", "PNG", "WEBP", "BMP")
# Decodes below this many pixels (a face crop is ~0.01 MP) are cheap and never wait for a slot.
LARGE_DECODE_PIXELS = 4_000_000
_DRAFT_SCALE = 8  # JPEG's smallest DCT scaling


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_concurrent: int = 2
    wait_s: float = 30.0


@cache
def decode_slots(max_concurrent: int) -> threading.BoundedSemaphore:
    """One semaphore per configured size, shared by every request of the process."""
    return threading.BoundedSemaphore(max_concurrent)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    media_type: str


def inspect_image(path: Path, *, max_pixels: int, limits: DecodeLimits | None = None) -> ImageInfo:
    """Decode the image at `path` fully and describe it; a `Problem` says why it is not acceptable."""
    limits = limits or DecodeLimits(max_pixels=max_pixels)
    try:
        with Image.open(path, formats=_OPENERS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(width, height, max_pixels)
            media_type = MEDIA_TYPES.get(image.format or "")
            if media_type is None:
                raise _not_an_image()
            channels = _channels(image)
            _decode(image, limits)
            return ImageInfo(width=width, height=height, channels=channels, media_type=media_type)
    except Problem:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(None, None, max_pixels) from exc
    except Image.UnidentifiedImageError as exc:
        raise _not_an_image() from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports damaged data with any of these, depending on the codec and where it breaks.
        raise Problem(
            422, "corrupt-image", "Corrupt image", f"the image could not be decoded: {exc}"
        ) from exc


def _decode(image: Image.Image, limits: DecodeLimits) -> None:
    width, height = image.size
    if image.format in ("JPEG", "MPO"):
        image.draft(None, (math.ceil(width / _DRAFT_SCALE), math.ceil(height / _DRAFT_SCALE)))
    if image.format in ("JPEG", "MPO") or width * height <= LARGE_DECODE_PIXELS:
        image.load()
        return
    slots = decode_slots(limits.max_concurrent)
    if not slots.acquire(timeout=limits.wait_s):
        raise Problem(
            503,
            "decoder-busy",
            "Decoder busy",
            f"{limits.max_concurrent} large images are being decoded; try again shortly",
            headers={"Retry-After": "1"},
        )
    try:
        image.load()
    finally:
        slots.release()


def _channels(image: Image.Image) -> int:
    """Colour channels as a consumer sees them: a palette image has its palette's channels."""
    if image.mode in {"P", "PA"} and image.palette is not None:
        return len(image.palette.mode) + (1 if image.mode == "PA" else 0)
    return len(image.getbands())


def _not_an_image() -> Problem:
    return Problem(415, "not-an-image", "Not an image", "the upload is not a JPEG, PNG, WebP or BMP image")


def _too_many_pixels(width: int | None, height: int | None, max_pixels: int) -> Problem:
    said = f"declares {width}×{height} pixels" if width is not None else "declares more pixels than allowed"
    return Problem(
        422,
        "image-too-large",
        "Image too large",
        f"the image {said}: the limit is {max_pixels} pixels",
        max_pixels=max_pixels,
    )
