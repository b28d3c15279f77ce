"""A DICOM Segmentation (SEG) of an explanation's kept findings, built with highdicom.

One BINARY segment per kept finding (segment ``k`` is "Nodule k", the finding with ``index == k``),
coded as a morphologically abnormal structure / nodule in the lung. The frames lie on the source CT's
slices (same position, orientation and pixel spacing) and each frame references the slice it was
derived from; only frames that hold part of a nodule are stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lungvl_model.data.volume import CTVolume
from lungvl_model.export import codes as c
from lungvl_model.inference.explain import Explanation
from lungvl_model.inference.findings import Finding
from lungvl_model.version import software_version

SEG_SERIES_NUMBER = 901


def export_seed(report: Mapping[str, Any], kind: str) -> str:
    """A digest of the report (report.json's dict) for deterministic UIDs of the exported objects.

    The same explanation gives the same UIDs (writing twice replaces, never duplicates); any change of a
    finding, a sentence or the model gives new ones.
    """
    text = json.dumps(report, sort_keys=True, default=str)
    return hashlib.sha256(f"{kind}\n{text}".encode()).hexdigest()


def device_serial(report: Mapping[str, Any]) -> str:
    """The model's identity as the device serial number: the checkpoint's sha256 prefix, else "unknown"."""
    sha = str((report.get("provenance") or {}).get("model_sha256") or "")
    return sha[:16] if sha else "unknown"


def _masks(findings: Sequence[Finding], shape: tuple[int, int, int]) -> np.ndarray:
    """Segment array: label map ``(Z, Y, X)`` when the masks do not overlap, else stacked ``(Z, Y, X, K)``."""
    labels = np.zeros(shape, dtype=np.uint8)
    overlap = False
    for k, f in enumerate(findings, start=1):
        m = f.full_mask(shape)
        if not m.any():
            raise ValueError(f"finding {f.index} has an empty mask: nothing to put in its SEG segment")
        overlap |= bool((labels[m] > 0).any())
        labels[m] = k
    if not overlap:
        return labels
    stacked = np.zeros((*shape, len(findings)), dtype=np.uint8)
    for k, f in enumerate(findings):
        stacked[..., k] = f.full_mask(shape)
    return stacked


def segment_descriptions(findings: Sequence[Finding], seed: str) -> list[hd.seg.SegmentDescription]:
    """One segment description per finding: "Nodule k", lung nodule codes, tracking UID and id."""
    out = []
    for k, f in enumerate(findings, start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=k,
                segment_label=f"Nodule {f.index}",
                segmented_property_category=c.NODULE_CATEGORY,
                segmented_property_type=c.NODULE_TYPE,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=c.seg_algorithm(),
                tracking_uid=generate_uid(entropy_srcs=[seed, "segment", str(f.index)]),
                tracking_id=f"Nodule {f.index}",
                anatomic_regions=[c.LUNG],
            )
        )
    return out


def build_seg(exp: Explanation, volume: CTVolume, sources: Sequence[Dataset]) -> Dataset | None:
    """The DICOM SEG of ``exp``'s kept findings on ``volume``'s source series.

    Args:
        exp: the explanation; its findings carry their native-resolution masks.
        volume: the CT the findings were measured on.
        sources: the source slices' headers in ``volume``'s slice order
            (:func:`~lungvl_model.export.source.source_headers`).

    Returns:
        The Segmentation dataset, or None when no finding is kept (a SEG needs at least one segment).

    Raises:
        ValueError: the findings are not numbered 1..k, a mask is missing or empty, or the headers do
            not match the volume (one per slice).
    """
    findings = list(exp.findings)
    if not findings:
        return None
    indices = [f.index for f in findings]
    if indices != list(range(1, len(findings) + 1)):
        raise ValueError(f"findings must be numbered 1..{len(findings)} in order, got {indices}")
    if len(sources) != volume.shape[0]:
        raise ValueError(f"{len(sources)} source header(s) for a volume of {volume.shape[0]} slices")
    report = exp.to_dict()
    seed = export_seed(report, "seg")
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=_masks(findings, volume.shape),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(findings, seed),
        series_instance_uid=generate_uid(entropy_srcs=[seed, "series"]),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[seed, "instance"]),
        instance_number=1,
        manufacturer=c.MANUFACTURER,
        manufacturer_model_name=c.MODEL_NAME,
        software_versions=software_version(),
        device_serial_number=device_serial(report),
        content_label="NODULES",
        content_description="lungvl nodule segmentation (research use)",
        series_description="lungvl nodules SEG",
    )
    return seg
