"""A torch-free pre-check of an uploaded checkpoint: accept only what `torch.load(weights_only=True)` reads
as a plain tensor container, byte for byte, and refuse everything else before it is stored.

The format is decided as torch decides it, from offset 0: a zip local-file header there means torch's zip
format, anything else the legacy sequence of five pickles followed by the storages' data records. Either
way the whole file must be accounted for: the zip's members, central directory and end records tile it from
the first byte to the last, and a legacy file ends exactly after its last data record, so nothing can hide
before, between or after what torch reads (a polyglot, say). Every pickle torch would unpickle is walked
by `app.models.weights_pickle` with torch's own opcode and global rules. The work is bounded by the upload:
pickles are at most `MAX_PICKLE_BYTES`, decompressed at most `MAX_INFLATION` times their stored size, the
walk stops after `MAX_OPCODES`, and a zip may hold at most `MAX_MEMBERS` members, so a refusal takes
milliseconds. The worker still does the real strict load.
"""

import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.models.weights_pickle import (
    ALLOWED_GLOBALS,
    STORAGE_ELEMENT_BYTES,
    Global,
    PickleRead,
    PickleRefused,
    StorageRef,
    qualified_global,
    read_pickle,
)

__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointRejected",
    "CheckpointScan",
    "checkpoint_format",
    "qualified_global",
    "scan_checkpoint",
]

ZIP_MAGIC = b"PK\x03\x04"  # what torch.serialization._is_zipfile compares with the first four bytes
# torch's legacy (pre-1.6) format starts with a pickled magic number, then the protocol version.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# A checkpoint's pickles hold structure only (tensor data lies beside them): iresnet100 with MagFace's head
# and wrapper takes about 30,000 opcodes in 100 KB. These bounds leave room for any known architecture many
# times over and keep the worst refusal well under a second.
MAX_PICKLE_BYTES = 16 * 1024 * 1024
MAX_OPCODES = 200_000
MAX_MEMBERS = 10_000
MAX_INFLATION = 16  # uncompressed / compressed size of a deflated member (torch.save stores, ratio 1)

# The records torch.save writes in a zip checkpoint, below its one top directory.
_ZIP_RECORDS = re.compile(
    r"data\.pkl|byteorder|version|\.format_version|\.storage_alignment|\.data/serialization_id|\.data/version"
)
_ZIP_DATA = re.compile(r"data/(\w{1,64})")
_TORCHSCRIPT = re.compile(r"code/.*|constants\.pkl|\.data/ts_code/.*|extra/.*")
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")

RejectionKind = Literal["empty-checkpoint", "not-a-checkpoint", "checkpoint-contains-code"]


class CheckpointRejected(Exception):
    def __init__(self, kind: RejectionKind, detail: str, *, offending: str | None = None) -> None:
        super().__init__(detail)
        self.kind: RejectionKind = kind
        self.detail = detail
        self.offending = offending


@dataclass
class CheckpointScan:
    format: Literal["zip", "legacy"]
    globals: set[str] = field(default_factory=set)
    opcodes: int = 0


def _not_a_checkpoint(detail: str) -> CheckpointRejected:
    return CheckpointRejected("not-a-checkpoint", detail)


def checkpoint_format(path: Path) -> Literal["zip", "legacy"]:
    """The format torch.load picks for this file: zip when it starts with a zip local header."""
    with path.open("rb") as stream:
        return "zip" if stream.read(len(ZIP_MAGIC)) == ZIP_MAGIC else "legacy"


def _walk(data: bytes, start: int, budget: int, where: str, scan: CheckpointScan) -> PickleRead:
    try:
        read = read_pickle(data, start, max_opcodes=budget - scan.opcodes, where=where)
    except PickleRefused as exc:
        raise CheckpointRejected(exc.kind, exc.detail, offending=exc.offending) from exc
    scan.opcodes += read.opcodes
    scan.globals |= read.globals
    return read


def _element_bytes(reference: StorageRef) -> int:
    storage_type = reference.pid[1]
    assert isinstance(storage_type, Global)  # checked by the walk
    name = storage_type.name.removeprefix("torch.").removeprefix("cuda.").removesuffix("Storage")
    if storage_type.name == "torch.storage.UntypedStorage":
        return 1
    if name not in STORAGE_ELEMENT_BYTES:
        raise _not_a_checkpoint(f"a storage of type {storage_type.name}, which is not a tensor storage")
    return STORAGE_ELEMENT_BYTES[name]


# --- the zip format ------------------------------------------------------------------------------------


def _central_directory(data_size: int, tail: bytes) -> tuple[int, int, int]:
    """(entries, offset, size) of the central directory, which must end where the end records begin, with
    the end-of-central-directory record (no comment) as the file's last bytes."""
    if len(tail) < _EOCD.size or tail[-_EOCD.size : -_EOCD.size + 4] != b"PK\x05\x06":
        raise _not_a_checkpoint("a zip whose last bytes are not its end-of-central-directory record")
    _, disk, cd_disk, disk_entries, entries, cd_size, cd_offset, comment = _EOCD.unpack(tail[-_EOCD.size :])
    if comment or disk or cd_disk or disk_entries != entries:
        raise _not_a_checkpoint("a zip with a comment or several disks, which torch.save never writes")
    cd_end = data_size - _EOCD.size
    locator = tail[-_EOCD.size - _ZIP64_LOCATOR.size : -_EOCD.size]
    if len(locator) == _ZIP64_LOCATOR.size and locator[:4] == b"PK\x06\x07":
        _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack(locator)
        cd_end = data_size - _EOCD.size - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        record = tail[
            -_EOCD.size - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size : -_EOCD.size - _ZIP64_LOCATOR.size
        ]
        if zip64_offset != cd_end or len(record) != _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
            raise _not_a_checkpoint("a zip whose zip64 end record is not where its locator says")
        _, size, _, _, _, _, _, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
        if size != _ZIP64_EOCD.size - 12:
            raise _not_a_checkpoint("a zip64 end record with extra data")
    if entries > MAX_MEMBERS:
        raise _not_a_checkpoint(f"a zip of {entries} members, more than a checkpoint has ({MAX_MEMBERS})")
    if cd_offset + cd_size != cd_end:
        raise _not_a_checkpoint("a zip with bytes between its central directory and its end records")
    return entries, cd_offset, cd_size


def _descriptor_size(following: bytes, info: zipfile.ZipInfo) -> int:
    """The length of the data descriptor at the start of `following`, which must repeat the member's CRC and
    sizes (with or without its signature, with 32- or 64-bit sizes)."""
    for signature in (b"PK\x07\x08", b""):
        for sizes in ("<2L", "<2Q"):
            layout = struct.Struct(f"<{len(signature)}sL{sizes[1:]}")
            if len(following) >= layout.size:
                fields = layout.unpack(following[: layout.size])
                if fields == (signature, info.CRC, info.compress_size, info.file_size):
                    return layout.size
    raise _not_a_checkpoint(f"zip member {info.filename!r:.80} has a data descriptor that does not match it")


def _check_tiling(stream: Any, members: list[zipfile.ZipInfo], cd_offset: int) -> None:
    """Members follow each other from byte 0 to the central directory, each local header naming the same
    member as the directory: no bytes before, between or after them."""
    expected = 0
    for info in sorted(members, key=lambda member: member.header_offset):
        if info.header_offset != expected:
            raise _not_a_checkpoint(f"a zip with unaccounted bytes before {info.filename!r:.80}")
        stream.seek(info.header_offset)
        header = stream.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise _not_a_checkpoint("a zip member's local header is cut short")
        fields = _LOCAL_HEADER.unpack(header)
        name_length, extra_length = fields[9], fields[10]
        if fields[0] != ZIP_MAGIC or stream.read(name_length) != info.orig_filename.encode("utf-8"):
            raise _not_a_checkpoint(f"a zip member whose local header does not match {info.filename!r:.80}")
        if info.flag_bits & 0x01:
            raise _not_a_checkpoint(f"zip member {info.filename!r:.80} is encrypted")
        expected = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
        if info.flag_bits & 0x08:  # torch.save writes each member's CRC and sizes after its data
            stream.seek(expected)
            expected += _descriptor_size(stream.read(24), info)
    if expected != cd_offset:
        raise _not_a_checkpoint("a zip with unaccounted bytes before its central directory")


def _check_member(info: zipfile.ZipInfo) -> None:
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise _not_a_checkpoint(f"stored member {info.filename!r:.80} declares two sizes")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > MAX_INFLATION * max(info.compress_size, 1):
            raise _not_a_checkpoint(
                f"member {info.filename!r:.80} inflates more than {MAX_INFLATION} times, unlike a checkpoint"
            )
    else:
        raise _not_a_checkpoint(f"member {info.filename!r:.80} uses a compression torch does not read")


def _zip_layout(members: list[zipfile.ZipInfo]) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The top directory and its data records, refusing TorchScript and anything torch.save does not write."""
    prefix = members[0].filename.split("/", 1)[0] + "/"
    data: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    for info in members:
        if info.filename in seen:
            raise _not_a_checkpoint(f"a zip naming {info.filename!r:.80} twice")
        seen.add(info.filename)
        if not info.filename.startswith(prefix):
            raise _not_a_checkpoint(f"a zip member {info.filename!r:.80} outside its top directory")
        record = info.filename[len(prefix) :]
        if _TORCHSCRIPT.fullmatch(record):
            raise CheckpointRejected(
                "checkpoint-contains-code",
                "a TorchScript archive carries code; upload a state_dict checkpoint",
            )
        if (match := _ZIP_DATA.fullmatch(record)) is not None:
            data[match.group(1)] = info
        elif not _ZIP_RECORDS.fullmatch(record):
            raise _not_a_checkpoint(f"a zip member {info.filename!r:.80} that torch.save never writes")
        _check_member(info)
    if f"{prefix}data.pkl" not in seen:
        raise _not_a_checkpoint("a zip, but not a PyTorch checkpoint (no <name>/data.pkl inside)")
    return prefix, data


def _scan_zip(path: Path, size: int) -> CheckpointScan:
    with path.open("rb") as stream:
        stream.seek(max(0, size - _EOCD.size - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size))
        _, cd_offset, _ = _central_directory(size, stream.read())
        try:
            archive = zipfile.ZipFile(stream)
            members = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
            raise _not_a_checkpoint(f"unreadable zip archive: {exc}") from exc
        if not members:
            raise _not_a_checkpoint("an empty zip archive")
        _check_tiling(stream, members, cd_offset)
        prefix, data = _zip_layout(members)
        pickle_info = archive.getinfo(f"{prefix}data.pkl")
        if pickle_info.file_size > MAX_PICKLE_BYTES:
            raise _not_a_checkpoint(
                f"data.pkl is implausibly large for a checkpoint ({pickle_info.file_size} bytes)"
            )
        try:
            with archive.open(pickle_info) as member:
                pickled = member.read(MAX_PICKLE_BYTES + 1)
        except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:
            raise _not_a_checkpoint(f"data.pkl cannot be read: {exc}") from exc
    scan = CheckpointScan(format="zip")
    read = _walk(pickled, 0, MAX_OPCODES, "data.pkl", scan)
    if read.end != len(pickled):
        raise _not_a_checkpoint("data.pkl has bytes after its STOP opcode")
    keys = {str(reference.pid[2]) for reference in read.storages}
    if keys != set(data):
        raise _not_a_checkpoint(
            "the zip's data records and the storages data.pkl names differ "
            f"({len(set(data) - keys)} unnamed, {len(keys - set(data))} missing)"
        )
    return scan


# --- the legacy format ---------------------------------------------------------------------------------


def _scan_legacy(path: Path, size: int) -> CheckpointScan:
    with path.open("rb") as stream:
        head = stream.read(min(size, MAX_PICKLE_BYTES))
        scan = CheckpointScan(format="legacy")
        magic = _walk(head, 0, MAX_OPCODES, "the magic number pickle", scan)
        if type(magic.value) is not int or magic.value != LEGACY_MAGIC_NUMBER:
            raise _not_a_checkpoint(
                "neither a PyTorch zip checkpoint nor a legacy PyTorch pickle (torch.save output expected)"
            )
        version = _walk(head, magic.end, MAX_OPCODES, "the protocol version pickle", scan)
        if type(version.value) is not int or version.value != LEGACY_PROTOCOL_VERSION:
            raise _not_a_checkpoint(
                f"a legacy PyTorch file of an unknown protocol version {version.value!r:.40}"
            )
        info = _walk(head, version.end, MAX_OPCODES, "the system info pickle", scan)
        if isinstance(info.value, dict) and info.value.get("little_endian") is False:
            raise _not_a_checkpoint("a big-endian legacy checkpoint")
        payload = _walk(head, info.end, MAX_OPCODES, "the checkpoint's pickle", scan)
        keys = _walk(head, payload.end, MAX_OPCODES, "the storage keys pickle", scan)
        _check_legacy_records(stream, size, keys, payload.storages)
    return scan


def _check_legacy_records(stream: Any, size: int, keys: PickleRead, storages: list[StorageRef]) -> None:
    """After the pickles come the storages' data, each an int64 count and count × element bytes, in the
    order of the storage keys; the file must end exactly after the last one."""
    element_bytes = {str(reference.pid[2]): _element_bytes(reference) for reference in storages}
    if type(keys.value) is not list or not all(type(key) is str for key in keys.value):
        raise _not_a_checkpoint("a legacy checkpoint whose storage keys are not a list of names")
    if set(keys.value) != set(element_bytes) or len(keys.value) != len(element_bytes):
        raise _not_a_checkpoint("a legacy checkpoint whose storage keys and storages differ")
    position = keys.end
    for key in keys.value:
        stream.seek(position)
        count_bytes = stream.read(8)
        if len(count_bytes) != 8:
            raise _not_a_checkpoint("a legacy checkpoint cut short in its tensor data")
        (count,) = struct.unpack("<q", count_bytes)
        position += 8 + count * element_bytes[key]
        if count < 0 or position > size:
            raise _not_a_checkpoint("a legacy checkpoint cut short in its tensor data")
    if position != size:
        raise _not_a_checkpoint(f"{size - position} bytes after the legacy checkpoint's last tensor")


def scan_checkpoint(path: Path) -> CheckpointScan:
    """Raise CheckpointRejected unless `path` is a torch.save file that weights-only loading reads as
    tensors in plain containers, with no byte outside what torch reads."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointRejected("empty-checkpoint", "the uploaded file is empty")
    if checkpoint_format(path) == "zip":
        return _scan_zip(path, size)
    return _scan_legacy(path, size)
