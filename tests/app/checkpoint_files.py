"""Checkpoint bytes for the api's upload tests: made with torch.save, benign or carrying code."""

import io
import os
from pathlib import Path

import torch


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
