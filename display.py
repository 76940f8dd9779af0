"""How a case is shown: display scaling, radiological orientation, class colours, the report's overlay figure
(matplotlib) and the demo page's three image panels (input, overlay, probability; PIL, fast enough for a
slider).

The report figure and the page use the same colours (:func:`class_colours`), orientation
(:func:`display_transform`) and numbered lesion badges, so a lesion looks the same in both.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import medio
import report
from errors import InputError
from preprocess import WINDOW_PRESETS, Preprocessing

if TYPE_CHECKING:  # annotations only: diagnosis imports this module
    from diagnosis import Diagnosis

RASTER_FORMATS = ("png", "jpeg", "bmp", "tiff", "gif")
LESION_COLOUR = "#ff2d20"
LESION_COLOUR_RGB = "#00e5ff"
STRUCTURE_COLOURS = ("#22c55e", "#0ea5e9", "#eab308", "#a855f7", "#14b8a6", "#f97316")
BADGE_COLOUR = "#d92d20"
DISPLAY_PX = 448  # long side of each of the page's images


# ------------------------------------------------------------------------------------------ shared
def class_colours(roles: list[str], rgb_image: bool = False) -> list[str]:
    """One colour per class: lesions red on grey images, cyan on colour photographs (red on red mucosa would be
    unreadable); other classes cycle through :data:`STRUCTURE_COLOURS`."""
    out, j = [], 0
    for r in roles:
        if r == "lesion":
            out.append(LESION_COLOUR_RGB if rgb_image else LESION_COLOUR)
        else:
            out.append(STRUCTURE_COLOURS[j % len(STRUCTURE_COLOURS)])
            j += 1
    return out


def scan_channels(prep: Preprocessing) -> int:
    """How many separate scans (channels, e.g. MRI sequences) one case of this model has: ``prep.in_channels`` for
    a multi-channel model, 1 for a grey or colour-picture model (grey and RGB are converted to what it takes)."""
    return prep.in_channels if prep.channels or prep.in_channels not in (1, 3) else 1


def display_image(image: np.ndarray, meta: medio.ImageMeta, prep: Preprocessing, *,
                  as_model_sees: bool = False, channel: int = 0) -> np.ndarray:
    """The image scaled to [0, 1] for display: a CT window for CT (the model's, else abdomen 40/400 HU),
    colour photographs / 255, anything else a 0.5-99.5 % percentile stretch.

    ``as_model_sees``: 8-bit images of a model trained on 8-bit images (``unit`` normalisation) / 255, as the
    network sees them (the page shows this, so its probability map lines up with what the user sees).
    ``channel``: the scan shown of a multi-channel case (one channel at a time; a colour picture stays colour).
    """
    x = np.asarray(image, np.float32)
    shown = 0
    if x.ndim == len(meta.shape) + 1 and (x.shape[-1] != 3 or scan_channels(prep) > 1):
        if not 0 <= channel < x.shape[-1]:
            raise InputError(f"{meta.path}: --display-channel {channel}, but the image has {x.shape[-1]} channels "
                             f"(expected 0..{x.shape[-1] - 1})")
        x, shown = x[..., channel], channel
    # the shown channel's own normalisation (per-channel models) decides whether it is shown through a CT window
    spec = prep.channels[shown] if prep.channels and shown < len(prep.channels) else \
        {"normalization": prep.normalization, "window": prep.window}
    window = (spec.get("window") or WINDOW_PRESETS["abdomen"]) if spec.get("normalization") == "window" else None
    if as_model_sees and prep.normalization == "unit" and x.min() >= 0 and x.max() <= 255:
        return x / 255.0
    rgb = x.ndim == len(meta.shape) + 1
    if rgb and x.max() <= 255 and x.min() >= 0:
        return np.clip(x / 255.0, 0, 1)
    ct = window is not None or (str(meta.extra.get("modality") or "").upper() == "CT" and not prep.channels)
    if ct and not rgb and meta.format not in RASTER_FORMATS:  # HU: the model's window, else soft tissue 40/400
        level, width = window or WINDOW_PRESETS["abdomen"]
        return np.clip((x - (level - width / 2)) / width, 0, 1)
    sample = x.ravel()[:: max(1, x.size // 2_000_000)]  # percentiles of a large volume: a sample is enough
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(x.min()), float(x.max()) + 1e-6
    return np.clip((x - lo) / (hi - lo), 0, 1)


def display_transform(meta: medio.ImageMeta) -> tuple[bool, bool, bool]:
    """(transpose, flip_rows, flip_cols) that show a volume's slices in radiological convention from its direction
    cosines: patient right on the left, anterior (axial) or superior (coronal / sagittal) at the top."""
    if len(meta.shape) != 3 or meta.affine is None:
        return False, False, False
    d = np.asarray(meta.direction, float)  # d[r][c]: world (z, y, x) component r of array axis c, LPS
    vec = {a: d[:, a][::-1] for a in (1, 2)}  # (x, y, z) LPS of the row axis (1) and column axis (2)
    h = max((1, 2), key=lambda a: abs(vec[a][0]))
    target = 0  # horizontal: towards patient left (+x), i.e. patient right on the screen's left
    if abs(vec[h][0]) < 0.5:  # sagittal plane: horizontal is anterior -> posterior (+y)
        h = max((1, 2), key=lambda a: abs(vec[a][1]))
        target = 1
    v = 3 - h
    flip_h = vec[h][target] < 0
    dom = int(np.argmax(np.abs(vec[v])))
    flip_v = vec[v][dom] > 0 if dom == 2 else vec[v][dom] < 0  # top: superior (z) / anterior (y) / right (x)
    return h == 1, bool(flip_v), bool(flip_h)


def orient_slice(arr: np.ndarray, tf: tuple[bool, bool, bool]) -> np.ndarray:
    """Apply a :func:`display_transform` (transpose, flip rows, flip columns) to a 2D slice for display."""
    transpose, flip_rows, flip_cols = tf
    if transpose:
        arr = np.swapaxes(arr, 0, 1)
    if flip_rows:
        arr = arr[::-1]
    if flip_cols:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def _badge_anchor(ids: np.ndarray, i: int) -> tuple[int, int]:
    """(x, y) of lesion ``i``'s top-right-most pixel, where its number badge goes."""
    ys, xs = np.nonzero(ids == i)
    j = int(np.argmax(xs - ys))
    return int(xs[j]), int(ys[j])


# ------------------------------------------------------------------------------- report figure
#: the longest side a montage thumbnail is drawn at
THUMBNAIL_PX = 192


def _draw_panel(ax, img: np.ndarray, lab: np.ndarray | None, ids: np.ndarray | None, colours: list[str],
                aspect: float, small: bool = False) -> None:
    from matplotlib.colors import to_rgba

    step = math.ceil(max(img.shape[:2]) / THUMBNAIL_PX) if small else 1
    if step > 1:  # a montage cell is a thumbnail: drawing a 512-px slice there costs time and shows nothing more
        img = img[::step, ::step]
        lab = lab[::step, ::step] if lab is not None else None
        ids = ids[::step, ::step] if ids is not None else None
    ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1, aspect=aspect, interpolation="antialiased")
    if lab is not None:
        for k, col in enumerate(colours, start=1):
            m = lab == k
            if not m.any():
                continue
            fill = np.zeros((*m.shape, 4), np.float32)
            fill[m] = to_rgba(col, 0.28)
            ax.imshow(fill, aspect=aspect, interpolation="nearest")
            ax.contour(m.astype(np.float32), levels=[0.5], colors=[col], linewidths=0.9 if small else 1.4)
    if ids is not None:
        h, w = ids.shape
        off = 0.015 * max(h, w) + 1.5
        for i in [i for i in np.unique(ids) if i > 0][:20]:
            bx, by = _badge_anchor(ids, i)
            x, y = min(float(bx) + off, w - 1), max(float(by) - off, 0)
            ax.text(x, y, str(i), color="white", fontsize=7 if small else 9, ha="center",
                    va="center", bbox={"boxstyle": "circle,pad=0.25", "fc": BADGE_COLOUR, "ec": "white", "lw": 0.8})
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _figure_2d(disp: np.ndarray, meta: medio.ImageMeta, labels: np.ndarray, id_map: np.ndarray,
               colours: list[str], zh: bool):
    """Image | overlay side by side."""
    import matplotlib.pyplot as plt

    spacing = meta.spacing if meta.spacing_known else (1.0, 1.0)
    h, w = meta.shape
    aspect = float(spacing[0] / spacing[1])
    panel_w = 5.6
    panel_h = float(np.clip(panel_w * h * aspect / w, 2.5, 8.0))
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_w, panel_h + 0.8), layout="constrained")
    _draw_panel(axes[0], disp, None, None, colours, aspect)
    axes[0].set_title("原始影像" if zh else "Image", fontsize=12)
    _draw_panel(axes[1], disp, labels, id_map, colours, aspect)
    axes[1].set_title("分割结果" if zh else "Segmentation", fontsize=12)
    return fig


def _key_slices(labels: np.ndarray, lesions: list[dict], roles: list[str], zh: bool,
                max_montage: int) -> tuple[int, list[int], str]:
    """(slice shown large, montage slices, title): the largest lesion's slice, else the one with most tissue."""
    z_n = labels.shape[0]
    lesion_mask = np.isin(labels, [k for k, r in enumerate(roles, 1) if r == "lesion"])
    per_slice_lesion = lesion_mask.reshape(z_n, -1).sum(1)
    per_slice_any = (labels > 0).reshape(z_n, -1).sum(1)
    if lesions:
        key = int(lesions[0]["slice_index"])
        cands = np.flatnonzero(per_slice_lesion)
        title = (f"最大病灶（{lesions[0]['id']} 号）所在层面 z = {key}" if zh
                 else f"Largest lesion (#{lesions[0]['id']}), slice z = {key}")
    elif per_slice_any.any():
        key = int(np.argmax(per_slice_any))
        cands = np.flatnonzero(per_slice_any)
        title = f"分割面积最大层面 z = {key}" if zh else f"Slice with most segmented tissue, z = {key}"
    else:
        key = z_n // 2
        cands = np.arange(z_n)
        title = f"中间层面 z = {key}（未分割出结构）" if zh else f"Middle slice z = {key} (nothing segmented)"
    if len(cands) > max_montage:
        cands = cands[np.unique(np.linspace(0, len(cands) - 1, max_montage).round().astype(int))]
    return key, ([int(z) for z in cands] if len(cands) > 1 else []), title


def _figure_3d(disp: np.ndarray, meta: medio.ImageMeta, labels: np.ndarray, id_map: np.ndarray, lesions: list[dict],
               roles: list[str], colours: list[str], zh: bool, max_montage: int):
    """The key slice large (image | overlay), then a montage of the other slices with findings."""
    import matplotlib.pyplot as plt

    spacing = meta.spacing if meta.spacing_known else (1.0, 1.0, 1.0)
    tf = display_transform(meta)
    key, montage, title = _key_slices(labels, lesions, roles, zh, max_montage)
    row_sp, col_sp = (spacing[2], spacing[1]) if tf[0] else (spacing[1], spacing[2])
    aspect = float(row_sp / col_sp)
    first = orient_slice(disp[key], tf)
    hh, ww = first.shape[:2]
    ratio = float(np.clip(hh * aspect / ww, 0.3, 3.0))
    ncol, fig_w = 4, 11.2
    nrow = math.ceil(len(montage) / ncol)
    top_h, cell_h = fig_w / 2 * ratio, fig_w / ncol * ratio
    fig = plt.figure(figsize=(fig_w, top_h + nrow * (cell_h + 0.35) + 0.9), layout="constrained")
    gs = fig.add_gridspec(1 + nrow, ncol, height_ratios=[top_h + 0.35] + [cell_h + 0.35] * nrow)
    ax0, ax1 = fig.add_subplot(gs[0, 0:2]), fig.add_subplot(gs[0, 2:4])
    _draw_panel(ax0, first, None, None, colours, aspect)
    ax0.set_title(("原始影像 · " if zh else "Image · ") + f"z = {key}", fontsize=11)
    _draw_panel(ax1, first, orient_slice(labels[key], tf), orient_slice(id_map[key], tf), colours, aspect)
    ax1.set_title(title, fontsize=11)
    for j, z in enumerate(montage):
        ax = fig.add_subplot(gs[1 + j // ncol, j % ncol])
        _draw_panel(ax, orient_slice(disp[z], tf), orient_slice(labels[z], tf), orient_slice(id_map[z], tf),
                    colours, aspect, small=True)
        ax.set_title(f"z = {z}" + (f" / {meta.shape[0]}" if j == 0 else ""), fontsize=9)
    return fig


def render_overlay(image: np.ndarray, meta: medio.ImageMeta, labels: np.ndarray, id_map: np.ndarray,
                   lesions: list[dict], roles: list[str], prep: Preprocessing, lang: str = "zh",
                   max_montage: int = 12, channel: int = 0) -> bytes:
    """PNG bytes of the report's overlay figure (2D: image | overlay; 3D: largest-lesion slice + montage);
    ``labels`` one class per voxel (a region model's innermost region), ``channel`` the scan shown of a
    multi-channel case."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    import visualize

    visualize.setup_chinese_font()
    zh = lang == "zh"
    disp = display_image(image, meta, prep, channel=channel)
    colours = class_colours(roles, rgb_image=disp.ndim == len(meta.shape) + 1)
    if len(meta.shape) == 3:
        fig = _figure_3d(disp, meta, labels, id_map, lesions, roles, colours, zh, max_montage)
    else:
        fig = _figure_2d(disp, meta, labels, id_map, colours, zh)
    present = [k for k in range(1, len(roles) + 1) if (labels == k).any()]
    handles = [Patch(facecolor=colours[k - 1], edgecolor=colours[k - 1], alpha=0.7,
                     label=report.class_label(prep.class_names[k - 1], lang)) for k in present]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- page panels
@dataclass
class Panels:
    """The page's three RGB uint8 images of one plane."""

    input: np.ndarray
    overlay: np.ndarray
    probability: np.ndarray


def foreground_probability(probs: np.ndarray, roles: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """The probability the page shows, in the input's spatial ``shape``: the sigmoid output, the summed
    lesion classes (else 1 - background) of a multi-class model, or the most probable lesion region (else any
    region) of a region model (one sigmoid per class, no background channel)."""
    if probs.shape[1] == 1:
        p = probs[:, 0]
    elif probs.shape[1] == len(roles):  # regions: nested sigmoids, so their maximum, never their sum
        ks = [k - 1 for k, r in enumerate(roles, 1) if r == "lesion"] or list(range(len(roles)))
        p = probs[:, ks].max(1)
    else:
        ks = [k for k, r in enumerate(roles, 1) if r == "lesion"]
        p = probs[:, ks].sum(1) if ks else 1.0 - probs[:, 0]
    return np.clip(p, 0, 1).reshape(tuple(shape)).astype(np.float32)


def _hex_rgb(colour: str) -> np.ndarray:
    c = colour.lstrip("#")
    return np.array([int(c[i:i + 2], 16) for i in (0, 2, 4)], np.float32)


def _display_size(shape_hw: tuple[int, int], row_mm: float, col_mm: float) -> tuple[int, int]:
    """(width, height) in screen pixels for a plane, square pixels in mm, long side DISPLAY_PX."""
    h, w = shape_hw
    hh = h * (row_mm / col_mm if col_mm > 0 else 1.0)
    s = DISPLAY_PX / max(hh, w)
    return max(1, round(w * s)), max(1, round(hh * s))


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    if arr.shape[1] == size[0] and arr.shape[0] == size[1]:
        return arr
    if arr.dtype == bool:
        im = Image.fromarray(arr.astype(np.uint8) * 255)
        return np.asarray(im.resize(size, Image.Resampling.NEAREST)) > 127
    if arr.dtype == np.float32 and arr.ndim == 2:
        return np.asarray(Image.fromarray(arr, mode="F").resize(size, Image.Resampling.BILINEAR))
    im = Image.fromarray(arr)
    return np.asarray(im.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR))


def _edges(mask: np.ndarray, width: int = 2) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width)


_MAGMA: np.ndarray | None = None


def _magma() -> np.ndarray:
    """matplotlib's magma colour map as a (256, 3) uint8 table (made once: the slider re-draws often)."""
    global _MAGMA
    if _MAGMA is None:
        from matplotlib import colormaps

        _MAGMA = np.round(colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _MAGMA


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _draw_ids(rgb: np.ndarray, ids: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Numbered badges (as in the report figure) at each lesion's top-right-most pixel."""
    from PIL import Image, ImageDraw

    present = [int(i) for i in np.unique(ids) if i > 0][:30]
    if not present:
        return rgb
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    r = 10
    font = _font(13)
    w = rgb.shape[1]
    for i in present:
        bx, by = _badge_anchor(ids, i)
        x = min((bx + 1.0) * scale[0] + r * 0.8, w - r - 1)
        y = max(by * scale[1] - r * 0.8, r + 1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=BADGE_COLOUR, outline="white", width=2)
        draw.text((x, y), str(i), fill="white", font=font, anchor="mm")
    return np.asarray(im)


def _overlay_panel(base: np.ndarray, lab: np.ndarray, ids: np.ndarray, colours: list[str],
                   size: tuple[int, int]) -> np.ndarray:
    """Translucent class fills with solid outlines and numbered lesions on the (already resized) image."""
    over = base.astype(np.float32)
    lab_big = _resize(lab, size, nearest=True)
    for k, colour in enumerate(colours, start=1):
        m = lab_big == k
        if not m.any():
            continue
        c = _hex_rgb(colour)
        over[m] = over[m] * 0.72 + c * 0.28
        over[_edges(m)] = c
    return _draw_ids(np.round(over).astype(np.uint8), ids, (size[0] / lab.shape[1], size[1] / lab.shape[0]))


def _probability_panel(fg: np.ndarray, size: tuple[int, int], threshold: float | None) -> np.ndarray:
    """The probability in magma with its colour bar, and the threshold's outline in white when there is one."""
    fgs = _resize(np.asarray(fg, np.float32), size, nearest=False)
    prob = _magma()[np.clip(np.round(fgs * 255), 0, 255).astype(np.uint8)]
    if threshold is not None:
        prob[_edges(fgs > threshold, 1)] = 255
    bar = np.repeat(_magma()[::-1][np.linspace(0, 255, size[1]).astype(int)][:, None, :], 12, axis=1)
    gap = np.full((size[1], 6, 3), 255, np.uint8)
    return np.concatenate([prob, gap, bar], axis=1)


def render_panels(diag: Diagnosis, disp: np.ndarray, fg: np.ndarray, z: int = 0) -> Panels:
    """The page's three RGB images of one plane (a volume's slice ``z``): input, overlay with numbered lesions,
    and the probability map with the threshold line. ``disp`` / ``fg``: the display image and
    :func:`foreground_probability` of the whole case. Volumes are shown in radiological orientation, as in the
    report figure."""
    meta = diag.meta
    is_volume = len(meta.shape) == 3
    z = int(np.clip(z, 0, (meta.shape[0] - 1) if is_volume else 0))
    spacing = meta.spacing if meta.spacing_known else (1.0,) * len(meta.shape)
    if is_volume:
        tf = display_transform(meta)
        row_mm, col_mm = (spacing[2], spacing[1]) if tf[0] else (spacing[1], spacing[2])
        planes = (disp[z], diag.labels[z], diag.id_map[z], fg[z])
    else:
        tf = (False, False, False)
        row_mm, col_mm = spacing[0], spacing[1]
        planes = (disp, diag.labels, diag.id_map, fg)
    disp, lab, ids, fg = (orient_slice(a, tf) for a in planes)
    size = _display_size(lab.shape, float(row_mm), float(col_mm))
    grey = np.round(np.clip(disp, 0, 1) * 255).astype(np.uint8)
    base = _resize(grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, -1), size, nearest=False)
    overlay = _overlay_panel(base, lab, ids, class_colours(diag.roles, rgb_image=disp.ndim == 3), size)
    # sigmoid models (one class, or one per region): a threshold line; argmax models have none
    single = diag.probs.shape[1] in (1, len(diag.roles))
    return Panels(input=base, overlay=overlay,
                  probability=_probability_panel(fg, size, diag.settings.threshold if single else None))
