"""Spans of one report sentence: nodule mentions, sizes, lobes, their segments and negation status.

The per-sentence reading of :mod:`lungvl_model.text.sentence_findings` starts here: nodule-like mentions
(:class:`Anchor`), sizes with their role (:class:`Size`), lobe mentions (:data:`Lobe`), NegEx-style
negation scoped to clauses (:func:`negation_statuses`) and the segment of the sentence that belongs to
each mention (:func:`assign_segments`). Patterns live in :mod:`lungvl_model.text.labeler_patterns`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lungvl_model.text import labeler_patterns as P

__all__ = [
    "Anchor",
    "Lobe",
    "Size",
    "assign_segments",
    "find_anchors",
    "find_lobes",
    "find_sizes",
    "mask",
    "negation_statuses",
]

#: A lobe mention: (start, end, lobe codes) -- "right upper and middle lobes" names two.
Lobe = tuple[int, int, list[str]]


@dataclass
class Anchor:
    """A nodule-like mention (the span of its head word) and what the sentence says about it."""

    start: int
    end: int
    kind: str  # nod | nodop | mass | lesion | tumor | ggx (GGN) | ggo (GGO) | gran | opac
    plural: bool
    status: str = "affirmed"  # affirmed | negated | partial | uncertain | historical | excluded
    seg: tuple[int, int] = (0, 0)
    interpretive: bool = False


@dataclass
class Size:
    """A size in a sentence: where it starts, its dimensions in mm, and whose size it is."""

    start: int
    dims: tuple[float, ...]
    role: str  # current | prior | component | other


def mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with the ``spans`` blanked out (same length, so offsets still hold)."""
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


def _to_mm(num: str, unit: str) -> float:
    v = float(num.replace(",", ".")) * (10.0 if unit.lower().startswith("c") else 1.0)
    return round(v, 2)


_FROM_END_RE = re.compile(r"\bfrom\s*$", re.I)


def _from_before(s: str, end: int) -> bool:
    """Whether ``s[:end]`` ends with the word "from" (and whitespace), reading only its end."""
    i = end
    while i > 0 and s[i - 1].isspace():
        i -= 1
    return bool(_FROM_END_RE.search(s, max(0, i - 4), end))  # \b still sees the character before


def find_sizes(s: str) -> list[Size]:
    """Sizes in sentence ``s`` (ranges and ``a x b x c mm``), each with its role, in text order."""
    out: list[Size] = []
    used: list[tuple[int, int]] = []
    for m in P.RANGE_RE.finditer(s):
        unit = m.group("unit")
        a, b = _to_mm(m.group("a"), unit), _to_mm(m.group("b"), unit)
        if _from_before(s, m.start()):
            out += [Size(m.start("a"), (a,), "prior"), Size(m.start("b"), (b,), "current")]
        elif a < b:
            out.append(Size(m.start(), (b,), "current"))
        else:
            continue
        used.append(m.span())
    masked = mask(s, used)
    for m in P.SIZE_RE.finditer(masked):
        final_unit = m.group("unit")
        dims = tuple(
            _to_mm(n.group("num"), n.group("unit") or final_unit) for n in P.NUM_UNIT_RE.finditer(m.group("body"))
        )
        pre, post = s[max(0, m.start() - 40) : m.start()], s[m.end() : m.end() + 40]
        if P.NON_SIZE_AFTER_RE.match(post) or P.NON_SIZE_BEFORE_RE.search(pre):
            role = "other"
        elif P.COMPONENT_AFTER_RE.match(post) or P.COMPONENT_BEFORE_RE.search(pre):
            role = "component"
        elif P.PRIOR_BEFORE_RE.search(pre) or P.PRIOR_AFTER_RE.match(post):
            role = "prior"
        else:
            role = "current"
        out.append(Size(m.start(), dims, role))
    return sorted(out, key=lambda z: z.start)


def find_lobes(s: str) -> list[Lobe]:
    """Lobe mentions in sentence ``s``, in text order."""
    out: list[Lobe] = []
    used: list[tuple[int, int]] = []
    for rx in (P.LOBE_SIDE_RE, P.LOBE_POS_SIDE_RE, P.LOBE_OF_LUNG_RE):
        for m in rx.finditer(mask(s, used)):
            side = "R" if m.group("side").lower().startswith("r") else "L"
            codes = [P.LOBE_CODE.get((side, p.lower())) for p in P.POS_SPLIT_RE.findall(m.group("pos"))]
            found = [c for c in codes if c]
            if found:
                out.append((m.start(), m.end(), found))
            used.append(m.span())
    for m in P.LOBE_BOTH_RE.finditer(mask(s, used)):
        pos = m.group("pos").lower()
        out.append((m.start(), m.end(), [P.LOBE_CODE[("R", pos)], P.LOBE_CODE[("L", pos)]]))
        used.append(m.span())
    masked = mask(s, used)
    for rx, code in ((P.LOBE_ABBR_RE, None), (P.LOBE_MIDDLE_RE, "RML"), (P.LINGULA_RE, "LUL")):
        for m in rx.finditer(masked):
            out.append((m.start(), m.end(), [code or m.group("abbr").upper()]))
    for m in P.ROMANCE_LOBE_RE.finditer(masked):
        out.append((m.start(), m.end(), [P.ROMANCE_LOBE_CODE[m.group("abbr")]]))
    return sorted(out)


def find_anchors(s: str) -> list[Anchor]:
    """Nodule-like mentions in sentence ``s``.

    "nodule and mass" is joined into one, and so is "nodule of ground glass density" (a nodule anchor, then
    within one clause "of" and a few words, then an opacity anchor: the opacity says what the nodule looks
    like).
    """
    found: list[Anchor] = []
    for m in P.ANCHOR_RE.finditer(s):
        kind = m.lastgroup or "nod"
        word = m.group().lower()
        plural = word.endswith("s") or word.endswith("foci") or word.endswith("ata")
        a = Anchor(m.start(), m.end(), kind, plural)
        if found and P.ANCHOR_JOIN_RE.match(s[found[-1].end : a.start]):
            prev = found[-1]
            prev.end, prev.plural = a.end, prev.plural or a.plural
            if prev.kind in _OPACITY_KINDS:
                prev.kind = a.kind
            continue
        if found and kind in _OPACITY_KINDS and _describes(s, found[-1], a):
            found[-1].end = a.end
            continue
        found.append(a)
    return found


#: Anchor kinds that are a nodule only with a qualifier or a focal size.
_OPACITY_KINDS = ("opac", "ggo")


def _describes(s: str, prev: Anchor, a: Anchor) -> bool:
    """Whether opacity anchor ``a`` describes the nodule anchor ``prev`` ("nodule of ground glass density")."""
    if prev.kind in _OPACITY_KINDS or a.start - prev.end > P.ATTRIBUTE_OF_MAX_CHARS:
        return False
    return bool(P.ATTRIBUTE_OF_END_RE.search(s, prev.end, a.start)) and not P.ATTRIBUTE_OF_BLOCK_RE.search(
        s, prev.end, a.start
    )


def _scope_cuts(masked: str) -> list[int]:
    hard = {m.start() for m in P.HARD_TERM_RE.finditer(masked)}
    return sorted(hard | {m.start() for m in P.SOFT_BREAK_RE.finditer(masked)})


def _first_per_chunk(marks: list[tuple[int, int]]) -> dict[int, int]:
    """``{chunk: smallest position}`` of ``(position, chunk)`` marks."""
    out: dict[int, int] = {}
    for pos, c in marks:
        if c not in out or pos < out[c]:
            out[c] = pos
    return out


def _last_per_chunk(marks: list[tuple[int, int]]) -> dict[int, int]:
    """``{chunk: largest position}`` of ``(position, chunk)`` marks."""
    out: dict[int, int] = {}
    for pos, c in marks:
        if c not in out or pos > out[c]:
            out[c] = pos
    return out


def negation_statuses(s: str, spans: list[tuple[int, int]]) -> tuple[list[str], str]:
    """NegEx-style status of each span; also returns the text with partial negations masked."""
    partial = [m.span() for m in P.PARTIAL_NEG_RE.finditer(s)]
    masked = mask(s, partial)
    uncertain_post = [m.span() for m in P.UNCERTAIN_POST_RE.finditer(masked)]
    masked2 = mask(masked, uncertain_post)
    pseudo = [m.span() for rx in P.PSEUDO_NEG_RES for m in rx.finditer(masked2)]
    neg_text = mask(masked2, pseudo)
    cuts = _scope_cuts(neg_text)

    def chunk(pos: int) -> int:
        return bisect.bisect_right(cuts, pos)

    pre = [(m.end(), chunk(m.start())) for m in P.PRE_NEG_RE.finditer(neg_text)]
    post = [(m.start(), chunk(m.start())) for m in P.POST_NEG_RE.finditer(neg_text)]
    listed_none = P.NONE_LIST_RE.search(neg_text)
    if listed_none:  # "Nodules: none." -- a post trigger for the chunk that ends at the colon
        post.append((listed_none.start(), chunk(listed_none.start() - 1)))
    partial_at = [(e, chunk(st)) for st, e in partial]
    uncertain_at = [(st, chunk(st)) for st, _ in uncertain_post]
    # Per scope chunk, the earliest end of a trigger before the span / the latest start of one after it:
    # a span is in a trigger's scope when some trigger of its chunk ends before it (starts after it).
    first_pre, last_post = _first_per_chunk(pre), _last_per_chunk(post)
    first_partial, last_uncertain = _first_per_chunk(partial_at), _last_per_chunk(uncertain_at)
    out: list[str] = []
    for a, b in spans:
        c = chunk(a)
        if first_pre.get(c, a + 1) <= a or last_post.get(c, b - 1) >= b:
            out.append("negated")
        elif first_partial.get(c, a + 1) <= a:
            out.append("partial")
        elif P.UNCERTAIN_PRE_RE.search(s[max(0, a - 40) : a]) or last_uncertain.get(c, b - 1) >= b:
            out.append("uncertain")
        else:
            out.append("affirmed")
    return out, masked


def assign_segments(s: str, anchors: list[Anchor], sizes: list[Size], lobes: list[Lobe]) -> None:
    """Cut sentence ``s`` into one segment per anchor (set in place as ``Anchor.seg``).

    ``sizes`` and ``lobes`` are in text order (as :func:`find_sizes` and :func:`find_lobes` give them):
    the ones between two anchors are found by bisection, so a sentence costs its length, not anchors
    times sizes.
    """
    size_starts = [z.start for z in sizes]
    lobe_starts = [lb[0] for lb in lobes]
    bounds = [0]
    for left, right in zip(anchors, anchors[1:], strict=False):
        region = s[left.end : right.start]
        breaks = list(P.SEGMENT_BREAK_RE.finditer(region))
        if breaks:
            bounds.append(left.end + breaks[-1].start())
            continue
        inside = size_starts[bisect.bisect_left(size_starts, left.end) : bisect.bisect_left(size_starts, right.start)]
        between = lobes[bisect.bisect_left(lobe_starts, left.end) : bisect.bisect_right(lobe_starts, right.start)]
        lobe_before = [lb[0] for lb in between if lb[1] >= right.start - 2 and lb[1] <= right.start]
        if inside:
            bounds.append(inside[-1])
        elif lobe_before:
            bounds.append(lobe_before[-1])
        else:
            bounds.append((left.end + right.start) // 2)
    bounds.append(len(s))
    for i, a in enumerate(anchors):
        a.seg = (bounds[i], bounds[i + 1])
