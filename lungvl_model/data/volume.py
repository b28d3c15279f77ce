"""In-memory CT volume with its patient-space geometry.

Convention used everywhere in lungvl: a volume array is indexed ``(z, y, x)`` = (slice, row, column),
``z`` increasing along the slice normal. Patient coordinates are DICOM LPS in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CTVolume:
    """A CT series as a dense array of Hounsfield units plus its geometry.

    Attributes:
        hu: Hounsfield units, shape ``(Z, Y, X)``, float32.
        spacing: voxel size ``(sz, sy, sx)`` in mm; ``sz`` is the distance between slice centres.
        origin: LPS position (mm) of voxel ``(0, 0, 0)`` (the first slice's ImagePositionPatient).
        direction: ``(3, 3)`` matrix whose columns are the LPS unit vectors of the ``x`` (along a row),
            ``y`` (down a column) and ``z`` (slice normal) array axes.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        meta: other header values (manufacturer, kernel, kVp, slice thickness, patient age/sex...).
        issues: non-fatal problems found while reading (e.g. a missing slice that was tolerated).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    study_uid: str = ""
    series_uid: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"CTVolume.hu must be 3-D (Z, Y, X), got shape {self.hu.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"CTVolume.spacing must be three positive mm values, got {self.spacing}")
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(Z, Y, X)``."""
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def affine_zyx(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous voxel indices ``(z, y, x, 1)`` to LPS mm."""
        sz, sy, sx = self.spacing
        cols = np.stack([self.direction[:, 2] * sz, self.direction[:, 1] * sy, self.direction[:, 0] * sx], axis=1)
        aff = np.eye(4)
        aff[:3, :3] = cols
        aff[:3, 3] = self.origin
        return aff

    def voxel_to_lps(self, zyx: np.ndarray) -> np.ndarray:
        """Map voxel indices to LPS millimetres.

        Args:
            zyx: ``(N, 3)`` (or ``(3,)``) voxel coordinates in ``(z, y, x)`` order, may be fractional.

        Returns:
            ``(N, 3)`` (or ``(3,)``) LPS positions in mm.
        """
        pts = np.atleast_2d(np.asarray(zyx, dtype=np.float64))
        out = pts @ self.affine_zyx()[:3, :3].T + self.affine_zyx()[:3, 3]
        return out[0] if np.ndim(zyx) == 1 else out

    def lps_to_voxel(self, lps: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`voxel_to_lps`; returns fractional ``(z, y, x)`` indices."""
        pts = np.atleast_2d(np.asarray(lps, dtype=np.float64))
        aff = self.affine_zyx()
        out = (pts - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
        return out[0] if np.ndim(lps) == 1 else out

    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³."""
        return float(np.prod(self.spacing))
