"""Sections and sentences of a free-text chest CT report (the labeler's first step).

:func:`report_sentences` normalises the text, splits it into sections (FINDINGS/IMPRESSION/...; which
ones are mined is decided by :mod:`lungvl_model.text.labeler`) and the sections into sentences, joining
hard-wrapped lines and splitting bullets. Patterns live in :mod:`lungvl_model.text.labeler_patterns`.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from lungvl_model.text import labeler_patterns as P

__all__ = ["Sentence", "report_sentences", "section_of"]


@dataclass
class Sentence:
    """One sentence of a report, with the section it is in."""

    text: str
    section: str
    extrapulmonary: bool = False  # under an extrapulmonary sub-header ("Thyroid:", "Upper abdomen:")


def _normalize(text: str) -> str:
    for k, v in P.CHAR_MAP.items():
        text = text.replace(k, v)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def section_of(name: str) -> str:
    """The canonical section of a report heading (``"findings"`` when it is not a known one)."""
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
        pos, sec = m.end(), section_of(m.group("name"))
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
    """Whether line ``nxt`` continues the (hard-wrapped) line ``prev``.

    Only the end of ``prev`` matters, so the caller passes the last line of the paragraph so far, not the
    whole paragraph (the checks then cost the length of one line, not of the paragraph).
    """
    if P.LIST_MARKER_RE.match(nxt) and not re.match(r"\d+(?:\.\d+)?\s*(?:mm|cm)", nxt, re.I):
        return False
    sub = P.SUBHEADER_RE.match(nxt)
    if sub and len(sub.group("name").split()) <= 4:
        return False
    if re.search(r"[.!?:;]\s*$", prev):
        return False
    return nxt[:1].islower() or bool(P.CONTINUATION_END_RE.search(prev))


def _paragraphs(block: str) -> list[str]:
    """The paragraphs of ``block``: blank lines separate them; hard-wrapped lines are joined with a space."""
    paras: list[str] = []
    cur: list[str] = []  # the stripped lines of the paragraph being read
    for raw in block.split("\n"):
        line = raw.strip()
        if not line:
            if cur:
                paras.append(" ".join(cur))
            cur = []
        elif cur and _continues(cur[-1], line):
            cur.append(line)
        else:
            if cur:
                paras.append(" ".join(cur))
            cur = [line]
    if cur:
        paras.append(" ".join(cur))
    return paras


_TOKEN_RE = re.compile(r"\S+")


def _split_paragraph(para: str) -> list[str]:
    """Split one paragraph at sentence boundaries, in one pass over it.

    A boundary is not a sentence end when the whitespace-delimited word before it is an abbreviation. That
    word is found from a table of the paragraph's word starts (one bisection per boundary) instead of
    re-splitting the paragraph's prefix at every boundary, which was quadratic in the paragraph length.
    """
    out: list[str] = []
    starts: list[int] | None = None
    start = 0
    for m in P.SENT_BOUNDARY_RE.finditer(para):
        b = m.start()  # just after ".", "!" or "?", so the word before the boundary ends at b
        if starts is None:
            starts = [t.start() for t in _TOKEN_RE.finditer(para)]
        i = bisect.bisect_right(starts, b - 1) - 1
        last = para[starts[i] : b].lower().lstrip("([") if i >= 0 else ""
        if last.rstrip(".") in P.ABBREVIATIONS or last in P.ABBREVIATIONS:
            continue
        out.append(para[start:b])
        start = m.end()
    out.append(para[start:])
    return out


_SIZE_FIRST_RE = re.compile(r"^\s*\d+(?:\.\d+)?\s*(?:mm|cm)", re.I)


def _split_sentences(block: str) -> list[str]:
    sentences = []
    for para in _paragraphs(block):
        for s in _split_paragraph(para):
            s = P.LIST_MARKER_RE.sub("", s, count=1).strip() if not _SIZE_FIRST_RE.match(s) else s
            if s.strip(" .;:-"):
                sentences.append(s.strip())
    return sentences


def report_sentences(text: str) -> list[Sentence]:
    """The sentences of a report in order, each with its section and extrapulmonary flag.

    A sentence is flagged when an extrapulmonary sub-header ("Thyroid:", "Upper abdomen:") heads it.
    """
    out: list[Sentence] = []
    for sec, content in _sections(_normalize(text)):
        extra = False
        for s in _split_sentences(content):
            sub = P.SUBHEADER_RE.match(s)
            if sub and len(sub.group("name").split()) <= 4:
                extra = bool(P.EXTRAPULMONARY_SUBHEADER_RE.fullmatch(sub.group("name").strip()))
            out.append(Sentence(s, sec, extra))
    return out
