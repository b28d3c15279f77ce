"""Fact check of a generated report against the measured findings and the exam's own facts.

Every sentence is read back (nodules, sizes, lobes, types, calcification, negation and Lung-RADS by the report
labeler :mod:`lungvl_model.text`; patient, technique, prior and count statements by
:mod:`lungvl_model.inference.fact_patterns`) and each fact it states gets a verdict:

* **supported**: a source gives it and agrees;
* **contradiction**: a source disagrees (a size, lobe, type, calcification or Lung-RADS category that is not
  the grounded finding's or the rule engine's; a Lung-RADS category stated with another category's descriptor,
  "Lung-RADS 4A: negative"; "no nodules" while findings are kept; a wrong count; an age,
  sex, smoking history or technique value the exam facts give otherwise; "no prior" when there is one; "no
  emphysema" where the measured LAA-950 is above the rule engine's threshold);
* **unsupported**: no source gives it (a nodule no finding matches, or any nodule when none is kept; a patient
  or technique fact :class:`~lungvl_model.inference.exam_facts.ExamFacts` does not hold; a comparison with a
  prior, or a prior date, when there is no prior; emphysema stated where the measured LAA-950 is below the
  rule engine's threshold, or when none was measured; a nodule's margin, which nothing measures: decoded
  sentences have theirs taken out, :mod:`lungvl_model.inference.unmeasured`).

Sentences with an unsupported fact are dropped from the cleaned text; contradictions are kept (a radiologist
must see them) and force deferral. A nodule sentence is *grounded* to the finding whose ``index`` is its
``.nodule`` (the explanation's attention grounding), else the one it names ("nodule 2"), else the best match
by lobe, size and type; with a single finding, an unqualified nodule mention grounds to it.

Equivalences: the lingula is part of the LUL (the labeler reads it so); "right apex"/"left apical" are the
RUL/LUL (the apex of each lung belongs to its upper lobe; the labeler reads no lobe there, this module does
when the labeler gives none); ground glass = non-solid; "subsolid" = part-solid or non-solid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from lungvl_model.inference import fact_patterns as FP
from lungvl_model.inference import fact_verdicts as V
from lungvl_model.inference.exam_facts import ExamFacts
from lungvl_model.inference.fact_verdicts import VERDICTS, FactCheckConfig, FactVerdict
from lungvl_model.inference.findings import Finding
from lungvl_model.text import labeler_patterns as LP
from lungvl_model.text.labeler import label_report, report_size_problem
from lungvl_model.text.report_labels import ReportLabels
from lungvl_model.text.report_sentences import Sentence as ReportSentence
from lungvl_model.text.report_sentences import report_sentences

__all__ = [
    "VERDICTS",
    "FactCheck",
    "FactCheckConfig",
    "FactVerdict",
    "SentenceCheck",
    "check_report",
    "fact_count_metrics",
    "fact_metrics",
    "split_report",
]


@dataclass(frozen=True)
class SentenceCheck:
    """The verdicts of one sentence."""

    index: int
    text: str
    nodule: int | None
    verdicts: tuple[FactVerdict, ...]

    @property
    def kept(self) -> bool:
        """Kept in the cleaned text: no unsupported fact."""
        return not any(v.verdict == "unsupported" for v in self.verdicts)

    @property
    def status(self) -> str:
        """``contradiction`` > ``unsupported`` > ``supported``, or ``no_fact`` when it states none."""
        kinds = {v.verdict for v in self.verdicts}
        return next((k for k in ("contradiction", "unsupported", "supported") if k in kinds), "no_fact")


@dataclass(frozen=True)
class FactCheck:
    """Verdicts of a whole report."""

    sentences: tuple[SentenceCheck, ...]
    verdicts: tuple[FactVerdict, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdicts", tuple(v for s in self.sentences for v in s.verdicts))

    @property
    def n_unsupported(self) -> int:
        """Unsupported facts."""
        return sum(v.verdict == "unsupported" for v in self.verdicts)

    @property
    def n_contradictions(self) -> int:
        """Contradicted facts."""
        return sum(v.verdict == "contradiction" for v in self.verdicts)

    @property
    def kept_sentences(self) -> list[str]:
        """Sentences without an unsupported fact, in order."""
        return [s.text for s in self.sentences if s.kept]

    @property
    def cleaned_text(self) -> str:
        """The report without its sentences that state an unsupported fact."""
        return " ".join(self.kept_sentences)

    @property
    def defer(self) -> bool:
        """A contradiction forces deferral to a radiologist."""
        return self.n_contradictions > 0

    @property
    def defer_reasons(self) -> list[str]:
        """One line per contradiction, naming the sentence and both values."""
        out = []
        for v in self.verdicts:
            if v.verdict == "contradiction" and v.fact == "lung_rads_descriptor":
                out.append(
                    f"sentence {v.sentence + 1} {self.sentences[v.sentence].text!r} writes Lung-RADS {v.stated!r}: "
                    f"that descriptor is category {v.measured}'s"
                )
            elif v.verdict == "contradiction":
                where = f" (nodule {v.finding})" if v.finding is not None else ""
                out.append(
                    f"sentence {v.sentence + 1} {self.sentences[v.sentence].text!r} states {v.fact} {v.stated!r}, "
                    f"measured{where} {v.measured!r}"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "n_unsupported": self.n_unsupported,
            "n_contradictions": self.n_contradictions,
            "defer": self.defer,
            "defer_reasons": self.defer_reasons,
            "cleaned_text": self.cleaned_text,
            "verdicts": [{k: _json(v) for k, v in asdict(x).items()} for x in self.verdicts],
        }


def _json(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_json(x) for x in v]
    return v if isinstance(v, str | int | float | bool | type(None) | list) else str(v)


class SentenceLike(Protocol):
    """A generated sentence: its text and the finding index it is grounded to (None: not grounded)."""

    text: str


def split_report(text: str) -> list[ReportSentence]:
    """A report's sentences with their sections (:func:`~lungvl_model.text.report_sentences.report_sentences`)."""
    return report_sentences(text)


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------


def _check_sentence(
    i: int, unit: Any, findings: Sequence[Finding], exam: ExamFacts, rule: str | None, has_prior: bool,
    cfg: FactCheckConfig, laa950: float | None,
) -> SentenceCheck:  # fmt: skip
    text = unit if isinstance(unit, str) else str(unit.text)
    given = None if isinstance(unit, str) else getattr(unit, "nodule", None)
    base = None if isinstance(unit, str) else (getattr(unit, "section", None) or None)  # "": free text
    subs = [(s.text, s.section if (base is None or s.section != "findings") else base) for s in report_sentences(text)]
    # Nodules are read where the labeler reads them, and not in a recommendation (a future exam's wording);
    # the Lung-RADS category also there.
    mined = [t for t, sec in subs if sec not in LP.SKIP_SECTIONS and sec != "recommendation" and not FP.is_future(t)]
    labels = label_report(" ".join(mined)) if mined else ReportLabels()
    rads = [t for t, sec in subs if sec not in LP.SKIP_SECTIONS]
    if labels.lung_rads is None and rads and len(rads) > len(mined):
        labels.lung_rads = label_report(" ".join(rads)).lung_rads
    out, grounded = V.nodule_verdicts(i, text, labels, given, findings, has_prior, cfg)
    out += V.presence_verdicts(i, " ".join(mined), labels, findings)
    if labels.lung_rads is not None:
        out.append(V.lung_rads_verdict(i, labels.lung_rads, grounded, rule))
    if labels.emphysema is not None:
        out.append(V.emphysema_verdict(i, labels.emphysema, laa950))
    prior_claims: list[str] = [n.comparison for n in labels.nodules if n.comparison]
    if labels.comparison and not labels.nodules:
        prior_claims.append(labels.comparison)
    for t, sec in subs:
        future = sec == "recommendation" or FP.is_future(t)
        if sec in ("findings", "impression") and not future and labels.nodules:  # a count of pulmonary nodules
            out += V.count_verdicts(i, t, findings)
        facts = FP.patient_facts(t) + ([] if future else FP.technique_facts(t))
        out += [V.stated_verdict(i, st, exam, cfg) for st in facts]
        if future:
            continue
        out += [V.descriptor_verdict(i, st) for st in FP.lung_rads_descriptor_facts(t)]
        for st in FP.prior_facts(t, sec):
            if st.value:
                prior_claims.append(t[st.span[0] : st.span[1]].strip() or "comparison")
            else:
                out.append(
                    FactVerdict(i, "prior", "contradiction" if has_prior else "supported", "no prior", has_prior)
                )
        out += V.date_verdicts(i, t, exam, has_prior)
    if prior_claims:
        claim = "; ".join(dict.fromkeys(prior_claims))
        out.append(FactVerdict(i, "prior", "supported" if has_prior else "unsupported", claim, has_prior))
    return SentenceCheck(i, text, given, tuple(out))


def check_report(
    sentences: Sequence[str] | Sequence[SentenceLike],
    findings: Sequence[Finding],
    exam: ExamFacts,
    *,
    rule_lung_rads: str | None,
    has_prior: bool,
    tolerance: FactCheckConfig | None = None,
    emphysema_index: float | None = None,
) -> FactCheck:
    """Read every sentence back and give each fact it states a verdict.

    Args:
        sentences: the report's sentences: strings, or objects with ``.text`` and optionally ``.nodule`` (the
            ``index`` of the finding the sentence is grounded to, as
            :class:`~lungvl_model.inference.narrative.Sentence`) and ``.section`` (as :func:`split_report` gives).
        findings: the measured findings kept (``index``, sizes, lobe, type, calcification, ``lung_rads``,
            ``context``/``growth_mm`` against the prior).
        exam: the exam's patient and technique facts.
        rule_lung_rads: the rule engine's exam category (None: not computed).
        has_prior: a prior study was compared.
        tolerance: tolerances (default :class:`FactCheckConfig`).
        emphysema_index: the measured LAA-950 (None: unknown, and any statement about emphysema is
            unsupported).

    Returns:
        The verdicts, per sentence.

    Raises:
        TypeError: ``sentences`` is one string (split it with :func:`split_report`).
        ValueError: the sentences together are longer than the labeler's ``MAX_REPORT_CHARS``.
    """
    if isinstance(sentences, str):
        raise TypeError("check_report needs a sequence of sentences, got one string: use split_report(text)")
    cfg = tolerance or FactCheckConfig()
    texts = [s if isinstance(s, str) else str(s.text) for s in sentences]
    too_long = report_size_problem("".join(texts))
    if too_long is not None:
        raise ValueError(too_long)
    checks = [
        _check_sentence(i, s, findings, exam, rule_lung_rads, has_prior, cfg, emphysema_index)
        for i, s in enumerate(sentences)
    ]
    return FactCheck(tuple(checks))


def fact_metrics(checks: Sequence[FactCheck]) -> dict[str, float]:
    """Per-report fact metrics over the fact checks of an evaluation set (see :func:`fact_count_metrics`)."""
    return fact_count_metrics([c.n_unsupported for c in checks], [c.n_contradictions for c in checks])


def fact_count_metrics(unsupported: Sequence[float], contradictions: Sequence[float]) -> dict[str, float]:
    """Per-report fact metrics from each report's counts (pure; a report whose counts are NaN has no text).

    Args:
        unsupported: unsupported facts of each report ``(R,)``.
        contradictions: contradicted facts of each report ``(R,)``.

    Returns:
        ``n_reports`` (reports with counts), ``unsupported_per_report`` and ``contradictions_per_report`` (means),
        ``share_with_unsupported`` and ``share_with_contradiction`` (fraction of reports with at least one); the
        four are NaN when no report has counts.

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(unsupported) != len(contradictions):
        raise ValueError(
            f"fact_count_metrics: {len(unsupported)} unsupported counts vs {len(contradictions)} contradictions"
        )
    pairs = [(float(u), float(c)) for u, c in zip(unsupported, contradictions, strict=True)]
    pairs = [(u, c) for u, c in pairs if math.isfinite(u) and math.isfinite(c)]
    n = len(pairs)
    if n == 0:
        nan = math.nan
        return {
            "n_reports": 0.0,
            "unsupported_per_report": nan,
            "contradictions_per_report": nan,
            "share_with_unsupported": nan,
            "share_with_contradiction": nan,
        }
    return {
        "n_reports": float(n),
        "unsupported_per_report": sum(u for u, _ in pairs) / n,
        "contradictions_per_report": sum(c for _, c in pairs) / n,
        "share_with_unsupported": sum(u > 0 for u, _ in pairs) / n,
        "share_with_contradiction": sum(c > 0 for _, c in pairs) / n,
    }
