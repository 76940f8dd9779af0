"""Preprocessing, augmentation and sliding-window inference on small hand-made arrays."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from augment import Augmenter
from errors import ConfigError
from inference import gaussian_weight, keep_largest, largest_component, predict_planes, probs_to_labels, tile_starts
from preprocess import Preprocessing, normalize, parse_labels, parse_window, scaled_size, to_classes, to_planes


def test_window_presets_and_custom():
    assert parse_window("liver") == [30.0, 150.0]
    assert parse_window("40,400") == [40.0, 400.0]
    with pytest.raises(ConfigError, match="LEVEL,WIDTH"):
        parse_window("wide")
    with pytest.raises(ConfigError, match="width"):
        parse_window("40,0")
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    out = normalize(hu, Preprocessing(normalization="window", window=[40.0, 400.0]))
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_zscore_percentile_unit():
    x = np.arange(100, dtype=np.float32).reshape(10, 10)
    z = normalize(x, Preprocessing(normalization="zscore"))
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    p = normalize(x, Preprocessing(normalization="percentile"))
    assert p.min() == 0.0 and p.max() == 1.0
    assert normalize(np.array([255.0]), Preprocessing(normalization="unit"))[0] == 1.0


def test_labels_parsing_and_mapping():
    assert parse_labels(None) == (None, ["foreground"])
    assert parse_labels("1,2") == ([[1], [2]], ["1", "2"])
    assert parse_labels("1+2") == ([[1, 2]], ["1+2"])
    assert parse_labels("anterior,posterior", {"anterior": 1, "posterior": 2}) == ([[1], [2]], ["anterior", "posterior"])
    assert parse_labels("anterior=1,posterior=2") == ([[1], [2]], ["anterior", "posterior"])
    assert parse_labels("hippocampus=1+2") == ([[1, 2]], ["hippocampus"])
    with pytest.raises(ConfigError, match="unknown label"):
        parse_labels("liver")
    m = np.array([0, 1, 2, 3])
    assert to_classes(m, Preprocessing(class_values=None)).tolist() == [0, 1, 1, 1]
    assert to_classes(m, Preprocessing(class_values=[[1, 2]], class_names=["x"])).tolist() == [0, 1, 1, 0]
    assert to_classes(m, Preprocessing(class_values=[[2], [3]], class_names=["a", "b"])).tolist() == [0, 0, 1, 2]


def test_planes_channels():
    rgb = np.zeros((5, 7, 3), np.float32)
    rgb[..., 1] = 255
    one = to_planes(rgb, 2, Preprocessing(normalization="unit", in_channels=1))
    assert one.shape == (1, 1, 5, 7) and np.allclose(one, 0.587)  # BT.601 luminance of pure green
    three = to_planes(rgb, 2, Preprocessing(normalization="unit", in_channels=3))
    assert three.shape == (1, 3, 5, 7) and np.allclose(three[0, 1], 1.0)
    vol = np.random.default_rng(0).normal(size=(4, 6, 8))
    assert to_planes(vol, 3, Preprocessing(normalization="zscore")).shape == (4, 1, 6, 8)
    assert to_planes(vol, 3, Preprocessing(in_channels=3)).shape == (4, 3, 6, 8)
    assert scaled_size(100, 50, Preprocessing(resize_long_side=40)) == (40, 20)
    assert scaled_size(100, 50, Preprocessing()) == (100, 50)


def test_tiles_cover_and_weights():
    assert tile_starts(64, 64, 0.5) == [0]
    starts = tile_starts(150, 64, 0.5)
    assert starts[0] == 0 and starts[-1] == 150 - 64
    assert all(b - a <= 32 for a, b in zip(starts, starts[1:]))
    w = gaussian_weight(64)
    assert w.shape == (64, 64) and w.max() == 1.0 and w.min() > 0


class ThresholdModel(nn.Module):
    """Stand-in with a known answer: logit = 20 * (x - 0.5), so the mask is exactly x > 0.5."""

    def forward(self, x):
        return 20 * (x[:, :1] - 0.5)


@pytest.mark.parametrize("shape,resize", [((1, 1, 100, 150), None), ((3, 1, 40, 30), None), ((1, 1, 37, 53), 64)])
def test_sliding_window_reproduces_a_known_model_exactly(shape, resize):
    rng = np.random.default_rng(1)
    planes = (rng.random(shape) > 0.7).astype(np.float32) * 0.6 + 0.2  # values 0.2 / 0.8
    prep = Preprocessing(patch_size=32, resize_long_side=resize)
    probs = predict_planes(ThresholdModel(), planes, prep, overlap=0.5)
    assert probs.shape == (shape[0], 1, shape[2], shape[3])
    pred = probs_to_labels(probs)
    if resize is None:  # tiles, padding and blending must not change a pixel-wise answer
        assert np.array_equal(pred, (planes[:, 0] > 0.5).astype(np.uint8))
    else:  # resampled there and back: nearly all pixels agree
        assert (pred == (planes[:, 0] > 0.5)).mean() > 0.85


class ColumnModel(nn.Module):
    """Not flip-invariant: logit = x + a ramp along the width, so mirroring changes its answer."""

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1)
        return x[:, :1] * 4 + ramp * 3


def test_mirror_tta_averages_the_four_flips():
    rng = np.random.default_rng(2)
    planes = rng.random((2, 1, 32, 32)).astype(np.float32)
    prep = Preprocessing(patch_size=32, mirror_tta=True)
    probs = predict_planes(ColumnModel(), planes, prep)
    x = torch.from_numpy(planes)
    m = ColumnModel()
    expected = sum(torch.sigmoid(m(x.flip(d) if d else x)).flip(d) if d else torch.sigmoid(m(x))
                   for d in ((), (3,), (2,), (2, 3))) / 4
    assert np.allclose(probs, expected.numpy(), atol=1e-6)
    plain = predict_planes(ColumnModel(), planes, prep, mirror=False)  # the override used by per-epoch validation
    assert np.allclose(plain, torch.sigmoid(m(x)).numpy(), atol=1e-6) and not np.allclose(plain, probs, atol=1e-3)
    # a flip-equivariant model gives the same answer with or without mirroring
    assert np.allclose(predict_planes(ThresholdModel(), planes, prep), predict_planes(ThresholdModel(), planes, prep, mirror=False), atol=1e-6)


def test_multiclass_probs_to_labels():
    p = np.zeros((1, 3, 2, 2), np.float32)
    p[0, 2, 0, 0] = p[0, 1, 1, 1] = 1
    p[0, 0, 0, 1] = p[0, 0, 1, 0] = 1
    assert probs_to_labels(p)[0].tolist() == [[2, 0], [0, 1]]


def test_augmentation_is_seeded_and_keeps_labels_integer():
    x = torch.rand(4, 1, 32, 32)
    y = (x[:, 0] > 0.5).to(torch.uint8)
    a1, b1 = Augmenter(seed=3, elastic=0.05)(x, y)
    a2, b2 = Augmenter(seed=3, elastic=0.05)(x, y)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == x.shape and b1.shape == y.shape and b1.dtype == torch.uint8
    assert set(b1.unique().tolist()) <= {0, 1}
    assert not torch.equal(a1, x)
    # flips only: the label follows the image exactly
    a, b = Augmenter(seed=0, rotate_deg=0, scale=(1.0, 1.0), intensity=0)(x, y)
    assert torch.equal((a[:, 0] > 0.5).to(torch.uint8), b)


def test_largest_component_and_keep_largest():
    m = np.zeros((5, 6), bool)
    m[0, 0:2] = True          # 2 px
    m[2:5, 3:6] = True        # 9 px
    m[4, 0] = True            # 1 px
    assert largest_component(m).sum() == 9 and largest_component(m)[3, 4]
    assert not largest_component(np.zeros((3, 3), bool)).any()
    # diagonal neighbours are connected (full connectivity), so this is one component
    diag = np.eye(4, dtype=bool)
    assert largest_component(diag).sum() == 4
    labels = np.zeros((5, 6), np.uint8)
    labels[m] = 1
    labels[0, 5] = 2          # class 2 untouched when only class 1 is asked for
    out = keep_largest(labels, [1])
    assert (out == 1).sum() == 9 and out[0, 5] == 2 and (labels == 1).sum() == 12  # input unchanged
    vol = np.zeros((3, 4, 4), np.uint8)
    vol[0, 0, 0] = 1
    vol[1:3, 2:4, 2:4] = 1
    assert (keep_largest(vol, [1]) == 1).sum() == 8


def test_postprocessing_is_chosen_on_validation_per_class():
    from experiments import choose_postprocessing
    prep = Preprocessing(class_names=["a", "b"])
    rows = [{"case": i, "class": "a", "dice": 0.80, "dice_largest": 0.85} for i in range(3)]
    rows += [{"case": i, "class": "b", "dice": 0.70, "dice_largest": d} for i, d in enumerate((0.60, 0.70, 0.75))]
    post = choose_postprocessing(rows, prep)
    assert post["largest_component"] == ["a"]  # b: mean 0.683 < 0.70, so it keeps every component
    assert post["validation"]["a"] == {"val_dice": pytest.approx(0.80), "val_dice_largest": pytest.approx(0.85)}
