"""The blob store: content addresses, atomic writes, and nothing left behind by a failed write."""

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.blobs import BlobStore, BlobTooLarge


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_write_stream_stores_at_the_content_address(store: BlobStore) -> None:
    chunks = [b"face ", b"crop ", b"bytes"]
    data = b"".join(chunks)
    sha = hashlib.sha256(data).hexdigest()

    blob = store.write_stream("faces", iter(chunks), max_bytes=len(data))

    assert blob.sha256 == sha
    assert blob.size == len(data)
    assert blob.path == store.root / "faces" / sha[:2] / sha
    assert blob.path.read_bytes() == data
    assert store.exists("faces", sha)
    with store.open("faces", sha) as handle:
        assert handle.read() == data
    assert files_under(store.root) == [blob.path]


def test_the_same_content_is_stored_once(store: BlobStore) -> None:
    first = store.write_stream("checkpoints", [b"weights"])
    second = store.write_stream("checkpoints", [b"wei", b"ghts"])

    assert first == second
    assert files_under(store.root) == [first.path]


def test_a_stream_over_the_limit_leaves_nothing(store: BlobStore) -> None:
    with pytest.raises(BlobTooLarge) as raised:
        store.write_stream("faces", [b"x" * 600, b"y" * 600], max_bytes=1000)

    assert raised.value.max_bytes == 1000
    assert files_under(store.root) == []


def test_a_stream_that_fails_halfway_leaves_nothing(store: BlobStore) -> None:
    def broken_upload() -> Iterator[bytes]:
        yield b"the first half"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.write_stream("checkpoints", broken_upload())

    assert files_under(store.root) == []


def test_a_blob_at_exactly_the_limit_is_kept(store: BlobStore) -> None:
    blob = store.write_stream("faces", [b"1234", b"5678"], max_bytes=8)

    assert blob.size == 8
    assert blob.path.is_file()


def test_a_staged_blob_can_be_inspected_then_dropped_or_kept(store: BlobStore) -> None:
    with store.staging("faces") as staged:
        staged.write(b"not yet validated")
        sha = staged.finish()
        assert staged.path.read_bytes() == b"not yet validated"
        assert not store.exists("faces", sha)
    assert files_under(store.root) == []

    with store.staging("faces") as staged:
        staged.write(b"validated")
        kept = staged.commit()
    assert files_under(store.root) == [kept.path]
    assert kept.path.read_bytes() == b"validated"


def test_async_streams_are_stored_the_same_way(store: BlobStore) -> None:
    async def body(parts: list[bytes]) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    blob = asyncio.run(store.write_async_stream("checkpoints", body([b"a" * 10, b"b" * 10]), max_bytes=20))
    assert blob.path.read_bytes() == b"a" * 10 + b"b" * 10

    with pytest.raises(BlobTooLarge):
        asyncio.run(store.write_async_stream("checkpoints", body([b"c" * 15, b"d" * 15]), max_bytes=20))
    assert files_under(store.root) == [blob.path]


def test_delete_removes_a_blob_once(store: BlobStore) -> None:
    blob = store.write_stream("faces", [b"to be erased"])

    assert store.delete("faces", blob.sha256) is True
    assert not blob.path.exists()
    assert store.delete("faces", blob.sha256) is False


@pytest.mark.parametrize(
    ("namespace", "sha"),
    [
        ("faces", "../../etc/passwd"),
        ("faces", "A" * 64),
        ("faces", "0" * 63),
        ("elsewhere", "0" * 64),
    ],
)
def test_paths_outside_the_store_are_refused(store: BlobStore, namespace: str, sha: str) -> None:
    with pytest.raises(ValueError):
        store.path(namespace, sha)
