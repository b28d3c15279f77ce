"""Labelled nodules for the nodule risk head: pooled features, true and measured inputs.

Examples come from labels.csv nodule rows of labelled site directories. Each nodule's label-map mask
(``annotations/<series>.nii.gz``, value = ``nodule_id``), mapped to the model grid, is treated as a
perfect triage candidate and refined on the native CT exactly as inference does
(:func:`~lungvl_model.inference.findings.refine_candidate`). The refined mask gives the pooling region
and the margin profile (:func:`~lungvl_model.models.nodule_risk.nodule_feature_vector`) and, measured
with the inference code (:func:`~lungvl_model.inference.findings.measure_finding`, the lobe and
juxtapleural heuristics of :mod:`~lungvl_model.inference.anatomy`, emphysema from LAA-950, age/sex from
the DICOM header, spiculation unknown), the *measured* inputs inference will see. The *true* inputs are
the row's own values and the study row's patient fields.

The encoder comes alone from a checkpoint (:func:`load_frozen_encoder`), frozen, so collecting does
not depend on the decoder or the other heads of the checkpoint's architecture.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungvl_model.clinical.brock import is_upper_lobe
from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.dicom_io import SeriesError, read_series
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.preprocess import PreprocessConfig, preprocess
from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.anatomy import (
    EMPHYSEMA_LAA,
    emphysema_index,
    is_juxtapleural,
    lobe_from_position,
    lung_mask,
)
from lungvl_model.inference.explain import patient_info
from lungvl_model.inference.findings import GridMap, measure_finding, refine_candidate
from lungvl_model.models.config import LungVLConfig
from lungvl_model.models.nodule_features import NoduleInputs, inputs_from_finding, region_from_source_mask
from lungvl_model.models.nodule_risk import NoduleRiskConfig, nodule_feature_vector
from lungvl_model.models.vision import VisionEncoder

__all__ = [
    "NoduleExample",
    "RiskData",
    "StudyRecord",
    "collect_examples",
    "load_frozen_encoder",
    "true_inputs",
]


@dataclass
class NoduleExample:
    """One labelled nodule.

    Attributes:
        study_uid: its study.
        site: site directory name.
        nodule_id: value in the label map.
        malignant: 0/1 ground truth.
        features: ``(feature_dim,)`` pooled encoder features.
        true_inputs: inputs from labels.csv.
        measured_inputs: inputs measured on the CT from its mask (None when measuring failed).
        label_brock: labels.csv ``brock_probability`` (NaN when empty).
    """

    study_uid: str
    site: str
    nodule_id: int
    malignant: int
    features: np.ndarray
    true_inputs: NoduleInputs
    measured_inputs: NoduleInputs | None
    label_brock: float = math.nan


@dataclass
class StudyRecord:
    """A labelled study (with or without nodules) for per-study metrics."""

    study_uid: str
    site: str
    malignant: float


@dataclass
class RiskData:
    """Everything :func:`collect_examples` gathered."""

    examples: list[NoduleExample] = field(default_factory=list)
    studies: list[StudyRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _f(row: dict[str, str] | None, key: str) -> float:
    try:
        return float((row or {}).get(key, "") or "nan")
    except ValueError:
        return math.nan


def _flag(row: dict[str, str] | None, key: str) -> bool | None:
    v = _f(row, key)
    return None if math.isnan(v) else bool(v)


def true_inputs(row: dict[str, str], study_row: dict[str, str] | None, n_nodules: int) -> NoduleInputs:
    """Inputs of a labels.csv nodule row and its study row (unknown cells → None).

    Raises:
        ValueError: when the row lacks a size, a type or a lobe.
    """
    longest, mean = _f(row, "longest_diameter_mm"), _f(row, "mean_diameter_mm")
    if math.isnan(mean):
        mean = longest
    if math.isnan(longest):
        longest = mean
    if not (mean > 0 and longest > 0) or not row.get("type") or not row.get("lobe"):
        raise ValueError(f"nodule {row.get('nodule_id')}: needs a diameter, type and lobe")
    count = _f(study_row, "nodule_count")
    age = _f(study_row, "age")
    sex = (study_row or {}).get("sex", "")
    spic = _f(row, "spiculation")
    return NoduleInputs(
        longest_diameter_mm=longest,
        mean_diameter_mm=mean,
        type=row["type"],
        upper_lobe=is_upper_lobe(row["lobe"]),
        nodule_count=max(int(count) if not math.isnan(count) else n_nodules, 1),
        calcified=bool(_flag(row, "calcification")),
        juxtapleural=bool(_flag(row, "juxtapleural")),
        spiculation=None if math.isnan(spic) else spic,
        age=None if math.isnan(age) else age,
        female=None if sex not in ("F", "M") else sex == "F",
        emphysema=_flag(study_row, "emphysema"),
        family_history=_flag(study_row, "family_history"),
    )


def _crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    return mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], (int(lo[0]), int(lo[1]), int(lo[2]))


def load_frozen_encoder(directory: str | Path) -> tuple[VisionEncoder, LungVLConfig, dict[str, Any]]:
    """The vision encoder of a LungVL checkpoint, alone, frozen and in eval mode.

    Only the ``vision.*`` weights are read, so the risk stage does not depend on the decoder or the
    other heads of the checkpoint's architecture.

    Args:
        directory: a checkpoint directory (:func:`~lungvl_model.training.checkpoint.save_checkpoint`).

    Returns:
        ``(encoder, model config, meta)``.

    Raises:
        CorruptStateError: naming the file that is missing, damaged, or does not fit.
    """
    d = Path(directory)
    for name in ("model.pt", "config.json", "meta.json"):
        if not (d / name).is_file():
            raise CorruptStateError(f"{d}: not a lungvl checkpoint ({name} missing)")
    docs = {}
    for name in ("meta.json", "config.json"):
        try:
            docs[name] = json.loads((d / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptStateError(f"{d / name}: damaged ({e})") from None
    meta = docs["meta.json"]
    digest = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    if isinstance(meta, dict) and meta.get("model_sha256") not in (None, digest):
        raise CorruptStateError(f"{d / 'model.pt'}: sha256 {digest[:12]}… differs from meta.json")
    try:
        cfg = LungVLConfig.from_dict(docs["config.json"])
        state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        encoder = VisionEncoder(cfg.vision)
        encoder.load_state_dict({k[len("vision.") :]: v for k, v in state.items() if k.startswith("vision.")})
    except Exception as e:  # noqa: BLE001 - config errors, torch's unpickling and shape errors
        raise CorruptStateError(f"{d}: no usable vision encoder ({type(e).__name__}: {str(e)[:200]})") from None
    encoder.eval().requires_grad_(False)
    return encoder, cfg, meta if isinstance(meta, dict) else {}


def collect_examples(
    encoder: VisionEncoder,
    input_config: PreprocessConfig,
    site_dirs: Sequence[str | Path],
    *,
    config: NoduleRiskConfig | None = None,
    measured: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> RiskData:
    """Pool encoder features and gather inputs for every labelled nodule of the sites.

    Args:
        encoder: the (frozen) vision encoder, used in eval mode without gradients.
        input_config: the checkpoint's preprocessing (``LungVLConfig.input``).
        site_dirs: labelled site directories (labels.csv + annotations).
        config: head config (how many scales, the neighbourhood).
        measured: also measure each nodule on the CT (the inference inputs).
        progress: ``progress(done, total, study_uid)``.

    Returns:
        The examples, the labelled studies, and why some were skipped.
    """
    cfg = config or NoduleRiskConfig(feature_channels=encoder.out_channels)
    encoder.eval()
    device = next(encoder.parameters()).device
    todo = []
    for d in site_dirs:
        cat = build_catalogue(d)
        todo += [(Path(d).name, e) for e in cat.usable]
    out = RiskData()
    for i, (site, entry) in enumerate(todo):
        if progress:
            progress(i + 1, len(todo), entry.study_uid)
        rows = [r for r in entry.nodule_labels if r.get("nodule_id") and r.get("malignant") in ("0", "1")]
        study_mal = _f(entry.study_labels, "malignant")
        if math.isnan(study_mal) and rows:
            study_mal = float(max(int(r["malignant"]) for r in rows))
        if math.isnan(study_mal):
            out.skipped.append(f"{site}/{entry.study_uid}: no malignancy label")
            continue
        if rows and entry.mask is None:
            out.skipped.append(f"{site}/{entry.study_uid}: nodule rows but no label map")
            continue
        out.studies.append(StudyRecord(entry.study_uid, site, study_mal))
        if not rows:
            continue
        assert entry.series is not None and entry.mask is not None
        try:
            vol = read_series(entry.series.files)
            labels = read_label_nifti(entry.mask, vol)
        except (SeriesError, OSError, ValueError) as e:
            out.skipped.append(f"{site}/{entry.study_uid}: cannot read ({e})")
            out.studies.pop()
            continue
        pre = preprocess(vol, input_config)
        grid = GridMap.from_origin(vol, pre.spacing_mm, pre.origin_zyx_mm)
        with torch.no_grad():
            vis = encoder(torch.from_numpy(pre.image)[None, None].to(device))
        scales = [s[0].float().cpu() for s in vis.scales[: cfg.feature_scales]]
        lungs = lung_mask(vol.hu) if measured else None
        emph = None
        if lungs is not None:
            e_idx = emphysema_index(vol.hu, lungs)
            emph = None if math.isnan(e_idx) else e_idx > EMPHYSEMA_LAA
        present = [r for r in rows if np.any(labels == int(float(r["nodule_id"])))]
        for r in rows:
            nid = int(float(r["nodule_id"]))
            native = labels == nid
            if not native.any():
                out.skipped.append(f"{site}/{entry.study_uid}: nodule {nid} not in the label map")
                continue
            try:
                t_in = true_inputs(r, entry.study_labels, len(rows))
            except ValueError as e:
                out.skipped.append(f"{site}/{entry.study_uid}: {e}")
                continue
            crop, offset = _crop(native)
            cand, _ = region_from_source_mask(crop, offset, grid, pre.image.shape)
            # inference's view of the nodule: the label as a perfect triage candidate, refined on the CT
            refined = refine_candidate(vol, cand, grid) if cand.any() else None
            if refined is not None:
                crop, offset = refined
            feats = nodule_feature_vector(cfg, scales, grid, vol.hu, vol.spacing, crop, offset)
            m_in = None
            if lungs is not None and refined is not None:
                f = measure_finding(vol, crop, offset, 1.0)
                f.lobe = lobe_from_position(vol, np.asarray(f.centroid_zyx), lungs)
                f.juxtapleural = is_juxtapleural(f.full_mask(vol.shape), lungs, vol.spacing)
                m_in = inputs_from_finding(
                    f, nodule_count=len(present), patient=patient_info(vol), emphysema=emph, spiculation=None
                )
            out.examples.append(
                NoduleExample(
                    entry.study_uid,
                    site,
                    nid,
                    int(r["malignant"]),
                    feats,
                    t_in,
                    m_in,
                    _f(r, "brock_probability"),
                )
            )
    return out
