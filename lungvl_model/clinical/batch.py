"""Framework-free batch scoring of CSV rows (used by ``lungvl rules lung-rads|brock --csv``).

Row numbers in error messages are 1-based **data-row** numbers: row 1 is the first record after the
header, i.e. the file line number minus 1 when no record spans several lines and there are no blank
lines (blank lines are skipped and not counted). A bad row gets an empty result cell and one error per
bad column; it never stops the other rows.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..text_file import read_user_text
from .brock import BrockInputs, brock_probability
from .lung_rads import InvalidFieldError, NoduleFinding, categorize_nodule

LUNG_RADS_COLUMN = "lung_rads"
BROCK_COLUMN = "brock_probability"
EXTRA_KEY = "__extra__"
"""Key under which :func:`read_csv_rows` keeps the cells of a row that has more fields than the header."""

_Parsed = dict[str, Any]


class _RowErrors:
    """Collects the errors of one row."""

    def __init__(self, row_no: int, row: dict[str, str]) -> None:
        self.row_no = row_no
        self.row = row
        self.messages: list[str] = []

    def add(self, column: str, reason: str, value: Any) -> None:
        self.messages.append(f"row {self.row_no}, column {column!r}: {reason}, got {value!r}")

    def raw(self, column: str) -> str | None:
        value = self.row.get(column)
        return None if value is None else value.strip()


def _number(errs: _RowErrors, column: str, out: _Parsed, optional: bool = False) -> None:
    raw = errs.raw(column)
    if raw is None and not optional:
        errs.add(column, "missing column", None)
        return
    if not raw and optional:
        out[column] = None
        return
    try:
        value = float(raw or "")
    except ValueError:
        errs.add(column, "expected a number", raw)
        return
    if not math.isfinite(value):
        errs.add(column, "expected a finite number", raw)
        return
    out[column] = value


def _whole(errs: _RowErrors, column: str, out: _Parsed) -> None:
    raw = errs.raw(column)
    if raw is None:
        errs.add(column, "missing column", None)
        return
    try:
        out[column] = int(raw)
    except ValueError:
        errs.add(column, "expected a whole number", raw)


def _flag(errs: _RowErrors, column: str, out: _Parsed, optional: bool = False) -> None:
    raw = errs.raw(column)
    if raw is None and not optional:
        errs.add(column, "missing column", None)
    elif optional and not raw:
        out[column] = False
    elif raw in ("0", "1"):
        out[column] = raw == "1"
    else:
        errs.add(column, "expected 0 or 1", raw)


def _text(errs: _RowErrors, column: str, out: _Parsed, optional: bool = False) -> None:
    raw = errs.raw(column)
    if raw is None and not optional:
        errs.add(column, "missing column", None)
    elif optional:
        out[column] = raw or None
    else:
        out[column] = raw


def _run_rows(
    rows: Sequence[dict[str, str]],
    out_column: str,
    score: Callable[[_RowErrors], str | None],
) -> tuple[list[dict[str, str]], list[str]]:
    results: list[dict[str, str]] = []
    errors: list[str] = []
    for i, row in enumerate(rows, start=1):
        errs = _RowErrors(i, row)
        extra = row.get(EXTRA_KEY)
        if extra:
            errs.add(EXTRA_KEY, "more fields than the header has", extra)
            value = None
        else:
            value = score(errs)
        out = {k: v for k, v in row.items() if k != EXTRA_KEY}
        out[out_column] = value if value is not None and not errs.messages else ""
        results.append(out)
        errors.extend(errs.messages)
    return results, errors


def _report(errs: _RowErrors, exc: InvalidFieldError) -> None:
    raw = errs.raw(exc.field)
    errs.add(exc.field, exc.reason, raw if raw is not None else exc.value)


def _score_lung_rads(errs: _RowErrors) -> str | None:
    parsed: _Parsed = {}
    _text(errs, "type", parsed)
    _number(errs, "mean_diameter_mm", parsed)
    _number(errs, "solid_component_mm", parsed, optional=True)
    _text(errs, "context", parsed)
    for column in ("juxtapleural", "benign_pattern", "suspicious_features"):
        _flag(errs, column, parsed, optional=True)
    _text(errs, "prior_category", parsed, optional=True)
    if errs.messages:
        return None
    if parsed["prior_category"] is not None:
        parsed["prior_category"] = parsed["prior_category"].upper()
    try:
        return categorize_nodule(NoduleFinding(**parsed))
    except InvalidFieldError as exc:  # includes UncoveredFindingError
        _report(errs, exc)
    return None


def _score_brock(errs: _RowErrors) -> str | None:
    parsed: _Parsed = {}
    _number(errs, "age", parsed)
    for column in ("female", "family_history", "emphysema"):
        _flag(errs, column, parsed)
    _number(errs, "longest_diameter_mm", parsed)
    _text(errs, "type", parsed)
    _flag(errs, "upper_lobe", parsed)
    _whole(errs, "nodule_count", parsed)
    _flag(errs, "spiculation", parsed)
    if errs.messages:
        return None
    try:
        return f"{brock_probability(BrockInputs(**parsed)):.5f}"
    except InvalidFieldError as exc:
        _report(errs, exc)
    return None


def lung_rads_csv(rows: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Categorise one nodule per row with Lung-RADS v2022.

    Columns: ``type`` (solid|part_solid|non_solid), ``mean_diameter_mm``, ``solid_component_mm``
    (empty unless part_solid), ``context`` (baseline|new|growing|stable|slow_growing); optional
    ``juxtapleural``, ``benign_pattern``, ``suspicious_features`` (0/1, default 0) and
    ``prior_category`` (used for stable nodules; empty = baseline size rules).

    Args:
        rows: CSV rows as column -> text.

    Returns:
        The rows, each with a ``lung_rads`` column added (empty for a bad row), and the error messages
        (``row N, column 'C': reason, got 'V'``).
    """
    return _run_rows(rows, LUNG_RADS_COLUMN, _score_lung_rads)


def brock_csv(rows: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Compute the Brock model-2b malignancy probability for one nodule per row.

    Columns: ``age``, ``female``, ``family_history``, ``emphysema`` (0/1), ``longest_diameter_mm``,
    ``type`` (solid|part_solid|non_solid), ``upper_lobe`` (0/1), ``nodule_count`` (whole number >= 1),
    ``spiculation`` (0/1).

    Args:
        rows: CSV rows as column -> text.

    Returns:
        The rows, each with a ``brock_probability`` column added (5 decimals; empty for a bad row), and
        the error messages (``row N, column 'C': reason, got 'V'``).
    """
    return _run_rows(rows, BROCK_COLUMN, _score_brock)


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV file with a header line.

    Short rows are padded with empty strings; the surplus cells of long rows are joined with "," under
    :data:`EXTRA_KEY` (the batch functions then report the row). Blank lines are skipped.

    Args:
        path: the CSV file (UTF-8, optional BOM).

    Returns:
        The header and the data rows.

    Raises:
        ValueError: if the file has no header line or is not UTF-8 text (naming the file, line and byte).
        OSError: if the file cannot be read.
    """
    text = read_user_text(path, expected="a CSV header line")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        records = [r for r in reader if r]
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if not records:
        raise ValueError(f"{path}: empty file (no header line)")
    header = [h.strip() for h in records[0]]
    rows: list[dict[str, str]] = []
    for record in records[1:]:
        row = {h: (record[j] if j < len(record) else "") for j, h in enumerate(header)}
        if len(record) > len(header):
            row[EXTRA_KEY] = ",".join(record[len(header) :])
        rows.append(row)
    return header, rows


def write_csv_rows(fh: TextIO, header: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    """Write rows as CSV; keys missing from a row are written empty, keys not in ``header`` are dropped.

    Args:
        fh: a text stream opened with ``newline=""`` (or stdout).
        header: the column order.
        rows: the rows to write.
    """
    writer = csv.DictWriter(fh, fieldnames=list(header), extrasaction="ignore", restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
