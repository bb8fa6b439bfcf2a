import io
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from worker.ml.backbones import build_backbone
from worker.ml.batching import image_grouped_batches, random_batches
from worker.ml.embedding import embed_pixels
from worker.ml.evaluation import score_pairs
from worker.ml.loss import contrastive_loss
from worker.ml.metrics import calibrate_threshold
from worker.ml.pairs import IndexedPairs
from worker.ml.preprocessing import PreprocessSpec, preprocess_spec_for, to_model_input
from worker.ml.train_step import distinct_image_loss
from worker.ml.training import (
    FinetuneResult,
    TrainConfig,
    TrainerState,
    TrainingCancelled,
    TrainProgress,
    finetune,
)

TINY_SPEC = PreprocessSpec(channel_order="RGB", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=16)


class TinyBackbone(nn.Module):
    """A few layers shaped like a face backbone: a stem, BatchNorm, dropout and an embedding BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, momentum=0.9)
        self.prelu = nn.PReLU(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, momentum=0.9))
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.features = nn.BatchNorm1d(16, momentum=0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.prelu(self.bn1(self.conv1(x))))
        return self.features(self.fc(self.dropout(x).flatten(1)))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyBackbone()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def face_pairs(people: int, per_person: int, *, size: int = 16, seed: int = 0) -> IndexedPairs:
    """Every pair among `people` × `per_person` synthetic faces: one base pattern per person plus noise."""
    generator = torch.Generator().manual_seed(seed)
    bases = torch.randint(40, 216, (people, 3, size, size), generator=generator).float()
    noise = torch.randn(people, per_person, 3, size, size, generator=generator) * 30
    pixels = (bases[:, None] + noise).clamp(0, 255).to(torch.uint8).reshape(-1, 3, size, size)
    identity = [i // per_person for i in range(people * per_person)]
    index = list(itertools.combinations(range(len(identity)), 2))
    return IndexedPairs.from_arrays(
        pixels,
        [a for a, _ in index],
        [b for _, b in index],
        [float(identity[a] == identity[b]) for a, b in index],
        [f"face{i}" for i in range(len(identity))],
    )


@pytest.fixture(scope="module")
def train_pairs() -> IndexedPairs:
    return face_pairs(3, 4, seed=1)  # 12 faces, 66 pairs


@pytest.fixture(scope="module")
def val_pairs() -> IndexedPairs:
    return face_pairs(3, 3, seed=2)


def run(
    train: IndexedPairs, val: IndexedPairs | None, model: nn.Module | None = None, **options
) -> FinetuneResult:
    settings = {"epochs": 3, "learning_rate": 1e-2, "batch_size": 8, "patience": 10} | options
    return finetune(model or tiny_model(), TINY_SPEC, train, val, TrainConfig(**settings), device="cpu")


def test_distinct_image_step_matches_the_per_pair_step_on_mobilefacenet() -> None:
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet").eval()
    spec = preprocess_spec_for("mobilefacenet")
    pixels = torch.randint(
        0, 256, (6, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    first = torch.tensor([0, 0, 1, 2, 3, 0, 4, 5, 1])
    second = torch.tensor([1, 2, 2, 3, 5, 5, 1, 0, 3])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])

    distinct = distinct_image_loss(model, spec, pixels, first, second, labels, margin=1.4)
    distinct.backward()
    distinct_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    per_pair = contrastive_loss(
        model(to_model_input(pixels[first], spec)), model(to_model_input(pixels[second], spec)), labels, 1.4
    )
    per_pair.backward()
    torch.testing.assert_close(distinct, per_pair, rtol=1e-5, atol=1e-6)
    assert distinct.item() > 0
    for name, parameter in model.named_parameters():
        # Summation order differs between the two batch shapes: tolerance relative to each tensor's scale.
        scale = parameter.grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(
            distinct_grads[name], parameter.grad, rtol=1e-4, atol=1e-5 * scale, msg=name
        )


def test_batchnorm_statistics_stay_put_while_weights_move() -> None:
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet").eval()
    train = face_pairs(2, 3, size=112, seed=4)  # 6 faces, 15 pairs: one step an epoch
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = finetune(
        model, preprocess_spec_for("mobilefacenet"), train, None, TrainConfig(epochs=2), device="cpu"
    )
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not model.training
    assert len(result.train_losses) == 2


def test_same_seed_repeats_the_run_and_another_seed_does_not(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    first = run(train_pairs, val_pairs, seed=7)
    second = run(train_pairs, val_pairs, seed=7)
    other = run(train_pairs, val_pairs, seed=8)
    assert first.train_losses == second.train_losses
    assert [r.to_dict() for r in first.history] == [r.to_dict() for r in second.history]
    for name, value in first.final_state.items():
        assert torch.equal(value, second.final_state[name]), name
    assert first.train_losses != other.train_losses


def test_training_lowers_the_loss_and_keeps_the_best_epoch(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    model = tiny_model()
    result = run(train_pairs, val_pairs, model, epochs=6)
    assert result.train_losses[-1] < result.train_losses[0]
    assert [r.epoch for r in result.history] == list(range(7))
    ranked = max(result.history, key=lambda r: (r.val_auc, -r.val_loss))
    assert result.best_epoch == ranked.epoch
    for name, value in model.state_dict().items():
        assert torch.equal(value, result.best_state[name]), name


def test_threshold_is_calibrated_on_val_with_the_best_state(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    model = tiny_model()
    result = run(train_pairs, val_pairs, model, epochs=4)
    scores = score_pairs(model, TINY_SPEC, val_pairs)
    assert result.threshold is not None
    assert result.threshold == pytest.approx(calibrate_threshold(scores, val_pairs.labels.numpy()))


def test_without_val_the_final_state_is_kept_and_no_threshold_is_set(train_pairs: IndexedPairs) -> None:
    result = run(train_pairs, None, epochs=2)
    assert result.threshold is None and result.best_epoch == 2 and not result.stopped_early
    assert all(torch.equal(v, result.final_state[k]) for k, v in result.best_state.items())
    assert [r.val_auc for r in result.history] == [None, None]


def test_early_stopping_when_val_cannot_improve(train_pairs: IndexedPairs, val_pairs: IndexedPairs) -> None:
    model = tiny_model()
    start = {n: v.clone() for n, v in model.state_dict().items()}
    result = run(train_pairs, val_pairs, model, epochs=10, learning_rate=0.0, patience=2)
    assert result.stopped_early
    assert [r.epoch for r in result.history] == [0, 1, 2]
    assert result.best_epoch == 0
    assert all(torch.equal(v, start[k]) for k, v in result.best_state.items())


def test_cancel_stops_between_steps(train_pairs: IndexedPairs) -> None:
    model = tiny_model()
    training_forwards = []
    model.register_forward_hook(lambda *_: training_forwards.append(1) if torch.is_grad_enabled() else None)
    checks = []

    def should_cancel() -> bool:
        checks.append(1)
        return len(checks) == 3

    with pytest.raises(TrainingCancelled):
        finetune(model, TINY_SPEC, train_pairs, None, TrainConfig(batch_size=8), should_cancel=should_cancel)
    assert len(training_forwards) == 2


def test_progress_reports_sane_totals(train_pairs: IndexedPairs, val_pairs: IndexedPairs) -> None:
    updates: list[TrainProgress] = []
    config = TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2, patience=10)
    finetune(
        tiny_model(), TINY_SPEC, train_pairs, val_pairs, config, progress=updates.append, progress_interval=0
    )
    steps = math.ceil(len(train_pairs) / 8)
    train_updates = [u for u in updates if u.phase == "train"]
    assert len(train_updates) == 3 * steps
    assert all(u.steps == steps and 1 <= u.step <= steps and u.epochs == 3 for u in updates)
    assert [(u.epoch, u.step) for u in train_updates] == [
        (e, s) for e in (1, 2, 3) for s in range(1, steps + 1)
    ]
    epoch_updates = [u for u in updates if u.phase == "epoch"]
    assert [u.epoch for u in epoch_updates] == [1, 2, 3]
    assert all(u.val_auc is not None and 0 <= u.val_auc <= 1 and u.val_loss >= 0 for u in epoch_updates)
    assert all(math.isfinite(u.loss) and u.loss >= 0 for u in updates)


def test_progress_is_throttled_but_reported_every_epoch(train_pairs: IndexedPairs) -> None:
    updates: list[TrainProgress] = []
    config = TrainConfig(epochs=3, batch_size=4)
    finetune(
        tiny_model(), TINY_SPEC, train_pairs, None, config, progress=updates.append, progress_interval=3600
    )
    assert [u.epoch for u in updates if u.phase == "epoch"] == [1, 2, 3]
    assert len([u for u in updates if u.phase == "train"]) <= 1


def test_frozen_stem_does_not_move_and_is_given_back_trainable(train_pairs: IndexedPairs) -> None:
    model = tiny_model()
    stem = {
        n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("conv1", "bn1", "prelu"))
    }
    run(train_pairs, None, model, epochs=1, freeze_stem=True)
    for name, parameter in model.named_parameters():
        if name in stem:
            assert torch.equal(parameter, stem[name]), name
        assert parameter.requires_grad
    assert not torch.equal(model.fc.weight, tiny_model().fc.weight)


def test_distillation_keeps_training_faces_near_the_parent(train_pairs: IndexedPairs) -> None:
    parent = embed_pixels(tiny_model(), TINY_SPEC, train_pairs.pixels).embeddings
    drift = {}
    for weight in (0.0, 5.0):
        model = tiny_model()
        run(train_pairs, None, model, epochs=4, distill_weight=weight)
        tuned = embed_pixels(model, TINY_SPEC, train_pairs.pixels).embeddings
        drift[weight] = (tuned - parent).pow(2).sum(dim=1).mean().item()
    assert 0 < drift[5.0] < drift[0.0] / 2


def test_anchors_at_the_current_embeddings_add_nothing(train_pairs: IndexedPairs) -> None:
    model = tiny_model()
    pixels, first, second, labels = (
        train_pairs.pixels,
        train_pairs.first[:8],
        train_pairs.second[:8],
        train_pairs.labels[:8],
    )
    anchors = embed_pixels(model, TINY_SPEC, pixels).embeddings
    plain = distinct_image_loss(model, TINY_SPEC, pixels, first, second, labels, 1.4)
    anchored = distinct_image_loss(
        model, TINY_SPEC, pixels, first, second, labels, 1.4, anchors=anchors, anchor_weight=3.0
    )
    moved = distinct_image_loss(
        model,
        TINY_SPEC,
        pixels,
        first,
        second,
        labels,
        1.4,
        anchors=anchors.roll(1, dims=0),
        anchor_weight=3.0,
    )
    torch.testing.assert_close(anchored, plain, rtol=1e-5, atol=1e-6)
    assert moved.item() > plain.item() + 0.01


def test_grouped_batches_visit_every_pair_once_with_fewer_images() -> None:
    pairs = face_pairs(5, 11)  # the shape of the real feedback set: 1,485 pairs among 55 faces
    rng = np.random.default_rng(0)
    grouped = image_grouped_batches(pairs.first, pairs.second, 16, rng)
    plain = random_batches(len(pairs), 16, rng)
    for batches in (grouped, plain):
        assert sorted(torch.cat(batches).tolist()) == list(range(len(pairs)))
        assert all(1 <= len(b) <= 16 for b in batches)
    assert len(grouped) == len(plain) == math.ceil(len(pairs) / 16)

    def images(batches: list[torch.Tensor]) -> int:
        return sum(len(torch.unique(torch.cat([pairs.first[b], pairs.second[b]]))) for b in batches)

    assert images(grouped) * 2 < images(plain)


def test_config_round_trips_and_refuses_unknown_or_bad_values() -> None:
    original = TrainConfig(epochs=10, learning_rate=1e-4, batch_size=16, margin=1.0)
    assert TrainConfig.from_dict(original.to_dict()) == original
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"epochs": 2, "momentum": 0.9})
    with pytest.raises(ValueError, match="margin"):
        TrainConfig(margin=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_no_training_pairs_is_an_error(val_pairs: IndexedPairs) -> None:
    empty = IndexedPairs.from_arrays(val_pairs.pixels, [], [], [], val_pairs.names)
    with pytest.raises(ValueError, match="no training pairs"):
        finetune(tiny_model(), TINY_SPEC, empty, val_pairs, TrainConfig(), device="cpu")


def _saved_and_loaded(state: TrainerState) -> TrainerState:
    """The state through torch.save and a weights-only load, as a retried job reads it back."""
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    return TrainerState.from_dict(torch.load(buffer, weights_only=True))


def test_resuming_from_an_epoch_state_ends_as_the_uninterrupted_run(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    def three_epochs(**hooks: Any) -> FinetuneResult:
        config = TrainConfig(epochs=3, learning_rate=1e-2, batch_size=8)
        return finetune(tiny_model(), TINY_SPEC, train_pairs, val_pairs, config, device="cpu", **hooks)

    states: list[TrainerState] = []
    whole = three_epochs(on_epoch_end=lambda state: states.append(_saved_and_loaded(state)))
    assert [state.epoch for state in states] == [1, 2, 3]
    epochs: list[int] = []

    resumed = three_epochs(resume=states[0], progress=lambda update: epochs.append(update.epoch))

    assert set(epochs) == {2, 3}, "the resumed run trained epochs 2 and 3 only"
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    assert resumed.threshold == whole.threshold
    for name, value in whole.final_state.items():
        torch.testing.assert_close(resumed.final_state[name], value, rtol=0, atol=0, msg=name)
    for name, value in whole.best_state.items():
        torch.testing.assert_close(resumed.best_state[name], value, rtol=0, atol=0, msg=name)


def test_a_state_saved_after_early_stopping_trains_no_further(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    config = TrainConfig(epochs=5, learning_rate=0.0, batch_size=8, patience=1)
    states: list[TrainerState] = []
    stopped = finetune(
        tiny_model(), TINY_SPEC, train_pairs, val_pairs, config, device="cpu", on_epoch_end=states.append
    )
    assert stopped.stopped_early and states[-1].epoch == 1

    resumed = finetune(
        tiny_model(), TINY_SPEC, train_pairs, val_pairs, config, device="cpu", resume=states[-1]
    )

    assert resumed.stopped_early and resumed.history == stopped.history


def test_interpolation_keeps_the_point_between_parent_and_last_epoch(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    model = tiny_model()
    start = {n: v.clone() for n, v in model.state_dict().items()}
    result = run(train_pairs, val_pairs, model, epochs=3, selection="interpolate", interpolation=0.25)
    assert result.best_epoch == 3 and not result.stopped_early
    moved = 0
    for name, value in result.best_state.items():
        final, first = result.final_state[name], start[name]
        if value.is_floating_point():
            torch.testing.assert_close(value, first + 0.25 * (final - first), msg=name)
            moved += not torch.equal(final, first)
        else:
            assert torch.equal(value, final), name
        assert torch.equal(model.state_dict()[name], value), "the model holds the interpolated weights"
    assert moved > 0, "training moved some weights"
    scores = score_pairs(model, TINY_SPEC, val_pairs)
    assert result.threshold == pytest.approx(calibrate_threshold(scores, val_pairs.labels.numpy()))


def test_interpolation_trains_every_epoch_whatever_val_says(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    """Patience belongs to picking an epoch on val; interpolation picks none, so a val that never improves
    does not stop it."""
    by_val = run(train_pairs, val_pairs, epochs=5, learning_rate=0.0, patience=1)
    interpolated = run(
        train_pairs, val_pairs, epochs=5, learning_rate=0.0, patience=1, selection="interpolate"
    )
    assert by_val.stopped_early and [r.epoch for r in by_val.history] == [0, 1]
    assert not interpolated.stopped_early and [r.epoch for r in interpolated.history] == list(range(6))


def test_interpolation_of_one_keeps_the_last_epoch(train_pairs: IndexedPairs) -> None:
    result = run(train_pairs, None, epochs=2, selection="interpolate", interpolation=1.0)
    assert result.threshold is None
    for name, value in result.best_state.items():
        torch.testing.assert_close(value, result.final_state[name], rtol=0, atol=0, msg=name)


def test_resumed_interpolation_ends_as_the_uninterrupted_run(
    train_pairs: IndexedPairs, val_pairs: IndexedPairs
) -> None:
    """The parent's weights come from the starting model, not from the state a retry resumes from."""
    config = TrainConfig(epochs=3, learning_rate=1e-2, batch_size=8, selection="interpolate")
    states: list[TrainerState] = []
    whole = finetune(
        tiny_model(),
        TINY_SPEC,
        train_pairs,
        val_pairs,
        config,
        device="cpu",
        on_epoch_end=lambda state: states.append(_saved_and_loaded(state)),
    )
    resumed = finetune(
        tiny_model(), TINY_SPEC, train_pairs, val_pairs, config, device="cpu", resume=states[1]
    )
    assert resumed.threshold == whole.threshold
    for name, value in whole.best_state.items():
        torch.testing.assert_close(resumed.best_state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"selection": "best"}, "selection"),
        ({"interpolation": 0.0}, "interpolation"),
        ({"interpolation": 1.5}, "interpolation"),
    ],
)
def test_config_refuses_an_unknown_selection_or_an_interpolation_out_of_range(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)
