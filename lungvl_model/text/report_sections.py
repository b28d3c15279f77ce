"""What the report decoder learns to write: the FINDINGS and IMPRESSION sections, one finding at a time.

A report's EXAMINATION / CLINICAL INDICATION / TECHNIQUE / COMPARISON / RECOMMENDATION lines state facts
no image can predict (age, sex, pack-years, kernel, dose, dates); the decoder must never generate them
from nothing, so its targets keep the FINDINGS and IMPRESSION sections only (:func:`decoder_target`).
Exam and patient sentences come from the DICOM header instead (``lungvl_model.inference.exam_facts``).

For the finding-slot decoder, :func:`finding_targets` splits FINDINGS into sentences and assigns each
nodule sentence to the nodule it describes (matched by the labeler's size and lobe against the nodule's
labelled mean diameter and lobe, falling back to order), and keeps the negative sentence ("No pulmonary
nodules.") and the IMPRESSION text. Image-number references ("(image 72)") are removed from nodule
sentences: no slot carries them. The prior study's date is no image fact either (the exam sentences
state it, from the header): comparison clauses lose it (:func:`strip_comparison_dates`, "stable since
2022-01-13" -> "stable compared with the prior"), so the slot's comparison attributes (context, growth,
prior diameter) are all a target sentence needs. All functions are pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lungvl_model.text import labeler_patterns as P
from lungvl_model.text.labeler import label_report
from lungvl_model.text.report_sentences import report_sentences, section_of

__all__ = [
    "DECODER_SECTIONS",
    "FindingTargets",
    "decoder_target",
    "finding_targets",
    "section_blocks",
    "section_text",
    "strip_comparison_dates",
    "strip_image_refs",
]

#: Sections the decoder writes; every other section is dropped from its targets.
DECODER_SECTIONS: tuple[str, ...] = ("findings", "impression")
#: Largest relative size difference between a sentence's size and a nodule's mean diameter that still
#: matches (sentences give the mean diameter, "12 x 9 mm" or a rounded "1.2 cm").
SIZE_TOLERANCE = 0.35


def section_blocks(text: str) -> list[tuple[str, str, str]]:
    """The headed sections of a report in order.

    Args:
        text: the report.

    Returns:
        ``[(section, header, body)]``: ``section`` the canonical name (``"findings"``, ``"impression"``,
        ``"history"``, ``"technique"``, ``"comparison"``, ``"recommendation"``), ``header`` the header as
        written (``"FINDINGS:"``), ``body`` the stripped text up to the next header. Text before the first
        header is a ``"findings"`` block with an empty header; an empty list for an empty report.
    """
    heads = sorted([*P.HEADER_LINE_RE.finditer(text), *P.HEADER_INLINE_RE.finditer(text)], key=lambda m: m.start())
    picked: list[re.Match[str]] = []
    for m in heads:
        if not picked or m.start() >= picked[-1].end():
            picked.append(m)
    out: list[tuple[str, str, str]] = []
    lead = text[: picked[0].start()] if picked else text
    if lead.strip():
        out.append(("findings", "", lead.strip()))
    for i, m in enumerate(picked):
        stop = picked[i + 1].start() if i + 1 < len(picked) else len(text)
        out.append((section_of(m.group("name")), m.group(0).strip(), text[m.end() : stop].strip()))
    return out


def decoder_target(text: str) -> str:
    """The part of a report the decoder learns: its FINDINGS and IMPRESSION sections, headers kept.

    A report without any recognised header is kept whole (stripped); a headed report without a FINDINGS
    or IMPRESSION section gives ``""``.

    Args:
        text: the report.

    Returns:
        The kept sections, one header line + body block per section, joined by newlines.
    """
    blocks = section_blocks(text)
    if not any(header for _, header, _ in blocks):
        return text.strip()
    kept = [f"{header}\n{body}".strip() for sec, header, body in blocks if sec in DECODER_SECTIONS and body]
    return "\n".join(kept)


_IMAGE_REF_RE = re.compile(r"\s*\((?:series\s*\d+\s*,\s*)?(?:image|img|im)\.?\s*#?\s*\d+\)", re.I)


def strip_image_refs(sentence: str) -> str:
    """``sentence`` without image-number references such as ``(image 72)`` (no slot knows them)."""
    return _IMAGE_REF_RE.sub("", sentence)


_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
#: A calendar date: ISO ``2022-01-13`` / ``2022/01/13``, ``01/13/2022``, ``13.01.2022``, ``January 13, 2022``,
#: ``13 Jan 2022``, ``Jan 2022``.
_DATE = (
    r"(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH},?\s+\d{{4}}"
    rf"|{_MONTH},?\s+\d{{4}})"
)
#: How a report names the prior study around its date ("the prior CT chest", "study", "LDCT").
_STUDY = (
    r"(?:(?:low[- ]dose\s+)?(?:chest\s+CT|CT\s+(?:of\s+the\s+)?chest|CT\s+scan|LDCT|CT|study|exam(?:ination)?"
    r"|scan|imaging)(?:\s+chest)?)"
)
_BEFORE_DATE = rf"(?:the\s+)?(?:(?:prior|previous|last)\s+)?(?:{_STUDY}\s+)?(?:(?:dated|of|from|on)\s+)?"
_AFTER_DATE = rf"(?:\s+{_STUDY})?"
_STABLE_SINCE_RE = re.compile(rf"\b(stable|unchanged)\s+since\s+{_BEFORE_DATE}{_DATE}{_AFTER_DATE}", re.I)
_PREP_DATE_RE = re.compile(
    rf"\b(since|from|compared\s+(?:with|to)|relative\s+to|versus|vs\.?|on)\s+{_BEFORE_DATE}{_DATE}{_AFTER_DATE}",
    re.I,
)
_PAREN_DATE_RE = re.compile(rf"\s*\(\s*(?:(?:dated|on)\s+)?{_DATE}\s*\)", re.I)
_DATED_RE = re.compile(rf",?\s+dated\s+{_DATE}", re.I)
_BARE_DATE_RE = re.compile(rf"\b{_BEFORE_DATE}{_DATE}{_AFTER_DATE}", re.I)


def strip_comparison_dates(sentence: str) -> str:
    """``sentence`` with the prior study's date taken out of its comparison clauses.

    ``stable/unchanged since <date>`` becomes ``… compared with the prior``; ``<preposition> [the prior CT
    chest] [dated] <date> [CT]`` becomes ``<preposition> the prior`` ("new since 2022-01-13" -> "new since
    the prior", "unchanged from CT chest 2021-05-02" -> "unchanged from the prior"); a parenthesised or
    "dated" date is dropped and any other date becomes "the prior", so the result holds no date.

    Args:
        sentence: one report sentence.

    Returns:
        The sentence without dates (unchanged when it has none).
    """
    out = _STABLE_SINCE_RE.sub(lambda m: f"{m.group(1)} compared with the prior", sentence)
    out = _PREP_DATE_RE.sub(lambda m: f"{m.group(1)} the prior", out)
    out = _PAREN_DATE_RE.sub("", out)
    out = _DATED_RE.sub("", out)
    return _BARE_DATE_RE.sub("the prior", out)


def section_text(text: str, section: str) -> str:
    """The bodies of the report's ``section`` blocks joined by a space (``""`` when it has none)."""
    return " ".join(body for sec, _, body in section_blocks(text) if sec == section and body)


@dataclass(frozen=True)
class FindingTargets:
    """Decoder targets of one report for the finding-slot decoder.

    Attributes:
        sentences: per nodule (in the order given), the FINDINGS sentence that describes it, or None.
        negative: the FINDINGS sentence stating that there is no nodule (None when there is none).
        impression: the IMPRESSION body (``""`` when the report has none).
    """

    sentences: tuple[str | None, ...]
    negative: str | None
    impression: str


def _matches(size: float | None, lobe: str | None, diameter: float, nodule_lobe: str) -> bool:
    if lobe is not None and nodule_lobe and lobe != nodule_lobe:
        return False
    if size is None or math.isnan(diameter) or diameter <= 0:
        return True
    return abs(size - diameter) <= SIZE_TOLERANCE * max(diameter, 1.0) + 1.0


def finding_targets(text: str, diameters_mm: Sequence[float], lobes: Sequence[str]) -> FindingTargets:
    """Assign the FINDINGS sentences of a report to its nodules.

    A nodule sentence is one from which the labeler reads a nodule with a size or a lobe (a count such as
    "2 pulmonary nodules are identified." is not). Sentences are matched in report order to the first
    still-unassigned nodule whose lobe agrees and whose mean diameter is within :data:`SIZE_TOLERANCE`
    of the sentence's size; when nothing matches but the numbers of nodule sentences and nodules are
    equal, the sentence takes the nodule of the same rank (the synthetic generator writes them largest
    first, the order :func:`~lungvl_model.data.targets.nodule_attributes` uses). Every kept text has its
    dates removed (:func:`strip_comparison_dates`) and nodule sentences their image references.

    Args:
        text: the report.
        diameters_mm: labelled mean diameter of each nodule (NaN unknown), in slot order.
        lobes: labelled lobe code of each nodule (``""`` unknown), in slot order.

    Returns:
        :class:`FindingTargets`.

    Raises:
        ValueError: when ``diameters_mm`` and ``lobes`` differ in length.
    """
    if len(diameters_mm) != len(lobes):
        raise ValueError(f"diameters_mm has {len(diameters_mm)} nodules, lobes {len(lobes)}")
    findings = [s.text for s in report_sentences(text) if s.section == "findings" and not s.extrapulmonary]
    nodule_sents: list[tuple[str, float | None, str | None]] = []
    negatives: list[str] = []
    for s in findings:
        lab = label_report(s)
        described = [n for n in lab.nodules if n.size_mm is not None or n.lobe is not None]
        if described:
            n = described[0]
            nodule_sents.append((strip_comparison_dates(strip_image_refs(s)), n.size_mm, n.lobe))
        elif lab.nodule_present is False:
            negatives.append(strip_comparison_dates(s))
    assigned: list[str | None] = [None] * len(diameters_mm)
    same_count = len(nodule_sents) == len(diameters_mm)
    for rank, (s, size, lobe) in enumerate(nodule_sents):
        free = [k for k in range(len(assigned)) if assigned[k] is None]
        hit = next((k for k in free if _matches(size, lobe, float(diameters_mm[k]), lobes[k])), None)
        if hit is None and same_count and assigned[rank] is None:
            hit = rank
        if hit is not None:
            assigned[hit] = s
    negative = next((s for s in negatives if "nodul" in s.lower()), negatives[0] if negatives else None)
    return FindingTargets(tuple(assigned), negative, strip_comparison_dates(section_text(text, "impression")))
