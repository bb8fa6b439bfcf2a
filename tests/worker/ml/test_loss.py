import math

import pytest
import torch

from worker.ml.loss import contrastive_loss, contrastive_loss_from_cosine


def _unit(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def test_positive_pair_of_orthogonal_vectors_costs_squared_distance() -> None:
    loss = contrastive_loss(_unit(1, 0), _unit(0, 1), torch.tensor([1.0]), margin=1.0)
    assert loss.item() == pytest.approx(2.0)


def test_identical_vectors_cost_nothing_when_same_and_full_margin_when_different() -> None:
    a = _unit(0.6, 0.8)
    assert contrastive_loss(a, a.clone(), torch.tensor([1.0]), margin=1.4).item() == pytest.approx(0.0)
    assert contrastive_loss(a, a.clone(), torch.tensor([0.0]), margin=1.4).item() == pytest.approx(1.96)


def test_negative_pair_beyond_margin_contributes_nothing() -> None:
    a, b = _unit(1, 0), _unit(0, 1)
    assert contrastive_loss(a, b, torch.tensor([0.0]), margin=1.4).item() == pytest.approx(0.0)
    inside = contrastive_loss(a, b, torch.tensor([0.0]), margin=2.0).item()
    assert inside == pytest.approx((2.0 - math.sqrt(2.0)) ** 2)


def test_mean_over_pairs_with_hand_computed_values() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [math.cos(0.5), math.sin(0.5)]])
    labels = torch.tensor([1.0, 0.0, 0.0])
    # D: sqrt(2), 2, 2·sin(0.25); margin 1.0 → only the third (close) negative is inside the margin.
    close = 2 * math.sin(0.25)
    expected = (2.0 + 0.0 + (1.0 - close) ** 2) / 3
    assert contrastive_loss(a, b, labels, margin=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_scaling_an_embedding_does_not_change_the_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=generator)
    b = torch.randn(8, 16, generator=generator)
    labels = torch.tensor([1.0, 0.0] * 4)
    scales = torch.rand(8, 1, generator=generator) * 30 + 0.5
    plain = contrastive_loss(a, b, labels, margin=1.4)
    scaled = contrastive_loss(a * scales, b / scales, labels, margin=1.4)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-5)


def test_negative_pair_of_identical_embeddings_has_a_finite_gradient() -> None:
    a = torch.tensor([[0.3, 0.4]], requires_grad=True)
    loss = contrastive_loss(a, a.detach().clone(), torch.tensor([0.0]), margin=1.4)
    loss.backward()
    assert torch.isfinite(a.grad).all()


def test_bfloat16_inputs_give_a_float32_loss() -> None:
    a = torch.randn(4, 8).bfloat16()
    b = torch.randn(4, 8).bfloat16()
    loss = contrastive_loss(a, b, torch.tensor([1.0, 0.0, 1.0, 0.0]), margin=1.4)
    assert loss.dtype == torch.float32


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2), margin=1.0)
    with pytest.raises(ValueError, match="embedding"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), torch.ones(3), margin=1.0)


def test_loss_from_pair_cosines_matches_the_loss_from_embeddings() -> None:
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(32, 8, generator=generator)
    b = a + torch.randn(32, 8, generator=generator) * torch.linspace(0.05, 3, 32)[:, None]
    labels = (torch.arange(32) % 3 == 0).float()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    for margin in (1.0, 1.4):
        expected = contrastive_loss(a, b, labels, margin).item()
        assert contrastive_loss_from_cosine(cosine, labels, margin).item() == pytest.approx(
            expected, rel=1e-5
        )
