"""Writes the hostile corpus in this folder: uploads the api must refuse with a specific 4xx problem.

The files are committed, so a reader (or another tool) sees exactly what was sent, and a change to a builder
cannot silently weaken the corpus; tests/app/test_hostile_corpus.py posts each one and says what it expects.
Regenerate after changing a builder, from the repository root, and commit the result:

    python -m tests.hostile.generate

Checkpoints come from the builders the scan's own tests use (tests/app/checkpoint_files.py). Files ending in
`.multipart` are whole request bodies (boundary `BOUNDARY`), for what a client library would not send: a NUL
in a filename, a body cut before its closing boundary. A payload's command only touches `MARKER`. A rerun
changes a few bytes of some files (zip timestamps, legacy torch storage keys), never what they are.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import torch
from PIL import Image

from tests.app.checkpoint_files import (
    RunsAShellCommand,
    harmless,
    magic_smuggling,
    polyglot,
    saved,
    scan_bomb,
)

CORPUS_DIR = Path(__file__).resolve().parent
BOUNDARY = "hostile-corpus"
MARKER = Path("/tmp/magtune-hostile-corpus-ran")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def face_png() -> bytes:
    """A 112×112 gradient: a valid PNG of a face crop's size that compresses to a few hundred bytes."""
    image = Image.linear_gradient("L").resize((112, 112)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_png() -> bytes:
    """A whole PNG whose compressed pixels are garbage: every chunk present, its CRC right, the data not."""
    content = face_png()
    start = content.index(b"IDAT") + 4
    length = int.from_bytes(content[start - 8 : start - 4], "big")
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    crc = zlib.crc32(b"IDAT" + garbage).to_bytes(4, "big")
    return content[:start] + garbage + crc + content[start + length + 4 :]


def truncated_png() -> bytes:
    content = face_png()
    return content[: len(content) // 2]


def multipart(parts: list[tuple[str, str | None, bytes]], *, closed: bool = True) -> bytes:
    """A multipart/form-data body of (name, filename or None, content) parts, written byte for byte."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


def corpus() -> dict[str, bytes]:
    payload = RunsAShellCommand(MARKER)
    return {
        "magic-number-smuggling.pt": magic_smuggling(MARKER),
        "legacy-then-zip-polyglot.pt": polyglot(MARKER),
        "nonepop-scan-bomb.pt": scan_bomb(MARKER),
        "zip-pickle-payload.pt": saved({"w": torch.zeros(1), "x": payload}),
        "legacy-pickle-payload.pt": saved({"x": payload}, legacy=True),
        "nul-in-filename.multipart": multipart(
            [("arch", None, b"iresnet18"), ("file", "model\0.pt", harmless())]
        ),
        "over-long-name.multipart": multipart(
            [("arch", None, b"iresnet18"), ("name", None, b"m" * 300), ("file", "model.pt", harmless())]
        ),
        "cut-before-closing-boundary.multipart": multipart([("file", "face.png", face_png())], closed=False),
        "corrupt-image.png": corrupt_png(),
        "truncated-image.png": truncated_png(),
    }


def main() -> None:
    for name, content in corpus().items():
        (CORPUS_DIR / name).write_bytes(content)
        print(f"{len(content):>8} bytes  {name}")


if __name__ == "__main__":
    main()
