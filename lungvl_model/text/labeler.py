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
:mod:`lungvl_model.text.labeler_patterns`.
"""

from __future__ import annotations

import json
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

__all__ = ["label_report", "label_reports_jsonl"]


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


def _merge_mentions(mentions: list[Mention]) -> list[LabeledNodule]:
    kept: list[Mention] = []
    for m in mentions:
        n = m.nodule
        if m.another:
            kept.append(m)
            continue
        earlier = [k for k in kept if k.sent < m.sent and _compatible(k.nodule, n)]
        target: Mention | None = None
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
    sentences = report_sentences(text)
    mentions: list[Mention] = []
    negated = clear = False
    emph: list[str] = []
    comps: list[str] = []
    referent: list[str] = []
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
            prior = [m for m in mentions if m.section == sent.section]
            if prior:
                target = prior[-1].nodule
                _merge_into(target, r.pronoun)
                if target.comparison is None and target.size_mm is not None and r.pronoun_prior is not None:
                    now = Size(0, (target.size_mm,), "current")
                    target.comparison = size_comparison(now, [r.pronoun_prior])
        mentions += r.mentions
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
