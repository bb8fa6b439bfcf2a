"""Fine-tuning a face-embedding backbone on labelled pairs with a contrastive loss."""

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from worker.ml.batching import image_grouped_batches, random_batches
from worker.ml.embedding import embed_pixels, select_device
from worker.ml.evaluation import score_pairs
from worker.ml.loss import contrastive_loss_from_cosine
from worker.ml.metrics import calibrate_threshold, pair_metrics
from worker.ml.pairs import IndexedPairs
from worker.ml.preprocessing import PreprocessSpec
from worker.ml.train_step import distinct_image_loss, stem_parameters


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tune.

    The original face library used lr 1e-4, 16 pairs a batch, 10 epochs and margin 1.0; all stay reachable.
    The default margin is 1.4, not 1.0: on L2-normalised embeddings a margin m only pushes negatives to
    cos ≤ 1 − m²/2, so 1.0 stops at cos 0.5 while positives keep being pulled together and the whole score
    scale contracts (measured on MobileFaceNet: mean negative cosine 0.09 → 0.57, accuracy at a fixed 0.4
    0.95 → 0.17). 1.4 (cos ≈ 0.02) keeps negatives where a pretrained model puts them and the scale intact.

    `freeze_stem` keeps the stem (the layers before the first stage) fixed; it also saves its backward pass.
    `group_by_image` arranges each batch around few images (see worker.ml.batching); off, batches are plain
    shuffles. Neither changes which pairs an epoch visits.
    """

    epochs: int = 10
    learning_rate: float = 1e-4
    batch_size: int = 16
    margin: float = 1.4
    seed: int = 0
    patience: int = 3
    weight_decay: float = 0.0
    freeze_stem: bool = False
    distill_weight: float = 0.0
    group_by_image: bool = True
    embed_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "embed_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.distill_weight < 0:
            raise ValueError("learning_rate, weight_decay and distill_weight must not be negative")
        if not 0 < self.margin <= 2:
            raise ValueError(f"margin must be in (0, 2] (distances between unit vectors), got {self.margin}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training parameters: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class TrainProgress:
    """Where a fine-tune is. Phase "train" during steps (loss: the epoch's running mean so far); phase "epoch"
    once per epoch after validation, with the epoch's train loss and its val figures (None without val)."""

    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None
    val_loss: float | None = None
    val_auc: float | None = None


class TrainingCancelled(Exception):
    """Raised between steps when the caller's should_cancel() says so."""


@dataclass
class EpochRecord:
    epoch: int  # 0: the starting weights, before any step
    train_loss: float | None
    val_loss: float | None
    val_auc: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    best_state: dict[str, Tensor]
    final_state: dict[str, Tensor]
    best_epoch: int
    threshold: float | None
    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def train_losses(self) -> list[float]:
        return [r.train_loss for r in self.history if r.train_loss is not None]


@dataclass
class _Validation:
    loss: float
    auc: float | None
    scores: np.ndarray

    def beats(self, other: "_Validation") -> bool:
        """Higher val AUC wins; equal (or undefined) AUC falls back to lower val loss."""
        if self.auc is not None and other.auc is not None and self.auc != other.auc:
            return self.auc > other.auc
        if self.auc is not None and other.auc is None:
            return True
        return self.loss < other.loss


class _Throttled:
    """Calls progress at most every `interval` seconds, except for reports that must go through."""

    def __init__(self, callback: Callable[[TrainProgress], None] | None, interval: float) -> None:
        self.callback = callback
        self.interval = interval
        self.last = -float("inf")

    def __call__(self, update: TrainProgress, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.callback is not None and (force or now - self.last >= self.interval):
            self.last = now
            self.callback(update)


def finetune(
    model: nn.Module,
    spec: PreprocessSpec,
    train: IndexedPairs,
    val: IndexedPairs | None,
    config: TrainConfig,
    *,
    progress: Callable[[TrainProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
    progress_interval: float = 0.5,
) -> FinetuneResult:
    """Fine-tune `model` in place with Adam on the contrastive loss; BatchNorm and dropout stay in eval mode.

    MagFace builds its BatchNorms with momentum 0.9, so a train-mode pass over 16 pairs would replace most of
    the running statistics; eval mode keeps them and still lets gradients through. With `val`, each epoch is
    validated (val loss and AUC), the best epoch is kept (the starting weights count as epoch 0, so a fine-tune
    that only hurts returns them), training stops after `patience` epochs without improvement, and the
    threshold is calibrated on val scores of the best state. On return the model holds `best_state` and stays
    on `device` (default: the GPU when there is one). Repeatable on the CPU: same seed, same history.
    """
    if len(train) == 0:
        raise ValueError("no training pairs")
    if val is not None and len(val) == 0:
        val = None
    target = select_device(str(device) if device is not None else None)
    model.to(target)
    model.eval()
    report = _Throttled(progress, progress_interval)
    cancel = should_cancel or (lambda: False)
    frozen = stem_parameters(model) if config.freeze_stem else []
    previous_flags = [p.requires_grad for p in frozen]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        return _run(model, spec, train, val, config, target, report, cancel)
    finally:
        for parameter, flag in zip(frozen, previous_flags, strict=True):
            parameter.requires_grad_(flag)


def _run(
    model: nn.Module,
    spec: PreprocessSpec,
    train: IndexedPairs,
    val: IndexedPairs | None,
    config: TrainConfig,
    device: torch.device,
    report: _Throttled,
    cancel: Callable[[], bool],
) -> FinetuneResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    pixels = train.pixels.to(device)
    labels = train.labels.to(device)
    first, second = train.first.to(device), train.second.to(device)
    anchors = None
    if config.distill_weight > 0:
        anchors = embed_pixels(model, spec, train.pixels, batch_size=config.embed_batch_size).embeddings.to(
            device
        )

    best = _validate(model, spec, val, config, device) if val is not None else None
    history = [EpochRecord(0, None, best.loss, best.auc)] if best is not None else []
    best_state, best_epoch, stale = _cpu_state(model), 0, 0
    stopped_early = False
    for epoch in range(1, config.epochs + 1):
        batches = _plan_epoch(train, config, epoch)
        total, seen = 0.0, 0
        for step, batch in enumerate(batches, start=1):
            if cancel():
                raise TrainingCancelled(f"cancelled in epoch {epoch}, before step {step} of {len(batches)}")
            index = batch.to(device)
            loss = distinct_image_loss(
                model,
                spec,
                pixels,
                first[index],
                second[index],
                labels[index],
                config.margin,
                anchors=anchors,
                anchor_weight=config.distill_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.numel()
            seen += batch.numel()
            report(TrainProgress("train", epoch, config.epochs, step, len(batches), total / seen))
        train_loss = total / len(train)
        if val is None:
            history.append(EpochRecord(epoch, train_loss, None, None))
            report(
                TrainProgress("epoch", epoch, config.epochs, len(batches), len(batches), train_loss),
                force=True,
            )
            best_epoch = epoch
            continue
        if cancel():
            raise TrainingCancelled(f"cancelled after epoch {epoch}, before validation")
        current = _validate(model, spec, val, config, device)
        history.append(EpochRecord(epoch, train_loss, current.loss, current.auc))
        report(
            TrainProgress(
                "epoch",
                epoch,
                config.epochs,
                len(batches),
                len(batches),
                train_loss,
                current.loss,
                current.auc,
            ),
            force=True,
        )
        if current.beats(best):
            best, best_state, best_epoch, stale = current, _cpu_state(model), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                stopped_early = epoch < config.epochs
                break
    final_state = _cpu_state(model)
    if val is None:
        best_state = final_state
    else:
        model.load_state_dict(best_state)
    threshold = calibrate_threshold(best.scores, val.labels.numpy()) if best is not None else None
    return FinetuneResult(best_state, final_state, best_epoch, threshold, history, stopped_early)


def _plan_epoch(train: IndexedPairs, config: TrainConfig, epoch: int) -> list[Tensor]:
    rng = np.random.default_rng([config.seed, epoch])
    if config.group_by_image:
        return image_grouped_batches(train.first, train.second, config.batch_size, rng)
    return random_batches(len(train), config.batch_size, rng)


def _validate(
    model: nn.Module, spec: PreprocessSpec, val: IndexedPairs, config: TrainConfig, device: torch.device
) -> _Validation:
    scores = score_pairs(model, spec, val, batch_size=config.embed_batch_size, device=device)
    labels = val.labels.numpy()
    loss = float(contrastive_loss_from_cosine(torch.from_numpy(scores), val.labels, config.margin))
    auc = pair_metrics(scores, labels, None)["roc_auc"] if len(val) else None
    return _Validation(loss, auc, scores)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
