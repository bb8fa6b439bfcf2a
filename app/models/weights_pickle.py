"""Read a pickle the way `torch.load(weights_only=True)` does, without torch and without calling anything.

torch's weights-only unpickler (torch/_weights_only_unpickler.py) reads a fixed set of opcodes, imports only
allow-listed globals, calls (REDUCE, NEWOBJ) only those globals, BUILDs only their results and OrderedDicts,
appends only to lists and sets items only on dicts. This module walks the same opcodes with the same rules,
but a global stays an inert `Global` marker and a call's result an inert `Built` one, so nothing in the file
runs. A pickle that passes here is one torch's loader reads; anything else (another opcode, another global,
a call on something that is not an allowed global) is refused at the byte where it appears.

The walk is bounded: every opcode costs at least one byte and the caller gives an opcode budget, so the work
is linear in the pickle's size and capped.
"""

import collections
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

# fmt: off
_DTYPES = (
    "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128", "bool",
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)
# Legacy storage classes and the bytes per element of each (the legacy format's data records need them).
STORAGE_ELEMENT_BYTES: dict[str, int] = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
    "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "QInt8": 1, "QUInt8": 1, "QInt32": 4,
    "QUInt4x2": 1, "QUInt2x4": 1,
}
_TENSORS = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
# fmt: on

# The part of torch's `_get_allowed_globals()` a plain tensor container needs: containers, dense tensors
# and parameters, storages, dtypes. (Sparse, quantized, nested, meta and numpy rebuilds are left out.)
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
    | {f"torch.{name}Storage" for name in STORAGE_ELEMENT_BYTES}
    | {f"torch.cuda.{name}Storage" for name in STORAGE_ELEMENT_BYTES if not name.startswith("Q")}
    | {f"torch.{name}Tensor" for name in _TENSORS}
)

# torch._utils.IMPORT_MAPPING and NAME_MAPPING: Python 2 names torch rewrites before looking a global up.
IMPORT_MAPPING: dict[str, str] = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "Queue": "queue",
    "repr": "reprlib",
    "_abcoll": "collections.abc",
    "UserDict": "collections",
    "UserList": "collections",
    "UserString": "collections",
    "whichdb": "dbm",
    "StringIO": "io",
    "cStringIO": "io",
}
NAME_MAPPING: dict[tuple[str, str], tuple[str, str]] = {
    ("__builtin__", "xrange"): ("builtins", "range"),
    ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"),
    ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"),
    ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"),
    ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"),
    ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"),
    ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
}

# Opcodes that build or call objects by other routes than the allowed ones: a file using them carries code.
_CODE_OPCODES = {
    b"i"[0]: "INST",
    b"o"[0]: "OBJ",
    b"\x93"[0]: "STACK_GLOBAL",
    b"\x82"[0]: "EXT1",
    b"\x83"[0]: "EXT2",
    b"\x84"[0]: "EXT4",
    b"P"[0]: "PERSID",
    b"\x92"[0]: "NEWOBJ_EX",
}
_MAX_GLOBAL_LINE = 512

Problem = Literal["not-a-checkpoint", "checkpoint-contains-code"]


class PickleRefused(Exception):
    def __init__(self, kind: Problem, detail: str, *, offending: str | None = None) -> None:
        super().__init__(detail)
        self.kind: Problem = kind
        self.detail = detail
        self.offending = offending


@dataclass(frozen=True)
class Global:
    """An allowed global, as named in the file; never imported."""

    name: str


@dataclass(frozen=True)
class Built:
    """What calling an allowed global would return (a tensor, a parameter, a storage type...)."""

    name: str


@dataclass(frozen=True)
class StorageRef:
    """A BINPERSID storage reference: ('storage', storage type, key, location, numel[, view])."""

    pid: tuple[Any, ...]


@dataclass
class PickleRead:
    value: Any
    end: int  # the offset just past STOP
    opcodes: int
    globals: set[str] = field(default_factory=set)
    storages: list[StorageRef] = field(default_factory=list)


def qualified_global(module: str, name: str) -> str:
    """`module.name` as torch looks it up, after its Python 2 renames."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _Walk:
    """One pickle, read from `data[start:]` with torch's weights-only rules and inert values."""

    def __init__(self, data: bytes | memoryview, start: int, max_opcodes: int, where: str) -> None:
        self.data = data
        self.pos = start
        self.max_opcodes = max_opcodes
        self.where = where
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.result = PickleRead(value=None, end=start, opcodes=0)

    def refuse(self, detail: str, kind: Problem = "not-a-checkpoint", offending: str | None = None) -> None:
        raise PickleRefused(kind, f"{self.where}: {detail}", offending=offending)

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            self.refuse("the pickle ends before its STOP opcode")
        chunk = bytes(self.data[self.pos : end])
        self.pos = end
        return chunk

    def line(self) -> str:
        data = self.data
        end = min(len(data), self.pos + _MAX_GLOBAL_LINE)
        for index in range(self.pos, end):
            if data[index] == 0x0A:
                raw = bytes(data[self.pos : index])
                self.pos = index + 1
                try:
                    return raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.refuse("a global whose name is not UTF-8")
        self.refuse("a global name without its end of line")
        raise AssertionError  # unreachable: refuse raises

    def pop(self) -> Any:
        if not self.stack:
            self.refuse("an opcode pops an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            self.refuse("an opcode reads an empty stack")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            self.refuse("an opcode pops to a MARK that was never set")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def run(self) -> PickleRead:
        handlers = _HANDLERS
        data = self.data
        while True:
            if self.pos >= len(data):
                self.refuse("the pickle ends before its STOP opcode")
            code = data[self.pos]
            at = self.pos
            self.pos += 1
            self.result.opcodes += 1
            if self.result.opcodes > self.max_opcodes:
                self.refuse(f"more than {self.max_opcodes} pickle opcodes, implausibly many for a checkpoint")
            if code == 0x2E:  # STOP
                self.result.value = self.pop()
                self.result.end = self.pos
                return self.result
            handler = handlers.get(code)
            if handler is None:
                self.unsupported(code, at)
            else:
                handler(self)

    def unsupported(self, code: int, at: int) -> None:
        if code in _CODE_OPCODES:
            name = _CODE_OPCODES[code]
            self.refuse(
                f"opcode {name} at byte {at} builds an object by a route weights-only loading refuses",
                "checkpoint-contains-code",
                offending=name,
            )
        self.refuse(f"opcode 0x{code:02x} at byte {at} is not one torch's weights-only loading reads")

    # --- globals and calls -------------------------------------------------------------------------------

    def op_global(self) -> None:
        module = self.line()
        name = self.line()
        qualified = qualified_global(module, name)
        self.result.globals.add(qualified)
        if qualified not in ALLOWED_GLOBALS:
            self.refuse(
                f"references {qualified}, which is not allowed in a checkpoint "
                "(only tensors, storages and plain containers are)",
                "checkpoint-contains-code",
                offending=qualified,
            )
        self.stack.append(Global(qualified))

    def call(self, what: str, func: Any, args: Any) -> Any:
        if not isinstance(func, Global):
            self.refuse(f"{what} on something that is not an allowed global", "checkpoint-contains-code")
        if type(args) is not tuple:
            self.refuse(f"{what} of {func.name} with arguments that are not a tuple")
        if func.name == "builtins.bytearray" and any(isinstance(arg, int) for arg in args):
            self.refuse("a bytearray built from a length, not from bytes")
        if func.name == "collections.OrderedDict" and not args:
            return collections.OrderedDict()
        if func.name == "collections.Counter" and not args:
            return collections.Counter()
        return Built(func.name)

    def op_reduce(self) -> None:
        args = self.pop()
        self.stack[-1] = self.call("REDUCE", self.top(), args)

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        self.stack.append(self.call("NEWOBJ", cls, args))

    def op_build(self) -> None:
        self.pop()
        if not isinstance(self.top(), Built | collections.OrderedDict):
            self.refuse(
                "BUILD on something other than a tensor, parameter or OrderedDict", "checkpoint-contains-code"
            )

    def op_binpersid(self) -> None:
        pid = self.pop()
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            self.refuse("a persistent id that is not a storage reference")
        if not isinstance(pid[1], Global) or not pid[1].name.endswith("Storage"):
            self.refuse("a storage reference without a storage type")
        reference = StorageRef(pid)
        self.result.storages.append(reference)
        self.stack.append(reference)

    # --- containers ----------------------------------------------------------------------------------------

    def op_append(self) -> None:
        item = self.pop()
        if type(self.top()) is not list:
            self.refuse("APPEND to something other than a list")
        self.stack[-1].append(item)

    def op_appends(self) -> None:
        items = self.pop_mark()
        if type(self.top()) is not list:
            self.refuse("APPENDS to something other than a list")
        self.stack[-1].extend(items)

    def set_items(self, items: list[Any]) -> None:
        target = self.top()
        if type(target) not in (dict, collections.OrderedDict, collections.Counter):
            self.refuse("SETITEM on something other than a dict")
        try:
            for index in range(0, len(items) - 1, 2):
                target[items[index]] = items[index + 1]
        except TypeError:
            self.refuse("a dict key that cannot be a key")

    def op_setitem(self) -> None:
        value = self.pop()
        key = self.pop()
        self.set_items([key, value])

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            self.refuse("SETITEMS with a key but no value")
        self.set_items(items)

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_tuple(self) -> None:
        items = self.pop_mark()
        self.stack.append(tuple(items))

    def tuple_of(self, size: int) -> None:
        if len(self.stack) < size:
            self.refuse("a tuple of more items than the stack holds")
        self.stack[-size:] = [tuple(self.stack[-size:])]

    # --- plain values -----------------------------------------------------------------------------------

    def op_binunicode(self) -> None:
        (size,) = struct.unpack("<I", self.take(4))
        try:
            self.stack.append(str(self.take(size), "utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            self.refuse("a string that is not UTF-8")

    def op_short_binstring(self) -> None:
        size = self.take(1)[0]
        try:
            self.stack.append(self.take(size).decode("utf-8"))
        except UnicodeDecodeError:
            self.refuse("a string that is not UTF-8")

    def op_long1(self) -> None:
        size = self.take(1)[0]
        self.stack.append(int.from_bytes(self.take(size), "little", signed=True))

    def op_get(self, width: int) -> None:
        raw = self.take(width)
        index = raw[0] if width == 1 else struct.unpack("<I", raw)[0]
        if index not in self.memo:
            self.refuse(f"a memo read of entry {index}, never written")
        self.stack.append(self.memo[index])

    def op_put(self, width: int) -> None:
        raw = self.take(width)
        index = raw[0] if width == 1 else struct.unpack("<I", raw)[0]
        self.memo[index] = self.top()


def _push(value: Any) -> Any:
    return lambda walk: walk.stack.append(value() if callable(value) else value)


def _unpacked(fmt: str) -> Any:
    size = struct.calcsize(fmt)
    return lambda walk: walk.stack.append(struct.unpack(fmt, walk.take(size))[0])


# The opcodes of torch's weights-only `Unpickler.load`, and nothing else (STOP is handled in the loop).
_HANDLERS: dict[int, Any] = {
    b"c"[0]: _Walk.op_global,
    b"\x81"[0]: _Walk.op_newobj,
    b"R"[0]: _Walk.op_reduce,
    b"b"[0]: _Walk.op_build,
    b"a"[0]: _Walk.op_append,
    b"e"[0]: _Walk.op_appends,
    b"s"[0]: _Walk.op_setitem,
    b"u"[0]: _Walk.op_setitems,
    b"("[0]: _Walk.op_mark,
    b"t"[0]: _Walk.op_tuple,
    b"\x85"[0]: lambda walk: walk.tuple_of(1),
    b"\x86"[0]: lambda walk: walk.tuple_of(2),
    b"\x87"[0]: lambda walk: walk.tuple_of(3),
    b"N"[0]: _push(None),
    b"\x89"[0]: _push(False),
    b"\x88"[0]: _push(True),
    b")"[0]: _push(()),
    b"]"[0]: _push(list),
    b"}"[0]: _push(dict),
    b"\x8f"[0]: _push(set),
    b"J"[0]: _unpacked("<i"),
    b"K"[0]: _unpacked("<B"),
    b"M"[0]: _unpacked("<H"),
    b"G"[0]: _unpacked(">d"),
    b"X"[0]: _Walk.op_binunicode,
    b"U"[0]: _Walk.op_short_binstring,
    b"Q"[0]: _Walk.op_binpersid,
    b"h"[0]: lambda walk: walk.op_get(1),
    b"j"[0]: lambda walk: walk.op_get(4),
    b"q"[0]: lambda walk: walk.op_put(1),
    b"r"[0]: lambda walk: walk.op_put(4),
    b"\x8a"[0]: _Walk.op_long1,
    b"\x80"[0]: lambda walk: walk.take(1),  # PROTO
}


def read_pickle(data: bytes | memoryview, start: int = 0, *, max_opcodes: int, where: str) -> PickleRead:
    """Walk the pickle at `data[start:]` up to its STOP; raise PickleRefused where torch's weights-only
    loader would refuse it, or where it would call anything but an allowed global."""
    return _Walk(data, start, max_opcodes, where).run()
