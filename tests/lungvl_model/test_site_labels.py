"""labels.csv schema and reports.jsonl robustness: what training and ``lungvl site check`` both read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.labels_schema import (
    LABEL_SCHEMA,
    MAX_PER_KIND,
    ColumnSpec,
    ProblemLog,
    count_problems,
    read_labels_csv,
)
from lungvl_model.data.site_layout import LABEL_COLUMNS, read_labels, read_reports, write_labels
from tests.conftest import write_mini_site

UID = "1.2.826.0.1.3680043.10.2.1"
NODULE = {
    "study_uid": UID,
    "level": "nodule",
    "series_uid": UID + ".1",
    "nodule_id": "1",
    "centroid_x_mm": "-12.5",
    "centroid_y_mm": "30",
    "centroid_z_mm": "-150.25",
    "longest_diameter_mm": "7.1",
    "short_axis_mm": "5.2",
    "mean_diameter_mm": "6.15",
    "volume_mm3": "120.5",
    "type": "solid",
    "solid_component_mm": "6.15",
    "margin": "smooth",
    "spiculation": "0",
    "calcification": "0",
    "juxtapleural": "1",
    "lobe": "RUL",
    "context": "baseline",
    "growth_mm": "-0.5",
    "n_readers": "4",
    "malignancy_score": "2.75",
    "malignant": "0",
    "brock_probability": "0.04",
    "lung_rads": "3",
}
STUDY = {
    "study_uid": UID,
    "level": "study",
    "lung_rads": "3",
    "age": "63",
    "sex": "F",
    "family_history": "1",
    "smoking_pack_years": "32.5",
    "emphysema": "0",
    "nodule_count": "1",
}


def csv_text(rows: list[dict[str, str]], columns: tuple[str, ...] = LABEL_COLUMNS) -> str:
    lines = [",".join(columns)]
    lines += [",".join(r.get(c, "") for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "labels.csv"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def test_schema_covers_every_label_column() -> None:
    assert tuple(LABEL_SCHEMA) == LABEL_COLUMNS
    assert all(isinstance(s, ColumnSpec) for s in LABEL_SCHEMA.values())


def test_valid_rows_are_read_with_every_column(tmp_path: Path) -> None:
    rows, problems = read_labels(write(tmp_path, csv_text([NODULE, STUDY])))
    assert problems == []
    assert [r["level"] for r in rows] == ["nodule", "study"]
    assert all(set(r) == set(LABEL_COLUMNS) for r in rows)
    assert rows[1]["age"] == "63" and rows[1]["nodule_id"] == ""  # empty = unknown


def test_write_labels_round_trip_is_valid(tmp_path: Path) -> None:
    write_labels(
        tmp_path / "labels.csv",
        [
            {"study_uid": UID, "level": "nodule", "nodule_id": 2, "spiculation": True, "malignancy_score": 3.25},
            {"study_uid": UID, "level": "study", "age": 70, "smoking_pack_years": 40.0, "nodule_count": 1},
        ],
    )
    rows, problems = read_labels(tmp_path / "labels.csv")
    assert problems == [] and len(rows) == 2


# (column, bad value, what the problem must say): each row is skipped, never read as "unknown"
BAD_CELLS = [
    ("longest_diameter_mm", "-4", "column 'longest_diameter_mm' = '-4' must be >= 0"),
    ("longest_diameter_mm", "abc", "column 'longest_diameter_mm' = 'abc' is not a number"),
    ("longest_diameter_mm", "450", "must be <= 300"),
    ("mean_diameter_mm", "nan", "is not a finite number"),
    ("volume_mm3", "inf", "is not a finite number"),
    ("volume_mm3", "2e7", "must be <= 1e+07"),
    ("short_axis_mm", "-0.1", "must be >= 0"),
    ("lung_rads", "5", "column 'lung_rads' = '5' must be one of 0, 1, 2, 3, 4A, 4B, 4X"),
    ("lung_rads", "4B+", "did you mean '4B'?"),
    ("type", "Solid", "must be one of solid, part_solid, non_solid; did you mean 'solid'?"),
    ("margin", "fuzzy", "must be one of smooth, lobulated, spiculated"),
    ("lobe", "LML", "must be one of RUL, RML, RLL, LUL, LLL"),
    ("context", "old", "must be one of baseline, new, growing, stable"),
    ("spiculation", "2", "column 'spiculation' = '2' must be 0 or 1"),
    ("malignant", "yes", "column 'malignant' = 'yes' is not a number"),
    ("nodule_id", "0", "must be >= 1"),
    ("nodule_id", "2.5", "is not a whole number"),
    ("n_readers", "0", "must be >= 1"),
    ("malignancy_score", "6", "must be <= 5"),
    ("brock_probability", "1.2", "must be <= 1"),
    ("series_uid", "abc.def", "is not a DICOM UID"),
    ("study_uid", "", "column 'study_uid' = '' is empty (required)"),
    ("level", "", "column 'level' = '' is empty (required)"),
    ("level", "patient", "must be one of nodule, study"),
]


@pytest.mark.parametrize(("column", "value", "expected"), BAD_CELLS)
def test_bad_cell_is_reported_with_line_and_row_skipped(tmp_path: Path, column: str, value: str, expected: str) -> None:
    bad = {**NODULE, "nodule_id": "2", column: value}
    rows, problems = read_labels(write(tmp_path, csv_text([NODULE, bad, STUDY])))
    assert len(rows) == 2 and all(r["nodule_id"] != "2" for r in rows)
    assert len(problems) == 1, problems
    assert problems[0].startswith("labels.csv:3: ") and expected in problems[0], problems[0]


# study-row columns
@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("age", "130", "must be <= 120"),
        ("age", "sixty", "is not a number"),
        ("sex", "X", "must be one of F, M"),
        ("smoking_pack_years", "-1", "must be >= 0"),
        ("nodule_count", "-1", "must be >= 0"),
        ("family_history", "0.5", "must be 0 or 1"),
    ],
)
def test_bad_study_cell(tmp_path: Path, column: str, value: str, expected: str) -> None:
    rows, problems = read_labels(write(tmp_path, csv_text([NODULE, {**STUDY, column: value}])))
    assert [r["level"] for r in rows] == ["nodule"]
    assert len(problems) == 1 and problems[0].startswith("labels.csv:3: ") and expected in problems[0]


def test_example_message_is_exact(tmp_path: Path) -> None:
    rows = [NODULE] + [{**NODULE, "nodule_id": str(i)} for i in range(2, 6)]
    rows.append({**NODULE, "nodule_id": "9", "longest_diameter_mm": "-4"})
    _, problems = read_labels(write(tmp_path, csv_text(rows)))
    assert problems == ["labels.csv:7: column 'longest_diameter_mm' = '-4' must be >= 0"]


@pytest.mark.parametrize("value", ["0", "1", "2", "3", "4A", "4b", "4X", "4XS", "2s", "1S"])
def test_lung_rads_spellings_the_code_accepts(tmp_path: Path, value: str) -> None:
    from lungvl_model.data.targets import lung_rads_index

    rows, problems = read_labels(write(tmp_path, csv_text([{**STUDY, "lung_rads": value}])))
    assert problems == [] and rows[0]["lung_rads"] == value.upper()
    assert lung_rads_index(rows[0]["lung_rads"]) == lung_rads_index(value)


def test_whole_numbers_written_as_floats_are_ints(tmp_path: Path) -> None:
    rows, problems = read_labels(write(tmp_path, csv_text([{**NODULE, "nodule_id": "3.0", "n_readers": "2.0"}])))
    assert problems == [] and rows[0]["nodule_id"] == "3.0"


def test_dropped_column_is_a_problem_and_rows_are_kept(tmp_path: Path) -> None:
    cols = tuple(c for c in LABEL_COLUMNS if c not in ("age", "malignant"))
    rows, problems = read_labels(write(tmp_path, csv_text([NODULE, STUDY], cols)))
    assert len(rows) == 2 and rows[1]["age"] == "" and rows[0]["malignant"] == ""
    assert problems == [
        "labels.csv: header lacks column(s) malignant, age: read as unknown in every row (add them, empty if unknown)"
    ]


@pytest.mark.parametrize("missing", [("study_uid",), ("level",), ("study_uid", "level")])
def test_missing_required_column_uses_no_row(tmp_path: Path, missing: tuple[str, ...]) -> None:
    cols = tuple(c for c in LABEL_COLUMNS if c not in missing)
    rows, problems = read_labels(write(tmp_path, csv_text([NODULE, STUDY], cols)))
    assert rows == []
    assert len(problems) == 1 and problems[0].startswith("labels.csv: header lacks required column(s)")
    assert all(repr(m) in problems[0] for m in missing) and "no row is used" in problems[0]


def test_unknown_column_did_you_mean(tmp_path: Path) -> None:
    cols = tuple("malignnat" if c == "malignant" else c for c in LABEL_COLUMNS) + ("comment",)
    text = csv_text([{**NODULE, "malignnat": "1", "comment": "x"}], cols)
    rows, problems = read_labels(write(tmp_path, text))
    assert len(rows) == 1 and rows[0]["malignant"] == ""
    assert "labels.csv: unknown column 'malignnat' is ignored (did you mean 'malignant'?)" in problems
    assert any("unknown column 'comment'" in p for p in problems)
    assert any("header lacks column(s) malignant" in p for p in problems)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "labels.csv: empty file (0 bytes)"),
        (b"\n\n", "labels.csv: no header line"),
        (",".join(LABEL_COLUMNS).encode() + b"\n", "labels.csv: header only, no rows"),
    ],
)
def test_empty_and_header_only(tmp_path: Path, data: bytes, expected: str) -> None:
    rows, problems = read_labels(write(tmp_path, data))
    assert rows == [] and len(problems) == 1 and problems[0].startswith(expected), problems


def test_non_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    good = csv_text([NODULE]).encode()
    data = good + f"{UID},study,,,,,,,,,,,,,,,,,,,,,,,,\xe2ge,F,,,,\n".encode("latin-1")
    rows, problems = read_labels(write(tmp_path, data))
    offset = data.index(b"\xe2")
    assert rows == [] and len(problems) == 1
    assert problems[0].startswith(f"labels.csv: not UTF-8 text: byte 0xe2 at byte offset {offset} (line 3)")


def test_utf16_export_is_not_utf8(tmp_path: Path) -> None:
    rows, problems = read_labels(write(tmp_path, csv_text([NODULE]).encode("utf-16")))
    assert rows == [] and "not UTF-8 text: byte 0xff at byte offset 0" in problems[0]


def test_bom_is_accepted(tmp_path: Path) -> None:
    rows, problems = read_labels(write(tmp_path, b"\xef\xbb\xbf" + csv_text([NODULE, STUDY]).encode()))
    assert problems == [] and len(rows) == 2 and rows[0]["study_uid"] == UID


def test_short_and_long_rows_are_skipped(tmp_path: Path) -> None:
    lines = csv_text([NODULE, STUDY]).splitlines()
    lines.insert(2, lines[1].rsplit(",", 1)[0])  # one field short
    lines.append(lines[1] + ",extra")
    rows, problems = read_labels(write(tmp_path, "\n".join(lines) + "\n"))
    n = len(LABEL_COLUMNS)
    assert len(rows) == 2
    assert problems == [
        f"labels.csv:3: {n - 1} fields, the header has {n}; row skipped",
        f"labels.csv:5: {n + 1} fields, the header has {n}; row skipped",
    ]


def test_duplicate_study_row_and_nodule_row(tmp_path: Path) -> None:
    rows, problems = read_labels(write(tmp_path, csv_text([STUDY, NODULE, {**STUDY, "age": "64"}, NODULE])))
    assert [r["level"] for r in rows] == ["study", "nodule"] and rows[0]["age"] == "63"
    assert "labels.csv:4: study" in problems[0] and "(line 2)" in problems[0]
    assert "labels.csv:5: nodule 1 of study" in problems[1] and "(line 3)" in problems[1]


def test_100k_short_rows_are_summarised(tmp_path: Path) -> None:
    n = 100_000
    short = ",".join([UID, "study"] + [""] * (len(LABEL_COLUMNS) - 3))
    text = ",".join(LABEL_COLUMNS) + "\n" + (short + "\n") * n
    rows, problems = read_labels_csv(write(tmp_path, text))
    assert rows == []
    assert len(problems) == MAX_PER_KIND + 1
    assert problems[-1].startswith(f"... and {n - MAX_PER_KIND:,} more rows with the same problem")


def test_problem_log_summary_counts_back() -> None:
    log = ProblemLog(per_kind=2)
    for i in range(5):
        log.add(("age", "must be <= 120"), f"labels.csv:{i + 2}: column 'age' = '200' must be <= 120")
    log.add(("", "header only"), "labels.csv: x")
    lines = log.lines()
    assert lines[2] == "... and 3 more rows with the same problem (column 'age' must be <= 120)"
    assert len(lines) == 4 and log.total == 6 and count_problems(lines) == 6


def test_100k_rows_without_a_column_give_one_problem(tmp_path: Path) -> None:
    cols = tuple(c for c in LABEL_COLUMNS if c != "age")
    empty = "," * (len(cols) - 2)
    text = ",".join(cols) + "\n" + "".join(f"1.2.3.{i},study{empty}\n" for i in range(100_000))
    rows, problems = read_labels_csv(write(tmp_path, text))
    assert len(rows) == 100_000 and all(r["age"] == "" for r in rows[:10])
    assert problems == [
        "labels.csv: header lacks column(s) age: read as unknown in every row (add them, empty if unknown)"
    ]


def test_many_bad_values_summarised_per_column(tmp_path: Path) -> None:
    rows = [{**NODULE, "nodule_id": str(i), "longest_diameter_mm": "-1", "type": "round"} for i in range(1, 101)]
    _, problems = read_labels(write(tmp_path, csv_text(rows)))
    assert len(problems) == 2 * (MAX_PER_KIND + 1)
    assert "... and 80 more rows with the same problem (column 'longest_diameter_mm' must be >= 0)" in problems


def test_training_catalogue_skips_the_rows_site_check_reports(tmp_path: Path) -> None:
    site = tmp_path / "site"
    uid = next(iter(write_mini_site(site, 1)))
    bad = {**NODULE, "study_uid": uid, "nodule_id": "2", "lung_rads": "5"}
    (site / "labels.csv").write_text(csv_text([{**NODULE, "study_uid": uid}, bad, {**STUDY, "study_uid": uid}]))
    cat = build_catalogue(site)
    entry = cat.studies[uid]
    assert [r["nodule_id"] for r in entry.nodule_labels] == ["1"] and entry.study_labels is not None
    assert cat.problems == [
        "labels.csv:3: column 'lung_rads' = '5' must be one of 0, 1, 2, 3, 4A, 4B, 4X (any case, optionally "
        "followed by S)"
    ]


def test_labels_for_unknown_studies_are_one_line_per_study(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_mini_site(site, 1)
    other = "1.2.3.4"
    rows = [{**NODULE, "study_uid": other, "nodule_id": str(i)} for i in range(1, 6)]
    (site / "labels.csv").write_text(csv_text(rows))
    assert build_catalogue(site).problems == [f"labels.csv: study {other} has no CT series in dicom/ (5 row(s) unused)"]


# reports.jsonl


def _reports(tmp_path: Path, data: bytes) -> tuple[dict, list[str]]:
    p = tmp_path / "reports.jsonl"
    p.write_bytes(data)
    return read_reports(p)


def test_reports_empty_file(tmp_path: Path) -> None:
    recs, problems = _reports(tmp_path, b"")
    assert recs == {} and problems == ["reports.jsonl: empty file (0 bytes): no reports"]


def test_reports_non_utf8_line_names_offset_and_keeps_the_others(tmp_path: Path) -> None:
    good = json.dumps({"study_uid": "1.2.3", "text": "No nodules."}).encode() + b"\n"
    bad = '{"study_uid": "1.2.4", "text": "Nodule in the l\xe9ft lobe."}\n'.encode("latin-1")
    data = good + bad + json.dumps({"study_uid": "1.2.5", "text": "Clear lungs."}).encode() + b"\n"
    recs, problems = _reports(tmp_path, data)
    assert sorted(recs) == ["1.2.3", "1.2.5"]
    offset = data.index(b"\xe9")
    assert problems == [
        f"reports.jsonl:2: not UTF-8 text: byte 0xe9 at byte offset {offset}; save the file as UTF-8; line skipped"
    ]


def test_reports_bom_and_duplicate(tmp_path: Path) -> None:
    line = json.dumps({"study_uid": "1.2.3", "text": "No nodules."}).encode() + b"\n"
    recs, problems = _reports(tmp_path, b"\xef\xbb\xbf" + line + line)
    assert list(recs) == ["1.2.3"]
    assert problems == ["reports.jsonl:2: study 1.2.3 already has a report (line 1); line skipped"]


def test_reports_many_bad_lines_summarised(tmp_path: Path) -> None:
    recs, problems = _reports(tmp_path, b"not json\n" * 5000)
    assert recs == {} and len(problems) == MAX_PER_KIND + 1 and "4,980 more rows" in problems[-1]
