"""Verdicts of single facts: a stated nodule, count, category, patient, technique or prior fact against its source.

The pieces of :func:`lungvl_model.inference.fact_check.check_report`: each function compares what one sentence
states (read by the report labeler or :mod:`lungvl_model.inference.fact_patterns`) with the measured findings,
the rule engine's category or :class:`~lungvl_model.inference.exam_facts.ExamFacts`, and returns
:class:`FactVerdict` s. Tolerances are in :class:`FactCheckConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lungvl_model.clinical.lung_rads import category_rank
from lungvl_model.inference import fact_patterns as FP
from lungvl_model.inference.anatomy import EMPHYSEMA_LAA
from lungvl_model.inference.exam_facts import ExamFacts
from lungvl_model.inference.findings import Finding
from lungvl_model.text import labeler_patterns as LP
from lungvl_model.text.report_labels import LabeledNodule, ReportLabels
from lungvl_model.text.sentence_spans import find_lobes

__all__ = [
    "VERDICTS",
    "FactCheckConfig",
    "FactVerdict",
    "comparison_verdict",
    "count_verdicts",
    "date_verdicts",
    "descriptor_verdict",
    "emphysema_verdict",
    "lung_rads_verdict",
    "nodule_verdicts",
    "presence_verdicts",
    "stated_verdict",
]

VERDICTS: tuple[str, ...] = ("supported", "unsupported", "contradiction")
_TYPE_SETS: dict[str, frozenset[str]] = {
    "solid": frozenset({"solid"}),
    "part_solid": frozenset({"part_solid"}),
    "non_solid": frozenset({"non_solid"}),
    "subsolid": frozenset({"part_solid", "non_solid"}),
}


@dataclass(frozen=True)
class FactCheckConfig:
    """Tolerances of the fact check.

    Attributes:
        size_abs_mm: a stated nodule size matches a measured diameter within ``max(size_abs_mm, size_rel x
            measured)``. 1.5 mm is the inter-reader variability of manual diameters of small nodules (and the
            Lung-RADS growth threshold: a smaller difference is not a change a reader can claim); Lung-RADS
            rounds the mean diameter to 0.1 mm, far below it.
        size_rel: the relative part for large nodules, whose reader variability grows with size (~15 %).
        slice_abs_mm: a stated slice thickness matches within ``max(slice_abs_mm, slice_rel x header)`` (1.25 mm
            written "1.3 mm").
        slice_rel: relative part of the slice tolerance.
        age_years: allowed difference between a stated and the header age (0: the header's age at the study).
        pack_years_abs: allowed pack-year difference (a half pack-year is rounding).
        ctdi_rel: relative CTDIvol tolerance (the header's two decimals written with one).
        kvp_abs: allowed kVp difference.
    """

    size_abs_mm: float = 1.5
    size_rel: float = 0.15
    slice_abs_mm: float = 0.06
    slice_rel: float = 0.05
    age_years: int = 0
    pack_years_abs: float = 0.5
    ctdi_rel: float = 0.05
    kvp_abs: float = 0.5

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"FactCheckConfig.{key} must be a finite number >= 0, got {value!r}")
        if self.size_rel >= 1 or self.slice_rel >= 1 or self.ctdi_rel >= 1:
            raise ValueError(
                f"FactCheckConfig relative tolerances must be < 1, got size_rel={self.size_rel}, "
                f"slice_rel={self.slice_rel}, ctdi_rel={self.ctdi_rel}"
            )

    def to_dict(self) -> dict[str, float]:
        """Plain dict (round-trips through ``FactCheckConfig(**d)``)."""
        return asdict(self)

    def size_close(self, stated: float, measured: float) -> bool:
        """Whether a stated size (mm) matches a measured diameter (mm)."""
        return abs(stated - measured) <= max(self.size_abs_mm, self.size_rel * measured) + 1e-9


@dataclass(frozen=True)
class FactVerdict:
    """One fact stated by one sentence and what the sources say about it.

    Attributes:
        sentence: index of the sentence.
        fact: what kind of fact (``size``, ``lobe``, ``type``, ``calcified``, ``margin``, ``lung_rads``,
            ``lung_rads_descriptor`` (the category its descriptor names), ``nodule``,
            ``nodule_present``, ``nodule_count``, ``comparison``, ``prior``, ``prior_date``, ``study_date``, or a
            :class:`~lungvl_model.inference.fact_patterns.Stated` fact).
        verdict: ``supported`` | ``unsupported`` | ``contradiction``.
        stated: the value as read from the sentence.
        measured: the source's value (None when there is none).
        finding: ``index`` of the grounded finding, if any.
    """

    sentence: int
    fact: str
    verdict: str
    stated: Any
    measured: Any = None
    finding: int | None = None

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"FactVerdict.verdict must be one of {VERDICTS}, got {self.verdict!r}")


# ------------------------------------------------------------------------------------------------
# Nodule facts
# ------------------------------------------------------------------------------------------------


def _stated_types(n: LabeledNodule, text: str) -> str | None:
    if n.type is not None:
        return n.type
    return "subsolid" if FP.stated_subsolid(text) else None


def _size_match(dims: tuple[float, ...], f: Finding, cfg: FactCheckConfig) -> tuple[bool, Any]:
    """Whether stated dims match finding ``f``, and the measured value(s) compared.

    One number is a nodule's size: its mean diameter (Lung-RADS v2022) or its longest diameter (the common
    habit), never the short axis alone (a 31 x 26 mm nodule is not "a 23 mm nodule"). Two numbers are the
    longest and short axes.
    """
    if len(dims) == 1:
        measured = (f.longest_diameter_mm, f.mean_diameter_mm)
        best = min(measured, key=lambda m: abs(m - dims[0]))
        return cfg.size_close(dims[0], best), round(best, 1)
    big, small = max(dims), min(dims)
    ok = cfg.size_close(big, f.longest_diameter_mm) and cfg.size_close(small, f.short_axis_mm)
    return ok, (round(f.longest_diameter_mm, 1), round(f.short_axis_mm, 1))


def _dims(n: LabeledNodule) -> tuple[float, ...]:
    if n.dims_mm:
        return tuple(float(d) for d in n.dims_mm)
    return (float(n.size_mm),) if n.size_mm is not None else ()


def _ground(
    n: LabeledNodule,
    lobe: str | None,
    ntype: str | None,
    findings: Sequence[Finding],
    cfg: FactCheckConfig,
    alone: bool,
    has_prior: bool,
) -> Finding | None:
    """The finding a nodule mention describes.

    The finding with the most agreeing minus disagreeing stated attributes (lobe, size, type, calcification, and
    the comparison with the prior when there is one), provided one of the first four agrees; ties go to the
    closest size. With
    no such finding, the only finding when the mention is not "another" (``alone``), else None.
    """
    dims = _dims(n)
    comp = n.comparison if has_prior else None
    best, best_key = None, None
    for f in findings:
        checks = [
            (lobe, lobe == f.lobe),
            (dims or None, bool(dims) and _size_match(dims, f, cfg)[0]),
            (ntype, ntype is not None and f.type in _TYPE_SETS[ntype]),
            (n.calcified, n.calcified == f.calcified),
        ]
        core = sum(ok for stated, ok in checks if stated is not None)
        checks.append((comp, comp is not None and comparison_verdict(comp, f) == "supported"))
        agree = sum(ok for stated, ok in checks if stated is not None)
        conflict = sum(not ok for stated, ok in checks if stated is not None)
        err = min(abs(max(dims) - f.longest_diameter_mm), abs(max(dims) - f.mean_diameter_mm)) if dims else 0.0
        key = (agree - conflict, agree, -err)
        if core > 0 and (best_key is None or key > best_key):
            best, best_key = f, key
    if best is None and alone and len(findings) == 1:
        return findings[0]
    return best


def nodule_verdicts(
    i: int, text: str, labels: ReportLabels, given: int | None, findings: Sequence[Finding],
    has_prior: bool, cfg: FactCheckConfig,
) -> tuple[list[FactVerdict], list[Finding]]:  # fmt: skip
    """Verdicts of the nodules the labeler read from sentence ``i``: size, lobe, type, calcification, margin, ...

    ... and comparison. Each nodule is grounded (module :mod:`~lungvl_model.inference.fact_check` docstring); one
    no finding matches, or any when none is kept, is an unsupported ``nodule`` fact.

    Returns:
        ``(verdicts, the grounded findings)``.
    """
    out: list[FactVerdict] = []
    grounded: list[Finding] = []
    by_index = {f.index: f for f in findings}
    single = len(labels.nodules) == 1
    for n in labels.nodules:
        lobe = n.lobe or (FP.apex_lobe(text) if single else None)
        ntype = _stated_types(n, text)
        dims = _dims(n)
        described = {"size_mm": dims or None, "lobe": lobe, "type": ntype, "calcified": n.calcified}
        stated = {k: v for k, v in described.items() if v is not None} or "a nodule"
        if not findings:
            out.append(FactVerdict(i, "nodule", "unsupported", stated, "no nodule kept"))
            continue
        f = by_index.get(given) if (given is not None and single) else None
        ref = FP.ordinal_reference(text) if single else None
        f = f or (by_index.get(ref) if ref is not None else None)
        alone = not LP.ANOTHER_RE.search(n.evidence or text)
        f = f or _ground(n, lobe, ntype, findings, cfg, alone, has_prior)
        if f is None:
            if stated == "a nodule":
                out.append(FactVerdict(i, "nodule", "supported", stated, f"{len(findings)} finding(s)"))
            else:
                out.append(FactVerdict(i, "nodule", "unsupported", stated, "no matching finding"))
            continue
        grounded.append(f)
        k = f.index
        if dims:
            ok, measured = _size_match(dims, f, cfg)
            out.append(FactVerdict(i, "size", "supported" if ok else "contradiction", dims, measured, k))
        if lobe is not None:
            verdict = "unsupported" if not f.lobe else ("supported" if lobe == f.lobe else "contradiction")
            out.append(FactVerdict(i, "lobe", verdict, lobe, f.lobe or None, k))
        if ntype is not None:
            verdict = "supported" if f.type in _TYPE_SETS[ntype] else "contradiction"
            out.append(FactVerdict(i, "type", verdict, ntype, f.type, k))
        if n.calcified is not None:
            verdict = "supported" if n.calcified == f.calcified else "contradiction"
            out.append(FactVerdict(i, "calcified", verdict, n.calcified, f.calcified, k))
        if n.margin is not None:  # no measurement gives a margin (lungvl_model.inference.unmeasured)
            out.append(FactVerdict(i, "margin", "unsupported", n.margin, None, k))
        if n.comparison is not None and has_prior:
            out.append(FactVerdict(i, "comparison", comparison_verdict(n.comparison, f), n.comparison, f.context, k))
        if stated == "a nodule":
            out.append(FactVerdict(i, "nodule", "supported", stated, None, k))
    return out, grounded


def comparison_verdict(stated: str, f: Finding) -> str:
    """Verdict of a stated comparison (``new``/``stable``/``growing``) with the grounded finding's prior.

    ``new`` contradicts a nodule seen on the prior; ``stable`` one that is new or grew > 1.5 mm (the Lung-RADS
    growth threshold); ``growing`` one that is new or did not grow (< 0.5 mm); without a prior match, unsupported.
    """
    if f.context == "new":
        return "supported" if stated == "new" else "contradiction"
    if f.prior_mean_diameter_mm is None or f.growth_mm is None:
        return "unsupported"
    if stated == "new":
        return "contradiction"
    if stated == "stable":
        return "contradiction" if f.growth_mm > 1.5 else "supported"
    return "contradiction" if f.growth_mm < 0.5 else "supported"


def presence_verdicts(i: int, text: str, labels: ReportLabels, findings: Sequence[Finding]) -> list[FactVerdict]:
    """Verdict of a negated nodule statement ("no pulmonary nodules", "lungs are clear") against the findings.

    "No suspicious nodules" is contradicted only by a finding of category 4A or higher; "otherwise clear" says
    nothing about nodules described elsewhere.
    """
    if labels.nodule_present is not False or labels.nodules:
        return []
    if not findings:
        return [FactVerdict(i, "nodule_present", "supported", False, 0)]
    if FP.otherwise_clear(text):
        return []
    q = FP.negation_qualifier(text)
    if q is not None:
        worst = max((f.lung_rads for f in findings if f.lung_rads), key=category_rank, default=None)
        bad = worst is not None and category_rank(worst) >= category_rank("4A")
        return [FactVerdict(i, "nodule_present", "contradiction" if bad else "supported", f"no {q} nodule", worst)]
    return [FactVerdict(i, "nodule_present", "contradiction", False, len(findings))]


def count_verdicts(i: int, text: str, findings: Sequence[Finding]) -> list[FactVerdict]:
    """Verdicts of the nodule counts of a sentence.

    An exact count must equal the findings kept (or those in the lobes the sentence names), "multiple" needs
    two, "two additional" fewer than the total.
    """
    out = []
    total = len(findings)
    lobes = {c for _, _, codes in find_lobes(text) for c in codes}
    in_lobes = sum(f.lobe in lobes for f in findings)
    for st in FP.count_facts(text):
        n, kind = st.value
        if not findings:
            continue  # the nodule mention itself is unsupported
        if kind == "at_least":
            ok = total >= n
        elif kind == "subset":
            ok = n < total
        else:
            ok = n == total or (bool(lobes) and n == in_lobes)
        out.append(FactVerdict(i, "nodule_count", "supported" if ok else "contradiction", st.value, total))
    return out


def descriptor_verdict(i: int, st: FP.Stated) -> FactVerdict:
    """A Lung-RADS category and the descriptor written with it must name the same category.

    ``st`` is a :func:`~lungvl_model.inference.fact_patterns.lung_rads_descriptor_facts` fact; the sentence
    contradicts itself when the descriptor belongs to another category ("Lung-RADS 4A: negative").
    """
    cat, desc, names = st.value
    verdict = "supported" if cat in names else "contradiction"
    return FactVerdict(i, "lung_rads_descriptor", verdict, f"{cat}: {desc}", "/".join(sorted(names)))


def emphysema_verdict(i: int, stated: bool, laa950: float | None) -> FactVerdict:
    """A stated emphysema (or its absence) against the measured emphysema index.

    The source is LAA-950 (the lung fraction below −950 HU, :func:`~lungvl_model.inference.anatomy.emphysema_index`)
    read against :data:`~lungvl_model.inference.anatomy.EMPHYSEMA_LAA`, the threshold the rule engine uses.
    Emphysema stated where the index is below it is *unsupported* (mild emphysema can sit below any LAA
    threshold, so it is not called wrong, but nothing measured backs it: the sentence is dropped); "no
    emphysema" where the index is above it is a *contradiction*; no index (no lungs found): unsupported.
    """
    if laa950 is None or not math.isfinite(laa950):
        return FactVerdict(i, "emphysema", "unsupported", stated, None)
    measured = laa950 > EMPHYSEMA_LAA
    if stated == measured:
        return FactVerdict(i, "emphysema", "supported", stated, round(laa950, 4))
    return FactVerdict(i, "emphysema", "unsupported" if stated else "contradiction", stated, round(laa950, 4))


def lung_rads_verdict(i: int, stated: str, grounded: list[Finding], rule: str | None) -> FactVerdict:
    """A stated category is supported when it is the rule engine's exam category or a grounded finding's."""
    known = [f.lung_rads for f in grounded if f.lung_rads] + ([rule] if rule else [])
    if not known:
        return FactVerdict(i, "lung_rads", "unsupported", stated, None)
    measured = rule if rule is not None else known[0]
    k = grounded[0].index if grounded else None
    return FactVerdict(i, "lung_rads", "supported" if stated in known else "contradiction", stated, measured, k)


# ------------------------------------------------------------------------------------------------
# Patient, technique and prior facts
# ------------------------------------------------------------------------------------------------


def _compare(i: int, st: FP.Stated, measured: Any, same: bool) -> FactVerdict:
    if measured is None:
        return FactVerdict(i, st.fact, "unsupported", st.value, None)
    return FactVerdict(i, st.fact, "supported" if same else "contradiction", st.value, measured)


def _smoking_verdict(i: int, st: FP.Stated, exam: ExamFacts) -> FactVerdict:
    status, pack = exam.smoking_status, exam.pack_years
    if status is not None:
        same = st.value == status or (st.value == "ever" and status != "never")
        return _compare(i, st, status, same)
    if pack is None:
        return _compare(i, st, None, False)
    ever = pack > 0
    if st.value in ("former", "current") and ever:
        return FactVerdict(i, "smoking", "unsupported", st.value, f"{pack:g} pack-years")
    return _compare(i, st, f"{pack:g} pack-years", (st.value == "never") != ever)


def stated_verdict(i: int, st: FP.Stated, exam: ExamFacts, cfg: FactCheckConfig) -> FactVerdict:
    """Verdict of a patient or technique fact against the exam facts, within the tolerances.

    Facts as :func:`~lungvl_model.inference.fact_patterns.patient_facts` and
    :func:`~lungvl_model.inference.fact_patterns.technique_facts` read them; collimation, DLP/mAs/mSv and the
    reconstruction method are not among the header values read, so always unsupported.
    """
    v = st.value
    if st.fact == "age":
        a = exam.patient_age_years
        return _compare(i, st, a, a is not None and abs(v - a) <= cfg.age_years)
    if st.fact == "sex":
        return _compare(i, st, exam.patient_sex, v == exam.patient_sex)
    if st.fact == "pack_years":
        p = exam.pack_years
        return _compare(i, st, p, p is not None and abs(v - p) <= cfg.pack_years_abs)
    if st.fact == "smoking":
        return _smoking_verdict(i, st, exam)
    if st.fact == "slice_thickness":
        t = exam.slice_thickness_mm
        if v == "thin":
            return _compare(i, st, t, t is not None and t <= 1.5)
        return _compare(i, st, t, t is not None and abs(v - t) <= max(cfg.slice_abs_mm, cfg.slice_rel * t) + 1e-9)
    if st.fact == "kernel":
        return _kernel_verdict(i, st, exam.kernel)
    if st.fact in ("contrast", "low_dose"):
        m = getattr(exam, st.fact)
        return _compare(i, st, m, v == m)
    if st.fact == "ctdi":
        c = exam.ctdi_vol_mgy
        return _compare(i, st, c, c is not None and abs(v - c) <= max(0.05, cfg.ctdi_rel * c) + 1e-9)
    if st.fact == "kvp":
        k = exam.kvp
        return _compare(i, st, k, k is not None and abs(v - k) <= cfg.kvp_abs)
    # collimation, DLP/mAs/mSv, reconstruction method: not among the header values read
    return FactVerdict(i, st.fact, "unsupported", v, None)


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _kernel_verdict(i: int, st: FP.Stated, header: str | None) -> FactVerdict:
    if header is None:
        return _compare(i, st, None, False)
    if _norm(st.value) == _norm(header):
        return _compare(i, st, header, True)
    a, b = FP.kernel_family(st.value), FP.kernel_family(header)
    if a is None or b is None:
        return FactVerdict(i, "kernel", "unsupported", st.value, header)
    return _compare(i, st, header, a == b)


def date_verdicts(i: int, text: str, exam: ExamFacts, has_prior: bool) -> list[FactVerdict]:
    """Dates of a sentence: the study date, else a prior date (unsupported without a prior or its date)."""
    out = []
    for d in FP.date_facts(text):
        stated = text[d.span[0] : d.span[1]]
        sd, pd = exam.study_date, exam.prior_study_date
        if sd is not None and d.matches(sd.year, sd.month, sd.day):
            out.append(FactVerdict(i, "study_date", "supported", stated, sd.isoformat()))
        elif not has_prior or pd is None:
            out.append(FactVerdict(i, "prior_date", "unsupported", stated, None))
        else:
            ok = d.matches(pd.year, pd.month, pd.day)
            out.append(FactVerdict(i, "prior_date", "supported" if ok else "contradiction", stated, pd.isoformat()))
    return out
