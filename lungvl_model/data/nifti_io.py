"""NIfTI label maps aligned with a :class:`~lungvl_model.data.volume.CTVolume`.

NIfTI stores RAS world coordinates and arrays indexed ``(i, j, k)``; lungvl volumes are ``(Z, Y, X)``
in LPS. A label map is written transposed to ``(X, Y, Z)`` with an affine that maps those indices to
RAS, so viewers (ITK-SNAP, 3D Slicer) overlay it on the DICOM series correctly.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lungvl_model.data.volume import CTVolume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _xyz_affine(volume: CTVolume) -> np.ndarray:
    """Affine from ``(x, y, z)`` indices to RAS mm."""
    sz, sy, sx = volume.spacing
    aff = np.eye(4)
    aff[:3, 0] = volume.direction[:, 0] * sx
    aff[:3, 1] = volume.direction[:, 1] * sy
    aff[:3, 2] = volume.direction[:, 2] * sz
    aff[:3, 3] = volume.origin
    return _LPS_TO_RAS @ aff


def write_label_nifti(labels: np.ndarray, volume: CTVolume, path: str | Path) -> None:
    """Write a label map (``(Z, Y, X)``, integer) aligned with ``volume``.

    Raises:
        ValueError: when the label map's shape differs from the volume's.
    """
    if labels.shape != volume.shape:
        raise ValueError(f"label map shape {labels.shape} does not match volume shape {volume.shape}")
    if labels.max(initial=0) > 255 or labels.min(initial=0) < 0:
        raise ValueError(f"label values must be in 0..255, got {labels.min()}..{labels.max()}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8), _xyz_affine(volume))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))


def read_label_nifti(path: str | Path, volume: CTVolume | None = None) -> np.ndarray:
    """Read a label map written by :func:`write_label_nifti` as ``(Z, Y, X)`` uint8.

    Args:
        path: the ``.nii.gz`` file.
        volume: when given, the map's shape and affine must match it.

    Raises:
        ValueError: shape or geometry mismatch with ``volume`` (names the file and both values).
    """
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj).astype(np.uint8).transpose(2, 1, 0)
    if volume is not None:
        if arr.shape != volume.shape:
            raise ValueError(f"{path}: label map shape {arr.shape} does not match the series {volume.shape}")
        if not np.allclose(img.affine, _xyz_affine(volume), atol=1e-2):
            raise ValueError(f"{path}: label map affine does not match the series geometry")
    return np.ascontiguousarray(arr)
