"""The cascade's fine stage at inference: a CT onto the detector's grid, sliding-window detection, candidates.

:func:`to_fine_grid` crops the CT to its lungs (plus a margin) and resamples it to the detector's
isotropic grid (linear, Gaussian pre-filter when downsampling); :func:`detect` runs
:class:`~lungvl_model.models.fine_detector.FineDetector` over it with MONAI's sliding-window inference
(Gaussian-weighted overlapping patches of the training size); :func:`fine_candidates` turns the
probability map into candidate components, restricted to the lungs' envelope and ranked by their
maximum probability. Each candidate then goes through the same native-resolution refinement,
measurement and candidate filter as a coarse one (:func:`~lungvl_model.inference.explain.analyse_candidates`).

The mapping between grids is :class:`~lungvl_model.inference.findings.GridMap`: detector voxel ``g`` is
source voxel ``(g + start) * spacing / src_spacing`` with ``start = crop_offset * src_spacing / spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from lungvl_model.data.volume import CTVolume
from lungvl_model.inference.findings import GridMap
from lungvl_model.models.fine_detector import FineDetector

#: Margin (mm) around the lungs' bounding box that the detector sees (juxtapleural nodules, the pleura).
CROP_MARGIN_MM = 10.0
#: Candidates are kept within this distance (mm) of the lung mask (a juxtapleural nodule is not inside it).
LUNG_ENVELOPE_MM = 6.0
#: How far (mm) the native-resolution refinement may grow a fine candidate (the coarse pass's voxel). The
#: detector's ``> 0.5`` component lies inside the nodule's partial-volume rim: with the default margin of one
#: 2 mm voxel, LIDC-IDRI-0001's nodule was refined to 3,828 mm3 (0.49x the readers' consensus; 5,603 mm3
#: from the coarse candidate). The refinement's own reach and opening still keep vessels out.
REFINE_MARGIN_MM = 5.0


@dataclass(frozen=True)
class FineGrid:
    """A CT on the detector's grid.

    Attributes:
        hu: ``(D, H, W)`` float32 HU, cropped to the lungs' box and resampled.
        lungs: ``(D, H, W)`` bool lung mask on the same grid.
        grid: detector voxel ↔ source voxel mapping.
        offset: the crop's first source voxel ``(z, y, x)``.
    """

    hu: np.ndarray
    lungs: np.ndarray
    grid: GridMap
    offset: tuple[int, int, int]


def resample_to(
    arr: np.ndarray, src: tuple[float, float, float], dst: float, order: int = 1, cval: float = -1000.0
) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` array to isotropic ``dst`` mm voxels, voxel 0 on voxel 0.

    Output voxel ``o`` samples source index ``o * dst / src`` (the :class:`GridMap` convention). When
    an axis is downsampled (``dst > src``), a Gaussian of ``sigma = (dst / src - 1) / 2`` voxels
    anti-aliases it first (as :func:`~lungvl_model.data.preprocess.preprocess` does).

    Args:
        arr: the source array.
        src: its voxel size (mm).
        dst: the target voxel size (mm).
        order: spline order (1 linear, 0 nearest).
        cval: value outside the source.

    Returns:
        ``(ceil(Z * src_z / dst), ...)`` float32 array.
    """
    scale = np.asarray(src, float)
    factors = dst / scale
    a = np.asarray(arr, np.float32)
    if order > 0:
        sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
        if max(sigma) > 0:
            a = ndimage.gaussian_filter(a, sigma=sigma, mode="nearest")
    shape = tuple(max(1, int(np.ceil(n * s / dst))) for n, s in zip(a.shape, scale, strict=True))
    return np.asarray(
        ndimage.affine_transform(a, factors, output_shape=shape, order=order, mode="constant", cval=cval),
        np.float32,
    )


def lung_box(lungs: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> tuple[slice, ...]:
    """Slices of the lung mask's bounding box grown by ``margin_mm`` (the whole array without lungs)."""
    if not lungs.any():
        return tuple(slice(0, n) for n in lungs.shape)
    out = []
    for axis, (n, s) in enumerate(zip(lungs.shape, spacing, strict=True)):
        other = tuple(i for i in range(3) if i != axis)
        idx = np.flatnonzero(lungs.any(axis=other))
        pad = int(np.ceil(margin_mm / s))
        out.append(slice(max(0, int(idx[0]) - pad), min(n, int(idx[-1]) + 1 + pad)))
    return tuple(out)


def to_fine_grid(volume: CTVolume, lungs: np.ndarray, spacing_mm: float, margin_mm: float = CROP_MARGIN_MM) -> FineGrid:
    """Crop ``volume`` to its lungs and resample it to the detector's grid.

    Args:
        volume: the CT.
        lungs: ``(Z, Y, X)`` its lung mask (:func:`~lungvl_model.inference.anatomy.lung_mask`).
        spacing_mm: the detector's isotropic voxel size.
        margin_mm: margin around the lungs' box.

    Returns:
        The :class:`FineGrid`.
    """
    box = lung_box(lungs, volume.spacing, margin_mm)
    offset = tuple(int(s.start) for s in box)
    hu = resample_to(volume.hu[box], volume.spacing, spacing_mm)
    lung = resample_to(lungs[box].astype(np.float32), volume.spacing, spacing_mm, order=1, cval=0.0) >= 0.5
    start = tuple(o * s / spacing_mm for o, s in zip(offset, volume.spacing, strict=True))
    grid = GridMap(volume.spacing, (spacing_mm, spacing_mm, spacing_mm), start)  # type: ignore[arg-type]
    return FineGrid(hu, lung, grid, offset)  # type: ignore[arg-type]


def detect(detector: FineDetector, hu: np.ndarray, *, overlap: float = 0.25, sw_batch_size: int = 4) -> np.ndarray:
    """Nodule probability of every voxel of a CT on the detector's grid.

    Args:
        detector: the trained detector.
        hu: ``(D, H, W)`` HU on the detector's grid.
        overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass.

    Returns:
        ``(D, H, W)`` float32 probabilities.
    """
    from monai.inferers import sliding_window_inference

    detector.eval()
    device = next(detector.parameters()).device
    x = detector.normalise(torch.from_numpy(np.ascontiguousarray(hu, np.float32))[None, None].to(device))
    roi = (detector.config.patch,) * 3
    with torch.no_grad():
        logits = sliding_window_inference(x, roi, sw_batch_size, detector, overlap=overlap, mode="gaussian")
    assert isinstance(logits, torch.Tensor)
    return torch.sigmoid(logits)[0, 0].float().cpu().numpy()


def fine_candidates(
    prob: np.ndarray,
    lungs: np.ndarray,
    spacing_mm: float,
    *,
    threshold: float = 0.5,
    max_candidates: int = 30,
    envelope_mm: float = LUNG_ENVELOPE_MM,
) -> list[tuple[np.ndarray, float]]:
    """Components of ``prob > threshold`` near the lungs, highest maximum probability first.

    Args:
        prob: ``(D, H, W)`` detector probabilities.
        lungs: ``(D, H, W)`` lung mask on the same grid.
        spacing_mm: the grid's voxel size.
        threshold: probability threshold.
        max_candidates: keep at most this many.
        envelope_mm: a component counts when its peak lies within this distance of the lungs.

    Returns:
        ``[(component mask (D, H, W) bool, max probability)]``.
    """
    if prob.shape != lungs.shape:
        raise ValueError(f"fine_candidates: prob shape {prob.shape} differs from lungs shape {lungs.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"fine_candidates: threshold must be in (0, 1), got {threshold!r}")
    near = ndimage.distance_transform_edt(~lungs) * spacing_mm <= envelope_mm if lungs.any() else np.ones_like(lungs)
    lab, n = ndimage.label(prob > threshold, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    peaks = np.asarray(ndimage.maximum(prob, lab, idx), float)
    where = ndimage.maximum_position(prob, lab, idx)
    order = [i for i in np.argsort(-peaks, kind="stable") if near[where[i]]][:max_candidates]
    return [(lab == (i + 1), float(peaks[i])) for i in order]


def probability_over(prob: np.ndarray, grid: GridMap, mask: np.ndarray, offset: tuple[int, int, int]) -> float:
    """The detector's maximum probability over a native-resolution mask.

    Each mask voxel is mapped to its nearest voxel of the detector's grid; voxels outside the grid
    (the lung box) count 0.

    Args:
        prob: ``(D, H, W)`` detector probabilities (:func:`detect`).
        grid: the detector grid's map to the CT (:attr:`FineGrid.grid`).
        mask: ``(dz, dy, dx)`` bool mask crop on the CT's grid.
        offset: the crop's ``(z, y, x)`` offset in the CT.

    Returns:
        The maximum in ``[0, 1]``; 0.0 for an empty mask or one wholly outside the grid.
    """
    pts = np.argwhere(np.asarray(mask, bool))
    if pts.size == 0:
        return 0.0
    idx = np.rint(grid.src_to_model(pts + np.asarray(offset))).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(prob.shape)), axis=1)
    if not inside.any():
        return 0.0
    i = idx[inside]
    return float(prob[i[:, 0], i[:, 1], i[:, 2]].max())


@dataclass
class DetectorMap:
    """The fine detector's probability map of one CT: what the pipeline proposes and scores with.

    One place for the explanation pipeline and the candidate filter's training, so the filter is fitted on
    exactly the values it will be given.

    Attributes:
        fine: the CT's lung box on the detector's grid.
        prob: ``(D, H, W)`` probabilities on it.
        spacing_mm: the detector's voxel size.
    """

    fine: FineGrid
    prob: np.ndarray
    spacing_mm: float

    @classmethod
    def of(cls, detector: FineDetector, volume: CTVolume, lungs: np.ndarray) -> DetectorMap:
        """Run ``detector`` by sliding window over ``volume``'s lungs (``lungs``: its lung mask)."""
        fine = to_fine_grid(volume, lungs, detector.config.spacing_mm)
        return cls(fine, detect(detector, fine.hu), detector.config.spacing_mm)

    def candidates(self) -> list[tuple[np.ndarray, float]]:
        """Its proposals (:func:`fine_candidates` with the defaults), masks on :attr:`fine`'s grid."""
        return fine_candidates(self.prob, self.fine.lungs, self.spacing_mm)

    def over(self, mask: np.ndarray, offset: tuple[int, int, int]) -> float:
        """Maximum probability over a native mask crop (:func:`probability_over`)."""
        return probability_over(self.prob, self.fine.grid, mask, offset)
