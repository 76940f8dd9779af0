"""Safe file access: the one place the readers, the CLIs and the demo page go through for risky file work.

* **Atomic writes** -- :func:`atomic_write`, :func:`write_bytes_atomic`, :func:`write_text_atomic`,
  :func:`write_json_atomic`: a temporary file beside the target, then ``os.replace``; a reader never sees a
  half-written file and a failed write leaves whatever the target held before.
* **What a path is** -- :func:`require_regular_file` refuses FIFOs, sockets, devices, symlink loops and
  dangling symlinks *before* anything opens them (a FIFO named ``scan.png`` would otherwise hang a reader).
* **Names found inside headers** -- :func:`resolve_inside` resolves a data-file name that a header
  (MetaImage ``ElementDataFile``, NRRD ``data file``) names, only inside the header's own folder.
* **Bounded memory** -- :func:`check_zip` / :func:`open_zip` / :func:`read_zip_member` bound what a zip may
  unpack (reading only the central directory first); :func:`max_array_bytes` / :func:`check_array_size`
  refuse arrays a header claims that would not fit in half of this machine's memory.

Every refusal raises :class:`errors.InputError` with a one-line message naming the file. Nothing runs at import.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from errors import InputError

GiB = 2 ** 30
MiB = 2 ** 20
# Zip limits (checked from the central directory before anything is decompressed).
MAX_ZIP_MEMBERS = 10_000            # a CT series has a few hundred to a few thousand slices
MAX_UNPACKED_BYTES = 2 * GiB        # total declared unpacked size; also capped by max_array_bytes()
MAX_ZIP_RATIO = 200                 # unpacked / packed of one member; deflate's ceiling is ~1030
ZIP_RATIO_MIN_BYTES = 8 * MiB       # ... checked only for members at least this big: a small all-zero
#                                     mask slice legitimately packs 300:1 (3D-IRCADb's MASKS_DICOM.zip)
_ZIP_CHUNK = 1 * MiB
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                zipfile.ZIP_LZMA: "lzma"}
MEMORY_SHARE = 0.5                  # an array may use at most this share of physical memory
_FALLBACK_MEMORY = 16 * GiB         # physical memory assumed where sysconf cannot tell (-> 8 GiB arrays)


# ------------------------------------------------------------------------------------------------- JSON
def json_safe(obj: Any) -> Any:
    """Plain JSON values: NumPy / torch scalars and arrays converted, NaN and infinities -> None, other objects
    (paths, ...) -> str. Used for image metadata and for predict.py's reports."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # np.ndarray, np.generic, torch.Tensor
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------- atomic writes
def atomic_write(out: Path, suffix: str, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file beside ``out``, then rename it to ``out``: a reader never sees a
    half-written file and a failed write leaves whatever ``out`` held before."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0o600; results should be as readable as any other output
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(Path(path), ".tmp", lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``json_safe(obj)`` as indented UTF-8 JSON (NaN/inf -> null, never invalid JSON) atomically."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False))


# ------------------------------------------------------------------------------------------ path checks
def _kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is, in words (None for regular files and folders)."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a special file"


def file_problem(path: str | os.PathLike, *, folder_ok: bool = False) -> str | None:
    """Why ``path`` cannot be read as a regular file (or, with ``folder_ok``, a folder), in words without the
    path ("is a named pipe (FIFO), not a regular file (...)"), or None when it can. Uses only ``stat``."""
    p = Path(path)
    expected = "a file or a folder" if folder_ok else "a regular file"
    try:
        st = os.stat(p)  # follows symlinks: the target is what a reader would open
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"is a symlink loop (expected {expected})"
        if os.path.islink(p):
            try:
                target = printable(os.readlink(p))
            except OSError:
                target = "?"
            return f"is a symbolic link that points to a missing file ({target}; expected {expected})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return "no such file or folder"
        return f"cannot be accessed ({exc.strerror or type(exc).__name__}; expected {expected})"
    kind = _kind(st.st_mode)
    if kind is not None:
        return f"is {kind}, not a regular file (expected {expected})"
    if stat.S_ISDIR(st.st_mode) and not folder_ok:
        return "is a folder (expected a file)"
    if stat.S_ISREG(st.st_mode) and not os.access(p, os.R_OK):
        return "cannot be read: permission denied (expected a readable file)"
    return None


def require_regular_file(path: str | os.PathLike, *, folder_ok: bool = False) -> Path:
    """``path`` if it is a regular file (or, with ``folder_ok``, a folder); else InputError.

    Uses only ``stat`` -- nothing is opened -- so a FIFO, socket or device is refused without blocking, a
    symlink loop says "symlink loop" and a dangling symlink "points to a missing file" instead of the
    misleading "no such file". Call it BEFORE any library opens the path."""
    problem = file_problem(path, folder_ok=folder_ok)
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    return Path(path)


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (symlinks followed); never opens it, never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike) -> int:
    """An ``O_RDONLY`` descriptor of ``path``, opened non-blocking and checked with ``fstat`` to be a regular
    file -- race-free, unlike a ``stat`` before ``open``: a FIFO swapped in after a check cannot hang us.
    Raises OSError (ENXIO-style) for anything else; the caller closes the descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_head(path: str | os.PathLike, n: int) -> bytes:
    """The first ``n`` bytes of a regular file (fewer if it is shorter), opened via :func:`open_regular`."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(n)


def resolve_inside(folder: Path, name: str, header: Path) -> Path:
    """Resolve ``name`` -- a data-file name found inside ``header`` -- relative to ``folder`` (the header's own
    folder) and return it; refuse absolute names, ``..`` escapes and symlinks that lead out of the folder.

    The file need not exist (the reader reports a missing data file); only where it would be is checked."""
    shown = printable(name)
    if not name or "\0" in name:
        raise InputError(f"{header}: names an empty or invalid data file '{shown}' "
                         f"(expected a file name inside {Path(folder).name or folder}/)")
    if os.path.isabs(name) or name.startswith("~") or (os.sep != "/" and "/" in name[:1]):
        raise InputError(f"{header}: names the data file '{shown}' by an absolute path (expected a file name "
                         f"inside the header's own folder {Path(folder).name or folder}/; only files beside "
                         f"the header are read)")
    base = Path(folder).resolve()
    target = (base / name).resolve()  # follows every symlink on the way, like the reader would
    if target != base and base not in target.parents:
        how = "'..' leads out of it" if ".." in Path(name).parts else "a symlink leads out of it"
        raise InputError(f"{header}: names the data file '{shown}', which lies outside the header's folder "
                         f"({how}; expected a file inside {base.name or base}/: only files beside the header "
                         f"are read)")
    return target


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# ----------------------------------------------------------------------------------------------- memory
def physical_memory_bytes() -> int:
    """This machine's physical memory (sysconf), or 16 GiB where that is unavailable."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_MEMORY
    return int(total) if total > 0 else _FALLBACK_MEMORY


def max_array_bytes() -> int:
    """Largest array a header may claim: half of physical memory (8 GiB where it cannot be measured). A
    512x512x1000 CT (1 GB as float32) fits on any machine with more than 2 GB."""
    return int(physical_memory_bytes() * MEMORY_SHARE)


def format_bytes(n: float) -> str:
    """Bytes in words: ``1.5 GiB``, ``12 MiB``, ``300 bytes``."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} bytes"


def check_array_size(path: str | os.PathLike, shape: Sequence[int], itemsize: int, what: str,
                     *, dtype_name: str | None = None) -> int:
    """Raise InputError unless ``prod(shape) * itemsize`` bytes fit in :func:`max_array_bytes`; return the size.

    ``what`` says who claims the shape (e.g. "NIfTI header"); ``dtype_name`` how it will be held (default
    "N-byte values"). Zero or negative sizes are refused too: an empty image is never a valid input."""
    dims = [int(s) for s in shape]
    shown = "×".join(map(str, dims)) or "()"
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"{path}: {what} claims an empty image of {shown} voxels (expected a non-empty image)")
    nbytes = math.prod(dims) * int(itemsize)
    limit = max_array_bytes()
    if nbytes > limit:
        as_what = dtype_name or f"{int(itemsize)}-byte values"
        raise InputError(f"{path}: {what} claims {shown} voxels = {format_bytes(nbytes)} as {as_what}; more than "
                         f"half of this machine's memory ({format_bytes(limit)}) (expected an image that fits "
                         f"in memory)")
    return nbytes


# ------------------------------------------------------------------------------------------------- zips
def max_unpacked_bytes() -> int:
    """Default cap on a zip's total unpacked size: MAX_UNPACKED_BYTES (2 GiB), or less on a small machine."""
    return min(MAX_UNPACKED_BYTES, max_array_bytes())


def check_zip(path: str | os.PathLike | zipfile.ZipFile, *, max_members: int = MAX_ZIP_MEMBERS,
              max_unpacked_bytes: int | None = None, max_ratio: float = MAX_ZIP_RATIO,
              ratio_min_bytes: int = ZIP_RATIO_MIN_BYTES) -> list[zipfile.ZipInfo]:
    """The members of a zip after checking its central directory only -- nothing is decompressed.

    Refuses (InputError): an unreadable archive, encrypted members, compression methods Python cannot
    read, more than ``max_members`` members, a total declared unpacked size over ``max_unpacked_bytes``
    (default :func:`max_unpacked_bytes`: 2 GiB or half the memory) and members of at least
    ``ratio_min_bytes`` that unpack more than ``max_ratio`` times their packed size (a zip bomb). A member
    whose data lies about its declared size is caught later, by :func:`read_zip_member`."""
    if isinstance(path, zipfile.ZipFile):
        return _check_infos(Path(path.filename or "zip"), path.infolist(), max_members, max_unpacked_bytes,
                            max_ratio, ratio_min_bytes)
    with open_zip(path, max_members=max_members, max_unpacked_bytes=max_unpacked_bytes, max_ratio=max_ratio,
                  ratio_min_bytes=ratio_min_bytes) as zf:
        return zf.infolist()


@contextlib.contextmanager
def open_zip(path: str | os.PathLike, **limits: Any) -> Iterator[zipfile.ZipFile]:
    """``with open_zip(path) as zf:`` -- a :class:`zipfile.ZipFile` already passed through :func:`check_zip`
    (``limits`` as there). Only the central directory is read before the caller reads members."""
    p = require_regular_file(path)
    fd = None
    try:
        fd = open_regular(p)
        fh = os.fdopen(fd, "rb")
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        raise InputError(f"{p}: cannot open zip archive ({exc.strerror or exc}; expected a readable .zip file)") from None
    with fh:
        try:
            zf = zipfile.ZipFile(fh)
            zf.filename = str(p)  # messages name the archive, not the descriptor
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise InputError(f"{p}: not a valid zip archive ({_one(exc)}; expected a .zip of DICOM files)") from None
        with zf:
            _check_infos(p, zf.infolist(), limits.get("max_members", MAX_ZIP_MEMBERS),
                         limits.get("max_unpacked_bytes"), limits.get("max_ratio", MAX_ZIP_RATIO),
                         limits.get("ratio_min_bytes", ZIP_RATIO_MIN_BYTES))
            yield zf


def _check_infos(p: Path, infos: list[zipfile.ZipInfo], max_members: int, max_unpacked: int | None,
                 max_ratio: float, ratio_min_bytes: int) -> list[zipfile.ZipInfo]:
    max_unpacked = max_unpacked_bytes() if max_unpacked is None else max_unpacked
    if len(infos) > max_members:
        raise InputError(f"{p}: zip holds {len(infos):,} members, more than the {max_members:,} allowed "
                         f"(expected one DICOM series; unzip it and pass the folder instead)")
    total = 0
    for info in infos:
        name = printable(info.filename)
        if info.flag_bits & 0x1:
            raise InputError(f"{p}: zip member '{name}' is encrypted (expected an unencrypted zip: "
                             f"re-zip it without a password)")
        if info.compress_type not in _ZIP_METHODS:
            raise InputError(f"{p}: zip member '{name}' uses compression method {info.compress_type} "
                             f"(expected {', '.join(_ZIP_METHODS.values())})")
        total += info.file_size
        if info.file_size >= ratio_min_bytes and info.file_size > max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise InputError(f"{p}: zip member '{name}' unpacks {format_bytes(info.file_size)} from "
                             f"{format_bytes(info.compress_size)} ({ratio:.0f}:1, a zip bomb?; expected at most "
                             f"{max_ratio:g}:1 for members over {format_bytes(ratio_min_bytes)}; unzip it "
                             f"yourself and pass the folder if it is genuine)")
    if total > max_unpacked:
        raise InputError(f"{p}: zip would unpack to {format_bytes(total)}, more than the "
                         f"{format_bytes(max_unpacked)} allowed (expected a smaller archive; unzip it "
                         f"and pass the folder instead)")
    return infos


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int | None = None) -> bytes:
    """A member's bytes, read in 1 MiB chunks: refused (InputError) as soon as it yields more than its declared
    size or ``limit`` -- a member whose header lies is stopped long before it is decompressed in full -- or
    when its checksum shows the data differ from what the header declares."""
    where = Path(zf.filename or "zip")
    name = printable(info.filename)
    cap = info.file_size if limit is None else min(info.file_size, int(limit))
    if info.file_size > cap:
        raise InputError(f"{where}: zip member '{name}' declares {format_bytes(info.file_size)}, more than the "
                         f"{format_bytes(cap)} allowed for one member (expected a smaller file)")
    chunks, got = [], 0
    try:
        with zf.open(info) as fh:
            while True:
                chunk = fh.read(min(_ZIP_CHUNK, cap - got + 1))
                if not chunk:
                    break
                got += len(chunk)
                if got > cap:
                    raise InputError(f"{where}: zip member '{name}' holds more than its declared "
                                     f"{format_bytes(info.file_size)} (a lying header; expected an intact zip)")
                chunks.append(chunk)
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
        # zipfile stops at the declared size itself; then the CRC of what it got does not match
        raise InputError(f"{where}: zip member '{name}' is corrupt or its data do not match its declared "
                         f"size ({_one(exc)}; expected an intact zip)") from None
    if got != info.file_size:
        raise InputError(f"{where}: zip member '{name}' holds {got} bytes but declares {info.file_size} "
                         f"(expected an intact zip)")
    return b"".join(chunks)


def read_zip_head(zf: zipfile.ZipFile, info: zipfile.ZipInfo, n: int) -> bytes:
    """The first ``n`` unpacked bytes of a member (zipfile inflates only as much as is asked for);
    ``b""`` where the member cannot be read."""
    try:
        with zf.open(info) as fh:
            return fh.read(n)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError):
        return b""


def _one(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return printable(text if len(text) <= 160 else text[:157] + "...")
