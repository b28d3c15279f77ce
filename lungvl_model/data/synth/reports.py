"""Radiology report text of synthetic studies: FINDINGS + IMPRESSION with varied phrasing.

The text follows conventions a report labeler can parse: sizes carry units (``9 mm``, ``1.2 cm``,
``12 x 9 mm``), lobes are spelled out (``right upper lobe``) or use the standard abbreviations
(``RUL``), attenuation words are ``solid``, ``part-solid`` (with ``N mm solid component``) and
``ground-glass``, and the impression ends with ``Lung-RADS <category>`` (or ``Lung-RADS category
<category>``); a RECOMMENDATION section gives its management (``lung_rads.management``). Sizes in the
text are the Lung-RADS mean diameter (or long x short axis) of the true nodule, rounded as a
radiologist would. Phrasing is drawn from the study's report stream, so the same seed gives the
same report.

:func:`public_report_corpus` writes reports of synthetic patients without rendering any volume: the
public corpus the federation's report tokenizer is trained on, so that no site's reports shape the
vocabulary every site receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lungvl_model.clinical.lung_rads import category_rank, management
from lungvl_model.text.labeler_patterns import LOBE_NAMES, LUNG_RADS_WORDS

from .cohorts import PROFILES, CohortProfile
from .patients import NoduleState, PatientCase, exam_category, nodule_states, sample_patient

__all__ = [
    "LOBE_NAMES",
    "LUNG_RADS_WORDS",
    "PUBLIC_CORPUS_SEED_BASE",
    "PublicReport",
    "emphysema_sentence",
    "lobe_phrase",
    "nodule_sentence",
    "public_report_corpus",
    "public_reports",
    "size_phrase",
    "write_report",
]

#: Site seed of the public corpus's patients: ``PUBLIC_CORPUS_SEED_BASE + seed``, far from the small
#: seeds generated sites use, so the corpus does not reproduce a simulated site's patients and reports.
PUBLIC_CORPUS_SEED_BASE = 7_340_000_000

_NEGATIVE = (
    "No pulmonary nodules.",
    "No pulmonary nodules or masses.",
    "No suspicious pulmonary nodules or masses are identified.",
    "The lungs are clear. No pulmonary nodules.",
)
_OTHER = (
    "No pleural effusion or pneumothorax.",
    "The central airways are patent.",
    "Heart size is normal. No pericardial effusion.",
    "No mediastinal or hilar lymphadenopathy.",
    "The visualized upper abdomen is unremarkable.",
    "No acute osseous abnormality.",
)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _mm(v: float, rng: np.random.Generator) -> str:
    if v >= 10 and rng.random() < 0.3:
        return f"{v / 10:.1f} cm"
    if v < 10 and rng.random() < 0.25:
        return f"{v:.1f} mm"
    return f"{max(1, round(v))} mm"


def size_phrase(s: NoduleState, rng: np.random.Generator) -> str:
    """Size as ``9 mm`` / ``1.2 cm`` / ``5.5 mm`` (mean diameter) or ``12 x 9 mm`` (long x short)."""
    if rng.random() < 0.3 and s.longest_diameter_mm - s.short_axis_mm >= 1.0:
        return f"{round(s.longest_diameter_mm)} x {max(1, round(s.short_axis_mm))} mm"
    return _mm(s.mean_diameter_mm, rng)


def lobe_phrase(lobe: str, rng: np.random.Generator) -> str:
    """``right upper lobe`` (70 %) or the abbreviation ``RUL``."""
    return lobe if rng.random() < 0.3 else LOBE_NAMES[lobe]


def _attenuation(s: NoduleState, rng: np.random.Generator) -> tuple[str, str]:
    """(adjective before 'nodule', clause after it)."""
    spec = s.spec
    if spec.kind == "part_solid":
        return _pick(rng, ("part-solid", "part-solid (mixed attenuation)")), (
            f"with a {_mm(s.solid_component_mm, rng)} solid component"
        )
    if spec.kind == "non_solid":
        return _pick(rng, ("ground-glass", "pure ground-glass", "nonsolid ground-glass")), ""
    return "solid", ""


def _margin(s: NoduleState, rng: np.random.Generator) -> str:
    return {
        "smooth": _pick(rng, ("with smooth margins", "smoothly marginated", "well-circumscribed")),
        "lobulated": _pick(rng, ("with lobulated margins", "lobulated", "with lobulated contours")),
        "spiculated": _pick(rng, ("with spiculated margins", "spiculated", "with spiculation")),
    }[s.spec.margin]


def _comparison(s: NoduleState, prior_date: str, rng: np.random.Generator) -> str:
    if s.context == "new":
        return _pick(
            rng,
            (f"new since {prior_date}", "new compared with the prior CT", "not present on the prior study"),
        )
    if s.prior_mean_mm is None:
        return ""
    was, now = _mm(s.prior_mean_mm, rng), _mm(s.mean_diameter_mm, rng)
    if s.context == "growing":
        return _pick(
            rng,
            (
                f"increased from {was} to {now}",
                f"enlarged from {was} on the prior study",
                f"previously {was}, now larger",
            ),
        )
    if s.growth_mm is not None and s.growth_mm >= 0.5:
        return f"minimally larger than before (previously {was}), not meeting growth criteria"
    return _pick(
        rng,
        (
            f"stable since {prior_date}",
            "unchanged from the prior study",
            "stable in size compared with the prior",
        ),
    )


def nodule_sentence(s: NoduleState, rng: np.random.Generator, prior_date: str = "", image: int | None = None) -> str:
    """One FINDINGS sentence about a nodule."""
    spec = s.spec
    lobe = lobe_phrase(spec.lobe, rng)
    size = size_phrase(s, rng)
    where = f"(image {image})" if image is not None and rng.random() < 0.5 else ""
    if spec.kind == "calcified":
        if spec.calcification == "central":
            core = f"{size} nodule in the {lobe} with benign central calcification"
        else:
            core = _pick(
                rng,
                (
                    f"{size} calcified granuloma in the {lobe}",
                    f"{size} densely calcified nodule in the {lobe}",
                ),
            )
        parts = [core]
    else:
        adj, clause = _attenuation(s, rng)
        margin = _margin(s, rng)
        pleural = ""
        if spec.juxtapleural:
            pleural = _pick(rng, ("juxtapleural ", "pleural-based ", "subpleural "))
        if rng.random() < 0.5:
            parts = [f"{size} {pleural}{adj} nodule in the {lobe} {margin}".rstrip()]
        else:
            parts = [f"{pleural}{adj} nodule in the {lobe} measuring {size}, {margin}"]
        if clause:
            parts.append(clause)
    comp = _comparison(s, prior_date, rng)
    if comp:
        parts.append(comp)
    text = ", ".join(p for p in parts if p)
    if where:
        text += f" {where}"
    art = _article(text)
    lead = (
        _pick(rng, (f"There is {art} ", f"{art} ", ""))
        if text[0].isdigit()
        else _pick(rng, (f"There is {art} ", f"{art} "))
    )
    text = lead + text
    return text[0].upper() + text[1:] + "."


def _article(text: str) -> str:
    """``a`` or ``an`` before ``text`` (``an 8 mm``, ``an 11 mm``, ``an 18 mm``, ``a 1.2 cm``)."""
    head = text.split(" ", 1)[0].split(".", 1)[0]
    vowel = head[:1] in ("a", "e", "i", "o", "u", "8") or head in ("11", "18")
    return "an" if vowel else "a"


def emphysema_sentence(case: PatientCase, rng: np.random.Generator) -> str:
    """Emphysema finding (``No emphysema.`` when absent, sometimes omitted)."""
    e = case.emphysema
    if e.kind == "none":
        return _pick(rng, ("No emphysema.", "", "No emphysema or interstitial lung disease."))
    if e.kind == "paraseptal":
        return _pick(rng, ("Paraseptal emphysema along the pleural surfaces.", "Mild paraseptal emphysema."))
    sev = "Mild" if e.extent < 0.08 else "Moderate" if e.extent < 0.14 else "Severe"
    return _pick(rng, (f"{sev} centrilobular emphysema, upper lobe predominant.", f"{sev} centrilobular emphysema."))


def _impression_nodule(s: NoduleState, rng: np.random.Generator) -> str:
    spec = s.spec
    desc = "calcified granuloma" if spec.kind == "calcified" else f"{_attenuation(s, rng)[0]} nodule"
    if spec.margin == "spiculated":
        desc = f"spiculated {desc}"
    text = f"{_mm(s.mean_diameter_mm, rng)} {desc} in the {lobe_phrase(spec.lobe, rng)}"
    if s.context == "growing" and s.prior_mean_mm is not None:
        text += f", increased from {_mm(s.prior_mean_mm, rng)}"
    elif s.context == "new":
        text += ", new"
    elif s.context == "stable":
        text += ", stable"
    rank = category_rank(s.lung_rads)
    if rank >= category_rank("4A"):
        text += _pick(rng, (", suspicious for malignancy", ", concerning for primary lung malignancy", ""))
    elif rank <= category_rank("2") and spec.margin != "spiculated":
        text += _pick(rng, (", likely benign", ", benign appearance", ""))
    return text[0].upper() + text[1:] + "."


def write_report(
    case: PatientCase,
    states: list[NoduleState],
    profile: CohortProfile,
    rng: np.random.Generator,
    *,
    prior: bool = False,
    images: Mapping[int, int] | None = None,
) -> str:
    """Compose the report of one study.

    Args:
        case: the patient.
        states: nodules visible on this study (largest first).
        profile: the cohort (exam title, indications).
        rng: the study's report stream.
        prior: this is the prior study (no comparison available).
        images: image (instance) number of each nodule's centre slice, by nodule id.

    Returns:
        The report text.
    """
    scan = case.prior_scan if prior else case.scan
    age = case.age - (1 if prior else 0)
    sex = "female" if case.sex == "F" else "male"
    lines = [f"EXAMINATION: {profile.description_for(scan.contrast).title().replace('Ct ', 'CT ')}."]
    indication = _pick(rng, profile.indications) if profile.indications else "Chest CT."
    smoke = f" {case.pack_years:g} pack-year smoking history." if case.pack_years > 0 else " Never smoker."
    lines.append(f"CLINICAL INDICATION: {age}-year-old {sex}. {indication}{smoke if rng.random() < 0.7 else ''}")
    lines.append(
        f"TECHNIQUE: Axial CT images of the chest {'with' if scan.contrast else 'without'} intravenous contrast, "
        f"reconstructed at "
        f"{scan.slice_thickness_mm:g} mm with a {scan.kernel} kernel. CTDIvol {scan.ctdi_vol:.1f} mGy."
    )
    prior_date = case.prior_date.isoformat()
    has_comparison = case.has_prior and not prior
    lines.append(f"COMPARISON: {'CT chest ' + prior_date + '.' if has_comparison else 'None.'}")
    findings: list[str] = []
    if states:
        if len(states) > 1:
            findings.append(f"{len(states)} pulmonary nodules are identified.")
        for s in states:
            image = (images or {}).get(s.spec.nodule_id)
            findings.append(nodule_sentence(s, rng, prior_date if has_comparison else "", image))
    else:
        findings.append(_pick(rng, _NEGATIVE))
    emph = emphysema_sentence(case, rng)
    if emph:
        findings.append(emph)
    k = int(rng.integers(1, 4))
    findings += [_OTHER[i] for i in sorted(rng.choice(len(_OTHER), size=k, replace=False))]
    lines.append("FINDINGS:")
    lines.append(" ".join(findings))
    cat = exam_category(states)
    impression: list[str] = []
    if states:
        lead = max(states, key=lambda s: (category_rank(s.lung_rads), s.mean_diameter_mm))
        impression.append(_impression_nodule(lead, rng))
        if len(states) > 1:
            impression.append(
                _pick(rng, ("Additional smaller pulmonary nodules as described.", "Other nodules as above."))
            )
    else:
        impression.append(_pick(rng, ("No pulmonary nodules.", "No suspicious pulmonary nodules.")))
    if case.emphysema.kind != "none":
        impression.append(f"{case.emphysema.kind.capitalize()} emphysema.")
    label = _pick(rng, (f"Lung-RADS {cat}", f"Lung-RADS category {cat}"))
    impression.append(f"{label}: {LUNG_RADS_WORDS[cat]}.")
    lines.append("IMPRESSION:")
    lines += [f"{i}. {t}" for i, t in enumerate(impression, start=1)]
    lines.append(f"RECOMMENDATION: {management(cat)}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PublicReport:
    """One report of the public synthetic corpus and the true nodules it describes (largest first as written)."""

    text: str
    states: list[NoduleState]


def public_reports(n: int = 2000, seed: int = 0, cohorts: Sequence[str] | None = None) -> list[PublicReport]:
    """``n`` reports of synthetic patients with their nodules, written by :func:`write_report` without rendering.

    The corpus depends only on this code and ``seed``: no site's data. Patients are drawn as a generated
    site draws them (:func:`~.patients.sample_patient`, at site seed ``PUBLIC_CORPUS_SEED_BASE + seed``),
    cycling over ``cohorts``; a patient with a prior study gives its prior report then its current one.
    The image numbers a rendered study would cite for its nodules ("(image 57)") are drawn at random
    instead.

    Args:
        n: reports to write (>= 1).
        seed: corpus seed: the same seed gives the same reports.
        cohorts: cohort profiles to draw from (default: all of :data:`~.cohorts.PROFILES`).

    Returns:
        ``n`` reports.

    Raises:
        ValueError: ``n < 1`` or an unknown cohort.
    """
    if n < 1:
        raise ValueError(f"public_reports needs n >= 1, got {n}")
    names = list(PROFILES) if cohorts is None else list(cohorts)
    unknown = [c for c in names if c not in PROFILES]
    if unknown or not names:
        raise ValueError(f"unknown cohort(s) {unknown or names}, expected some of {sorted(PROFILES)}")
    profiles = [PROFILES[c] for c in names]
    out: list[PublicReport] = []
    index = 0
    while len(out) < n:
        profile = profiles[index % len(profiles)]
        case = sample_patient(profile, PUBLIC_CORPUS_SEED_BASE + seed, index)
        index += 1
        for prior in (True, False) if case.has_prior else (False,):
            stream = case.streams[1 if prior else 0]
            states = nodule_states(case, prior=prior)
            slices = np.random.default_rng([stream, 11]).integers(8, 160, size=len(states))
            images = {s.spec.nodule_id: int(k) for s, k in zip(states, slices, strict=True)}
            rng = np.random.default_rng([stream, 7])  # the stream a generated study's report uses
            out.append(PublicReport(write_report(case, states, profile, rng, prior=prior, images=images), states))
    return out[:n]


def public_report_corpus(n: int = 2000, seed: int = 0, cohorts: Sequence[str] | None = None) -> list[str]:
    """The texts of :func:`public_reports` (same arguments, same errors).

    It is what the federation's initial model trains its report tokenizer on
    (:func:`lungvl_model.training.stages.build_public_model`).
    """
    return [r.text for r in public_reports(n, seed, cohorts)]
