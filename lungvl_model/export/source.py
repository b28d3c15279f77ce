"""The source CT series' DICOM headers, in the order of a :class:`~lungvl_model.data.volume.CTVolume`'s slices.

A DICOM SEG and SR reference the source images instance by instance, and the SEG's frames must sit
exactly on the source slices. :class:`~lungvl_model.data.volume.CTVolume` keeps the geometry but not the
headers, so the headers are re-read (no pixel data) from the series' files and matched to the volume's
slices by their position along the slice normal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from lungvl_model.data.volume import CTVolume

#: Type 2 Patient / General Study attributes the derived objects copy from the source; a source that
#: lacks one (lungvl's synthetic writer, some exports) gets it empty, which is what Type 2 means for "unknown".
TYPE2_SOURCE_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)

#: Largest distance (mm) between a header's slice position and the volume slice it is matched to.
POSITION_TOLERANCE_MM = 0.05


def read_source_headers(files: Iterable[str | Path]) -> list[Dataset]:
    """Read the headers (no pixel data) of a series' slice files.

    Args:
        files: the slice files of one CT series (e.g. ``SeriesInfo.files``).

    Returns:
        One dataset per file, in the order given; missing Type 2 patient/study attributes
        (:data:`TYPE2_SOURCE_KEYS`) are set empty on these in-memory copies.

    Raises:
        ValueError: no file given, or a file is not readable DICOM (the message names the file).
    """
    out: list[Dataset] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001 - any parser failure: the file cannot be referenced
            raise ValueError(f"{f}: unreadable DICOM header ({type(e).__name__}: {e})") from e
        for key in TYPE2_SOURCE_KEYS:
            if key not in ds:
                setattr(ds, key, "")
        out.append(ds)
    if not out:
        raise ValueError("no source DICOM files given for the export")
    return out


def order_like_volume(headers: Sequence[Dataset], volume: CTVolume) -> list[Dataset]:
    """Put the source headers in the volume's slice order (``headers_out[z]`` is slice ``z``).

    Args:
        headers: the series' slice headers, any order.
        volume: the volume read from the same files.

    Returns:
        ``volume.shape[0]`` datasets, one per slice.

    Raises:
        ValueError: a header is from another series, or the headers and the volume do not describe
            the same slices (count, positions, matrix); the message names the offending value.
    """
    nz, ny, nx = volume.shape
    if len(headers) != nz:
        raise ValueError(f"series {volume.series_uid}: {len(headers)} source header(s) for a volume of {nz} slices")
    normal = volume.direction[:, 2]
    origin = np.asarray(volume.origin, dtype=np.float64)
    slots: list[Dataset | None] = [None] * nz
    for ds in headers:
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid != volume.series_uid:
            raise ValueError(f"{ds.get('SOPInstanceUID', '?')}: SeriesInstanceUID {uid}, volume is {volume.series_uid}")
        if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise ValueError(f"{ds.SOPInstanceUID}: {ds.Rows}x{ds.Columns} pixels, volume slices are {ny}x{nx}")
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        along = float((ipp - origin) @ normal) / volume.spacing[0]
        z = int(round(along))
        off_mm = abs(along - z) * volume.spacing[0]
        if not 0 <= z < nz or off_mm > POSITION_TOLERANCE_MM:
            raise ValueError(
                f"{ds.SOPInstanceUID}: ImagePositionPatient {list(np.round(ipp, 3))} is not on a slice of the volume"
            )
        if slots[z] is not None:
            raise ValueError(f"{ds.SOPInstanceUID}: a second header at slice {z} of series {volume.series_uid}")
        slots[z] = ds
    return [ds for ds in slots if ds is not None]


def source_headers(files: Iterable[str | Path], volume: CTVolume) -> list[Dataset]:
    """:func:`read_source_headers` then :func:`order_like_volume`."""
    return order_like_volume(read_source_headers(files), volume)
