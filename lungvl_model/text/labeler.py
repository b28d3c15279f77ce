"""Rule-based chest CT report labeler: free-text report -> structured findings.

Used for weak labels at sites without ``labels.csv`` and to score clinical concepts in generated
explanations (:func:`concept_f1`). Pipeline: normalise -> sections (FINDINGS/IMPRESSION/...; history,
technique and comparison sections are not mined) -> sentences -> per sentence: nodule mentions
(anchors), NegEx-style negation scoped to clauses, attributes attached to the nearest mention of the same
segment -> merge mentions repeated across sentences/sections -> report-level labels.

Modules: sections and sentences in :mod:`lungvl_model.text.report_sentences`, the spans of a sentence in
:mod:`lungvl_model.text.sentence_spans`, its findings in :mod:`lungvl_model.text.sentence_findings`,
the labels and the concept metric in :mod:`lungvl_model.text.report_labels` (re-exported here); this
module merges the sentences into report labels and labels JSON lines. Patterns live in
:mod:`lungvl_model.text.labeler_patterns`; what makes a nodule-like mention no pulmonary nodule (another
organ or a lymph node, an opacity or consolidation, a nodular pattern) in
:mod:`lungvl_model.text.labeler_context`. ``tests/lungvl_model/data/real_phrasing.jsonl`` holds the real-report
phrasings (US/UK/telegraphic/structured/translated) it is checked on.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from lungvl_model.text import labeler_patterns as P
from lungvl_model.text.report_labels import (
    COMPARISON_PRIORITY,
    LabeledNodule,
    ReportLabels,
)
from lungvl_model.text.report_sentences import Sentence, report_sentences
from lungvl_model.text.sentence_findings import Mention, label_sentence, size_comparison
from lungvl_model.text.sentence_spans import Size

__all__ = ["MAX_REPORT_CHARS", "label_report", "label_reports_jsonl", "report_size_problem"]

#: Longest report text (characters) the labeler reads. Chest CT reports are a few thousand characters
#: (a long one with many nodules ~10 000): the limit is 100 times that, so no real report reaches it, while
#: anything longer is a concatenation or a wrong field. Labelling is linear in the length (about 2-4 s for
#: 1 MB on one CPU core), so a report at the limit still takes seconds, never a hang.
MAX_REPORT_CHARS = 1_000_000


def report_size_problem(text: str) -> str | None:
    """Why ``text`` is too long for :func:`label_report` (None when it is not)."""
    if len(text) <= MAX_REPORT_CHARS:
        return None
    return f"report text of {len(text):,} characters is over the labeler's limit of {MAX_REPORT_CHARS:,} characters"


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


_CAT_FIELDS = ("lobe", "type", "margin", "calcified")
#: A kept nodule's place in :class:`_KeptIndex`: (categorical fields, section) and its size.
_Key = tuple[tuple[Any, ...], str]


def _cat(n: LabeledNodule) -> tuple[Any, ...]:
    return tuple(getattr(n, f) for f in _CAT_FIELDS)


def _size_compatible(a: float | None, b: float | None) -> bool:
    return a is None or b is None or not abs(a - b) > 0.5


class _KeptIndex:
    """The nodules kept so far by :func:`_merge_mentions`, indexed for its queries.

    A mention may merge only into an earlier kept nodule whose lobe/type/margin/calcification each are
    unset on one side or equal and whose size is unset on one side or within 0.5 mm. Comparing every
    mention with every kept nodule was quadratic in the report length (a long report keeps many
    nodules); here the kept nodules are grouped by (those four fields, section) and, inside a group, by
    size, each group holding its kept positions in order. A query visits only the compatible groups (at
    most the few combinations of the fields' values) and, inside one, the sizes within 0.5 mm, and reads
    the last two positions before the mention's sentence by bisection; the answer is the same as the
    pairwise scan's.
    """

    def __init__(self) -> None:
        self.kept: list[Mention] = []
        self.sents: list[int] = []  # kept[i].sent, non-decreasing
        self.by_key: dict[_Key, list[int]] = {}  # every size
        self.by_size: dict[_Key, dict[float | None, list[int]]] = {}
        self.sizes: dict[_Key, list[float]] = {}  # finite sizes present, sorted
        self.odd_sizes: dict[_Key, set[float]] = {}  # non-finite sizes ("1e400 mm")
        self.place: list[tuple[_Key, float | None]] = []

    def append(self, m: Mention) -> None:
        self.kept.append(m)
        self.sents.append(m.sent)
        self.place.append(((_cat(m.nodule), m.section), m.nodule.size_mm))
        self._add(len(self.kept) - 1)

    def _add(self, i: int) -> None:
        key, size = self.place[i]
        bisect.insort(self.by_key.setdefault(key, []), i)
        group = self.by_size.setdefault(key, {})
        if size not in group:
            group[size] = []
            if size is not None:
                if math.isfinite(size):
                    bisect.insort(self.sizes.setdefault(key, []), size)
                else:
                    self.odd_sizes.setdefault(key, set()).add(size)
        bisect.insort(group[size], i)

    def _remove(self, i: int) -> None:
        key, size = self.place[i]
        for lst in (self.by_key[key], self.by_size[key][size]):
            del lst[bisect.bisect_left(lst, i)]
        if not self.by_size[key][size]:
            del self.by_size[key][size]
            if size is not None:
                if math.isfinite(size):
                    sizes = self.sizes[key]
                    del sizes[bisect.bisect_left(sizes, size)]
                else:
                    self.odd_sizes[key].discard(size)
        if not self.by_key[key]:
            del self.by_key[key], self.by_size[key]
            self.sizes.pop(key, None)
            self.odd_sizes.pop(key, None)

    def merge(self, i: int, m: Mention) -> None:
        """Merge mention ``m`` into kept nodule ``i`` (which may fill its unset fields: re-indexed)."""
        self._remove(i)
        _merge_into(self.kept[i].nodule, m.nodule)
        self.place[i] = ((_cat(self.kept[i].nodule), self.kept[i].section), self.kept[i].nodule.size_mm)
        self._add(i)

    def _size_lists(self, key: _Key, size: float | None) -> Iterator[tuple[float | None, list[int]]]:
        """The position lists of group ``key`` whose size is compatible with ``size`` (labelled by that size).

        A mention without a size is compatible with every size: it gets the group's one list of all
        positions, labelled None (no size of it can be the same).
        """
        if size is None:
            yield None, self.by_key[key]
            return
        group = self.by_size[key]
        if None in group:
            yield None, group[None]
        odd = self.odd_sizes.get(key, set())
        finite = self.sizes.get(key, [])
        if math.isfinite(size):
            margin = 0.5 + 1e-6 * max(1.0, abs(size))  # candidates; the exact test follows
            near = finite[bisect.bisect_left(finite, size - margin) : bisect.bisect_right(finite, size + margin)]
        else:
            near = finite if math.isnan(size) else []  # an infinite size is more than 0.5 from any finite one
        for s in [*near, *odd]:
            if _size_compatible(s, size):
                yield s, group[s]

    def query(self, m: Mention) -> tuple[int, int, int, int]:
        """Positions ``(strong, exact, last linked, second-last linked)`` for mention ``m`` (-1: none).

        Only kept nodules of earlier sentences that are compatible with ``m`` count (:func:`_merge_mentions`).
        """
        n = m.nodule
        ncat = _cat(n)
        free = m.definite or m.interpretive
        bound = bisect.bisect_left(self.sents, m.sent)
        strong = exact = last = second = -1
        for key in self.by_key:
            cat, section = key
            if not all(a is None or b is None or a == b for a, b in zip(cat, ncat, strict=True)):
                continue
            linked = free or section != m.section
            lobe_same = _same(cat[0], n.lobe)
            for size, lst in self._size_lists(key, n.size_mm):
                p = bisect.bisect_left(lst, bound)
                if p == 0:
                    continue
                size_same = _same(size, n.size_mm)
                if size_same and lobe_same:
                    strong = max(strong, lst[p - 1])
                if not linked:
                    continue
                if size_same or lobe_same:
                    exact = max(exact, lst[p - 1])
                for j in lst[max(0, p - 2) : p]:
                    if j > last:
                        last, second = j, last
                    elif j > second:
                        second = j
        return strong, exact, last, second


def _merge_mentions(mentions: list[Mention]) -> list[LabeledNodule]:
    """Merge mentions of one nodule repeated across sentences/sections (``mentions`` in sentence order).

    A mention merges into the last earlier (previous-sentence) compatible kept nodule of the same size and
    lobe; else, among the compatible kept nodules of another section (any section for a definite or
    interpretive mention), into the last one sharing its size or lobe, or the only one, or the last one
    for a definite/interpretive mention; a size- and lobe-less summary of several is dropped; anything
    else is kept as a new nodule. Linear in the number of mentions (see :class:`_KeptIndex`).
    """
    if any(a.sent > b.sent for a, b in zip(mentions, mentions[1:], strict=False)):
        raise ValueError("_merge_mentions needs the mentions in sentence order")
    index = _KeptIndex()
    for m in mentions:
        n = m.nodule
        if m.another:
            index.append(m)
            continue
        strong, exact, last, second = index.query(m)
        target = strong if n.size_mm is not None and n.lobe is not None and strong >= 0 else -1
        if target < 0 and last >= 0:
            if exact >= 0:
                target = exact
            elif second < 0 or m.definite or m.interpretive:
                target = last
            elif n.size_mm is None and n.lobe is None:
                continue  # a summary of several nodules already described
        if target >= 0:
            index.merge(target, m)
        else:
            index.append(m)
    return [k.nodule for k in index.kept]


def _lung_rads(sentences: list[Sentence]) -> tuple[str | None, bool]:
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
            up = P.LUNG_RADS_UPGRADE_RE.match(s, m.end())
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
        report does not say (e.g. only "no new or enlarging nodules", which says known nodules are stable
        but asserts none; or only a thyroid nodule, a ground-glass opacity or a nodular pattern). Tiny
        ("millimetric") nodules and micronodules are nodules without a size. Empty text gives all None.

    Raises:
        ValueError: ``text`` is longer than :data:`MAX_REPORT_CHARS` (the message names both sizes).
    """
    too_long = report_size_problem(text)
    if too_long is not None:
        raise ValueError(too_long)
    sentences = report_sentences(text)
    mentions: list[Mention] = []
    negated = clear = False
    emph: list[str] = []
    comps: list[str] = []
    referent: list[str] = []
    last_in_section: dict[str, Mention] = {}  # the last mention of each section so far
    for idx, sent in enumerate(sentences):
        if sent.section in P.SKIP_SECTIONS or sent.section == "recommendation":
            continue
        r = label_sentence(sent, idx)
        negated, clear = negated or r.negated, clear or r.clear
        emph += r.emphysema
        comps += r.comparisons
        if r.referent_comparison:
            referent.append(r.referent_comparison)
        if r.pronoun is not None:
            prior = last_in_section.get(sent.section)
            if prior is not None:
                target = prior.nodule
                _merge_into(target, r.pronoun)
                if target.comparison is None and target.size_mm is not None and r.pronoun_prior is not None:
                    now = Size(0, (target.size_mm,), "current")
                    target.comparison = size_comparison(now, [r.pronoun_prior])
        mentions += r.mentions
        for m in r.mentions:
            last_in_section[m.section] = m
    nodules = _merge_mentions(mentions)
    present = True if nodules else (False if negated or clear else None)
    emphysema = True if "affirmed" in emph else (False if "negated" in emph else None)
    comparison = _worst_comparison(comps + (referent if nodules else []) + [n.comparison for n in nodules])
    lung_rads, s_mod = _lung_rads(sentences)
    return ReportLabels(present, emphysema, nodules, comparison, lung_rads, s_mod)


def _clip(value: Any, n: int = 80) -> str:
    r = value if isinstance(value, str) else repr(value)
    r = r.strip()
    return r if len(r) <= n else r[: n - 3] + "..."


def label_reports_jsonl(lines: Iterable[str]) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """Label ``{"id", "text"}`` JSON lines (``study_uid`` is accepted in place of ``id``).

    Yields:
        ``({"id", **labels.to_dict()}, None)`` per record, or ``(None, "line N: <reason>")`` for a malformed
        line, an empty report text or one over :data:`MAX_REPORT_CHARS` (blank lines are skipped); the
        following lines are still labelled.
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
        if not text.strip():
            yield None, f"line {lineno}: id {rid!r}: empty report text ({_clip(text)!r})"
            continue
        too_long = report_size_problem(text)
        if too_long is not None:
            yield None, f"line {lineno}: id {rid!r}: {too_long}"
            continue
        try:
            labels = label_report(text)
        except Exception as e:  # noqa: BLE001 - one bad report must not stop the batch
            yield None, f"line {lineno}: id {rid!r}: labeling failed ({type(e).__name__}: {e})"
            continue
        yield {"id": rid, **labels.to_dict()}, None
