"""U-Net shapes for odd sizes and both up-sampling paths."""
import pytest
import torch

from model import UNet, count_parameters


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("hw", [(16, 16), (33, 47), (64, 64), (17, 31)])
def test_output_size_matches_input(bilinear, hw):
    model = UNet(n_channels=1, n_classes=1, base_channels=4, bilinear=bilinear).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, *hw))
    assert out.shape == (2, 1, *hw)


def test_multichannel_multiclass_and_training_step_transposed():
    model = UNet(n_channels=3, n_classes=3, base_channels=4, bilinear=False)
    x = torch.randn(2, 3, 33, 47)
    out = model(x)
    assert out.shape == (2, 3, 33, 47)
    out.mean().backward()  # the transposed-conv path trains (the post's crashed before the first step)
    assert all(p.grad is not None for p in model.parameters())


def test_rejects_too_small_and_wrong_channels():
    model = UNet(base_channels=4)
    with pytest.raises(ValueError, match=">= 16"):
        model(torch.zeros(1, 1, 15, 64))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_post_sized_model_and_args():
    model = UNet(base_channels=64)
    assert 13_000_000 < count_parameters(model) < 13_500_000  # the post's U-Net, without redundant conv biases
    assert model.model_args == {"n_channels": 1, "n_classes": 1, "base_channels": 64, "bilinear": True}
