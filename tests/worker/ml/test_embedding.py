import pytest
import torch
from torch import nn

from worker.ml.backbones import build_backbone
from worker.ml.embedding import embed_pixels, select_device
from worker.ml.preprocessing import preprocess_spec_for, to_model_input


@pytest.fixture(scope="module")
def mobilefacenet() -> nn.Module:
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet")
    # Non-trivial running statistics, so that eval mode visibly differs from train mode.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (10, 3, 112, 112), dtype=torch.uint8, generator=generator)


def test_norms_are_those_of_a_plain_forward_and_embeddings_are_unit_length(
    mobilefacenet: nn.Module, pixels: torch.Tensor
) -> None:
    spec = preprocess_spec_for("mobilefacenet")
    result = embed_pixels(mobilefacenet, spec, pixels, batch_size=4)
    with torch.no_grad():
        raw = mobilefacenet(to_model_input(pixels, spec))
    assert result.embeddings.shape == (10, 128)
    assert result.embeddings.dtype == torch.float32 and result.norms.dtype == torch.float32
    torch.testing.assert_close(result.norms, torch.linalg.norm(raw, dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(10), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.embeddings, raw / raw.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_results(mobilefacenet: nn.Module, pixels: torch.Tensor) -> None:
    spec = preprocess_spec_for("mobilefacenet")
    whole = embed_pixels(mobilefacenet, spec, pixels, batch_size=64)
    pieces = embed_pixels(mobilefacenet, spec, pixels, batch_size=3)
    single = embed_pixels(mobilefacenet, spec, pixels[4:5], batch_size=1)
    torch.testing.assert_close(pieces.embeddings, whole.embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pieces.norms, whole.norms, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single.embeddings[0], whole.embeddings[4], rtol=1e-4, atol=1e-5)


def test_inference_runs_in_eval_mode_and_restores_the_callers_mode(
    mobilefacenet: nn.Module, pixels: torch.Tensor
) -> None:
    spec = preprocess_spec_for("mobilefacenet")
    expected = embed_pixels(mobilefacenet, spec, pixels[:4]).embeddings
    running_mean = mobilefacenet.bn.running_mean.clone()
    mobilefacenet.train()
    try:
        in_train_mode = embed_pixels(mobilefacenet, spec, pixels[:4]).embeddings
        assert mobilefacenet.training
    finally:
        mobilefacenet.eval()
    torch.testing.assert_close(in_train_mode, expected)
    torch.testing.assert_close(mobilefacenet.bn.running_mean, running_mean)


def test_embeddings_need_no_gradient_and_come_back_on_the_cpu(
    mobilefacenet: nn.Module, pixels: torch.Tensor
) -> None:
    result = embed_pixels(mobilefacenet, preprocess_spec_for("mobilefacenet"), pixels[:2])
    assert not result.embeddings.requires_grad
    assert result.embeddings.device.type == "cpu" and result.norms.device.type == "cpu"


def test_bad_pixel_shapes_and_batch_sizes_are_refused(mobilefacenet: nn.Module) -> None:
    spec = preprocess_spec_for("mobilefacenet")
    with pytest.raises(ValueError, match="pixels"):
        embed_pixels(mobilefacenet, spec, torch.zeros(3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        embed_pixels(mobilefacenet, spec, torch.zeros(1, 3, 112, 112, dtype=torch.uint8), batch_size=0)


def test_no_pixels_give_no_embeddings(mobilefacenet: nn.Module) -> None:
    result = embed_pixels(
        mobilefacenet, preprocess_spec_for("mobilefacenet"), torch.zeros(0, 3, 112, 112).byte()
    )
    assert result.embeddings.shape[0] == 0 and result.norms.shape == (0,)


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            select_device("cuda")
