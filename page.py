"""The demo page's logic without Gradio: the model, the bundled examples, browser sessions and the requests.

:class:`DemoApp`'s handlers take a :class:`Session` and return a :class:`View` (what the page shows); they
never raise for user errors. ``app.py`` maps views onto Gradio components. Every result comes from
:mod:`diagnosis`: :func:`diagnosis.diagnose` once per upload (the one forward pass), then
:func:`diagnosis.with_settings` on the cached probabilities when the threshold or the minimum lesion size
changes, and :func:`diagnosis.write_case_files` for the downloads (``report.json`` as predict.py writes it).
The downloads are written by the same request as the result they belong to: a result is shown with a ✓ only
once its downloads exist; when they cannot be written the result is withdrawn with a ⚠ line. Uploads are
checked and staged by :mod:`page_upload` (detached headers, DICOMDIR, zips through :mod:`fileio`, safe names).

Research software, not a medical device: never use it for diagnosis.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import html
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import data_gen
import diagnosis
import fileio
import medio
import outputs
import page_upload
import report
from diagnosis import Diagnosis, DiagnosisSettings
from display import Panels, class_colours, display_image, foreground_probability, render_panels
from errors import MedSegError, oneline
from measure import size_unit
from page_text import page_lang, tr
from runtime import ThreadPolicy

log = logging.getLogger("app")

MAX_UPLOAD_MB = 200                 # per uploaded file (zips: fileio.check_zip bounds what they unpack to)
MAX_SERIES_CHOICES = 200            # DICOM zips with more series folders are refused, not offered in a list
DEFAULT_CHECKPOINT = "best_unet.pth"
TRAIN_HINT_S = 15
REPORT_PROGRAM = "app.py (predict.py)"  # the report's "software": the page, through predict.py's pipeline

#: bundled examples: (file name, data_gen preset, seed, Chinese label, English label)
EXAMPLES = (
    ("example_1_seed.png", "seed", 1, "示例 1 · 合成 CT 样图像（seed 预设）", "Example 1 · synthetic CT-like image (seed preset)"),
    ("example_2_seed.png", "seed", 2, "示例 2 · 合成 CT 样图像（seed 预设）", "Example 2 · synthetic CT-like image (seed preset)"),
    ("example_3_realistic.png", "realistic", 3, "示例 3 · 合成图像（realistic 预设，更难）",
     "Example 3 · synthetic image (realistic preset, harder)"),
    ("example_4_volume.nii.gz", "seed", 4, "示例 4 · 合成体数据（NIfTI，16 层）", "Example 4 · synthetic volume (NIfTI, 16 slices)"),
)


# ------------------------------------------------------------------------------------------ examples
@dataclass
class Example:
    """A bundled example file and its label in both languages."""

    name: str
    path: Path
    label_zh: str
    label_en: str

    def label(self, lang: str) -> str:
        """The label in ``lang``."""
        return self.label_zh if lang == "zh" else self.label_en


def _example_image(preset: str, seed: int, size: int) -> np.ndarray:
    """The first synthetic image from ``seed`` on that has a lesion: the demo should show one."""
    s = seed
    while True:
        img, lesion, _ = data_gen.generate_sample(np.random.default_rng(s), size, size, preset)
        if lesion.any() or s > seed + 50:
            return img
        s += 1


def make_examples(folder: Path, size: int) -> list[Example]:
    """Write the bundled examples (8-bit PNGs and one 8-bit NIfTI volume, seeded) into ``folder``."""
    import nibabel as nib
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, preset, seed, zh, en in EXAMPLES:
        path = folder / name
        if name.endswith(".nii.gz"):
            vol = np.round(data_gen.synthetic_volume(size, seed) * 255).astype(np.uint8)  # (Z, Y, X)
            affine = np.diag([0.8, 0.8, 1.5, 1.0])  # x, y, z spacing in mm (RAS), as synthetic_volume assumes
            nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.T), affine), str(path))
        else:
            Image.fromarray(np.round(_example_image(preset, seed, size) * 255).astype(np.uint8)).save(path)
        out.append(Example(name=name, path=path, label_zh=zh, label_en=en))
    return out


# ------------------------------------------------------------------------------------- session state
@dataclass
class Case:
    """One analysed input of a session: its diagnosis (with the cached probabilities) and what the page shows."""

    name: str                    # the file name the user knows
    diagnosis: Diagnosis
    disp: np.ndarray             # the image in [0, 1] as shown
    fg: np.ndarray               # the probability shown (display.foreground_probability)
    z: int = 0                   # the slice shown (volumes)

    @property
    def is_volume(self) -> bool:
        """A 3D input (slices, a slice slider)."""
        return len(self.diagnosis.meta.shape) == 3

    def panels(self) -> Panels:
        """The three images of the current slice."""
        return render_panels(self.diagnosis, self.disp, self.fg, self.z)


class Session:
    """Per-browser-session state: a private temporary folder (``input/``: the staged upload, ``out/``: the
    downloads), the current case, and the series choice of an uploaded DICOM zip that holds several."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="session-", dir=root)
        self.dir = Path(self._tmp.name)
        self.case: Case | None = None
        self.status: tuple[str, str, dict] = ("info", "waiting", {})  # kind, text key, format args
        self.downloads: list[str] = []
        self.size_unit: str | None = None     # unit of the minimum-size slider for the current case
        self.upload: tuple[Path, str] | None = None  # (staged copy, the name the user knows) of the last upload
        self.series_choices: list[str] = []    # series folders of that upload when it is a DICOM zip with several
        self.series: str | None = None         # the one chosen
        self.seg_key: str | None = None        # what the DICOM SEG in out/ was written from (labels and series)
        self.lock = threading.RLock()          # one request of this session at a time (chained events overlap)

    @property
    def alive(self) -> bool:
        """False once the folder is gone (tab closed, state expired)."""
        return self.dir.exists()

    def reset(self, keep_upload: bool = False) -> None:
        """Forget the current case and delete its files (a new upload replaces it); ``keep_upload`` keeps the
        staged upload and its series choice (another series of the same zip is about to be analysed)."""
        self.case = None
        self.downloads, self.seg_key = [], None
        shutil.rmtree(self.dir / "out", ignore_errors=True)
        if not keep_upload:
            self.upload, self.series_choices, self.series = None, [], None
            shutil.rmtree(self.dir / "input", ignore_errors=True)

    def cleanup(self) -> None:
        """Delete the session folder (idempotent)."""
        self.case = None
        self.downloads = []
        try:
            self._tmp.cleanup()
        except OSError:  # pragma: no cover - already gone
            pass


def cleanup_state(value: Any) -> None:
    """``gr.State`` delete callback: a session that Gradio forgets takes its folder with it."""
    if isinstance(value, Session):
        value.cleanup()


# ------------------------------------------------------------------------------------------ views
def lesion_rows(analysis: dict, lang: str) -> tuple[list[str], list[list[str]]]:
    """The lesion table (headers, rows) with the report's column names and units."""
    is_volume = bool(analysis["summary"].get("is_volume"))
    t, fmt = report.t, report.fmt_num
    axes = "x × y × z" if is_volume else "x × y"
    headers = [t("no", lang), t("class", lang), t("location", lang), t("size3d" if is_volume else "size2d", lang),
               t("diameter", lang), f"{t('extent', lang)} ({axes})", t("prob", lang)]
    px, vox = tr("px", lang), tr("voxels", lang)
    rows = []
    for les in analysis["lesions"]:
        if is_volume:
            lo, hi = les["slice_range"]
            where = f"{t('slice', lang)} {les['slice_index']}" + (f" ({lo}–{hi})" if hi > lo else "")
            size = (f"{fmt(les['volume_ml'], 2)} mL" if les.get("volume_ml") is not None
                    else f"{les.get('voxels', 0)} {vox}")
        else:
            cy, cx = les["centroid_index"]
            where = f"x {cx:.0f}, y {cy:.0f}"
            size = (f"{fmt(les['area_mm2'], 1)} mm²" if les.get("area_mm2") is not None
                    else f"{les.get('pixels', 0)} {px}")
        if les.get("max_diameter_mm") is not None:
            diam = f"{fmt(les['max_diameter_mm'], 1)} mm"
        else:
            diam = f"{fmt(les.get('max_diameter_px'), 1)} {px}"
        ext = les.get("extent_mm")
        extent = (" × ".join(fmt(v, 1) for v in ext[::-1]) + " mm") if ext else \
            " × ".join(str(v) for v in les.get("extent_px", [])[::-1]) + f" {px}"
        prob = f"{fmt(les.get('mean_probability'), 2)} / {fmt(les.get('max_probability'), 2)}"
        rows.append([str(les["id"]), report.class_label(les["class"], lang), where, size, diam, extent, prob])
    return headers, rows


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
    series_choices: list[str] = field(default_factory=list)  # a DICOM zip's series folders: the user chooses
    series: str | None = None                     # the one analysed


def status_box(kind: str, text: str) -> str:
    """The status line's HTML: ``kind`` is "ok", "error" or "info"."""
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
    @functools.wraps(method)
    def run(self, session: Session, *args, **kwargs):
        with session.lock:
            return method(self, session, *args, **kwargs)

    return run


def _clean_message(exc: BaseException, paths: list[Path], name: str) -> str:
    """The error message without our temporary folders' paths (the user knows the file by its name). Paths are
    replaced before the message is cut to length, so a long name can never leave half a server path behind."""
    shown = page_upload.shown_name(name)
    msg = str(exc)
    for p in sorted({s for q in paths if q for s in (str(q), fileio.printable(str(q)))}, key=len, reverse=True):
        msg = msg.replace(p, shown)
    msg = fileio.printable(oneline(RuntimeError(msg), 400))  # one line, control characters escaped
    if msg.startswith(shown + ": "):
        msg = msg[len(shown) + 2:]
    return msg


# ------------------------------------------------------------------------------------------ the app
class DemoApp:
    """The page's logic without Gradio: model, examples, sessions and the request handlers.

    Handlers take a :class:`Session` and return a :class:`View`; they never raise for user errors.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = DEFAULT_CHECKPOINT, *, lang: str = "zh",
                 device: str = "auto", precision: str = "auto", max_upload_mb: float = MAX_UPLOAD_MB):
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.lang = page_lang(lang)
        self.device, self.precision = device, precision
        self.max_upload_mb = float(max_upload_mb)
        self._root = tempfile.TemporaryDirectory(prefix="medseg-app-")
        self.root = Path(self._root.name)
        self.sessions_dir = self.root / "sessions"  # every session's folder: never inside Gradio's (app.py checks)
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()          # model + matplotlib: one at a time (pyplot is not thread-safe)
        self._sessions_lock = threading.Lock()
        self.threads = ThreadPolicy(0)         # the CPUs other processes leave idle, re-checked before each analysis
        self.bundle: diagnosis.ModelBundle | None = None
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
        self.bundle, self.model_problem = None, None
        if self.checkpoint is None or not self.checkpoint.is_file():
            self.model_problem = ("no_model", {"path": html.escape(str(self.checkpoint or DEFAULT_CHECKPOINT))})
            return False
        try:
            self.bundle = diagnosis.load_model(self.checkpoint, self.device, self.precision)
        except MedSegError as exc:
            self.model_problem = ("bad_model", {"msg": html.escape(oneline(exc))})
        except Exception as exc:
            log.exception("loading %s failed", self.checkpoint)
            self.model_problem = ("bad_model", {"msg": html.escape(f"{type(exc).__name__}: {oneline(exc)}")})
        return self.bundle is not None

    def model_html(self, lang: str) -> str:
        """The banner above the page: the model in one line, or how to get one."""
        if self.bundle is None:
            key, kw = self.model_problem or ("no_model", {"path": DEFAULT_CHECKPOINT})
            return f'<div class="medseg-banner medseg-error">⚠ {tr(key, lang, s=TRAIN_HINT_S, **kw)}</div>'
        d = diagnosis.describe_model(self.bundle, lang)
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
        """A fresh session; with a browser ``key`` it replaces (and deletes) that browser's previous one."""
        s = Session(self.sessions_dir)
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
        """Delete every session folder and the app's temporary folder."""
        for s in list(self.sessions.values()):
            s.cleanup()
        self.sessions.clear()
        try:
            self._root.cleanup()
        except OSError:  # pragma: no cover
            pass

    # ----------------------------------------------------------------- status helpers
    def _error(self, session: Session, key: str, keep_upload: bool = False, **kw: Any) -> View:
        session.reset(keep_upload=keep_upload)
        session.status = ("error", key, kw)
        return View(status=self.status_html(session, kw.get("_lang", "zh")), ok=False,
                    series_choices=session.series_choices, series=session.series)

    def status_html(self, session: Session, lang: str) -> str:
        """The session's current status line in ``lang``."""
        kind, key, kw = session.status
        kw = {k: v for k, v in kw.items() if k != "_lang"}
        return status_box(kind, tr(key, lang, **kw))

    def check_upload(self, path: Path, name: str) -> tuple[str, dict] | None:
        """A polite reason to refuse the file before any reader opens it (:func:`page_upload.refusal`), or None."""
        return page_upload.refusal(path, name, self.max_upload_mb)

    # ----------------------------------------------------------------- handlers
    @_session_locked
    def analyse_upload(self, session: Session, file_path: str | os.PathLike | None, lang: str, threshold: float,
                       min_size: float) -> View:
        """A user's upload: check it, copy it into the session folder, predict once, analyse, write the downloads."""
        lang = page_lang(lang)
        if not file_path:
            return self._error(session, "empty_upload", _lang=lang)
        src = Path(file_path)
        return self._analyse(session, src, src.name, lang, threshold, min_size, upload=True)

    @_session_locked
    def analyse_series(self, session: Session, series: str | None, lang: str, threshold: float,
                       min_size: float) -> View:
        """The user chose one series of the DICOM zip uploaded last: analyse that one."""
        lang = page_lang(lang)
        if session.upload is None or series not in session.series_choices:
            return View(status=self.status_html(session, lang), ok=False, series_choices=session.series_choices)
        staged, name = session.upload
        return self._analyse(session, staged, name, lang, threshold, min_size, series=series)

    @_session_locked
    def analyse_example(self, session: Session, example: str | None, lang: str, threshold: float,
                        min_size: float) -> View:
        """A bundled example, analysed like an upload (without a copy)."""
        lang = page_lang(lang)
        ex = next((e for e in self.examples if e.name == example), None)
        if ex is None:
            return self._error(session, "pick_example", _lang=lang)
        return self._analyse(session, ex.path, ex.name, lang, threshold, min_size)

    def _analyse(self, session: Session, src: Path, name: str, lang: str, threshold: float, min_size: float, *,
                 upload: bool = False, series: str | None = None) -> View:
        """Check / stage the input, then :meth:`_analyse_target`; every failure becomes a ⚠ status, and the
        session keeps no half result (a case is shown only with its downloads written)."""
        shown, again = html.escape(page_upload.shown_name(name)), series is not None
        session.reset(keep_upload=again)
        if self.bundle is None:
            key, kw = self.model_problem or ("no_model", {"path": DEFAULT_CHECKPOINT})
            session.status = ("error", key, {**kw, "s": TRAIN_HINT_S, "_lang": lang})
            return View(status=self.status_html(session, lang), ok=False)
        hidden = [src, session.dir]  # server paths: never shown to the user
        try:
            path = src
            if upload:
                fileio.require_regular_file(src)  # a FIFO, device or folder: refused by stat, never opened
                refused = page_upload.refusal(src, name, self.max_upload_mb)
                if refused:  # its fields may quote the file name: escaped like every text shown
                    fields = {k: html.escape(v) if isinstance(v, str) else v for k, v in refused[1].items()}
                    return self._error(session, refused[0], name=shown, _lang=lang, **fields)
                path = page_upload.stage(src, name, session.dir / "input")
                session.upload = (path, name)
            hidden.append(path)
            target = page_upload.Target(path, session.series_choices) if again else page_upload.prepare(path)
            hidden.append(target.unpacked)
            if len(target.series) > 1 and not again:
                return self._choose_series(session, shown, target.series, lang)
            return self._analyse_target(session, target.path, name, lang, float(threshold), float(min_size or 0),
                                        series)
        except MedSegError as exc:
            msg = html.escape(_clean_message(exc, hidden, name))
            if "cannot read" in msg:
                msg += " " + tr("corrupt_hint", lang)
            if "names the data file" in msg:
                msg += " " + tr("header_hint", lang)
            return self._error(session, "cannot", keep_upload=again, name=shown, msg=msg, _lang=lang)
        except MemoryError:
            return self._error(session, "too_big", keep_upload=again, name=shown, _lang=lang)
        except Exception as exc:
            log.exception("unexpected error on %s", fileio.printable(name))
            msg = f"{type(exc).__name__}: {_clean_message(exc, hidden, name)}"
            return self._error(session, "unexpected", keep_upload=again, name=shown, msg=html.escape(msg), _lang=lang)

    def _choose_series(self, session: Session, shown: str, choices: list[str], lang: str) -> View:
        """An uploaded DICOM zip holds several series folders: list them and let the user choose one."""
        if len(choices) > MAX_SERIES_CHOICES:
            return self._error(session, "too_many_series", name=shown, n=len(choices), limit=MAX_SERIES_CHOICES,
                               _lang=lang)
        session.series_choices = choices
        listed = ", ".join(f"{fileio.printable(c)}/" for c in choices[:8]) + (" …" if len(choices) > 8 else "")
        session.status = ("info", "several_series", {"name": shown, "n": len(choices), "list": html.escape(listed),
                                                     "_lang": lang})
        return View(status=self.status_html(session, lang), ok=False, series_choices=choices)

    def _analyse_target(self, session: Session, path: Path, name: str, lang: str, threshold: float,
                        min_size: float, series: str | None) -> View:
        """Read, predict and measure ``path``, write its downloads, and show it (the ✓ status only once the
        downloads exist)."""
        max_size = self._new_case(session, path, name, threshold, min_size, series)
        session.series = series
        failed = self._try_downloads(session, lang)
        if failed is not None:
            return failed
        meta = session.case.diagnosis.meta
        what = f"{meta.format.upper()}, {' × '.join(map(str, meta.shape))}" + (f", {series}/" if series else "")
        session.status = ("ok", "ok", {"name": html.escape(page_upload.shown_name(name)), "what": html.escape(what),
                                       "t": session.case.diagnosis.t_predict, "_lang": lang})
        view = self._view(session, lang)
        view.min_size_max, view.min_size = max_size, session.case.diagnosis.settings.min_lesion_size
        return view

    def _new_case(self, session: Session, path: Path, name: str, threshold: float, min_size: float,
                  series: str | None = None) -> float:
        """Read, predict (once) and measure ``path`` into ``session.case``; returns the size slider's maximum."""
        t0 = time.perf_counter()
        image, meta = medio.read_image(path, series=series)
        t_read = time.perf_counter() - t0
        unit = size_unit(meta)[0]
        max_size, min_size = self._size_slider(meta, min_size, session.size_unit)
        settings = DiagnosisSettings(threshold=threshold, min_lesion_size=min_size)
        stem = page_upload.safe_stem(name) if series is None else \
            page_upload.safe_stem(f"{page_upload.safe_stem(name)}_{series.rsplit('/', 1)[-1]}")
        shown = name if series is None else f"{name} ({series}/)"
        with self._lock:  # the one forward pass of this case; later changes re-use its probabilities
            self.threads.update()
            diag = diagnosis.diagnose(self.bundle, image, meta, settings, case=stem, path=path, shown_path=shown,
                                      t_read=t_read)
        session.size_unit = unit
        case = Case(name=name, diagnosis=diag, disp=display_image(image, meta, self.bundle.prep, as_model_sees=True),
                    fg=foreground_probability(diag.probs, diag.roles, meta.shape))
        if case.is_volume:
            lesions = diag.analysis["lesions"]
            case.z = int(lesions[0]["slice_index"]) if lesions else meta.shape[0] // 2
        session.case = case
        return max_size

    @_session_locked
    def update_settings(self, session: Session, lang: str, threshold: float, min_size: float) -> View:
        """Threshold / minimum size changed: post-process the cached probabilities again (no inference) and
        re-write the downloads."""
        lang = page_lang(lang)
        case = session.case
        if case is None:
            return View(status=self.status_html(session, lang), ok=False, series_choices=session.series_choices)
        try:
            t0 = time.perf_counter()
            settings = replace(case.diagnosis.settings, threshold=float(threshold),
                               min_lesion_size=max(0.0, float(min_size or 0)))
            case.diagnosis = diagnosis.with_settings(self.bundle, case.diagnosis, settings)
        except Exception as exc:
            log.exception("post-processing failed")
            return self._error(session, "unexpected", name=html.escape(page_upload.shown_name(case.name)),
                               msg=html.escape(oneline(exc)), _lang=lang)
        failed = self._try_downloads(session, lang)
        if failed is not None:
            return failed
        size = f"{settings.min_lesion_size:g} {self._unit(case, lang)}"
        session.status = ("ok", "ok_update", {"thr": f"{settings.threshold:.2f}", "size": size,
                                              "t": 1000 * (time.perf_counter() - t0), "_lang": lang})
        return self._view(session, lang)

    @_session_locked
    def show_slice(self, session: Session, z: int) -> Panels | None:
        """The three images of slice ``z`` of the current volume (None without a case)."""
        case = session.case
        if case is None:
            return None
        if case.is_volume:
            case.z = int(np.clip(int(z or 0), 0, case.diagnosis.meta.shape[0] - 1))
        return case.panels()

    @_session_locked
    def refresh(self, session: Session, lang: str) -> View:
        """Re-render everything in ``lang`` (a language change) from the session's state; the downloads (the
        report's language) are written again."""
        lang = page_lang(lang)
        if session.case is None:
            return View(status=self.status_html(session, lang), ok=False, series_choices=session.series_choices,
                        series=session.series)
        failed = self._try_downloads(session, lang)
        return failed if failed is not None else self._view(session, lang)

    @_session_locked
    def write_downloads(self, session: Session, lang: str) -> list[str]:
        """Write mask, report.html and report.json of the current result into the session folder again and return
        their paths; on failure the result is withdrawn with a ⚠ status (never a result without its downloads)."""
        if session.case is None or not session.alive:
            session.downloads = []
            return []
        self._try_downloads(session, page_lang(lang))
        return session.downloads

    # ----------------------------------------------------------------- internals
    def _try_downloads(self, session: Session, lang: str) -> View | None:
        """Write the current result's downloads; None when they are written, else the ⚠ view (result withdrawn)."""
        case = session.case
        try:
            with self._lock:
                files = self._write_files(session, case, lang)
            session.downloads = [str(p) for p in files]
            return None
        except Exception as exc:
            log.exception("writing downloads failed")
            msg = html.escape(_clean_message(exc, [session.dir], "…"))
            return self._error(session, "dl_failed", keep_upload=bool(session.series),
                               name=html.escape(page_upload.shown_name(case.name)), msg=msg, _lang=lang)

    def _write_files(self, session: Session, case: Case, lang: str) -> list[Path]:
        """``<stem>_mask.png|.nii.gz``, ``<stem>_report.html`` and ``<stem>_report.json``, and for a DICOM upload
        ``<stem>_seg.dcm`` (a DICOM Segmentation over the uploaded series, as ``predict.py --output-type
        dicom-seg`` writes it): only the current result's files stay in the session's download folder."""
        out_dir = session.dir / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        diag = replace(case.diagnosis, settings=replace(case.diagnosis.settings, lang=lang))
        seg = seg_key = None
        if getattr(diag.meta, "format", None) == "dicom":
            # the SEG depends on the labels and the series only: a language or a setting that leaves the labels
            # as they were keeps the file already written (a large series takes seconds to encode)
            seg = out_dir / f"{diag.case}_seg.dcm"
            digest = hashlib.sha256(np.ascontiguousarray(diag.labels).tobytes()).hexdigest()
            seg_key = f"{diag.path}:{session.series}:{digest}"
        keep = seg if seg is not None and seg.is_file() and session.seg_key == seg_key else None
        for old in out_dir.iterdir():
            if old.is_file() and old != keep:
                old.unlink()
        if seg is not None and keep is None:
            written = outputs.write_dicom_files(diag.labels, diag.path, self.bundle.prep.class_names, diag.roles,
                                                out_dir, ("dicom-seg",), series=session.series)
            os.replace(written["dicom_seg"], seg)
            session.seg_key = seg_key
        files, _ = diagnosis.write_case_files(self.bundle, diag, out_dir, prefix=f"{diag.case}_", overlay_file=False,
                                              program=REPORT_PROGRAM,
                                              more_outputs={"dicom_seg": seg.name} if seg else None)
        return [files["mask"], files["report_html"], files["report_json"], *([seg] if seg else [])]

    @staticmethod
    def _unit(case: Case, lang: str) -> str:
        unit = size_unit(case.diagnosis.meta)[0]
        return {"px": tr("px", lang), "voxels": tr("voxels", lang)}.get(unit, unit)

    @staticmethod
    def _size_slider(meta: medio.ImageMeta, current: float, previous_unit: str | None) -> tuple[float, float]:
        """(slider maximum, value) for the minimum lesion size of this case; keeps the value when the unit
        (px / mm² / voxels / mm³) is the same as the previous case's and it fits."""
        unit, per = size_unit(meta)
        total = math.prod(meta.shape) * per
        hi = _nice_max(min(max(0.01 * total, 50.0), 10000.0))
        value = current if (previous_unit in (None, unit) and current <= hi) else 0.0
        return hi, max(0.0, value)

    def _findings_html(self, case: Case, lang: str) -> str:
        """The findings sentence, the case's facts and colour legend, warnings and the notice."""
        diag, meta = case.diagnosis, case.diagnosis.meta
        findings = report.findings_sentence({"summary": diag.analysis["summary"]}, lang)
        present = [k for k in range(1, len(diag.roles) + 1) if (diag.labels == k).any()]
        rgb = case.disp.ndim == len(meta.shape) + 1
        colours = class_colours(diag.roles, rgb_image=rgb)
        legend = "".join(f'<span class="medseg-swatch" style="background:{colours[k - 1]}"></span>'
                         f'{html.escape(report.class_label(self.bundle.prep.class_names[k - 1], lang))} '
                         for k in present)
        warnings = list(self.bundle.warnings) + diagnosis.input_warnings(diag.image, meta, self.bundle.prep, lang)
        warn = "".join(f'<div class="medseg-warn">⚠ {html.escape(w)}</div>' for w in warnings)
        spacing = (" × ".join(f"{v:.3g}" for v in meta.spacing) + " mm") if meta.spacing_known else \
            report.t("spacing_unknown", lang)
        facts = (f"{html.escape(page_upload.shown_name(case.name))} · {meta.format.upper()} · {' × '.join(map(str, meta.shape))}"
                 f"{' × 3' if rgb else ''} · {html.escape(spacing)} · {tr('cached', lang, t=diag.t_predict)}")
        return (f'<div class="medseg-findings" id="findings-text">{html.escape(findings)}</div>'
                f'<div class="medseg-facts">{facts}'
                f'{" · " + tr("legend", lang) + ": " + legend if legend else ""}</div>{warn}'
                f'<div class="medseg-notice">{html.escape(report.NOTICE[lang])} {tr("notice_more", lang)}</div>')

    def _view(self, session: Session, lang: str) -> View:
        case = session.case
        headers, rows = lesion_rows(case.diagnosis.analysis, lang)
        return View(status=self.status_html(session, lang), panels=case.panels(),
                    findings=self._findings_html(case, lang), headers=headers, rows=rows,
                    n_slices=case.diagnosis.meta.shape[0] if case.is_volume else 0, z=case.z,
                    min_size_unit=self._unit(case, lang), series_choices=session.series_choices,
                    series=session.series)
