"""Read a checkpoint's tensor names and shapes without torch, and say which architecture they fit.

The pickle is unpickled, but by an unpickler whose `find_class` hands out inert stand-ins for the globals
`app.models.checkpoint_scan` allows and refuses every other one, and whose storages are never read: a tensor
becomes its shape and nothing in the file can run. Run it only on a file `scan_checkpoint` has passed.
Keys are read the way the worker's `read_state_dict` reads them (MagFace's prefixes stripped, classifier
heads dropped), and compared with `architectures.json`, which the backbones themselves generate.
"""

import codecs
import collections
import json
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import IO, Any, TypeVar

from app.models.checkpoint_scan import (
    ALLOWED_GLOBALS,
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    MAX_PICKLE_BYTES,
    checkpoint_format,
    qualified_global,
)

Shape = tuple[int, ...]
V = TypeVar("V")
# The same rules as worker/ml/checkpoints.py, which holds the torch-side reading.
# MagFace's distributed trainer writes the first, its single-node (DataParallel) trainer the second.
MAGFACE_KEY_PREFIXES = ("features.module.", "module.features.")
# Classifier heads MagFace stores next to the backbone (outside its prefix); fine-tuning never needs them.
HEAD_KEYS = frozenset({"parallel_fc.weight", "module.fc.weight", "fc.weight"})


class KeysUnreadable(Exception):
    """The checkpoint's layout is not one this reader knows; the worker's strict load decides instead."""


@dataclass(frozen=True)
class TensorInfo:
    shape: Shape


@dataclass(frozen=True)
class _Marker:
    """What a storage, dtype, device or tensor type reads as: a name, nothing callable."""

    name: str


def _tensor(storage: object, offset: int, size: tuple[int, ...], stride: object, *_: object) -> TensorInfo:
    if not isinstance(storage, _Marker) or not all(type(n) is int and n >= 0 for n in size):
        raise KeysUnreadable("a tensor rebuilt from something other than a storage and a shape")
    return TensorInfo(shape=tuple(size))


def _parameter(data: object, *_: object) -> object:
    return data


def _from_type(
    func: Callable[..., object], new_type: object, args: tuple[object, ...], state: object
) -> object:
    if func is not _parameter and func is not _tensor:
        raise KeysUnreadable("a tensor subclass rebuilt by something other than a tensor rebuild")
    return func(*args)


def _bytearray(data: object = b"") -> bytearray:
    if isinstance(data, int):  # bytearray(n) would allocate n bytes the file never held
        raise KeysUnreadable("a bytearray built from a length")
    return bytearray(data)  # type: ignore[arg-type]


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):  # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
        raise KeysUnreadable(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


_STANDINS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": collections.Counter,
    "_codecs.encode": _encode,
    "builtins.bytearray": _bytearray,
    "builtins.set": set,
    "builtins.complex": complex,
    "torch.Size": tuple,
    "torch.nn.parameter.Parameter": _parameter,
    "torch._utils._rebuild_tensor": _tensor,
    "torch._utils._rebuild_tensor_v2": _tensor,
    "torch._utils._rebuild_tensor_v3": _tensor,
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
    "torch._tensor._rebuild_from_type_v2": _from_type,
}


class _BoundedReader:
    """A read-only view that refuses to hand out more than `limit` bytes, whatever lengths a pickle claims."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._left = limit

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise KeysUnreadable("the checkpoint's pickle is implausibly large")
        return data

    def read(self, size: int = -1) -> bytes:
        size = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.read(size))

    def readline(self, size: int = -1) -> bytes:
        size = self._left + 1 if size < 0 else min(size, self._left + 1)
        return self._take(self._stream.readline(size))


class _KeysUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        qualified = qualified_global(module, name)
        if qualified not in ALLOWED_GLOBALS:
            raise KeysUnreadable(f"{qualified} is not an allowed global")
        return _STANDINS.get(qualified, _Marker(qualified))

    def persistent_load(self, pid: Any) -> _Marker:
        # ('storage', type, key, location, numel), with the legacy format's view metadata as a sixth item
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise KeysUnreadable(f"an unexpected persistent id {pid!r:.80}")
        if not isinstance(pid[1], _Marker):
            raise KeysUnreadable("a storage of an unknown type")
        return _Marker(f"storage {pid[2]}")


def _load_zip_pickle(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1 or archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
                raise KeysUnreadable("no single, reasonably sized <name>/data.pkl")
            with archive.open(pickles[0]) as stream:
                return _KeysUnpickler(stream).load()
    except KeysUnreadable:
        raise
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError) as exc:
        raise KeysUnreadable(f"unreadable: {exc}") from exc
    except Exception as exc:  # stand-ins called with arguments a torch.save never writes
        raise KeysUnreadable(f"{type(exc).__name__}: {exc}") from exc


def _load_legacy_pickle(path: Path) -> Any:
    """The object pickle of a pre-1.6 file: it follows the magic number, protocol and system-info pickles."""
    try:
        with path.open("rb") as stream:
            unpickler = _KeysUnpickler(_BoundedReader(stream, MAX_PICKLE_BYTES))
            if unpickler.load() != LEGACY_MAGIC_NUMBER or unpickler.load() != LEGACY_PROTOCOL_VERSION:
                raise KeysUnreadable("not a legacy PyTorch checkpoint")
            unpickler.load()
            return unpickler.load()
    except KeysUnreadable:
        raise
    except Exception as exc:  # includes the scan's refusal of an implausibly large pickle
        raise KeysUnreadable(f"{type(exc).__name__}: {exc}") from exc


def raw_tensor_shapes(path: Path) -> dict[str, Shape]:
    """{key: shape} of the state_dict as stored (prefixes and heads kept), from a bare or MagFace-style dict.

    Raises KeysUnreadable for anything but a dict of named tensors in torch.save's zip or legacy format.
    """
    payload = _load_zip_pickle(path) if checkpoint_format(path) == "zip" else _load_legacy_pickle(path)
    if isinstance(payload, Mapping) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload:
        raise KeysUnreadable("no state_dict of tensors")
    shapes: dict[str, Shape] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or not isinstance(value, TensorInfo):
            raise KeysUnreadable(f"entry {key!r:.80} is not a named tensor")
        shapes[key] = value.shape
    return shapes


@cache
def architecture_table() -> dict[str, dict[str, Shape]]:
    """Architecture → {bare state_dict key: shape}, as `python -m worker.ml.backbones.export_keys` wrote."""
    text = resources.files("app.models").joinpath("architectures.json").read_text(encoding="utf-8")
    return {arch: {k: tuple(s) for k, s in keys.items()} for arch, keys in json.loads(text).items()}


@dataclass(frozen=True)
class Fit:
    arch: str
    expected: int
    found: int
    missing: list[str]
    unexpected: list[str]
    reshaped: list[str]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped)

    @property
    def differences(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.reshaped)

    def describe(self) -> str:
        parts = [f"{self.expected} tensors expected, {self.found} found"]
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} such as {keys[0]}")
        if self.reshaped:
            parts.append(f"{len(self.reshaped)} with another shape such as {self.reshaped[0]}")
        return f"{parts[0]}; {', '.join(parts[1:])}" if len(parts) > 1 else parts[0]


def compare(shapes: Mapping[str, Shape], arch: str, expected: Mapping[str, Shape] | None = None) -> Fit:
    """How `shapes` differ from `arch`'s keys (the shipped table, unless the caller has the real one)."""
    expected = architecture_table()[arch] if expected is None else expected
    return Fit(
        arch=arch,
        expected=len(expected),
        found=len(shapes),
        missing=[k for k in expected if k not in shapes],
        unexpected=[k for k in shapes if k not in expected],
        reshaped=[k for k, shape in shapes.items() if k in expected and shape != expected[k]],
    )


def fitting_arch(shapes: Mapping[str, Shape]) -> str | None:
    return next((arch for arch in architecture_table() if compare(shapes, arch).exact), None)


def _candidate_prefixes(keys: list[str]) -> list[str]:
    prefixes = [p for p in MAGFACE_KEY_PREFIXES if 2 * sum(k.startswith(p) for k in keys) > len(keys)]
    if keys and all(k.startswith("module.") for k in keys):
        prefixes.append("module.")
    return [*prefixes, ""]


def _strip(entries: Mapping[str, V], prefix: str) -> dict[str, V] | None:
    """Bare backbone keys under `prefix`, head dropped; None when two keys would collide."""
    backbone: dict[str, V] = {}
    for key, value in entries.items():
        if prefix and key.startswith(prefix):
            bare = key[len(prefix) :]
        elif key in HEAD_KEYS and (prefix or key != "fc.weight"):
            continue
        else:
            bare = key
        if bare in backbone:
            return None
        backbone[bare] = value
    return backbone


def key_readings(entries: Mapping[str, V]) -> list[dict[str, V]]:
    """Every way to read the keys as a bare backbone: with MagFace's wrapper prefix stripped (decided for
    the whole dict, so the backbone's own `fc.weight` is kept while a head next to prefixed keys is dropped)
    and as they are. Values (tensors or shapes) are carried along untouched."""
    return [r for p in _candidate_prefixes(list(entries)) if (r := _strip(entries, p)) is not None]


def backbone_shapes(shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Bare backbone keys: the reading of the prefixes that fits a known architecture, else the first."""
    readings = key_readings(shapes)
    if not readings:
        raise KeysUnreadable("the same tensor name appears with and without its key prefix")
    return next((r for r in readings if fitting_arch(r)), readings[0])


def checkpoint_shapes(path: Path) -> dict[str, Shape]:
    """The backbone's {bare key: shape} in the checkpoint at `path`; raises KeysUnreadable."""
    return backbone_shapes(raw_tensor_shapes(path))
