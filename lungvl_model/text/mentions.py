"""Finding and anatomy mentions in report text, the targets of the mention-grounding loss.

A mention is a character span with a *region*: :data:`NODULE_REGION` for finding words (nodule,
mass, spiculated, ground-glass, part-solid, calcified...) which should attend to the nodule mask, or
``LOBE_LABELS[lobe]`` for lobe names, which should attend to that lobe.
"""

from __future__ import annotations

import re

from lungvl_model.data.site_layout import LOBE_LABELS

#: Region index of finding words (the nodule mask); lobes use LOBE_LABELS values 1..5.
NODULE_REGION = 0
N_REGIONS = 1 + len(LOBE_LABELS)

_FINDING = re.compile(
    r"\b(nodules?|mass(?:es)?|lesions?|opacit(?:y|ies)|granulomas?|spiculated|spiculation|lobulated|"
    r"part[- ]solid|ground[- ]glass|non[- ]?solid|solid|calcified|calcification|juxtapleural|perifissural)\b",
    re.IGNORECASE,
)
_LOBES = [
    (re.compile(r"\bright\s+upper\s+lobe\b|\bRUL\b", re.IGNORECASE), "RUL"),
    (re.compile(r"\b(?:right\s+)?middle\s+lobe\b|\bRML\b", re.IGNORECASE), "RML"),
    (re.compile(r"\bright\s+lower\s+lobe\b|\bRLL\b", re.IGNORECASE), "RLL"),
    (re.compile(r"\bleft\s+upper\s+lobe\b|\blingula(?:r)?\b|\bLUL\b", re.IGNORECASE), "LUL"),
    (re.compile(r"\bleft\s+lower\s+lobe\b|\bLLL\b", re.IGNORECASE), "LLL"),
]


def find_mentions(text: str) -> list[tuple[int, int, int]]:
    """Mentions in ``text`` as ``(start, end, region)`` character spans, sorted by start."""
    spans = [(m.start(), m.end(), NODULE_REGION) for m in _FINDING.finditer(text)]
    for pattern, lobe in _LOBES:
        spans += [(m.start(), m.end(), LOBE_LABELS[lobe]) for m in pattern.finditer(text)]
    return sorted(spans)


def token_regions(offsets: list[tuple[int, int]], mentions: list[tuple[int, int, int]]) -> list[int]:
    """Region of each token (−1 when it is not part of a mention).

    Args:
        offsets: ``(start, end)`` character span of each token (``(0, 0)`` for special tokens).
        mentions: output of :func:`find_mentions`.

    Returns:
        One region index per token.
    """
    out = []
    for s, e in offsets:
        region = -1
        if e > s:
            for ms, me, r in mentions:
                if s < me and e > ms:
                    region = r
                    break
        out.append(region)
    return out
