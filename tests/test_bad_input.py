"""Bad input, tried as an adversarial user would.

Every case is a row ``(kind, make_fn, expected_substring)`` of a table: ``make_fn(case_dir)`` writes the bad
input into ``case_dir`` and returns the path a user would pass. For each row, ``medio.read_image`` and
``medio.read_mask`` must both

* raise :class:`errors.InputError` whose message is ONE line, names the file and says what was expected;
* never open a file outside the test's tmp folder (an audit hook records every Python ``open``), above all
  neither ``/etc/passwd`` nor the decoy ``secret/secret.raw`` in a sibling folder -- and never reach
  SimpleITK for a header that names files elsewhere (SimpleITK opens files from C++, unseen by the hook);
* leave every file the user had byte-for-byte unchanged (SHA-256);
* end within a few seconds (a per-case alarm turns a hang, e.g. on a FIFO, into a failure).

The reader-level table is ``READER_CASES``; CLI-level cases (predict.py, the demo page) can be added beside it.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import signal
import socket
import stat
import struct
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scan_fixtures import ct_series, ct_slice

import fileio
import medio
from errors import InputError

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 5.0   # each reader call must end (refused) well within this
HANG_SECONDS = 20    # the alarm that turns a hang into a failure

# ------------------------------------------------------------------------------------- open() recording
_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _RECORDING[0] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


@pytest.fixture(scope="session")
def _hook_installed() -> None:
    sys.addaudithook(_audit)  # cannot be removed again: installed once, switched on and off by `opened`


@pytest.fixture
def opened(_hook_installed) -> list[str]:
    """Paths opened from Python while the test runs (builtin open, io.open_code, os.open, ...)."""
    _OPENED.clear()
    _RECORDING[0] = True
    yield _OPENED
    _RECORDING[0] = False


def _allowed_roots() -> tuple[str, ...]:
    import site
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages(),
             *sysconfig.get_paths().values(), "/usr", "/lib", "/proc", "/sys", "/etc/ld.so", "/dev/null",
             "/dev/urandom", str(REPO)}
    return tuple(sorted(r for r in roots if r))


def assert_no_foreign_opens(paths: list[str], tmp: Path) -> None:
    """No path outside ``tmp`` and the interpreter / library locations was opened; never the decoys."""
    tmp_real = os.path.realpath(tmp)
    roots = _allowed_roots()
    for p in paths:
        real = os.path.realpath(p)
        assert real != "/etc/passwd", p
        assert not real.endswith(os.path.join("secret", "secret.raw")), f"decoy opened: {p}"
        inside = real == tmp_real or real.startswith(tmp_real + os.sep) or p.startswith(str(tmp))
        assert inside or real.startswith(roots) or p.startswith(roots), f"opened a file it was not given: {p}"


# ------------------------------------------------------------------------------------------------ helpers
def fingerprint(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder`` (FIFOs, sockets and symlinks are not opened)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


@contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the main thread after ``seconds`` (interrupts a blocking open of a FIFO)."""
    def _raise(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def secret(case: Path) -> Path:
    """The decoy in a sibling folder of the case folder: a valid 8-byte raw volume, so a reader that followed
    a header to it would succeed (and the test would see no error)."""
    return case.parent / "secret" / "secret.raw"


MHD = "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
NHDR = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def mhd(case: Path, data_file: str, name: str = "scan.mhd") -> Path:
    return write(case / name, MHD + f"ElementDataFile = {data_file}\n")


def nhdr(case: Path, field: str, name: str = "scan.nhdr") -> Path:
    return write(case / name, NHDR + field + "\n")


def nifti(path: Path, shape=(3, 4, 5), patch: dict[int, bytes] | None = None) -> Path:
    """A small NIfTI-1 file with raw header bytes patched: ``{offset: bytes}`` (written uncompressed first)."""
    plain = path.with_name(path.name.removesuffix(".gz"))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(plain))
    raw = bytearray(plain.read_bytes())
    for offset, value in (patch or {}).items():
        raw[offset:offset + len(value)] = value
    if path.name.endswith(".gz"):
        plain.unlink()
        return write(path, gzip.compress(bytes(raw)))
    return write(path, bytes(raw))


PIXDIM1 = 80       # float32 pixdim[1] in a NIfTI-1 header
VOX_OFFSET = 108   # float32 vox_offset
DIM1 = 42          # int16 dim[1]


def nifti_claiming(case: Path, shape=(4000, 4000, 4000)) -> Path:
    """A header claiming ``shape`` float32 voxels, followed by a tiny payload (nothing like the claim)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_data_offset(352)
    return write(case / "huge.nii", hdr.binaryblock + b"\0" * 4 + b"\0" * 64)


def dicom(case: Path, name: str = "slice.dcm", **fields) -> Path:
    path = case / name
    case.mkdir(parents=True, exist_ok=True)
    ct_slice(path, np.arange(30, dtype=np.uint16).reshape(5, 6), position=(0, 0, 0), uid="1.2.3", instance=1)
    if fields:
        ds = pydicom.dcmread(path)
        for key, value in fields.items():
            setattr(ds, key, value)
        ds.save_as(path)
    return path


def dicom_raw_spacing(case: Path, stored: bytes) -> Path:
    """A slice whose PixelSpacing text is replaced byte for byte (8 bytes), bypassing pydicom's validation."""
    path = dicom(case)
    raw = path.read_bytes()
    assert raw.count(b"0.7\\0.6 ") == 1
    path.write_bytes(raw.replace(b"0.7\\0.6 ", stored.ljust(8)))
    return path


def dicomdir(case: Path) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    path = case / "DICOMDIR"
    case.mkdir(parents=True, exist_ok=True)
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b"\0" * 128)
    ds.FileSetID = "SCANS"
    ds.DirectoryRecordSequence = Sequence([])
    ds.save_as(path, enforce_file_format=True)
    return path


@functools.lru_cache(maxsize=1)
def _bomb_bytes() -> bytes:
    """A zip whose one DICOM member inflates to 200 MB of zeros (~200 KB packed), built by streaming."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("series/slice.dcm", "w") as fh:
        chunk = bytes(1 << 20)
        for _ in range(200):
            fh.write(chunk)
    return buf.getvalue()


def _patch_zip(raw: bytes, *, flag: int | None = None, size: int | None = None) -> bytes:
    """Set general-purpose flag bits and/or the uncompressed size in every local and central header."""
    data = bytearray(raw)
    for sig, flag_at, size_at in ((b"PK\x03\x04", 6, 22), (b"PK\x01\x02", 8, 24)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            if flag is not None:
                data[i + flag_at:i + flag_at + 2] = struct.pack("<H", struct.unpack_from("<H", data, i + flag_at)[0] | flag)
            if size is not None:
                data[i + size_at:i + size_at + 4] = struct.pack("<I", size)
            start = i + 4
    return bytes(data)


def small_dicom_zip(case: Path, name: str = "series.zip") -> bytes:
    slice_path = dicom(case / "_src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(slice_path, "series/slice.dcm")
    for p in (case / "_src").iterdir():
        p.unlink()
    (case / "_src").rmdir()
    return buf.getvalue()


def many_members_zip(case: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(20_000):
            zf.writestr(f"series/{i}.dcm", b"")
    return write(case / "many.zip", buf.getvalue())


def lying_zip(case: Path) -> Path:
    """A member of 2 MB of zeros whose headers declare 1000 bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("series/slice.dcm", bytes(2 << 20))
    return write(case / "lying.zip", _patch_zip(buf.getvalue(), size=1000))


def fifo(case: Path, name: str) -> Path:
    case.mkdir(parents=True, exist_ok=True)
    os.mkfifo(case / name)
    return case / name


def unix_socket(case: Path) -> Path:
    case.mkdir(parents=True, exist_ok=True)
    path = case / "scan.png"
    if len(os.fsencode(path)) >= 100:
        pytest.skip("tmp path too long for an AF_UNIX socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the socket file stays
    return path


def symlink(case: Path, name: str, target: str | Path) -> Path:
    case.mkdir(parents=True, exist_ok=True)
    os.symlink(target, case / name)
    return case / name


def huge_png(case: Path) -> Path:
    """A valid 1x1 PNG whose IHDR is rewritten to claim 100000 x 100000 pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    i = raw.index(b"IHDR")
    raw[i + 4:i + 12] = struct.pack(">II", 100_000, 100_000)
    raw[i + 17:i + 21] = struct.pack(">I", zlib.crc32(bytes(raw[i:i + 17])))
    return write(case / "huge.png", bytes(raw))


def two_series_folder(case: Path) -> Path:
    ct_series(case / "study" / "a", n=2, seed=1)
    ct_series(case / "study" / "b", n=2, seed=2)
    return case / "study"


def folder_with_escaping_symlink(case: Path) -> Path:
    ct_series(case / "series", n=2)
    os.symlink(secret(case), case / "series" / "extra.dcm")
    return case / "series"


def truncated_gz(case: Path) -> Path:
    path = case / "cut.nii.gz"
    case.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def empty_file(suffix: str) -> Callable[[Path], Path]:
    return lambda case: write(case / f"empty{suffix}", b"")


def newline_member_zip(case: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("series/bad\nname.dcm", "just text, not DICOM")
    return write(case / "odd.zip", buf.getvalue())


NAN, INF = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))

READER_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    # headers that name another file: resolved only inside their own folder
    ("mhd_data_file_etc_passwd", lambda c: mhd(c, "/etc/passwd"), "absolute path"),
    ("mhd_data_file_dotdot", lambda c: mhd(c, "../secret/secret.raw"), "outside the header's folder"),
    ("mhd_data_file_absolute_decoy", lambda c: mhd(c, str(secret(c))), "absolute path"),
    ("mhd_data_file_symlink_escape", lambda c: (symlink(c, "data.raw", secret(c)), mhd(c, "data.raw"))[1],
     "a symlink leads out of it"),
    ("mhd_data_file_list_escape", lambda c: mhd(c, "LIST 2D\nok.raw\n../secret/secret.raw"), "outside"),
    ("mhd_data_file_pattern_escape", lambda c: mhd(c, "../secret/s%03d.raw 1 2 1"), "outside"),
    ("mhd_data_file_tilde", lambda c: mhd(c, "~/secret.raw"), "absolute path"),
    ("mhd_data_file_missing", lambda c: mhd(c, "gone.raw"), "missing"),
    ("mhd_data_file_is_fifo", lambda c: (fifo(c, "data.raw"), mhd(c, "data.raw"))[1], "named pipe (FIFO)"),
    ("mha_data_file_etc_passwd", lambda c: mhd(c, "/etc/passwd", "scan.mha"), "absolute path"),
    ("mhd_crlf_hidden_data_file", lambda c: write(c / "scan.mhd", MHD.replace("\n", "\r") + "ElementDataFile = /etc/passwd\r"),
     "absolute path"),
    ("nhdr_data_file_dotdot", lambda c: nhdr(c, "data file: ../secret/secret.raw"), "outside"),
    ("nhdr_datafile_etc_passwd", lambda c: nhdr(c, "datafile: /etc/passwd"), "absolute path"),
    ("nhdr_data_file_list", lambda c: nhdr(c, "data file: LIST\n../secret/secret.raw"), "outside"),
    ("nhdr_data_file_format", lambda c: nhdr(c, "data file: ../secret/s%03d.raw 1 3 1"), "outside"),
    ("nhdr_data_file_bad_pattern", lambda c: nhdr(c, "data file: s%s.raw 1 3 1"), "integer field"),
    ("nrrd_attached_names_etc_passwd", lambda c: nhdr(c, "data file: /etc/passwd", "scan.nrrd"), "absolute path"),
    ("analyze_hdr_pair", lambda c: write(c / "scan.hdr", b"\0" * 348), "not supported"),
    ("analyze_img_pair", lambda c: write(c / "scan.img", b"\0" * 64), "not supported"),
    ("dicomdir_index", dicomdir, "DICOMDIR index, not an image: pass the series folder instead"),
    # zips: limits from the central directory, bounded member reads
    ("zip_bomb_200mb_zeros", lambda c: write(c / "bomb.zip", _bomb_bytes()), "zip bomb"),
    ("zip_20000_members", many_members_zip, "20,000 members"),
    ("zip_encrypted_flag", lambda c: write(c / "locked.zip", _patch_zip(small_dicom_zip(c), flag=0x1)), "encrypted"),
    ("zip_member_lies_about_size", lying_zip, "declared size"),
    ("zip_not_a_zip", lambda c: write(c / "fake.zip", b"PK\x03\x04 this is not really a zip"), "not a valid zip"),
    ("zip_member_name_with_newline", newline_member_zip, "not a DICOM file"),
    # NIfTI header claims checked before any voxel is read
    ("nifti_claims_4000_cubed", nifti_claiming, "more than half of this machine's memory"),
    ("nifti_nan_pixdim", lambda c: nifti(c / "nan.nii", patch={PIXDIM1: NAN}),
     "NIfTI header has an invalid voxel spacing (nan, 1, 1) mm (expected finite positive values)"),
    ("nifti_nan_pixdim_gz", lambda c: nifti(c / "nan.nii.gz", patch={PIXDIM1: NAN}), "invalid voxel spacing (nan, 1, 1)"),
    ("nifti_zero_pixdim", lambda c: nifti(c / "zero.nii", patch={PIXDIM1: struct.pack("<f", 0.0)}), "(0, 1, 1) mm"),
    ("nifti_negative_pixdim", lambda c: nifti(c / "neg.nii", patch={PIXDIM1: struct.pack("<f", -2.0)}), "(-2, 1, 1) mm"),
    ("nifti_inf_pixdim", lambda c: nifti(c / "inf.nii", patch={PIXDIM1: INF}), "(inf, 1, 1) mm"),
    ("nifti_zero_dim", lambda c: nifti(c / "flat.nii", patch={DIM1: struct.pack("<h", 0)}), "empty image"),
    ("nifti_huge_vox_offset", lambda c: nifti(c / "far.nii.gz", patch={VOX_OFFSET: struct.pack("<f", 1e12)}),
     "image data at byte"),
    ("nifti_truncated_gz", truncated_gz, "expected a valid NIfTI file"),
    ("nifti_text_not_gzip", lambda c: write(c / "notes.nii.gz", "just some text\n" * 40), "not a NIfTI file"),
    # DICOM header values
    ("dicom_pixel_spacing_0_0", lambda c: dicom_raw_spacing(c, b"0\\0"), "PixelSpacing is '0\\0'"),
    ("dicom_pixel_spacing_negative", lambda c: dicom_raw_spacing(c, b"-1\\-1"), "expected two finite positive"),
    ("dicom_pixel_spacing_nan", lambda c: dicom_raw_spacing(c, b"nan\\1"), "PixelSpacing"),
    ("dicom_pixel_spacing_text", lambda c: dicom_raw_spacing(c, b"abc\\def"), "PixelSpacing is 'abc"),
    ("dicom_pixel_spacing_one_value", lambda c: dicom_raw_spacing(c, b"0.7"), "expected two finite positive"),
    ("dicom_claims_65535_squared_x1000", lambda c: dicom(c, Rows=65535, Columns=65535, NumberOfFrames=1000),
     "more than half of this machine's memory"),
    ("dicom_zero_rows", lambda c: dicom(c, Rows=0), "non-empty image"),
    ("text_renamed_dcm", lambda c: write(c / "notes.dcm", "Patient notes: nothing to see here.\n" * 20),
     "not a DICOM file (no DICM preamble and no DICOM header could be parsed)"),
    ("png_renamed_dcm", lambda c: write(c / "photo.dcm", png_bytes()), "not a DICOM file"),
    ("dicom_folder_two_series", two_series_folder, "choose one with --series a or --series b"),
    ("dicom_folder_symlink_escape", folder_with_escaping_symlink, "leads outside the folder"),
    # what a path is: checked with stat before anything opens it
    ("fifo_named_scan_png", lambda c: fifo(c, "scan.png"), "named pipe (FIFO)"),
    ("fifo_named_scan_nii_gz", lambda c: fifo(c, "scan.nii.gz"), "named pipe (FIFO)"),
    ("fifo_without_suffix", lambda c: fifo(c, "scan"), "named pipe (FIFO)"),
    ("socket_named_scan_png", unix_socket, "a socket"),
    ("device_via_symlink", lambda c: symlink(c, "scan.png", "/dev/zero"), "a device"),
    ("symlink_loop", lambda c: symlink(c, "loop.nii.gz", "loop.nii.gz"), "symlink loop"),
    ("dangling_symlink", lambda c: symlink(c, "gone.png", c / "nowhere.png"), "points to a missing file"),
    ("directory_named_x_png", lambda c: (c / "x.png").mkdir(parents=True) or c / "x.png", "is a folder, not a .png file"),
    ("directory_named_x_zip", lambda c: (c / "x.zip").mkdir(parents=True) or c / "x.zip", "is a folder"),
    ("missing_file", lambda c: c / "nothing_here.nii.gz", "no such file"),
    ("unknown_suffix", lambda c: write(c / "scan.exe", b"MZ" + b"\0" * 100), "unsupported file type"),
    ("png_claims_100000_squared", huge_png, "exceeds limit"),
    # empty files under each suffix
    *[(f"empty_file{sfx}", empty_file(sfx), "file is empty")
      for sfx in (".nii", ".nii.gz", ".dcm", ".zip", ".png", ".jpg", ".tif", ".nrrd", ".mha", ".mhd", ".nhdr")],
]


# -------------------------------------------------------------------------------------------------- tests
@pytest.fixture
def no_simpleitk(monkeypatch) -> list[str]:
    """Records any SimpleITK reader created during the test: a refused header must never reach SimpleITK."""
    calls: list[str] = []
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - SimpleITK is in requirements.txt; without it nothing can reach it
        return calls
    real = sitk.ImageFileReader

    def spy(*args, **kwargs):
        calls.append("ImageFileReader")
        return real(*args, **kwargs)

    monkeypatch.setattr(sitk, "ImageFileReader", spy)
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: calls.append("ReadImage"))
    return calls


def test_reader_case_table_is_big_enough():
    kinds = [k for k, _, _ in READER_CASES]
    assert len(kinds) == len(set(kinds)) >= 30


@pytest.mark.parametrize("kind,make,expected", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_reader_refuses_bad_input(kind, make, expected, tmp_path, opened, no_simpleitk):
    case = tmp_path / "case"
    case.mkdir()
    write(secret(case), bytes(range(8)))  # the decoy beside the case folder
    path = make(case)
    before = fingerprint(tmp_path)
    for reader in (medio.read_image, medio.read_mask):
        opened.clear()
        t0 = time.monotonic()
        with deadline(HANG_SECONDS), pytest.raises(InputError) as info:
            reader(path)
        took = time.monotonic() - t0
        msg = str(info.value)
        assert msg == " ".join(msg.split(" ")) and msg.isprintable(), repr(msg)  # one printable line
        assert fileio.printable(path.name) in msg, (path.name, msg)
        assert expected in msg, msg
        assert "expected" in msg or "no such file" in msg, msg
        assert took < CASE_SECONDS, f"{kind}: {reader.__name__} took {took:.1f} s"
        assert_no_foreign_opens(list(opened), tmp_path)
        assert not no_simpleitk, f"{kind}: SimpleITK was reached ({no_simpleitk})"
    assert fingerprint(tmp_path) == before, "a reader changed the user's files"


def test_zip_bomb_refused_before_inflating(tmp_path):
    """200 MB of zeros in one member: refused from the central directory, quickly and with little memory."""
    path = write(tmp_path / "bomb.zip", _bomb_bytes())
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(InputError, match="zip bomb"):
            medio.read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 3.0
    assert peak < 20 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"


def test_lying_member_is_stopped_at_its_declared_size(tmp_path):
    """The member's header says 1000 bytes; reading stops there (zipfile itself never inflates past the
    declared size) and the checksum mismatch becomes a clear error; memory stays small."""
    path = lying_zip(tmp_path)
    tracemalloc.start()
    try:
        with fileio.open_zip(path) as zf, pytest.raises(InputError, match="declared size"):
            fileio.read_zip_member(zf, zf.infolist()[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2 ** 20


def test_check_zip_limits(tmp_path):
    path = write(tmp_path / "ok.zip", small_dicom_zip(tmp_path))
    assert [i.filename for i in fileio.check_zip(path)] == ["series/slice.dcm"]
    with pytest.raises(InputError, match="would unpack to .* more than the 100 bytes allowed"):
        fileio.check_zip(path, max_unpacked_bytes=100)
    with pytest.raises(InputError, match="1 members, more than the 0 allowed"):
        fileio.check_zip(path, max_members=0)
    with pytest.raises(InputError, match="zip bomb"):
        fileio.check_zip(path, max_ratio=0.5, ratio_min_bytes=0)
    with zipfile.ZipFile(path) as zf:  # an open ZipFile works too
        assert len(fileio.check_zip(zf)) == 1
        assert fileio.read_zip_member(zf, zf.infolist()[0]).startswith(b"\0" * 128 + b"DICM")
        with pytest.raises(InputError, match="allowed for one member"):
            fileio.read_zip_member(zf, zf.infolist()[0], limit=10)
    assert fileio.max_unpacked_bytes() <= fileio.MAX_UNPACKED_BYTES


def test_max_array_bytes_is_half_the_memory_and_a_real_ct_fits(monkeypatch):
    assert fileio.max_array_bytes() == int(fileio.physical_memory_bytes() * 0.5)
    monkeypatch.setattr(fileio, "physical_memory_bytes", lambda: 24 * 2 ** 30)  # a 24 GB machine
    assert fileio.check_array_size("ct.nii.gz", (512, 512, 1000), 4, "NIfTI header") == 512 * 512 * 1000 * 4
    with pytest.raises(InputError) as info:
        fileio.check_array_size("big.nii", (4000, 4000, 4000), 4, "NIfTI header", dtype_name="float32")
    assert str(info.value) == ("big.nii: NIfTI header claims 4000×4000×4000 voxels = 238 GiB as float32; more than "
                               "half of this machine's memory (12 GiB) (expected an image that fits in memory)")
    with pytest.raises(InputError, match="empty image"):
        fileio.check_array_size("e.nii", (3, 0, 4), 4, "NIfTI header")


def test_physical_memory_fallback(monkeypatch):
    def broken(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", broken)
    assert fileio.max_array_bytes() == 8 * 2 ** 30


def test_resolve_inside(tmp_path):
    header = tmp_path / "h" / "scan.mhd"
    write(header, "")
    assert fileio.resolve_inside(header.parent, "data.raw", header) == (header.parent / "data.raw").resolve()
    assert fileio.resolve_inside(header.parent, "sub/../data.raw", header).name == "data.raw"
    for bad, words in (("/etc/passwd", "absolute path"), ("../x.raw", "'..' leads out"), ("", "empty")):
        with pytest.raises(InputError, match=words) as info:
            fileio.resolve_inside(header.parent, bad, header)
        assert "scan.mhd" in str(info.value)
    os.symlink(tmp_path, header.parent / "up")
    with pytest.raises(InputError, match="a symlink leads out of it"):
        fileio.resolve_inside(header.parent, "up/x.raw", header)


def test_require_regular_file(tmp_path):
    f = write(tmp_path / "a.png", b"x")
    assert fileio.require_regular_file(f) == f
    with pytest.raises(InputError, match="is a folder"):
        fileio.require_regular_file(tmp_path)
    assert fileio.require_regular_file(tmp_path, folder_ok=True) == tmp_path
    os.mkfifo(tmp_path / "p")
    with pytest.raises(InputError, match="FIFO"):
        fileio.require_regular_file(tmp_path / "p")
    assert not fileio.is_regular_file(tmp_path / "p") and not medio.is_dicom_file(tmp_path / "p")  # no hang


def test_atomic_writers(tmp_path):
    out = fileio.write_json_atomic(tmp_path / "sub" / "r.json", {"a": np.float32(1.5), "b": float("nan"),
                                                                   "p": Path("x"), "t": (1, 2)})
    assert out.read_text(encoding="utf-8") == '{\n  "a": 1.5,\n  "b": null,\n  "p": "x",\n  "t": [\n    1,\n    2\n  ]\n}'
    assert fileio.write_text_atomic(tmp_path / "t.txt", "中文").read_text(encoding="utf-8") == "中文"
    assert fileio.write_bytes_atomic(tmp_path / "b.bin", b"\0\1").read_bytes() == b"\0\1"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    with pytest.raises(ZeroDivisionError):
        fileio.atomic_write(tmp_path / "t.txt", ".tmp", lambda tmp: 1 / 0)
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "中文"  # the old content survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "sub", "t.txt"]  # no temp files left


# -------------------------------------------------------------------------------- what must still work
def test_tiny_images_read(tmp_path, opened):
    Image.fromarray(np.full((1, 1), 7, np.uint8)).save(tmp_path / "one.png")
    arr, meta = medio.read_image(tmp_path / "one.png")
    assert arr.shape == (1, 1) and arr[0, 0] == 7 and meta.shape == (1, 1)
    assert medio.read_mask(tmp_path / "one.png")[0].shape == (1, 1)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "tiny.png")
    assert medio.read_image(tmp_path / "tiny.png")[0].shape == (2, 3)
    nib.save(nib.Nifti1Image(np.ones((1, 1, 1), np.float32), np.eye(4)), str(tmp_path / "one.nii.gz"))
    assert medio.read_image(tmp_path / "one.nii.gz")[0].shape == (1, 1, 1)
    ct_slice(tmp_path / "one.dcm", np.full((1, 1), 5, np.uint16), position=(0, 0, 0), uid="1.2", instance=1)
    assert medio.read_image(tmp_path / "one.dcm")[0].shape == (1, 1)
    assert any(p.endswith("one.png") for p in opened)  # the audit hook does see the readers' opens
    assert_no_foreign_opens(list(opened), tmp_path)


def test_headers_naming_files_in_their_own_folder_still_read(tmp_path):
    pytest.importorskip("SimpleITK")
    write(tmp_path / "ok.raw", bytes(range(8)))
    (tmp_path / "sub").mkdir()
    for path in (mhd(tmp_path, "ok.raw", "a.mhd"), mhd(tmp_path, "./sub/../ok.raw", "b.mhd"),
                 nhdr(tmp_path, "data file: ok.raw", "c.nhdr")):
        arr, _ = medio.read_image(path)
        assert arr.shape == (2, 2, 2) and arr.ravel().tolist() == list(range(8)), path.name
    write(tmp_path / "s0.raw", bytes(range(4)))
    write(tmp_path / "s1.raw", bytes(range(4, 8)))
    arr, _ = medio.read_image(mhd(tmp_path, "LIST 2D\ns0.raw\ns1.raw", "list.mhd"))
    assert arr.ravel().tolist() == list(range(8))
    arr, _ = medio.read_image(nhdr(tmp_path, "data file: s%d.raw 0 1 1 2", "fmt.nhdr"))
    assert arr.ravel().tolist() == list(range(8))


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_attached_headers_larger_than_the_parsed_window_still_read(tmp_path, suffix):
    """Only the first MiB is parsed for data-file names; a 2 MiB volume with its data attached still reads."""
    sitk = pytest.importorskip("SimpleITK")
    data = np.random.default_rng(0).integers(-1000, 1000, size=(64, 128, 128)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / f"big{suffix}"))
    assert (tmp_path / f"big{suffix}").stat().st_size > 2 ** 21
    np.testing.assert_array_equal(medio.read_image(tmp_path / f"big{suffix}")[0], data)


def test_dicom_folder_with_dicomdir_reads_its_series(tmp_path):
    ct_series(tmp_path / "cd" / "SERIES1", n=3)
    dicomdir(tmp_path / "cd")
    arr, _ = medio.read_image(tmp_path / "cd")
    assert arr.shape == (3, 6, 7)


def test_dicom_zip_with_two_folders_names_the_choices(tmp_path):
    two_series_folder(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((tmp_path / "study").rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path).as_posix())
    path = write(tmp_path / "study.zip", buf.getvalue())
    with pytest.raises(InputError) as info:
        medio.read_image(path)
    assert "holds 2 DICOM series (folders study/a/, study/b/): choose one with --series a or --series b" in str(info.value)
    assert medio.read_image(path, series="b")[0].shape == (2, 6, 7)


def test_missing_pixel_spacing_is_unknown_not_an_error(tmp_path):
    path = dicom(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.save_as(path)
    _, meta = medio.read_image(path)
    assert not meta.spacing_known and meta.spacing == (1.0, 1.0)
