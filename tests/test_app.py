"""app.py: the demo page's handlers without a browser (fast), and the real page in headless Chromium.

The browser test needs Debian's ``chromium`` and the ``playwright`` Python package (its driver only: no
browser download). It is skipped when they are missing, except under CI (``CI`` set), where it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import app
import data_gen
import diagnosis
import dicom_export
import display
import fileio
import page
import report
from diagnosis import DiagnosisSettings
from page_text import tr

CHROMIUM = Path(os.environ.get("MEDSEG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(trained_model) -> Path:
    """The session's trained checkpoint (tests/conftest.py): it finds the lesions of the bundled examples."""
    return trained_model.checkpoint


@pytest.fixture(scope="module")
def demo_app(ckpt):
    a = page.DemoApp(ckpt, lang="en", device="cpu")
    yield a
    a.close()


class ForwardCounter:
    """Counts forward passes of the bundle's network."""

    def __init__(self, model: torch.nn.Module):
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


def corrupt_png(folder: Path) -> Path:
    path = folder / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really an image" * 10)
    return path


# --------------------------------------------------------------------------------------- handlers
def test_example_gives_overlay_findings_table_and_downloads(demo_app):
    s = demo_app.new_session("t1")
    ex = demo_app.examples[0]
    v = demo_app.analyse_example(s, ex.name, "en", 0.5, 0)
    assert v.ok, v.status
    assert "medseg-ok" in v.status and ex.name in v.status
    p = v.panels
    assert p.input.shape == p.overlay.shape and p.input.dtype == np.uint8 and p.input.shape[2] == 3
    assert max(p.input.shape[:2]) == display.DISPLAY_PX
    red = (p.overlay[..., 0] > 200) & (p.overlay[..., 1] < 90)  # lesion outline / badge
    assert red.sum() > 20 and not ((p.input[..., 0] > 200) & (p.input[..., 1] < 90)).any()
    assert p.probability.shape[0] == p.input.shape[0]
    assert "suspected lesion" in v.findings and "Research software" in v.findings
    assert v.headers[0] == "No." and len(v.rows) >= 1 and v.rows[0][0] == "1" and v.rows[0][1] == "lesion"
    assert v.n_slices == 0 and v.min_size_unit == "px"

    files = [Path(f) for f in demo_app.write_downloads(s, "en")]
    assert [f.name for f in files] == ["example_1_seed_mask.png", "example_1_seed_report.html",
                                       "example_1_seed_report.json"]
    assert all(f.is_file() and s.dir in f.parents for f in files)
    mask = np.asarray(Image.open(files[0]))
    assert mask.shape == s.case.diagnosis.meta.shape and set(np.unique(mask)) <= {0, 255}
    rep = json.loads(files[2].read_text(encoding="utf-8"))
    assert rep["schema"] == diagnosis.REPORT_SCHEMA and len(rep["lesions"]) == len(v.rows)
    page = files[1].read_text(encoding="utf-8")
    assert rep["summary"]["findings"] in page and "data:image/png;base64," in page
    demo_app.end_session("t1")
    assert not s.dir.exists()


def test_settings_reuse_cached_probabilities(demo_app):
    s = demo_app.new_session()
    counter = ForwardCounter(demo_app.bundle.model)
    try:
        v = demo_app.analyse_example(s, demo_app.examples[0].name, "en", 0.5, 0)
        assert v.ok and counter.n >= 1  # one prediction per upload
        calls = counter.n
        probs = s.case.diagnosis.probs
        lo = demo_app.update_settings(s, "en", 0.2, 0)
        n_lo = int(s.case.diagnosis.labels.sum())
        hi = demo_app.update_settings(s, "en", 0.9, 0)
        n_hi = int(s.case.diagnosis.labels.sum())
        assert lo.ok and hi.ok and "no new inference" in hi.status
        assert n_lo >= n_hi and s.case.diagnosis.settings.threshold == 0.9
        huge = demo_app.update_settings(s, "en", 0.5, 1e6)
        assert huge.rows == [] and "No suspected lesion" in huge.findings
        assert demo_app.show_slice(s, 3) is not None
        demo_app.refresh(s, "zh")
        assert counter.n == calls, "threshold / size / slice / language changes must not run the model"
        assert s.case.diagnosis.probs is probs
    finally:
        counter.close()
        s.cleanup()


def test_report_matches_predict_case(demo_app, tmp_path):
    """The downloads come from the cached result but equal what predict.py's predict_case writes."""
    ex = demo_app.examples[1]
    s = demo_app.new_session()
    demo_app.analyse_example(s, ex.name, "zh", 0.4, 3)
    files = demo_app.write_downloads(s, "zh")
    ours = json.loads(Path(files[2]).read_text(encoding="utf-8"))
    ref = diagnosis.predict_case(demo_app.bundle, ex.path, tmp_path,
                                 DiagnosisSettings(threshold=0.4, min_lesion_size=3, lang="zh"))
    theirs = json.loads((ref.output_dir / "report.json").read_text(encoding="utf-8"))
    for rep in (ours, theirs):
        for key in ("generated_at", "timing", "software", "outputs"):
            rep.pop(key)
        rep["input"].pop("path")
    assert ours == theirs
    np.testing.assert_array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(ref.files["mask"])))
    s.cleanup()


def test_volume_example_slices_and_nifti_mask(demo_app):
    s = demo_app.new_session()
    ex = next(e for e in demo_app.examples if e.name.endswith(".nii.gz"))
    v = demo_app.analyse_example(s, ex.name, "en", 0.5, 0)
    assert v.ok, v.status
    assert v.n_slices == 16 and 0 <= v.z < 16 and v.min_size_unit == "mm³"
    assert any("slice" in r[2] for r in v.rows)
    a = demo_app.show_slice(s, 0)
    b = demo_app.show_slice(s, v.z)
    assert a.input.shape == b.input.shape and not np.array_equal(a.input, b.input)
    mask_path = Path(demo_app.write_downloads(s, "en")[0])
    assert mask_path.name.endswith("_mask.nii.gz")
    img, ref = nib.load(str(mask_path)), nib.load(str(ex.path))
    np.testing.assert_allclose(img.affine, ref.affine)
    assert img.shape == ref.shape
    s.cleanup()


def dicom_zip(path: Path, vol: np.ndarray, spacing=(0.8, 0.8), gap=1.5, folder: str = "series", mode: str = "w") -> Path:
    """A DICOM series of 8-bit values (one file per slice) in a zip, as a scanner export would be sent; ``folder``
    names its folder in the zip, ``mode="a"`` adds it to an existing zip (a study of several series)."""
    import io
    import zipfile

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    series = generate_uid()
    with zipfile.ZipFile(path, mode) as zf:
        for k, plane in enumerate(vol):
            fm = FileMetaDataset()
            fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
            fm.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(f"IM{k}", {}, file_meta=fm, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
            ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "OT", "1.2.3", series
            ds.PatientName, ds.PatientID = "Demo^Patient", "D001"
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, k * gap], [1.0, 0, 0, 0, 1.0, 0]
            ds.PixelSpacing, ds.SliceThickness, ds.InstanceNumber = list(spacing), gap, k + 1
            ds.Rows, ds.Columns = plane.shape
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit, ds.PixelRepresentation = 15, 0
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = plane.astype(np.uint16).tobytes()
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            zf.writestr(f"{folder}/IM{k:03d}.dcm", buf.getvalue())
    return path


def test_jpeg_tiff_and_dicom_zip_uploads(demo_app, tmp_path, monkeypatch):
    s = demo_app.new_session()
    png = demo_app.examples[0].path
    grey = np.asarray(Image.open(png))
    for name in ("scan.jpg", "scan.tiff"):
        Image.fromarray(grey).save(tmp_path / name)
        v = demo_app.analyse_upload(s, tmp_path / name, "en", 0.5, 0)
        assert v.ok and v.rows, v.status
        assert Path(demo_app.write_downloads(s, "en")[0]).name == "scan_mask.png"  # 2D: PNG mask

    vol = np.round(data_gen.synthetic_volume(32, seed=4, n_slices=8) * 255)
    z = dicom_zip(tmp_path / "series.zip", vol)
    v = demo_app.analyse_upload(s, z, "en", 0.5, 0)
    assert v.ok and v.n_slices == 8 and v.min_size_unit == "mm³", v.status
    files = [Path(f) for f in demo_app.write_downloads(s, "en")]
    assert files[0].name == "series_mask.nii.gz" and nib.load(str(files[0])).shape == (32, 32, 8)
    rep = json.loads(files[2].read_text(encoding="utf-8"))
    assert rep["input"]["format"] == "dicom" and rep["input"]["patient"]["id"] == "D001"
    assert files[3].name == "series_seg.dcm"  # a DICOM upload also gets its SEG, as predict.py writes it
    assert rep["outputs"]["dicom_seg"] == "series_seg.dcm"
    mask = np.asarray(nib.load(str(files[0])).dataobj)
    seg = dicom_export.read_seg_labels(files[3], dicom_export.source_datasets(z))
    assert mask.any() and int((seg > 0).sum()) == int((mask > 0).sum())
    written, content = files[3].stat(), files[3].read_bytes()
    demo_app.refresh(s, "zh")  # the labels stay: the SEG already written is kept, the reports are rewritten
    assert (files[3].stat().st_ino, files[3].stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert "不是医疗器械" in files[1].read_text(encoding="utf-8")
    v = demo_app.update_settings(s, "en", 0.5, 10_000)  # no lesion is that large: other labels, a new SEG
    assert v.ok and not np.asarray(nib.load(str(files[0])).dataobj).any() and files[3].read_bytes() != content

    monkeypatch.setattr(fileio, "MAX_UNPACKED_BYTES", 1000)  # the one zip limit, shared with predict.py
    v = demo_app.analyse_upload(s, z, "en", 0.5, 0)
    assert not v.ok and "would unpack to" in v.status and "1000 bytes allowed" in v.status
    s.cleanup()


def test_bad_uploads_get_polite_messages_and_the_app_keeps_working(demo_app, tmp_path, monkeypatch):
    s = demo_app.new_session()
    bad = corrupt_png(tmp_path)
    v = demo_app.analyse_upload(s, bad, "en", 0.5, 0)
    assert not v.ok and v.panels is None and "medseg-error" in v.status
    assert "Could not analyse corrupt.png" in v.status and "damaged" in v.status
    assert str(tmp_path) not in v.status and str(s.dir) not in v.status  # no server paths
    assert s.case is None and not (s.dir / "input").exists()

    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert "Unsupported file type" in demo_app.analyse_upload(s, txt, "en", 0.5, 0).status
    assert "不支持" in demo_app.analyse_upload(s, txt, "zh", 0.5, 0).status

    series = tmp_path / "time_series.nii.gz"  # 4D with more volumes than a scan has channels
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 20), np.float32), np.eye(4)), str(series))
    v = demo_app.analyse_upload(s, series, "en", 0.5, 0)
    assert not v.ok and "expected 2D or 3D" in v.status
    two_channels = tmp_path / "two_channels.nii.gz"  # a 2-channel scan for a 1-channel model
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(two_channels))
    v = demo_app.analyse_upload(s, two_channels, "en", 0.5, 0)
    assert not v.ok and "Could not analyse two_channels.nii.gz" in v.status and "expected grey or RGB" in v.status

    monkeypatch.setattr(demo_app, "max_upload_mb", 1e-4)
    v = demo_app.analyse_upload(s, demo_app.examples[0].path, "en", 0.5, 0)
    assert not v.ok and "too large" in v.status and "limit" in v.status
    monkeypatch.undo()

    assert "No file arrived" in demo_app.analyse_upload(s, None, "en", 0.5, 0).status
    v = demo_app.analyse_upload(s, demo_app.examples[0].path, "en", 0.5, 0)  # a real upload, after all that
    assert v.ok and v.rows and (s.dir / "input" / demo_app.examples[0].name).is_file()
    s.cleanup()
    assert not s.dir.exists()


def test_language_switch_uses_the_report_translations(demo_app):
    s = demo_app.new_session()
    demo_app.analyse_example(s, demo_app.examples[0].name, "en", 0.5, 0)
    zh = demo_app.refresh(s, "zh")
    assert zh.headers[0] == report.t("no", "zh") and zh.rows[0][1] == "病灶"
    assert "检出" in zh.findings and "已分析" in zh.status
    assert tr("upload", "zh", limit=200) != tr("upload", "en", limit=200)
    s.cleanup()


def test_no_checkpoint_explains_how_to_train(ckpt, tmp_path):
    missing = tmp_path / "best_unet.pth"
    a = page.DemoApp(missing)
    try:
        assert a.bundle is None and len(a.examples) == len(page.EXAMPLES)
        en, zh = a.model_html("en"), a.model_html("zh")
        assert f"No model found at {missing}" in en and "python run.py" in en and "15 s" in en
        assert "未找到模型" in zh and "python run.py" in zh
        v = a.analyse_example(a.new_session(), a.examples[0].name, "en", 0.5, 0)
        assert not v.ok and "python run.py" in v.status
        corrupt = tmp_path / "corrupt.pth"
        corrupt.write_bytes(b"not a checkpoint")
        b = page.DemoApp(corrupt)
        assert b.bundle is None and "could not be loaded" in b.model_html("en")
        b.close()
        # a model trained meanwhile is picked up by "Reload model", without a restart
        shutil.copyfile(ckpt, missing)
        assert a.load_model() and a.bundle is not None and "No model" not in a.model_html("en")
        assert a.analyse_example(a.new_session(), a.examples[0].name, "en", 0.5, 0).ok
    finally:
        a.close()
    assert not a.root.exists()


def test_command_line_usage_errors():
    assert app.main(["--port", "0"]) == 2
    assert app.main(["--max-upload-mb", "0"]) == 2
    assert app.main(["--lang", "fr"]) == 2
    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.checkpoint, args.share) == ("127.0.0.1", 7860, "best_unet.pth", False)


# ------------------------------------------------------------------------------------------ browser
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _need_browser():
    """(sync_playwright, chromium path); skip without them, fail under CI."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (pip install playwright)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing.append("gradio (pip install gradio)")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        msg = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " — under CI this test must run (.ci/run installs them)")
        pytest.skip(msg)
    return sync_playwright


@pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")
def test_page_in_headless_chromium(ckpt, tmp_path, monkeypatch):
    sync_playwright = _need_browser()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))  # Gradio's upload cache, as app.main does
    demo = app.build_app(ckpt, lang="en", device="cpu")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    app.serve(demo, "127.0.0.1", port, block=False, quiet=True)
    requests: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(30_000)
                page.on("request", lambda r: requests.append(r.url))
                page.goto(base + "/")

                # a bundled example: overlay, findings, lesion table, downloads
                page.click("#example-btn")
                page.wait_for_selector("#status .medseg-ok")
                page.wait_for_selector("#overlay-image img")
                assert "suspected lesion" in page.inner_text("#findings-text")
                table = page.inner_text("#lesion-table")
                assert "Max. diameter" in table and "lesion" in table
                page.wait_for_function("document.querySelector('#downloads').innerText.includes('.json')")
                if os.environ.get("MEDSEG_APP_SCREENSHOT"):  # docs/app_screenshot.png is made this way
                    time.sleep(1)
                    page.screenshot(path=os.environ["MEDSEG_APP_SCREENSHOT"], full_page=True)

                # a corrupt upload: a polite, visible error; the result is cleared
                page.set_input_files("#upload input[type=file]", str(corrupt_png(tmp_path)))
                page.wait_for_selector("#status .medseg-error")
                assert "Could not analyse corrupt.png" in page.inner_text("#status")
                page.wait_for_selector("#overlay-image img", state="detached")

                # a header naming /etc/passwd as its data: refused, visibly
                mhd = tmp_path / "scan.mhd"
                mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                               "ElementDataFile = /etc/passwd\n")
                page.click("#upload button[aria-label='Clear']")  # the refused file still fills the box
                page.set_input_files("#upload input[type=file]", str(mhd))
                page.wait_for_function("document.querySelector('#status').innerText.includes('scan.mhd')")
                assert "⚠" in page.inner_text("#status") and "separate file" in page.inner_text("#status")

                # a DICOM zip of two series: the page offers the choice, then analyses the one chosen
                vol = np.round(data_gen.synthetic_volume(32, seed=4, n_slices=4) * 255)
                study = dicom_zip(dicom_zip(tmp_path / "study.zip", vol, folder="a"), vol[:3], folder="b", mode="a")
                page.click("#upload button[aria-label='Clear']")
                page.set_input_files("#upload input[type=file]", str(study))
                page.wait_for_function("document.querySelector('#status').innerText.includes('2 DICOM series')")
                page.click("#series input")
                page.get_by_role("option", name="b/").click()
                page.wait_for_selector("#status .medseg-ok")
                assert "b/" in page.inner_text("#status")
                page.wait_for_function("document.querySelector('#downloads').innerText.includes('study_b_mask')")

                # ... and the page still works
                page.click("#example-btn")
                page.wait_for_selector("#status .medseg-ok")
                page.wait_for_selector("#overlay-image img")
                assert "lesion" in page.inner_text("#lesion-table")

                # live minimum lesion size (the slider's number box), then Chinese
                box = page.locator("#min-size input[type=number]")
                box.fill("50")
                box.press("Enter")
                page.wait_for_function(
                    "document.querySelector('#findings-text').innerText.includes('No suspected lesion')")
                page.get_by_text("中文", exact=True).click()
                page.wait_for_function("document.querySelector('#findings-text').innerText.includes('未检出')")
                assert "病灶列表" in page.inner_text("#lesion-table")

                # closing the tab deletes the session's folder (upload, downloads)
                sessions = list(demo.medseg.sessions.values())
                assert len(sessions) == 1 and (sessions[0].dir / "out").is_dir()
                page.close(run_before_unload=True)
                deadline = time.monotonic() + 10
                while sessions[0].dir.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not sessions[0].dir.exists() and not demo.medseg.sessions
            finally:
                browser.close()
    finally:
        demo.close()
        demo.medseg.close()
    outside = sorted({u for u in requests if not u.startswith((base, "data:", "blob:"))})
    assert not outside, f"the page called outside the machine: {outside}"
