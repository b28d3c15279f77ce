"""Synthetic patients: demographics, nodules, malignancy from Brock, growth, priors and labels.

Everything here is cheap (no volume is rendered), so cohort statistics can be checked over
thousands of patients. A patient is a pure function of ``(profile, seed, index)``: its stream is
``np.random.default_rng([seed, index])``, so studies do not depend on generation order.

Ground truth, per nodule:
    * malignancy ~ Bernoulli(sigmoid(brock_logit(true current features) + profile offset)); benign
      calcified nodules are never malignant;
    * with a prior study 12 months earlier: a malignant nodule was smaller by the volume-doubling
      time (``d_prior = d * 2 ** (-interval / (3 * VDT))``) and is "new" when that is under 3 mm;
      a benign nodule is the same size ("stable") or, for ``new_benign_fraction`` of them, absent;
    * context from ``context_from_prior``, Lung-RADS from ``categorize_nodule`` (spiculation as the
      4X suspicious feature; the juxtapleural rule only for smooth solid nodules; a stable nodule's
      prior category is the category of its baseline finding on the prior study).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np

from lungvl_model.clinical.brock import BrockInputs, brock_probability, is_upper_lobe
from lungvl_model.clinical.lung_rads import (
    NoduleFinding,
    categorize_exam,
    categorize_nodule,
    context_from_prior,
)
from lungvl_model.data.site_layout import LOBES

from .cohorts import CohortProfile
from .nodules import NoduleShape, design_shape
from .phantom import EmphysemaSpec
from .scanner import ScanParams, sample_scan

KINDS: tuple[str, ...] = ("solid", "part_solid", "non_solid", "calcified")
MARGINS: tuple[str, ...] = ("smooth", "lobulated", "spiculated")
#: Relative frequency of nodules per lobe (roughly lobe volume).
LOBE_WEIGHTS: tuple[float, ...] = (0.26, 0.09, 0.22, 0.24, 0.19)
INTERVAL_DAYS = 365
MIN_VISIBLE_MM = 3.0
#: Slices up to this thickness (mm) keep a central calcification visible; thicker ones only a complete one.
THIN_SLICE_MM = 1.5
#: Largest calcified granuloma (mm).
CALCIFIED_MAX_MM = 9.0
_ID_PREFIX = {"screening": "SCR", "referral": "REF", "low_resource": "LRS"}


@dataclass(frozen=True)
class NoduleSpec:
    """One nodule at the current study (ground truth).

    Attributes:
        nodule_id: value in the label maps (1 = largest).
        kind: ``solid``, ``part_solid``, ``non_solid`` or ``calcified``.
        margin: ``smooth``, ``lobulated`` or ``spiculated``.
        calcification: ``""``, ``complete`` or ``central`` (benign patterns).
        lobe: lobe code (RUL ... LLL).
        juxtapleural: touches the pleura.
        shape: body geometry at the current study.
        solid_fraction: solid component / mean diameter (part-solid), else 0.
        body_hu: HU of the body (solid tissue, ground glass or calcium).
        core_hu: HU of the core (solid component or central calcification).
        brock_probability: Brock model 2b probability of the current true features.
        malignant: ground-truth malignancy.
        vdt_days: volume-doubling time (malignant), else None.
        prior_scale: size on the prior relative to now; None when absent on the prior.
        seed: the nodule's own stream (placement, texture).
    """

    nodule_id: int
    kind: str
    margin: str
    calcification: str
    lobe: str
    juxtapleural: bool
    shape: NoduleShape
    solid_fraction: float
    body_hu: float
    core_hu: float
    brock_probability: float
    malignant: bool
    vdt_days: float | None
    prior_scale: float | None
    seed: int

    @property
    def type(self) -> str:
        """Attenuation type of labels.csv (a calcified nodule is solid)."""
        return "solid" if self.kind == "calcified" else self.kind

    @property
    def core_scale(self) -> float:
        """Relative size of the rendered core (solid component or central calcification)."""
        if self.kind == "part_solid":
            return self.solid_fraction
        return 0.5 if self.calcification == "central" else 0.0


@dataclass(frozen=True)
class NoduleState:
    """A nodule as seen on one study (current or prior): true measurements and labels."""

    spec: NoduleSpec
    shape: NoduleShape
    longest_diameter_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_mm3: float
    solid_component_mm: float
    context: str
    growth_mm: float | None
    prior_mean_mm: float | None
    finding: NoduleFinding
    lung_rads: str
    brock_probability: float


@dataclass(frozen=True)
class PatientCase:
    """A synthetic patient with its current study and optional prior.

    Attributes:
        index: position in the site (0-based).
        patient_id: pseudonymous DICOM PatientID.
        age: age at the current study (years).
        sex: ``F`` or ``M``.
        family_history: family history of lung cancer.
        pack_years: smoking pack-years.
        emphysema: emphysema (kind and designed extent).
        anatomy_seed: seed of the thorax (shared by current and prior).
        nodules: nodules, largest first.
        has_prior: a prior study exists 12 months earlier.
        scan: scanner settings of the current study.
        prior_scan: scanner settings of the prior study.
        study_date: date of the current study.
        streams: seeds of the current/prior rendering and report streams.
    """

    index: int
    patient_id: str
    age: int
    sex: str
    family_history: bool
    pack_years: float
    emphysema: EmphysemaSpec
    anatomy_seed: int
    nodules: tuple[NoduleSpec, ...]
    has_prior: bool
    scan: ScanParams
    prior_scan: ScanParams
    study_date: date
    streams: tuple[int, ...] = field(default=())

    @property
    def malignant(self) -> bool:
        """Any malignant nodule."""
        return any(n.malignant for n in self.nodules)

    @property
    def prior_date(self) -> date:
        """Date of the prior study."""
        return self.study_date - timedelta(days=INTERVAL_DAYS)


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def calcified_min_diameter_mm(thickest_mm: float, calcification: str) -> float:
    """Smallest calcified nodule whose calcium stays visible on the thickest slice of the patient.

    The rendered calcium (at most ``render.CALCIUM_HU_CAP`` before the blur) must keep a blurred
    peak above 300 HU after partial volume over the slice and the kernel blur of the synthetic
    scanners (about 2 mm pixels, PSF sigma 0.35-1 pixel). Measured worst cases (random sub-voxel
    positions): ``complete`` needs >= 3 mm on 1-1.25 mm slices, >= 6 mm on 2.5-3 mm slices and
    >= 7.5 mm on 5 mm slices; ``central`` (a core of half the diameter) needs >= 4.5 mm on thin slices
    and is not drawn on thicker ones (see :func:`_draw_nodule`).

    Args:
        thickest_mm: the thicker of the current and prior slice thickness (mm).
        calcification: ``complete`` or ``central``.

    Returns:
        The lower bound of the calcified nodule's mean diameter (mm).
    """
    if calcification not in ("complete", "central"):
        raise ValueError(f"calcification must be complete or central, got {calcification!r}")
    if thickest_mm <= THIN_SLICE_MM:
        return 4.5 if calcification == "central" else 3.0
    return 6.0 if thickest_mm <= 3.0 else 7.5


def _draw_nodule(
    profile: CohortProfile, rng: np.random.Generator, has_prior: bool, thickest_mm: float
) -> dict[str, object]:
    kind = KINDS[int(rng.choice(4, p=profile.type_probs))]
    d = float(np.exp(rng.normal(math.log(profile.diameter_median_mm), profile.diameter_log_sd)))
    calcification = ""
    if kind == "calcified":
        size_u = float(rng.random())  # same draws, in the same order, as before the thickness rule
        margin = "smooth"
        calcification = "complete" if rng.random() < 0.6 or thickest_mm > THIN_SLICE_MM else "central"
        lo = calcified_min_diameter_mm(thickest_mm, calcification)
        d = lo + (CALCIFIED_MAX_MM - lo) * size_u
    else:
        margin = MARGINS[int(rng.choice(3, p=profile.margin_probs))]
    if kind == "non_solid":
        d *= 1.4
    if kind == "part_solid":
        d = max(d, float(rng.uniform(6.0, 10.0)))
    d = float(np.clip(d, MIN_VISIBLE_MM, 29.5 if (kind == "non_solid" and has_prior) else 35.0))
    juxta = kind in ("solid", "calcified") and rng.random() < profile.juxtapleural_rate
    lobe = LOBES[int(rng.choice(5, p=LOBE_WEIGHTS))]
    shape = design_shape(rng, d, margin)
    solid_fraction = float(rng.uniform(0.25, 0.75)) if kind == "part_solid" else 0.0
    body_hu = {
        "solid": rng.uniform(15.0, 55.0),
        "part_solid": rng.uniform(-600.0, -350.0),
        "non_solid": rng.uniform(-700.0, -450.0),
        "calcified": rng.uniform(600.0, 1200.0) if calcification == "complete" else rng.uniform(20.0, 50.0),
    }[kind]
    core_hu = rng.uniform(0.0, 45.0) if kind == "part_solid" else rng.uniform(600.0, 1100.0)
    return {
        "kind": kind,
        "margin": margin,
        "calcification": calcification,
        "lobe": lobe,
        "juxtapleural": bool(juxta),
        "shape": shape,
        "solid_fraction": solid_fraction,
        "body_hu": float(body_hu),
        "core_hu": float(core_hu),
        "seed": int(rng.integers(2**31 - 1)),
    }


def sample_patient(profile: CohortProfile, seed: int, index: int, prior_fraction: float | None = None) -> PatientCase:
    """Draw patient ``index`` of a site (no rendering).

    Args:
        profile: cohort profile.
        seed: site seed.
        index: patient index in the site.
        prior_fraction: share of patients with a prior study (None = the profile's).

    Returns:
        The patient.
    """
    rng = np.random.default_rng([seed, index])
    p = profile
    female = bool(rng.random() < p.female_fraction)
    age = int(np.clip(round(rng.normal(p.age_mean, p.age_sd)), *p.age_range))
    never = rng.random() < p.never_smoker_fraction
    pack_years = 0.0 if never else round(p.pack_years_min + float(rng.exponential(p.pack_years_mean_extra)), 1)
    family = bool(rng.random() < p.family_history_rate)
    p_emph = p.emphysema_rate * (0.5 + 0.5 * min(pack_years, 80.0) / (p.pack_years_min + p.pack_years_mean_extra))
    if rng.random() < min(p_emph, 0.9):
        if rng.random() < 0.75:
            emph = EmphysemaSpec("centrilobular", round(float(rng.uniform(0.03, 0.18)), 3))
        else:
            emph = EmphysemaSpec("paraseptal", round(float(rng.uniform(0.02, 0.06)), 3))
    else:
        emph = EmphysemaSpec()
    frac = p.prior_fraction if prior_fraction is None else prior_fraction
    has_prior = bool(rng.random() < frac)
    anatomy_seed = int(rng.integers(2**31 - 1))
    scan, prior_scan = sample_scan(p, rng), sample_scan(p, rng)
    study_date = date(2023, 1, 1) + timedelta(days=int(rng.integers(0, 730)))
    streams = tuple(int(s) for s in rng.integers(2**31 - 1, size=4))
    count = 0 if rng.random() < p.no_nodule_fraction else min(1 + int(rng.poisson(p.extra_nodules_mean)), p.max_nodules)
    thickest = max(scan.slice_thickness_mm, prior_scan.slice_thickness_mm)
    drawn = [_draw_nodule(p, rng, has_prior, thickest) for _ in range(count)]
    drawn.sort(key=lambda n: -n["shape"].mean_diameter())  # type: ignore[attr-defined]
    nodules = []
    for i, nd in enumerate(drawn, start=1):
        shape: NoduleShape = nd["shape"]  # type: ignore[assignment]
        kind = str(nd["kind"])
        long_, _ = shape.axial_axes()
        brock = _brock(age, female, family, emph, long_, kind, str(nd["lobe"]), count, nd["margin"] == "spiculated")
        p_mal = 0.0 if kind == "calcified" else 1.0 / (1.0 + math.exp(-(_logit(brock) + p.malignancy_logit_offset)))
        malignant = bool(rng.random() < p_mal)
        vdt = float(rng.uniform(*p.vdt_days)) if malignant else None
        new_benign = rng.random() < p.new_benign_fraction
        prior_scale: float | None = None
        if has_prior:
            if malignant:
                prior_scale = 2.0 ** (-INTERVAL_DAYS / (3.0 * vdt))  # type: ignore[operator]
                if shape.mean_diameter() * prior_scale < MIN_VISIBLE_MM:
                    prior_scale = None
            elif not new_benign:
                prior_scale = 1.0
        nodules.append(
            NoduleSpec(
                nodule_id=i,
                kind=kind,
                margin=str(nd["margin"]),
                calcification=str(nd["calcification"]),
                lobe=str(nd["lobe"]),
                juxtapleural=bool(nd["juxtapleural"]),
                shape=shape,
                solid_fraction=float(nd["solid_fraction"]),  # type: ignore[arg-type]
                body_hu=float(nd["body_hu"]),  # type: ignore[arg-type]
                core_hu=float(nd["core_hu"]),  # type: ignore[arg-type]
                brock_probability=brock,
                malignant=malignant,
                vdt_days=vdt,
                prior_scale=prior_scale,
                seed=int(nd["seed"]),  # type: ignore[call-overload]
            )
        )
    prefix = _ID_PREFIX.get(p.name, "SYN")
    return PatientCase(
        index=index,
        patient_id=f"{prefix}{seed % 10**6:06d}-{index:05d}",
        age=age,
        sex="F" if female else "M",
        family_history=family,
        pack_years=pack_years,
        emphysema=emph,
        anatomy_seed=anatomy_seed,
        nodules=tuple(nodules),
        has_prior=has_prior,
        scan=scan,
        prior_scan=prior_scan,
        study_date=study_date,
        streams=streams,
    )


def sample_patients(
    profile: CohortProfile, n: int, seed: int, prior_fraction: float | None = None
) -> list[PatientCase]:
    """Draw patients ``0 .. n-1`` of a site (no rendering; about a millisecond each)."""
    return [sample_patient(profile, seed, i, prior_fraction) for i in range(n)]


def _brock(
    age: float,
    female: bool,
    family: bool,
    emph: EmphysemaSpec,
    longest: float,
    kind: str,
    lobe: str,
    count: int,
    spiculated: bool,
) -> float:
    """Brock model 2b probability of one nodule's true features (calcified counted as solid)."""
    return brock_probability(
        BrockInputs(
            age=float(age),
            female=female,
            family_history=family,
            emphysema=emph.kind != "none",
            longest_diameter_mm=longest,
            type="solid" if kind == "calcified" else kind,
            upper_lobe=is_upper_lobe(lobe),
            nodule_count=count,
            spiculation=spiculated,
        )
    )


def _finding(spec: NoduleSpec, mean: float, solid: float, context: str, prior_cat: str | None) -> NoduleFinding:
    return NoduleFinding(
        type=spec.type,
        mean_diameter_mm=mean,
        solid_component_mm=solid if spec.type == "part_solid" else None,
        context=context,
        juxtapleural=spec.juxtapleural and spec.type == "solid" and spec.margin == "smooth",
        benign_pattern=spec.kind == "calcified",
        suspicious_features=spec.margin == "spiculated",
        prior_category=prior_cat,
    )


def nodule_states(case: PatientCase, prior: bool = False) -> list[NoduleState]:
    """True measurements and labels of the nodules visible on the current (or the prior) study.

    The Brock probability of a state uses that study's size, nodule count and age (it equals the
    nodule's ``brock_probability`` on the current study).
    """
    out = []
    visible = [n for n in case.nodules if not prior or n.prior_scale is not None]
    for spec in visible:
        scale = spec.prior_scale if prior else 1.0
        shape = spec.shape.scaled(scale) if scale != 1.0 else spec.shape  # type: ignore[arg-type]
        long_, short = shape.axial_axes()
        mean = 0.5 * (long_ + short)
        solid = mean * spec.solid_fraction if spec.type == "part_solid" else (mean if spec.type == "solid" else 0.0)
        prior_mean = prior_cat = None
        if prior:
            context, growth = "baseline", None
        else:
            if spec.prior_scale is not None and case.has_prior:
                prior_mean = mean * spec.prior_scale
                prior_solid = prior_mean * spec.solid_fraction
                prior_cat = categorize_nodule(_finding(spec, prior_mean, prior_solid, "baseline", None))
            context = context_from_prior(prior_mean, mean, case.has_prior)
            growth = None if prior_mean is None else mean - prior_mean
        finding = _finding(spec, mean, solid, context, prior_cat)
        out.append(
            NoduleState(
                spec=spec,
                shape=shape,
                longest_diameter_mm=long_,
                short_axis_mm=short,
                mean_diameter_mm=mean,
                volume_mm3=shape.volume_mm3(),
                solid_component_mm=solid,
                context=context,
                growth_mm=growth,
                prior_mean_mm=prior_mean,
                finding=finding,
                lung_rads=categorize_nodule(finding),
                brock_probability=_brock(
                    case.age - (1 if prior else 0),
                    case.sex == "F",
                    case.family_history,
                    case.emphysema,
                    long_,
                    spec.kind,
                    spec.lobe,
                    len(visible),
                    spec.margin == "spiculated",
                ),
            )
        )
    return out


def exam_category(states: list[NoduleState]) -> str:
    """Exam-level Lung-RADS category (``categorize_exam``: most suspicious nodule, "1" without any)."""
    return categorize_exam([s.finding for s in states])
