"""The demo page's uploads: what an uploaded file may be, and how it reaches a session's folder.

An upload is untrusted: its name may be 250 bytes long or hold control characters, its content may be random
bytes, a zip bomb, or a header that names ``/etc/passwd`` as its data file. This module

* refuses, before any reader opens the file, what the page cannot analyse: too large, an unsupported type, a
  header whose data lives in a second file (``.mhd``, ``.nhdr``, Analyze ``.hdr`` / ``.img``: a single upload
  cannot bring that file along), a DICOMDIR index;
* copies the upload into the session's folder under a short safe name (:func:`safe_stem`), race-free
  (:func:`fileio.open_regular`: a FIFO swapped in after the check cannot hang the copy);
* opens zips only through :mod:`fileio` (central-directory limits first, bounded member reads): a zip holding
  one MetaImage / NRRD header and its data is unpacked into a folder of its own, where the reader resolves the
  header's data file strictly inside that folder; a DICOM zip is listed by series folder so that the page can
  offer a choice when it holds several.

Every refusal is an :class:`errors.InputError` (one line, naming the file) or a page-text key.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fileio
import medio
from diagnosis import case_stem, input_suffix
from errors import InputError

#: headers whose voxels live in a second file, which a single upload cannot bring along
DETACHED_SUFFIXES = (".mhd", ".nhdr", ".hdr", ".img", ".hdr.gz", ".img.gz")
#: headers a zip may hold together with their data file(s)
ZIP_HEADER_SUFFIXES = (".mhd", ".nhdr", ".mha", ".nrrd")
MAX_STEM_BYTES = 60      # download names: <stem>_report.html must stay far below the 255-byte file-name limit
SHOWN_NAME_CHARS = 80    # names in the status line are cut to this (the report keeps the whole name)


@dataclass
class Target:
    """What to read for a staged upload: ``path`` (the upload itself, or a header unpacked from its zip) and,
    for a DICOM zip, its series folders (more than one: the user chooses)."""

    path: Path
    series: list[str] = field(default_factory=list)
    unpacked: Path | None = None  # the folder a zip was unpacked into (hidden from messages)


# ------------------------------------------------------------------------------------------------ names
def safe_stem(name: str) -> str:
    """A short file-name stem for ``name``'s downloads: the name without its image suffix, control and
    reserved characters replaced, cut to :data:`MAX_STEM_BYTES` bytes with a hash of the whole name appended
    when cut (two long names that share a beginning still get different files)."""
    stem = "".join(c if c.isprintable() else "_" for c in case_stem(Path(name)))
    if len(stem.encode("utf-8")) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    cut = stem.encode("utf-8")[:MAX_STEM_BYTES - 9].decode("utf-8", "ignore").rstrip(" .")
    return f"{cut or 'case'}-{digest}"


def shown_name(name: str) -> str:
    """``name`` for a status line: printable, and at most :data:`SHOWN_NAME_CHARS` characters (start … end)."""
    text = fileio.printable(name)
    if len(text) <= SHOWN_NAME_CHARS:
        return text
    return text[:SHOWN_NAME_CHARS - 21] + "…" + text[-20:]


def _suffix(name: str) -> str:
    """The suffix the staged copy gets: the upload's own when the readers know it, else ``.dcm`` (a DICOM file
    without one; anything else was refused before)."""
    sfx = input_suffix(Path(name))
    return sfx if sfx in medio.SUPPORTED_SUFFIXES else ".dcm"


# ------------------------------------------------------------------------------------------------ checks
def refusal(path: Path, name: str, max_upload_mb: float) -> tuple[str, dict] | None:
    """A page-text key and its fields when the upload must be refused before any reader opens it, else None.
    ``path`` must already be known to be a regular file (:func:`fileio.require_regular_file`)."""
    size_mb = path.stat().st_size / 2 ** 20
    if size_mb > max_upload_mb:
        return "too_large", {"mb": size_mb, "limit": f"{max_upload_mb:g}"}
    lower = name.lower()
    if lower == "dicomdir":
        return "dicomdir", {}
    detached = next((s for s in DETACHED_SUFFIXES if lower.endswith(s)), None)
    if detached:
        return "detached", {"sfx": detached}
    sfx = input_suffix(Path(name))
    if sfx not in medio.SUPPORTED_SUFFIXES and not medio.is_dicom_file(path):
        return "unsupported", {"sfx": sfx or name}
    return None


# ------------------------------------------------------------------------------------------------ staging
def stage(src: Path, name: str, folder: Path) -> Path:
    """Copy the upload ``src`` into ``folder`` as ``<safe stem><suffix>``; only a regular file is opened."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (safe_stem(name) + _suffix(name))
    try:
        fd = fileio.open_regular(src)
    except OSError as exc:
        raise InputError(f"{src}: cannot be read ({exc.strerror or exc}; expected a regular file)") from None
    with os.fdopen(fd, "rb") as fh, open(dest, "wb") as out:
        shutil.copyfileobj(fh, out, 1 << 20)
    return dest


def prepare(staged: Path) -> Target:
    """What to read for a staged upload: a zip holding an image header is unpacked beside it (see
    :func:`unpack_header_zip`); a DICOM zip is listed by series folder; anything else is read as it is."""
    if medio.file_suffix(staged) != ".zip":
        return Target(staged)
    with fileio.open_zip(staged) as zf:  # central-directory limits (members, size, ratio, encryption) first
        infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        headers = [i for i in infos if i.filename.lower().endswith(ZIP_HEADER_SUFFIXES)]
        if headers:
            folder = staged.with_name(staged.name[:-4])
            return Target(unpack_header_zip(zf, staged, infos, headers, folder), unpacked=folder)
        return Target(staged, series=_dicom_folders(zf, infos))


def _dicom_folders(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> list[str]:
    """The folders of a zip that hold DICOM files, grouped as the DICOM reader groups them (a ``.dcm`` name
    or the ``DICM`` marker; DICOMDIR indexes skipped); ``"."`` for files at the top."""
    folders = set()
    for info in infos:
        name = info.filename
        if name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
            continue
        if name.lower().endswith(".dcm") or fileio.read_zip_head(zf, info, 132)[128:132] == b"DICM":
            folders.add(name.rsplit("/", 1)[0] if "/" in name else ".")
    return sorted(folders)


def unpack_header_zip(zf: zipfile.ZipFile, where: Path, infos: list[zipfile.ZipInfo],
                      headers: list[zipfile.ZipInfo], folder: Path) -> Path:
    """Unpack a zip holding ONE MetaImage / NRRD header and its data file(s) into ``folder``; returns the
    header's path there. Member names must stay inside ``folder`` (no absolute names, no ``..``); members are
    written as plain files (a symlink entry becomes a small text file, never a link); each member is read
    with :func:`fileio.read_zip_member`, bounded by its declared size, which :func:`fileio.check_zip` bounded."""
    if len(headers) > 1:
        names = ", ".join(fileio.printable(h.filename) for h in headers[:5])
        raise InputError(f"{where}: zip holds {len(headers)} image headers ({names}) (expected one header and "
                         f"its data file)")
    targets = [(info, folder.joinpath(*_member_parts(where, info.filename))) for info in infos]  # all names first
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for info, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fileio.read_zip_member(zf, info))
    return folder.joinpath(*_member_parts(where, headers[0].filename))


def _member_parts(where: Path, name: str) -> tuple[str, ...]:
    """The path parts of a zip member name, refused when it would leave the unpacking folder."""
    parts = PurePosixPath(name).parts
    bad = (not parts or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None
           or any(p in ("..", "") for p in parts) or "\0" in name)
    if bad:
        raise InputError(f"{where}: zip member '{fileio.printable(name)}' would unpack outside its folder "
                         f"(expected relative names inside the zip)")
    return parts
