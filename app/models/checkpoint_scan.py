"""A torch-free pre-check of an uploaded checkpoint: refuse anything whose pickle could run code.

A pickle names the callables it will invoke (GLOBAL / STACK_GLOBAL / INST); reading those names with
`pickletools.genops` never unpickles anything. The allowlist is what PyTorch's own `weights_only` unpickler
accepts for plain tensors and dicts (torch/_weights_only_unpickler.py), so a file that passes here is one
the worker's strict `torch.load(weights_only=True)` may load; the worker still does that load.
"""

import io
import pickletools
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

# torch's legacy (pre-1.6) format starts with a pickled magic number, then the protocol version.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
LEGACY_PICKLES = 5  # magic, protocol version, sys info, the object, the storage keys
# Pickles in a checkpoint hold only structure (tensor data lies beside them); this bounds the scan's memory.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
_LEGACY_HEADER_BYTES = 64

# fmt: off
_DTYPES = (
    "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128", "bool",
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)
_STORAGES = (
    "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexDouble", "ComplexFloat", "QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4",
)
_TENSORS = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
# fmt: on

ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.set",
        "builtins.complex",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2",
    }
    | {f"torch.{dtype}" for dtype in _DTYPES}
    | {f"torch.{name}Storage" for name in _STORAGES}
    | {f"torch.cuda.{name}Storage" for name in _STORAGES if not name.startswith("Q")}
    | {f"torch.{name}Tensor" for name in _TENSORS}
)

# Python 2 module names that torch maps onto Python 3 ones before its own check.
_MODULE_ALIASES = {"__builtin__": "builtins"}
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", *_MEMO_PUT_OPS})
_CODE_OPS = frozenset({"EXT1", "EXT2", "EXT4", "PERSID"})


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
    def readline(self, size: int = -1, /) -> bytes: ...


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


def qualified_global(module: str, name: str) -> str:
    """`module.name` as torch's allowlist spells it (Python 2 module names mapped onto Python 3 ones)."""
    return f"{_MODULE_ALIASES.get(module, module)}.{name}"


def _globals_in_pickle(stream: _Readable) -> Iterator[str]:
    """Yield every global the pickle would import, resolving STACK_GLOBAL from the strings pushed before it.

    Values are tracked only as far as needed: a STACK_GLOBAL whose operands are not two plain strings is
    reported as unresolvable rather than guessed.
    """
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield qualified_global(module, attr)
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            operands = pushed[-2:]
            if len(operands) < 2 or not all(isinstance(value, str) for value in operands):
                yield "<unresolvable STACK_GLOBAL>"
            else:
                yield qualified_global(str(operands[0]), str(operands[1]))
            pushed.append(None)
        elif name in _CODE_OPS:
            yield f"<{name} opcode>"
        elif name in _STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in _MEMO_PUT_OPS:
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name in _MEMO_GET_OPS:
            pushed.append(memo.get(int(arg)))
        elif name not in _NO_PUSH_OPS:
            pushed.append(None)
        if len(pushed) > 64:
            del pushed[:-2]


def _check_pickle(stream: _Readable, where: str, found: set[str]) -> None:
    try:
        for qualified in _globals_in_pickle(stream):
            found.add(qualified)
            if qualified not in ALLOWED_GLOBALS:
                raise CheckpointRejected(
                    "checkpoint-contains-code",
                    f"{where} references {qualified}, which is not allowed in a checkpoint "
                    "(only tensors, storages and plain containers are)",
                    offending=qualified,
                )
    except (ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointRejected("not-a-checkpoint", f"{where} is not a valid pickle: {exc}") from exc


def _scan_zip(path: Path) -> CheckpointScan:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointRejected("not-a-checkpoint", f"unreadable zip archive: {exc}") from exc
    with archive:
        names = archive.namelist()
        data_pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(data_pickles) != 1:
            raise CheckpointRejected(
                "not-a-checkpoint", "a zip, but not a PyTorch checkpoint (no single <name>/data.pkl inside)"
            )
        prefix = data_pickles[0].split("/", 1)[0] + "/"
        if any(n.startswith((f"{prefix}code/", f"{prefix}constants.pkl")) for n in names):
            raise CheckpointRejected(
                "checkpoint-contains-code",
                "a TorchScript archive carries code; upload a state_dict checkpoint",
            )
        scan = CheckpointScan(format="zip")
        for member in (n for n in names if n.endswith(".pkl")):
            info = archive.getinfo(member)
            if info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointRejected("not-a-checkpoint", f"{member} is implausibly large for a pickle")
            with archive.open(info) as stream:
                _check_pickle(stream, member, scan.globals)
        return scan


class BoundedReader:
    """A read-only view that refuses to hand out more than `limit` bytes, whatever lengths a pickle claims."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._left = limit

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise CheckpointRejected("not-a-checkpoint", "the checkpoint's pickle is implausibly large")
        return data

    def read(self, size: int = -1) -> bytes:
        size = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.read(size))

    def readline(self, size: int = -1) -> bytes:
        size = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.readline(size))


def _first_int(stream: _Readable) -> int | None:
    values = [arg for op, arg, _ in pickletools.genops(stream) if isinstance(arg, int) and op.name != "PROTO"]
    return values[0] if len(values) == 1 else None


def _scan_legacy(path: Path) -> CheckpointScan:
    with path.open("rb") as stream:
        header = io.BytesIO(stream.read(_LEGACY_HEADER_BYTES))
        try:
            magic = _first_int(header)
            version = _first_int(header) if magic == LEGACY_MAGIC_NUMBER else None
        except (ValueError, EOFError, UnicodeDecodeError):
            magic = version = None
        if magic != LEGACY_MAGIC_NUMBER or version != LEGACY_PROTOCOL_VERSION:
            raise CheckpointRejected(
                "not-a-checkpoint",
                "neither a PyTorch zip checkpoint nor a legacy PyTorch pickle (torch.save output expected)",
            )
        stream.seek(header.tell())
        bounded = BoundedReader(stream, MAX_PICKLE_BYTES)
        scan = CheckpointScan(format="legacy")
        for index in range(2, LEGACY_PICKLES):
            _check_pickle(bounded, f"pickle #{index + 1}", scan.globals)
        return scan


def scan_checkpoint(path: Path) -> CheckpointScan:
    """Raise CheckpointRejected unless `path` is a torch.save file whose pickles name only allowed globals."""
    if path.stat().st_size == 0:
        raise CheckpointRejected("empty-checkpoint", "the uploaded file is empty")
    if zipfile.is_zipfile(path):
        return _scan_zip(path)
    return _scan_legacy(path)
