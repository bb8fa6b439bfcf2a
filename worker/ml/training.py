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

SELECTIONS = ("val", "interpolate")


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tune.

    The original face library used lr 1e-4, 16 pairs a batch, 10 epochs and margin 1.0; all stay reachable
    (`margin=1.0, distill_weight=0` is the original objective). Defaults and why, measured with the shared
    MobileFaceNet on the johns faces, split per image 0.6/0.2/0.2:

    - margin 1.4, not 1.0: on unit vectors a margin m only pushes negatives to cos ≤ 1 − m²/2, so 1.0 stops
      at cos 0.5 while positives keep being pulled in and the whole score scale contracts (accuracy at a
      fixed 0.4 fell 0.95 → 0.17); 1.4 stops at cos ≈ 0.02, where a pretrained model puts negatives.
    - distill_weight 1.0: each training face is also pulled towards its parent's embedding. Fine-tuned on 3
      of the 5 people with the contrastive loss alone, pairs among the 2 others lost up to 0.0086 AUC (the
      promotion gate allows 0.002) and their mean negative cosine rose from 0.13–0.22 to about 0.5; with
      distillation every split measured gained AUC (+0.001 to +0.028) and negatives moved by 0.02–0.08,
      while the held-out test of the full split still went AUC 0.997 → 1.000, EER 0.019 → 0.
    - freeze_stem off: freezing the layers before the first stage changed neither figure measurably (AUC on
      the unseen people within 0.0012 either way); it does halve a CPU step (no backward at 56×56), so it is
      worth turning on where CPU time matters.
    - group_by_image on: batches arranged around few images (worker.ml.batching) cost fewer forwards for
      the same pairs; off gives plain shuffles. Every epoch still visits every pair once.
    - selection "val": the epoch with the best val AUC is kept (the starting weights count as epoch 0), and
      training stops after `patience` epochs without improvement. "interpolate" trains every epoch and keeps
      the starting weights moved `interpolation` of the way to the last epoch's (a weight-space ensemble of
      parent and fine-tune, as in WiSE-FT); val then only calibrates the threshold and is reported per epoch.
      On val sets of a few same pairs the best-val epoch is noise: over eight CMU training sets (100 or 200
      pairs from the review queue or at random, three seeds, 10 + 10 or 3 + 30 val pairs;
      bench/active_learning_probe.py, README "Choosing the weights") val's pick gained 0.010 AUC over the
      parent on average and once fell below it; the halfway point gained 0.022 and was above it every time.
    """

    epochs: int = 10
    learning_rate: float = 1e-4
    batch_size: int = 16
    margin: float = 1.4
    seed: int = 0
    patience: int = 3
    weight_decay: float = 0.0
    freeze_stem: bool = False
    distill_weight: float = 1.0
    group_by_image: bool = True
    embed_batch_size: int = 64
    selection: str = "val"
    interpolation: float = 0.5

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "embed_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.distill_weight < 0:
            raise ValueError("learning_rate, weight_decay and distill_weight must not be negative")
        if not 0 < self.margin <= 2:
            raise ValueError(f"margin must be in (0, 2] (distances between unit vectors), got {self.margin}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if not 0 < self.interpolation <= 1:
            raise ValueError(f"interpolation must be in (0, 1], got {self.interpolation}")

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
    # The starting weights' val scores (epoch 0), so a caller calibrating the parent on val need not embed
    # val again; None without val or when resumed (an earlier attempt scored epoch 0).
    start_scores: np.ndarray | None = None

    @property
    def train_losses(self) -> list[float]:
        return [r.train_loss for r in self.history if r.train_loss is not None]


@dataclass
class TrainerState:
    """Everything a fine-tune needs to go on after epoch `epoch` as if it had never stopped.

    A retried job resumes from the last one instead of training from scratch, which on a GPU can be hours.
    Weights, Adam's moments and step counts, the torch RNG, the best epoch so far (weights, val figures and
    scores, for the threshold) and the patience count. `to_dict()` holds only tensors and plain values, so
    `torch.load(weights_only=True)` reads it back; the batches of an epoch come from `(seed, epoch)` alone.
    """

    epoch: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: Tensor
    best_state: dict[str, Tensor]
    best_epoch: int
    best_loss: float | None
    best_auc: float | None
    best_scores: Tensor | None
    stale: int
    history: list[EpochRecord]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "history": [record.to_dict() for record in self.history]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainerState":
        return cls(**{**data, "history": [EpochRecord(**record) for record in data["history"]]})

    def best(self) -> "_Validation | None":
        if self.best_loss is None or self.best_scores is None:
            return None
        return _Validation(self.best_loss, self.best_auc, self.best_scores.numpy())


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
    resume: TrainerState | None = None,
    on_epoch_end: Callable[[TrainerState], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` in place with Adam on the contrastive loss; BatchNorm and dropout stay in eval mode.

    MagFace builds its BatchNorms with momentum 0.9, so a train-mode pass over 16 pairs would replace most of
    the running statistics; eval mode keeps them and still lets gradients through. With `val`, every epoch is
    validated (val loss and AUC) and the best one kept; the starting weights count as epoch 0, so a fine-tune
    that only hurts gives them back. Training stops after `patience` epochs without improvement, and the
    threshold is calibrated on the val scores of the best state. On return the model holds `best_state` and
    stays on `device` (default: the GPU when there is one). Repeatable on the CPU: same seed, same history.

    `on_epoch_end` gets a `TrainerState` after every epoch; passing the last one as `resume`, with the same
    starting `model`, pairs and config, goes on from the next epoch and ends as the uninterrupted run would.
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
        epoch_end = on_epoch_end or (lambda _state: None)
        return _run(model, spec, train, val, config, target, report, cancel, resume, epoch_end)
    finally:
        for parameter, flag in zip(frozen, previous_flags, strict=True):
            parameter.requires_grad_(flag)


@dataclass
class _TrainingSet:
    """The training pairs on the device, plus the parent's embeddings of their images when distilling."""

    pixels: Tensor
    first: Tensor
    second: Tensor
    labels: Tensor
    anchors: Tensor | None

    def loss(self, model: nn.Module, spec: PreprocessSpec, batch: Tensor, config: TrainConfig) -> Tensor:
        index = batch.to(self.labels.device)
        return distinct_image_loss(
            model,
            spec,
            self.pixels,
            self.first[index],
            self.second[index],
            self.labels[index],
            config.margin,
            anchors=self.anchors,
            anchor_weight=config.distill_weight,
        )


def _run(
    model: nn.Module,
    spec: PreprocessSpec,
    train: IndexedPairs,
    val: IndexedPairs | None,
    config: TrainConfig,
    device: torch.device,
    report: _Throttled,
    cancel: Callable[[], bool],
    resume: TrainerState | None,
    on_epoch_end: Callable[[TrainerState], None],
) -> FinetuneResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    anchors = None
    if config.distill_weight > 0:  # the starting model's embeddings, also when resuming
        anchors = embed_pixels(model, spec, train.pixels, batch_size=config.embed_batch_size).embeddings
    data = _TrainingSet(
        *(t.to(device) for t in (train.pixels, train.first, train.second, train.labels)),
        anchors=anchors.to(device) if anchors is not None else None,
    )
    interpolate = config.selection == "interpolate"
    start_state = _cpu_state(model) if interpolate else {}  # the starting model, also when resuming
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.rng)
        best, best_state, history = resume.best(), resume.best_state, list(resume.history)
        start, best_epoch, stale = resume.epoch + 1, resume.best_epoch, resume.stale
        start_scores = None
    else:
        best = _validate(model, spec, val, config, device) if val is not None else None
        start_scores = best.scores if best is not None else None
        history = [EpochRecord(0, None, best.loss, best.auc)] if best is not None else []
        best_state = (start_state or _cpu_state(model)) if val is not None else {}  # one copy of the start
        start, best_epoch, stale = 1, 0, 0
    stopped_early = stale >= config.patience and start <= config.epochs  # an earlier attempt stopped here
    for epoch in range(start, config.epochs + 1) if not stopped_early else ():
        batches = _plan_epoch(train, config, epoch)
        train_loss = _train_epoch(model, spec, data, optimizer, batches, epoch, config, report, cancel)
        current = None
        if val is not None:
            if cancel():
                raise TrainingCancelled(f"cancelled after epoch {epoch}, before validation")
            current = _validate(model, spec, val, config, device)
        val_loss, val_auc = (current.loss, current.auc) if current is not None else (None, None)
        history.append(EpochRecord(epoch, train_loss, val_loss, val_auc))
        steps = len(batches)
        summary = TrainProgress("epoch", epoch, config.epochs, steps, steps, train_loss, val_loss, val_auc)
        report(summary, force=True)
        if current is None or interpolate:
            best_epoch = epoch
        elif current.beats(best):
            best, best_state, best_epoch, stale = current, _cpu_state(model), epoch, 0
        else:
            stale += 1
        on_epoch_end(_state_after(epoch, model, optimizer, best_state, best_epoch, best, stale, history))
        if stale >= config.patience:
            stopped_early = epoch < config.epochs
            break
    final_state = _cpu_state(model)
    if interpolate:
        return _interpolated(
            model, spec, val, config, device, start_state, final_state, best_epoch, history, start_scores
        )
    if val is None:
        return FinetuneResult(final_state, final_state, best_epoch, None, history, stopped_early)
    model.load_state_dict(best_state)
    threshold = calibrate_threshold(best.scores, val.labels.numpy())
    return FinetuneResult(
        best_state, final_state, best_epoch, threshold, history, stopped_early, start_scores=start_scores
    )


def _interpolated(
    model: nn.Module,
    spec: PreprocessSpec,
    val: IndexedPairs | None,
    config: TrainConfig,
    device: torch.device,
    start_state: dict[str, Tensor],
    final_state: dict[str, Tensor],
    last_epoch: int,
    history: list[EpochRecord],
    start_scores: np.ndarray | None,
) -> FinetuneResult:
    """The starting weights moved `config.interpolation` of the way to the last epoch's, loaded into `model`,
    with the threshold calibrated on val's scores of exactly those weights."""
    weight = config.interpolation
    mixed = {
        name: torch.lerp(start_state[name].to(value.dtype), value, weight)
        if value.is_floating_point()
        else value
        for name, value in final_state.items()
    }
    model.load_state_dict(mixed)
    threshold = None
    if val is not None:
        scores = _validate(model, spec, val, config, device).scores
        threshold = calibrate_threshold(scores, val.labels.numpy())
    return FinetuneResult(
        mixed, final_state, last_epoch, threshold, history, False, start_scores=start_scores
    )


def _state_after(
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    best_state: dict[str, Tensor],
    best_epoch: int,
    best: _Validation | None,
    stale: int,
    history: list[EpochRecord],
) -> TrainerState:
    return TrainerState(
        epoch=epoch,
        model=_cpu_state(model),
        optimizer=optimizer.state_dict(),
        rng=torch.get_rng_state(),
        best_state=best_state,
        best_epoch=best_epoch,
        best_loss=best.loss if best is not None else None,
        best_auc=best.auc if best is not None else None,
        best_scores=torch.from_numpy(best.scores.copy()) if best is not None else None,
        stale=stale,
        history=list(history),
    )


def _train_epoch(
    model: nn.Module,
    spec: PreprocessSpec,
    data: _TrainingSet,
    optimizer: torch.optim.Optimizer,
    batches: list[Tensor],
    epoch: int,
    config: TrainConfig,
    report: _Throttled,
    cancel: Callable[[], bool],
) -> float:
    """One pass over the planned batches; returns the mean loss per pair."""
    total, seen = 0.0, 0
    for step, batch in enumerate(batches, start=1):
        if cancel():
            raise TrainingCancelled(f"cancelled in epoch {epoch}, before step {step} of {len(batches)}")
        loss = data.loss(model, spec, batch, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * batch.numel()
        seen += batch.numel()
        report(TrainProgress("train", epoch, config.epochs, step, len(batches), total / seen))
    return total / seen


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
    auc = pair_metrics(scores, labels, None)["roc_auc"]
    return _Validation(loss, auc, scores)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
