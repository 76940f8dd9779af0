"""The demo page under bad input, tried as an adversarial user would (``page.DemoApp`` in-process), and the real
server under eight users at once and under guessed ``/file=`` URLs.

Every bad upload in ``PAGE_CASES`` must give a ⚠ status that is one line, names the file and says what was
expected (or what to upload instead); no result, no downloads, no traceback, no server path; the user's files
unchanged (SHA-256); nothing opened outside the upload's folder, the app's own temporary folder and the library
locations (an audit hook records every Python ``open``); SimpleITK never reached for a refused header; and the
page then still analyses an example. ``OK_CASES`` are odd but valid inputs that must give a correct result whose
downloads exist. The list of every kind covered is ``docs/bad_input.md``.
"""
from __future__ import annotations

import html
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_bad_input
from PIL import Image
from scan_fixtures import ct_series
from test_bad_input import (
    NAN,
    PIXDIM1,
    _bomb_bytes,
    _patch_zip,
    assert_no_foreign_opens,
    deadline,
    dicom_raw_spacing,
    dicomdir,
    fifo,
    fingerprint,
    huge_png,
    many_members_zip,
    mhd,
    nhdr,
    nifti,
    nifti_claiming,
    secret,
    small_dicom_zip,
    truncated_gz,
    write,
)

import app
import diagnosis
import medio
import page
import page_upload

# the reader-level suite's fixtures: the audit hook recording every open(), and the SimpleITK spy
_hook_installed, opened, no_simpleitk = test_bad_input._hook_installed, test_bad_input.opened, test_bad_input.no_simpleitk

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 10.0  # one refused upload, analysed in-process

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo(trained_model):
    """One DemoApp for the module (fp32: the concurrency test compares the server's results with it exactly)."""
    a = page.DemoApp(trained_model.checkpoint, lang="en", device="cpu", precision="fp32")
    yield a
    a.close()


# ------------------------------------------------------------------------------------------- inputs
MHA_RAW = "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    """A zip holding ``members`` (name -> bytes), names written exactly as given."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return write(path, buf.getvalue())


def mhd_zip(case: Path, data_file: str, extra: dict[str, bytes] | None = None, name: str = "scan.zip") -> Path:
    header = (MHA_RAW + f"ElementDataFile = {data_file}\n").encode()
    return zip_of(case / name, {"scan/scan.mhd": header, "scan/scan.raw": bytes(range(8)), **(extra or {})})


def two_series_zip(case: Path) -> Path:
    ct_series(case / "_src" / "a", n=2, seed=1)
    ct_series(case / "_src" / "b", n=3, seed=2)
    members = {f"study/{f.parent.name}/{f.name}": f.read_bytes() for f in sorted((case / "_src").rglob("*"))
               if f.is_file()}
    for f in sorted((case / "_src").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (case / "_src").rmdir()
    return zip_of(case / "study.zip", members)


def png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def example_like(case: Path, name: str) -> Path:
    """A copy of bundled example 1's pixels under ``name`` (a real scan-like picture with a lesion)."""
    return png(case / name, np.asarray(Image.open(page.make_examples(case / "_ex", 32)[0].path)))


LONG = "a" * 240 + ".png"  # 244 bytes: the downloads' names would pass 255 bytes without shortening

#: (kind, make(case_dir) -> the uploaded path, text the ⚠ status must hold)
PAGE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    # headers that name another file: a single upload has no data file beside it
    ("mhd_data_file_etc_passwd", lambda c: mhd(c, "/etc/passwd"), "a .zip of the header and its data file"),
    ("mhd_data_file_dotdot", lambda c: mhd(c, "../secret/secret.raw"), "whose image data live in a separate file"),
    ("nhdr_single_header", lambda c: nhdr(c, "data file: scan.raw"), "Upload a .mha / .nrrd with the data inside"),
    ("analyze_hdr", lambda c: write(c / "scan.hdr", b"\0" * 348), "(.hdr)"),
    ("analyze_img", lambda c: write(c / "scan.img", b"\0" * 64), "(.img)"),
    ("mha_names_etc_passwd", lambda c: mhd(c, "/etc/passwd", "scan.mha"), "by an absolute path"),
    ("nrrd_names_dotdot", lambda c: nhdr(c, "data file: ../secret/secret.raw", "scan.nrrd"), "outside the header"),
    ("zip_mhd_names_etc_passwd", lambda c: mhd_zip(c, "/etc/passwd"), "by an absolute path"),
    ("zip_mhd_names_dotdot", lambda c: mhd_zip(c, "../../../secret/secret.raw"), "outside the header"),
    ("zip_member_dotdot", lambda c: mhd_zip(c, "scan.raw", {"../evil.raw": b"x"}), "would unpack outside its folder"),
    ("zip_member_absolute", lambda c: mhd_zip(c, "scan.raw", {"/tmp/evil.raw": b"x"}), "would unpack outside"),
    ("zip_two_headers", lambda c: mhd_zip(c, "scan.raw", {"other.mhd": b"x"}), "2 image headers"),
    ("dicomdir_upload", dicomdir, "not an image. Upload a .zip of the series folder"),
    # zips: fileio.check_zip's limits, shared with predict.py
    ("zip_bomb", lambda c: write(c / "bomb.zip", _bomb_bytes()), "zip bomb"),
    ("zip_encrypted", lambda c: write(c / "locked.zip", _patch_zip(small_dicom_zip(c), flag=0x1)), "encrypted"),
    ("zip_20000_members", many_members_zip, "20,000 members"),
    ("zip_not_a_zip", lambda c: write(c / "fake.zip", b"PK\x03\x04 not really a zip"), "not a valid zip"),
    # broken files of the readers' formats
    ("empty_file", lambda c: write(c / "empty.png", b""), "file is empty"),
    ("random_bytes_png", lambda c: write(c / "noise.png", np.random.default_rng(1).bytes(4096)), "damaged"),
    ("random_bytes_nii_gz", lambda c: write(c / "noise.nii.gz", np.random.default_rng(2).bytes(4096)),
     "not a NIfTI file"),
    ("truncated_nifti", truncated_gz, "expected a valid NIfTI file"),
    ("nifti_nan_pixdim", lambda c: nifti(c / "nan.nii", patch={PIXDIM1: NAN}), "invalid voxel spacing (nan, 1, 1)"),
    ("nifti_claims_4000_cubed", nifti_claiming, "more than half of this machine's memory"),
    ("nifti_4d_time_series", lambda c: _nifti(c / "series.nii.gz", np.zeros((8, 8, 4, 20), np.float32)),
     "expected 2D or 3D"),
    ("dicom_pixel_spacing_0_0", lambda c: dicom_raw_spacing(c, b"0\\0"), "PixelSpacing is '0\\0'"),
    ("png_claims_100000_squared", huge_png, "exceeds limit"),
    ("unsupported_suffix", lambda c: write(c / "setup.exe", b"MZ" + bytes(100)), "Unsupported file type"),
    # what the path is (not possible through an upload, but the handler is called with a path)
    ("fifo_named_scan_png", lambda c: fifo(c, "scan.png"), "named pipe (FIFO)"),
    ("folder_named_scan_png", lambda c: (c / "scan.png").mkdir() or c / "scan.png", "is a folder"),
    ("missing_file", lambda c: c / "gone.png", "no such file"),
    # names
    ("long_name_corrupt", lambda c: write(c / LONG, b"\x89PNG\r\n\x1a\n" + bytes(50)), "…"),
    ("control_chars_in_name", lambda c: write(c / "scan\n\x1b[31m.png", b"not a png"), "damaged"),
    ("html_in_name", lambda c: write(c / "<img src=x onerror=alert(1)>.png", b"not a png"), "damaged"),
    ("html_as_name_no_suffix", lambda c: write(c / "<script>alert(1)<script>", b"plain text"), "Unsupported file type"),
]


def _nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def status_text(view_status: str) -> str:
    """The status line as the user reads it (tags removed, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", view_status)).strip()


def page_opens(paths: list[str], upload_dir: Path, demo_app: page.DemoApp) -> None:
    """Only the upload's folder, the app's own temporary folder and library locations were opened."""
    root = os.path.realpath(demo_app.root)
    rest = [p for p in paths if not os.path.realpath(p).startswith(root + os.sep)]
    assert_no_foreign_opens(rest, upload_dir)


def still_works(demo_app: page.DemoApp, s: page.Session) -> None:
    v = demo_app.analyse_example(s, demo_app.examples[0].name, "en", 0.5, 0)
    assert v.ok and v.rows and len(s.downloads) == 3 and all(Path(f).is_file() for f in s.downloads), v.status


# ------------------------------------------------------------------------------------------ bad uploads
def test_page_case_table_is_big_enough():
    kinds = [k for k, _, _ in PAGE_CASES] + [k for k, _ in OK_CASES]
    assert len(kinds) == len(set(kinds)) >= 35


@pytest.mark.parametrize("kind,make,expected", PAGE_CASES, ids=[c[0] for c in PAGE_CASES])
def test_page_refuses_bad_upload(kind, make, expected, demo, tmp_path, opened, no_simpleitk):
    case = tmp_path / "case"
    case.mkdir()
    write(secret(case), bytes(range(8)))  # the decoy beside the upload's folder
    path = make(case)
    before = fingerprint(tmp_path)
    s = demo.new_session()
    opened.clear()
    t0 = time.monotonic()
    with deadline(20):
        view = demo.analyse_upload(s, path, "en", 0.5, 0)
    took = time.monotonic() - t0
    seen = list(opened)
    text = status_text(view.status)
    assert not view.ok and view.panels is None and "medseg-error" in view.status, text
    assert text.startswith("⚠") and "✓" not in text and "\n" not in text and text.isprintable(), repr(text)
    assert expected in text, text
    shown = page_upload.shown_name(path.name)
    assert shown in text or kind == "dicomdir_upload" and "DICOMDIR" in text, (shown, text)
    assert "Traceback" not in text and str(tmp_path) not in text and str(demo.root) not in text, text
    assert "<img" not in view.status and "<script" not in view.status, view.status  # names are escaped
    assert s.case is None and s.downloads == [] and demo.write_downloads(s, "en") == []
    assert took < CASE_SECONDS, f"{kind}: {took:.1f} s"
    page_opens(seen, tmp_path, demo)
    assert not no_simpleitk, f"{kind}: SimpleITK was reached ({no_simpleitk})"
    assert fingerprint(tmp_path) == before, "the page changed the user's files"
    still_works(demo, s)
    s.cleanup()


def test_upload_over_the_size_limit(demo, tmp_path, monkeypatch):
    path = example_like(tmp_path, "big.png")
    monkeypatch.setattr(demo, "max_upload_mb", 1e-4)
    s = demo.new_session()
    text = status_text(demo.analyse_upload(s, path, "en", 0.5, 0).status)
    assert text.startswith("⚠") and "big.png" in text and "too large" in text and "limit is 0.0001 MB" in text
    monkeypatch.undo()
    still_works(demo, s)


def test_downloads_that_cannot_be_written_withdraw_the_result(demo, tmp_path, monkeypatch):
    """Never "✓ Analysed" while the downloads fail: the result is withdrawn with a ⚠ line naming the file."""
    path = example_like(tmp_path, "scan.png")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(kwargs.get("out_dir", args[2])))

    s = demo.new_session()
    monkeypatch.setattr(diagnosis, "write_case_files", broken)
    v = demo.analyse_upload(s, path, "en", 0.5, 0)
    text = status_text(v.status)
    assert not v.ok and v.panels is None and text.startswith("⚠") and "✓" not in text, text
    assert "scan.png" in text and "No space left on device" in text and str(demo.root) not in text
    assert s.case is None and s.downloads == []
    monkeypatch.undo()
    assert demo.analyse_upload(s, path, "en", 0.5, 0).ok and len(s.downloads) == 3
    monkeypatch.setattr(diagnosis, "write_case_files", broken)  # a slider moved, then writing fails
    v = demo.update_settings(s, "en", 0.3, 0)
    assert not v.ok and status_text(v.status).startswith("⚠") and s.case is None and s.downloads == []
    monkeypatch.undo()
    still_works(demo, s)


# ------------------------------------------------------------------------------------ odd but valid inputs
def one_pixel(case: Path) -> Path:
    return png(case / "one.png", np.full((1, 1), 7, np.uint8))


def control_char_name(case: Path) -> Path:
    return example_like(case, "scan\x1b[2J\n.png")


def mhd_and_data(case: Path) -> Path:
    return mhd_zip(case, "scan.raw")


def volume_for_2d_model(case: Path) -> Path:
    from data_gen import synthetic_volume

    vol = np.round(synthetic_volume(32, 4, n_slices=6) * 255).astype(np.uint8)
    return _nifti(case / "volume.nii.gz", np.ascontiguousarray(vol.T))


#: (kind, make(case_dir) -> path): must give a correct result with working downloads
OK_CASES: list[tuple[str, Callable[[Path], Path]]] = [
    ("png_1x1", one_pixel),
    ("name_250_bytes", lambda c: example_like(c, LONG)),
    ("name_with_control_chars", control_char_name),
    ("html_in_name_valid_image", lambda c: example_like(c, "<img src=x onerror=alert(1)>.png")),
    ("zip_of_mhd_and_raw", mhd_and_data),
    ("volume_given_to_2d_model", volume_for_2d_model),
]


@pytest.mark.parametrize("kind,make", OK_CASES, ids=[c[0] for c in OK_CASES])
def test_odd_but_valid_uploads_give_results_with_downloads(kind, make, demo, tmp_path, opened):
    case = tmp_path / "case"
    case.mkdir()
    path = make(case)
    before = fingerprint(tmp_path)
    s = demo.new_session()
    opened.clear()
    v = demo.analyse_upload(s, path, "en", 0.5, 0)
    seen = list(opened)
    assert v.ok and "medseg-ok" in v.status and status_text(v.status).startswith("✓"), v.status
    files = [Path(f) for f in s.downloads]
    assert [f.name.rsplit("_", 1)[-1] for f in files[1:]] == ["report.html", "report.json"] and len(files) == 3
    for f in files:
        assert f.is_file() and f.stat().st_size > 0 and len(f.name.encode()) <= 100 and f.name.isprintable(), f.name
    _, meta = medio.read_image(s.upload[0] if kind != "zip_of_mhd_and_raw" else
                                   s.upload[0].with_suffix("") / "scan" / "scan.mhd")
    mask, _ = medio.read_mask(files[0])
    assert mask.shape == meta.shape == s.case.diagnosis.meta.shape
    np.testing.assert_array_equal(mask > 0, s.case.diagnosis.labels > 0)
    assert "<img src=x" not in files[1].read_text(encoding="utf-8") + v.status + v.findings  # names escaped
    rep = json.loads(files[2].read_text(encoding="utf-8"))
    assert rep["input"]["shape"] == list(meta.shape) and len(rep["lesions"]) == len(v.rows)
    page_opens(seen, tmp_path, demo)
    assert fingerprint(tmp_path) == before
    s.cleanup()


def test_dicom_zip_with_several_series_offers_a_choice(demo, tmp_path):
    path = two_series_zip(tmp_path)
    s = demo.new_session()
    v = demo.analyse_upload(s, path, "en", 0.5, 0)
    text = status_text(v.status)
    assert not v.ok and text.startswith("ℹ") and "study.zip holds 2 DICOM series (study/a/, study/b/)" in text, text
    assert v.series_choices == ["study/a", "study/b"] and s.downloads == []
    for series, n in (("study/b", 3), ("study/a", 2)):  # choose one, then the other: the same upload is kept
        v = demo.analyse_series(s, series, "en", 0.5, 0)
        assert v.ok and v.series == series and v.series_choices == ["study/a", "study/b"], v.status
        assert s.case.diagnosis.meta.shape[0] == n and f"{series}/" in status_text(v.status)
        assert Path(s.downloads[0]).name == f"study_{series[-1]}_mask.nii.gz"
        expected, _ = medio.read_image(path, series=series)
        np.testing.assert_array_equal(s.case.diagnosis.image, expected)
    v = demo.analyse_series(s, "../../etc", "en", 0.5, 0)  # not one of the choices: nothing happens
    assert not v.ok and s.case is not None
    still_works(demo, s)
    assert s.series_choices == []  # a new input replaces the choice


def test_command_line_refuses_bad_numbers(capsys):
    for argv, flag in ((["--max-upload-mb", "nan"], "--max-upload-mb"), (["--max-upload-mb", "inf"], "--max-upload-mb"),
                       (["--max-upload-mb", "-1"], "--max-upload-mb"), (["--max-upload-mb", "0"], "--max-upload-mb"),
                       (["--port", "0"], "--port"), (["--port", "70000"], "--port"), (["--port", "abc"], "--port")):
        t0 = time.monotonic()
        assert app.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("app.py: error: argument " + flag), err
        assert "expected" in err and argv[1] in err and "Traceback" not in err
        assert time.monotonic() - t0 < 2


def test_gradio_cache_holding_the_sessions_is_refused(demo):
    """GRADIO_TEMP_DIR=/tmp would put every session folder under Gradio's file route: app.py refuses to serve."""
    for above in (demo.root.parent, demo.root, demo.sessions_dir):
        with pytest.raises(app.ConfigError, match="holds the page's session folders"):
            app._check_file_route(demo, above)
    app._check_file_route(demo, demo.root / "gradio-cache")  # app.main's own choice: beside the sessions


# -------------------------------------------------------------------------------- the real server
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    import urllib.request

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("app.py did not answer within 90 s")


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def _inputs(folder: Path, n: int) -> list[Path]:
    """``n`` different scan-like pictures (synthetic, seeded), most with a lesion."""
    import data_gen

    out = []
    for k in range(n):
        img, _, _ = data_gen.generate_sample(np.random.default_rng(100 + k), 48, 48, "seed")
        out.append(png(folder / f"user{k}.png", np.round(img * 255).astype(np.uint8)))
    return out


def _session_run(base: str, path: Path, out: dict, k: int, barrier: threading.Barrier) -> None:
    """One browser session through Gradio's API: upload, then fetch the downloads of the result by their URLs."""
    import urllib.request

    from gradio_client import Client, handle_file

    try:
        client = Client(base, verbose=False, download_files=False)  # file outputs as the server's URLs
        barrier.wait(timeout=60)
        t0 = time.monotonic()
        status = client.predict(handle_file(str(path)), "en", 0.5, 0, api_name="/upload")[0]
        files, status2 = client.predict("en", api_name="/downloads")
        got = {}
        for f in files:
            got[Path(f["path"]).name] = (f["url"], f["path"], urllib.request.urlopen(f["url"], timeout=30).read())
        out[k] = {"status": status, "status2": status2, "files": got, "seconds": time.monotonic() - t0}
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out[k] = {"error": f"{type(exc).__name__}: {exc}"}


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux /proc VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc")
def test_eight_sessions_at_once_and_no_guessed_file_urls(trained_model, demo, tmp_path):
    """Eight users analyse at the same moment: each gets its own correct result (equal to a single-user run of
    the same file), requests queue instead of failing, the server's peak RSS stays under 4 GB, and no guessed
    ``/file=`` URL reaches another session's files, the session folders or /etc/passwd."""
    pytest.importorskip("gradio_client")
    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)
    t_start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", str(trained_model.checkpoint),
                             "--port", str(port), "--lang", "en", "--device", "cpu", "--precision", "fp32"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(base, proc)
        print(f"\nserver up after {time.monotonic() - t_start:.1f} s")
        inputs = _inputs(tmp_path / "in", 8)
        results: dict[int, dict] = {}
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=_session_run, args=(base, p, results, k, barrier))
                   for k, p in enumerate(inputs)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        wall = time.monotonic() - t0
        peak = _peak_rss_mb(proc.pid)
        print(f"\n8 sessions: wall {wall:.2f} s, per session {sorted(round(r.get('seconds', -1), 2) for r in results.values())}"
              f" s, server peak RSS {peak:.0f} MB")
        assert len(results) == 8 and not [r["error"] for r in results.values() if "error" in r], results
        assert peak < 4096, f"peak RSS {peak:.0f} MB"
        for k, path in enumerate(inputs):  # each session's result = a single-user run of the same file
            r = results[k]
            assert "medseg-ok" in r["status"] and path.name in r["status"] and "medseg-ok" in r["status2"], r
            names = sorted(r["files"])
            assert names == [f"user{k}_mask.png", f"user{k}_report.html", f"user{k}_report.json"], names
            s = demo.new_session()
            assert demo.analyse_upload(s, path, "en", 0.5, 0).ok
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r["files"][f"user{k}_mask.png"][2]))),
                                          np.asarray(Image.open(s.downloads[0])))
            theirs = json.loads(r["files"][f"user{k}_report.json"][2])
            ours = json.loads(Path(s.downloads[2]).read_text(encoding="utf-8"))
            assert theirs["lesions"] == ours["lesions"] and theirs["summary"] == ours["summary"]
            s.cleanup()
        t1 = time.monotonic()
        _check_guessed_urls(base, results)
        print(f"url checks {time.monotonic() - t1:.1f} s; reference runs {t1 - t0 - wall:.1f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


def _check_guessed_urls(base: str, results: dict[int, dict]) -> None:
    """Every guess is refused (403/404): other sessions' staged uploads and downloads by their server paths, a
    session's download folder with another user's file name, traversal out of Gradio's cache, the examples, the
    code, /etc/passwd. A download's own URL (a keyed hash of its content: a capability) is what works. Server
    paths handed to the upload event as if uploaded are refused by Gradio before the page sees them."""
    import glob

    url0, path0, _ = results[0]["files"]["user0_mask.png"]
    cache = Path(path0).parents[1]  # <app root>/gradio-cache/<hash>/user0_mask.png
    root = cache.parent
    assert cache.name == "gradio-cache" and (root / "sessions").is_dir(), path0
    server_files = glob.glob(f"{root}/sessions/session-*/*/*")  # staged uploads and downloads of all 8 sessions
    assert len(server_files) >= 16, server_files
    guesses = ["/etc/passwd", "/proc/self/environ", str(root / "examples" / "example_1_seed.png"), *server_files,
               str(Path(path0).with_name("user1_mask.png")), f"{cache}/user1_mask.png", str(cache),
               f"{cache}/../sessions/{Path(server_files[0]).relative_to(root / 'sessions')}",
               f"{cache}/../examples/example_1_seed.png", str(REPO / "app.py"), str(REPO / "README.md")]
    codes = {}
    for path in guesses:
        for route in ("gradio_api/file=", "file="):
            codes[route + path] = _http_status(base + route + path)
    wrong = {u: c for u, c in codes.items() if c not in (403, 404)}
    assert not wrong, wrong
    print(f"{len(codes)} guessed /file= URLs: {sorted(set(codes.values()))}")
    assert _http_status(url0) == 200  # the session's own download
    staged = [f for f in server_files if "/input/" in f][:2]
    for path in ["/etc/passwd", *staged]:  # a server path handed to the upload event instead of an upload
        answer = _api_call(base, "upload", [{"path": path, "meta": {"_type": "gradio.FileData"}}, "en", 0.5, 0])
        assert answer.startswith("event: error") and "medseg" not in answer, (path, answer[:300])


def _api_call(base: str, api_name: str, data: list) -> str:
    """Gradio's plain HTTP API: start an event, return its server-sent answer as text."""
    import urllib.request

    req = urllib.request.Request(f"{base}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(req, timeout=10).read())["event_id"]
    return urllib.request.urlopen(f"{base}gradio_api/call/{api_name}/{event}", timeout=60).read().decode()


def test_docs_list_every_page_and_reader_kind():
    doc = (REPO / "docs" / "bad_input.md").read_text(encoding="utf-8")
    kinds = [k for k, _, _ in PAGE_CASES] + [k for k, _ in OK_CASES] + [k for k, _, _ in test_bad_input.READER_CASES]
    assert not [k for k in kinds if f"`{k}`" not in doc], "docs/bad_input.md misses kinds"
