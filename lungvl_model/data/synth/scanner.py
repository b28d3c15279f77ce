"""Scanner physics of the synthetic studies: slice profile, reconstruction kernel, dose noise, header.

Order of operations on a fine-grid rendering ``(Z * sub, Y, X)``:

1. partial volume: each output slice is the mean of its ``sub`` fine sub-slices (a box slice profile
   of the nominal thickness);
2. kernel blur: in-plane Gaussian PSF (sharp kernels blur little, soft kernels more);
3. noise: white Gaussian noise filtered in-plane by the kernel's noise-correlation Gaussian, then
   scaled so that its standard deviation in a uniform region is exactly ``noise_sigma_hu``
   (sharp kernels: fine-grained noise; soft kernels: blotchy noise). Noise is independent per slice.
4. clip to the int16 range the DICOM writer stores (-1024 ... 3071 HU).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .cohorts import CohortProfile

HU_MIN, HU_MAX = -1024.0, 3071.0
#: Finest sub-slice spacing (mm) used to render thick slices.
FINE_Z_MM = 1.25


@dataclass(frozen=True)
class ScanParams:
    """Acquisition and reconstruction of one series.

    Attributes:
        manufacturer: DICOM Manufacturer (fictional).
        model: DICOM ManufacturerModelName (fictional).
        kernel: kernel family, ``sharp`` or ``soft``.
        kernel_name: DICOM ConvolutionKernel.
        kvp: tube voltage.
        tube_current_ma: tube current.
        ctdi_vol: CTDIvol (mGy), consistent with the noise.
        slice_thickness_mm: nominal slice thickness (= spacing).
        noise_sigma_hu: noise standard deviation in a uniform region (HU).
        psf_sigma_px: in-plane blur (pixels).
        noise_corr_px: in-plane noise correlation (pixels).
        contrast: acquired with intravenous contrast (blood pool enhanced; the header carries
            ``ContrastBolusAgent = "IV"``).
    """

    manufacturer: str
    model: str
    kernel: str
    kernel_name: str
    kvp: int
    tube_current_ma: float
    ctdi_vol: float
    slice_thickness_mm: float
    noise_sigma_hu: float
    psf_sigma_px: float
    noise_corr_px: float
    contrast: bool = False

    @property
    def sub_slices(self) -> int:
        """Fine sub-slices rendered per output slice."""
        return max(1, int(round(self.slice_thickness_mm / FINE_Z_MM)))

    def dicom_tags(self) -> dict[str, Any]:
        """Header keywords of the series (no identifying attributes); ``ContrastBolusAgent`` only with contrast."""
        tags: dict[str, Any] = {
            "Manufacturer": self.manufacturer,
            "ManufacturerModelName": self.model,
            "ConvolutionKernel": self.kernel_name,
            "KVP": str(self.kvp),
            "XRayTubeCurrent": int(round(self.tube_current_ma)),
            "CTDIvol": round(self.ctdi_vol, 2),
            "SliceThickness": f"{self.slice_thickness_mm:g}",
        }
        if self.contrast:
            tags["ContrastBolusAgent"] = "IV"
            tags["ContrastBolusRoute"] = "IV"
        return tags

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def sample_scan(profile: CohortProfile, rng: np.random.Generator) -> ScanParams:
    """Draw the scanner settings of one series from a cohort profile.

    The noise sigma is drawn first; tube current falls and CTDIvol (``dose_constant / sigma²``)
    rises as the noise gets lower, so header and image agree. Intravenous contrast is drawn with
    probability ``profile.contrast_fraction`` from a child stream (``rng.spawn``), which leaves ``rng``'s
    own sequence untouched: the rest of the patient (dates, nodules) is the same with or without it.
    """
    scanner = profile.scanners[int(rng.integers(len(profile.scanners)))]
    lo, hi = profile.noise_sigma_hu
    sigma = float(rng.uniform(lo, hi))
    quiet = (hi - sigma) / max(hi - lo, 1e-6)
    ma_lo, ma_hi = profile.tube_current_ma
    contrast = profile.contrast_fraction > 0 and bool(rng.spawn(1)[0].random() < profile.contrast_fraction)
    return ScanParams(
        manufacturer=scanner.manufacturer,
        model=scanner.model,
        kernel=profile.kernel,
        kernel_name=profile.kernel_names[int(rng.integers(len(profile.kernel_names)))],
        kvp=int(profile.kvp[int(rng.integers(len(profile.kvp)))]),
        tube_current_ma=ma_lo + (ma_hi - ma_lo) * quiet,
        ctdi_vol=scanner.dose_constant / sigma**2,
        slice_thickness_mm=float(profile.slice_thickness_mm[int(rng.integers(len(profile.slice_thickness_mm)))]),
        noise_sigma_hu=sigma,
        psf_sigma_px=profile.psf_sigma_px,
        noise_corr_px=profile.noise_corr_px,
        contrast=contrast,
    )


def partial_volume(fine: np.ndarray, sub: int) -> np.ndarray:
    """Average groups of ``sub`` fine slices: ``(Z * sub, Y, X)`` -> ``(Z, Y, X)``."""
    if sub == 1:
        return fine
    z = fine.shape[0] // sub
    return fine[: z * sub].reshape(z, sub, *fine.shape[1:]).mean(axis=1, dtype=np.float32)


@functools.cache
def _gain(sigma_px: float) -> float:
    """Standard deviation of unit white noise after the 2-D in-plane Gaussian filter."""
    imp = np.zeros(65)
    imp[32] = 1.0
    w = ndimage.gaussian_filter1d(imp, sigma_px, truncate=3.0) if sigma_px > 0 else imp
    return float(np.sum(w**2))  # (sum w²)^(1/2) per axis, two axes


def add_noise(hu: np.ndarray, sigma_hu: float, corr_px: float, rng: np.random.Generator) -> np.ndarray:
    """Add in-plane correlated Gaussian noise of standard deviation ``sigma_hu`` to ``(Z, Y, X)``."""
    if sigma_hu <= 0:
        return hu
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    if corr_px > 0:
        noise = ndimage.gaussian_filter(noise, (0.0, corr_px, corr_px), truncate=3.0)
    noise *= np.float32(sigma_hu / _gain(corr_px))
    return hu + noise


def apply_scanner(fine: np.ndarray, scan: ScanParams, rng: np.random.Generator) -> np.ndarray:
    """Turn a fine-grid rendering into the reconstructed series.

    Args:
        fine: ``(Z * sub, Y, X)`` float32 HU, ``sub = scan.sub_slices``.
        scan: scanner settings.
        rng: noise stream.

    Returns:
        ``(Z, Y, X)`` float32 HU.
    """
    img = partial_volume(fine, scan.sub_slices)
    if scan.psf_sigma_px > 0:
        img = ndimage.gaussian_filter(img, (0.0, scan.psf_sigma_px, scan.psf_sigma_px), truncate=3.0)
    img = add_noise(img, scan.noise_sigma_hu, scan.noise_corr_px, rng)
    np.clip(img, HU_MIN, HU_MAX, out=img)
    return img
