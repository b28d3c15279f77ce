"""Report labeler on long and pathological texts: linear time, the size limit, the merge index."""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import pytest

from lungvl_model.data.site_layout import read_reports
from lungvl_model.text.labeler import (
    MAX_REPORT_CHARS,
    _merge_into,
    _merge_mentions,
    _same,
    label_report,
    label_reports_jsonl,
)
from lungvl_model.text.report_labels import LabeledNodule
from lungvl_model.text.report_sentences import report_sentences
from lungvl_model.text.sentence_findings import Mention

LOBES = ("right upper", "right middle", "right lower", "left upper", "left lower")
LOBE_CODES = ("RUL", "RML", "RLL", "LUL", "LLL")


def nodule_findings(first: int, n: int, more: str = "") -> str:
    """``n`` sentences, each one nodule of its own size (``first`` ... mm, 1 mm apart: none merge)."""
    return " ".join(f"A {first + i} mm solid nodule in the {LOBES[i % 5]} lobe{more}." for i in range(n))


def test_long_report_counts_scale_with_its_length() -> None:
    unit = "FINDINGS: " + nodule_findings(3, 40) + " No pleural effusion.\n\nIMPRESSION: Lung-RADS 4B."
    one, many = report_sentences(unit), report_sentences("\n\n".join([unit] * 25))
    assert len(many) == 25 * len(one) == 25 * 42
    assert [s.text for s in many[: len(one)]] == [s.text for s in one]
    labels = label_report("FINDINGS: " + nodule_findings(3, 2000))  # one paragraph of 2000 sentences
    assert [(n.size_mm, n.lobe, n.type) for n in labels.nodules] == [
        (float(3 + i), LOBE_CODES[i % 5], "solid") for i in range(2000)
    ]
    # the same paragraph hard-wrapped at 60 columns reads the same
    wrapped, line = [], ""
    for word in nodule_findings(3, 2000).split(" "):
        if len(line) + len(word) > 60:
            wrapped.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    assert label_report("FINDINGS:\n" + "\n".join([*wrapped, line])).to_dict() == labels.to_dict()


def test_one_megabyte_report_labels_without_a_hang() -> None:
    text = "FINDINGS: " + nodule_findings(3, 12_000, more=" is unchanged in size and has smooth, well-defined margins")
    text = text[: text.rindex(".", 0, MAX_REPORT_CHARS) + 1]  # whole sentences (~100 characters), at most the limit
    assert len(text) > 0.95 * MAX_REPORT_CHARS
    t0 = time.perf_counter()
    labels = label_report(text)
    assert time.perf_counter() - t0 < 30  # a hang guard only: linear labelling takes a few seconds
    n = text.count(" mm solid nodule")
    assert len(labels.nodules) == n and labels.nodules[-1].size_mm == float(3 + n - 1)
    assert {(x.type, x.margin, x.comparison) for x in labels.nodules} == {("solid", "smooth", "stable")}


@pytest.mark.parametrize(
    "text",
    [
        "Nodules: none" + " " * 100_000 + "x",  # three adjacent \s* once backtracked cubically
        "6" + " " * 100_000 + "x mm",  # a number before a long run of spaces
        "6 mm nodule in the right upper lobe, " * 3000,  # one sentence with thousands of mentions
        "no nodule and no mass and " * 4000,  # thousands of negation triggers in one sentence
        "A nodule " + "non-spiculated " * 7000,  # thousands of negated attribute words in one segment
        "3-4 mm " * 15_000,  # thousands of ranges in one sentence
        "nodule in the\n" * 8000,  # hard-wrapped lines without a period: one long sentence
        "".join(f"A {3 + i} mm nodule. A nodule. The {1 + i / 2} mm LUL nodule. " for i in range(2000)),  # merges
    ],
    ids=[
        "spaces-after-none",
        "spaces-after-number",
        "mentions",
        "negations",
        "attributes",
        "ranges",
        "wrapped",
        "merges",
    ],
)
def test_pathological_sentences_label_without_a_hang(text: str) -> None:
    t0 = time.perf_counter()
    label_report(text)
    assert time.perf_counter() - t0 < 30  # each takes well under a second when linear


def test_report_over_the_limit_is_refused_naming_its_size() -> None:
    with pytest.raises(ValueError, match=r"1,000,001 characters is over the labeler's limit of 1,000,000"):
        label_report("x" * (MAX_REPORT_CHARS + 1))
    assert label_report("").to_dict()["nodule_present"] is None  # callers of label_report itself: all unknown


def test_jsonl_names_empty_and_oversized_reports() -> None:
    lines = [
        json.dumps({"id": "a", "text": "Stable 4 mm RUL nodule."}),
        json.dumps({"id": "empty", "text": ""}),
        json.dumps({"id": "blank", "text": " \n "}),
        json.dumps({"id": "huge", "text": "No nodules. " * 90_000}),
        json.dumps({"id": "b", "text": "No pulmonary nodules."}),
    ]
    out = list(label_reports_jsonl(lines))
    assert [rec["id"] for rec, _ in out if rec] == ["a", "b"]
    errors = [e for _, e in out if e]
    assert errors[0].startswith("line 2: id 'empty': empty report text")
    assert errors[1].startswith("line 3: id 'blank': empty report text")
    assert errors[2] == (
        "line 4: id 'huge': report text of 1,080,000 characters is over the labeler's limit of 1,000,000 characters"
    )


# ------------------------------------------------------------------------------------------------------
# The merge index gives what the pairwise scan gave
# ------------------------------------------------------------------------------------------------------


def _compatible(k: LabeledNodule, m: LabeledNodule) -> bool:
    if k.size_mm is not None and m.size_mm is not None and abs(k.size_mm - m.size_mm) > 0.5:
        return False
    return all(
        getattr(k, f) is None or getattr(m, f) is None or getattr(k, f) == getattr(m, f)
        for f in ("lobe", "type", "margin", "calcified")
    )


def reference_merge(mentions: list[Mention]) -> list[LabeledNodule]:
    """The pairwise (quadratic) merge the index replaced, verbatim."""
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
                continue
        if target is not None:
            _merge_into(target.nodule, n)
        else:
            kept.append(m)
    return [k.nodule for k in kept]


def random_mentions(rng: random.Random) -> list[Mention]:
    out, sent = [], 0
    for _ in range(rng.randint(0, 30)):
        sent += rng.choice((0, 0, 1, 1, 2))
        size = rng.choice((None, None, 4.0, 4.4, 4.5, 4.6, 5.0, 5.5, 6.0, 12.0, float("inf")))
        nod = LabeledNodule(
            size_mm=size,
            dims_mm=(size,) if size is not None else (),
            lobe=rng.choice((None, None, "RUL", "LLL")),
            type=rng.choice((None, "solid", "non_solid")),
            margin=rng.choice((None, None, "spiculated")),
            calcified=rng.choice((None, None, True, False)),
            comparison=rng.choice((None, "stable", "new", "growing")),
        )
        out.append(
            Mention(
                nod,
                rng.choice(("findings", "findings", "impression")),
                sent,
                definite=rng.random() < 0.2,
                another=rng.random() < 0.1,
                interpretive=rng.random() < 0.1,
            )
        )
    return out


def test_merge_index_matches_the_pairwise_merge() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        mentions = random_mentions(rng)
        want = reference_merge(copy.deepcopy(mentions))
        got = _merge_mentions(copy.deepcopy(mentions))
        assert got == want, mentions


def test_site_reports_over_the_limit_are_named_and_skipped(tmp_path: Path) -> None:
    f = tmp_path / "reports.jsonl"
    rows = [{"study_uid": "1.2", "text": "x" * (MAX_REPORT_CHARS + 1)}, {"study_uid": "1.3", "text": "No nodules."}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, problems = read_reports(f)
    assert list(records) == ["1.3"]
    assert problems == [
        "reports.jsonl:1: study 1.2: report text of 1,000,001 characters is over the labeler's limit of "
        "1,000,000 characters"
    ]
