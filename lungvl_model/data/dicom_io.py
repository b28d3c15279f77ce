"""Read and write CT series as DICOM with pydicom.

Reading goes in two steps, so that one bad file never stops a whole site:

1. :func:`scan_dicom_tree` walks any folder nesting, reads headers only, keeps axial CT image slices
   and records every other file with the reason it was skipped (not DICOM, unreadable, other
   modality, localizer, secondary capture, missing geometry...). Slices are grouped by
   StudyInstanceUID / SeriesInstanceUID.
2. :func:`read_series` loads one series' pixels: sorts slices along the slice normal, converts to HU
   with RescaleSlope/Intercept and checks the geometry (duplicate or missing slices, uneven spacing,
   gantry tilt, inconsistent orientation or matrix). A problem raises :class:`SeriesError` whose
   message names the series and the offending value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lungvl_model.data.volume import CTVolume

if TYPE_CHECKING:
    from lungvl_model.data.phi import PHIScan

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: |cos| between the slice normal and the patient z axis above which a slice counts as axial.
AXIAL_COSINE = 0.9
#: relative deviation from the median slice gap above which spacing counts as uneven.
SPACING_TOLERANCE = 0.1
#: largest angle (degrees) between the slice normal and the direction of slice positions.
TILT_TOLERANCE_DEG = 0.5


class SeriesError(ValueError):
    """A CT series cannot be used; the message names the series and the offending value."""


@dataclass
class SkippedFile:
    """A file that is not part of any usable CT series, and why."""

    path: Path
    reason: str
    study_uid: str = ""


@dataclass
class SeriesInfo:
    """Header-level description of one CT series found on disk.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        files: the axial CT image slices of the series.
        header: a few header values of the first slice (patient id, date, kernel, thickness...).
    """

    study_uid: str
    series_uid: str
    files: list[Path] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    """Everything :func:`scan_dicom_tree` found below a folder."""

    series: dict[tuple[str, str], SeriesInfo] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    #: identifying attributes of every DICOM header read (kept and skipped files); None when not asked
    phi: PHIScan | None = None

    def by_study(self) -> dict[str, list[SeriesInfo]]:
        """Series grouped by StudyInstanceUID."""
        out: dict[str, list[SeriesInfo]] = {}
        for info in self.series.values():
            out.setdefault(info.study_uid, []).append(info)
        return out


HEADER_KEYS = (
    "PatientID",
    "PatientAge",
    "PatientSex",
    "StudyDate",
    "StudyDescription",
    "SeriesDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "KVP",
    "XRayTubeCurrent",
    "SliceThickness",
    "ContrastBolusAgent",
    "CTDIvol",
    "Rows",
    "Columns",
)


def _header_values(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in HEADER_KEYS:
        v = ds.get(key)
        if v is None or v == "":
            continue
        out[key] = str(v) if not isinstance(v, int | float) else v
    return out


def classify_slice(ds: Dataset) -> str | None:
    """Why a header is not an axial CT image slice, or None when it is one.

    Args:
        ds: a DICOM header (pixels not needed).

    Returns:
        A human-readable reason naming the offending value, or None.
    """
    modality = str(ds.get("Modality", "")).upper()
    if modality != "CT":
        return f"modality {modality or '(empty)'} is not CT"
    sop = str(ds.get("SOPClassUID", ""))
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return f"secondary capture (SOPClassUID {sop}), not a CT image"
    if sop and sop not in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
        return f"SOPClassUID {sop} is not CT Image Storage"
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        joined = "/".join(image_type)
        return f"localizer image (ImageType {joined})"
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(key) is None:
            return f"missing {key}"
    if not ds.get("StudyInstanceUID") or not ds.get("SeriesInstanceUID"):
        return "missing StudyInstanceUID/SeriesInstanceUID"
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    if abs(normal[2]) < AXIAL_COSINE:
        return f"not an axial slice (ImageOrientationPatient {list(np.round(iop, 3))})"
    return None


def iter_files(root: str | Path) -> Iterable[Path]:
    """All regular files below ``root`` (any nesting, any extension), hidden ones excluded."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan_dicom_tree(root: str | Path, *, phi: bool = False) -> ScanResult:
    """Find the axial CT series below ``root`` from headers only.

    Args:
        root: a folder (any nesting) or a single file.
        phi: also look for identifying attributes (:mod:`lungvl_model.data.phi`) in every header read,
            the skipped DICOM files' included, while it is in memory (each file is read once).

    Returns:
        The series found and the files skipped, each with its reason (and ``phi`` when asked).
    """
    result = ScanResult()
    if phi:
        from lungvl_model.data.phi import PHIScan

        result.phi = PHIScan()
    for path in iter_files(root):
        if path.suffix.lower() in (".xml", ".json", ".jsonl", ".csv", ".txt", ".toml", ".gz", ".nii"):
            continue  # annotation and metadata files that live beside DICOM in exports
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            result.skipped.append(SkippedFile(path, "not a DICOM file (no DICM preamble)"))
            continue
        except Exception as e:  # noqa: BLE001 - any parser failure makes the file unusable
            result.skipped.append(SkippedFile(path, f"unreadable DICOM ({type(e).__name__}: {e})"))
            continue
        if result.phi is not None:
            result.phi.add(ds, path)
        try:
            reason = classify_slice(ds)
        except Exception as e:  # noqa: BLE001 - malformed geometry values
            reason = f"malformed header ({type(e).__name__}: {e})"
        if reason is not None:
            result.skipped.append(SkippedFile(path, reason, str(ds.get("StudyInstanceUID", ""))))
            continue
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        info = result.series.get(key)
        if info is None:
            info = result.series[key] = SeriesInfo(key[0], key[1], header=_header_values(ds))
        info.files.append(path)
    return result


def _slice_geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
    return iop, ipp, ps


def check_positions(positions: np.ndarray, normal: np.ndarray, series_uid: str) -> tuple[float, list[str]]:
    """Check sorted slice positions for duplicates, gaps, uneven spacing and gantry tilt.

    Args:
        positions: ``(N, 3)`` ImagePositionPatient of the slices, sorted along ``normal``.
        normal: ``(3,)`` unit slice normal.
        series_uid: for messages.

    Returns:
        ``(slice spacing in mm, warnings)``.

    Raises:
        SeriesError: fewer than 2 slices, duplicate positions, missing slices, uneven spacing or tilt.
    """
    n = len(positions)
    if n < 2:
        raise SeriesError(f"series {series_uid}: {n} axial slice(s), need at least 2 for a volume")
    along = positions @ normal
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise SeriesError(f"series {series_uid}: duplicate slice position {along[i]:.2f} mm (slices {i} and {i + 1})")
    spacing = float(np.median(gaps))
    big = np.where(gaps > 1.5 * spacing)[0]
    if len(big):
        i = int(big[0])
        missing = int(round(gaps[i] / spacing)) - 1
        raise SeriesError(
            f"series {series_uid}: {len(big)} gap(s) in the slice positions; first between "
            f"{along[i]:.2f} and {along[i + 1]:.2f} mm ({gaps[i]:.2f} mm vs {spacing:.2f} mm spacing, "
            f"about {missing} missing slice(s))"
        )
    dev = np.abs(gaps - spacing) / spacing
    if np.max(dev) > SPACING_TOLERANCE:
        i = int(np.argmax(dev))
        raise SeriesError(
            f"series {series_uid}: uneven slice spacing, gap {gaps[i]:.3f} mm at slice {i} vs median "
            f"{spacing:.3f} mm (tolerance {SPACING_TOLERANCE:.0%})"
        )
    step = positions[-1] - positions[0]
    cosang = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-9)
    angle = float(np.degrees(np.arccos(min(1.0, cosang))))
    if angle > TILT_TOLERANCE_DEG:
        raise SeriesError(
            f"series {series_uid}: gantry tilt, slice positions step {angle:.1f} degrees off the "
            f"slice normal (tolerance {TILT_TOLERANCE_DEG} degrees)"
        )
    return spacing, []


def read_series(files: Iterable[str | Path]) -> CTVolume:
    """Load one CT series (the slices of one SeriesInstanceUID) as a volume in HU.

    Args:
        files: the series' slice files, in any order.

    Returns:
        The volume, ``hu`` of shape ``(Z, Y, X)``, ``z`` increasing along the slice normal.

    Raises:
        SeriesError: mixed series, inconsistent matrix/orientation/pixel spacing, geometry problems
            (see :func:`check_positions`) or unreadable pixel data; the message names the value.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise SeriesError("no files given for the series")
    slices: list[Dataset] = []
    for p in paths:
        try:
            slices.append(pydicom.dcmread(p))
        except Exception as e:  # noqa: BLE001
            raise SeriesError(f"{p}: unreadable DICOM ({type(e).__name__}: {e})") from e
    first = slices[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    iop0, _, ps0 = _slice_geometry(first)
    shape0 = (int(first.Rows), int(first.Columns))
    for p, ds in zip(paths, slices, strict=True):
        if str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise SeriesError(f"{p}: belongs to series {ds.get('SeriesInstanceUID')}, not {series_uid}")
        iop, _, ps = _slice_geometry(ds)
        if np.max(np.abs(iop - iop0)) > 1e-3:
            raise SeriesError(
                f"series {series_uid}: {p.name} has ImageOrientationPatient {list(iop)}, first slice has {list(iop0)}"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise SeriesError(f"series {series_uid}: {p.name} is {ds.Rows}x{ds.Columns}, first slice {shape0}")
        if np.max(np.abs(ps - ps0)) > 1e-4:
            raise SeriesError(f"series {series_uid}: {p.name} has PixelSpacing {list(ps)}, first {list(ps0)}")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    positions = np.stack([_slice_geometry(ds)[1] for ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    slices = [slices[i] for i in order]
    sz, warnings = check_positions(positions, normal, series_uid)
    hu = np.empty((len(slices), *shape0), dtype=np.float32)
    for k, ds in enumerate(slices):
        try:
            arr = ds.pixel_array
        except Exception as e:  # noqa: BLE001
            raise SeriesError(f"series {series_uid}: pixel data of slice {k} unreadable ({e})") from e
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        hu[k] = arr.astype(np.float32) * slope + intercept
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    meta = _header_values(first)
    meta["n_files"] = len(paths)
    return CTVolume(
        hu=hu,
        spacing=(sz, float(ps0[0]), float(ps0[1])),
        origin=tuple(positions[0]),
        direction=direction,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=series_uid,
        meta=meta,
        issues=warnings,
    )


def read_series_dir(folder: str | Path) -> CTVolume:
    """Read the single CT series below ``folder``.

    Raises:
        SeriesError: when the folder holds no usable series or more than one.
    """
    scan = scan_dicom_tree(folder)
    if len(scan.series) != 1:
        reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in scan.skipped[:3])
        raise SeriesError(
            f"{folder}: expected one axial CT series, found {len(scan.series)}"
            + (f" (skipped: {reasons})" if reasons else "")
        )
    return read_series(next(iter(scan.series.values())).files)


def write_ct_series(volume: CTVolume, out_dir: str | Path, *, tags: Mapping[str, Any] | None = None) -> list[Path]:
    """Write a volume as a CT Image Storage series, one file per slice.

    Pixel values are stored as int16 with RescaleSlope 1 and RescaleIntercept −1024, so HU in
    [−31744, 33791] round-trip to the nearest integer. UIDs of the instances are derived from the
    series UID, so writing the same volume twice gives identical files.

    Args:
        volume: the volume; its ``study_uid``/``series_uid`` are used (generated when empty).
        out_dir: folder to write ``IM_00001.dcm``... into (created).
        tags: DICOM keywords set on every slice (PatientID, StudyDate, ConvolutionKernel...).

    Returns:
        The written paths, in slice order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = volume.study_uid or generate_uid()
    series_uid = volume.series_uid or generate_uid()
    row_dir, col_dir, normal = (volume.direction[:, i] for i in range(3))
    sz, sy, sx = volume.spacing
    origin = np.asarray(volume.origin)
    stored = np.clip(np.rint(volume.hu + 1024.0), -32768, 32767).astype(np.int16)
    tags = dict(tags or {})
    frame_uid = tags.pop("FrameOfReferenceUID", None) or generate_uid(entropy_srcs=[study_uid, "frame"])
    paths = []
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        pos = origin + k * sz * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.SliceLocation = f"{float(pos @ normal):.4f}"
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.SliceThickness = f"{sz:.4g}"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.PixelData = stored[k].tobytes()
        path = out / f"IM_{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
