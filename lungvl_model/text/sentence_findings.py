"""Findings of one report sentence: nodule mentions with their attributes, negation, emphysema.

:func:`label_sentence` takes the spans of :mod:`lungvl_model.text.sentence_spans`, drops mentions that
are not a current pulmonary nodule (extrapulmonary, an opacity or pattern that is no nodule -- see
:mod:`lungvl_model.text.labeler_context` -- historical, generic), attaches the attributes of
each mention's segment (size, lobe, type, margin, calcification, comparison) and returns a
:class:`SentenceResult`; :mod:`lungvl_model.text.labeler` merges the sentences into report labels.
Patterns live in :mod:`lungvl_model.text.labeler_patterns`.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from lungvl_model.text import labeler_context as C
from lungvl_model.text import labeler_patterns as P
from lungvl_model.text.report_labels import LabeledNodule
from lungvl_model.text.report_sentences import Sentence
from lungvl_model.text.sentence_spans import (
    Anchor,
    Lobe,
    Size,
    assign_segments,
    find_anchors,
    find_lobes,
    find_sizes,
    mask,
    negation_statuses,
)

__all__ = ["Mention", "SentenceResult", "label_sentence", "size_comparison"]


@dataclass
class Mention:
    """An affirmed current pulmonary nodule read from one sentence, before report-level merging."""

    nodule: LabeledNodule
    section: str
    sent: int
    definite: bool = False
    another: bool = False
    interpretive: bool = False
    has_attrs: bool = False


@dataclass
class SentenceResult:
    """What one sentence says: its nodule mentions, negations, emphysema and comparisons."""

    mentions: list[Mention] = field(default_factory=list)
    negated: bool = False
    emphysema: list[str] = field(default_factory=list)
    comparisons: list[str] = field(default_factory=list)
    referent_comparison: str | None = None
    pronoun: LabeledNodule | None = None  # "It is spiculated." -> attributes of the previous nodule
    pronoun_prior: Size | None = None  # "It was 4 mm on the prior."
    clear: bool = False


def _last_words(text: str, n: int) -> str:
    return " ".join(re.split(r"[,;:()]", text)[-1].split()[-n:])


#: How far before a word the labeler looks for the few words of a context anchored there ("without
#: spiculation", "coronary artery calcification"): such a context is a trigger and at most two words, far
#: shorter. Searching the whole text before each word instead cost its square on a long sentence.
CONTEXT_CHARS = 256


def _ends_with(rx: re.Pattern[str], text: str, end: int) -> bool:
    """Whether ``rx`` (anchored with ``$``) matches ``text[:end]``, within its last :data:`CONTEXT_CHARS`."""
    return rx.search(text, max(0, end - CONTEXT_CHARS), end) is not None  # \b still sees what precedes


def _nodule_type(seg: str) -> str | None:
    seg = mask(seg, [m.span() for m in P.NO_SOLID_COMPONENT_RE.finditer(seg)])
    if P.TYPE_PART_SOLID_RE.search(seg):
        return "part_solid"
    non_solid = [m.span() for m in P.TYPE_NON_SOLID_RE.finditer(seg)]
    rest = mask(seg, non_solid)
    solid = any(not _ends_with(P.ATTR_NEG_BEFORE_RE, rest, m.start()) for m in P.TYPE_SOLID_RE.finditer(rest))
    if non_solid and solid:
        return "part_solid"
    if non_solid:
        return "non_solid"
    return "solid" if solid else None


def _margin(seg: str) -> str | None:
    for rx, name in (
        (P.MARGIN_SPICULATED_RE, "spiculated"),
        (P.MARGIN_LOBULATED_RE, "lobulated"),
        (P.MARGIN_SMOOTH_RE, "smooth"),
    ):
        if any(not _ends_with(P.ATTR_NEG_BEFORE_RE, seg, m.start()) for m in rx.finditer(seg)):
            return name
    return None


def _calcified(seg: str) -> bool | None:
    if P.CALC_NEG_RE.search(seg):
        return False
    for m in P.CALC_POS_RE.finditer(seg):
        if not _ends_with(P.CALC_OTHER_BEFORE_RE, seg, m.start()) and not P.CALC_OTHER_AFTER_RE.match(seg, m.end()):
            return True
    return None


def _comparison(masked_seg: str) -> str | None:
    stable = [m.span() for m in P.COMP_STABLE_RE.finditer(masked_seg)]
    rest = mask(masked_seg, stable)
    if P.COMP_GROWING_RE.search(rest):
        return "growing"
    if P.COMP_NEW_RE.search(rest):
        return "new"
    if stable:
        return "stable"
    return None


def size_comparison(current: Size | None, priors: list[Size]) -> str | None:
    """``growing``/``stable`` from the current and the first prior size (None when it cannot say)."""
    if current is None or not priors:
        return None
    diff = max(current.dims) - max(priors[0].dims)
    if diff > 1.5:
        return "growing"
    return "stable" if diff >= -1.5 else None


def _closest(anchor: Anchor, positions: list[tuple[int, int]]) -> int | None:
    best, best_d = None, None
    for i, (a, b) in enumerate(positions):
        d = anchor.start - b if b <= anchor.start else a - anchor.end
        if best_d is None or d < best_d:
            best, best_d = i, d
    return best


def _classify(sent: Sentence, s: str, a: Anchor, seg_sizes: list[Size], seg_lobes: list[Lobe], generic: bool) -> str:
    """Returns "excluded" when the mention is not a current pulmonary nodule, else ``a.status``.

    Excluded: a nodule of another organ or a lymph node, an opacity that is no nodule, a nodular pattern
    (:mod:`lungvl_model.text.labeler_context`), and guideline text (``generic``: whether sentence ``s`` reads
    as guideline text, found once per sentence, not per mention).
    """
    seg = s[a.seg[0] : a.seg[1]]
    pre = s[a.seg[0] : a.start]
    pre_words = _last_words(pre, 5)
    post = s[a.end : a.seg[1]]
    lobe_cut = min([lb[0] - a.end for lb in seg_lobes if lb[0] >= a.end] + [len(post)])
    lung = C.LUNG_WORD_RE.search(post)
    post_cut = post[: min(lobe_cut, lung.start() if lung else len(post), 80)]
    in_lung = bool(seg_lobes) or bool(C.LUNG_WORD_RE.search(seg))
    current_mm = [max(z.dims) for z in seg_sizes if z.role == "current"]
    if C.organ_before(pre_words) or C.ORGAN_ATTACH_RE.search(post_cut) or C.pleural_nodule(pre):
        return "excluded"
    if not in_lung and (
        sent.extrapulmonary
        or C.organ_leads(s, a.start)
        or C.non_lung_reading(post)
        or (a.kind in ("lesion", "mass") and C.EXTRA_LESION_CUE_RE.search(seg))
    ):
        return "excluded"
    if a.kind in ("opac", "ggo") and not C.opacity_is_nodule(pre_words, seg, current_mm):
        return "excluded"
    if (a.kind == "nodop" and C.nodular_pattern(pre_words, post)) or C.tree_in_bud_before(pre):
        return "excluded"
    if generic and not seg_lobes and not current_mm:
        return "excluded"
    if P.HISTORICAL_PRE_RE.search(pre) or P.HISTORICAL_POST_RE.match(post):
        return "historical"
    return a.status


def _determiner(pre: str) -> str | None:
    toks = P.DETERMINER_SCAN_RE.findall(pre)[::-1][:8]
    for t in toks:
        if t in ",;:()":
            return None
        if P.DEFINITE_RE.match(t):
            return "definite"
        if P.INDEFINITE_RE.match(t):
            return "indefinite"
    return None


def label_sentence(sent: Sentence, idx: int) -> SentenceResult:
    """Read sentence number ``idx`` of a report: nodule mentions with their attributes, and the rest."""
    s = sent.text
    res = SentenceResult()
    res.clear = bool(P.CLEAR_LUNGS_RE.search(s)) and not P.CLEAR_EXCEPTION_RE.search(s)
    emph = [m.span() for m in P.EMPHYSEMA_RE.finditer(s)]
    anchors = find_anchors(s)
    statuses, masked = negation_statuses(s, [(a.start, a.end) for a in anchors] + emph)
    for a, st in zip(anchors, statuses, strict=False):
        a.status = st
    res.emphysema = statuses[len(anchors) :]
    # An interpretation ("..., likely a granuloma") of a mention earlier in the sentence is no new mention.
    kept: list[Anchor] = []
    for a in anchors:
        a.interpretive = bool(P.INTERPRETIVE_PRE_RE.search(s[max(0, a.start - 60) : a.start]))
        if a.interpretive and kept:
            continue
        kept.append(a)
    anchors = kept
    sizes, lobes = find_sizes(s), find_lobes(s)
    if not anchors:
        comp = _comparison(masked)
        if comp and P.COMP_REFERENT_RE.search(s) and not P.COMP_OTHER_FINDING_RE.search(s):
            res.referent_comparison = comp
        if re.match(r"^\s*(?:it|this)\b", s, re.I) and not emph:
            cur = next((z for z in sizes if z.role == "current"), None)
            prior = next((z for z in sizes if z.role == "prior"), None)
            lobe = lobes[0][2][0] if lobes else None
            res.pronoun = LabeledNodule(
                max(cur.dims) if cur else None, cur.dims if cur else (), lobe, _nodule_type(s), _margin(s),
                _calcified(s), comp,
            )  # fmt: skip
            res.pronoun_prior = prior if not P.COMP_DECREASED_RE.search(s) else None
        return res
    assign_segments(s, anchors, sizes, lobes)
    generic = bool(P.GENERIC_CONTEXT_RE.search(s))
    size_starts, lobe_starts = [z.start for z in sizes], [lb[0] for lb in lobes]  # both in text order
    affirmed: list[tuple[Anchor, Mention]] = []
    for a in anchors:
        seg_sizes = sizes[bisect.bisect_left(size_starts, a.seg[0]) : bisect.bisect_left(size_starts, a.seg[1])]
        seg_lobes = lobes[bisect.bisect_left(lobe_starts, a.seg[0]) : bisect.bisect_left(lobe_starts, a.seg[1])]
        status = _classify(sent, s, a, seg_sizes, seg_lobes, generic)
        if status == "negated":
            res.negated = True
        if status != "affirmed":
            continue
        seg = s[a.seg[0] : a.seg[1]]
        ntype = _nodule_type(seg) or ("non_solid" if a.kind == "ggx" else None)
        calc = _calcified(seg)
        if calc is None and a.kind == "gran":
            calc = True
        current = [z for z in seg_sizes if z.role == "current"]
        priors = [z for z in seg_sizes if z.role == "prior"]
        cur = current[_closest(a, [(z.start, z.start + 1) for z in current]) or 0] if current else None
        comp = _comparison(masked[a.seg[0] : a.seg[1]])
        if comp is None and not P.COMP_DECREASED_RE.search(seg):
            comp = size_comparison(cur, priors)
        if comp:
            res.comparisons.append(comp)
        margin = _margin(seg)
        pre = s[a.seg[0] : a.start]
        det = _determiner(pre)
        another = bool(P.ANOTHER_RE.search(_last_words(pre, 6)))
        all_codes = [(lb[0], lb[1], c) for lb in seg_lobes for c in lb[2]]
        distinct = list(dict.fromkeys(c for _, _, c in all_codes))
        if a.plural and len(distinct) > 1:
            per_lobe = [next(x for x in all_codes if x[2] == code) for code in distinct]
            sizes_for: dict[int, Size] = {}
            if len(current) == len(per_lobe):
                sizes_for = dict(enumerate(current))
            else:
                for z in current:
                    i = min(range(len(per_lobe)), key=lambda k, z=z: abs(per_lobe[k][0] - z.start))
                    sizes_for.setdefault(i, z)
            targets = [(code, sizes_for.get(i)) for i, (_, _, code) in enumerate(per_lobe)]
        else:
            li = _closest(a, [(lb[0], lb[1]) for lb in seg_lobes])
            targets = [(seg_lobes[li][2][0] if li is not None else None, cur)]
        for lobe, z in targets:
            nod = LabeledNodule(
                size_mm=max(z.dims) if z else None,
                dims_mm=z.dims if z else (),
                lobe=lobe,
                type=ntype,
                margin=margin,
                calcified=calc,
                comparison=comp,
                evidence=s,
            )
            has_attrs = (
                any(v is not None for v in (nod.size_mm, lobe, ntype, margin))
                or (calc is not None and a.kind != "gran")
                or bool(P.SUBCENTIMETER_RE.search(seg))
            )
            m = Mention(nod, sent.section, idx, det == "definite", another, a.interpretive, has_attrs)
            affirmed.append((a, m))
    # Attribute-less plural summaries ("two nodules: ...") next to described mentions add nothing.
    if any(m.has_attrs for _, m in affirmed):
        affirmed = [(a, m) for a, m in affirmed if m.has_attrs or not a.plural]
    res.mentions = [m for _, m in affirmed]
    return res
