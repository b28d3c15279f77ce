"""What the decoder writes about a nodule that the pipeline does not measure: its margin, taken out of the text.

A finding slot holds the nodule's measured size, volume, type, lobe, calcification, Lung-RADS category, Brock
probability and comparison with the prior; its margin (smooth, lobulated, spiculated) is not measured, so the
slot gives the decoder the "unknown" margin embedding (:func:`~lungvl_model.inference.narrative.finding_attributes`).
The decoder learned from reports that always name a margin and names one anyway: on the 28 held-out synthetic
test reports of 2026-12-07, 13 of the 21 dominant nodules got a margin, 5 of them wrong. Such words are facts
no measurement backs, so they are removed from every decoded sentence with the clause that carries them
(", with smooth margins", " well-circumscribed", "spiculated " before the nodule's type), and the fact check
calls a margin that is still stated unsupported (:func:`~lungvl_model.inference.fact_verdicts.nodule_verdicts`).

Pure functions.
"""

from __future__ import annotations

import re

from lungvl_model.text import labeler_patterns as LP

__all__ = ["MARGIN_CLAUSE_RE", "without_margin"]

_WORDS = "|".join(p.pattern for p in (LP.MARGIN_SPICULATED_RE, LP.MARGIN_LOBULATED_RE, LP.MARGIN_SMOOTH_RE))
#: A margin with the clause around it: a leading comma or space, "with", the margin words, a trailing noun.
MARGIN_CLAUSE_RE = re.compile(
    rf"(?:\s*,\s*|\s+|^)(?:and\s+)?(?:with\s+(?:a\s+|an\s+)?)?(?:{_WORDS})"
    r"(?:\s+(?:margins?|contours?|marginated|borders?|edges?|outlines?))?(?=[\s,.;:)]|$)",
    re.IGNORECASE,
)


def without_margin(text: str) -> str:
    """``text`` without its margin words and the clause that carries them.

    Args:
        text: one decoded sentence.

    Returns:
        The sentence, tidied (no doubled spaces or commas, an initial capital kept); ``""`` when nothing but the
        margin was said.
    """
    out = MARGIN_CLAUSE_RE.sub("", text)
    if out == text:
        return text
    out = re.sub(r"\s{2,}", " ", out)
    out = re.sub(r"\s+([,.;:)])", r"\1", out)
    out = re.sub(r",\s*([.;:])", r"\1", out)
    out = re.sub(r"^[\s,.;:]+", "", out).strip()
    if not re.search(r"[A-Za-z0-9]", out):
        return ""
    if text[:1].isupper() and out[:1].islower():
        out = out[0].upper() + out[1:]
    return out
