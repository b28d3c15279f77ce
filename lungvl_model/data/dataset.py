"""A torch dataset over one or more site directories, using the preprocessing cache.

Each item is a dict::

    image       (1, D, H, W) float32 in [0, 1]
    seg         (1, D, H, W) float32, 1 inside any nodule (zeros when the study has no mask)
    nodules     (1, D, H, W) int64 nodule label map (value k = nodule_id k)
    lobes       (1, D, H, W) int64 lobe map (LOBE_LABELS; zeros when unknown)
    has_mask    bool tensor, has_lobes bool tensor
    targets     dict of float32 scalars / int64 class indices (see StudyTargets; NaN / -1 = unknown)
    nodule_attrs  (K, A) float32 per-nodule attributes (K = MAX_SLOTS, columns NODULE_ATTRIBUTES, largest
                nodule first, NaN unknown / padding), from labels.csv nodule rows
    nodule_ids  (K,) int64 label-map value of each slot (0 = padding, -1 = no id)
    nodule_valid  (K,) bool, True for the study's nodules
    text        report text ("" when the study has none)
    study_uid, prior_study_uid, site   str
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from lungvl_model.data.catalogue import SiteCatalogue, StudyEntry, build_catalogue
from lungvl_model.data.dicom_io import read_series
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.preprocess import (
    PreprocessConfig,
    Preprocessed,
    cache_key,
    load_cached,
    preprocess,
    save_cached,
)
from lungvl_model.data.site_layout import site_paths
from lungvl_model.data.synth.hard_negatives import hard_negative_map, hard_negative_path
from lungvl_model.data.targets import (
    MAX_SLOTS,
    StudyTargets,
    nodule_attributes,
    targets_from_labels,
    targets_from_report,
)


def load_study(
    entry: StudyEntry, config: PreprocessConfig, cache_dir: Path | None, site_dir: Path | None = None
) -> Preprocessed:
    """Read, resample and cache one study (image + nodule and lobe maps when present).

    With ``site_dir`` and a hard-negative sidecar for the series (synthetic sites,
    :func:`~lungvl_model.data.synth.hard_negatives.hard_negative_map`), the labels also hold
    ``"hard_negatives"``: the tempting non-nodule anatomy the seg stage's patches are centred on.

    Args:
        entry: a usable catalogue entry.
        config: preprocessing config.
        cache_dir: where cached arrays live (None disables the cache).
        site_dir: the study's site directory (where its annotations sidecars are).

    Returns:
        The preprocessed study.
    """
    if entry.series is None:
        raise ValueError(f"study {entry.study_uid} has no CT series")
    path = None
    hard = site_dir is not None and hard_negative_path(site_dir, entry.series.series_uid).is_file()
    if cache_dir is not None:
        extra = f"{entry.mask is not None}/{entry.lobes is not None}" + ("/hard_negatives" if hard else "")
        path = cache_dir / f"{cache_key(entry.series.series_uid, config, extra)}.npz"
        hit = load_cached(path)
        if hit is not None:
            return hit
    vol = read_series(entry.series.files)
    labels: dict[str, np.ndarray] = {}
    if entry.mask is not None:
        labels["nodules"] = read_label_nifti(entry.mask, vol)
    if entry.lobes is not None:
        labels["lobes"] = read_label_nifti(entry.lobes, vol)
    if hard and site_dir is not None:
        points = hard_negative_map(site_dir, vol)
        if points is not None:
            labels["hard_negatives"] = points
    item = preprocess(vol, config, labels)
    if path is not None:
        save_cached(path, item)
    return item


def study_targets(entry: StudyEntry) -> StudyTargets:
    """Targets of a study: labels.csv first, then weak labels from its report."""
    if entry.study_labels is not None or entry.nodule_labels:
        return targets_from_labels(entry.study_labels, entry.nodule_labels)
    if entry.report is not None:
        return targets_from_report(entry.report.text)
    return StudyTargets()


def nodule_tensors(entry: StudyEntry, max_slots: int = MAX_SLOTS) -> dict[str, torch.Tensor]:
    """Per-nodule attribute tensors of a study (see the module docstring), from its labels.csv rows."""
    rows, ids = nodule_attributes(list(entry.nodule_labels or []), max_slots)
    id_t = torch.tensor(ids, dtype=torch.int64)
    return {"nodule_attrs": torch.tensor(rows, dtype=torch.float32), "nodule_ids": id_t, "nodule_valid": id_t != 0}


def targets_to_tensors(t: StudyTargets) -> dict[str, torch.Tensor]:
    """Tensors of a :class:`StudyTargets` (floats float32, class indices int64)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in t.to_dict().items():
        if k == "source":
            continue
        out[k] = torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float32)
    return out


class SiteDataset(Dataset[dict[str, Any]]):
    """Usable studies of one or more sites, preprocessed on first access and cached on disk.

    Args:
        site_dirs: one site directory or several.
        config: preprocessing config (grid and intensity window).
        studies: restrict to these StudyInstanceUIDs.
        require_report: keep only studies that have a report.
        use_cache: keep preprocessed arrays under ``<site>/.cache/``.
        catalogues: already-built catalogues (skips rebuilding them).
    """

    def __init__(
        self,
        site_dirs: str | Path | Sequence[str | Path],
        config: PreprocessConfig | None = None,
        *,
        studies: Sequence[str] | None = None,
        require_report: bool = False,
        use_cache: bool = True,
        catalogues: Sequence[SiteCatalogue] | None = None,
    ) -> None:
        dirs = [site_dirs] if isinstance(site_dirs, str | Path) else list(site_dirs)
        self.config = config or PreprocessConfig()
        self.catalogues = list(catalogues) if catalogues is not None else [build_catalogue(d) for d in dirs]
        self.use_cache = use_cache
        wanted = set(studies) if studies is not None else None
        self.entries: list[tuple[SiteCatalogue, StudyEntry]] = []
        for cat in self.catalogues:
            for e in cat.usable:
                if wanted is not None and e.study_uid not in wanted:
                    continue
                if require_report and e.report is None:
                    continue
                self.entries.append((cat, e))

    def __len__(self) -> int:
        return len(self.entries)

    def site_name(self, index: int) -> str:
        """Site name of item ``index`` (from site.toml, else the folder name)."""
        cat = self.entries[index][0]
        return cat.manifest.name if cat.manifest else cat.site_dir.name

    def __getitem__(self, index: int) -> dict[str, Any]:
        cat, entry = self.entries[index]
        cache = site_paths(cat.site_dir)["cache"] if self.use_cache else None
        item = load_study(entry, self.config, cache, site_dir=Path(cat.site_dir))
        shape = item.image.shape
        nod = item.labels.get("nodules")
        lob = item.labels.get("lobes")
        hard = item.labels.get("hard_negatives")
        nod_t = torch.from_numpy(nod.astype(np.int64)) if nod is not None else torch.zeros(shape, dtype=torch.int64)
        lob_t = torch.from_numpy(lob.astype(np.int64)) if lob is not None else torch.zeros(shape, dtype=torch.int64)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(item.image))[None],
            "seg": (nod_t > 0).float()[None],
            "nodules": nod_t[None],
            "lobes": lob_t[None],
            # the seg stage's hard-negative patch centres (zeros: none known for this study)
            "hard_negatives": torch.from_numpy(
                hard.astype(np.uint8) if hard is not None else np.zeros(shape, np.uint8)
            )[None],
            "has_mask": torch.tensor(nod is not None),
            "has_lobes": torch.tensor(lob is not None),
            "targets": targets_to_tensors(study_targets(entry)),
            **nodule_tensors(entry),
            "text": entry.report.text if entry.report else "",
            "study_uid": entry.study_uid,
            "prior_study_uid": entry.prior_study_uid or "",
            "site": self.site_name(index),
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate items of :class:`SiteDataset` (tensors stacked, strings as lists)."""
    return default_collate(batch)


def known(x: torch.Tensor) -> torch.Tensor:
    """Mask of known target values (not NaN for floats, not −1 for class indices)."""
    if x.dtype.is_floating_point:
        return ~torch.isnan(x)
    return x >= 0


__all__ = ["SiteDataset", "collate", "known", "load_study", "nodule_tensors", "study_targets", "targets_to_tensors"]
