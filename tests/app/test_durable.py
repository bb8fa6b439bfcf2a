"""The one durable writer: whole or nothing, no temp file left behind, hashed as written."""

import hashlib
import os
from pathlib import Path

import pytest

from app.durable import DurableFile, durable_write, file_digest


def test_durable_write_creates_the_file_and_knows_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "out.bin"
    with durable_write(path) as stream:
        stream.write(b"first ")
        stream.write(b"second")
    assert path.read_bytes() == b"first second"
    assert stream.sha256 == hashlib.sha256(b"first second").hexdigest() == file_digest(path)
    assert stream.size == len(b"first second")
    assert os.listdir(path.parent) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), durable_write(path) as stream:
        stream.write(b"half of the new")
        raise OSError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_a_durable_file_is_discarded_unless_committed(tmp_path: Path) -> None:
    with DurableFile(tmp_path) as temporary:
        temporary.write(b"never kept")
        assert temporary.finish() == hashlib.sha256(b"never kept").hexdigest()
        assert temporary.path.read_bytes() == b"never kept"
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        temporary.write(b"more")


def test_file_digest_is_the_content_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
