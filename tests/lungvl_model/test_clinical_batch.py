"""CSV batch scoring for ``lungvl rules lung-rads|brock --csv``."""

from __future__ import annotations

import io
from pathlib import Path

from lungvl_model.clinical.batch import (
    BROCK_COLUMN,
    EXTRA_KEY,
    LUNG_RADS_COLUMN,
    brock_csv,
    lung_rads_csv,
    read_csv_rows,
    write_csv_rows,
)

LR_HEADER = "type,mean_diameter_mm,solid_component_mm,context,juxtapleural,benign_pattern,suspicious_features"
LR_CSV = "\n".join(
    [
        LR_HEADER,
        "solid,6.0,,baseline,0,0,0",  # row 1 -> 3
        "solid,abc,,baseline,0,0,0",  # row 2: bad number
        "part_solid,10,7,baseline,,,",  # row 3 -> 4A (optional flags empty)
        "part_solid,10,,new,0,0,0",  # row 4: missing solid component
        "non_solid,35,,growing,0,0,0",  # row 5: not covered
        "solid,9,,baseline,0,0,1",  # row 6 -> 4X
        "blob,5,,sideways,2,0,0",  # row 7: several bad columns
        "solid,9.5,,new,1,0,0",  # row 8 -> 2 (juxtapleural)
        "solid,8,,baseline,0,0,0,extra",  # row 9: too many fields
    ]
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "in.csv"
    path.write_text(text + "\n", encoding="utf-8")
    return path


def test_lung_rads_csv_good_and_bad_rows(tmp_path: Path) -> None:
    header, rows = read_csv_rows(_write(tmp_path, LR_CSV))
    assert header == LR_HEADER.split(",")
    out, errors = lung_rads_csv(rows)
    assert [r[LUNG_RADS_COLUMN] for r in out] == ["3", "", "4A", "", "", "4X", "", "2", ""]
    assert "row 2, column 'mean_diameter_mm': expected a number, got 'abc'" in errors
    assert any(e.startswith("row 4, column 'solid_component_mm'") for e in errors)
    assert any(e.startswith("row 5, column 'context'") and "'growing'" in e for e in errors)
    row7 = [e for e in errors if e.startswith("row 7,")]
    assert any("column 'juxtapleural'" in e and "got '2'" in e for e in row7)
    assert any(e.startswith(f"row 9, column '{EXTRA_KEY}'") and "'extra'" in e for e in errors)
    assert not any(e.startswith(("row 1,", "row 3,", "row 6,", "row 8,")) for e in errors)
    assert out[0]["mean_diameter_mm"] == "6.0" and EXTRA_KEY not in out[8]


def test_lung_rads_csv_validation_error_names_value() -> None:
    rows = [
        {"type": "blob", "mean_diameter_mm": "5", "solid_component_mm": "", "context": "baseline"},
        {"type": "solid", "mean_diameter_mm": "-4", "solid_component_mm": "", "context": "baseline"},
        {"type": "part_solid", "mean_diameter_mm": "5", "solid_component_mm": "6", "context": "new"},
        {"type": "solid", "mean_diameter_mm": "7", "context": "stable", "prior_category": "3"},
        {"type": "solid", "mean_diameter_mm": "7"},
    ]
    out, errors = lung_rads_csv(rows)
    assert [r[LUNG_RADS_COLUMN] for r in out] == ["", "", "", "2", ""]
    assert errors[0].startswith("row 1, column 'type':") and errors[0].endswith("got 'blob'")
    assert errors[1].startswith("row 2, column 'mean_diameter_mm':") and errors[1].endswith("got '-4'")
    assert errors[2].startswith("row 3, column 'solid_component_mm':") and errors[2].endswith("got '6'")
    assert errors[3] == "row 5, column 'context': missing column, got None"


def test_brock_csv(tmp_path: Path) -> None:
    header = "age,female,family_history,emphysema,longest_diameter_mm,type,upper_lobe,nodule_count,spiculation"
    text = "\n".join(
        [
            header,
            "62,1,0,0,10,solid,1,1,1",
            "62,1,0,0,0,solid,1,1,1",
            "70,0,1,1,15,part_solid,1,2,0",
            "sixty,0,0,0,5,solid,0,two,0",
            "55,1,0,0,6,non_solid,0,3,0",
            "130,0,0,0,5,solid,0,1,0",
        ]
    )
    _, rows = read_csv_rows(_write(tmp_path, text))
    out, errors = brock_csv(rows)
    assert [r[BROCK_COLUMN] for r in out] == ["0.20097", "", "0.34290", "", "0.00760", ""]
    assert any(e.startswith("row 2, column 'longest_diameter_mm'") and e.endswith("got '0'") for e in errors)
    assert "row 4, column 'age': expected a number, got 'sixty'" in errors
    assert "row 4, column 'nodule_count': expected a whole number, got 'two'" in errors
    assert any(e.startswith("row 6, column 'age'") and e.endswith("got '130'") for e in errors)
    assert len(errors) == 4


def test_write_round_trip(tmp_path: Path) -> None:
    _, rows = read_csv_rows(_write(tmp_path, LR_CSV))
    out, _ = lung_rads_csv(rows)
    buf = io.StringIO()
    write_csv_rows(buf, [*LR_HEADER.split(","), LUNG_RADS_COLUMN], out)
    lines = buf.getvalue().splitlines()
    assert lines[0] == LR_HEADER + ",lung_rads"
    assert lines[1] == "solid,6.0,,baseline,0,0,0,3"
    assert lines[2].endswith(",") and len(lines) == 10


def test_read_pads_short_rows_and_strips_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_text("\ufeffa,b,c\n1,2\n\n3,4,5\n", encoding="utf-8")
    header, rows = read_csv_rows(path)
    assert header == ["a", "b", "c"]
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
