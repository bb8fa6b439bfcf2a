"""Validation of uploaded face images with Pillow, before anything is stored.

Only JPEG, PNG, WebP and BMP are opened at all (a smaller parser surface than every format Pillow knows). The
pixel count is checked from the header, before decoding, so a decompression bomb costs nothing; then the whole
image is decoded, because a truncated file only shows itself there (`ImageFile.LOAD_TRUNCATED_IMAGES` stays
False).
"""

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    media_type: str


def inspect_image(path: Path, *, max_pixels: int) -> ImageInfo:
    """Decode the image at `path` fully and describe it; a `Problem` says why it is not acceptable."""
    try:
        with Image.open(path, formats=_OPENERS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(width, height, max_pixels)
            media_type = MEDIA_TYPES.get(image.format or "")
            if media_type is None:
                raise _not_an_image()
            image.load()
            return ImageInfo(width=width, height=height, channels=_channels(image), media_type=media_type)
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


def _channels(image: Image.Image) -> int:
    """Colour channels as a consumer sees them: a palette image has its palette's channels."""
    if image.mode in {"P", "PA"} and image.palette is not None:
        return len(image.palette.mode) + (1 if image.mode == "PA" else 0)
    return len(image.getbands())


def _not_an_image() -> Problem:
    return Problem(415, "not-an-image", "Not an image", "the upload is not a JPEG, PNG, WebP or BMP image")


def _too_many_pixels(width: int | None, height: int | None, max_pixels: int) -> Problem:
    size = f"{width}×{height} pixels" if width is not None else "its declared size"
    return Problem(
        422,
        "image-too-large",
        "Image too large",
        f"the image declares {size}, over the limit of {max_pixels} pixels",
        max_pixels=max_pixels,
    )
