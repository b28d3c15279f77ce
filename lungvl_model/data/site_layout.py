"""The site data contract (DESIGN.md section 2): paths, ``reports.jsonl`` and ``labels.csv`` schemas.

::

    <site_dir>/
      site.toml           [site] name, cohort, ... (see SiteManifest)
      dicom/              any nesting of CT DICOM files
      reports.jsonl       {"study_uid", "text", "study_date", "prior_study_uid"?} one line per study
      annotations/        <SeriesInstanceUID>.nii.gz nodule label maps (0 = background, k = nodule_id k)
                          <SeriesInstanceUID>_lobes.nii.gz optional lobe map (values in LOBE_LABELS)
                          <SeriesInstanceUID>_hard_negatives.json optional, written by the synthetic
                          generator: LPS points on non-nodule anatomy (readers ignore it)
      labels.csv          rows with level = "nodule" (one per nodule) or "study" (one per study)
      .cache/             preprocessed tensors (created by lungvl)
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: Lobe codes used in labels, lobe maps and reports. The lingula is part of LUL.
LOBES: tuple[str, ...] = ("RUL", "RML", "RLL", "LUL", "LLL")
#: Value of each lobe in a ``*_lobes.nii.gz`` map (0 = outside the lungs).
LOBE_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(LOBES)}
NODULE_TYPES: tuple[str, ...] = ("solid", "part_solid", "non_solid")
MARGINS: tuple[str, ...] = ("smooth", "lobulated", "spiculated")
COHORTS: tuple[str, ...] = ("screening", "referral", "low_resource", "lidc")

#: Columns of labels.csv. Empty cells mean "unknown". Nodule rows fill the nodule columns, study rows
#: the study columns; ``study_uid`` and ``level`` are always set.
LABEL_COLUMNS: tuple[str, ...] = (
    "study_uid",
    "level",  # "nodule" | "study"
    "series_uid",
    "nodule_id",  # int >= 1, matches the value in the annotation label map
    "centroid_x_mm",  # LPS
    "centroid_y_mm",
    "centroid_z_mm",
    "longest_diameter_mm",  # longest axial diameter
    "short_axis_mm",  # longest diameter perpendicular to it, same slice
    "mean_diameter_mm",  # (long + short) / 2, Lung-RADS convention
    "volume_mm3",
    "type",  # solid | part_solid | non_solid
    "solid_component_mm",  # mean diameter of the solid part (part_solid), else = mean diameter / 0
    "margin",  # smooth | lobulated | spiculated
    "spiculation",  # 0/1 (LIDC: mean rating >= 3)
    "calcification",  # 0/1 benign calcification pattern
    "juxtapleural",  # 0/1
    "lobe",  # RUL | RML | RLL | LUL | LLL
    "context",  # baseline | new | growing | stable | slow_growing
    "growth_mm",  # mean-diameter change since the prior study (12 months)
    "n_readers",  # LIDC: readers who marked it
    "malignancy_score",  # LIDC mean rating 1-5
    "malignant",  # 0/1 ground truth (synthetic) or derived
    "brock_probability",
    "lung_rads",  # nodule-level category (nodule rows) or exam category (study rows)
    "age",  # study rows
    "sex",  # F | M
    "family_history",  # 0/1
    "smoking_pack_years",
    "emphysema",  # 0/1
    "nodule_count",
)


def site_paths(site_dir: str | Path) -> dict[str, Path]:
    """Standard paths inside a site directory."""
    root = Path(site_dir)
    return {
        "root": root,
        "toml": root / "site.toml",
        "dicom": root / "dicom",
        "reports": root / "reports.jsonl",
        "annotations": root / "annotations",
        "labels": root / "labels.csv",
        "cache": root / ".cache",
    }


def mask_path(site_dir: str | Path, series_uid: str) -> Path:
    """Path of the nodule label map of a series."""
    return site_paths(site_dir)["annotations"] / f"{series_uid}.nii.gz"


def lobe_map_path(site_dir: str | Path, series_uid: str) -> Path:
    """Path of the optional lobe map of a series."""
    return site_paths(site_dir)["annotations"] / f"{series_uid}_lobes.nii.gz"


@dataclass(frozen=True)
class ReportRecord:
    """One line of ``reports.jsonl``."""

    study_uid: str
    text: str
    study_date: str = ""
    prior_study_uid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``prior_study_uid`` omitted when None)."""
        d = asdict(self)
        if d["prior_study_uid"] is None:
            d.pop("prior_study_uid")
        return d


class SiteDataError(ValueError):
    """A site file does not follow the data contract; the message names the file, line and value."""


def read_reports(path: str | Path) -> tuple[dict[str, ReportRecord], list[str]]:
    """Read ``reports.jsonl``.

    Returns:
        ``(records by study_uid, problems)``; a malformed line (not UTF-8, not JSON, no ``study_uid``, an
        empty report text, one over the labeler's :data:`~lungvl_model.text.labeler.MAX_REPORT_CHARS`, a
        second line for a study) is reported in ``problems`` (with its line number, byte offset or value)
        and skipped, the others are kept. An empty file is a problem; a UTF-8 byte order mark is accepted.
        Repeats of one problem are summarised (:class:`~lungvl_model.data.labels_schema.ProblemLog`).
    """
    from lungvl_model.data.labels_schema import ProblemLog, decode_utf8
    from lungvl_model.text.labeler import report_size_problem  # the labeler's patterns compile on import

    out: dict[str, ReportRecord] = {}
    first_line: dict[str, int] = {}
    p = Path(path)
    if not p.exists():
        return out, [f"{p}: missing"]
    try:
        data = p.read_bytes()
    except OSError as e:
        return out, [f"{p}: cannot read ({e.strerror or e})"]
    if not data.strip():
        return out, [f"{p.name}: empty file ({len(data)} bytes): no reports"]
    log = ProblemLog()
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw) + 1
        line, bad = decode_utf8(raw, f"{p.name}:{lineno}", base_offset=start)
        if line is None or bad is not None:
            log.add(("", "not UTF-8 text"), f"{bad}; line skipped")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            log.add(("", "not valid JSON"), f"{p.name}:{lineno}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            log.add(("", "not a JSON object"), f"{p.name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            continue
        uid, text = obj.get("study_uid"), obj.get("text")
        if not isinstance(uid, str) or not uid:
            log.add(("study_uid", "missing"), f"{p.name}:{lineno}: 'study_uid' missing or not a string ({uid!r})")
            continue
        if not isinstance(text, str) or not text.strip():
            log.add(("text", "missing"), f"{p.name}:{lineno}: study {uid}: 'text' missing or empty ({text!r})")
            continue
        too_long = report_size_problem(text)  # the weak labels could not be read from it
        if too_long is not None:
            log.add(("text", "too long"), f"{p.name}:{lineno}: study {uid}: {too_long}")
            continue
        if uid in out:
            log.add(
                ("study_uid", "has a second report line"),
                f"{p.name}:{lineno}: study {uid} already has a report (line {first_line[uid]}); line skipped",
            )
            continue
        prior = obj.get("prior_study_uid")
        out[uid] = ReportRecord(uid, text, str(obj.get("study_date", "")), prior if prior else None)
        first_line[uid] = lineno
    return out, log.lines()


def write_reports(path: str | Path, records: Iterable[ReportRecord]) -> None:
    """Write ``reports.jsonl`` (one JSON object per line)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{round(v, 4)}"
    return str(v)


def write_labels(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``labels.csv`` with :data:`LABEL_COLUMNS`; unknown keys raise ``KeyError``."""
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(LABEL_COLUMNS))
        w.writeheader()
        for row in rows:
            extra = set(row) - set(LABEL_COLUMNS)
            if extra:
                raise KeyError(f"labels.csv has no column(s) {sorted(extra)}; known: {LABEL_COLUMNS}")
            w.writerow({k: _fmt(row.get(k)) for k in LABEL_COLUMNS})


def read_labels(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Read and validate ``labels.csv`` (:func:`~lungvl_model.data.labels_schema.read_labels_csv`).

    Returns:
        ``(rows, problems)``: valid rows (every :data:`LABEL_COLUMNS` key, "" = unknown); a row breaking
        the schema is reported in ``problems`` with its line, column and value, and skipped. A missing file
        gives no rows and no problems (labels.csv is optional).
    """
    from lungvl_model.data.labels_schema import read_labels_csv  # it imports this module's constants

    return read_labels_csv(path)


@dataclass(frozen=True)
class SiteManifest:
    """The ``[site]`` table of ``site.toml`` (the data-side part; client/ adds training settings).

    Attributes:
        name: site name, unique in the consortium.
        cohort: cohort kind (``screening``, ``referral``, ``low_resource``, ``lidc`` or free text).
        description: free text.
        extra: other keys of the ``[site]`` table, kept as they are.
    """

    name: str
    cohort: str = "screening"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path) -> SiteManifest:
        """Read ``site.toml``; raises :class:`SiteDataError` naming the file when it is unusable."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise SiteDataError(f"{p}: cannot read site.toml ({e})") from e
        site = data.get("site")
        if not isinstance(site, dict) or "name" not in site:
            raise SiteDataError(f"{p}: needs a [site] table with a 'name' key, got {sorted(data)}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: site[k] for k in known if k in site},
            extra={k: v for k, v in site.items() if k not in known},
        )


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Minimal TOML writer for nested dicts of str/int/float/bool/list (enough for lungvl configs).

    A non-empty list of dicts becomes an array of tables (``[[name]]``), one block per dict.
    """

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, Sequence):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} value {v!r} to TOML")

    lines: list[str] = []

    def is_array_of_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) for x in v)

    def table(prefix: str, d: Mapping[str, Any], header: str = "") -> None:
        scalars = {
            k: v for k, v in d.items() if not isinstance(v, Mapping) and not is_array_of_tables(v) and v is not None
        }
        subs = {k: v for k, v in d.items() if isinstance(v, Mapping)}
        arrays = {k: v for k, v in d.items() if is_array_of_tables(v)}
        if header or (prefix and (scalars or not (subs or arrays))):
            lines.append(header or f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {val(v)}")
        if header or (prefix and (scalars or not (subs or arrays))):
            lines.append("")
        for k, v in subs.items():
            table(f"{prefix}.{k}" if prefix else k, v)
        for k, items in arrays.items():
            name = f"{prefix}.{k}" if prefix else k
            for item in items:
                table(name, item, header=f"[[{name}]]")

    table("", data)
    return "\n".join(lines).rstrip() + "\n"
