"""Decoding uploads is bounded in memory across requests (app/faces/images.py)."""

import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.faces.images import DecodeLimits, decode_slots, inspect_image
from app.problems import Problem
from app.tables import Face
from tests.app.factories import count_rows
from tests.app.problems import assert_problem


def noise(size: tuple[int, int], format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`×`height` and that holds almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_a_truncated_jpeg_is_still_refused_when_decoded_in_draft(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(noise((1600, 1200), "JPEG")[:200_000])

    with pytest.raises(Problem) as refused:
        inspect_image(path, max_pixels=40_000_000)

    assert refused.value.kind == "corrupt-image"


def test_a_large_jpeg_is_checked_in_a_fraction_of_its_bitmap(tmp_path: Path) -> None:
    """A 36-megapixel JPEG (a 108 MB bitmap) is checked with a few MB, measured in a fresh process."""
    path = tmp_path / "large.jpg"
    path.write_bytes(noise((6000, 6000), "JPEG", quality=50))
    script = (
        "import json, resource, sys; from pathlib import Path; from app.faces.images import inspect_image; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "info = inspect_image(Path(sys.argv[1]), max_pixels=40_000_000); "
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "print(json.dumps({'width': info.width, 'grew_kb': after - before}))"
    )

    run = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    measured = json.loads(run.stdout)

    assert measured["width"] == 6000
    assert measured["grew_kb"] < 30_000, measured


def test_a_bomb_beyond_pillows_own_guard_is_refused_in_plain_words(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20_000, 10_000))

    with pytest.raises(Problem) as refused:
        inspect_image(path, max_pixels=40_000_000)

    assert refused.value.kind == "image-too-large"
    assert refused.value.detail == "the image declares more pixels than allowed: the limit is 40000000 pixels"


def test_large_decodes_wait_for_a_slot_and_are_refused_when_none_frees(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    client = client_with(max_concurrent_decodes=1, decode_wait_s=0.2, max_image_bytes=64 * 1024 * 1024)
    large = noise((2500, 2000), "PNG", compress_level=1)  # 5 MP: over LARGE_DECODE_PIXELS
    small = noise((112, 112), "PNG")
    slots = decode_slots(1)

    assert slots.acquire(timeout=5)  # another request is decoding
    try:
        busy = client.post("/v1/faces", files={"file": ("large.png", large)})
        crop = client.post("/v1/faces", files={"file": ("crop.png", small)})
    finally:
        slots.release()
    after = client.post("/v1/faces", files={"file": ("large.png", large)})

    assert_problem(busy, 503, "decoder-busy")
    assert busy.headers["retry-after"] == "1"
    assert crop.status_code == 201, "a face crop never waits for a slot"
    assert after.status_code == 201, after.text
    assert count_rows(settings, Face) == 2


def test_the_default_limits_follow_the_settings() -> None:
    settings = Settings()
    assert DecodeLimits(settings.max_image_pixels).max_concurrent == settings.max_concurrent_decodes


RETENTION_SCRIPT = """
import io, json, sys
from concurrent.futures import ThreadPoolExecutor
from threading import Lock
from PIL import Image
from app.memory import return_large_blocks_to_the_os
if sys.argv[1] == "fixed":
    assert return_large_blocks_to_the_os()
buffer = io.BytesIO()
Image.new("RGB", (4000, 4000), (1, 2, 3)).save(buffer, format="PNG")
data = buffer.getvalue()
def rss_mb():
    return int([line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]) // 1024
before = rss_mb()
one_at_a_time = Lock()
def decode(_):
    with one_at_a_time:
        Image.open(io.BytesIO(data)).load()
with ThreadPoolExecutor(6) as pool:
    list(pool.map(decode, range(12)))
print(json.dumps({"kept_mb": rss_mb() - before}))
"""


def test_the_api_returns_a_decoded_bitmap_to_the_os() -> None:
    """Twelve 64 MB bitmaps decoded one at a time by six threads: the process keeps almost none of that
    memory, where glibc's default keeps some in each thread's heap (75 MB where this was measured)."""
    run = subprocess.run(
        [sys.executable, "-c", RETENTION_SCRIPT, "fixed"], capture_output=True, text=True, check=True
    )

    assert json.loads(run.stdout)["kept_mb"] < 30
