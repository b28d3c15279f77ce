"""Per-nodule inputs of the nodule risk head: pooled fine features and an encoded Brock-input vector.

* :func:`pool_nodule_features`: masked average and masked max of the encoder's finest feature maps
  (``VisionOutput.scales[:2]``) inside a nodule. The region is the nodule's native mask mapped onto the
  model grid (:func:`region_from_source_mask`, through :class:`~lungvl_model.inference.findings.GridMap`)
  or a ball from its centroid and diameter (:func:`region_from_centroid`), always united with the voxel
  neighbourhood of its centre, so a nodule smaller than a model voxel still gets features.
* :func:`margin_profile`: tissue fraction in distance shells around the native mask (spicules and
  lobulation are finer than the encoder's grid).
* :func:`brock_vector`: the measured Brock inputs (and the patient's where known, with missing
  indicators), normalised; :func:`brock_logit_of`: the Brock model 2b logit of the same inputs.

Nothing here reads the generated text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lungvl_model.clinical.brock import BrockInputs, brock_logit

__all__ = [
    "BROCK_DIM",
    "BROCK_FEATURES",
    "NODULE_TYPES",
    "MeasuredNodule",
    "NoduleInputs",
    "brock_logit_of",
    "brock_vector",
    "inputs_from_finding",
    "margin_profile",
    "pool_nodule_features",
    "region_from_centroid",
    "region_from_source_mask",
]

NODULE_TYPES: tuple[str, ...] = ("solid", "part_solid", "non_solid")
#: Names of the :func:`brock_vector` entries, in order.
BROCK_FEATURES: tuple[str, ...] = (
    "log2_mean_diameter_over_6mm",
    "solid",
    "part_solid",
    "non_solid",
    "spiculation",
    "spiculation_missing",
    "upper_lobe",
    "count_centred",
    "calcified",
    "juxtapleural",
    "age_centred",
    "age_missing",
    "female",
    "sex_missing",
    "emphysema",
    "emphysema_missing",
    "family_history",
    "family_history_missing",
)
BROCK_DIM = len(BROCK_FEATURES)


@dataclass(frozen=True)
class NoduleInputs:
    """Clinical inputs of one nodule (measured or labelled) and of its patient.

    Attributes:
        longest_diameter_mm: longest diameter (Brock's size), > 0.
        mean_diameter_mm: mean diameter (Lung-RADS size, the head's size feature), > 0.
        type: ``solid``, ``part_solid`` or ``non_solid``.
        upper_lobe: in RUL or LUL.
        nodule_count: nodules in the study (>= 1).
        calcified: benign calcification pattern.
        juxtapleural: touches the pleura.
        spiculation: spiculated margin as 0/1 or a probability; None when unknown (e.g. not measured).
        age: years, None when unknown.
        female: sex, None when unknown.
        emphysema: emphysema on CT, None when unknown.
        family_history: family history of lung cancer, None when unknown.
    """

    longest_diameter_mm: float
    mean_diameter_mm: float
    type: str
    upper_lobe: bool
    nodule_count: int
    calcified: bool = False
    juxtapleural: bool = False
    spiculation: float | None = None
    age: float | None = None
    female: bool | None = None
    emphysema: bool | None = None
    family_history: bool | None = None

    def __post_init__(self) -> None:
        """Validate.

        Raises:
            ValueError: naming the field and its value.
        """
        for name in ("longest_diameter_mm", "mean_diameter_mm"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"NoduleInputs.{name} must be a finite number > 0, got {v!r}")
        if self.type not in NODULE_TYPES:
            raise ValueError(f"NoduleInputs.type must be one of {NODULE_TYPES}, got {self.type!r}")
        if isinstance(self.nodule_count, bool) or not isinstance(self.nodule_count, int) or self.nodule_count < 1:
            raise ValueError(f"NoduleInputs.nodule_count must be an int >= 1, got {self.nodule_count!r}")
        if self.spiculation is not None and not 0.0 <= float(self.spiculation) <= 1.0:
            raise ValueError(f"NoduleInputs.spiculation must be in [0, 1] or None, got {self.spiculation!r}")
        if self.age is not None and not (math.isfinite(self.age) and 0.0 <= self.age <= 120.0):
            raise ValueError(f"NoduleInputs.age must be in [0, 120] years or None, got {self.age!r}")


def brock_vector(x: NoduleInputs) -> np.ndarray:
    """Encode the clinical inputs as the head's Brock-input vector.

    Normalisation (each entry ~ within [-2, 2]): size ``log2(mean_diameter_mm / 6)`` (0 at 6 mm, +1 per
    doubling); type one-hot; spiculation as given (0 when unknown) + a missing indicator; upper lobe;
    count ``clip((n - 4) / 4, -1, 2)`` (Brock's centre 4); calcified; juxtapleural; age
    ``(age - 62) / 10`` (Brock's centre; 0 when unknown) + missing; female (0 when unknown) + missing;
    emphysema + missing; family history + missing. Names in :data:`BROCK_FEATURES`.

    Args:
        x: the inputs.

    Returns:
        ``(BROCK_DIM,)`` float32.
    """

    def known(v: float | bool | None) -> tuple[float, float]:
        return (0.0, 1.0) if v is None else (float(v), 0.0)

    spic, spic_m = known(x.spiculation)
    fem, fem_m = known(x.female)
    emph, emph_m = known(x.emphysema)
    fam, fam_m = known(x.family_history)
    age_m = 1.0 if x.age is None else 0.0
    age = 0.0 if x.age is None else (x.age - 62.0) / 10.0
    v = [
        math.log2(x.mean_diameter_mm / 6.0),
        *(float(x.type == t) for t in NODULE_TYPES),
        spic,
        spic_m,
        float(x.upper_lobe),
        float(np.clip((x.nodule_count - 4) / 4.0, -1.0, 2.0)),
        float(x.calcified),
        float(x.juxtapleural),
        age,
        age_m,
        fem,
        fem_m,
        emph,
        emph_m,
        fam,
        fam_m,
    ]
    return np.asarray(v, dtype=np.float32)


def brock_logit_of(x: NoduleInputs) -> float:
    """Brock model 2b logit of the inputs, unknowns at the model's reference values.

    Unknown age → 62 (the centre), sex → male, emphysema/family history → absent, spiculation → absent;
    a spiculation probability counts as spiculated when >= 0.5. Calcification is not a Brock predictor
    (a calcified nodule is scored as its type), which the head can learn to correct.
    """
    return brock_logit(
        BrockInputs(
            age=62.0 if x.age is None else float(x.age),
            female=bool(x.female),
            family_history=bool(x.family_history),
            emphysema=bool(x.emphysema),
            longest_diameter_mm=max(float(x.longest_diameter_mm), 0.5),
            type=x.type,
            upper_lobe=bool(x.upper_lobe),
            nodule_count=int(x.nodule_count),
            spiculation=x.spiculation is not None and float(x.spiculation) >= 0.5,
        )
    )


class MeasuredNodule(Protocol):
    """What :func:`inputs_from_finding` reads (an :class:`~lungvl_model.inference.findings.Finding`)."""

    longest_diameter_mm: float
    mean_diameter_mm: float
    type: str
    lobe: str
    calcified: bool
    juxtapleural: bool


def inputs_from_finding(
    f: MeasuredNodule,
    *,
    nodule_count: int,
    patient: dict[str, Any] | None = None,
    emphysema: bool | None = None,
    spiculation: float | None = None,
) -> NoduleInputs:
    """Inputs of a measured finding (explain/evaluate), the patient's where known.

    Args:
        f: the measured finding.
        nodule_count: findings in the study.
        patient: ``explain.patient_info`` dict; ``age``/``sex`` flagged ``*_assumed`` count as unknown.
        emphysema: emphysema on CT (LAA-950 above threshold), None when not computed.
        spiculation: spiculation if some reader or model gives it, else None (not measured).

    Returns:
        The inputs (sizes floored at 0.5 mm).
    """
    p = patient or {}
    age = None if p.get("age_assumed", "age" not in p) else float(p["age"])
    female = None if p.get("sex_assumed", p.get("sex", "") not in ("F", "M")) else p["sex"] == "F"
    return NoduleInputs(
        longest_diameter_mm=max(float(f.longest_diameter_mm), 0.5),
        mean_diameter_mm=max(float(f.mean_diameter_mm), 0.5),
        type=f.type,
        upper_lobe=f.lobe in ("RUL", "LUL"),
        nodule_count=max(int(nodule_count), 1),
        calcified=bool(f.calcified),
        juxtapleural=bool(f.juxtapleural),
        spiculation=spiculation,
        age=age,
        female=female,
        emphysema=emphysema,
    )


def region_from_source_mask(
    mask: np.ndarray, offset: Sequence[int], grid: Any, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Map a native-resolution nodule mask crop onto the model grid.

    Args:
        mask: ``(dz, dy, dx)`` bool crop on the source CT.
        offset: crop origin ``(z, y, x)`` in source voxels.
        grid: a :class:`~lungvl_model.inference.findings.GridMap` (``src_to_model``).
        shape: model grid ``(D, H, W)``.

    Returns:
        ``(region (D, H, W) bool, centre (3,) float)``: model voxels holding any source voxel of the mask
        (may be empty when the nodule lies outside the model's crop), and the mask centroid in model-grid
        coordinates.
    """
    idx = np.argwhere(np.asarray(mask, bool)) + np.asarray(offset, int)
    region = np.zeros(tuple(int(s) for s in shape), bool)
    if len(idx) == 0:
        raise ValueError("region_from_source_mask: the nodule mask is empty")
    g = grid.src_to_model(idx.astype(float))
    centre = g.mean(axis=0)
    gi = np.rint(g).astype(int)
    inside = np.all((gi >= 0) & (gi < np.asarray(region.shape)), axis=1)
    gi = gi[inside]
    region[gi[:, 0], gi[:, 1], gi[:, 2]] = True
    return region, centre


def region_from_centroid(
    centre_zyx: Sequence[float], diameter_mm: float, spacing_mm: Sequence[float], shape: Sequence[int]
) -> np.ndarray:
    """A ball of ``diameter_mm`` around a model-grid point (when only centroid + size are known).

    Args:
        centre_zyx: centre in model-grid voxel coordinates (``GridMap.src_to_model`` of the source centroid).
        diameter_mm: nodule diameter.
        spacing_mm: model voxel size ``(sz, sy, sx)``.
        shape: model grid ``(D, H, W)``.

    Returns:
        ``(D, H, W)`` bool (possibly empty for a sub-voxel nodule; pooling adds the centre neighbourhood).
    """
    zz, yy, xx = np.meshgrid(*[np.arange(int(n)) for n in shape], indexing="ij")
    d = np.stack([zz, yy, xx], -1) - np.asarray(centre_zyx, float)
    dist_mm = np.linalg.norm(d * np.asarray(spacing_mm, float), axis=-1)
    return np.asarray(dist_mm <= diameter_mm / 2.0)


def pool_nodule_features(
    scales: Sequence[torch.Tensor], region: torch.Tensor, centre_zyx: Sequence[float], neighbourhood: int = 1
) -> torch.Tensor:
    """Masked average + max of each feature map inside a nodule.

    The pooling region on the finest map is ``region`` united with the ``(2r+1)^3`` cube around the
    voxel nearest ``centre_zyx`` (``r = neighbourhood``; clipped at the borders), so it is never empty.
    On a map ``2^i`` times coarser the region is its ``2^i`` max-pool (a coarse voxel is in when any of
    its fine voxels is).

    Args:
        scales: feature maps, finest first, ``scales[i]`` of shape ``(C_i, D/2^i, H/2^i, W/2^i)`` (one
            study, no batch axis), e.g. ``[s[0] for s in VisionOutput.scales[:2]]``.
        region: ``(D, H, W)`` bool nodule region on the finest map's grid.
        centre_zyx: nodule centre in that grid's voxel coordinates.
        neighbourhood: cube half-width ``r`` (0: the centre voxel only).

    Returns:
        ``(sum_i 2 * C_i,)``: for each scale, ``[masked mean (C_i), masked max (C_i)]``.

    Raises:
        ValueError: when a map's spatial shape is not the region's divided by ``2^i``.
    """
    if neighbourhood < 0:
        raise ValueError(f"pool_nodule_features: neighbourhood must be >= 0, got {neighbourhood}")
    shape = tuple(region.shape)
    r = region.to(torch.bool).clone()
    c = [min(max(int(round(float(v))), 0), n - 1) for v, n in zip(centre_zyx, shape, strict=True)]
    lo = [max(v - neighbourhood, 0) for v in c]
    r[lo[0] : c[0] + neighbourhood + 1, lo[1] : c[1] + neighbourhood + 1, lo[2] : c[2] + neighbourhood + 1] = True
    out = []
    for i, fmap in enumerate(scales):
        k = 2**i
        expected = tuple(n // k for n in shape)
        if fmap.ndim != 4 or tuple(fmap.shape[1:]) != expected:
            raise ValueError(
                f"pool_nodule_features: scale {i} must be (C, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"for a region of shape {shape}; received {tuple(fmap.shape)}"
            )
        m = r if k == 1 else F.max_pool3d(r[None, None].float(), k, k)[0, 0] > 0
        m = m.to(fmap.device)
        vals = fmap[:, m]  # (C, n)
        out += [vals.mean(dim=1), vals.amax(dim=1)]
    return torch.cat(out)


def margin_profile(
    hu: np.ndarray,
    mask: np.ndarray,
    offset: Sequence[int],
    spacing: Sequence[float],
    shells_mm: Sequence[float],
    threshold_hu: float = -750.0,
) -> np.ndarray:
    """Native-resolution margin profile: how much soft tissue surrounds the nodule, shell by shell.

    For each shell ``(shells_mm[k], shells_mm[k + 1]]`` of distance (mm) outside the mask, the fraction
    of its voxels above ``threshold_hu`` (the nodule threshold of the inference measurements). Spicules,
    lobulation and attached vessels raise the near shells; a smooth nodule in aerated lung leaves
    them low. The fine, sub-model-voxel detail the 5 mm encoder grid cannot see.

    Args:
        hu: ``(Z, Y, X)`` source CT in HU.
        mask: ``(dz, dy, dx)`` bool nodule mask crop.
        offset: crop origin ``(z, y, x)`` in ``hu``.
        spacing: voxel size ``(sz, sy, sx)`` mm.
        shells_mm: increasing shell edges, e.g. ``(0, 2, 4, 8)``.
        threshold_hu: HU above which a voxel counts as tissue.

    Returns:
        ``(len(shells_mm) - 1,)`` float32 fractions in [0, 1] (0 for a shell with no voxel in the CT).
    """
    if len(shells_mm) < 2:
        return np.zeros(0, np.float32)
    sp = np.asarray(spacing, float)
    pad = np.ceil(float(shells_mm[-1]) / sp).astype(int) + 1
    lo = np.maximum(np.asarray(offset, int) - pad, 0)
    hi = np.minimum(np.asarray(offset, int) + np.asarray(mask.shape) + pad, hu.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    m = np.zeros(tuple(int(b - a) for a, b in zip(lo, hi, strict=True)), bool)
    o = np.asarray(offset, int) - lo
    m[o[0] : o[0] + mask.shape[0], o[1] : o[1] + mask.shape[1], o[2] : o[2] + mask.shape[2]] = mask
    dist = ndimage.distance_transform_edt(~m, sampling=sp)
    tissue = hu[box] > threshold_hu
    out = []
    for a, b in zip(shells_mm[:-1], shells_mm[1:], strict=True):
        shell = (dist > a) & (dist <= b)
        out.append(float(tissue[shell].mean()) if shell.any() else 0.0)
    return np.asarray(out, np.float32)
