"""Figures render Chinese with a real CJK font: no 'Glyph ... missing' warning."""
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

import visualize
from data_gen import generate_dataset


def _glyph_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "Glyph" in str(w.message)]


def test_glyph_check_detects_tofu(tmp_path):
    """The check below can fail: a Latin-only font does warn on Chinese text."""
    def draw():
        with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.sans-serif": ["DejaVu Sans"]}):
            fig, ax = plt.subplots()
            ax.set_title("训练损失")
            fig.savefig(tmp_path / "tofu.png")
            plt.close(fig)
    assert _glyph_warnings(draw)


def test_all_figures_render_chinese_without_missing_glyphs(tmp_path):
    family = visualize.setup_chinese_font()
    assert family in visualize.CJK_FAMILIES or "CJK" in family or "Hei" in family
    assert matplotlib.rcParams["axes.unicode_minus"] is False
    d = generate_dataset(6, 32, seed=0)
    history = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.1, -0.1], "val_dice": [0.2, 0.9],
               "val_iou": [0.1, 0.8]}
    paths = []
    warned = _glyph_warnings(lambda: paths.extend([
        visualize.plot_training_history(history, tmp_path),
        visualize.plot_synthetic_samples(d.images, d.lesions, tmp_path),
        visualize.plot_predictions(d.images[:2], d.lesions[:2], d.organs[:2], tmp_path, scores=[0.5, 1.0]),
    ]))
    assert warned == []
    for p in paths:
        assert p.stat().st_size > 10_000
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_overlay_colours():
    img = np.zeros((4, 4))
    truth = np.zeros((4, 4)); truth[0, 0] = truth[1, 1] = 1
    pred = np.zeros((4, 4)); pred[1, 1] = pred[2, 2] = 1
    rgb = visualize.overlay_rgb(img, truth, pred)
    assert rgb[0, 0, 1] > 0.5 and rgb[0, 0, 0] < 0.1      # truth only: green
    assert rgb[2, 2, 0] > 0.5 and rgb[2, 2, 1] < 0.1      # prediction only: red
    assert rgb[1, 1, 0] > 0.5 and rgb[1, 1, 1] > 0.5      # both: yellow
    assert rgb[3, 3].max() == pytest.approx(0.0)


def test_overlay_and_predictions_accept_rgb_images(tmp_path):
    img = np.random.default_rng(0).random((12, 10, 3))
    mask = np.zeros((12, 10), np.uint8)
    mask[2:5, 3:6] = 1
    assert visualize.overlay_rgb(img, mask, mask).shape == (12, 10, 3)
    assert visualize.plot_predictions([img], [mask], [mask], tmp_path, scores=[1.0]).is_file()
