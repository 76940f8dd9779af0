"""Readable reports for ``predict.py``: the findings sentence (Chinese or English) and a self-contained HTML page.

Everything here is a pure function of the JSON-safe report dictionary that :func:`predict.predict_case`
builds, so the HTML can be re-rendered from ``report.json`` alone (``render_html(json.load(f), {...})``).

The page needs nothing from the network or the disk: CSS is inline, images are ``data:`` URIs, and
the Chinese characters it uses are embedded as a subset of Noto Sans CJK SC (SIL Open Font License,
shipped by the ``mplfonts`` package) so it renders without tofu boxes on machines without CJK fonts.
Every piece of text that comes from a file, a checkpoint or the user is escaped with ``html.escape``.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NOTICE = {
    "zh": "本报告由科研软件自动生成，不是医疗器械，不能作为临床诊断依据。",
    "en": "Research software, not a medical device; not for clinical diagnosis.",
}

#: Display names of common class names (the checkpoint's ``class_names``) in Chinese.
CLASS_NAMES_ZH = {
    "lesion": "病灶", "lesions": "病灶", "tumor": "肿瘤", "tumour": "肿瘤", "liver": "肝脏", "foreground": "前景",
    "vessel": "血管", "vessels": "血管", "polyp": "息肉", "organ": "器官", "kidney": "肾脏", "spleen": "脾脏",
    "pancreas": "胰腺", "lung": "肺", "nodule": "结节", "anterior": "前部", "posterior": "后部",
    "hippocampus": "海马", "background": "背景", "cyst": "囊肿", "livertumor": "肝脏肿瘤", "liver_tumor": "肝脏肿瘤",
}

_T = {
    "title": ("医学影像分割辅助分析报告", "Segmentation-assisted image analysis report"),
    "badge": ("仅供科研", "Research use only"),
    "generated": ("生成时间", "Generated"),
    "case": ("病例", "Case"),
    "image": ("影像信息", "Image"),
    "findings": ("分析结论", "Findings"),
    "lesions": ("病灶列表", "Lesions"),
    "structures": ("结构测量", "Structures"),
    "overlay": ("分割叠加图", "Segmentation overlay"),
    "model": ("模型与参数", "Model and settings"),
    "file": ("文件", "File"),
    "format": ("格式", "Format"),
    "dims": ("尺寸", "Size"),
    "spacing": ("体素间距", "Voxel spacing"),
    "spacing_unknown": ("未知（按像素计量）", "unknown (measured in pixels)"),
    "modality": ("模态", "Modality"),
    "patient": ("患者", "Patient"),
    "patient_id": ("患者 ID", "Patient ID"),
    "sex_age": ("性别 / 年龄", "Sex / age"),
    "study_date": ("检查日期", "Study date"),
    "series": ("序列", "Series"),
    "no": ("编号", "No."),
    "class": ("类别", "Class"),
    "location": ("位置", "Location"),
    "size2d": ("面积", "Area"),
    "size3d": ("体积", "Volume"),
    "diameter": ("最大直径", "Max. diameter"),
    "extent": ("范围", "Extent"),
    "prob": ("平均 / 最大概率", "Mean / max prob."),
    "none_found": ("未检出疑似病灶。", "No suspected lesion detected."),
    "more_rows": ("另有 {n} 处较小病灶未列出，见 report.json。", "{n} smaller lesions not listed; see report.json."),
    "role": ("角色", "Role"),
    "role_organ": ("器官", "organ"),
    "role_tubular": ("管状结构", "tubular"),
    "role_lesion": ("病灶", "lesion"),
    "components": ("连通域", "Components"),
    "checkpoint": ("模型文件", "Checkpoint"),
    "architecture": ("网络结构", "Architecture"),
    "training": ("训练记录", "Training"),
    "preprocessing": ("预处理", "Preprocessing"),
    "threshold": ("阈值", "Threshold"),
    "postprocess": ("后处理", "Post-processing"),
    "runtime": ("运行环境", "Runtime"),
    "warnings": ("注意", "Warnings"),
    "slice": ("层面", "slice"),
    "axial": ("层内", "in-plane"),
    "legend_caption": ("轮廓与半透明填充为分割结果（颜色见图例），编号与病灶列表一致。",
                       ("Outlines and translucent fill show the segmentation (colours in the legend); "
                        "numbers match the lesion table.")),
    "footer": ("结果需由具备资质的医生结合临床资料复核。", "Results must be reviewed by a qualified physician with the clinical context."),
}


def t(key: str, lang: str) -> str:
    """The ``lang`` ('zh' or 'en') text of ``key``."""
    zh, en = _T[key]
    return zh if lang == "zh" else en


def class_label(name: str, lang: str) -> str:
    """Human name of a class: Chinese translation of common names for ``zh``, else the name itself."""
    name = str(name).strip()
    if name.isdigit():
        return f"类别 {name}" if lang == "zh" else f"class {name}"
    if lang == "zh":
        return CLASS_NAMES_ZH.get(name.lower(), name)
    return name


# --------------------------------------------------------------------------------------- numbers
def fmt_num(value: Any, digits: int = 1) -> str:
    """Fixed-point number, or an em dash for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{float(value):.{digits}f}"


def _size_text(item: dict, is_volume: bool, lang: str) -> str:
    if is_volume:
        if item.get("volume_ml") is not None:
            return f"{fmt_num(item['volume_ml'], 2)} mL"
        return f"{item.get('voxels', 0)} {'体素' if lang == 'zh' else 'voxels'}"
    if item.get("area_mm2") is not None:
        return f"{fmt_num(item['area_mm2'], 1)} mm²"
    return f"{item.get('pixels', 0)} {'像素' if lang == 'zh' else 'px'}"


def _diameter_text(item: dict, lang: str, key: str = "max_diameter") -> str:
    mm = item.get(f"{key}_mm")
    if mm is not None:
        return f"{fmt_num(mm, 1)} mm"
    px = item.get(f"{key}_px")
    return "—" if px is None else f"{fmt_num(px, 1)} {'像素' if lang == 'zh' else 'px'}"


# -------------------------------------------------------------------------------------- findings
def findings_sentence(report: dict, lang: str = "zh") -> str:
    """One sentence a doctor reads first, e.g. 「检出 2 处疑似病灶，最大直径 12.3 mm，总体积 3.40 mL。」."""
    s = report["summary"]
    is_volume = bool(s.get("is_volume"))
    zh = lang == "zh"
    parts: list[str] = []
    if s.get("has_lesion_class", True):
        n = int(s.get("n_lesions", 0))
        if n == 0:
            parts.append("未检出疑似病灶" if zh else "No suspected lesion detected")
        else:
            d = _diameter_text(s, lang)
            total = _size_text(s.get("lesion_total", {}), is_volume, lang)
            if zh:
                parts.append(f"检出 {n} 处疑似病灶，最大直径 {d}，总{'体积' if is_volume else '面积'} {total}")
            else:
                parts.append(f"{n} suspected lesion{'s' if n != 1 else ''} detected, largest diameter {d}, "
                             f"total {'volume' if is_volume else 'area'} {total}")
    for st in s.get("structures", []):
        if st.get("role") == "lesion":
            continue
        name = class_label(st["class"], lang)
        size = _size_text(st, is_volume, lang)
        sp = " " if zh and name[-1:].isascii() else ""  # 「类别 1 体积」, 「肝脏体积」
        if st.get("voxels", st.get("pixels", 0)) == 0:
            parts.append(f"未检出{sp if name[:1].isascii() else ''}{name}" if zh else f"no {name} segmented")
        else:
            parts.append(f"{name}{sp}{'体积' if is_volume else '面积'} {size}" if zh else
                         f"{name} {'volume' if is_volume else 'area'} {size}")
    burden = s.get("lesion_burden_percent")
    if burden is not None:
        parts.append(f"病灶负荷 {fmt_num(burden, 1)}%" if zh else f"lesion burden {fmt_num(burden, 1)}%")
    if not parts:
        parts.append("未分割出任何结构" if zh else "nothing segmented")
    text = ("，" if zh else "; ").join(parts)
    if not zh:
        text = text[0].upper() + text[1:]
    return text + ("。" if zh else ".")


# ------------------------------------------------------------------------------------------ html
_CSS = """
:root { --ink:#1f2933; --muted:#5f6b7a; --line:#d9dee5; --accent:#1d5fa8; --warn:#b42318; --bg:#eef1f5; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font-family: ReportCJK, -apple-system, "Segoe UI", "Helvetica Neue", Arial, "PingFang SC", "Hiragino Sans GB",
  "Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC", ReportCJK, sans-serif;
  font-size:15px; line-height:1.55; }
.page { max-width:1080px; margin:24px auto; background:#fff; border:1px solid var(--line);
  border-radius:6px; box-shadow:0 1px 4px rgba(0,0,0,.06); }
header { display:flex; justify-content:space-between; align-items:flex-start; gap:16px;
  padding:22px 32px 16px; border-bottom:3px solid var(--accent); }
header h1 { margin:0 0 4px; font-size:23px; font-weight:600; letter-spacing:.5px; }
header .sub { color:var(--muted); font-size:13px; }
.badge { border:1.5px solid var(--warn); color:var(--warn); border-radius:4px; padding:3px 10px;
  font-size:13px; font-weight:600; white-space:nowrap; }
.notice { margin:18px 32px 0; padding:11px 16px; border:1px solid #f1b3ad; border-left:5px solid var(--warn);
  background:#fdf1f0; color:#7a1a12; font-weight:600; border-radius:4px; }
section { padding:14px 32px 6px; }
h2 { font-size:17px; font-weight:600; margin:8px 0 10px; padding-bottom:5px; border-bottom:1px solid var(--line);
  color:var(--accent); }
.findings { font-size:19px; font-weight:600; padding:14px 18px; background:#f2f7fd;
  border-left:5px solid var(--accent); border-radius:4px; }
.cols { display:grid; grid-template-columns: 1fr 1fr; gap:0 32px; }
table { border-collapse:collapse; width:100%; font-size:14px; }
table.kv th { text-align:left; font-weight:500; color:var(--muted); width:34%; padding:4px 8px 4px 0;
  vertical-align:top; }
table.kv td { padding:4px 0; word-break:break-word; }
table.grid th { background:#f4f6f9; font-weight:600; text-align:left; padding:7px 8px;
  border-bottom:2px solid var(--line); white-space:nowrap; }
table.grid td { padding:6px 8px; border-bottom:1px solid var(--line); }
table.grid th.num { text-align:right; }
table.grid td.num { text-align:right; font-variant-numeric: tabular-nums; white-space:nowrap; }
table.grid tr:nth-child(even) td { background:#fafbfc; }
.idx { display:inline-block; min-width:22px; text-align:center; border-radius:11px; background:#d92d20;
  color:#fff; font-weight:600; font-size:12px; padding:1px 6px; }
figure { margin:6px 0 10px; text-align:center; }
figure img { max-width:100%; border:1px solid var(--line); border-radius:4px; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.muted { color:var(--muted); }
.warnbox { margin:10px 0 4px; padding:8px 14px; background:#fff8e6; border:1px solid #f5d48a; border-radius:4px;
  color:#7a4a00; font-size:13.5px; }
.warnbox ul { margin:4px 0 0; padding-left:18px; }
footer { margin-top:14px; padding:14px 32px 20px; border-top:1px solid var(--line); color:var(--muted); font-size:13px; }
footer .notice { margin:0 0 8px; }
@media print { body { background:#fff; } .page { margin:0; border:none; box-shadow:none; } }
@media (max-width: 760px) { .cols { grid-template-columns: 1fr; } header, section, footer { padding-left:14px; padding-right:14px; } }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _kv(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v not in (None, ""))
    return f'<table class="kv">{body}</table>'


def _image_rows(report: dict, lang: str) -> list[tuple[str, Any]]:
    inp = report["input"]
    shape = " × ".join(str(v) for v in inp.get("shape", []))
    if inp.get("channels", 1) > 1:
        shape += f" × {inp['channels']}"
    spacing = (" × ".join(fmt_num(v, 3) for v in inp.get("spacing_mm", [])) + " mm") if inp.get("spacing_known") \
        else t("spacing_unknown", lang)
    p = inp.get("patient") or {}
    sex_age = " / ".join(v for v in (p.get("sex"), p.get("age")) if v)
    series = " · ".join(v for v in (inp.get("series_description"), p.get("study_description")) if v)
    return [(t("file", lang), inp.get("name")), (t("format", lang), inp.get("format", "").upper()),
            (t("dims", lang), shape), (t("spacing", lang), spacing), (t("modality", lang), inp.get("modality")),
            (t("patient", lang), p.get("name")), (t("patient_id", lang), p.get("id")), (t("sex_age", lang), sex_age),
            (t("study_date", lang), p.get("study_date")), (t("series", lang), series)]


def _model_rows(report: dict, lang: str) -> list[tuple[str, Any]]:
    m, st = report["model"], report["settings"]
    tr = m.get("training") or {}
    training = []
    if tr.get("test_dice") is not None:
        training.append(f"{'测试集' if lang == 'zh' else 'test'} Dice {fmt_num(tr['test_dice'], 3)}")
    if tr.get("val_dice") is not None:
        training.append(f"{'验证集' if lang == 'zh' else 'validation'} Dice {fmt_num(tr['val_dice'], 3)}"
                        + (f" ({'第' if lang == 'zh' else 'epoch '}{tr['epoch']}{' 轮' if lang == 'zh' else ''})"
                           if tr.get("epoch") else ""))
    if tr.get("data"):
        training.append(str(tr["data"]))
    if st.get("threshold") is None:
        threshold = "argmax (多类别)" if lang == "zh" else "argmax (multi-class)"
    else:
        threshold = fmt_num(st["threshold"], 2)
    post = []
    zh = lang == "zh"
    if st.get("min_lesion_size"):
        post.append(f"{'去除小于' if zh else 'remove lesions <'} {st['min_lesion_size']:g} {st.get('min_lesion_size_unit', '')}"
                    + ("的病灶" if zh else ""))
    if st.get("fill_holes"):
        post.append("填充孔洞" if zh else "fill holes")
    if st.get("keep_largest_organ") and any(c.get("role") == "organ" for c in report.get("classes", [])):
        post.append("器官保留最大连通域" if zh else "keep largest organ component")
    runtime = f"{m.get('device', '')}, {m.get('precision', '')}"
    timing = report.get("timing") or {}
    if timing.get("predict_s") is not None:
        runtime += f", {'推理' if zh else 'inference'} {timing['predict_s']:.2f} s"
    return [(t("checkpoint", lang), m.get("checkpoint")), (t("architecture", lang), m.get("architecture")),
            (t("training", lang), "; ".join(training)), (t("preprocessing", lang), m.get("preprocessing_text")),
            (t("threshold", lang), threshold), (t("postprocess", lang), ", ".join(post) or ("无" if zh else "none")),
            (t("runtime", lang), runtime)]


def _lesion_table(report: dict, lang: str, max_rows: int = 25) -> str:
    lesions = report.get("lesions", [])
    is_volume = bool(report["summary"].get("is_volume"))
    if not report["summary"].get("has_lesion_class", True):
        return ""
    if not lesions:
        return f'<p class="muted">{_e(t("none_found", lang))}</p>'
    axes = "x × y × z" if is_volume else "x × y"
    head = [(t("no", lang), False), (t("class", lang), False), (t("location", lang), False),
            (t("size3d" if is_volume else "size2d", lang), True), (t("diameter", lang), True),
            (f"{t('extent', lang)} ({axes})", True), (t("prob", lang), True)]
    rows = []
    for les in lesions[:max_rows]:
        if is_volume:
            lo, hi = les["slice_range"]
            where = f"{t('slice', lang)} {les['slice_index']}" + (f" ({lo}–{hi})" if hi > lo else "")
            diam = _diameter_text(les, lang)
            if les.get("axial_diameter_mm") is not None:
                diam += f" ({t('axial', lang)} {fmt_num(les['axial_diameter_mm'], 1)} mm)"
        else:
            cy, cx = les["centroid_index"]
            where = f"x {cx:.0f}, y {cy:.0f}"
            diam = _diameter_text(les, lang)
        ext = les.get("extent_mm")  # array order (z,) y, x -> shown as x × y (× z)
        extent = (" × ".join(fmt_num(v, 1) for v in ext[::-1]) + " mm") if ext else \
            " × ".join(str(v) for v in les.get("extent_px", [])[::-1]) + (" 像素" if lang == "zh" else " px")
        prob = f"{fmt_num(les.get('mean_probability'), 2)} / {fmt_num(les.get('max_probability'), 2)}"
        rows.append(f'<tr><td><span class="idx">{les["id"]}</span></td><td>{_e(class_label(les["class"], lang))}</td>'
                    f'<td>{_e(where)}</td><td class="num">{_e(_size_text(les, is_volume, lang))}</td>'
                    f'<td class="num">{_e(diam)}</td><td class="num">{_e(extent)}</td><td class="num">{_e(prob)}</td></tr>')
    more = ""
    if len(lesions) > max_rows:
        more = f'<p class="muted">{_e(t("more_rows", lang).format(n=len(lesions) - max_rows))}</p>'
    ths = "".join(f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>" for h, num in head)
    return f'<table class="grid"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'


def _structure_table(report: dict, lang: str) -> str:
    structures = [s for s in report["summary"].get("structures", []) if s.get("role") != "lesion"]
    if not structures:
        return ""
    is_volume = bool(report["summary"].get("is_volume"))
    head = [(t("class", lang), False), (t("role", lang), False), (t("size3d" if is_volume else "size2d", lang), True),
            (t("components", lang), True)]
    rows = "".join(
        f"<tr><td>{_e(class_label(s['class'], lang))}</td><td>{_e(t('role_' + s['role'], lang))}</td>"
        f'<td class="num">{_e(_size_text(s, is_volume, lang))}</td><td class="num">{s.get("components", 0)}</td></tr>'
        for s in structures)
    burden = report["summary"].get("lesion_burden_percent")
    extra = ""
    if burden is not None:
        extra = (f'<p class="muted">{"病灶负荷 = 病灶体积 / (器官 + 病灶体积)：" if lang == "zh" else "Lesion burden = lesion / (organ + lesion) volume: "}'
                 f"{fmt_num(burden, 2)}%</p>")
    ths = "".join(f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>" for h, num in head)
    return f'<table class="grid"><thead><tr>{ths}</tr></thead><tbody>{rows}</tbody></table>{extra}'


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def render_html(report: dict, images: dict[str, bytes], lang: str = "zh", embed_font: bool = True) -> str:
    """The whole self-contained report page. ``images`` maps a caption key (``'overlay'``) to PNG bytes."""
    lang = "zh" if lang == "zh" else "en"
    inp, s = report["input"], report["summary"]
    findings = s.get("findings") or findings_sentence(report, lang)
    notice = NOTICE[lang] + ("" if lang == "en" else f"（{NOTICE['en']}）")
    figs = "".join(f'<figure><img alt="{_e(t("overlay", lang))}" src="{data_uri(png)}">'
                   f'<figcaption>{_e(t("legend_caption", lang))}</figcaption></figure>' for png in images.values())
    warnings = report.get("warnings") or []
    warn_html = ""
    if warnings:
        warn_html = (f'<div class="warnbox"><b>{_e(t("warnings", lang))}</b><ul>'
                     + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>")
    lesion_table = _lesion_table(report, lang)
    structure_table = _structure_table(report, lang)
    body = f"""<div class="page">
<header><div><h1>{_e(t("title", lang))}</h1>
<div class="sub">{_e(t("case", lang))}: {_e(report.get("case"))} &nbsp;·&nbsp; {_e(t("generated", lang))}: {_e(str(report.get("generated_at", "")).replace("T", " "))}</div></div>
<div class="badge">{_e(t("badge", lang))}</div></header>
<div class="notice">{_e(notice)}</div>
<section><h2>{_e(t("findings", lang))}</h2><div class="findings">{_e(findings)}</div>{warn_html}</section>
{f'<section><h2>{_e(t("lesions", lang))}</h2>{lesion_table}</section>' if lesion_table else ''}
{f'<section><h2>{_e(t("structures", lang))}</h2>{structure_table}</section>' if structure_table else ''}
<section><h2>{_e(t("overlay", lang))}</h2>{figs}</section>
<section class="cols"><div><h2>{_e(t("image", lang))}</h2>{_kv(_image_rows(report, lang))}</div>
<div><h2>{_e(t("model", lang))}</h2>{_kv(_model_rows(report, lang))}</div></section>
<footer><div class="notice">{_e(notice)}</div>{_e(t("footer", lang))} &nbsp;·&nbsp; {_e(report.get("software", ""))}</footer>
</div>"""
    css = _CSS
    if embed_font:
        css = font_face(body) + css
    title = f"{t('title', lang)} · {inp.get('name', '')}"
    return (f'<!DOCTYPE html>\n<html lang="{"zh-CN" if lang == "zh" else "en"}"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{css}</style></head><body>\n{body}\n</body></html>\n")


# ------------------------------------------------------------------------------------------ font
_FONT_FILE = "NotoSansCJKsc-Regular.otf"
_CJK_BLOCKS = ((0x2E80, 0x9FFF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF))
_CJK_RANGES = ", ".join(f"U+{a:04X}-{b:04X}" for a, b in _CJK_BLOCKS)


_CJK_CHAR = re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _CJK_BLOCKS) + "]")


def _is_cjk(ch: str) -> bool:
    return _CJK_CHAR.fullmatch(ch) is not None


def font_face(text: str) -> str:
    """``@font-face`` with the CJK characters of ``text`` subset from Noto Sans CJK SC (OFL); '' if not needed
    or not available (the page then relies on the system's CJK fonts)."""
    chars = "".join(sorted(set(_CJK_CHAR.findall(html.unescape(text)))))  # one regex pass: pages embed big images
    if not chars:
        return ""
    b64 = _subset_font_b64(chars)
    if not b64:
        return ""
    return (f"@font-face {{ font-family: ReportCJK; src: url(data:font/otf;base64,{b64}) format('opentype'); "
            f"unicode-range: {_CJK_RANGES}; }}\n")


@functools.lru_cache(maxsize=16)
def _subset_font_b64(chars: str) -> str:
    """Base64 OpenType subset of Noto Sans CJK SC holding ``chars`` ('' when unavailable); cached, since the
    reports of a batch mostly share one character set."""
    try:
        import mplfonts
        from fontTools import subset
        from fontTools.ttLib import TTFont

        logging.getLogger("fontTools").setLevel(logging.WARNING)  # the subsetter logs every table at INFO
        path = Path(mplfonts.__file__).parent / "fonts" / _FONT_FILE
        font = TTFont(str(path), lazy=True)
        opts = subset.Options()
        opts.layout_features, opts.name_IDs, opts.notdef_outline = [], ["*"], True
        sub = subset.Subsetter(opts)
        sub.populate(text=chars)
        sub.subset(font)
        buf = io.BytesIO()
        font.save(buf)
    except Exception as exc:  # noqa: BLE001 - no mplfonts/fontTools: fall back to the system's fonts
        log.debug("CJK font subsetting skipped: %s", exc)
        return ""
    return base64.b64encode(buf.getvalue()).decode("ascii")
