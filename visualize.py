"""Figures with Chinese labels: training history, synthetic samples, predictions.

Chinese text needs a CJK font. :func:`setup_chinese_font` prefers SimHei (the post's choice, present
on most Windows machines), then other common CJK system fonts, then the fonts shipped by the
``mplfonts`` package that ``requirements.txt`` installs (SimHei and Noto Sans CJK SC), registered
with matplotlib at run time, so Linux, macOS and CI render the same glyphs and never tofu boxes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150
#: Preference order; the first family matplotlib can find wins.
CJK_FAMILIES = ("SimHei", "Noto Sans CJK SC", "Microsoft YaHei", "PingFang SC", "Heiti SC",
                "Source Han Sans SC", "WenQuanYi Micro Hei", "Noto Sans CJK JP")
_font_family: str | None = None


def setup_chinese_font() -> str:
    """Make matplotlib render Chinese; returns the family chosen. Idempotent and cheap after the first call."""
    global _font_family
    if _font_family is not None:
        return _font_family
    installed = {f.name for f in font_manager.fontManager.ttflist}
    family = next((f for f in CJK_FAMILIES if f in installed), None)
    if family is None:
        family = _register_bundled_font()
    if family is None:
        raise RuntimeError("no CJK font found for the Chinese figure labels: "
                           "`pip install mplfonts` (listed in requirements.txt) or install SimHei / Noto Sans CJK SC")
    matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["font.sans-serif"] = [family, "DejaVu Sans"]
    matplotlib.rcParams["axes.unicode_minus"] = False  # the CJK fonts lack U+2212; use '-'
    _font_family = family
    log.debug("figure font: %s", family)
    return family


def _register_bundled_font() -> str | None:
    """Register the mplfonts package's SimHei (preferred) or Noto Sans CJK SC with matplotlib."""
    try:
        import mplfonts
    except ImportError:
        return None
    font_dir = Path(mplfonts.__file__).parent / "fonts"
    for file_name in ("SimHei.ttf", "NotoSansCJKsc-Regular.otf"):
        path = font_dir / file_name
        if path.is_file():
            font_manager.fontManager.addfont(str(path))
            return font_manager.FontProperties(fname=str(path)).get_name()
    return None


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_history(history: dict, out_dir: str | Path) -> Path:
    """Loss curves (train / validation) and validation Dice / IoU per epoch -> training_history.png."""
    setup_chinese_font()
    epochs = history["epoch"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    axes[0].plot(epochs, history["train_loss"], "b-o", label="训练损失", markersize=3)
    axes[0].plot(epochs, history["val_loss"], "r-s", label="验证损失", markersize=3)
    axes[0].set(xlabel="轮次 (Epoch)", ylabel="损失 (BCE + Dice)", title="训练与验证损失曲线")
    axes[1].plot(epochs, history["val_dice"], "g-^", label="Dice 系数", markersize=3)
    axes[1].plot(epochs, history["val_iou"], "m-d", label="IoU 分数", markersize=3)
    axes[1].set(xlabel="轮次 (Epoch)", ylabel="得分 (逐图像平均)", title="验证集分割评估指标曲线", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.legend()
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(out_dir) / "training_history.png")


def plot_synthetic_samples(images: np.ndarray, labels: np.ndarray, out_dir: str | Path,
                           num_samples: int = 6, seed: int = 0) -> Path:
    """Top row: synthetic images; bottom row: their lesion labels -> synthetic_data_samples.png."""
    setup_chinese_font()
    n = min(num_samples, len(images))
    idx = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    for i, k in enumerate(idx):
        axes[0, i].imshow(images[k], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"合成影像 {i + 1}")
        axes[1, i].imshow(labels[k], cmap="Reds", vmin=0, vmax=max(1, int(labels.max())), interpolation="nearest")
        axes[1, i].set_title(f"病灶标签 {i + 1}")
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(out_dir) / "synthetic_data_samples.png")


def overlay_rgb(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """Image (grey (H, W) or RGB (H, W, 3)) with prediction in red and ground truth in green; overlap is yellow."""
    img = image.astype(np.float32)
    img = (img - img.min()) / (np.ptp(img) + 1e-8)
    rgb = (img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)) * 0.7
    p = pred > 0
    rgb[p, 0] = rgb[p, 0] * 0.4 + 0.6
    if truth is not None:
        t = truth > 0
        rgb[t, 1] = rgb[t, 1] * 0.4 + 0.6
    return np.clip(rgb, 0, 1)


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_predictions(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                     out_dir: str | Path, scores: Sequence[float] | None = None,
                     file_name: str = "segmentation_results.png", titles: Sequence[str] | None = None) -> Path:
    """Rows of input / ground truth / prediction / overlay -> ``file_name``.

    Grey images get a colour-filled overlay (green truth, red prediction, yellow both); colour
    photographs get contours instead, because a green or red fill on red mucosa reads as the wrong colour.
    """
    setup_chinese_font()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(13, 3.2 * n), squeeze=False)
    vmax = max(1, max(int(np.max(t)) for t in truths), max(int(np.max(p)) for p in preds))
    for i in range(n):
        name = _short(titles[i]) if titles else f"{i + 1}"
        colour = np.ndim(images[i]) == 3
        axes[i, 0].imshow(images[i], cmap=None if colour else "gray")
        axes[i, 0].set_title(f"输入图像 {name}")
        axes[i, 1].imshow(truths[i], cmap="Reds", vmin=0, vmax=vmax, interpolation="nearest")
        axes[i, 1].set_title("真实标签")
        axes[i, 2].imshow(preds[i], cmap="Reds", vmin=0, vmax=vmax, interpolation="nearest")
        axes[i, 2].set_title("预测结果" + (f" (Dice {scores[i]:.3f})" if scores is not None else ""))
        if colour:
            axes[i, 3].imshow(np.clip(images[i], 0, 1))
            for mask, c in ((truths[i], "lime"), (preds[i], "magenta")):
                if np.any(mask > 0):
                    axes[i, 3].contour((np.asarray(mask) > 0).astype(float), levels=[0.5], colors=c, linewidths=1.5)
            axes[i, 3].set_title("轮廓: 绿=真实, 品红=预测")
        else:
            axes[i, 3].imshow(overlay_rgb(images[i], truths[i], preds[i]))
            axes[i, 3].set_title("叠加: 绿=真实, 红=预测, 黄=重合")
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(out_dir) / file_name)
