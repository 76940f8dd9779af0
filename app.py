"""A local web page for demos: upload a scan (or pick a bundled example), see the segmentation, read the report.

    python app.py [--checkpoint best_unet.pth] [--host 127.0.0.1] [--port 7860] [--lang zh|en]

Open the printed address (http://127.0.0.1:7860 by default) in a browser. The page shows the input, the
overlay and the probability map side by side (a slice slider for volumes), the findings sentence and the
lesion table in Chinese or English, lets the user change the probability threshold and the minimum lesion
size live, and offers the mask (PNG for 2D images, NIfTI for volumes / DICOM) and the HTML / JSON report
for download.

This file is the Gradio page only (layout, events, serving, command line); what a request does is
``page.DemoApp`` and the diagnosis itself ``diagnosis.py``, the same code ``predict.py`` runs.

Design
    * Gradio (the field's convention for model demos) with analytics off (``GRADIO_ANALYTICS_ENABLED=False``
      and ``analytics_enabled=False``), no share link unless ``--share``, bound to 127.0.0.1 by default,
      server-side rendering off; the page loads nothing from outside the machine.
    * One inference path: :func:`diagnosis.load_model` once, :func:`diagnosis.diagnose` once per upload. The
      probabilities are cached per browser session, so threshold / minimum-size changes re-run only the
      post-processing and the lesion measurements (:func:`diagnosis.with_settings`, milliseconds), and the
      slice slider only re-draws. The downloads are written from the same cached result by
      :func:`diagnosis.write_case_files` (``report.json`` has predict.py's schema).
    * Each browser session gets its own temporary folder (the uploaded file, the downloads), deleted when the
      tab closes (``demo.unload``), when Gradio expires the session state, and when the app exits; Gradio's
      own upload cache is swept by ``delete_cache``. Uploads are limited to ``page.MAX_UPLOAD_MB`` and checked
      by :mod:`page_upload` before any reader opens them; a DICOM zip of several series offers a choice.
    * Files: Gradio's ``/file=`` route serves only its own upload / output folder (``allowed_paths`` empty),
      which :func:`main` puts inside the app's temporary folder, apart from the session folders; the page refuses
      to start when ``GRADIO_TEMP_DIR`` would contain them. Download URLs carry a keyed hash of their content.
    * Several users: one request per event at a time (``default_concurrency_limit=1``), the rest queue.
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
import html
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diagnosis
import page
import page_text
import report
from errors import ConfigError, oneline
from options import Parser, Range, add_number
from page import DEFAULT_CHECKPOINT, MAX_UPLOAD_MB, TRAIN_HINT_S, DemoApp, Session, View, status_box
from page_text import LANGS, page_lang, tr

PORT = Range(int, 1, 65535)
#: --max-upload-mb: more than 2 GiB per upload is beyond what the readers accept unpacked (fileio's zip limit)
UPLOAD_MB = Range(float, 0, 2048, lo_open=True)
SESSION_TTL_S = 2 * 3600            # Gradio deletes a session's state (and our folder) at the latest after this
DELETE_CACHE = (600, 3600)          # Gradio's upload/output cache: every 10 min, delete files older than 1 h


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
    files = [Path(m.__file__) for m in (sys.modules[__name__], page, report, diagnosis)] + [page_text.TEXT_FILE]
    texts = [extra_text] + [f.read_text(encoding="utf-8") for f in files]
    try:
        return report.font_face("".join(texts) + "，。：；（）“”、·")
    except Exception:  # noqa: BLE001 - fonts are a nicety
        return ""


# ------------------------------------------------------------------------------------------ layout
@dataclass
class Controls:
    """The page's Gradio components."""

    state: Any
    header: Any
    lang_radio: Any
    banner: Any
    reload_btn: Any
    upload: Any
    series: Any
    example: Any
    example_btn: Any
    threshold: Any
    min_size: Any
    slice_slider: Any
    status: Any
    downloads: Any
    img_in: Any
    img_ov: Any
    img_pr: Any
    findings: Any
    table: Any

    @property
    def view_outputs(self) -> list[Any]:
        """The components a :class:`page.View` fills, in :meth:`Handlers.outputs_of`'s order."""
        return [self.status, self.img_in, self.img_ov, self.img_pr, self.findings, self.table, self.slice_slider,
                self.min_size, self.series]


def _settings_column(gr, app: DemoApp, h: Handlers, lang: str) -> dict[str, Any]:
    """The left column: upload, examples, sliders, status and downloads."""
    ready = app.bundle is not None
    c = {"upload": gr.File(label=h.upload_label(lang), file_count="single", type="filepath", elem_id="upload",
                           interactive=ready, height=130),
         "series": gr.Dropdown([], value=None, label=tr("series", lang), elem_id="series", visible=False,
                               interactive=True),
         "example": gr.Dropdown(h.example_choices(lang), value=app.examples[0].name, label=tr("example", lang),
                                elem_id="example", interactive=ready),
         "example_btn": gr.Button(tr("run_example", lang), variant="primary", elem_id="example-btn",
                                  interactive=ready),
         "threshold": gr.Slider(0.01, 0.99, value=0.5, step=0.01, label=tr("threshold", lang),
                                info=tr("threshold_multi" if h.multi() else "threshold_info", lang),
                                elem_id="threshold", interactive=ready and not h.multi()),
         "min_size": gr.Slider(0, 100, value=0, step=1, label=tr("min_size", lang) + f" ({tr('px', lang)})",
                               info=tr("min_size_info", lang), elem_id="min-size", interactive=ready),
         "slice_slider": gr.Slider(0, 1, value=0, step=1, label=tr("slice", lang), visible=False, elem_id="slice")}
    c["status"] = gr.HTML(status_box("info", tr("waiting", lang)) if ready else "", elem_id="status")
    c["downloads"] = gr.File(label=tr("downloads", lang), file_count="multiple", interactive=False,
                             elem_id="downloads")
    return c


def _result_column(gr, h: Handlers, lang: str) -> dict[str, Any]:
    """The right column: the three images, the findings and the lesion table."""
    with gr.Row():
        kw = {"type": "numpy", "format": "png", "interactive": False, "height": 340,
              "buttons": ["download", "fullscreen"]}
        c = {"img_in": gr.Image(label=tr("input", lang), elem_id="input-image", **kw),
             "img_ov": gr.Image(label=tr("overlay", lang), elem_id="overlay-image", **kw),
             "img_pr": gr.Image(label=tr("prob_multi" if h.multi() else "prob", lang), elem_id="prob-image", **kw)}
    c["findings"] = gr.HTML("", elem_id="findings")
    c["table"] = gr.Dataframe(h.table_value([], [], lang), label=tr("lesions", lang), elem_id="lesion-table",
                              interactive=False, wrap=True, max_height=360)
    return c


def _layout(gr, app: DemoApp, h: Handlers) -> Controls:
    """Create the components (inside a ``gr.Blocks`` context)."""
    lang = app.lang
    state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=page.cleanup_state)
    with gr.Row(equal_height=True):
        header = gr.HTML(h.header_html(lang), elem_id="medseg-header", scale=4)
        lang_radio = gr.Radio([("中文", "zh"), ("English", "en")], value=lang, label=tr("lang", lang),
                              elem_id="lang", scale=1, min_width=200)
    banner = gr.HTML(app.model_html(lang), elem_id="model-banner")
    reload_btn = gr.Button(tr("reload", lang), visible=app.bundle is None, elem_id="reload", size="sm")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            left = _settings_column(gr, app, h, lang)
        with gr.Column(scale=3):
            right = _result_column(gr, h, lang)
    return Controls(state=state, header=header, lang_radio=lang_radio, banner=banner, reload_btn=reload_btn,
                    **left, **right)


# ------------------------------------------------------------------------------------------ events
class Handlers:
    """The page's event handlers: Gradio values in, :class:`page.DemoApp` requests, component updates out."""

    _WITH_REQUEST = ("on_upload", "on_series", "on_example", "on_settings", "on_unload")

    def __init__(self, app: DemoApp, gr):
        self.app, self.gr = app, gr
        for name in self._WITH_REQUEST:  # Gradio injects gr.Request by type hint; ours are strings (PEP 563)
            getattr(type(self), name).__annotations__["request"] = gr.Request

    # ----------------------------------------------------------------- texts and values
    def multi(self) -> bool:
        """A multi-class model (argmax: no threshold)."""
        return self.app.bundle is not None and self.app.bundle.prep.n_classes > 1

    def upload_label(self, lang: str) -> str:
        """The upload box's label with the size limit."""
        return tr("upload", lang, limit=f"{self.app.max_upload_mb:g}")

    def example_choices(self, lang: str) -> list[tuple[str, str]]:
        """(label, name) of each bundled example for the dropdown."""
        return [(e.label(lang), e.name) for e in self.app.examples]

    @staticmethod
    def header_html(lang: str) -> str:
        """Title, introduction and the research-only notice."""
        return (f'<div class="medseg-head"><h1>{tr("title", lang)}</h1><p>{tr("intro", lang)} '
                f'<b style="color:#b42318">{html.escape(report.NOTICE[lang])}</b></p></div>')

    @staticmethod
    def table_value(headers: list[str], rows: list[list[str]], lang: str = "en"):
        """The lesion table as the Dataframe component's value."""
        import pandas as pd

        if not headers:  # nothing analysed: the column names alone
            headers = page.lesion_rows({"lesions": [], "summary": {"is_volume": False}}, lang)[0]
        return pd.DataFrame(rows, columns=headers)

    def session_of(self, value: Any, request: Any) -> Session:
        """The browser's live session, or a new one (first request, or Gradio expired the old one)."""
        if isinstance(value, Session) and value.alive:
            return value
        key = getattr(request, "session_hash", None) if request is not None else None
        return self.app.new_session(key)

    def outputs_of(self, view: View, lang: str) -> list[Any]:
        """A view as values / updates of :attr:`Controls.view_outputs`."""
        gr, p = self.gr, view.panels
        if view.n_slices > 1:
            sl = gr.update(visible=True, minimum=0, maximum=view.n_slices - 1, value=view.z,
                           label=f"{tr('slice', lang)} · z / {view.n_slices}")
        else:
            sl = gr.update(visible=False)
        ms = gr.update(label=f"{tr('min_size', lang)} ({view.min_size_unit})") if view.min_size_unit else gr.update()
        if view.min_size is not None:
            ms = gr.update(label=f"{tr('min_size', lang)} ({view.min_size_unit})", maximum=view.min_size_max,
                           value=view.min_size)
        return [view.status, p.input if p else None, p.overlay if p else None, p.probability if p else None,
                view.findings, self.table_value(view.headers, view.rows, lang), sl, ms, self.series_update(view, lang)]

    def series_update(self, view: View | None, lang: str) -> Any:
        """The series dropdown: shown with a DICOM zip's series folders while there is a choice, else hidden."""
        choices = view.series_choices if view is not None else []
        if not choices:
            return self.gr.update(visible=False, choices=[], value=None, label=tr("series", lang))
        return self.gr.update(visible=True, choices=[(f"{c}/", c) for c in choices], value=view.series,
                              label=tr("series", lang))

    # ----------------------------------------------------------------- handlers
    def on_upload(self, value, file_path, lang, threshold, min_size, request) -> list[Any]:
        """A file arrived: analyse it in the browser's session."""
        s = self.session_of(value, request)
        view = self.app.analyse_upload(s, file_path, lang, threshold, min_size)
        return [s, *self.outputs_of(view, lang), None]

    def on_series(self, value, series, lang, threshold, min_size, request) -> list[Any]:
        """A series of the uploaded DICOM zip was chosen: analyse it."""
        s = self.session_of(value, request)
        return [s, *self.outputs_of(self.app.analyse_series(s, series, lang, threshold, min_size), lang)]

    def on_example(self, value, name, lang, threshold, min_size, request) -> list[Any]:
        """The "Analyse example" button: analyse the chosen one and clear the upload box."""
        s = self.session_of(value, request)
        view = self.app.analyse_example(s, name, lang, threshold, min_size)
        return [s, *self.outputs_of(view, lang), self.gr.update(value=None)]

    def on_settings(self, value, lang, threshold, min_size, request) -> list[Any]:
        """A slider moved: post-process the cached probabilities again."""
        s = self.session_of(value, request)
        return [s, *self.outputs_of(self.app.update_settings(s, lang, threshold, min_size), lang)]

    def on_slice(self, value, z) -> list[Any]:
        """The slice slider moved: re-draw the three images only."""
        p = self.app.show_slice(value, z) if isinstance(value, Session) else None
        return [p.input, p.overlay, p.probability] if p else [self.gr.update()] * 3

    def on_downloads(self, value, lang) -> list[Any]:
        """After every result change: the downloads the request wrote with the result, and the status."""
        if not isinstance(value, Session):
            return [None, self.gr.update()]
        return [list(value.downloads) or None, self.app.status_html(value, page_lang(lang))]

    def on_lang(self, value, lang) -> list[Any]:
        """Every label in the new language, and the current result re-rendered in it."""
        gr, lang = self.gr, page_lang(lang)
        fixed = [self.header_html(lang), gr.update(label=tr("lang", lang)), self.app.model_html(lang),
                 gr.update(value=tr("reload", lang)), gr.update(label=self.upload_label(lang)),
                 gr.update(label=tr("example", lang), choices=self.example_choices(lang)),
                 gr.update(value=tr("run_example", lang)),
                 gr.update(label=tr("threshold", lang),
                           info=tr("threshold_multi" if self.multi() else "threshold_info", lang)),
                 gr.update(label=tr("downloads", lang))]
        return [*fixed, *self._view_in(value, lang)]

    def _view_in(self, value: Any, lang: str) -> list[Any]:
        """:attr:`Controls.view_outputs` after a language change."""
        gr = self.gr
        view = self.app.refresh(value, lang) if isinstance(value, Session) else None
        unit = view.min_size_unit if view is not None and view.min_size_unit else tr("px", lang)
        if view is None:
            status = status_box("info", tr("waiting", lang)) if self.app.bundle is not None else ""
        else:
            status = view.status
        have = view is not None and view.panels is not None
        table = gr.update(label=tr("lesions", lang),
                          value=self.table_value(view.headers if have else [], view.rows if have else [], lang))
        return [status, gr.update(label=tr("input", lang)), gr.update(label=tr("overlay", lang)),
                gr.update(label=tr("prob_multi" if self.multi() else "prob", lang)),
                view.findings if have else gr.update(), table,
                gr.update(label=f"{tr('slice', lang)} · z / {view.n_slices}") if have and view.n_slices > 1
                else gr.update(),
                gr.update(label=f"{tr('min_size', lang)} ({unit})", info=tr("min_size_info", lang)),
                self.series_update(view, lang)]

    def on_reload(self, lang) -> list[Any]:
        """The "Reload model" button: a model trained meanwhile is picked up without a restart."""
        gr, lang = self.gr, page_lang(lang)
        ok = self.app.load_model()
        return [self.app.model_html(lang), gr.update(visible=not ok), gr.update(interactive=ok),
                gr.update(interactive=ok), gr.update(interactive=ok),
                gr.update(interactive=ok and not self.multi()), gr.update(interactive=ok),
                status_box("info", tr("waiting", lang)) if ok else ""]

    def on_unload(self, request) -> None:
        """The tab closed: delete its session's folder now."""
        key = getattr(request, "session_hash", None)
        if key:
            self.app.end_session(key)


def _wire(demo, c: Controls, h: Handlers) -> None:
    """Connect the components' events to the handlers; every result change re-writes the downloads."""
    views = c.view_outputs

    def then_downloads(event) -> None:
        event.then(h.on_downloads, [c.state, c.lang_radio], [c.downloads, c.status], show_progress="hidden")

    first = c.upload.upload(h.on_upload, [c.state, c.upload, c.lang_radio, c.threshold, c.min_size],
                            [c.state, *views, c.downloads], show_progress="minimal", api_name="upload")
    first.then(h.on_downloads, [c.state, c.lang_radio], [c.downloads, c.status], show_progress="hidden",
               api_name="downloads")
    then_downloads(c.series.input(h.on_series, [c.state, c.series, c.lang_radio, c.threshold, c.min_size],
                                  [c.state, *views], show_progress="minimal", api_name="series"))
    then_downloads(c.example_btn.click(h.on_example, [c.state, c.example, c.lang_radio, c.threshold, c.min_size],
                                       [c.state, *views, c.upload], show_progress="minimal"))
    for slider in (c.threshold, c.min_size):
        then_downloads(slider.input(h.on_settings, [c.state, c.lang_radio, c.threshold, c.min_size], [c.state, *views],
                                    trigger_mode="always_last", show_progress="hidden"))
    c.slice_slider.input(h.on_slice, [c.state, c.slice_slider], [c.img_in, c.img_ov, c.img_pr],
                         trigger_mode="always_last", show_progress="hidden")
    then_downloads(c.lang_radio.change(h.on_lang, [c.state, c.lang_radio],
                                       [c.header, c.lang_radio, c.banner, c.reload_btn, c.upload, c.example,
                                        c.example_btn, c.threshold, c.downloads, *views], show_progress="hidden"))
    c.reload_btn.click(h.on_reload, [c.lang_radio], [c.banner, c.reload_btn, c.upload, c.example, c.example_btn,
                                                     c.threshold, c.min_size, c.status])
    demo.unload(h.on_unload)


def build_app(checkpoint: str | os.PathLike | None = DEFAULT_CHECKPOINT, *, lang: str = "zh", device: str = "auto",
              precision: str = "auto", app: DemoApp | None = None):
    """The Gradio page (``gr.Blocks``). ``demo.medseg`` is its :class:`page.DemoApp`; serve it with :func:`serve`."""
    import gradio as gr

    app = app or DemoApp(checkpoint, lang=lang, device=device, precision=precision)
    handlers = Handlers(app, gr)
    with gr.Blocks(title="medseg · U-Net", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        _wire(demo, _layout(gr, app, handlers), handlers)
    # one request per event at a time: the others wait in the queue (a burst of users queues, never fails, and
    # memory stays that of one analysis); the model lock in page.DemoApp serialises inference anyway
    demo.queue(default_concurrency_limit=1)
    demo.medseg = app
    return demo


def _check_file_route(app: DemoApp, upload_folder: str | os.PathLike) -> None:
    """Refuse to serve when Gradio's upload / output folder holds the session folders. Gradio's ``/file=`` route
    serves every file in that folder (and no other: ``allowed_paths`` stays empty) to whoever names it, so with
    ``GRADIO_TEMP_DIR`` set to a parent of them (``/tmp``) a guessed URL would reach other sessions' uploads."""
    cache, sessions = Path(upload_folder).resolve(), app.sessions_dir.resolve()
    if cache == sessions or cache in sessions.parents:
        raise ConfigError(f"GRADIO_TEMP_DIR={upload_folder} holds the page's session folders ({app.sessions_dir}); "
                          "expected an empty folder of its own (unset it: the page then uses one inside its own "
                          "temporary folder)")


def serve(demo, host: str = "127.0.0.1", port: int = 7860, *, share: bool = False, block: bool = True,
          quiet: bool = False):
    """Launch ``demo`` (from :func:`build_app`) with the page's CSS, the upload limit, no SSR and no share link
    unless asked. ``block=False`` returns at once (tests)."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    app: DemoApp = demo.medseg
    _check_file_route(app, get_upload_folder())
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                       inbrowser=False, show_error=False, ssr_mode=False, max_file_size=int(app.max_upload_mb * 2**20),
                       theme=gr.themes.Default(), css=_cjk_font_css() + CSS, footer_links=["gradio"],
                       mcp_server=False, allowed_paths=[])


# ------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """app.py's options."""
    p = Parser(prog="app.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Local web page: upload a scan, see the segmentation and the report "
                           "(research software, not a medical device).")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="trained model (python run.py writes it)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps the page on this computer")
    add_number(p, "--port", PORT, 7860, "port")
    p.add_argument("--lang", default="zh", choices=LANGS, help="initial page language (switchable on the page)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto = cuda > mps > cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="inference precision")
    add_number(p, "--max-upload-mb", UPLOAD_MB, MAX_UPLOAD_MB, "largest accepted upload in MB")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default; "
                   "sends the page through Gradio's servers: never with patient data)")
    return p


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Print the warnings the options deserve; False when one is invalid (the parser's ranges refuse numbers
    before this runs; this also covers a Namespace built in code)."""
    for flag, rng in (("--port", PORT), ("--max-upload-mb", UPLOAD_MB)):
        problem = rng.problem(flag, getattr(args, flag[2:].replace("-", "_")))
        if problem:
            print(f"app.py: error: {problem}", file=sys.stderr)
            return False
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding to {args.host}: other computers on the network can open this page", file=sys.stderr)
    if args.share:
        print("warning: --share creates a public link through Gradio's servers; never upload patient data",
              file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    """Start the page and serve it until Ctrl+C; returns the exit code (2: usage error or port unavailable)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if not _check_options(parser, args):
        return 2
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
            print(f"app.py: error: cannot serve on {args.host}:{args.port} ({oneline(exc)}); try another --port",
                  file=sys.stderr)
            return 2
        except ConfigError as exc:
            print(f"app.py: error: {oneline(exc)}", file=sys.stderr)
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
