"""Size-constrained decoding: where to restart a generated text whose stated size contradicts its finding.

A sentence that states a size the fact check contradicts (``"measuring 23 mm"`` for a finding of 28.4 mm mean
diameter) is decoded again with its beginning forced: the text up to that size, the size rewritten to the
grounded finding's measurement **in the unit and precision the decoder chose** (``23 mm`` → ``28 mm``,
``2.3 cm`` → ``2.8 cm``, ``12 x 9 mm`` → ``14 x 10 mm``), and the decoder writes the rest itself
(:meth:`lungvl_model.models.decoder.ReportDecoder.generate` ``forced``). The decoder decides whether a size is
stated, where and in which unit; only the digits of a contradicted size are constrained to the measurement.

The measurement restated is the one the report conventions use (:mod:`lungvl_model.data.synth.reports`, and
Lung-RADS v2022): one number is the mean diameter, two are the longest and short-axis diameters.

Pure functions, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lungvl_model.inference.fact_check import FactCheck
from lungvl_model.inference.findings import Finding

__all__ = ["SIZE_RE", "StatedSize", "find_stated_size", "format_like", "restate_size", "restated_start"]

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
    spaced = " " if re.search(r"\d\s+(mm|cm)$", written, re.IGNORECASE) else ""
    return f"{text[: size.start]}{body}{spaced}{unit}"


def restated_start(texts: Sequence[str], check: FactCheck, findings: Sequence[Finding]) -> str | None:
    """Where to restart one generation whose first contradicted size can be restated.

    Args:
        texts: the generation's sentences, in order (joined by single spaces they are its text).
        check: their fact check (:func:`~lungvl_model.inference.fact_check.check_report`).
        findings: the measured findings its verdicts name by ``index``.

    Returns:
        The sentences before the one with the first contradicted size, then that sentence up to the size
        restated as its grounded finding's mean diameter (one number) or longest x short axis (two), all
        joined by spaces; None when no contradicted size can be restated.
    """
    by_index = {f.index: f for f in findings}
    for v in check.verdicts:
        f = by_index.get(v.finding) if v.fact == "size" and v.verdict == "contradiction" else None
        if f is None or not 0 <= v.sentence < len(texts):
            continue
        stated = tuple(float(x) for x in v.stated)
        target = (f.mean_diameter_mm,) if len(stated) == 1 else (f.longest_diameter_mm, f.short_axis_mm)
        if not all(math.isfinite(t) and t > 0 for t in target):
            continue
        start = restate_size(texts[v.sentence], stated, target)
        if start is not None:
            return " ".join([*texts[: v.sentence], start])
    return None
