"""Write a complete synthetic site (DESIGN.md section 2) for one cohort profile.

``generate_site(SynthConfig(...))`` samples the patients (:mod:`.patients`), renders each study
(anatomy :mod:`.phantom`, nodules :mod:`.nodules`, scanner :mod:`.scanner`) and writes::

    <out_dir>/site.toml                       [site] [privacy] [compute] [synth] (the resolved config)
    <out_dir>/dicom/<study>/<series>/*.dcm   CT Image Storage, one file per slice
    <out_dir>/annotations/<series>.nii.gz    nodule label map (k = nodule_id k)
    <out_dir>/annotations/<series>_lobes.nii.gz
    <out_dir>/annotations/<series>_hard_negatives.json   hard-negative points (format below)
    <out_dir>/reports.jsonl                  one report per study (priors included)
    <out_dir>/labels.csv                     study rows and nodule rows (true features)
    <out_dir>/.lungvl_synth.json              marker: generator, config and every entry above it writes

The generator writes only into a missing or empty folder or into one it wrote itself (its marker, or for
a site written before the marker existed, its ``[site] generator`` and ``[synth]`` table in site.toml).
Regenerating there removes only what the previous run wrote (and the site's ``.cache`` of it); a folder
holding anything else is refused with the unexpected entries named, before any file changes.

Patient ``i`` depends only on ``(seed, i)``; a prior study re-uses the patient's anatomy seed and
nodule positions with an earlier size, a separate StudyInstanceUID and a StudyDate 12 months earlier.
UIDs are derived from the site name, seed and patient index, so the same config writes the same site.

Contrast: each study's :class:`~.scanner.ScanParams` carries ``contrast`` (share per cohort,
``CohortProfile.contrast_fraction``: screening 0, referral 0.4, low_resource 0.25); a contrast study has
``ContrastBolusAgent = "IV"`` in its header, enhanced blood in the image (:class:`~.phantom.BloodHU`), a
"WITH CONTRAST" StudyDescription where the cohort has one, and "with intravenous contrast" in its report.

Hard negatives (``annotations/<series>_hard_negatives.json``, one per series, UTF-8 JSON)::

    {"format": "lungvl.hard_negatives 1", "study_uid": ..., "series_uid": ...,
     "frame": "LPS mm (DICOM patient coordinates of this series)", "contrast": true|false,
     "structures": [every structure name the generator exports],
     "points": [{"structure": "aorta", "lps": [x, y, z]}, ...]}

Each point lies inside the rendered structure it names (up to 6 per structure and series):
``heart_border`` (heart within 5 mm of lung), ``hilar_vessel`` (intrapulmonary vessel within 35 mm of
a hilum), ``aorta``, ``pulmonary_artery``, ``pulmonary_vein``, ``sternum``, ``costal_cartilage``,
``rib`` / ``chest_wall`` / ``vertebra`` (within 6 / 4 / 12 mm of the lung), ``diaphragm`` (diaphragm, liver or spleen
under the lung base), ``bronchial_wall``, ``mediastinal_soft_tissue`` (paratracheal / subcarinal nodes,
oesophagus, SVC). No point is within 3 mm of a nodule's bounding sphere. Coordinates are in the same
world frame as labels.csv centroids, so ``CTVolume`` world-to-voxel maps them onto the series.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from lungvl_model.data.dicom_io import write_ct_series
from lungvl_model.data.nifti_io import write_label_nifti
from lungvl_model.data.site_layout import (
    LOBE_LABELS,
    ReportRecord,
    lobe_map_path,
    mask_path,
    site_paths,
    toml_dumps,
    write_labels,
    write_reports,
)
from lungvl_model.data.volume import CTVolume

from .anatomy import AnatomyParams, make_grid, sample_anatomy
from .cohorts import CohortProfile, get_profile
from .hard_negatives import hard_negative_doc, hard_negative_path
from .nodules import place_nodule
from .patients import NoduleState, PatientCase, exam_category, nodule_states, sample_patients
from .render import render_study
from .reports import write_report
from .vessels import Trees, grow_trees

GENERATOR = "lungvl.synth 1"
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        cohort: ``screening``, ``referral`` or ``low_resource`` (see :mod:`.cohorts`).
        n_studies: number of patients, i.e. current studies; prior studies come on top.
        out_dir: site directory to write.
        seed: site seed.
        matrix: in-plane pixels.
        fov_mm: in-plane field of view (mm).
        z_extent_mm: cranio-caudal coverage (mm).
        site_name: ``[site] name``; defaults to the folder name.
        prior_fraction: share of patients with a prior study; None = the profile's.
    """

    cohort: str
    n_studies: int
    out_dir: Path
    seed: int = 0
    matrix: int = 192
    fov_mm: float = 320.0
    z_extent_mm: float = 220.0
    site_name: str | None = None
    prior_fraction: float | None = None

    def __post_init__(self) -> None:
        get_profile(self.cohort)
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if isinstance(self.n_studies, bool) or not isinstance(self.n_studies, int) or self.n_studies < 1:
            raise ValueError(f"SynthConfig.n_studies must be an integer >= 1, got {self.n_studies!r}")
        if not isinstance(self.matrix, int) or self.matrix < 32:
            raise ValueError(f"SynthConfig.matrix must be an integer >= 32, got {self.matrix!r}")
        if not 150.0 <= self.fov_mm <= 600.0:
            raise ValueError(f"SynthConfig.fov_mm must be within 150-600 mm, got {self.fov_mm!r}")
        if not 60.0 <= self.z_extent_mm <= 500.0:
            raise ValueError(f"SynthConfig.z_extent_mm must be within 60-500 mm, got {self.z_extent_mm!r}")
        if self.prior_fraction is not None and not 0.0 <= self.prior_fraction <= 1.0:
            raise ValueError(f"SynthConfig.prior_fraction must be in [0, 1] or None, got {self.prior_fraction!r}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be >= 0, got {self.seed!r}")

    @property
    def name(self) -> str:
        """Resolved site name."""
        return self.site_name or self.out_dir.name or f"synthetic-{self.cohort}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``out_dir`` as a string, None values kept)."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        """Build from :meth:`to_dict` output (or a TOML table); unknown keys raise ``KeyError``."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            raise KeyError(f"SynthConfig has no field(s) {sorted(extra)}; known: {sorted(known)}")
        return cls(**{k: (Path(v) if k == "out_dir" else v) for k, v in data.items()})


@dataclass
class SynthSummary:
    """What :func:`generate_site` wrote.

    Attributes:
        site_dir: the site directory.
        cohort: cohort profile name.
        n_patients: patients (= current studies).
        studies_written: DICOM studies written (current + prior).
        priors_written: prior studies among them.
        nodules: nodules on the current studies.
        nodule_rows: nodule rows of labels.csv (current + prior).
        seconds: wall-clock time.
        bytes_on_disk: size of the site directory.
        stats: per-cohort statistics (prevalence, Lung-RADS mix, slice thickness, noise...).
    """

    site_dir: Path
    cohort: str
    n_patients: int
    studies_written: int
    priors_written: int
    nodules: int
    nodule_rows: int
    seconds: float
    bytes_on_disk: int
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["site_dir"] = str(self.site_dir)
        return d


def _uid(config: SynthConfig, *parts: object) -> str:
    return generate_uid(entropy_srcs=[GENERATOR, config.name, str(config.seed), config.cohort, *map(str, parts)])


#: Marker file of a generated site: ``{"generator", "config", "entries"}`` (entries: relative paths written).
MARKER = ".lungvl_synth.json"
#: What a site written before the marker existed holds (its folders are taken as written whole).
_LEGACY_ENTRIES = ("site.toml", "dicom", "annotations", "reports.jsonl", "labels.csv")
#: Derived from the generated studies (the dataset's crop cache): stale once they are regenerated.
_DERIVED = ".cache"


def _planned_entries(config: SynthConfig, cases: list[PatientCase]) -> list[str]:
    """Every path (relative to ``out_dir``) that :func:`generate_site` writes for ``cases``.

    Folders are listed with their children, down to the series folders (whose slice files are written
    whole); this is what a later run may remove.
    """
    out = [*_LEGACY_ENTRIES, MARKER]
    for case in cases:
        for tag in ("prior", "current") if case.has_prior else ("current",):
            study, series = _uid(config, case.index, tag, "study"), _uid(config, case.index, tag, "series")
            out += [f"dicom/{study}", f"dicom/{study}/{series}"]
            out += [
                path.relative_to(config.out_dir).as_posix()
                for path in (
                    mask_path(config.out_dir, series),
                    lobe_map_path(config.out_dir, series),
                    hard_negative_path(config.out_dir, series),
                )
            ]
    return sorted(set(out))


def _previous_entries(root: Path) -> set[str] | None:
    """What an earlier run of this generator wrote into ``root`` (None: it is not such a site)."""
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        marker = None
    except (OSError, ValueError):
        return None
    if marker is not None:
        ok = (
            isinstance(marker, dict)
            and str(marker.get("generator", "")).startswith("lungvl.synth")
            and isinstance(marker.get("entries"), list)
            and all(isinstance(e, str) for e in marker["entries"])
        )
        return {*marker["entries"], MARKER} if ok else None
    try:
        doc = tomllib.loads((root / "site.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    site = doc.get("site")
    legacy = isinstance(site, dict) and str(site.get("generator", "")).startswith("lungvl.synth")
    return set(_LEGACY_ENTRIES) if legacy and isinstance(doc.get("synth"), dict) else None


def _unexpected_entries(root: Path, own: set[str]) -> list[str]:
    """Entries under ``root``, a site this generator wrote, that are not in ``own`` (relative paths).

    A folder in ``own`` with children in ``own`` has its children checked in turn; any other folder in
    ``own`` is taken as written whole. Links never count as own; the site's ``.cache`` does.
    """
    parents = {e.rsplit("/", 1)[0] if "/" in e else "" for e in own}
    unexpected: list[str] = []
    todo = [(root, "")]
    while todo:
        folder, rel = todo.pop()
        for child in sorted(folder.iterdir()):
            name = f"{rel}/{child.name}" if rel else child.name
            if rel == "" and child.name == _DERIVED and child.is_dir() and not child.is_symlink():
                continue
            if name not in own or child.is_symlink():
                unexpected.append(name)
            elif name in parents and child.is_dir():
                todo.append((child, name))
    return sorted(unexpected)


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that :func:`generate_site` must not write into; changes nothing.

    Accepted: a missing or empty folder, or a synthetic site this generator wrote that holds nothing else.

    Raises:
        FileExistsError: ``out_dir`` is not a folder, or holds entries this generator did not write
            (named: the first five and the count).
    """
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose an empty or new out_dir")
    if not root.is_dir() or not any(root.iterdir()):
        return
    own = _previous_entries(root)
    unexpected = _unexpected_entries(root, own) if own is not None else sorted(c.name for c in root.iterdir())
    if unexpected:
        first = ", ".join(unexpected[:5]) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        what = "a synthetic site but also holds" if own else "not empty, not a site this generator wrote, and holds"
        raise FileExistsError(
            f"{root} is {what} {len(unexpected)} entr{'y' if len(unexpected) == 1 else 'ies'} this generator "
            f"did not write: {first}; move them away or choose an empty or new out_dir"
        )


def _prepare_dir(config: SynthConfig, planned: list[str]) -> dict[str, Path]:
    """Make ``out_dir`` ready (:func:`check_out_dir`, then the previous run's entries removed); write the marker."""
    paths = site_paths(config.out_dir)
    root = config.out_dir
    check_out_dir(root)
    if root.is_dir():
        for child in list(root.iterdir()):  # all checked above: the previous run's entries (and its .cache)
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    marker = {"generator": GENERATOR, "config": config.to_dict(), "entries": planned}
    (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    for key in ("dicom", "annotations"):
        paths[key].mkdir(parents=True, exist_ok=True)
    return paths


def vessel_keep_out(trees: Trees, min_radius_mm: float = 2.5) -> list[tuple[np.ndarray, float]]:
    """Points ``(centre, radius)`` along the intrapulmonary vessels thicker than ``min_radius_mm``.

    These are the hilar vessels, sampled spaced by their radius, that nodule placement keeps clear of.
    """
    out: list[tuple[np.ndarray, float]] = []
    for sg in trees.vessels[trees.vessels[:, 6] >= min_radius_mm]:
        p0, p1, r = sg[0:3], sg[3:6], float(sg[6])
        n = max(2, int(np.ceil(np.linalg.norm(p1 - p0) / r)) + 1)
        out += [(p0 + t * (p1 - p0), r) for t in np.linspace(0.0, 1.0, n)]
    return out


def place_case_nodules(
    case: PatientCase, anatomy: AnatomyParams, trees: Trees | None = None
) -> tuple[dict[int, np.ndarray], int]:
    """Patient-frame centres of a patient's nodules (shared by its prior and current studies).

    Nodules lie in their lobe of the lung mask, which excludes the heart, great vessels, mediastinum
    and structures below the diaphragm (:func:`~.anatomy.lung_lobes`), with 2.5 mm of lung around an
    interior nodule; with ``trees`` they also keep 3 mm clear of the hilar vessels
    (:func:`vessel_keep_out`), so no nodule overlaps a rendered hard-negative structure.

    Returns:
        ``(centres by nodule id, number of nodules whose constraints could not all be met)``.
    """
    centres: dict[int, np.ndarray] = {}
    taken: list[tuple[np.ndarray, float]] = [] if trees is None else vessel_keep_out(trees)
    misses = 0
    for spec in case.nodules:
        radius = spec.shape.bounding_radius()
        pos, ok = place_nodule(
            anatomy,
            LOBE_LABELS[spec.lobe],
            radius,
            spec.juxtapleural,
            np.random.default_rng(spec.seed),
            taken,
        )
        centres[spec.nodule_id] = pos
        taken.append((pos, max(radius, spec.shape.spicule_reach())))
        misses += not ok
    return centres, misses


def nodule_row(study_uid: str, series_uid: str, s: NoduleState, centroid_lps: np.ndarray) -> dict[str, Any]:
    """The labels.csv row (``level = "nodule"``) of a nodule state, as a generated site writes it.

    Args:
        study_uid: its study.
        series_uid: its series.
        s: the nodule on that study.
        centroid_lps: ``(3,)`` its centroid, LPS mm.

    Returns:
        Column name -> value (None where unknown, e.g. ``growth_mm`` without a prior).
    """
    spec = s.spec
    return {
        "study_uid": study_uid,
        "level": "nodule",
        "series_uid": series_uid,
        "nodule_id": spec.nodule_id,
        "centroid_x_mm": round(float(centroid_lps[0]), 2),
        "centroid_y_mm": round(float(centroid_lps[1]), 2),
        "centroid_z_mm": round(float(centroid_lps[2]), 2),
        "longest_diameter_mm": round(s.longest_diameter_mm, 2),
        "short_axis_mm": round(s.short_axis_mm, 2),
        "mean_diameter_mm": round(s.mean_diameter_mm, 2),
        "volume_mm3": round(s.volume_mm3, 1),
        "type": spec.type,
        "solid_component_mm": round(s.solid_component_mm, 2),
        "margin": spec.margin,
        "spiculation": spec.margin == "spiculated",
        "calcification": spec.kind == "calcified",
        "juxtapleural": spec.juxtapleural,
        "lobe": spec.lobe,
        "context": s.context,
        "growth_mm": None if s.growth_mm is None else round(s.growth_mm, 2),
        "malignant": spec.malignant,
        "brock_probability": round(s.brock_probability, 5),
        "lung_rads": s.lung_rads,
    }


def _study_row(
    case: PatientCase, study_uid: str, series_uid: str, states: list[NoduleState], prior: bool
) -> dict[str, Any]:
    return {
        "study_uid": study_uid,
        "level": "study",
        "series_uid": series_uid,
        "age": case.age - (1 if prior else 0),
        "sex": case.sex,
        "family_history": case.family_history,
        "smoking_pack_years": case.pack_years,
        "emphysema": case.emphysema.kind != "none",
        "nodule_count": len(states),
        "lung_rads": exam_category(states),
        "malignant": any(s.spec.malignant for s in states),
    }


def _write_case(
    case: PatientCase, config: SynthConfig, profile: CohortProfile, paths: dict[str, Path]
) -> tuple[list[ReportRecord], list[dict[str, Any]], dict[str, Any]]:
    """Render and write the prior (if any) and current study of one patient."""
    anatomy = sample_anatomy(
        np.random.default_rng(case.anatomy_seed), config.z_extent_mm, config.fov_mm, case.sex == "F"
    )
    # vessel detail follows the pixel size: vessels far below a pixel are invisible anyway
    pixel = config.fov_mm / config.matrix
    trees: Trees = grow_trees(anatomy, n_points=int(np.clip(4000 * (1.67 / pixel) ** 2, 500, 4000)))
    centres, misses = place_case_nodules(case, anatomy, trees)
    records: list[ReportRecord] = []
    rows: list[dict[str, Any]] = []
    prior_uid: str | None = None
    info: dict[str, Any] = {"placement_misses": misses, "sigma": [], "thickness": [], "contrast": [], "hard": []}
    for prior in (True, False) if case.has_prior else (False,):
        tag = "prior" if prior else "current"
        study_uid, series_uid = (
            _uid(config, case.index, tag, "study"),
            _uid(config, case.index, tag, "series"),
        )
        scan = case.prior_scan if prior else case.scan
        states = nodule_states(case, prior=prior)
        grid = make_grid(config.matrix, config.fov_mm, config.z_extent_mm, scan.slice_thickness_mm)
        stream = case.streams[1 if prior else 0]
        out = render_study(
            anatomy,
            trees,
            case,
            states,
            centres,
            scan,
            config.matrix,
            config.fov_mm,
            config.z_extent_mm,
            stream,
        )
        study_date = case.prior_date if prior else case.study_date
        volume = CTVolume(
            hu=out.hu,
            spacing=grid.spacing,
            origin=out.origin_lps,
            study_uid=study_uid,
            series_uid=series_uid,
        )
        tags = {
            "PatientID": case.patient_id,
            "PatientAge": f"{case.age - (1 if prior else 0):03d}Y",
            "PatientSex": case.sex,
            "StudyDate": study_date.strftime("%Y%m%d"),
            "SeriesDate": study_date.strftime("%Y%m%d"),
            "StudyDescription": profile.description_for(scan.contrast),
            "SeriesDescription": f"AXIAL {scan.slice_thickness_mm:g}MM {scan.kernel.upper()}",
            "BodyPartExamined": "CHEST",
            "PatientIdentityRemoved": "YES",
            **scan.dicom_tags(),
        }
        write_ct_series(volume, paths["dicom"] / study_uid / series_uid, tags=tags)
        write_label_nifti(out.labels, volume, mask_path(config.out_dir, series_uid))
        write_label_nifti(out.lobes, volume, lobe_map_path(config.out_dir, series_uid))
        doc = hard_negative_doc(out.hard_negatives, out.shift_lps, study_uid, series_uid, scan.contrast)
        hard_negative_path(config.out_dir, series_uid).write_text(json.dumps(doc) + "\n", encoding="utf-8")
        text = write_report(case, states, profile, np.random.default_rng([stream, 7]), prior=prior, images=out.images)
        records.append(ReportRecord(study_uid, text, study_date.strftime("%Y%m%d"), None if prior else prior_uid))
        rows.append(_study_row(case, study_uid, series_uid, states, prior))
        rows += [nodule_row(study_uid, series_uid, s, out.centroids_lps[s.spec.nodule_id]) for s in states]
        info["sigma"].append(scan.noise_sigma_hu)
        info["thickness"].append(scan.slice_thickness_mm)
        info["contrast"].append(scan.contrast)
        info["hard"].append(len(doc["points"]))
        if prior:
            prior_uid = study_uid
    return records, rows, info


def _cohort_stats(cases: list[PatientCase], infos: list[dict[str, Any]]) -> dict[str, Any]:
    current = [nodule_states(c) for c in cases]
    cats = Counter(exam_category(s) for s in current)
    diam = [s.mean_diameter_mm for st in current for s in st]
    return {
        "prevalence": float(np.mean([c.malignant for c in cases])),
        "nodules_per_study": float(np.mean([len(c.nodules) for c in cases])),
        "studies_without_nodule": float(np.mean([not c.nodules for c in cases])),
        "prior_fraction": float(np.mean([c.has_prior for c in cases])),
        "median_mean_diameter_mm": float(np.median(diam)) if diam else 0.0,
        "emphysema_fraction": float(np.mean([c.emphysema.kind != "none" for c in cases])),
        "lung_rads": dict(sorted(cats.items())),
        "mean_slice_thickness_mm": float(np.mean([t for i in infos for t in i["thickness"]])),
        "mean_noise_sigma_hu": float(np.mean([s for i in infos for s in i["sigma"]])),
        "placement_misses": int(sum(i["placement_misses"] for i in infos)),
        "contrast_fraction": float(np.mean([c for i in infos for c in i["contrast"]])),
        "hard_negatives_per_study": float(np.mean([h for i in infos for h in i["hard"]])),
    }


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def generate_site(config: SynthConfig, progress: Progress | None = None) -> SynthSummary:
    """Generate a synthetic site.

    Args:
        config: what to generate.
        progress: called as ``progress(done, total, message)`` after each study (total counts priors).

    Returns:
        The summary.

    Raises:
        FileExistsError: ``out_dir`` is not a folder, or holds entries that this generator did not write
            (it writes only into a missing or empty folder or into a site it wrote; see the module notes).
    """
    t0 = time.perf_counter()
    profile = get_profile(config.cohort)
    cases = sample_patients(profile, config.n_studies, config.seed, config.prior_fraction)
    paths = _prepare_dir(config, _planned_entries(config, cases))
    total = sum(2 if c.has_prior else 1 for c in cases)
    records: list[ReportRecord] = []
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    done = 0
    for case in cases:
        r, lab, info = _write_case(case, config, profile, paths)
        records += r
        rows += lab
        infos.append(info)
        done += len(r)
        if progress is not None:
            progress(done, total, f"{case.patient_id}: {len(r)} stud{'ies' if len(r) > 1 else 'y'}")
    write_reports(paths["reports"], records)
    write_labels(paths["labels"], rows)
    stats = _cohort_stats(cases, infos)
    manifest = {
        "site": {
            "name": config.name,
            "cohort": profile.name,
            "description": profile.description,
            "n_studies": config.n_studies,
            "seed": config.seed,
            "generator": GENERATOR,
        },
        "privacy": {"epsilon_budget": 8.0, "delta": 1e-5},
        "compute": {"device": "auto"},
        "synth": {k: v for k, v in config.to_dict().items() if v is not None and k != "out_dir"},
    }
    paths["toml"].write_text(toml_dumps(manifest), encoding="utf-8")
    n_rows = sum(1 for r in rows if r["level"] == "nodule")
    return SynthSummary(
        site_dir=config.out_dir,
        cohort=profile.name,
        n_patients=len(cases),
        studies_written=len(records),
        priors_written=sum(c.has_prior for c in cases),
        nodules=sum(len(c.nodules) for c in cases),
        nodule_rows=n_rows,
        seconds=round(time.perf_counter() - t0, 2),
        bytes_on_disk=_dir_bytes(config.out_dir),
        stats=stats,
    )
