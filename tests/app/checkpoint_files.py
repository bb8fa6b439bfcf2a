"""Checkpoint bytes for the api's upload tests: made with torch.save, benign or carrying code, and the hostile
layouts the checkpoint scan must refuse (also written to files by tests/hostile/generate.py)."""

import io
import os
import struct
import zipfile
from pathlib import Path

import torch

from app.models.checkpoint_scan import LEGACY_MAGIC_NUMBER


class RunsAShellCommand:
    """Unpickling this runs a shell command (it touches `marker`): what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def saved(obj: object, *, legacy: bool = False) -> bytes:
    """`obj` as torch.save writes it: the zip format, or the legacy pickle sequence."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def harmless() -> bytes:
    return saved({"w": torch.zeros(3)})


def harmless_legacy() -> bytes:
    return saved({"w": torch.zeros(3)}, legacy=True)


def first_pickle_end(content: bytes) -> int:
    """Where the legacy file's first pickle (the magic number) ends: PROTO, LONG1 n <n bytes>, STOP."""
    assert content[:3] == b"\x80\x02\x8a"
    return 3 + 1 + content[3] + 1


def magic_smuggling(_marker: Path) -> bytes:
    """A legacy file whose magic-number pickle calls posix.system before pushing the magic number (a short
    command, so the whole pickle fits in the few bytes a header check would read)."""
    command = b"true"
    magic = LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
    first = (
        b"\x80\x02(cposix\nsystem\nX"
        + struct.pack("<I", len(command))
        + command
        + b"\x85R1\x8a\x0a"  # TUPLE1 REDUCE POP_MARK, then LONG1 <magic>
        + magic
        + b"."
    )
    rest = harmless_legacy()
    return first + rest[first_pickle_end(rest) :]


def polyglot(marker: Path) -> bytes:
    """A legacy file carrying the payload, then a valid zip checkpoint: zipfile finds the zip, torch reads
    the legacy pickle at offset 0."""
    return saved({"w": torch.zeros(1), "x": RunsAShellCommand(marker)}, legacy=True) + harmless()


def zip_with_pickle(pickled: bytes, *, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def scan_bomb(_marker: Path) -> bytes:
    """An ~8 MiB data.pkl of NONE/POP opcodes, deflated to a few kilobytes."""
    return zip_with_pickle(b"\x80\x02" + b"N0" * (4 * 1024 * 1024) + b"N.", compression=zipfile.ZIP_DEFLATED)
