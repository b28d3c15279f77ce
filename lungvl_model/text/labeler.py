"""Rule-based chest CT report labeler: free-text report -> structured findings.

Used for weak labels at sites without ``labels.csv`` and to score clinical concepts in generated
explanations (:func:`concept_f1`). Pipeline: normalise -> sections (FINDINGS/IMPRESSION/...; history,
technique and comparison sections are not mined) -> sentences -> per sentence: nodule mentions
(anchors), NegEx-style negation scoped to clauses, attributes attached to the nearest mention of the same
segment -> merge mentions repeated across sentences/sections -> report-level labels. Patterns live in
:mod:`lungvl_model.text.labeler_patterns`.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lungvl_model.text import labeler_patterns as P

COMPARISON_PRIORITY: dict[str, int] = {"stable": 1, "new": 2, "growing": 3}
#: Slots of :func:`concept_vector`.
CONCEPT_KEYS: tuple[str, ...] = (
    "nodule_present", "type", "margin", "calcified", "lobe", "size_bucket", "comparison", "emphysema",
)  # fmt: skip
#: A lobe mention: (start, end, lobe codes) -- "right upper and middle lobes" names two.
_Lobe = tuple[int, int, list[str]]


@dataclass
class LabeledNodule:
    """One pulmonary nodule described in a report (fields are None when the report does not say)."""

    size_mm: float | None = None  # largest dimension
    dims_mm: tuple[float, ...] = ()
    lobe: str | None = None  # RUL | RML | RLL | LUL | LLL
    type: str | None = None  # solid | part_solid | non_solid
    margin: str | None = None  # smooth | lobulated | spiculated
    calcified: bool | None = None
    comparison: str | None = None  # new | stable | growing (this nodule)
    evidence: str = ""  # the sentence it was first read from

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"size_mm", "lobe", "type", "margin", "calcified"}``."""
        return {
            "size_mm": self.size_mm,
            "lobe": self.lobe,
            "type": self.type,
            "margin": self.margin,
            "calcified": self.calcified,
        }


@dataclass
class ReportLabels:
    """Structured labels of one report."""

    nodule_present: bool | None = None
    emphysema: bool | None = None
    nodules: list[LabeledNodule] = field(default_factory=list)
    comparison: str | None = None  # new | stable | growing (most worrying over the report)
    lung_rads: str | None = None  # 0 | 1 | 2 | 3 | 4A | 4B | 4X
    s_modifier: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"nodule_present", "emphysema", "nodules", "comparison", "lung_rads"}``."""
        return {
            "nodule_present": self.nodule_present,
            "emphysema": self.emphysema,
            "nodules": [n.to_dict() for n in self.nodules],
            "comparison": self.comparison,
            "lung_rads": self.lung_rads,
        }


# ------------------------------------------------------------------------------------------------------
# Sections and sentences
# ------------------------------------------------------------------------------------------------------


@dataclass
class _Sentence:
    text: str
    section: str
    extrapulmonary: bool = False  # under an extrapulmonary sub-header ("Thyroid:", "Upper abdomen:")


def _normalize(text: str) -> str:
    for k, v in P.CHAR_MAP.items():
        text = text.replace(k, v)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _section_of(name: str) -> str:
    name = re.sub(r"\s+", " ", name.strip())
    for rx, sec in P.SECTION_KEY_RES:
        if rx.match(name):
            return sec
    return "findings"


def _sections(text: str) -> list[tuple[str, str]]:
    """Split into ``(section, content)``; text before any header is "findings"."""
    heads = sorted(
        [m for m in P.HEADER_LINE_RE.finditer(text)] + [m for m in P.HEADER_INLINE_RE.finditer(text)],
        key=lambda m: m.start(),
    )
    picked: list[re.Match[str]] = []
    for m in heads:
        if not picked or m.start() >= picked[-1].end():
            picked.append(m)
    out: list[tuple[str, str]] = []
    pos, sec = 0, "findings"
    for m in picked:
        out.append((sec, text[pos : m.start()]))
        pos, sec = m.end(), _section_of(m.group("name"))
    out.append((sec, text[pos:]))
    final: list[tuple[str, str]] = []
    for sec, content in out:
        if sec in P.SKIP_SECTIONS and content.strip():
            # A skipped section covers the rest of its header line (only the first sentence for COMPARISON)
            # or, for a header alone on its line, the next paragraph; what follows is unlabelled body text.
            if content.startswith("\n") or not content.split("\n", 1)[0].strip():
                stripped = content.lstrip("\n")
                para_end = stripped.find("\n\n")
                cut = len(content) - len(stripped) + (para_end if para_end >= 0 else len(stripped))
            else:
                line_end = content.find("\n")
                cut = len(content) if line_end < 0 else line_end
                first = P.SENT_BOUNDARY_RE.search(content[:cut])
                if sec == "comparison" and first:
                    cut = first.end()  # "COMPARISON: CT 2019. Stable 4 mm nodule ..." on one line
            final.append((sec, content[:cut]))
            content, sec = content[cut:], "findings"
        if content.strip():
            final.append((sec, content))
    return final


def _continues(prev: str, nxt: str) -> bool:
    """Whether line ``nxt`` continues the (hard-wrapped) line ``prev``."""
    if P.LIST_MARKER_RE.match(nxt) and not re.match(r"\d+(?:\.\d+)?\s*(?:mm|cm)", nxt, re.I):
        return False
    sub = P.SUBHEADER_RE.match(nxt)
    if sub and len(sub.group("name").split()) <= 4:
        return False
    if re.search(r"[.!?:;]\s*$", prev):
        return False
    return nxt[:1].islower() or bool(P.CONTINUATION_END_RE.search(prev))


def _split_sentences(block: str) -> list[str]:
    paras: list[str] = []
    cur = ""
    for raw in block.split("\n"):
        line = raw.strip()
        if not line:
            if cur:
                paras.append(cur)
            cur = ""
        elif cur and _continues(cur, line):
            cur += " " + line
        else:
            if cur:
                paras.append(cur)
            cur = line
    if cur:
        paras.append(cur)
    out: list[str] = []
    for para in paras:
        start = 0
        for m in P.SENT_BOUNDARY_RE.finditer(para):
            words = para[: m.start()].split()
            last = words[-1].lower().lstrip("([") if words else ""
            if last.rstrip(".") in P.ABBREVIATIONS or last in P.ABBREVIATIONS:
                continue
            out.append(para[start : m.start()])
            start = m.end()
        out.append(para[start:])
    sentences = []
    for s in out:
        s = (
            P.LIST_MARKER_RE.sub("", s, count=1).strip()
            if not re.match(r"^\s*\d+(?:\.\d+)?\s*(?:mm|cm)", s, re.I)
            else s
        )
        if s.strip(" .;:-"):
            sentences.append(s.strip())
    return sentences


def _report_sentences(text: str) -> list[_Sentence]:
    out: list[_Sentence] = []
    for sec, content in _sections(_normalize(text)):
        extra = False
        for s in _split_sentences(content):
            sub = P.SUBHEADER_RE.match(s)
            if sub and len(sub.group("name").split()) <= 4:
                extra = bool(P.EXTRAPULMONARY_SUBHEADER_RE.fullmatch(sub.group("name").strip()))
            out.append(_Sentence(s, sec, extra))
    return out


# ------------------------------------------------------------------------------------------------------
# Per-sentence extraction
# ------------------------------------------------------------------------------------------------------


@dataclass
class _Anchor:
    start: int
    end: int
    kind: str  # nod | nodop | mass | lesion | tumor | ggx | gran | opac
    plural: bool
    status: str = "affirmed"  # affirmed | negated | partial | uncertain | historical | excluded
    seg: tuple[int, int] = (0, 0)
    interpretive: bool = False


@dataclass
class _Size:
    start: int
    dims: tuple[float, ...]
    role: str  # current | prior | component | other


@dataclass
class _Mention:
    nodule: LabeledNodule
    section: str
    sent: int
    definite: bool = False
    another: bool = False
    interpretive: bool = False
    has_attrs: bool = False


@dataclass
class _SentenceResult:
    mentions: list[_Mention] = field(default_factory=list)
    negated: bool = False
    emphysema: list[str] = field(default_factory=list)
    comparisons: list[str] = field(default_factory=list)
    referent_comparison: str | None = None
    pronoun: LabeledNodule | None = None  # "It is spiculated." -> attributes of the previous nodule
    pronoun_prior: _Size | None = None  # "It was 4 mm on the prior."
    clear: bool = False


def _mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


def _to_mm(num: str, unit: str) -> float:
    v = float(num) * (10.0 if unit.lower().startswith("c") else 1.0)
    return round(v, 2)


def _sizes(s: str) -> list[_Size]:
    out: list[_Size] = []
    used: list[tuple[int, int]] = []
    for m in P.RANGE_RE.finditer(s):
        unit = m.group("unit")
        a, b = _to_mm(m.group("a"), unit), _to_mm(m.group("b"), unit)
        if re.search(r"\bfrom\s*$", s[: m.start()], re.I):
            out += [_Size(m.start("a"), (a,), "prior"), _Size(m.start("b"), (b,), "current")]
        elif a < b:
            out.append(_Size(m.start(), (b,), "current"))
        else:
            continue
        used.append(m.span())
    masked = _mask(s, used)
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
        out.append(_Size(m.start(), dims, role))
    return sorted(out, key=lambda z: z.start)


def _lobes(s: str) -> list[_Lobe]:
    out: list[_Lobe] = []
    used: list[tuple[int, int]] = []
    for rx in (P.LOBE_SIDE_RE, P.LOBE_OF_LUNG_RE):
        for m in rx.finditer(_mask(s, used)):
            side = "R" if m.group("side").lower().startswith("r") else "L"
            codes = [P.LOBE_CODE.get((side, p.lower())) for p in P.POS_SPLIT_RE.findall(m.group("pos"))]
            found = [c for c in codes if c]
            if found:
                out.append((m.start(), m.end(), found))
            used.append(m.span())
    for m in P.LOBE_BOTH_RE.finditer(_mask(s, used)):
        pos = m.group("pos").lower()
        out.append((m.start(), m.end(), [P.LOBE_CODE[("R", pos)], P.LOBE_CODE[("L", pos)]]))
        used.append(m.span())
    masked = _mask(s, used)
    for rx, code in ((P.LOBE_ABBR_RE, None), (P.LOBE_MIDDLE_RE, "RML"), (P.LINGULA_RE, "LUL")):
        for m in rx.finditer(masked):
            out.append((m.start(), m.end(), [code or m.group("abbr").upper()]))
    return sorted(out)


def _anchors(s: str) -> list[_Anchor]:
    found: list[_Anchor] = []
    for m in P.ANCHOR_RE.finditer(s):
        kind = m.lastgroup or "nod"
        word = m.group().lower()
        plural = word.endswith("s") or word.endswith("foci") or word.endswith("ata")
        a = _Anchor(m.start(), m.end(), kind, plural)
        if found and P.ANCHOR_JOIN_RE.match(s[found[-1].end : a.start]):
            prev = found[-1]
            prev.end, prev.plural = a.end, prev.plural or a.plural
            if prev.kind == "opac":
                prev.kind = a.kind
            continue
        found.append(a)
    return found


def _scope_cuts(masked: str) -> list[int]:
    hard = {m.start() for m in P.HARD_TERM_RE.finditer(masked)}
    return sorted(hard | {m.start() for m in P.SOFT_BREAK_RE.finditer(masked)})


def _statuses(s: str, spans: list[tuple[int, int]]) -> tuple[list[str], str]:
    """NegEx-style status of each span; also returns the text with partial negations masked."""
    partial = [m.span() for m in P.PARTIAL_NEG_RE.finditer(s)]
    masked = _mask(s, partial)
    uncertain_post = [m.span() for m in P.UNCERTAIN_POST_RE.finditer(masked)]
    masked2 = _mask(masked, uncertain_post)
    pseudo = [m.span() for rx in P.PSEUDO_NEG_RES for m in rx.finditer(masked2)]
    neg_text = _mask(masked2, pseudo)
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
    out: list[str] = []
    for a, b in spans:
        c = chunk(a)
        if any(e <= a and k == c for e, k in pre) or any(st >= b and k == c for st, k in post):
            out.append("negated")
        elif any(e <= a and k == c for e, k in partial_at):
            out.append("partial")
        elif P.UNCERTAIN_PRE_RE.search(s[max(0, a - 40) : a]) or any(st >= b and k == c for st, k in uncertain_at):
            out.append("uncertain")
        else:
            out.append("affirmed")
    return out, masked


def _segments(s: str, anchors: list[_Anchor], sizes: list[_Size], lobes: list[_Lobe]) -> None:
    bounds = [0]
    for left, right in zip(anchors, anchors[1:], strict=False):
        region = s[left.end : right.start]
        breaks = list(P.SEGMENT_BREAK_RE.finditer(region))
        if breaks:
            bounds.append(left.end + breaks[-1].start())
            continue
        inside = [z.start for z in sizes if left.end <= z.start < right.start]
        lobe_before = [lb[0] for lb in lobes if left.end <= lb[0] and lb[1] >= right.start - 2 and lb[1] <= right.start]
        if inside:
            bounds.append(inside[-1])
        elif lobe_before:
            bounds.append(lobe_before[-1])
        else:
            bounds.append((left.end + right.start) // 2)
    bounds.append(len(s))
    for i, a in enumerate(anchors):
        a.seg = (bounds[i], bounds[i + 1])


def _last_words(text: str, n: int) -> str:
    return " ".join(re.split(r"[,;:()]", text)[-1].split()[-n:])


def _nodule_type(seg: str) -> str | None:
    seg = _mask(seg, [m.span() for m in P.NO_SOLID_COMPONENT_RE.finditer(seg)])
    if P.TYPE_PART_SOLID_RE.search(seg):
        return "part_solid"
    non_solid = [m.span() for m in P.TYPE_NON_SOLID_RE.finditer(seg)]
    rest = _mask(seg, non_solid)
    solid = any(not P.ATTR_NEG_BEFORE_RE.search(rest[: m.start()]) for m in P.TYPE_SOLID_RE.finditer(rest))
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
        if any(not P.ATTR_NEG_BEFORE_RE.search(seg[: m.start()]) for m in rx.finditer(seg)):
            return name
    return None


def _calcified(seg: str) -> bool | None:
    if P.CALC_NEG_RE.search(seg):
        return False
    for m in P.CALC_POS_RE.finditer(seg):
        if not P.CALC_OTHER_BEFORE_RE.search(seg[: m.start()]) and not P.CALC_OTHER_AFTER_RE.match(seg[m.end() :]):
            return True
    return None


def _comparison(masked_seg: str) -> str | None:
    stable = [m.span() for m in P.COMP_STABLE_RE.finditer(masked_seg)]
    rest = _mask(masked_seg, stable)
    if P.COMP_GROWING_RE.search(rest):
        return "growing"
    if P.COMP_NEW_RE.search(rest):
        return "new"
    if stable:
        return "stable"
    return None


def _size_comparison(current: _Size | None, priors: list[_Size]) -> str | None:
    if current is None or not priors:
        return None
    diff = max(current.dims) - max(priors[0].dims)
    if diff > 1.5:
        return "growing"
    return "stable" if diff >= -1.5 else None


def _closest(anchor: _Anchor, positions: list[tuple[int, int]]) -> int | None:
    best, best_d = None, None
    for i, (a, b) in enumerate(positions):
        d = anchor.start - b if b <= anchor.start else a - anchor.end
        if best_d is None or d < best_d:
            best, best_d = i, d
    return best


def _classify(sent: _Sentence, s: str, a: _Anchor, seg_sizes: list[_Size], seg_lobes: list[_Lobe]) -> str:
    """Returns "excluded" when the mention is not a current pulmonary nodule, else ``a.status``."""
    seg = s[a.seg[0] : a.seg[1]]
    pre = s[a.seg[0] : a.start]
    pre_words = _last_words(pre, 5)
    post = s[a.end : a.seg[1]]
    lobe_cut = min([lb[0] - a.end for lb in seg_lobes if lb[0] >= a.end] + [len(post)])
    lung = P.LUNG_WORD_RE.search(post)
    post_cut = post[: min(lobe_cut, lung.start() if lung else len(post), 80)]
    in_lung = bool(seg_lobes) or bool(P.LUNG_WORD_RE.search(seg))
    has_current = any(z.role == "current" for z in seg_sizes)
    if P.EXTRAPULMONARY_RE.search(pre_words) or P.ORGAN_ATTACH_RE.search(post_cut):
        return "excluded"
    if sent.extrapulmonary and not in_lung:
        return "excluded"
    if a.kind in ("lesion", "mass") and not in_lung and P.EXTRA_LESION_CUE_RE.search(seg):
        return "excluded"
    if a.kind == "opac":
        qualified = P.OPACITY_QUALIFIER_RE.search(pre_words) or has_current
        if (
            not qualified
            or P.OPACITY_EXCLUDE_RE.search(pre_words)
            or re.search(r"atelecta|scar|fibro|consolidat", seg, re.I)
        ):
            return "excluded"
    if P.GENERIC_CONTEXT_RE.search(s) and not seg_lobes and not has_current:
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


def _label_sentence(sent: _Sentence, idx: int) -> _SentenceResult:
    s = sent.text
    res = _SentenceResult()
    res.clear = bool(P.CLEAR_LUNGS_RE.search(s)) and not P.CLEAR_EXCEPTION_RE.search(s)
    emph = [m.span() for m in P.EMPHYSEMA_RE.finditer(s)]
    anchors = _anchors(s)
    statuses, masked = _statuses(s, [(a.start, a.end) for a in anchors] + emph)
    for a, st in zip(anchors, statuses, strict=False):
        a.status = st
    res.emphysema = statuses[len(anchors) :]
    # An interpretation ("..., likely a granuloma") of a mention earlier in the sentence is no new mention.
    kept: list[_Anchor] = []
    for a in anchors:
        a.interpretive = bool(P.INTERPRETIVE_PRE_RE.search(s[max(0, a.start - 60) : a.start]))
        if a.interpretive and kept:
            continue
        kept.append(a)
    anchors = kept
    sizes, lobes = _sizes(s), _lobes(s)
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
    _segments(s, anchors, sizes, lobes)
    affirmed: list[tuple[_Anchor, _Mention]] = []
    for a in anchors:
        seg_sizes = [z for z in sizes if a.seg[0] <= z.start < a.seg[1]]
        seg_lobes = [lb for lb in lobes if a.seg[0] <= lb[0] < a.seg[1]]
        status = _classify(sent, s, a, seg_sizes, seg_lobes)
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
            comp = _size_comparison(cur, priors)
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
            sizes_for: dict[int, _Size] = {}
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
            m = _Mention(nod, sent.section, idx, det == "definite", another, a.interpretive, has_attrs)
            affirmed.append((a, m))
    # Attribute-less plural summaries ("two nodules: ...") next to described mentions add nothing.
    if any(m.has_attrs for _, m in affirmed):
        affirmed = [(a, m) for a, m in affirmed if m.has_attrs or not a.plural]
    res.mentions = [m for _, m in affirmed]
    return res


# ------------------------------------------------------------------------------------------------------
# Report level
# ------------------------------------------------------------------------------------------------------


def _compatible(k: LabeledNodule, m: LabeledNodule) -> bool:
    if k.size_mm is not None and m.size_mm is not None and abs(k.size_mm - m.size_mm) > 0.5:
        return False
    return all(
        getattr(k, f) is None or getattr(m, f) is None or getattr(k, f) == getattr(m, f)
        for f in ("lobe", "type", "margin", "calcified")
    )


def _same(a: float | str | None, b: float | str | None) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 0.5
    return a == b


def _merge_into(k: LabeledNodule, m: LabeledNodule) -> None:
    if k.size_mm is None and m.size_mm is not None:
        k.size_mm, k.dims_mm = m.size_mm, m.dims_mm
    for f in ("lobe", "type", "margin", "calcified"):
        if getattr(k, f) is None:
            setattr(k, f, getattr(m, f))
    k.comparison = _worst_comparison([k.comparison, m.comparison])


def _worst_comparison(values: Iterable[str | None]) -> str | None:
    vals = [v for v in values if v]
    return max(vals, key=lambda v: COMPARISON_PRIORITY[v]) if vals else None


def _merge_mentions(mentions: list[_Mention]) -> list[LabeledNodule]:
    kept: list[_Mention] = []
    for m in mentions:
        n = m.nodule
        if m.another:
            kept.append(m)
            continue
        earlier = [k for k in kept if k.sent < m.sent and _compatible(k.nodule, n)]
        target: _Mention | None = None
        if n.size_mm is not None and n.lobe is not None:
            strong = [k for k in earlier if _same(k.nodule.size_mm, n.size_mm) and k.nodule.lobe == n.lobe]
            target = strong[-1] if strong else None
        linked = [k for k in earlier if k.section != m.section or m.definite or m.interpretive]
        if target is None and linked:
            keys = [f for f in ("size_mm", "lobe") if getattr(n, f) is not None]
            exact = [k for k in linked if any(_same(getattr(k.nodule, f), getattr(n, f)) for f in keys)]
            if exact:
                target = exact[-1]
            elif len(linked) == 1 or m.definite or m.interpretive:
                target = linked[-1]
            elif not keys:
                continue  # a summary of several nodules already described
        if target is not None:
            _merge_into(target.nodule, n)
        else:
            kept.append(m)
    return [k.nodule for k in kept]


def _lung_rads(sentences: list[_Sentence]) -> tuple[str | None, bool]:
    found: list[tuple[bool, str, bool]] = []  # (in impression, category, S modifier)
    s_any = False
    for sent in sentences:
        if sent.section in P.SKIP_SECTIONS:
            continue
        s = sent.text
        s_any = s_any or bool(P.S_MODIFIER_RE.search(s))
        hits = list(P.LUNG_RADS_RE.finditer(s))
        if not hits and not P.OTHER_RADS_RE.search(s):
            hits = list(P.CATEGORY_RE.finditer(s))
        for m in hits:
            if P.LUNG_RADS_PRIOR_RE.search(s[max(0, m.start() - 30) : m.start()]):
                continue
            up = P.LUNG_RADS_UPGRADE_RE.match(s[m.end() :])
            g = up or m
            cat, sub = g.group("cat"), (g.group("sub") or "").upper()
            if (cat == "4") != bool(sub):
                continue
            found.append((sent.section == "impression", cat + sub, bool(g.group("s"))))
    if not found:
        return None, s_any
    best = [f for f in found if f[0]] or found
    _, cat, s_mod = best[-1]
    return cat, s_mod or s_any


def label_report(text: str) -> ReportLabels:
    """Label one free-text chest CT report.

    Args:
        text: the report (any mix of FINDINGS/IMPRESSION sections, bullets, hard-wrapped lines).

    Returns:
        :class:`ReportLabels`; ``nodule_present`` is True when a current pulmonary nodule is affirmed,
        False when nodules are negated (or the lungs are called clear) and none is affirmed, None when the
        report does not say (e.g. only "no new or enlarging nodules").
    """
    sentences = _report_sentences(text)
    mentions: list[_Mention] = []
    negated = clear = False
    emph: list[str] = []
    comps: list[str] = []
    referent: list[str] = []
    for idx, sent in enumerate(sentences):
        if sent.section in P.SKIP_SECTIONS or sent.section == "recommendation":
            continue
        r = _label_sentence(sent, idx)
        negated, clear = negated or r.negated, clear or r.clear
        emph += r.emphysema
        comps += r.comparisons
        if r.referent_comparison:
            referent.append(r.referent_comparison)
        if r.pronoun is not None:
            prior = [m for m in mentions if m.section == sent.section]
            if prior:
                target = prior[-1].nodule
                _merge_into(target, r.pronoun)
                if target.comparison is None and target.size_mm is not None and r.pronoun_prior is not None:
                    now = _Size(0, (target.size_mm,), "current")
                    target.comparison = _size_comparison(now, [r.pronoun_prior])
        mentions += r.mentions
    nodules = _merge_mentions(mentions)
    present = True if nodules else (False if negated or clear else None)
    emphysema = True if "affirmed" in emph else (False if "negated" in emph else None)
    comparison = _worst_comparison(comps + (referent if nodules else []) + [n.comparison for n in nodules])
    lung_rads, s_mod = _lung_rads(sentences)
    return ReportLabels(present, emphysema, nodules, comparison, lung_rads, s_mod)


# ------------------------------------------------------------------------------------------------------
# Batch and concept metric
# ------------------------------------------------------------------------------------------------------


def _clip(value: Any, n: int = 80) -> str:
    r = value if isinstance(value, str) else repr(value)
    r = r.strip()
    return r if len(r) <= n else r[: n - 3] + "..."


def label_reports_jsonl(lines: Iterable[str]) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """Label ``{"id", "text"}`` JSON lines (``study_uid`` is accepted in place of ``id``).

    Yields:
        ``({"id", **labels.to_dict()}, None)`` per record, or ``(None, "line N: <reason>")`` for a malformed
        line (blank lines are skipped); the following lines are still labelled.
    """
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield None, f"line {lineno}: not valid JSON ({e.msg} at column {e.colno}): {_clip(line)!r}"
            continue
        if not isinstance(obj, dict):
            yield None, f"line {lineno}: expected a JSON object, got {type(obj).__name__}: {_clip(line)!r}"
            continue
        rid = obj["id"] if "id" in obj else obj.get("study_uid")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            yield None, f"line {lineno}: 'id' missing or not a non-empty string/integer (got {rid!r})"
            continue
        text = obj.get("text")
        if not isinstance(text, str):
            yield None, f"line {lineno}: id {rid!r}: 'text' missing or not a string (got {_clip(text)})"
            continue
        try:
            labels = label_report(text)
        except Exception as e:  # noqa: BLE001 - one bad report must not stop the batch
            yield None, f"line {lineno}: id {rid!r}: labeling failed ({type(e).__name__}: {e})"
            continue
        yield {"id": rid, **labels.to_dict()}, None


def size_bucket(size_mm: float | None) -> str | None:
    """Lung-RADS size bucket: ``"<6"``, ``"6-8"``, ``"8-15"``, ``">=15"`` (None when unknown)."""
    if size_mm is None:
        return None
    if size_mm < 6:
        return "<6"
    if size_mm < 8:
        return "6-8"
    return "8-15" if size_mm < 15 else ">=15"


def dominant_nodule(labels: ReportLabels) -> LabeledNodule | None:
    """The largest nodule (the first one when no size is known); None when there is none."""
    if not labels.nodules:
        return None
    sized = [n for n in labels.nodules if n.size_mm is not None]
    return max(sized, key=lambda n: n.size_mm or 0.0) if sized else labels.nodules[0]


def concept_vector(labels: ReportLabels) -> dict[str, str | bool | None]:
    """Flattened clinical concepts (keys :data:`CONCEPT_KEYS`) of the dominant nodule and the report."""
    n = dominant_nodule(labels)
    return {
        "nodule_present": labels.nodule_present,
        "type": n.type if n else None,
        "margin": n.margin if n else None,
        "calcified": n.calcified if n else None,
        "lobe": n.lobe if n else None,
        "size_bucket": size_bucket(n.size_mm) if n else None,
        "comparison": labels.comparison,
        "emphysema": labels.emphysema,
    }


def concept_f1(pred: ReportLabels, ref: ReportLabels) -> float:
    """Micro-F1 of ``pred``'s concepts against ``ref``'s, over the slots known (not None) in ``ref``.

    A predicted slot counts as a prediction when it is not None; it is a hit when it equals the reference.
    Slots the reference leaves unknown are ignored. Returns 1.0 when the reference knows no slot.
    """
    pv, rv = concept_vector(pred), concept_vector(ref)
    gold = [k for k in CONCEPT_KEYS if rv[k] is not None]
    if not gold:
        return 1.0
    predicted = [k for k in gold if pv[k] is not None]
    hits = sum(1 for k in predicted if pv[k] == rv[k])
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(gold)
    return 2 * precision * recall / (precision + recall)
