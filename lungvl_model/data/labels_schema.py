"""The typed schema of ``labels.csv`` (DESIGN.md section 2), shared by training and ``lungvl site check``.

:func:`read_labels_csv` is what :func:`~lungvl_model.data.site_layout.read_labels` runs, so a training
run and the site check see the same rows and the same problems:

* ``study_uid`` and ``level`` must be header columns (else no row is used) and set in every row.
* Another :data:`~lungvl_model.data.site_layout.LABEL_COLUMNS` column missing from the header is one
  problem naming it; the rows are still read, that column being unknown ("") in each of them.
* A header column that is not a label column is one problem (with a "did you mean"); it is ignored.
* An empty cell means unknown. A cell that breaks its column's rule (:data:`LABEL_SCHEMA`) is a problem
  naming ``file:line``, the column, the value and what is allowed, and its row is skipped: a value is
  never silently turned into "unknown". So are rows with more or fewer fields than the header, and a
  second ``level=study`` row of a study or a second row of one nodule.
* An empty file, a header without rows, bytes that are not UTF-8 (named by byte offset) are problems,
  never tracebacks; a UTF-8 byte order mark is accepted.

Repeated problems of one kind (one column and rule) are summarised: the first
:data:`MAX_PER_KIND` are listed, then one line counts the rest.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lungvl_model.clinical.lung_rads import CATEGORIES, CONTEXTS
from lungvl_model.data.site_layout import LABEL_COLUMNS, LOBES, MARGINS, NODULE_TYPES

__all__ = [
    "LABEL_SCHEMA",
    "MAX_PER_KIND",
    "ColumnSpec",
    "ProblemLog",
    "count_problems",
    "decode_utf8",
    "read_labels_csv",
]

#: Problems of one kind listed before the rest are counted (100k bad rows give 21 lines, not 100k).
MAX_PER_KIND = 20
#: Columns whose header and values are required.
REQUIRED_COLUMNS: tuple[str, ...] = ("study_uid", "level")
#: Lung-RADS v2022 categories accepted, in any case, each optionally followed by the "S" modifier
#: (``"4a"``, ``"2S"``): the spellings ``targets.lung_rads_index`` reads. "0" (incomplete exam) is a valid
#: category the training targets treat as unknown (it has no class in ``LUNG_RADS_CLASSES``).
LUNG_RADS_VALUES: tuple[str, ...] = tuple(c + s for c in CATEGORIES for s in ("", "S"))

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
Kind = Literal["str", "uid", "int", "float", "flag", "enum"]


@dataclass(frozen=True)
class ColumnSpec:
    """The rule of one ``labels.csv`` column.

    Attributes:
        name: the column.
        kind: ``uid`` (DICOM UID: digits and dots, <= 64 characters), ``int`` (a whole number; ``"3.0"``
            is read as 3, as exports through float columns write it), ``float`` (finite), ``flag``
            (0 or 1), ``enum`` (one of ``choices``) or ``str``.
        required: an empty cell is a problem.
        lo: smallest value allowed (numbers).
        hi: largest value allowed (numbers).
        choices: allowed values (``enum``).
        casefold: ``enum`` compares ignoring case; the value is stored upper-case.
    """

    name: str
    kind: Kind
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    casefold: bool = False

    def check(self, value: str) -> str | None:
        """Why ``value`` (stripped) breaks the rule, or None when it is allowed.

        Returns:
            What is allowed, e.g. ``"must be >= 0"`` (problems are summarised by column and this text).
        """
        if value == "":
            return "is empty (required)" if self.required else None
        if self.kind == "uid":
            if len(value) > 64 or not _UID.fullmatch(value):
                return "is not a DICOM UID (digits and dots, at most 64 characters)"
            return None
        if self.kind == "enum":
            allowed = value.upper() in self.choices if self.casefold else value in self.choices
            if allowed:
                return None
            hint = difflib.get_close_matches(value.upper() if self.casefold else value, self.choices, n=1)
            shown = ", ".join(c for c in self.choices if not (self.casefold and c.endswith("S")))
            extra = " (any case, optionally followed by S)" if self.casefold else ""
            dym = f"; did you mean {hint[0]!r}?" if hint else ""
            return f"must be one of {shown}{extra}{dym}"
        if self.kind == "str":
            return None
        try:
            number = float(value)
        except ValueError:
            return "is not a number"
        if not math.isfinite(number):
            return "is not a finite number (leave the cell empty for unknown)"
        if self.kind == "flag":
            return None if number in (0.0, 1.0) else "must be 0 or 1"
        if self.kind == "int" and not number.is_integer():
            return "is not a whole number"
        if self.lo is not None and number < self.lo:
            return f"must be >= {self.lo:g}"
        if self.hi is not None and number > self.hi:
            return f"must be <= {self.hi:g}"
        return None


#: Largest lesion size accepted, mm (the bound clinical/lung_rads.py applies to sizes too): wider than an
#: adult chest (~300 mm transverse), so a larger diameter is a units or typing error, never a nodule.
MAX_SIZE_MM = 300.0

# Bounds. Sizes: MAX_SIZE_MM. Volumes: 1e7 mm^3 (10 L) is above any adult total lung capacity (about
# 6-7 L). Growth may be negative (shrinking) but not beyond a lesion size.
# Centroids are LPS scanner coordinates: any finite value within 10 m (no scanner frame reaches it).
# Pack-years: 300 (3 packs a day for 100 years); age 0-120 years. Counts have no physical bound.
_SPECS: tuple[ColumnSpec, ...] = (
    ColumnSpec("study_uid", "uid", required=True),
    ColumnSpec("level", "enum", required=True, choices=("nodule", "study")),
    ColumnSpec("series_uid", "uid"),
    ColumnSpec("nodule_id", "int", lo=1),
    ColumnSpec("centroid_x_mm", "float", lo=-1e4, hi=1e4),
    ColumnSpec("centroid_y_mm", "float", lo=-1e4, hi=1e4),
    ColumnSpec("centroid_z_mm", "float", lo=-1e4, hi=1e4),
    ColumnSpec("longest_diameter_mm", "float", lo=0.0, hi=MAX_SIZE_MM),
    ColumnSpec("short_axis_mm", "float", lo=0.0, hi=MAX_SIZE_MM),
    ColumnSpec("mean_diameter_mm", "float", lo=0.0, hi=MAX_SIZE_MM),
    ColumnSpec("volume_mm3", "float", lo=0.0, hi=1e7),
    ColumnSpec("type", "enum", choices=NODULE_TYPES),
    ColumnSpec("solid_component_mm", "float", lo=0.0, hi=MAX_SIZE_MM),
    ColumnSpec("margin", "enum", choices=MARGINS),
    ColumnSpec("spiculation", "flag"),
    ColumnSpec("calcification", "flag"),
    ColumnSpec("juxtapleural", "flag"),
    ColumnSpec("lobe", "enum", choices=LOBES),
    ColumnSpec("context", "enum", choices=CONTEXTS),  # the Lung-RADS contexts clinical/ accepts
    ColumnSpec("growth_mm", "float", lo=-MAX_SIZE_MM, hi=MAX_SIZE_MM),
    ColumnSpec("n_readers", "int", lo=1),
    ColumnSpec("malignancy_score", "float", lo=1.0, hi=5.0),  # LIDC mean rating: fractional
    ColumnSpec("malignant", "flag"),
    ColumnSpec("brock_probability", "float", lo=0.0, hi=1.0),
    ColumnSpec("lung_rads", "enum", choices=LUNG_RADS_VALUES, casefold=True),
    ColumnSpec("age", "float", lo=0.0, hi=120.0),
    ColumnSpec("sex", "enum", choices=("F", "M")),
    ColumnSpec("family_history", "flag"),
    ColumnSpec("smoking_pack_years", "float", lo=0.0, hi=300.0),
    ColumnSpec("emphysema", "flag"),
    ColumnSpec("nodule_count", "int", lo=0),
)
#: The rule of every label column, in :data:`LABEL_COLUMNS` order.
LABEL_SCHEMA: dict[str, ColumnSpec] = {s.name: s for s in _SPECS}
assert tuple(LABEL_SCHEMA) == LABEL_COLUMNS, "LABEL_SCHEMA must cover LABEL_COLUMNS, in order"


class ProblemLog:
    """Problems in file order, the repeats of one kind summarised after :data:`MAX_PER_KIND`."""

    def __init__(self, per_kind: int = MAX_PER_KIND) -> None:
        """Create an empty log keeping ``per_kind`` messages of each kind."""
        self.per_kind = per_kind
        self._kinds: dict[tuple[str, str], list[str]] = {}
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, kind: tuple[str, str], message: str) -> None:
        """Record one problem of ``kind``: ``(column or "", what is wrong)``."""
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        if n < self.per_kind:
            self._kinds.setdefault(kind, []).append(message)

    @property
    def total(self) -> int:
        """Problems recorded, summarised ones included."""
        return sum(self._counts.values())

    def lines(self) -> list[str]:
        """The messages; each kind's are followed by ``... and N more rows with the same problem (...)``."""
        out: list[str] = []
        for kind, messages in self._kinds.items():
            out += messages
            rest = self._counts[kind] - len(messages)
            if rest:
                what = f"column {kind[0]!r} {kind[1]}" if kind[0] else kind[1]
                out.append(f"... and {rest:,} more rows with the same problem ({what})")
        return out


_MORE = re.compile(r"\.\.\. and ([0-9,]+) more rows with the same problem")


def count_problems(lines: list[str]) -> int:
    """How many problems :meth:`ProblemLog.lines` stand for (a summary line counts the rows it summarises)."""
    n = 0
    for line in lines:
        m = _MORE.match(line)
        n += int(m.group(1).replace(",", "")) if m else 1
    return n


def decode_utf8(data: bytes, where: str, *, base_offset: int = 0) -> tuple[str | None, str | None]:
    """Decode bytes as UTF-8 (a leading byte order mark is dropped).

    Args:
        data: a whole file, or one line of it.
        where: the file (or ``file:line``) named in the problem.
        base_offset: offset of ``data`` in its file (a line's start); 0 for a whole file, whose problem
            then also names the line.

    Returns:
        ``(text, None)``, or ``(None, problem)`` naming ``where`` and the byte offset in the file.
    """
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8"), None
    except UnicodeDecodeError as e:
        offset = e.start + bom
        newlines = data.count(b"\n", 0, offset)
        line = f" (line {newlines + 1})" if base_offset == 0 and b"\n" in data else ""
        return None, (
            f"{where}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {base_offset + offset}{line}; "
            "save the file as UTF-8"
        )


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _header_problems(header: list[str], name: str, log: ProblemLog) -> dict[str, int] | None:
    """Column index of each known column, or None when a required one is missing (logged)."""
    index: dict[str, int] = {}
    for i, col in enumerate(header):
        if col in index:
            log.add(("", "duplicate column"), f"{name}: column {col!r} appears twice in the header; the first is read")
        elif col in LABEL_SCHEMA:
            index[col] = i
        else:
            hint = difflib.get_close_matches(col, LABEL_COLUMNS, n=1)
            dym = f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(LABEL_COLUMNS)}"
            log.add(("", "unknown column"), f"{name}: unknown column {col!r} is ignored ({dym})")
    missing_required = [c for c in REQUIRED_COLUMNS if c not in index]
    if missing_required:
        log.add(
            ("", "required column"),
            f"{name}: header lacks required column(s) {', '.join(map(repr, missing_required))}; no row is used "
            f"(header: {', '.join(header)[:200]})",
        )
        return None
    missing = [c for c in LABEL_COLUMNS if c not in index]
    if missing:
        log.add(
            ("", "missing column"),
            f"{name}: header lacks column(s) {', '.join(missing)}: read as unknown in every row "
            "(add them, empty if unknown)",
        )
    return index


def read_labels_csv(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Read and validate ``labels.csv`` against :data:`LABEL_SCHEMA`.

    Args:
        path: the file; a missing file gives no rows and no problems (labels.csv is optional).

    Returns:
        ``(rows, problems)``: each row has every :data:`LABEL_COLUMNS` key (stripped strings, "" =
        unknown; ``lung_rads`` upper-cased); rows with a problem are not in ``rows``.
    """
    p = Path(path)
    if not p.exists():
        return [], []
    name = p.name
    try:
        data = p.read_bytes()
    except OSError as e:
        return [], [f"{p}: cannot read ({e.strerror or e})"]
    if not data:
        return [], [f"{name}: empty file (0 bytes): no header, no rows"]
    text, problem = decode_utf8(data, name)
    if text is None:
        return [], [f"{problem}; no row is used"]
    log = ProblemLog()
    rows: list[dict[str, str]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except (StopIteration, csv.Error):
        header = []
    index = _header_problems(header, name, log) if any(header) else None
    if not any(header):
        log.add(("", "header"), f"{name}: no header line")
    if index is None:
        return [], log.lines()
    width = len(header)
    seen_study: dict[str, int] = {}
    n_records = 0
    seen_nodule: dict[tuple[str, str, str], int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not any(c.strip() for c in record):
                continue  # blank line
            n_records += 1
            if len(record) != width:
                log.add(
                    ("", "a number of fields other than the header's"),
                    f"{name}:{line}: {len(record)} fields, the header has {width}; row skipped",
                )
                continue
            row = {col: record[i].strip() for col, i in index.items()}
            bad = False
            for col, value in row.items():
                why = LABEL_SCHEMA[col].check(value)
                if why is not None:
                    log.add(
                        (col, why.split("; did you mean")[0]),
                        f"{name}:{line}: column {col!r} = {_short(value)} {why}",
                    )
                    bad = True
            if bad:
                continue
            full = {c: row.get(c, "") for c in LABEL_COLUMNS}
            full["lung_rads"] = full["lung_rads"].upper()
            uid = full["study_uid"]
            if full["level"] == "study":
                if uid in seen_study:
                    log.add(
                        ("study_uid", "has a second level=study row"),
                        f"{name}:{line}: study {uid} already has a level=study row (line {seen_study[uid]}); "
                        "row skipped",
                    )
                    continue
                seen_study[uid] = line
            elif full["nodule_id"]:
                key = (uid, full["series_uid"], str(int(float(full["nodule_id"]))))
                if key in seen_nodule:
                    log.add(
                        ("nodule_id", "has a second row for the same nodule"),
                        f"{name}:{line}: nodule {key[2]} of study {uid} already has a row (line {seen_nodule[key]}); "
                        "row skipped",
                    )
                    continue
                seen_nodule[key] = line
            rows.append(full)
    except csv.Error as e:
        log.add(("", "csv"), f"{name}:{reader.line_num}: not valid CSV ({e}); the rest of the file is not read")
    if n_records == 0:
        log.add(("", "rows"), f"{name}: header only, no rows")
    return rows, log.lines()
