"""Small generated scans shared by the test modules: an oblique NIfTI affine and minimal CT DICOM series."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def oblique_affine() -> np.ndarray:
    """Anisotropic (0.8 x 1.0 x 2.5 mm), rotated 30 degrees about z, shifted."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 1.0, 2.5])
    affine[:3, 3] = [12.5, -30.0, 7.25]
    return affine


def ct_slice(path: Path, pixels: np.ndarray, *, position, uid: str, instance: int,
             iop=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.6), description: str = "CT", bits: int = 16,
             thickness: float = 2.5, patient: tuple[str, str, str] | None = None,
             extra: dict | None = None) -> None:
    """A minimal valid CT slice, RescaleSlope 1 / RescaleIntercept -1024, saved without extension.
    ``patient``: (PatientName, PatientID, StudyDate) to set; ``extra``: further attributes by keyword."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, fm.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "1.2.3.4", uid
    ds.SeriesDescription = description
    if patient is not None:
        ds.PatientName, ds.PatientID, ds.StudyDate = patient
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness, ds.InstanceNumber = thickness, instance
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)


def ct_series(folder: Path, *, n=5, shape=(6, 7), uid=None, seed=0, iop=(1, 0, 0, 0, 1, 0), gap=2.5,
              description="CT", prefix="image_", values=None, bits=16, spacing=(0.7, 0.6), patient=None, extra=None):
    """Write a series with shuffled file names/order and instance numbers opposite to position order.

    ``spacing`` (PixelSpacing), ``patient`` and ``extra`` (the same for every slice) go to :func:`ct_slice`.
    Returns (stored volume sorted by position along the normal, uid, first-slice position)."""
    rng = np.random.default_rng(seed)
    uid = uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    iop_arr = np.asarray(iop, float)
    normal = np.cross(iop_arr[:3], iop_arr[3:])
    start = np.array([-40.0, 25.0, 100.0])
    vol = values if values is not None else rng.integers(0, 2000, size=(n, *shape)).astype(np.uint16)
    names = list(range(n))
    random.Random(seed).shuffle(names)
    for k in range(n):  # slice k sits at start + k * gap * normal
        ct_slice(folder / f"{prefix}{names[k]}", vol[k], position=start + k * gap * normal, uid=uid,
                 instance=n - k, iop=iop, description=description, bits=bits, spacing=spacing, patient=patient,
                 extra=extra)
    return vol, uid, start
