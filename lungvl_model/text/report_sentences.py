"""Sections and sentences of a free-text chest CT report (the labeler's first step).

:func:`report_sentences` normalises the text, splits it into sections (FINDINGS/IMPRESSION/...; which
ones are mined is decided by :mod:`lungvl_model.text.labeler`) and the sections into sentences, joining
hard-wrapped lines and splitting bullets. Patterns live in :mod:`lungvl_model.text.labeler_patterns`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lungvl_model.text import labeler_patterns as P

__all__ = ["Sentence", "report_sentences"]


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
