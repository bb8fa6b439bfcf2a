"""Reading and writing backbone checkpoints in MagFace's layout.

A checkpoint is untrusted input: it is only ever read with ``torch.load(..., weights_only=True)``, so a
file that pickles code is refused before anything in it runs. Files are written the way MagFace's trainer
writes them (``{"epoch", "arch", "state_dict"}``, iResNet keys under ``features.module.``) so MagFace's own
tools read them, with this service's metadata alongside under ``"magtune"``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from app.durable import durable_write
from app.models.checkpoint_keys import Fit, Shape, compare, key_readings
from worker.ml.backbones import ARCHITECTURES, build_backbone, embedding_size, is_iresnet

METADATA_KEY = "magtune"
IRESNET_KEY_PREFIX = "features.module."
_PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for the requested backbone; the message is one sentence."""

    def __init__(self, message: str, *, suggested_arch: str | None = None) -> None:
        super().__init__(message)
        self.suggested_arch = suggested_arch


@dataclass(frozen=True)
class CheckpointContents:
    state_dict: dict[str, Tensor]
    """Backbone tensors with bare keys (prefix stripped, head dropped)."""
    metadata: dict[str, Any]
    epoch: int | None
    recorded_arch: str | None
    sha256: str


@dataclass
class LoadedBackbone:
    model: nn.Module
    arch: str
    metadata: dict[str, Any]
    sha256: str
    epoch: int | None = None


@cache
def expected_tensors(arch: str) -> dict[str, tuple[Shape, torch.dtype]]:
    """Key → (shape, dtype) of a backbone's state_dict, read off a weightless (meta-device) build."""
    with torch.device("meta"):
        model = build_backbone(arch)
    return {key: (tuple(value.shape), value.dtype) for key, value in model.state_dict().items()}


def backbone_state_dict(state_dict: Mapping[str, Tensor], *, name: str = "state_dict") -> dict[str, Tensor]:
    """Strip the wrapper prefix MagFace's trainers add and drop the classifier head.

    The prefix is decided for the whole dict before anything is dropped: the backbone's own ``fc.weight``
    (Linear 25088→512) is kept, while a ``module.fc.weight`` or ``parallel_fc.weight`` next to prefixed
    backbone keys is the head. Where several readings are possible (a DataParallel-wrapped MobileFaceNet
    also has a majority of ``module.features.`` keys), the one that fits a known architecture wins.
    """
    readings = key_readings(state_dict)
    if not readings:
        raise CheckpointError(f"checkpoint {name} holds the same tensor name with and without its key prefix")
    return next((r for r in readings if _fitting_arch(r)), readings[0])


def _shapes(state_dict: Mapping[str, Tensor]) -> dict[str, Shape]:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


def _compare(state_dict: Mapping[str, Tensor], arch: str) -> Fit:
    """Against the shipped shape table (tests/worker/ml/test_architecture_table.py holds it equal to the
    builds): telling which architecture a file fits builds none, which in a fresh job process cost seconds
    per architecture tried (a meta-device iResNet100 included)."""
    return compare(_shapes(state_dict), arch)


def _fitting_arch(bare: Mapping[str, Tensor]) -> str | None:
    return next((arch for arch in ARCHITECTURES if _compare(bare, arch).exact), None)


def detect_architecture(state_dict: Mapping[str, Tensor]) -> str | None:
    """The architecture whose key set and shapes match exactly (prefixes and head keys are ignored)."""
    return _fitting_arch(backbone_state_dict(state_dict))


def _loader_detail(message: str) -> str:
    """The reason in torch's weights-only refusal, without its advice to turn the safeguard off."""
    _, marker, reason = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if marker else message).splitlines() if line.strip()]
    return lines[0][:200] if lines else "unreadable pickle"


def _safe_load(data: bytes, name: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol warnings for pickles torch did not write
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if found := re.search(r"GLOBAL ([\w.]+)", str(exc)):
            raise CheckpointError(
                f"checkpoint {name} carries pickled code or objects other than tensors ({found.group(1)}) "
                "and was refused without running it"
            ) from None
        raise CheckpointError(f"{name} is not a PyTorch checkpoint ({_loader_detail(str(exc))})") from None
    except Exception as exc:  # torch raises many kinds on foreign or truncated files
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{name} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first_line})"
        ) from exc


def _unpack(payload: Any, name: str) -> tuple[Mapping[Any, Any], dict[str, Any], int | None, str | None]:
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"checkpoint {name} holds a {type(payload).__name__}, not a state_dict")
    if "state_dict" not in payload:
        return payload, {}, None, None
    metadata = payload.get(METADATA_KEY) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {name} has {METADATA_KEY!r} metadata that is not a dict")
    epoch = payload.get("epoch")
    arch = payload.get("arch")
    return (
        payload["state_dict"],
        metadata,
        epoch if type(epoch) is int else None,
        arch if isinstance(arch, str) else None,
    )


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointContents:
    """Read a bare state_dict or a MagFace-style dict, hashing exactly the bytes that were loaded."""
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {name} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {name} cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise CheckpointError(f"checkpoint {name} is empty")
    sha256 = hashlib.sha256(data).hexdigest()
    state_dict, metadata, epoch, recorded_arch = _unpack(_safe_load(data, name), name)
    del data
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"checkpoint {name} holds no tensors in its state_dict")
    stray = next(
        (k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None
    )
    if stray is not None:
        raise CheckpointError(f"checkpoint {name} is not a state_dict: entry {stray!r} is not a named tensor")
    return CheckpointContents(
        state_dict=backbone_state_dict(state_dict, name=name),
        metadata=metadata,
        epoch=epoch,
        recorded_arch=recorded_arch,
        sha256=sha256,
    )


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(backbone state_dict with bare keys, this service's metadata or ``{}``)."""
    contents = read_checkpoint(path)
    return contents.state_dict, contents.metadata


def _fit_error(name: str, fit: Fit, state_dict: Mapping[str, Tensor]) -> CheckpointError:
    fitting = _fitting_arch(state_dict)
    hint = f"it fits {fitting}" if fitting else f"it fits none of {', '.join(ARCHITECTURES)}"
    return CheckpointError(
        f"checkpoint {name} does not fit {fit.arch} ({fit.describe()}); {hint}", suggested_arch=fitting
    )


def _choose_arch(contents: CheckpointContents, name: str) -> str:
    detected = _fitting_arch(contents.state_dict)
    if detected:
        return detected
    recorded = contents.metadata.get("architecture") or contents.recorded_arch
    if recorded in ARCHITECTURES:
        return recorded
    closest = min(
        (_compare(contents.state_dict, arch) for arch in ARCHITECTURES), key=lambda f: f.differences
    )
    raise CheckpointError(
        f"checkpoint {name} fits none of {', '.join(ARCHITECTURES)} "
        f"(closest is {closest.arch}: {closest.describe()})"
    )


def _adopt(tensors: dict[str, Tensor], expected: dict[str, tuple[Shape, torch.dtype]]) -> dict[str, Tensor]:
    """The loaded tensors, to become the model's own: each is copied only where it is a view, shares its
    storage with another, or has another dtype, so no parameter aliases another or the loaded file."""
    seen: set[int] = set()
    owned: dict[str, Tensor] = {}
    for key in list(tensors):
        tensor = tensors.pop(key).detach()
        dtype = expected[key][1]
        storage = tensor.untyped_storage()
        if (
            tensor.dtype != dtype
            or not tensor.is_contiguous()
            or tensor.storage_offset() != 0
            or storage.nbytes() != tensor.numel() * tensor.element_size()
            or storage.data_ptr() in seen
        ):
            tensor = torch.empty(tensor.shape, dtype=dtype).copy_(tensor)
        seen.add(tensor.untyped_storage().data_ptr())
        owned[key] = tensor
    return owned


def load_backbone(path: str | os.PathLike[str], arch: str | None = None) -> LoadedBackbone:
    """Build ``arch`` (or the architecture the file fits) and load the file into it strictly, in eval mode."""
    if arch is not None:
        embedding_size(arch)  # ValueError naming the known architectures
    name = Path(path).name
    contents = read_checkpoint(path)
    state = contents.state_dict
    arch = arch or _choose_arch(contents, name)
    fit = _compare(state, arch)
    if not fit.exact:
        raise _fit_error(name, fit, state)
    expected = expected_tensors(arch)
    # Built without weights: the loaded tensors become the parameters, with no random init to overwrite.
    with torch.device("meta"):
        model = build_backbone(arch)
    model.load_state_dict(_adopt(state, expected), strict=True, assign=True)
    return LoadedBackbone(
        model=model.eval(),
        arch=arch,
        metadata=contents.metadata,
        sha256=contents.sha256,
        epoch=contents.epoch,
    )


def _check_plain(value: Any, where: str) -> None:
    """Reject what ``weights_only`` loading could not read back (numpy scalars, Paths, enums, objects)."""
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where} has a key {key!r} that is not a str")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoint metadata takes only str, int, float, bool, None, "
        "list, tuple and dict"
    )


class Writable(Protocol):
    """What ``torch.save`` writes to: a durable file, or a blob being staged in the blob store."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


def _payload(model: nn.Module, *, arch: str, epoch: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """``model`` in MagFace's layout with ``metadata`` under ``"magtune"``, checked before a byte is written.

    ``architecture`` and ``embedding_size`` are added to the metadata (a conflicting value is an error).
    """
    arch = str(arch)  # an exact str: an Architecture member would be pickled, and weights_only refuses it
    expected = expected_tensors(arch)
    state = model.state_dict()
    fit = _compare(state, arch)
    if not fit.exact:
        raise ValueError(f"model does not fit {arch} ({fit.describe()})")
    _check_plain(metadata, "metadata")
    facts = {"architecture": arch, "embedding_size": embedding_size(arch)}
    for key, value in facts.items():
        if key in metadata and metadata[key] != value:
            raise ValueError(f"metadata[{key!r}] is {metadata[key]!r} but the model is {key} {value!r}")
    prefix = IRESNET_KEY_PREFIX if is_iresnet(arch) else ""
    return {
        "epoch": int(epoch),
        "arch": arch,
        "state_dict": {prefix + key: state[key].detach().to("cpu").contiguous() for key in expected},
        METADATA_KEY: {**facts, **metadata},
    }


def write_checkpoint(
    stream: Writable, model: nn.Module, *, arch: str, epoch: int, metadata: dict[str, Any]
) -> None:
    """Serialise ``model`` in MagFace's layout into ``stream`` in one pass, e.g. into a staged blob."""
    torch.save(_payload(model, arch=arch, epoch=epoch, metadata=metadata), stream)


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, *, arch: str, epoch: int, metadata: dict[str, Any]
) -> str:
    """Write ``model`` in MagFace's layout to ``path``, whole or not at all; returns the file's sha256."""
    payload = _payload(model, arch=arch, epoch=epoch, metadata=metadata)
    with durable_write(path) as stream:
        torch.save(payload, stream)
    return stream.sha256
