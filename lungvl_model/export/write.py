"""Write an explanation's DICOM SEG and SR beside its report (``seg.dcm``, ``sr.dcm``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from lungvl_model.atomic_file import replace_atomically
from lungvl_model.data.volume import CTVolume
from lungvl_model.export.dicom_seg import build_seg
from lungvl_model.export.dicom_sr import build_sr
from lungvl_model.export.source import source_headers
from lungvl_model.inference.explain import Explanation

SEG_NAME = "seg.dcm"
SR_NAME = "sr.dcm"


@dataclass(frozen=True)
class DicomExport:
    """What :func:`write_dicom` wrote.

    Attributes:
        sr: the SR file.
        seg: the SEG file; None when no finding is kept (no SEG is written, an old one is removed).
        sr_uid: the SR's SOPInstanceUID.
        seg_uid: the SEG's SOPInstanceUID, or None.
    """

    sr: Path
    seg: Path | None
    sr_uid: str
    seg_uid: str | None

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready summary (report.json ``dicom``); paths relative to ``relative_to`` when given."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            return str(p.relative_to(relative_to)) if relative_to is not None else str(p)

        return {
            "seg": rel(self.seg),
            "sr": rel(self.sr),
            "seg_sop_instance_uid": self.seg_uid,
            "sr_sop_instance_uid": self.sr_uid,
        }


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Write a DICOM file atomically (temporary file in the same folder, then ``os.replace``)."""
    return replace_atomically(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def build_dicom(
    exp: Explanation, volume: CTVolume, files: Iterable[str | Path], report: Mapping[str, Any] | None = None
) -> tuple[Dataset | None, Dataset]:
    """The SEG (None without findings) and SR of ``exp``, from the source series' files.

    Args:
        exp: the explanation.
        volume: the CT it was computed on.
        files: the CT series' slice files (their headers are re-read, no pixel data).
        report: report.json's dict (default ``exp.to_dict()``); the SR's values come from it.
    """
    sources = source_headers(files, volume)
    seg = build_seg(exp, volume, sources)
    sr = build_sr(exp.to_dict() if report is None else report, sources, seg)
    return seg, sr


def write_dicom(
    exp: Explanation,
    volume: CTVolume,
    files: Iterable[str | Path],
    out_dir: str | Path,
    report: Mapping[str, Any] | None = None,
    *,
    stem: str = "",
) -> DicomExport:
    """Build and write ``<stem>seg.dcm`` and ``<stem>sr.dcm`` into ``out_dir``.

    Args:
        exp: the explanation.
        volume: the CT it was computed on.
        files: the CT series' slice files.
        out_dir: output folder (created).
        report: report.json's dict (default ``exp.to_dict()``).
        stem: file name prefix (e.g. ``"<study_uid>_"`` when several studies share a folder).

    Returns:
        The files written.
    """
    out = Path(out_dir)
    seg, sr = build_dicom(exp, volume, files, report)
    seg_path = out / f"{stem}{SEG_NAME}"
    if seg is not None:
        save_dataset(seg, seg_path)
    else:
        seg_path.unlink(missing_ok=True)  # a SEG from an earlier run would contradict this SR
    sr_path = save_dataset(sr, out / f"{stem}{SR_NAME}")
    return DicomExport(
        sr=sr_path,
        seg=seg_path if seg is not None else None,
        sr_uid=str(sr.SOPInstanceUID),
        seg_uid=str(seg.SOPInstanceUID) if seg is not None else None,
    )
