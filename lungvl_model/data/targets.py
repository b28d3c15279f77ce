"""Study-level training targets from labels.csv rows, or weak labels from the report text.

Priority per target: the study row of labels.csv → the nodule rows → the report labeler. Unknown
values are NaN (floats) or −1 (class indices) so losses can mask them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lungvl_model.clinical.lung_rads import CONTEXTS
from lungvl_model.data.site_layout import NODULE_TYPES

LUNG_RADS_CLASSES: tuple[str, ...] = ("1", "2", "3", "4A", "4B", "4X")
#: LIDC malignancy ratings above this count as malignant when no pathology is known (a convention).
LIDC_MALIGNANT_SCORE = 3.0


@dataclass(frozen=True)
class StudyTargets:
    """Targets of one study (NaN / −1 = unknown).

    Attributes:
        malignant: 1.0 when any nodule is malignant.
        lung_rads: index into :data:`LUNG_RADS_CLASSES` (exam category).
        growth_mm: mean-diameter growth of the fastest-growing nodule over 12 months.
        nodule_type: index into ``NODULE_TYPES`` of the dominant (largest) nodule.
        spiculated: dominant nodule spiculated (0/1).
        calcified: dominant nodule with benign calcification (0/1).
        juxtapleural: dominant nodule touching the pleura (0/1).
        roundness: short/long axis ratio of the dominant nodule.
        diameter_mm: mean diameter of the dominant nodule (0 when there is none).
        n_nodules: number of nodules (−1 unknown).
        source: ``"labels"``, ``"report"`` or ``"none"``.
    """

    malignant: float = math.nan
    lung_rads: int = -1
    growth_mm: float = math.nan
    nodule_type: int = -1
    spiculated: float = math.nan
    calcified: float = math.nan
    juxtapleural: float = math.nan
    roundness: float = math.nan
    diameter_mm: float = math.nan
    n_nodules: int = -1
    source: str = "none"

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain dict."""
        return asdict(self)


def _f(row: dict[str, str] | None, key: str) -> float:
    if not row:
        return math.nan
    v = row.get(key, "")
    try:
        return float(v) if v != "" else math.nan
    except ValueError:
        return math.nan


def _max(values: list[float]) -> float:
    known = [v for v in values if not math.isnan(v)]
    return max(known) if known else math.nan


def lung_rads_index(category: str | None) -> int:
    """Index of a Lung-RADS category in :data:`LUNG_RADS_CLASSES`, −1 when unknown."""
    if not category:
        return -1
    cat = category.strip().upper().removesuffix("S")
    return LUNG_RADS_CLASSES.index(cat) if cat in LUNG_RADS_CLASSES else -1


def _worst_category(cats: list[str]) -> str | None:
    idx = [lung_rads_index(c) for c in cats]
    idx = [i for i in idx if i >= 0]
    return LUNG_RADS_CLASSES[max(idx)] if idx else None


def targets_from_labels(study_row: dict[str, str] | None, nodule_rows: list[dict[str, str]]) -> StudyTargets:
    """Targets from labels.csv rows of one study."""
    if study_row is None and not nodule_rows:
        return StudyTargets()
    malignant = _f(study_row, "malignant")
    if math.isnan(malignant):
        malignant = _max([_f(r, "malignant") for r in nodule_rows])
    if math.isnan(malignant) and nodule_rows:
        scores = [_f(r, "malignancy_score") for r in nodule_rows]
        best = _max(scores)
        if not math.isnan(best):
            malignant = float(best > LIDC_MALIGNANT_SCORE)
    cat = (study_row or {}).get("lung_rads") or _worst_category([r.get("lung_rads", "") for r in nodule_rows])
    n_nod = _f(study_row, "nodule_count")
    n_nodules = int(n_nod) if not math.isnan(n_nod) else len(nodule_rows)
    if not nodule_rows:
        return StudyTargets(
            malignant=malignant if not math.isnan(malignant) else (0.0 if n_nodules == 0 else math.nan),
            lung_rads=lung_rads_index(cat),
            growth_mm=0.0 if n_nodules == 0 else math.nan,
            diameter_mm=0.0 if n_nodules == 0 else math.nan,
            n_nodules=n_nodules,
            source="labels",
        )
    dom = max(nodule_rows, key=lambda r: _f(r, "mean_diameter_mm") if not math.isnan(_f(r, "mean_diameter_mm")) else -1)
    typ = dom.get("type", "")
    long_ax, short_ax = _f(dom, "longest_diameter_mm"), _f(dom, "short_axis_mm")
    return StudyTargets(
        malignant=malignant,
        lung_rads=lung_rads_index(cat),
        growth_mm=_max([_f(r, "growth_mm") for r in nodule_rows]),
        nodule_type=NODULE_TYPES.index(typ) if typ in NODULE_TYPES else -1,
        spiculated=_f(dom, "spiculation"),
        calcified=_f(dom, "calcification"),
        juxtapleural=_f(dom, "juxtapleural"),
        roundness=short_ax / long_ax if long_ax > 0 else math.nan,
        diameter_mm=_f(dom, "mean_diameter_mm"),
        n_nodules=n_nodules,
        source="labels",
    )


def targets_from_report(text: str) -> StudyTargets:
    """Weak targets from a report via the rule-based labeler (sites without labels.csv)."""
    from lungvl_model.text.labeler import label_report

    lab = label_report(text)
    if lab.nodule_present is False:
        return StudyTargets(
            malignant=0.0,
            lung_rads=lung_rads_index(lab.lung_rads) if lab.lung_rads else 0,
            growth_mm=0.0,
            diameter_mm=0.0,
            n_nodules=0,
            source="report",
        )
    if not lab.nodules:
        return StudyTargets(lung_rads=lung_rads_index(lab.lung_rads), source="report")
    sized = [n for n in lab.nodules if n.size_mm is not None]
    dom = max(sized, key=lambda n: n.size_mm or 0.0) if sized else lab.nodules[0]
    return StudyTargets(
        lung_rads=lung_rads_index(lab.lung_rads),
        nodule_type=NODULE_TYPES.index(dom.type) if dom.type in NODULE_TYPES else -1,
        spiculated=math.nan if dom.margin is None else float(dom.margin == "spiculated"),
        calcified=math.nan if dom.calcified is None else float(dom.calcified),
        diameter_mm=dom.size_mm if dom.size_mm is not None else math.nan,
        n_nodules=len(lab.nodules),
        source="report",
    )


#: Most nodules of a study that become decoder slots (the largest ones; labels keep the rest).
MAX_SLOTS = 8
#: Columns of a nodule attribute row (:func:`nodule_attributes`); NaN = unknown. Categorical columns
#: hold the index into their vocabulary: ``type`` into ``NODULE_TYPES``, ``lobe`` into ``LOBES``,
#: ``margin`` into ``MARGINS``, ``lung_rads`` into :data:`LUNG_RADS_CLASSES`, ``context`` into
#: :data:`NODULE_CONTEXTS`. The comparison columns (``context``, ``growth_mm``, ``log_prior_diameter``)
#: are appended last so the first eight keep their places; a checkpoint trained on the 8-column layout
#: does not fit the slot encoder and is refused by ``load_checkpoint`` (``CheckpointError``).
NODULE_ATTRIBUTES: tuple[str, ...] = (
    "log_diameter",  # 0: log1p(mean diameter mm)
    "log_volume",  # 1: log1p(volume mm3)
    "type",  # 2
    "lobe",  # 3
    "calcified",  # 4: 0/1
    "margin",  # 5
    "lung_rads",  # 6
    "brock",  # 7: Brock probability in [0, 1]
    "context",  # 8: comparison with the prior; "baseline" = no prior study
    "growth_mm",  # 9: mean-diameter change since the prior (mm, signed); NaN without a matched prior
    "log_prior_diameter",  # 10: log1p(prior mean diameter mm); NaN without a matched prior
)
#: Vocabulary of the ``context`` column (Lung-RADS comparison contexts; ``"baseline"`` = no prior).
NODULE_CONTEXTS: tuple[str, ...] = CONTEXTS


def _index(value: str, vocabulary: tuple[str, ...]) -> float:
    return float(vocabulary.index(value)) if value in vocabulary else math.nan


def nodule_attribute_row(
    *,
    mean_diameter_mm: float,
    volume_mm3: float,
    type: str,
    lobe: str,
    calcified: float,
    margin: str,
    lung_rads: str,
    brock: float,
    context: str,
    growth_mm: float,
    prior_mean_diameter_mm: float,
) -> list[float]:
    """One row of :data:`NODULE_ATTRIBUTES` from measured or labelled values (NaN / ``""`` unknown).

    Args:
        mean_diameter_mm: mean diameter (negative = unknown).
        volume_mm3: volume (negative = unknown).
        type: nodule type code (``""`` unknown).
        lobe: lobe code (``""`` unknown).
        calcified: 0/1 benign calcification (NaN unknown).
        margin: margin (``""`` unknown).
        lung_rads: Lung-RADS category (``""`` unknown).
        brock: Brock probability (NaN unknown).
        context: comparison context, one of :data:`NODULE_CONTEXTS` (``""`` unknown).
        growth_mm: mean-diameter change since the prior (NaN unknown / no prior).
        prior_mean_diameter_mm: the matched prior nodule's mean diameter (NaN or negative: unknown / none).

    Returns:
        ``len(NODULE_ATTRIBUTES)`` floats.
    """
    from lungvl_model.data.site_layout import LOBES, MARGINS

    cat = lung_rads_index(lung_rads)
    prior = prior_mean_diameter_mm
    return [
        math.log1p(mean_diameter_mm) if mean_diameter_mm >= 0 else math.nan,
        math.log1p(volume_mm3) if volume_mm3 >= 0 else math.nan,
        _index(type, NODULE_TYPES),
        _index(lobe, LOBES),
        calcified,
        _index(margin, MARGINS),
        float(cat) if cat >= 0 else math.nan,
        brock,
        _index(context, NODULE_CONTEXTS),
        growth_mm if math.isfinite(growth_mm) else math.nan,
        math.log1p(prior) if math.isfinite(prior) and prior >= 0 else math.nan,
    ]


def nodule_attributes(
    nodule_rows: list[dict[str, str]], max_slots: int = MAX_SLOTS
) -> tuple[list[list[float]], list[int]]:
    """Per-nodule attribute rows of one study from its labels.csv nodule rows, largest first.

    Nodules are ordered by mean diameter, largest first (unknown sizes last; ties by ``nodule_id``), the
    order the synthetic report generator describes them in, and cut to ``max_slots``. The comparison
    columns come from ``context`` and ``growth_mm``; the prior mean diameter is ``mean_diameter_mm −
    growth_mm`` (labels.csv has no prior-diameter column), unknown when either is.

    Args:
        nodule_rows: the study's labels.csv rows with ``level = "nodule"``.
        max_slots: most nodules kept.

    Returns:
        ``(rows, ids)``: ``max_slots`` rows of ``len(NODULE_ATTRIBUTES)`` floats (NaN unknown; all-NaN
        padding after the study's nodules) and ``max_slots`` nodule ids (the label-map values; 0 =
        padding, −1 = a nodule row without an id).
    """
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")

    def size(r: dict[str, str]) -> float:
        d = _f(r, "mean_diameter_mm")
        return -1.0 if math.isnan(d) else d

    def nid(r: dict[str, str]) -> int:
        v = _f(r, "nodule_id")
        return int(v) if not math.isnan(v) else -1

    ordered = sorted(nodule_rows, key=lambda r: (-size(r), nid(r)))[:max_slots]
    rows: list[list[float]] = []
    ids: list[int] = []
    for r in ordered:
        calc = _f(r, "calcification")
        mean, growth = _f(r, "mean_diameter_mm"), _f(r, "growth_mm")
        rows.append(
            nodule_attribute_row(
                mean_diameter_mm=_f(r, "mean_diameter_mm") if not math.isnan(_f(r, "mean_diameter_mm")) else -1.0,
                volume_mm3=_f(r, "volume_mm3") if not math.isnan(_f(r, "volume_mm3")) else -1.0,
                type=r.get("type", ""),
                lobe=r.get("lobe", ""),
                calcified=calc,
                margin=r.get("margin", ""),
                lung_rads=r.get("lung_rads", ""),
                brock=_f(r, "brock_probability"),
                context=r.get("context", "").strip(),
                growth_mm=growth,
                prior_mean_diameter_mm=mean - growth,  # NaN when either is unknown
            )
        )
        ids.append(nid(r))
    pad = max_slots - len(rows)
    rows += [[math.nan] * len(NODULE_ATTRIBUTES) for _ in range(pad)]
    ids += [0] * pad
    return rows, ids
