"""Cohort profiles of the synthetic generator: the ONE place where cohorts differ.

Every difference between synthetic sites (scanner physics, population, nodule mix, malignancy
prevalence, longitudinal follow-up) is a field of :class:`CohortProfile`; the rest of
``lungvl_model.data.synth`` reads these fields and hard-codes no cohort behaviour.

========================  ======================  =======================  ========================
field                     screening               referral                 low_resource
========================  ======================  =======================  ========================
purpose                   annual LDCT programme   diagnostic work-up of    district hospital, old
                          (NLST/NELSON-like)      a known nodule           scanner (fairness group)
noise sigma (HU)          35-60 (low dose)        10-20 (standard dose)    40-70 (old detector)
kernel                    sharp (PSF 0.35 px,     soft (PSF 0.9 px, noise  soft (PSF 1.0 px, noise
                          noise corr 0.5 px)      corr 1.1 px)             corr 1.2 px)
slice thickness (mm)      1.0, 1.25               2.5, 3.0, 5.0            5.0
kVp / tube current (mA)   100-120 / 20-60         120 / 150-350            120-140 / 80-200
scanners                  "Aurora 128",           "Meridian 256",          "Legacy 16" (Generic
                          "Helix LD 64"           "Aurora 128"             Tomography)
age (years)               63 +- 6 (50-80)         66 +- 10 (35-90)         58 +- 11 (30-85)
female share              0.45                    0.50                     0.40
pack-years                all smokers >= 20       30 % never smokers       40 % never smokers
family history            0.15                    0.12                     0.08
emphysema (base rate)     0.35 (realised 0.35)    0.30 (0.27)              0.25 (0.21)
studies without nodule    0.35                    0.10                     0.25
extra nodules (Poisson)   0.8                     0.5                      0.7
mean diameter median      4.8 mm (lognormal 0.45) 12 mm (lognormal 0.55)   8 mm (lognormal 0.5)
type solid/ps/ns/calc     .70/.08/.12/.10         .72/.12/.08/.08          .68/.08/.06/.18
margin smooth/lob/spic    .74/.20/.06             .45/.30/.25              .60/.25/.15
malignancy logit offset   +0.4                    +1.2                     +1.0
prevalence (4000 pts)     4.2 % of studies        43.5 %                   15.1 %
studies with a prior      0.40                    0.15                     0.10
IV contrast (per study)   0 (low-dose, none)      0.40                     0.25
========================  ======================  =======================  ========================

The emphysema rate is scaled by pack-years (``rate * (0.5 + 0.5 * pack_years / mean)``), hence the
realised shares. ``n_studies`` of a site counts patients (current studies); prior studies come on top.
Prevalence, Lung-RADS mix and sizes are those of :func:`~lungvl_model.data.synth.patients.sample_patients`
over 4000 patients (seed 7); exam Lung-RADS 1/2/3/4A/4B/4X: screening 40/37/13/7/1/2 %, referral
15/10/9/18/25/24 %, low_resource 33/16/12/20/8/10 %.

Malignancy is ``Bernoulli(sigmoid(brock_logit(true features) + malignancy_logit_offset))``: the offset
stands for the pre-test probability of each setting (referral patients were sent *because* of a
suspicious finding; Brock was fitted on a screening population). Calcified nodules are never
malignant. The offsets were set by sampling 4000 patients per cohort with :func:`sample_patients`
(checked by ``tests/lungvl_model/test_synth.py::test_cohorts_differ_as_documented``).

Scanner names are fictional. Noise sigma is the standard deviation of the reconstructed slice in a
uniform region; CTDIvol is derived from it (``dose_constant / sigma**2``) so header and image agree.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ScannerModel:
    """A (fictional) scanner model a cohort's studies are acquired on.

    Attributes:
        manufacturer: DICOM Manufacturer.
        model: DICOM ManufacturerModelName.
        dose_constant: CTDIvol (mGy) times sigma² (HU²); larger for older, less efficient detectors.
    """

    manufacturer: str
    model: str
    dose_constant: float = 3000.0


@dataclass(frozen=True)
class CohortProfile:
    """Everything that distinguishes one synthetic cohort from another (see the module table).

    Attributes:
        name: cohort key (``screening``, ``referral``, ``low_resource``).
        description: one line for ``site.toml``.
        study_description: DICOM StudyDescription.
        noise_sigma_hu: range of the reconstructed-slice noise sigma (HU).
        kernel: reconstruction kernel family, ``sharp`` or ``soft``.
        kernel_names: DICOM ConvolutionKernel values to choose from.
        psf_sigma_px: in-plane Gaussian blur of the image (pixels) by the kernel.
        noise_corr_px: in-plane correlation length of the noise (pixels) by the kernel.
        slice_thickness_mm: slice thicknesses to choose from (spacing = thickness).
        kvp: kVp values to choose from.
        tube_current_ma: range of tube current (mA).
        scanners: scanner models to choose from.
        age_mean: mean age (years).
        age_sd: standard deviation of age.
        age_range: clip range of age.
        female_fraction: share of women.
        never_smoker_fraction: share with 0 pack-years.
        pack_years_min: minimum pack-years of smokers.
        pack_years_mean_extra: mean of the exponential excess over ``pack_years_min``.
        family_history_rate: share with a family history of lung cancer.
        emphysema_rate: share with emphysema on CT.
        no_nodule_fraction: share of studies without any nodule.
        extra_nodules_mean: Poisson mean of nodules beyond the first.
        max_nodules: cap on the number of nodules per study.
        diameter_median_mm: median of the lognormal mean diameter of a nodule.
        diameter_log_sd: log standard deviation of the mean diameter.
        type_probs: probabilities of (solid, part_solid, non_solid, calcified).
        margin_probs: probabilities of (smooth, lobulated, spiculated) for non-calcified nodules.
        juxtapleural_rate: share of solid non-calcified nodules placed against the pleura.
        malignancy_logit_offset: added to the Brock logit before drawing malignancy.
        prior_fraction: share of studies with a prior CT 12 months earlier.
        new_benign_fraction: share of benign nodules absent on the prior (new inflammatory nodules).
        vdt_days: range of the volume-doubling time of malignant nodules (days).
        indications: clinical indications for the report header.
        contrast_fraction: share of studies acquired with intravenous contrast (drawn per study; LDCT
            screening is non-contrast, diagnostic referral CT often contrast-enhanced).
        study_description_contrast: StudyDescription of a contrast-enhanced study ("" = the same as
            ``study_description``).
    """

    name: str
    description: str
    study_description: str
    noise_sigma_hu: tuple[float, float]
    kernel: str
    kernel_names: tuple[str, ...]
    psf_sigma_px: float
    noise_corr_px: float
    slice_thickness_mm: tuple[float, ...]
    kvp: tuple[int, ...]
    tube_current_ma: tuple[float, float]
    scanners: tuple[ScannerModel, ...]
    age_mean: float
    age_sd: float
    age_range: tuple[float, float]
    female_fraction: float
    never_smoker_fraction: float
    pack_years_min: float
    pack_years_mean_extra: float
    family_history_rate: float
    emphysema_rate: float
    no_nodule_fraction: float
    extra_nodules_mean: float
    max_nodules: int
    diameter_median_mm: float
    diameter_log_sd: float
    type_probs: tuple[float, float, float, float]
    margin_probs: tuple[float, float, float]
    juxtapleural_rate: float
    malignancy_logit_offset: float
    prior_fraction: float
    new_benign_fraction: float = 0.12
    vdt_days: tuple[float, float] = (100.0, 400.0)
    indications: tuple[str, ...] = ()
    contrast_fraction: float = 0.0
    study_description_contrast: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.contrast_fraction <= 1.0:
            raise ValueError(f"CohortProfile.contrast_fraction must be in [0, 1], got {self.contrast_fraction!r}")
        if self.kernel not in ("sharp", "soft"):
            raise ValueError(f"CohortProfile.kernel must be 'sharp' or 'soft', got {self.kernel!r}")
        for name in ("type_probs", "margin_probs"):
            probs = getattr(self, name)
            if abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
                raise ValueError(f"CohortProfile.{name} must be probabilities summing to 1, got {probs}")
        if not 0.0 <= self.prior_fraction <= 1.0:
            raise ValueError(f"CohortProfile.prior_fraction must be in [0, 1], got {self.prior_fraction}")

    def description_for(self, contrast: bool) -> str:
        """DICOM StudyDescription of a study with or without intravenous contrast."""
        return (self.study_description_contrast or self.study_description) if contrast else self.study_description

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples become lists via the caller's serializer)."""
        return asdict(self)


SCREENING = CohortProfile(
    name="screening",
    description="Synthetic low-dose CT lung screening programme: thin slices, sharp kernel, low-dose "
    "noise, small nodules, low malignancy prevalence, annual priors.",
    study_description="CT LOW DOSE LUNG SCREENING",
    noise_sigma_hu=(35.0, 60.0),
    kernel="sharp",
    kernel_names=("LUNG_SHARP", "HR60", "YB"),
    psf_sigma_px=0.35,
    noise_corr_px=0.5,
    slice_thickness_mm=(1.0, 1.25),
    kvp=(100, 120),
    tube_current_ma=(20.0, 60.0),
    scanners=(ScannerModel("Acme Medical", "Aurora 128"), ScannerModel("Helios Imaging", "Helix LD 64")),
    age_mean=63.0,
    age_sd=6.0,
    age_range=(50.0, 80.0),
    female_fraction=0.45,
    never_smoker_fraction=0.0,
    pack_years_min=20.0,
    pack_years_mean_extra=18.0,
    family_history_rate=0.15,
    emphysema_rate=0.35,
    no_nodule_fraction=0.35,
    extra_nodules_mean=0.8,
    max_nodules=6,
    diameter_median_mm=4.8,
    diameter_log_sd=0.45,
    type_probs=(0.70, 0.08, 0.12, 0.10),
    margin_probs=(0.74, 0.20, 0.06),
    juxtapleural_rate=0.20,
    malignancy_logit_offset=0.4,
    prior_fraction=0.40,
    indications=(
        "Annual lung cancer screening.",
        "Lung cancer screening, current or former smoker.",
        "Low-dose CT for lung cancer screening.",
    ),
)

REFERRAL = CohortProfile(
    name="referral",
    description="Synthetic tertiary referral centre: standard-dose diagnostic CT, 2.5-5 mm slices, soft "
    "kernel, larger nodules, high malignancy prevalence, few priors.",
    study_description="CT CHEST WITHOUT CONTRAST",
    study_description_contrast="CT CHEST WITH CONTRAST",
    contrast_fraction=0.40,
    noise_sigma_hu=(10.0, 20.0),
    kernel="soft",
    kernel_names=("STANDARD", "B30", "FC13"),
    psf_sigma_px=0.9,
    noise_corr_px=1.1,
    slice_thickness_mm=(2.5, 3.0, 5.0),
    kvp=(120,),
    tube_current_ma=(150.0, 350.0),
    scanners=(ScannerModel("Meridian Systems", "Meridian 256"), ScannerModel("Acme Medical", "Aurora 128")),
    age_mean=66.0,
    age_sd=10.0,
    age_range=(35.0, 90.0),
    female_fraction=0.50,
    never_smoker_fraction=0.30,
    pack_years_min=5.0,
    pack_years_mean_extra=25.0,
    family_history_rate=0.12,
    emphysema_rate=0.30,
    no_nodule_fraction=0.10,
    extra_nodules_mean=0.5,
    max_nodules=5,
    diameter_median_mm=12.0,
    diameter_log_sd=0.55,
    type_probs=(0.72, 0.12, 0.08, 0.08),
    margin_probs=(0.45, 0.30, 0.25),
    juxtapleural_rate=0.15,
    malignancy_logit_offset=1.2,
    prior_fraction=0.15,
    indications=(
        "Evaluation of pulmonary nodule.",
        "Abnormal chest radiograph, further evaluation.",
        "Referred for assessment of a lung nodule.",
        "Hemoptysis and weight loss.",
    ),
)

LOW_RESOURCE = CohortProfile(
    name="low_resource",
    description="Synthetic low-resource hospital: older 16-slice scanner, thick 5 mm slices, soft kernel, "
    "high noise, more calcified granulomas, intermediate prevalence (fairness subgroup).",
    study_description="CT THORAX",
    contrast_fraction=0.25,
    noise_sigma_hu=(40.0, 70.0),
    kernel="soft",
    kernel_names=("SOFT", "B31"),
    psf_sigma_px=1.0,
    noise_corr_px=1.2,
    slice_thickness_mm=(5.0,),
    kvp=(120, 140),
    tube_current_ma=(80.0, 200.0),
    scanners=(ScannerModel("Generic Tomography", "Legacy 16", dose_constant=12000.0),),
    age_mean=58.0,
    age_sd=11.0,
    age_range=(30.0, 85.0),
    female_fraction=0.40,
    never_smoker_fraction=0.40,
    pack_years_min=5.0,
    pack_years_mean_extra=15.0,
    family_history_rate=0.08,
    emphysema_rate=0.25,
    no_nodule_fraction=0.25,
    extra_nodules_mean=0.7,
    max_nodules=6,
    diameter_median_mm=8.0,
    diameter_log_sd=0.5,
    type_probs=(0.68, 0.08, 0.06, 0.18),
    margin_probs=(0.60, 0.25, 0.15),
    juxtapleural_rate=0.20,
    malignancy_logit_offset=1.0,
    prior_fraction=0.10,
    indications=("Chronic cough.", "Cough and weight loss, rule out mass.", "Abnormal chest X-ray."),
)

PROFILES: dict[str, CohortProfile] = {p.name: p for p in (SCREENING, REFERRAL, LOW_RESOURCE)}


def get_profile(name: str) -> CohortProfile:
    """Look up a cohort profile by name.

    Args:
        name: ``screening``, ``referral`` or ``low_resource``.

    Returns:
        The profile.

    Raises:
        ValueError: for an unknown name (with the closest known name).
    """
    if name in PROFILES:
        return PROFILES[name]
    close = difflib.get_close_matches(name, list(PROFILES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown cohort {name!r}, expected one of {sorted(PROFILES)}{hint}")
