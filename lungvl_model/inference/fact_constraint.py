"""Fact-constrained decoding: where to restart a generated text that states a fact its finding contradicts.

A sentence that states a size, a lobe, an attenuation type or a Lung-RADS category the fact check contradicts
(``"measuring 23 mm"`` for a finding of 28.4 mm mean diameter, ``"in the LUL"`` for a finding in the RLL,
``"Lung-RADS 4A"`` where the rule engine gives 3) is decoded again with its beginning forced: the text up to that
fact, the fact rewritten to the grounded finding's (or the rule engine's) value **in the form the decoder chose**
(``23 mm`` → ``28 mm``, ``2.3 cm`` → ``2.8 cm``, ``12 x 9 mm`` → ``14 x 10 mm``, ``LUL`` → ``RLL``, ``left upper
lobe`` → ``right lower lobe``, ``solid`` → ``ground-glass``, ``Lung-RADS category 4A`` → ``Lung-RADS category
3``), and the decoder writes the rest itself (:meth:`lungvl_model.models.decoder.ReportDecoder.generate`
``forced``). The decoder decides which facts are stated, where and how; only a contradicted value is constrained
to the measurement. A contradicted comparison with the prior is rewritten as the finding's (``enlarged from 1.2
cm`` → ``stable``, ``stable`` → ``increased from 9 mm``, → ``new``) and a Lung-RADS descriptor that names another
category as the category's own (``Lung-RADS 3: benign appearance or behavior`` → ``Lung-RADS 3: probably
benign``). Calcification and lobe phrasings with no one-to-one rewrite (the lingula, "upper right lobe",
translated abbreviations) are left to the N-best choice and to deferral.

The size restated is the one the report conventions use (:mod:`lungvl_model.data.synth.reports`, and
Lung-RADS v2022): one number is the mean diameter, two are the longest and short-axis diameters.

Pure functions, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lungvl_model.inference import fact_patterns as FP
from lungvl_model.inference.fact_check import FactCheck
from lungvl_model.inference.findings import Finding
from lungvl_model.text import labeler_patterns as LP

__all__ = [
    "COMPARISON_RES",
    "SIZE_RE",
    "StatedSize",
    "find_stated_size",
    "format_like",
    "comparison_words",
    "restate_comparison",
    "restate_descriptor",
    "restate_lobe",
    "restate_lung_rads",
    "restate_size",
    "restate_type",
    "restated_start",
]

#: A size with its unit: ``23 mm``, ``2.3 cm``, ``12 x 9 mm``, ``12x9mm``, ``12 × 9 mm``.
SIZE_RE = re.compile(
    r"(?<![\d.])(?P<a>\d{1,3}(?:\.\d{1,2})?)(?:\s*[x×]\s*(?P<b>\d{1,3}(?:\.\d{1,2})?))?\s*(?P<unit>mm|cm)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class StatedSize:
    """One size written in a text.

    Attributes:
        start: index of its first digit.
        end: index just after its unit.
        values: the numbers as written (one, or long and short).
        unit: ``mm`` or ``cm`` (lower case).
    """

    start: int
    end: int
    values: tuple[str, ...]
    unit: str

    @property
    def mm(self) -> tuple[float, ...]:
        """The numbers in millimetres."""
        f = 10.0 if self.unit == "cm" else 1.0
        return tuple(float(v) * f for v in self.values)


def find_stated_size(text: str, stated_mm: Sequence[float], *, tol_mm: float = 0.05) -> StatedSize | None:
    """The first size in ``text`` whose numbers are ``stated_mm`` (as the report labeler read them).

    Args:
        text: one sentence or a whole generated text.
        stated_mm: the size read back, in mm (one number, or two in any order).
        tol_mm: how close a written number must be to a stated one.

    Returns:
        The size, or None when no size of the text has those numbers.
    """
    want = sorted(float(v) for v in stated_mm)
    for m in SIZE_RE.finditer(text):
        values = tuple(v for v in (m.group("a"), m.group("b")) if v is not None)
        size = StatedSize(m.start(), m.end(), values, m.group("unit").lower())
        got = sorted(size.mm)
        if len(got) == len(want) and all(abs(g - w) <= tol_mm for g, w in zip(got, want, strict=True)):
            return size
    return None


def format_like(written: str, unit: str, value_mm: float) -> str:
    """``value_mm`` written as ``written`` was: same unit, same number of decimals (cm: at least one).

    Args:
        written: a number as the decoder wrote it (``"23"``, ``"2.3"``, ``"5.5"``).
        unit: ``mm`` or ``cm``.
        value_mm: the measurement in mm (> 0).

    Returns:
        The number's text, never below the smallest value the precision can write (``1``, ``0.1``).

    Raises:
        ValueError: a measurement that is not a finite number > 0, or an unknown unit.
    """
    if not (math.isfinite(value_mm) and value_mm > 0):
        raise ValueError(f"format_like: value_mm must be a finite number > 0, got {value_mm!r}")
    if unit not in ("mm", "cm"):
        raise ValueError(f"format_like: unit must be 'mm' or 'cm', got {unit!r}")
    decimals = len(written.split(".")[1]) if "." in written else 0
    if unit == "cm":
        decimals = max(decimals, 1)
    value = value_mm / 10.0 if unit == "cm" else value_mm
    smallest = 10.0**-decimals
    return f"{max(round(value, decimals), smallest):.{decimals}f}"


def _capital_like(written: str, word: str) -> str:
    """``word`` with an initial capital when ``written`` starts with one."""
    return word[0].upper() + word[1:] if written[:1].isupper() else word


def _unit_gap(written: str) -> str:
    """The space between number and unit in a written size (``"23 mm"`` → ``" "``, ``"23mm"`` → ``""``)."""
    return " " if re.search(r"\d\s+(?:mm|cm)$", written, re.IGNORECASE) else ""


def restate_size(text: str, stated_mm: Sequence[float], target_mm: Sequence[float]) -> str | None:
    """The beginning of ``text`` up to its stated size, with the size rewritten to ``target_mm``.

    Args:
        text: the generated text (a sentence, or an IMPRESSION's sentences joined by spaces).
        stated_mm: the contradicted size as read back (mm; one or two numbers).
        target_mm: the measurement to state instead: one number (mean diameter) or two (longest, short
            axis), matched to the stated numbers by size (the larger written number gets the larger value).

    Returns:
        ``text[:start] + rewritten size + unit`` (the unit as written), or None when the stated size is not
        in the text, the counts differ, or rewriting changes nothing.

    Raises:
        ValueError: a target that is not a finite number > 0.
    """
    size = find_stated_size(text, stated_mm)
    if size is None or len(target_mm) != len(size.values):
        return None
    order = sorted(range(len(size.values)), key=lambda i: size.mm[i])
    targets = sorted(float(t) for t in target_mm)
    new = list(size.values)
    for rank, i in enumerate(order):
        new[i] = format_like(size.values[i], size.unit, targets[rank])
    if tuple(new) == size.values:
        return None
    written = text[size.start : size.end]
    unit = written[-2:]
    body = " x ".join(new) if len(new) == 2 else new[0]
    return f"{text[: size.start]}{body}{_unit_gap(written)}{unit}"


def restate_lobe(text: str, stated: str, target: str) -> str | None:
    """The beginning of ``text`` up to its first mention of lobe ``stated``, rewritten as lobe ``target``.

    An abbreviation is rewritten as an abbreviation (``LUL`` → ``RLL``), a spelled-out lobe as spelled out
    (``left upper lobe`` → ``right lower lobe``, keeping an initial capital). Other phrasings are not rewritten.

    Args:
        text: the generated text.
        stated: the contradicted lobe code as read back (``RUL`` ... ``LLL``).
        target: the grounded finding's lobe code.

    Returns:
        ``text[:start] + rewritten lobe``, or None when no such mention of ``stated`` is found, a code is not a
        lobe, or ``stated == target``.
    """
    if stated not in LP.LOBE_NAMES or target not in LP.LOBE_NAMES or stated == target:
        return None
    hits: list[tuple[int, int, str]] = []
    for m in LP.LOBE_ABBR_RE.finditer(text):
        if m.group("abbr").upper() == stated:
            hits.append((m.start(), m.end(), target))
    for m in LP.LOBE_SIDE_RE.finditer(text):
        side = "R" if m.group("side").lower().startswith("r") else "L"
        if LP.LOBE_CODE.get((side, m.group("pos").lower())) == stated and m.group(0).lower().endswith("lobe"):
            hits.append((m.start(), m.end(), _capital_like(m.group(0), LP.LOBE_NAMES[target])))
    if not hits:
        return None
    start, _, new = min(hits)
    return f"{text[:start]}{new}"


#: How each attenuation type is written (first match in a text), and how a restated one is written.
TYPE_PHRASES: dict[str, re.Pattern[str]] = {
    "solid": re.compile(r"(?<!part-)(?<!part )(?<!semi-)(?<!sub-)(?<!non-)\bsolid\b", re.IGNORECASE),
    "part_solid": re.compile(r"\bpart[\s-]?solid\b", re.IGNORECASE),
    "non_solid": re.compile(r"\b(?:(?:pure|non[\s-]?solid)\s+)?ground[\s-]?glass\b|\bnon[\s-]?solid\b", re.IGNORECASE),
    "subsolid": re.compile(r"\bsub[\s-]?solid\b", re.IGNORECASE),
}
TYPE_WORDS: dict[str, str] = {"solid": "solid", "part_solid": "part-solid", "non_solid": "ground-glass"}


def restate_type(text: str, stated: str, target: str) -> str | None:
    """The beginning of ``text`` up to its first phrase of attenuation type ``stated``, rewritten as ``target``.

    ``solid`` / ``part-solid`` / ``ground-glass`` (``pure ground-glass``, ``nonsolid ground-glass`` and ``non-solid``
    are one non-solid phrase; ``subsolid`` is part-solid or non-solid), keeping an initial capital.

    Args:
        text: the generated text.
        stated: the contradicted type as read back (``solid``, ``part_solid``, ``non_solid`` or ``subsolid``).
        target: the grounded finding's type (``solid``, ``part_solid`` or ``non_solid``).

    Returns:
        ``text[:start] + rewritten type``, or None when no phrase of ``stated`` is written, a type is unknown, or
        ``stated == target``.
    """
    if stated not in TYPE_PHRASES or target not in TYPE_WORDS or stated == target:
        return None
    m = TYPE_PHRASES[stated].search(text)
    if m is None:
        return None
    return f"{text[: m.start()]}{_capital_like(m.group(0), TYPE_WORDS[target])}"


def restate_lung_rads(text: str, stated: str, target: str) -> str | None:
    """The beginning of ``text`` up to its first Lung-RADS category ``stated``, rewritten as ``target``.

    When the decoder wrote a descriptor right after the category ("Lung-RADS 2: benign appearance or behavior"),
    the target's own v2022 descriptor is written too (``LP.LUNG_RADS_WORDS``, with the separator and any ``S``
    modifier as written): left to the decoder, it goes on with the descriptor it had started.

    Args:
        text: the generated text.
        stated: the contradicted category as read back (``"4A"``).
        target: the rule engine's category (``"3"``).

    Returns:
        ``text`` up to the category's first character, then ``target`` (and its descriptor, as above; an ``S``
        modifier written without a descriptor is left to the decoder), or None when no such category is written
        or ``stated == target``.
    """
    if stated.upper() == target.upper():
        return None
    for m in LP.LUNG_RADS_RE.finditer(text):
        if (m.group("cat") + (m.group("sub") or "")).upper() != stated.upper():
            continue
        head = f"{text[: m.start('cat')]}{target.upper()}"
        d = FP.LUNG_RADS_DESCRIPTOR_RE.match(text, m.start())
        words = LP.LUNG_RADS_WORDS.get(target.upper())
        if d is None or d.start("cat") != m.start("cat") or words is None:
            return head
        return f"{head}{text[d.end('cat') : d.start('desc')]}{_capital_like(d.group('desc'), words)}"
    return None


def restate_descriptor(text: str, category: str) -> str | None:
    """The beginning of ``text`` up to a descriptor that names another category than ``category``, rewritten.

    "Lung-RADS 3: benign appearance or behavior" (the descriptor of category 2) → "Lung-RADS 3: probably benign".

    Args:
        text: the generated text.
        category: the category written before the descriptor (``"3"``).

    Returns:
        ``text`` up to that descriptor, then ``category``'s v2022 descriptor, or None when no such descriptor is
        written or the category has none.
    """
    words = LP.LUNG_RADS_WORDS.get(category.upper())
    if words is None:
        return None
    for st in FP.lung_rads_descriptor_facts(text):
        cat, _, names = st.value
        if cat == category.upper() and cat not in names:
            d = FP.LUNG_RADS_DESCRIPTOR_RE.match(text, st.span[0])
            assert d is not None  # the same match lung_rads_descriptor_facts read
            return f"{text[: d.start('desc')]}{_capital_like(d.group('desc'), words)}"
    return None


#: A comparison with the prior as written: its own words ("stable", "increased in size", "new") or a prior size
#: ("enlarged from 12 mm", "previously 9 mm").
COMPARISON_RES: tuple[re.Pattern[str], ...] = (
    LP.COMP_STABLE_RE,
    LP.COMP_GROWING_RE,
    LP.COMP_NEW_RE,
    LP.COMP_DECREASED_RE,
    re.compile(r"\b(?:increased|enlarged|grown)\s+from\b|\bpreviously\b|\bminimally\s+larger\b", re.IGNORECASE),
)


#: The verb a comparison is written with ("has increased", "is stable", "has been stable"), rewritten with it.
_AUX_RE = re.compile(r"\b(?:has|have|is|are)(?:\s+been)?\s+$", re.IGNORECASE)


def comparison_words(f: Finding, text: str) -> str | None:
    """How the comparison of finding ``f`` with its prior is written, in the synthetic reports' words.

    ``new`` (no prior match), ``increased from <prior mean diameter>`` (growth > 1.5 mm, the Lung-RADS growth
    threshold; the prior size in the unit and precision of ``text``'s first size, mm when it has none), else
    ``stable``. None when ``f`` was not compared with a prior.
    """
    if f.context == "new":
        return "new"
    if f.prior_mean_diameter_mm is None or f.growth_mm is None:
        return None
    if f.growth_mm > 1.5:
        m = SIZE_RE.search(text)
        written, unit = (m.group("a"), m.group("unit").lower()) if m else ("0", "mm")
        gap = " " if m is None else _unit_gap(m.group(0))
        return f"increased from {format_like(written, unit, f.prior_mean_diameter_mm)}{gap}{unit}"
    return "stable"


def restate_comparison(text: str, f: Finding) -> str | None:
    """The beginning of ``text`` up to its first comparison with the prior, rewritten as finding ``f``'s.

    "11 mm solid nodule in the RLL, enlarged from 1.2 cm on the prior study" for a finding that grew 0.3 mm →
    "11 mm solid nodule in the RLL, stable"; for one that grew from 8.6 mm → "..., increased from 9 mm".

    Args:
        text: the generated text.
        f: the grounded finding (its ``context``, ``prior_mean_diameter_mm`` and ``growth_mm``).

    Returns:
        ``text`` up to the comparison, then :func:`comparison_words` (initial capital kept), or None when
        ``text`` writes no comparison, ``f`` has none, or rewriting changes nothing.
    """
    starts = [m for pattern in COMPARISON_RES if (m := pattern.search(text)) is not None]
    words = comparison_words(f, text)
    if not starts or words is None:
        return None
    m = min(starts, key=lambda m: m.start())
    cut, written = m.start(), m.group(0)
    aux = _AUX_RE.search(text[:cut])
    if aux is not None:  # "has increased in size" → "is stable", "is new" → "has increased from 9 mm"
        plural = aux.group(0).lower().startswith(("are", "have"))
        verb = ("have " if plural else "has ") if words.startswith("increased") else ("are " if plural else "is ")
        cut, written, words = aux.start(), aux.group(0), verb + words
    out = f"{text[:cut]}{_capital_like(written, words)}"
    return None if text.startswith(out) else out


def _restated(text: str, fact: str, stated: object, measured: object, f: Finding | None) -> str | None:
    """One contradicted fact of ``text`` restated (None: not one this module rewrites)."""
    if fact == "size" and f is not None and isinstance(stated, (list, tuple)):
        values = tuple(float(x) for x in stated)
        target = (f.mean_diameter_mm,) if len(values) == 1 else (f.longest_diameter_mm, f.short_axis_mm)
        if not all(math.isfinite(t) and t > 0 for t in target):
            return None
        return restate_size(text, values, target)
    if fact == "lobe" and f is not None and isinstance(stated, str) and f.lobe:
        return restate_lobe(text, stated, f.lobe)
    if fact == "type" and f is not None and isinstance(stated, str):
        return restate_type(text, stated, f.type)
    if fact == "lung_rads" and isinstance(stated, str) and isinstance(measured, str):
        return restate_lung_rads(text, stated, measured)
    if fact == "lung_rads_descriptor" and isinstance(stated, str):
        return restate_descriptor(text, stated.split(":")[0])
    if fact == "comparison" and f is not None:
        return restate_comparison(text, f)
    return None


def restated_start(texts: Sequence[str], check: FactCheck, findings: Sequence[Finding]) -> str | None:
    """Where to restart one generation at its first contradicted fact that can be restated.

    Args:
        texts: the generation's sentences, in order (joined by single spaces they are its text).
        check: their fact check (:func:`~lungvl_model.inference.fact_check.check_report`).
        findings: the measured findings its verdicts name by ``index``.

    Returns:
        The sentences before the one with the first restatable contradiction, then that sentence up to the
        contradicted fact that comes first in it, restated (a size as its grounded finding's mean diameter, one
        number, or longest x short axis, two; a lobe, type or comparison with the prior as its finding's; a
        Lung-RADS category as the rule engine's; a descriptor as its category's), all joined by spaces; None
        when no contradicted fact can be restated.
    """
    by_index = {f.index: f for f in findings}
    starts: list[tuple[int, int, str]] = []
    for v in check.verdicts:
        if v.verdict != "contradiction" or not 0 <= v.sentence < len(texts):
            continue
        f = by_index.get(v.finding) if v.finding is not None else None
        start = _restated(texts[v.sentence], v.fact, v.stated, v.measured, f)
        if start is not None:
            starts.append((v.sentence, len(start), start))
    if not starts:
        return None
    sentence, _, start = min(starts)
    return " ".join([*texts[:sentence], start])
