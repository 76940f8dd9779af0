"""A local web page for demos: upload a scan (or pick a bundled example), see the segmentation, read the report.

    python app.py [--checkpoint best_unet.pth] [--host 127.0.0.1] [--port 7860] [--lang zh|en]

Open the printed address (http://127.0.0.1:7860 by default) in a browser. The page shows the input, the
overlay and the probability map side by side (a slice slider for volumes), the findings sentence and the
lesion table in Chinese or English, lets the user change the probability threshold and the minimum lesion
size live, and offers the mask (PNG for 2D images, NIfTI for volumes / DICOM) and the HTML / JSON report
for download.

Design
    * Gradio (the field's convention for model demos) with analytics off (``GRADIO_ANALYTICS_ENABLED=False``
      and ``analytics_enabled=False``), no share link unless ``--share``, bound to 127.0.0.1 by default,
      server-side rendering off; the page loads nothing from outside the machine.
    * One inference path: :func:`predict.load_model` once, :func:`predict.segment` once per upload. The
      probabilities are cached per browser session, so threshold / minimum-size changes re-run only
      ``probs_to_labels`` + :func:`predict.postprocess` + the lesion measurements (milliseconds), and the
      slice slider only re-draws. The downloads are written from the same cached result with medio's and
      report.py's writers (``report.json`` has predict.py's schema).
    * Each browser session gets its own temporary folder (the uploaded file, the downloads), deleted when the
      tab closes (``demo.unload``), when Gradio expires the session state, and when the app exits; Gradio's
      own upload cache is swept by ``delete_cache``. Uploads are limited to :data:`MAX_UPLOAD_MB`.
    * Every request catches :class:`errors.MedSegError` and unexpected exceptions and shows a polite message
      in the status box; the page keeps working.
    * Without a checkpoint the page still starts and explains how to train one (``python run.py``).

Research software, not a medical device: never use it for diagnosis.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere: no telemetry
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import atexit
import html
import json
import logging
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("app")

MAX_UPLOAD_MB = 200                 # per uploaded file
MAX_UNPACKED_MB = 2048              # DICOM zips: total uncompressed size
MAX_VOXELS = 400_000_000            # NIfTI header check before reading (~1.6 GB as float32)
DISPLAY_PX = 448                    # long side of the three images on the page
DEFAULT_CHECKPOINT = "best_unet.pth"
SESSION_TTL_S = 2 * 3600            # Gradio deletes a session's state (and our folder) at the latest after this
DELETE_CACHE = (600, 3600)          # Gradio's upload/output cache: every 10 min, delete files older than 1 h
TRAIN_HINT_S = 15
LANGS = ("zh", "en")

#: bundled examples: (file name, data_gen preset, seed, Chinese label, English label)
EXAMPLES = (
    ("example_1_seed.png", "seed", 1, "示例 1 · 合成 CT 样图像（seed 预设）", "Example 1 · synthetic CT-like image (seed preset)"),
    ("example_2_seed.png", "seed", 2, "示例 2 · 合成 CT 样图像（seed 预设）", "Example 2 · synthetic CT-like image (seed preset)"),
    ("example_3_realistic.png", "realistic", 3, "示例 3 · 合成图像（realistic 预设，更难）",
     "Example 3 · synthetic image (realistic preset, harder)"),
    ("example_4_volume.nii.gz", "seed", 4, "示例 4 · 合成体数据（NIfTI，16 层）", "Example 4 · synthetic volume (NIfTI, 16 slices)"),
)

# --------------------------------------------------------------------------------------------- texts
_TEXT = {
    "title": ("医学影像分割演示", "Medical image segmentation demo"),
    "intro": ("上传一幅影像或选择内置示例，查看 U-Net 分割结果、分析结论与病灶列表，并下载掩膜和报告。",
              ("Upload a scan or pick a bundled example to see the U-Net segmentation, the findings and the lesion "
              "table, and download the mask and the report.")),
    "lang": ("语言 / Language", "Language / 语言"),
    "upload": ("上传影像（PNG/JPEG/TIFF、NIfTI .nii/.nii.gz、DICOM 文件或 .zip；最大 {limit} MB）",
               "Upload a scan (PNG/JPEG/TIFF, NIfTI .nii/.nii.gz, DICOM file or .zip; up to {limit} MB)"),
    "example": ("或选择内置示例（启动时生成的合成数据）", "…or pick a bundled example (synthetic, made at start-up)"),
    "run_example": ("分析示例", "Analyse example"),
    "threshold": ("概率阈值", "Probability threshold"),
    "threshold_info": ("概率高于阈值的像素判为病灶", "pixels above this probability are segmented"),
    "threshold_multi": ("多类别模型按 argmax 判定，阈值不适用", "multi-class model: argmax, no threshold"),
    "min_size": ("最小病灶大小", "Minimum lesion size"),
    "min_size_info": ("小于此值的病灶被去除", "smaller lesions are removed"),
    "slice": ("层面（体数据）", "Slice (volumes)"),
    "input": ("原始影像", "Input"),
    "overlay": ("分割叠加（编号对应病灶列表）", "Overlay (numbers match the lesion table)"),
    "prob": ("概率图（黑 0 → 黄 1，白线 = 阈值）", "Probability (black 0 → yellow 1, white line = threshold)"),
    "prob_multi": ("概率图（黑 0 → 黄 1）", "Probability (black 0 → yellow 1)"),
    "findings": ("分析结论", "Findings"),
    "lesions": ("病灶列表", "Lesions"),
    "downloads": ("下载：掩膜与报告（HTML / JSON）", "Downloads: mask and report (HTML / JSON)"),
    "reload": ("重新加载模型", "Reload model"),
    "waiting": ("请上传影像或选择示例。", "Upload a scan or pick an example."),
    "no_model": (("未找到模型：{path}。请先训练一个：在项目目录运行 <code>python run.py</code>（笔记本 CPU 约 {s} 秒），"
                 "然后点击“重新加载模型”。"),
                 ("No model found at {path} — train one with <code>python run.py</code> (about {s} s on a laptop CPU), "
                 "then click “Reload model”.")),
    "bad_model": ("模型无法加载：{msg}。可运行 <code>python run.py</code> 重新训练（约 {s} 秒），然后点击“重新加载模型”。",
                  ("The model could not be loaded: {msg}. Train a new one with <code>python run.py</code> "
                  "(about {s} s), then click “Reload model”.")),
    "model": ("模型", "Model"),
    "classes": ("类别", "classes"),
    "ok": ("已分析 {name}（{what}）：推理 {t:.2f} 秒。调整阈值或最小病灶大小无需重新推理。",
           "Analysed {name} ({what}): inference {t:.2f} s. Threshold and minimum-size changes re-use it."),
    "ok_update": ("已更新：阈值 {thr}，最小病灶 {size}（{t:.0f} 毫秒，未重新推理）。",
                  "Updated: threshold {thr}, minimum lesion size {size} ({t:.0f} ms, no new inference)."),
    "too_large": ("文件过大：{name} 为 {mb:.0f} MB，上限为 {limit} MB。请上传较小的文件（例如只含一个序列的 zip）。",
                  ("This file is too large: {name} is {mb:.0f} MB and the limit is {limit} MB. Please upload a smaller "
                  "file (for example a zip with a single series).")),
    "unpacked_large": ("压缩包解压后为 {mb:.0f} MB，超过上限 {limit} MB。", ("The zip unpacks to {mb:.0f} MB, more than the "
                       "{limit} MB limit.")),
    "encrypted": ("压缩包已加密，无法读取。", "The zip is encrypted and cannot be read."),
    "too_many_voxels": ("体数据过大（{shape}）。", "The volume is too large ({shape})."),
    "unsupported": (("不支持的文件类型“{sfx}”。支持：PNG/JPEG/TIFF/BMP/GIF 图像、NIfTI（.nii/.nii.gz）、NRRD/MHA、"
                    "DICOM 文件或 DICOM 序列 .zip。"),
                    ("Unsupported file type “{sfx}”. Supported: PNG/JPEG/TIFF/BMP/GIF images, NIfTI (.nii/.nii.gz), "
                    "NRRD/MHA, a DICOM file or a DICOM series as .zip.")),
    "cannot": ("无法分析 {name}：{msg}", "Could not analyse {name}: {msg}"),
    "unexpected": ("分析 {name} 时出现意外错误（{msg}）。页面仍可继续使用，请换一个文件再试。",
                   ("Something unexpected went wrong while analysing {name} ({msg}). The page still works: please try "
                   "another file.")),
    "corrupt_hint": ("文件可能已损坏，或内容与扩展名不符。", "The file may be damaged, or its content does not match its extension."),
    "empty_upload": ("没有收到文件，请重新上传。", "No file arrived; please upload again."),
    "no_case": ("请先上传影像或选择示例。", "Upload a scan or pick an example first."),
    "pick_example": ("请选择一个示例。", "Please pick an example."),
    "dl_failed": ("下载文件生成失败：{msg}", "The downloads could not be written: {msg}"),
    "notice_more": ("结果需由具备资质的医生结合临床资料复核。", "Results must be reviewed by a qualified physician."),
    "legend": ("颜色", "Colours"),
    "cached": ("推理 {t:.2f} 秒（已缓存）", "inference {t:.2f} s (cached)"),
    "px": ("像素", "px"), "voxels": ("体素", "voxels"),
    "col_no": ("编号", "No."),
}


def tr(key: str, lang: str, **kw: Any) -> str:
    """The ``lang`` text of ``key`` (``kw`` formatted in)."""
    zh, en = _TEXT[key]
    text = zh if lang == "zh" else en
    return text.format(**kw) if kw else text


def _lang(lang: str | None) -> str:
    return "en" if lang == "en" else "zh"


# ------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    name: str
    path: Path
    label_zh: str
    label_en: str

    def label(self, lang: str) -> str:
        return self.label_zh if lang == "zh" else self.label_en


def _scaled_mask(mask: np.ndarray, factor: float, centre: tuple[float, float]) -> np.ndarray:
    """``mask`` shrunk by ``factor`` about ``centre`` (nearest neighbour)."""
    from scipy import ndimage

    if factor < 0.08:
        return np.zeros_like(mask, bool)
    c = np.asarray(centre, float)
    out = ndimage.affine_transform(mask.astype(np.float32), np.eye(2) / factor, offset=c - c / factor, order=1)
    return out > 0.5


def synthetic_volume(size: int, seed: int, n_slices: int = 16, slice_mm: float = 1.5,
                     pixel_mm: float = 0.8) -> np.ndarray:
    """A coherent synthetic volume (Z, Y, X) in [0, 1]: the ``seed`` preset's organ grown into an ellipsoid-like
    body that shrinks towards both ends, with its bright lesion as a roughly round blob in the middle slices
    (intensities and noise as in ``data_gen``'s ``seed`` preset)."""
    import data_gen

    rng = np.random.default_rng(seed)
    _, lesion, organ = data_gen.generate_sample(rng, size, size, "seed")
    organ_c = tuple(np.argwhere(organ).mean(0))
    lesion_c = tuple(np.argwhere(lesion).mean(0)) if lesion.any() else organ_c
    lesion_half = max(1.5, math.sqrt(lesion.sum() / math.pi) * pixel_mm / slice_mm)  # in slices: about round
    organ_level, lesion_level = rng.uniform(0.3, 0.5), rng.uniform(0.7, 0.9)
    zc = (n_slices - 1) / 2
    vol = np.empty((n_slices, size, size), np.float32)
    for z in range(n_slices):
        t_org, t_les = (z - zc) / (zc + 1.0), (z - zc) / lesion_half
        org = _scaled_mask(organ, math.sqrt(max(0.0, 1 - t_org * t_org)), organ_c)
        les = _scaled_mask(lesion, math.sqrt(max(0.0, 1 - t_les * t_les)), lesion_c) & org
        sl = rng.normal(0.08, 0.03, (size, size)).astype(np.float32)
        sl[org] = organ_level + rng.normal(0, 0.03, int(org.sum()))
        sl[les] = lesion_level + rng.normal(0, 0.02, int(les.sum()))
        vol[z] = sl + np.linspace(0, 0.06, size, dtype=np.float32)[:, None]
    return np.clip(vol, 0, 1)


def make_examples(folder: Path, size: int) -> list[Example]:
    """Write the bundled examples (8-bit PNGs and one 8-bit NIfTI volume, seeded) into ``folder``."""
    import nibabel as nib
    from PIL import Image

    import data_gen

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, preset, seed, zh, en in EXAMPLES:
        path = folder / name
        if name.endswith(".nii.gz"):
            vol = np.round(synthetic_volume(size, seed) * 255).astype(np.uint8)  # (Z, Y, X)
            affine = np.diag([0.8, 0.8, 1.5, 1.0])  # x, y, z spacing in mm (RAS), as synthetic_volume assumes
            nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.T), affine), str(path))
        else:
            s = seed
            while True:  # the first seed (from ``seed``) whose image has a lesion: the demo should show one
                img, lesion, _ = data_gen.generate_sample(np.random.default_rng(s), size, size, preset)
                if lesion.any() or s > seed + 50:
                    break
                s += 1
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path)
        out.append(Example(name=name, path=path, label_zh=zh, label_en=en))
    return out


# ------------------------------------------------------------------------------------- session state
@dataclass
class Case:
    """One analysed input: the cached model output and the current post-processing result."""

    name: str                    # the file name the user knows
    stem: str                    # for download names
    path: Path                   # the copy in the session folder
    image: np.ndarray
    meta: Any                    # medio.ImageMeta
    disp: np.ndarray             # image scaled to [0, 1] for display
    probs: np.ndarray            # (Z, C_out, H, W), cached: never recomputed for this case
    fg: np.ndarray               # foreground / lesion probability in meta.shape
    roles: list[str]
    t_read: float
    t_predict: float
    threshold: float = 0.5
    min_size: float = 0.0
    labels: np.ndarray | None = None
    id_map: np.ndarray | None = None
    analysis: dict | None = None
    t_analyze: float = 0.0
    z: int = 0

    @property
    def is_volume(self) -> bool:
        return len(self.meta.shape) == 3


class Session:
    """Per-browser-session state: a private temporary folder and the current case."""

    def __init__(self, root: Path):
        self._tmp = tempfile.TemporaryDirectory(prefix="session-", dir=root)
        self.dir = Path(self._tmp.name)
        self.case: Case | None = None
        self.status: tuple[str, str, dict] = ("info", "waiting", {})  # kind, text key, format args
        self.downloads: list[str] = []
        self.size_unit: str | None = None     # unit of the minimum-size slider for the current case
        self.lock = threading.RLock()          # one request of this session at a time (chained events overlap)

    @property
    def alive(self) -> bool:
        return self.dir.exists()

    def reset(self) -> None:
        """Forget the current case and delete its files (a new upload replaces it)."""
        self.case = None
        self.downloads = []
        for sub in ("input", "out"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    def cleanup(self) -> None:
        """Delete the session folder (idempotent)."""
        self.case = None
        self.downloads = []
        try:
            self._tmp.cleanup()
        except OSError:  # pragma: no cover - already gone
            pass


def _cleanup_state(value: Any) -> None:
    """``gr.State`` delete callback."""
    if isinstance(value, Session):
        value.cleanup()


# ------------------------------------------------------------------------------------- rendering
def _hex_rgb(colour: str) -> np.ndarray:
    c = colour.lstrip("#")
    return np.array([int(c[i:i + 2], 16) for i in (0, 2, 4)], np.float32)


def class_colours(roles: list[str], rgb_image: bool) -> list[str]:
    """Same colours as predict.py's overlay figure: lesions red (cyan on colour photographs), others cycled."""
    import predict

    lesion = getattr(predict, "LESION_COLOUR_RGB", "#00e5ff") if rgb_image else predict.LESION_COLOUR
    out, j = [], 0
    for r in roles:
        if r == "lesion":
            out.append(lesion)
        else:
            out.append(predict.STRUCTURE_COLOURS[j % len(predict.STRUCTURE_COLOURS)])
            j += 1
    return out


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


_LUT: np.ndarray | None = None


def _magma() -> np.ndarray:
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps

        _LUT = np.round(colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUT


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _draw_ids(rgb: np.ndarray, ids: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Numbered red badges (as in predict.py's figure) at each lesion's top-right-most pixel."""
    from PIL import Image, ImageDraw

    present = [int(i) for i in np.unique(ids) if i > 0][:30]
    if not present:
        return rgb
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    r = 10
    font = _font(13)
    _h, w = rgb.shape[:2]
    for i in present:
        ys, xs = np.nonzero(ids == i)
        j = int(np.argmax(xs - ys))
        x = min((xs[j] + 1.0) * scale[0] + r * 0.8, w - r - 1)
        y = max(ys[j] * scale[1] - r * 0.8, r + 1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill="#d92d20", outline="white", width=2)
        draw.text((x, y), str(i), fill="white", font=font, anchor="mm")
    return np.asarray(im)


@dataclass
class Panels:
    input: np.ndarray
    overlay: np.ndarray
    probability: np.ndarray


def render_panels(case: Case, bundle, z: int | None = None) -> Panels:
    """The three RGB images of one plane (a volume's slice ``z``): input, overlay with numbered lesions, and the
    probability map with the threshold line. Volumes are shown in radiological orientation like the report."""
    import predict

    meta = case.meta
    z = int(np.clip(case.z if z is None else z, 0, (meta.shape[0] - 1) if case.is_volume else 0))
    spacing = meta.spacing if meta.spacing_known else (1.0,) * len(meta.shape)
    if case.is_volume:
        tf = predict.display_transform(meta)
        row_mm, col_mm = (spacing[2], spacing[1]) if tf[0] else (spacing[1], spacing[2])
        disp, lab, ids, fg = case.disp[z], case.labels[z], case.id_map[z], case.fg[z]
    else:
        tf = (False, False, False)
        row_mm, col_mm = spacing[0], spacing[1]
        disp, lab, ids, fg = case.disp, case.labels, case.id_map, case.fg
    disp, lab, ids, fg = (predict.orient_slice(a, tf) for a in (disp, lab, ids, fg))
    size = _display_size(lab.shape, float(row_mm), float(col_mm))
    scale = (size[0] / lab.shape[1], size[1] / lab.shape[0])

    grey = np.round(np.clip(disp, 0, 1) * 255).astype(np.uint8)
    base = _resize(grey if grey.ndim == 3 else np.repeat(grey[..., None], 3, -1), size, nearest=False)
    over = base.astype(np.float32)
    colours = class_colours(case.roles, rgb_image=disp.ndim == 3)
    lab_big = _resize(lab, size, nearest=True)
    for k, colour in enumerate(colours, start=1):
        m = lab_big == k
        if not m.any():
            continue
        c = _hex_rgb(colour)
        over[m] = over[m] * 0.72 + c * 0.28
        over[_edges(m)] = c
    over = _draw_ids(np.round(over).astype(np.uint8), ids, scale)

    fgs = _resize(np.asarray(fg, np.float32), size, nearest=False)
    prob = _magma()[np.clip(np.round(fgs * 255), 0, 255).astype(np.uint8)]
    if bundle.prep.n_classes == 1:
        prob[_edges(fgs > case.threshold, 1)] = 255
    bar = np.repeat(_magma()[::-1][np.linspace(0, 255, size[1]).astype(int)][:, None, :], 12, axis=1)
    gap = np.full((size[1], 6, 3), 255, np.uint8)
    prob = np.concatenate([prob, gap, bar], axis=1)
    return Panels(input=base, overlay=over, probability=prob)


def display_image(image: np.ndarray, meta, prep) -> np.ndarray:
    """[0, 1] image for the page: what an 8-bit model sees (/255) for ``unit`` models, else predict.py's display
    scaling (CT window or 0.5-99.5 % stretch, as in the report figure)."""
    import predict

    x = np.asarray(image, np.float32)
    if prep.normalization == "unit" and x.min() >= 0 and x.max() <= 255:
        return x / 255.0
    return predict.display_image(image, meta, prep)


def _fmt(v: Any, digits: int = 1) -> str:
    import report

    return report.fmt_num(v, digits)


def lesion_rows(analysis: dict, lang: str) -> tuple[list[str], list[list[str]]]:
    """The lesion table (headers, rows) with the report's column names and units."""
    import report

    is_volume = bool(analysis["summary"].get("is_volume"))
    t = report.t
    axes = "x × y × z" if is_volume else "x × y"
    headers = [t("no", lang), t("class", lang), t("location", lang), t("size3d" if is_volume else "size2d", lang),
               t("diameter", lang), f"{t('extent', lang)} ({axes})", t("prob", lang)]
    px, vox = tr("px", lang), tr("voxels", lang)
    rows = []
    for les in analysis["lesions"]:
        if is_volume:
            lo, hi = les["slice_range"]
            where = f"{t('slice', lang)} {les['slice_index']}" + (f" ({lo}–{hi})" if hi > lo else "")
            size = (f"{_fmt(les['volume_ml'], 2)} mL" if les.get("volume_ml") is not None
                    else f"{les.get('voxels', 0)} {vox}")
        else:
            cy, cx = les["centroid_index"]
            where = f"x {cx:.0f}, y {cy:.0f}"
            size = (f"{_fmt(les['area_mm2'], 1)} mm²" if les.get("area_mm2") is not None
                    else f"{les.get('pixels', 0)} {px}")
        if les.get("max_diameter_mm") is not None:
            diam = f"{_fmt(les['max_diameter_mm'], 1)} mm"
        else:
            diam = f"{_fmt(les.get('max_diameter_px'), 1)} {px}"
        ext = les.get("extent_mm")
        extent = (" × ".join(_fmt(v, 1) for v in ext[::-1]) + " mm") if ext else \
            " × ".join(str(v) for v in les.get("extent_px", [])[::-1]) + f" {px}"
        prob = f"{_fmt(les.get('mean_probability'), 2)} / {_fmt(les.get('max_probability'), 2)}"
        rows.append([str(les["id"]), report.class_label(les["class"], lang), where, size, diam, extent, prob])
    return headers, rows


# ------------------------------------------------------------------------------------- the app logic
@dataclass
class View:
    """Everything one request shows (the Gradio layer maps it onto components)."""

    status: str                                   # HTML
    panels: Panels | None = None
    findings: str = ""                            # HTML
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    n_slices: int = 0                             # > 1: a volume, the slice slider is shown
    z: int = 0
    min_size_unit: str = ""
    min_size_max: float = 100.0
    min_size: float | None = None                 # set when the case changes the unit
    ok: bool = True


def _status_html(kind: str, text: str) -> str:
    icon = {"ok": "✓", "error": "⚠", "info": "ℹ"}[kind]
    return (f'<div class="medseg-status medseg-{kind}" role="{"alert" if kind == "error" else "status"}">'
            f'<span class="medseg-icon">{icon}</span> {text}</div>')


def _nice_max(x: float) -> float:
    """A round slider maximum >= x."""
    x = max(float(x), 1.0)
    mag = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * mag >= x:
            return float(m * mag)
    return float(10 * mag)  # pragma: no cover


def _session_locked(method):
    """Run a handler while holding its session's lock (Gradio may run a chained event of the same page meanwhile)."""
    import functools

    @functools.wraps(method)
    def run(self, session: Session, *args, **kwargs):
        with session.lock:
            return method(self, session, *args, **kwargs)

    return run


class DemoApp:
    """The page's logic without Gradio: model, examples, sessions and the request handlers.

    Handlers take a :class:`Session` and return a :class:`View`; they never raise for user errors.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = DEFAULT_CHECKPOINT, *, lang: str = "zh",
                 device: str = "auto", precision: str = "auto", max_upload_mb: float = MAX_UPLOAD_MB):
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.lang = _lang(lang)
        self.device, self.precision = device, precision
        self.max_upload_mb = float(max_upload_mb)
        self._root = tempfile.TemporaryDirectory(prefix="medseg-app-")
        self.root = Path(self._root.name)
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()          # model + matplotlib: one at a time (pyplot is not thread-safe)
        self._sessions_lock = threading.Lock()
        self.bundle = None
        self.model_problem: tuple[str, dict] | None = None
        self.load_model()
        size = 64
        if self.bundle is not None:
            cfg = self.bundle.info.get("config") or {}
            size = int(cfg.get("image_size") or self.bundle.prep.patch_size or 64)
        self.examples = make_examples(self.root / "examples", int(np.clip(size, 32, 256)))
        atexit.register(self.close)

    # ----------------------------------------------------------------- model
    def load_model(self) -> bool:
        """(Re)load the checkpoint; on failure remember a polite explanation. Returns True when a model is ready."""
        import predict
        from errors import MedSegError

        self.bundle, self.model_problem = None, None
        if self.checkpoint is None or not self.checkpoint.is_file():
            self.model_problem = ("no_model", {"path": html.escape(str(self.checkpoint or DEFAULT_CHECKPOINT))})
            return False
        try:
            self.bundle = predict.load_model(self.checkpoint, self.device, self.precision)
        except MedSegError as exc:
            self.model_problem = ("bad_model", {"msg": html.escape(_oneline(exc))})
        except Exception as exc:
            log.exception("loading %s failed", self.checkpoint)
            self.model_problem = ("bad_model", {"msg": html.escape(f"{type(exc).__name__}: {_oneline(exc)}")})
        return self.bundle is not None

    def model_html(self, lang: str) -> str:
        """The banner above the page: the model in one line, or how to get one."""
        import predict

        if self.bundle is None:
            key, kw = self.model_problem or ("no_model", {"path": DEFAULT_CHECKPOINT})
            return f'<div class="medseg-banner medseg-error">⚠ {tr(key, lang, s=TRAIN_HINT_S, **kw)}</div>'
        import report

        d = predict.describe_model(self.bundle, lang)
        tr_ = d.get("training") or {}
        score = ""
        if tr_.get("test_dice") is not None:
            score = f" · {'测试集' if lang == 'zh' else 'test'} Dice {report.fmt_num(tr_['test_dice'], 3)}"
        elif tr_.get("val_dice") is not None:
            score = f" · {'验证集' if lang == 'zh' else 'validation'} Dice {report.fmt_num(tr_['val_dice'], 3)}"
        classes = ", ".join(report.class_label(c, lang) for c in self.bundle.prep.class_names)
        warn = "".join(f"<div>⚠ {html.escape(w)}</div>" for w in self.bundle.warnings)
        return (f'<div class="medseg-banner"><b>{tr("model", lang)}:</b> {html.escape(str(d["checkpoint"]))} · '
                f'{html.escape(d["architecture"])}{score} · {tr("classes", lang)}: {html.escape(classes)} · '
                f'{html.escape(d["device"])} {html.escape(d["precision"])}{warn}</div>')

    # ----------------------------------------------------------------- sessions
    def new_session(self, key: str | None = None) -> Session:
        s = Session(self.root)
        if key:
            with self._sessions_lock:
                old = self.sessions.pop(key, None)
                self.sessions[key] = s
            if old is not None and old is not s:
                old.cleanup()
        return s

    def end_session(self, key: str) -> None:
        """The browser tab closed: delete that session's folder now."""
        with self._sessions_lock:
            s = self.sessions.pop(key, None)
        if s is not None:
            s.cleanup()

    def close(self) -> None:
        for s in list(self.sessions.values()):
            s.cleanup()
        self.sessions.clear()
        try:
            self._root.cleanup()
        except OSError:  # pragma: no cover
            pass

    # ----------------------------------------------------------------- status helpers
    def _error(self, session: Session, key: str, **kw: Any) -> View:
        session.reset()
        session.status = ("error", key, kw)
        return View(status=self.status_html(session, self.lang_of(kw)), ok=False)

    @staticmethod
    def lang_of(kw: dict) -> str:
        return kw.get("_lang", "zh")

    def status_html(self, session: Session, lang: str) -> str:
        kind, key, kw = session.status
        kw = {k: v for k, v in kw.items() if k != "_lang"}
        return _status_html(kind, tr(key, lang, **kw))

    # ----------------------------------------------------------------- upload checks
    def check_upload(self, path: Path, name: str) -> tuple[str, dict] | None:
        """A polite reason to refuse the file before reading it (size, type, zip / volume too big), or None."""
        import medio

        size_mb = path.stat().st_size / 2 ** 20
        if size_mb > self.max_upload_mb:
            return "too_large", {"name": html.escape(name), "mb": size_mb, "limit": f"{self.max_upload_mb:g}"}
        sfx = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix.lower()
        if sfx not in medio.SUPPORTED_SUFFIXES and not medio.is_dicom_file(path):
            return "unsupported", {"sfx": html.escape(sfx or name)}
        if sfx == ".zip" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                if any(i.flag_bits & 0x1 for i in infos):
                    return "encrypted", {}
                total = sum(i.file_size for i in infos) / 2 ** 20
                if total > MAX_UNPACKED_MB:
                    return "unpacked_large", {"mb": total, "limit": MAX_UNPACKED_MB}
        if sfx in (".nii", ".nii.gz"):
            try:
                import nibabel as nib

                shape = nib.load(str(path)).shape
            except Exception:  # noqa: BLE001 - medio.read_image gives the proper message for a corrupt file
                return None
            if math.prod(int(s) for s in shape) > MAX_VOXELS:
                return "too_many_voxels", {"shape": " × ".join(map(str, shape))}
        return None

    # ----------------------------------------------------------------- handlers
    @_session_locked
    def analyse_upload(self, session: Session, file_path: str | os.PathLike | None, lang: str, threshold: float,
                       min_size: float) -> View:
        """A user's upload: copy it into the session folder, check it, predict once, analyse, render."""
        lang = _lang(lang)
        if not file_path:
            return self._error(session, "empty_upload", _lang=lang)
        src = Path(file_path)
        name = src.name
        return self._analyse(session, src, name, lang, threshold, min_size, copy=True)

    @_session_locked
    def analyse_example(self, session: Session, example: str | None, lang: str, threshold: float,
                        min_size: float) -> View:
        lang = _lang(lang)
        ex = next((e for e in self.examples if e.name == example), None)
        if ex is None:
            return self._error(session, "pick_example", _lang=lang)
        return self._analyse(session, ex.path, ex.name, lang, threshold, min_size, copy=False)

    def _analyse(self, session: Session, src: Path, name: str, lang: str, threshold: float, min_size: float,
                 copy: bool) -> View:
        import medio
        import predict
        from errors import MedSegError

        safe = html.escape(name)
        if self.bundle is None:
            session.reset()
            key, kw = self.model_problem or ("no_model", {"path": DEFAULT_CHECKPOINT})
            session.status = ("error", key, {**kw, "s": TRAIN_HINT_S, "_lang": lang})
            return View(status=self.status_html(session, lang), ok=False)
        session.reset()
        try:
            if not src.is_file():
                return self._error(session, "empty_upload", _lang=lang)
            refusal = self.check_upload(src, name)
            if refusal:
                return self._error(session, refusal[0], _lang=lang, **refusal[1])
            path = src
            if copy:
                (session.dir / "input").mkdir(parents=True, exist_ok=True)
                path = session.dir / "input" / name
                shutil.copyfile(src, path)
            t0 = time.perf_counter()
            image, meta = medio.read_image(path)
            t_read = time.perf_counter() - t0
            with self._lock:  # the one forward pass of this case; everything after re-uses seg.probs
                seg = predict.segment(self.bundle, image, meta, threshold=float(threshold))
            case = Case(name=name, stem=predict.case_stem(Path(name)), path=path, image=image, meta=meta,
                        disp=display_image(image, meta, self.bundle.prep),
                        probs=seg.probs, fg=self._foreground(seg.probs, seg.roles, meta), roles=seg.roles,
                        t_read=t_read, t_predict=seg.seconds)
            max_size, new_min = self._size_slider(case, float(min_size or 0), session)
            case.min_size = new_min
            self._postprocess(case, float(threshold), new_min)
            if case.is_volume:
                case.z = int(case.analysis["lesions"][0]["slice_index"]) if case.analysis["lesions"] \
                    else meta.shape[0] // 2
            session.case = case
            what = f"{meta.format.upper()}, {' × '.join(map(str, meta.shape))}"
            session.status = ("ok", "ok", {"name": safe, "what": html.escape(what), "t": case.t_predict, "_lang": lang})
            view = self._view(session, lang)
            view.min_size_max, view.min_size = max_size, new_min
            return view
        except MedSegError as exc:
            msg = html.escape(self._clean(exc, [src, session.dir / "input" / name], name))
            if "cannot read" in msg:
                msg += " " + tr("corrupt_hint", lang)
            return self._error(session, "cannot", name=safe, msg=msg, _lang=lang)
        except MemoryError:
            return self._error(session, "too_many_voxels", shape=safe, _lang=lang)
        except Exception as exc:
            log.exception("unexpected error on %s", name)
            msg = f"{type(exc).__name__}: {self._clean(exc, [src, session.dir / 'input' / name], name)}"
            return self._error(session, "unexpected", name=safe, msg=html.escape(msg), _lang=lang)

    @_session_locked
    def update_settings(self, session: Session, lang: str, threshold: float, min_size: float) -> View:
        """Threshold / minimum size changed: post-process the cached probabilities again (no inference)."""
        lang = _lang(lang)
        case = session.case
        if case is None:
            return View(status=self.status_html(session, lang), ok=False)
        try:
            t0 = time.perf_counter()
            self._postprocess(case, float(threshold), float(min_size or 0))
            unit = self._unit(case, lang)
            session.status = ("ok", "ok_update", {"thr": f"{case.threshold:.2f}", "size": f"{case.min_size:g} {unit}",
                                                  "t": 1000 * (time.perf_counter() - t0), "_lang": lang})
            return self._view(session, lang)
        except Exception as exc:
            log.exception("post-processing failed")
            return self._error(session, "unexpected", name=html.escape(case.name), msg=html.escape(_oneline(exc)),
                               _lang=lang)

    @_session_locked
    def show_slice(self, session: Session, z: int) -> Panels | None:
        case = session.case
        if case is None or case.labels is None:
            return None
        if case.is_volume:
            case.z = int(np.clip(int(z or 0), 0, case.meta.shape[0] - 1))
        return render_panels(case, self.bundle)

    @_session_locked
    def refresh(self, session: Session, lang: str) -> View:
        """Re-render everything (e.g. after a language change) from the session's state."""
        lang = _lang(lang)
        if session.case is None:
            return View(status=self.status_html(session, lang), ok=False)
        return self._view(session, lang)

    @_session_locked
    def write_downloads(self, session: Session, lang: str) -> list[str]:
        """Mask, report.html and report.json of the current result in the session folder (paths)."""
        lang = _lang(lang)
        case = session.case
        if case is None or case.labels is None or not session.alive:
            session.downloads = []
            return []
        try:
            with self._lock:
                files = write_case_files(self.bundle, case, session.dir / "out", lang)
            session.downloads = [str(p) for p in files]
        except Exception as exc:
            log.exception("writing downloads failed")
            session.status = ("error", "dl_failed", {"msg": html.escape(_oneline(exc)), "_lang": lang})
            session.downloads = []
        return session.downloads

    # ----------------------------------------------------------------- internals
    @staticmethod
    def _clean(exc: BaseException, paths: list[Path], name: str) -> str:
        """The error message without our temporary folders' paths (the user knows the file by its name)."""
        msg = _oneline(exc)
        for p in sorted({str(q) for q in paths}, key=len, reverse=True):
            msg = msg.replace(p, name)
        if msg.startswith(name + ": "):
            msg = msg[len(name) + 2:]
        return msg

    @staticmethod
    def _foreground(probs: np.ndarray, roles: list[str], meta) -> np.ndarray:
        """Probability shown on the page: the sigmoid output, or the summed lesion classes (1 - background)."""
        if probs.shape[1] == 1:
            p = probs[:, 0]
        else:
            ks = [k for k, r in enumerate(roles, 1) if r == "lesion"]
            p = probs[:, ks].sum(1) if ks else 1.0 - probs[:, 0]
        return np.clip(p, 0, 1).reshape(tuple(meta.shape)).astype(np.float32)

    def _postprocess(self, case: Case, threshold: float, min_size: float) -> None:
        """Exactly predict.segment's steps after the network: probs_to_labels + postprocess, then the measurements."""
        import predict
        from errors import ConfigError
        from inference import probs_to_labels

        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (got {threshold})")
        t0 = time.perf_counter()
        raw = probs_to_labels(case.probs, threshold)
        raw = raw if case.is_volume else raw[0]
        case.labels = predict.postprocess(raw, case.meta, case.roles, min_lesion_size=max(0.0, min_size),
                                          largest=predict.learned_largest(self.bundle))
        case.analysis, case.id_map = predict.analyze_with_ids(case.labels, case.probs, case.meta, self.bundle.prep, case.roles)
        case.threshold, case.min_size = threshold, max(0.0, min_size)
        case.t_analyze = time.perf_counter() - t0

    def _unit(self, case: Case, lang: str) -> str:
        import predict

        unit = predict.size_unit(case.meta)[0]
        return {"px": tr("px", lang), "voxels": tr("voxels", lang)}.get(unit, unit)

    def _size_slider(self, case: Case, current: float, session: Session) -> tuple[float, float]:
        """(slider maximum, value) for the minimum lesion size of this case; keeps the value when the unit
        (px / mm² / voxels / mm³) is the same as the previous case's and it fits."""
        import predict

        unit, per = predict.size_unit(case.meta)
        total = math.prod(case.meta.shape) * per
        hi = _nice_max(min(max(0.01 * total, 50.0), 10000.0))
        prev = session.size_unit
        session.size_unit = unit
        value = current if (prev in (None, unit) and current <= hi) else 0.0
        return hi, value

    def _view(self, session: Session, lang: str) -> View:
        import report

        case = session.case
        panels = render_panels(case, self.bundle)
        headers, rows = lesion_rows(case.analysis, lang)
        findings = report.findings_sentence({"summary": case.analysis["summary"]}, lang)
        present = [k for k in range(1, len(case.roles) + 1) if (case.labels == k).any()]
        colours = class_colours(case.roles, rgb_image=case.disp.ndim == len(case.meta.shape) + 1)
        legend = "".join(f'<span class="medseg-swatch" style="background:{colours[k - 1]}"></span>'
                         f'{html.escape(report.class_label(self.bundle.prep.class_names[k - 1], lang))} '
                         for k in present)
        import predict

        warnings = list(self.bundle.warnings) + predict.input_warnings(case.image, case.meta, self.bundle.prep, lang)
        warn = "".join(f'<div class="medseg-warn">⚠ {html.escape(w)}</div>' for w in warnings)
        meta = case.meta
        spacing = (" × ".join(f"{v:.3g}" for v in meta.spacing) + " mm") if meta.spacing_known else \
            report.t("spacing_unknown", lang)
        facts = (f"{html.escape(case.name)} · {meta.format.upper()} · {' × '.join(map(str, meta.shape))}"
                 f"{' × 3' if case.disp.ndim == len(meta.shape) + 1 else ''} · {html.escape(spacing)} · "
                 f"{tr('cached', lang, t=case.t_predict)}")
        findings_html = (f'<div class="medseg-findings" id="findings-text">{html.escape(findings)}</div>'
                         f'<div class="medseg-facts">{facts}'
                         f'{" · " + tr("legend", lang) + ": " + legend if legend else ""}</div>{warn}'
                         f'<div class="medseg-notice">{html.escape(report.NOTICE[lang])} '
                         f'{tr("notice_more", lang)}</div>')
        return View(status=self.status_html(session, lang), panels=panels, findings=findings_html, headers=headers,
                    rows=rows, n_slices=meta.shape[0] if case.is_volume else 0, z=case.z,
                    min_size_unit=self._unit(case, lang))


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------- downloads
def build_report(bundle, case: Case, lang: str, outputs: dict[str, str]) -> dict:
    """The JSON-safe report of ``case``'s current result, with predict.py's schema (``predict.predict_case``
    builds the same dictionary; tests compare the two)."""
    import torch

    import predict
    import report

    meta, prep = case.meta, bundle.prep
    inp = {"path": case.name, "name": case.name, "format": meta.format, "shape": list(meta.shape),
           "channels": meta.channels, "spacing_mm": list(meta.spacing), "spacing_known": meta.spacing_known,
           "affine": meta.affine, "modality": meta.extra.get("modality") or None,
           "series_description": meta.extra.get("series_description") or None}
    if meta.format == "dicom":
        inp["patient"] = predict.dicom_header(case.path)
    warnings = list(bundle.warnings) + predict.input_warnings(case.image, meta, prep, lang)
    rep: dict[str, Any] = {
        "schema": predict.REPORT_SCHEMA, "case": case.stem,
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "language": lang, "notice": predict.NOTICE[lang], "notice_zh": predict.NOTICE["zh"],
        "notice_en": predict.NOTICE["en"], "software": f"medseg app.py (predict.py) · PyTorch {torch.__version__}",
        "input": inp, "model": predict.describe_model(bundle, lang),
        "settings": predict.settings_record(bundle, meta, threshold=case.threshold, min_lesion_size=case.min_size),
        "classes": [{"index": k, "name": n, "role": r}
                    for k, (n, r) in enumerate(zip(prep.class_names, case.roles), 1)],
        "lesions": case.analysis["lesions"], "summary": dict(case.analysis["summary"]),
        "outputs": outputs,
        "timing": {"read_s": round(case.t_read, 3), "predict_s": round(case.t_predict, 3),
                   "analyze_s": round(case.t_analyze, 3)},
        "warnings": warnings,
    }
    rep["summary"]["findings"] = report.findings_sentence(rep, lang)
    rep["summary"]["findings_zh"] = report.findings_sentence(rep, "zh")
    rep["summary"]["findings_en"] = report.findings_sentence(rep, "en")
    rep["timing"]["total_s"] = round(case.t_read + case.t_predict + case.t_analyze, 3)
    return predict.json_safe(rep)


def write_case_files(bundle, case: Case, out_dir: Path, lang: str) -> list[Path]:
    """``<stem>_mask.png|.nii.gz`` (medio.write_mask: PNG for 2D images, NIfTI for NIfTI / DICOM / volumes),
    ``<stem>_report.html`` (report.render_html, overlay figure from predict.render_overlay) and
    ``<stem>_report.json``."""
    import medio
    import predict
    import report

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # only the current result's files
        if old.is_file():
            old.unlink()
    stem = case.stem
    mask = medio.write_mask(case.labels, case.meta, out_dir / f"{stem}_mask{medio.output_suffix(case.meta)}")
    png = predict.render_overlay(case.image, case.meta, case.labels, case.id_map, case.analysis["lesions"],
                                 case.roles, bundle.prep, lang)
    names = {"mask": mask.name, "report_html": f"{stem}_report.html", "report_json": f"{stem}_report.json"}
    rep = build_report(bundle, case, lang, names)
    page = report.render_html(rep, {"overlay": png}, lang)
    html_path = out_dir / names["report_html"]
    json_path = out_dir / names["report_json"]
    html_path.write_text(page, encoding="utf-8")
    json_path.write_text(json.dumps(rep, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return [mask, html_path, json_path]


# ------------------------------------------------------------------------------------- the page
CSS = """
:root, .gradio-container { --font: ReportCJK, 'Source Sans Pro', ui-sans-serif, system-ui, -apple-system,
  'Segoe UI', 'PingFang SC', 'Microsoft YaHei', 'Noto Sans CJK SC', sans-serif !important;
  --font-mono: 'IBM Plex Mono', ui-monospace, Consolas, ReportCJK, 'Noto Sans Mono CJK SC', monospace !important; }
.gradio-container *:not(code):not(pre):not(svg):not(path) { font-family: var(--font) !important; }
.medseg-head h1 { margin: 0 0 2px; font-size: 1.6em; }
.medseg-head p { margin: 0; color: #5f6b7a; }
.medseg-banner { padding: 8px 12px; border-radius: 6px; background: #f2f7fd; border-left: 5px solid #1d5fa8;
  font-size: .95em; }
.medseg-banner.medseg-error, .medseg-status.medseg-error { background: #fdf1f0; border-left-color: #b42318;
  color: #7a1a12; }
.medseg-banner code { background: #fff; padding: 1px 5px; border-radius: 3px; font-weight: 600; }
.medseg-status { padding: 8px 12px; border-radius: 6px; border-left: 5px solid #1d5fa8; background: #f2f7fd;
  font-size: .95em; }
.medseg-status.medseg-ok { border-left-color: #15803d; background: #f0fdf4; color: #14532d; }
.medseg-status.medseg-error { font-weight: 600; }
.medseg-findings { font-size: 1.25em; font-weight: 600; padding: 10px 14px; background: #f2f7fd;
  border-left: 5px solid #1d5fa8; border-radius: 4px; }
.medseg-facts { color: #5f6b7a; font-size: .9em; margin: 6px 2px; }
.medseg-swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin: 0 4px 0 6px;
  vertical-align: -1px; }
.medseg-warn { margin: 6px 0; padding: 6px 12px; background: #fff8e6; border: 1px solid #f5d48a; border-radius: 4px;
  color: #7a4a00; }
.medseg-notice { margin-top: 6px; color: #b42318; font-size: .9em; font-weight: 600; }
"""


def _cjk_font_css(extra_text: str = "") -> str:
    """``@font-face`` with the Chinese characters this page can show, subset from the Noto Sans CJK SC font that
    ``mplfonts`` ships (via report.py's subsetter), so Chinese renders on machines without CJK fonts; '' if
    unavailable (the browser's own CJK fonts are then used)."""
    import predict
    import report

    modules = (sys.modules[__name__], report, predict)
    texts = [extra_text] + [Path(m.__file__).read_text(encoding="utf-8") for m in modules]
    try:
        return report.font_face("".join(texts) + "，。：；（）“”、·")
    except Exception:  # noqa: BLE001 - fonts are a nicety
        return ""


def build_app(checkpoint: str | os.PathLike | None = DEFAULT_CHECKPOINT, *, lang: str = "zh", device: str = "auto",
              precision: str = "auto", app: DemoApp | None = None):
    """The Gradio page (``gr.Blocks``). ``demo.medseg`` is its :class:`DemoApp`; serve it with :func:`serve`."""
    import gradio as gr
    import pandas as pd

    app = app or DemoApp(checkpoint, lang=lang, device=device, precision=precision)
    lang0 = app.lang
    ready = app.bundle is not None
    multi = ready and app.bundle.prep.n_classes > 1

    def upload_label(lg: str) -> str:
        return tr("upload", lg, limit=f"{app.max_upload_mb:g}")

    def example_choices(lg: str) -> list[tuple[str, str]]:
        return [(e.label(lg), e.name) for e in app.examples]

    def header_html(lg: str) -> str:
        import report

        return (f'<div class="medseg-head"><h1>{tr("title", lg)}</h1><p>{tr("intro", lg)} '
                f'<b style="color:#b42318">{html.escape(report.NOTICE[lg])}</b></p></div>')

    def table_value(headers: list[str], rows: list[list[str]], lg: str = "en"):
        if not headers:  # nothing analysed: the column names alone
            headers = lesion_rows({"lesions": [], "summary": {"is_volume": False}}, lg)[0]
        return pd.DataFrame(rows, columns=headers)

    with gr.Blocks(title="medseg · U-Net", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_cleanup_state)
        with gr.Row(equal_height=True):
            header = gr.HTML(header_html(lang0), elem_id="medseg-header", scale=4)
            lang_radio = gr.Radio([("中文", "zh"), ("English", "en")], value=lang0, label=tr("lang", lang0),
                                  elem_id="lang", scale=1, min_width=200)
        banner = gr.HTML(app.model_html(lang0), elem_id="model-banner")
        reload_btn = gr.Button(tr("reload", lang0), visible=not ready, elem_id="reload", size="sm")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label=upload_label(lang0), file_count="single", type="filepath", elem_id="upload",
                                 interactive=ready, height=130)
                example = gr.Dropdown(example_choices(lang0), value=app.examples[0].name, label=tr("example", lang0),
                                      elem_id="example", interactive=ready)
                example_btn = gr.Button(tr("run_example", lang0), variant="primary", elem_id="example-btn",
                                        interactive=ready)
                threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label=tr("threshold", lang0),
                                      info=tr("threshold_multi" if multi else "threshold_info", lang0),
                                      elem_id="threshold", interactive=ready and not multi)
                min_size = gr.Slider(0, 100, value=0, step=1, label=tr("min_size", lang0) + f" ({tr('px', lang0)})",
                                     info=tr("min_size_info", lang0), elem_id="min-size", interactive=ready)
                slice_slider = gr.Slider(0, 1, value=0, step=1, label=tr("slice", lang0), visible=False,
                                         elem_id="slice")
                status = gr.HTML(_status_html("info", tr("waiting", lang0)) if ready else "", elem_id="status")
                downloads = gr.File(label=tr("downloads", lang0), file_count="multiple", interactive=False,
                                    elem_id="downloads")
            with gr.Column(scale=3):
                with gr.Row():
                    kw = {"type": "numpy", "format": "png", "interactive": False, "height": 340,
                          "buttons": ["download", "fullscreen"]}
                    img_in = gr.Image(label=tr("input", lang0), elem_id="input-image", **kw)
                    img_ov = gr.Image(label=tr("overlay", lang0), elem_id="overlay-image", **kw)
                    img_pr = gr.Image(label=tr("prob_multi" if multi else "prob", lang0), elem_id="prob-image", **kw)
                findings = gr.HTML("", elem_id="findings")
                table = gr.Dataframe(table_value([], [], lang0), label=tr("lesions", lang0), elem_id="lesion-table",
                                     interactive=False,
                                     wrap=True, max_height=360)

        def with_request(fn):
            """Gradio injects gr.Request by type hint; this module's annotations are strings (PEP 563)."""
            fn.__annotations__["request"] = gr.Request
            return fn

        def session_of(value: Any, request) -> Session:
            if isinstance(value, Session) and value.alive:
                return value
            key = getattr(request, "session_hash", None) if request is not None else None
            return app.new_session(key)

        def outputs_of(view: View, lg: str) -> list[Any]:
            p = view.panels
            if view.n_slices > 1:
                sl = gr.update(visible=True, minimum=0, maximum=view.n_slices - 1, value=view.z,
                               label=f"{tr('slice', lg)} · z / {view.n_slices}")
            else:
                sl = gr.update(visible=False)
            ms = gr.update(label=f"{tr('min_size', lg)} ({view.min_size_unit})") if view.min_size_unit else gr.update()
            if view.min_size is not None:
                ms = gr.update(label=f"{tr('min_size', lg)} ({view.min_size_unit})", maximum=view.min_size_max,
                               value=view.min_size)
            return [view.status,
                    p.input if p else None, p.overlay if p else None, p.probability if p else None,
                    view.findings, table_value(view.headers, view.rows, lg), sl, ms]

        view_outputs = [status, img_in, img_ov, img_pr, findings, table, slice_slider, min_size]

        @with_request
        def on_upload(value, file_path, lg, thr, ms, request):
            s = session_of(value, request)
            view = app.analyse_upload(s, file_path, lg, thr, ms)
            return [s, *outputs_of(view, lg), None]

        @with_request
        def on_example(value, name, lg, thr, ms, request):
            s = session_of(value, request)
            view = app.analyse_example(s, name, lg, thr, ms)
            return [s, *outputs_of(view, lg), gr.update(value=None)]

        @with_request
        def on_settings(value, lg, thr, ms, request):
            s = session_of(value, request)
            return [s, *outputs_of(app.update_settings(s, lg, thr, ms), lg)]

        def on_slice(value, z):
            if not isinstance(value, Session):
                return [gr.update()] * 3
            p = app.show_slice(value, z)
            return [p.input, p.overlay, p.probability] if p else [gr.update()] * 3

        def on_downloads(value, lg):
            if not isinstance(value, Session):
                return [None, gr.update()]
            files = app.write_downloads(value, lg)
            return [files or None, app.status_html(value, _lang(lg))]

        def on_lang(value, lg):
            lg = _lang(lg)
            ready_now = app.bundle is not None
            multi_now = ready_now and app.bundle.prep.n_classes > 1
            fixed = [header_html(lg), gr.update(label=tr("lang", lg)), app.model_html(lg),
                     gr.update(value=tr("reload", lg)), gr.update(label=upload_label(lg)),
                     gr.update(label=tr("example", lg), choices=example_choices(lg)),
                     gr.update(value=tr("run_example", lg)),
                     gr.update(label=tr("threshold", lg),
                               info=tr("threshold_multi" if multi_now else "threshold_info", lg)),
                     gr.update(label=tr("downloads", lg))]
            view = app.refresh(value, lg) if isinstance(value, Session) else None
            unit = view.min_size_unit if view is not None and view.min_size_unit else tr("px", lg)
            if view is None:
                status_html = _status_html("info", tr("waiting", lg)) if ready_now else ""
            else:
                status_html = view.status
            have = view is not None and view.panels is not None
            table_upd = gr.update(label=tr("lesions", lg),
                                  value=table_value(view.headers if have else [], view.rows if have else [], lg))
            out = [status_html,
                   gr.update(label=tr("input", lg)), gr.update(label=tr("overlay", lg)),
                   gr.update(label=tr("prob_multi" if multi_now else "prob", lg)),
                   view.findings if have else gr.update(), table_upd,
                   gr.update(label=f"{tr('slice', lg)} · z / {view.n_slices}") if have and view.n_slices > 1
                   else gr.update(),
                   gr.update(label=f"{tr('min_size', lg)} ({unit})", info=tr("min_size_info", lg))]
            return [*fixed, *out]

        def on_reload(lg):
            lg = _lang(lg)
            ok = app.load_model()
            m = ok and app.bundle.prep.n_classes > 1
            return [app.model_html(lg), gr.update(visible=not ok), gr.update(interactive=ok),
                    gr.update(interactive=ok), gr.update(interactive=ok),
                    gr.update(interactive=ok and not m), gr.update(interactive=ok),
                    _status_html("info", tr("waiting", lg)) if ok else ""]

        @with_request
        def on_unload(request):
            key = getattr(request, "session_hash", None)
            if key:
                app.end_session(key)

        upload.upload(on_upload, [state, upload, lang_radio, threshold, min_size], [state, *view_outputs, downloads],
                      show_progress="minimal").then(on_downloads, [state, lang_radio], [downloads, status],
                                                    show_progress="hidden")
        example_btn.click(on_example, [state, example, lang_radio, threshold, min_size],
                          [state, *view_outputs, upload], show_progress="minimal").then(
            on_downloads, [state, lang_radio], [downloads, status], show_progress="hidden")
        for slider in (threshold, min_size):
            slider.input(on_settings, [state, lang_radio, threshold, min_size], [state, *view_outputs],
                         trigger_mode="always_last", show_progress="hidden").then(
                on_downloads, [state, lang_radio], [downloads, status], show_progress="hidden")
        slice_slider.input(on_slice, [state, slice_slider], [img_in, img_ov, img_pr], trigger_mode="always_last",
                           show_progress="hidden")
        lang_radio.change(on_lang, [state, lang_radio],
                          [header, lang_radio, banner, reload_btn, upload, example, example_btn, threshold, downloads,
                           *view_outputs],
                          show_progress="hidden").then(on_downloads, [state, lang_radio], [downloads, status],
                                                       show_progress="hidden")
        reload_btn.click(on_reload, [lang_radio], [banner, reload_btn, upload, example, example_btn, threshold,
                                                   min_size, status])
        demo.unload(on_unload)
    demo.medseg = app
    return demo


def serve(demo, host: str = "127.0.0.1", port: int = 7860, *, share: bool = False, block: bool = True,
          quiet: bool = False):
    """Launch ``demo`` (from :func:`build_app`) with the page's CSS, the upload limit, no SSR and no share link
    unless asked. ``block=False`` returns at once (tests)."""
    import gradio as gr

    app: DemoApp = demo.medseg
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                       inbrowser=False, show_error=False, ssr_mode=False, max_file_size=int(app.max_upload_mb * 2**20),
                       theme=gr.themes.Default(), css=_cjk_font_css() + CSS, footer_links=["gradio"],
                       mcp_server=False)


# ------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Local web page: upload a scan, see the segmentation and the report "
                                            "(research software, not a medical device).")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="trained model (python run.py writes it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps the page on this computer")
    p.add_argument("--port", type=int, default=7860, help="port (0 < port < 65536)")
    p.add_argument("--lang", default="zh", choices=LANGS, help="initial page language (switchable on the page)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto = cuda > mps > cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="inference precision")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="largest accepted upload")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default; "
                   "sends the page through Gradio's servers: never with patient data)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not 0 < args.port < 65536:
        parser.print_usage(sys.stderr)
        print(f"app.py: error: --port must be between 1 and 65535 (got {args.port})", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0:
        print("app.py: error: --max-upload-mb must be > 0", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: other computers on the network can open this page", file=sys.stderr)
    if args.share:
        print("warning: --share creates a public link through Gradio's servers; never upload patient data",
              file=sys.stderr)
    print("Starting… (research software, not a medical device)", flush=True)
    app = DemoApp(args.checkpoint, lang=args.lang, device=args.device, precision=args.precision,
                  max_upload_mb=args.max_upload_mb)
    if app.bundle is None:
        key, kw = app.model_problem or ("no_model", {"path": args.checkpoint})
        plain = tr(key, "en", s=TRAIN_HINT_S, **kw).replace("<code>", "`").replace("</code>", "`")
        print(f"warning: {html.unescape(plain)}", file=sys.stderr)
    if "gradio" not in sys.modules:  # Gradio's upload / output cache inside our folder: gone when the app exits
        os.environ.setdefault("GRADIO_TEMP_DIR", str(app.root / "gradio-cache"))
    demo = build_app(app=app)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`: still delete the temporary folders
    try:
        try:
            _, local_url, share_url = serve(demo, args.host, args.port, share=args.share, block=False, quiet=True)
        except OSError as exc:
            print(f"app.py: error: cannot serve on {args.host}:{args.port} ({_oneline(exc)}); try another --port",
                  file=sys.stderr)
            return 2
        print(f"Open {local_url} in a browser (Ctrl+C to stop).", flush=True)
        if share_url:
            print(f"Public link: {share_url}", flush=True)
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
