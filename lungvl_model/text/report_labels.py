"""What the report labeler returns, and the clinical-concept metric over it.

:class:`ReportLabels` (one report) holds :class:`LabeledNodule` s (one per nodule described);
:func:`concept_vector` flattens them into the slots :data:`CONCEPT_KEYS` and :func:`concept_f1` scores a
generated explanation's concepts against a reference report's. The labeler itself is
:func:`lungvl_model.text.labeler.label_report`, which re-exports every name defined here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMPARISON_PRIORITY",
    "CONCEPT_KEYS",
    "LabeledNodule",
    "ReportLabels",
    "concept_counts",
    "concept_f1",
    "concept_vector",
    "dominant_nodule",
    "size_bucket",
]

COMPARISON_PRIORITY: dict[str, int] = {"stable": 1, "new": 2, "growing": 3}
#: Slots of :func:`concept_vector`.
CONCEPT_KEYS: tuple[str, ...] = (
    "nodule_present", "type", "margin", "calcified", "lobe", "size_bucket", "comparison", "emphysema",
)  # fmt: skip


@dataclass
class LabeledNodule:
    """One pulmonary nodule described in a report (fields are None when the report does not say)."""

    size_mm: float | None = None  # largest dimension
    dims_mm: tuple[float, ...] = ()
    lobe: str | None = None  # RUL | RML | RLL | LUL | LLL
    type: str | None = None  # solid | part_solid | non_solid
    margin: str | None = None  # smooth | lobulated | spiculated
    calcified: bool | None = None
    comparison: str | None = None  # new | stable | growing (this nodule)
    evidence: str = ""  # the sentence it was first read from

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"size_mm", "lobe", "type", "margin", "calcified"}``."""
        return {
            "size_mm": self.size_mm,
            "lobe": self.lobe,
            "type": self.type,
            "margin": self.margin,
            "calcified": self.calcified,
        }


@dataclass
class ReportLabels:
    """Structured labels of one report."""

    nodule_present: bool | None = None
    emphysema: bool | None = None
    nodules: list[LabeledNodule] = field(default_factory=list)
    comparison: str | None = None  # new | stable | growing (most worrying over the report)
    lung_rads: str | None = None  # 0 | 1 | 2 | 3 | 4A | 4B | 4X
    s_modifier: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"nodule_present", "emphysema", "nodules", "comparison", "lung_rads"}``."""
        return {
            "nodule_present": self.nodule_present,
            "emphysema": self.emphysema,
            "nodules": [n.to_dict() for n in self.nodules],
            "comparison": self.comparison,
            "lung_rads": self.lung_rads,
        }


def size_bucket(size_mm: float | None) -> str | None:
    """Lung-RADS size bucket: ``"<6"``, ``"6-8"``, ``"8-15"``, ``">=15"`` (None when unknown)."""
    if size_mm is None:
        return None
    if size_mm < 6:
        return "<6"
    if size_mm < 8:
        return "6-8"
    return "8-15" if size_mm < 15 else ">=15"


def dominant_nodule(labels: ReportLabels) -> LabeledNodule | None:
    """The largest nodule (the first one when no size is known); None when there is none."""
    if not labels.nodules:
        return None
    sized = [n for n in labels.nodules if n.size_mm is not None]
    return max(sized, key=lambda n: n.size_mm or 0.0) if sized else labels.nodules[0]


def concept_vector(labels: ReportLabels) -> dict[str, str | bool | None]:
    """Flattened clinical concepts (keys :data:`CONCEPT_KEYS`) of the dominant nodule and the report."""
    n = dominant_nodule(labels)
    return {
        "nodule_present": labels.nodule_present,
        "type": n.type if n else None,
        "margin": n.margin if n else None,
        "calcified": n.calcified if n else None,
        "lobe": n.lobe if n else None,
        "size_bucket": size_bucket(n.size_mm) if n else None,
        "comparison": labels.comparison,
        "emphysema": labels.emphysema,
    }


def concept_f1(pred: ReportLabels, ref: ReportLabels) -> float:
    """Micro-F1 of ``pred``'s concepts against ``ref``'s, over the slots known (not None) in ``ref``.

    A predicted slot counts as a prediction when it is not None; it is a hit when it equals the reference.
    Slots the reference leaves unknown are ignored. Returns 1.0 when the reference knows no slot.
    """
    pv, rv = concept_vector(pred), concept_vector(ref)
    gold = [k for k in CONCEPT_KEYS if rv[k] is not None]
    if not gold:
        return 1.0
    predicted = [k for k in gold if pv[k] is not None]
    hits = sum(1 for k in predicted if pv[k] == rv[k])
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def concept_counts(pred: ReportLabels, ref: ReportLabels) -> dict[str, tuple[int, int, int]]:
    """Per slot of :data:`CONCEPT_KEYS`: ``(hit, predicted, gold)``, each 0 or 1, as :func:`concept_f1` counts them.

    ``gold``: the reference knows the slot; ``predicted``: it is known in both; ``hit``: and they agree. Summed over
    reports they give each concept's precision (hits / predicted) and recall (hits / gold).
    """
    pv, rv = concept_vector(pred), concept_vector(ref)
    out: dict[str, tuple[int, int, int]] = {}
    for k in CONCEPT_KEYS:
        gold = rv[k] is not None
        predicted = gold and pv[k] is not None
        out[k] = (int(predicted and pv[k] == rv[k]), int(predicted), int(gold))
    return out
