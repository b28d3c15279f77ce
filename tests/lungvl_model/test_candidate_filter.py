"""Candidate features, the learned candidate filter, its persistence and its wiring in analyse_candidates."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lungvl_model.data.preprocess import PreprocessConfig
from lungvl_model.data.volume import CTVolume
from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.candidate_features import FEATURE_NAMES, FeatureConfig, candidate_features
from lungvl_model.inference.candidate_filter import (
    FILENAME,
    CandidateFilter,
    CandidateFilterConfig,
    choose_threshold,
    fit_candidate_filter,
    load_candidate_filter,
    load_from_checkpoint,
    roc_auc,
    save_candidate_filter,
)

F = {n: i for i, n in enumerate(FEATURE_NAMES)}


def _axes(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")


def _features(hu: np.ndarray, mask: np.ndarray, lungs: np.ndarray | None = None) -> dict[str, float]:
    """Features of ``mask`` (whole-volume) cropped to its bounding box plus 2 voxels."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, mask.shape)
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    lungs = np.ones(hu.shape, bool) if lungs is None else lungs
    off = (int(lo[0]), int(lo[1]), int(lo[2]))
    v = candidate_features(hu, (1.0, 1.0, 1.0), crop, off, lungs, 0.7)
    return dict(zip(FEATURE_NAMES, v.tolist(), strict=True))


def test_sphere_is_round_and_isolated() -> None:
    zz, yy, xx = _axes((40, 40, 40))
    ball = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 36
    hu = np.where(ball, 20.0, -870.0).astype(np.float32)
    f = _features(hu, ball)
    assert f["sphericity"] == pytest.approx(1.0, abs=0.1)
    assert f["elongation"] == pytest.approx(1.0, abs=0.05) and f["flatness"] == pytest.approx(1.0, abs=0.05)
    assert f["equiv_diameter_mm"] == pytest.approx((6 * ball.sum() / np.pi) ** (1 / 3), rel=1e-6)
    assert f["hu_mean"] == pytest.approx(20.0) and f["shell_contrast_hu"] == pytest.approx(890.0)
    assert f["shell_lung_fraction"] == 1.0 and f["shell_soft_fraction"] == 0.0
    assert f["cut_fraction"] == 0.0 and f["border_fraction"] == 0.0
    assert f["blobness"] > 0.3 and f["triage_probability"] == 0.7


def test_cylinder_is_elongated_tubular_and_leaves_its_crop() -> None:
    zz, yy, xx = _axes((40, 40, 40))
    tube = (yy - 20) ** 2 + (xx - 20) ** 2 <= 2.5**2
    hu = np.where(tube, 40.0, -870.0).astype(np.float32)
    part = tube & (zz >= 10) & (zz < 30)  # the refined piece of a vessel that goes on
    crop = part[10:30, 16:25, 16:25]
    v = candidate_features(hu, (1.0, 1.0, 1.0), crop, (10, 16, 16), np.ones(hu.shape, bool), 0.7)
    f = dict(zip(FEATURE_NAMES, v.tolist(), strict=True))
    # length 20, diameter ~5: sqrt(var_z / var_r) = sqrt((400 / 12) / (2.5**2 / 4)) ~ 4.6
    assert f["elongation"] > 3.5 and f["flatness"] == pytest.approx(1.0, abs=0.1)
    assert f["border_fraction"] == pytest.approx(2 / 20)  # its two end disks lie on the crop faces
    assert f["cut_fraction"] > 0.05  # the vessel continues beyond both ends
    assert f["blobness"] < 0.05


def test_half_sphere_on_a_soft_tissue_wall() -> None:
    zz, yy, xx = _axes((40, 40, 40))
    wall = xx >= 26
    ball = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 26) ** 2 <= 36
    hu = np.where(wall | ball, 40.0, -870.0).astype(np.float32)
    lungs = ~wall
    nodule = ball & ~wall
    f = _features(hu, nodule, lungs)
    assert f["shell_soft_fraction"] > 0.25 and f["shell_lung_fraction"] < 0.75
    assert f["cut_fraction"] > 0.15
    assert f["inside_lung_fraction"] == 1.0
    assert 0.0 < f["lung_distance_mm"] < 8.0  # the centroid is ~2.4 mm from the wall


def test_features_validate_input() -> None:
    hu = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="empty"):
        candidate_features(hu, (1.0, 1.0, 1.0), np.zeros((2, 2, 2), bool), (0, 0, 0), np.ones_like(hu, bool), 0.5)
    with pytest.raises(ValueError, match="lungs has shape"):
        candidate_features(hu, (1.0, 1.0, 1.0), np.ones((2, 2, 2), bool), (0, 0, 0), np.ones((4, 4, 4), bool), 0.5)
    with pytest.raises(ValueError, match="shell_mm"):
        FeatureConfig(shell_mm=0.0)


# ----------------------------------------------------------------------------------------- classifier


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    x = rng.normal(size=(n, len(FEATURE_NAMES)))
    x[:, F["elongation"]] += np.where(y == 1, -2.0, 2.0)  # nodules round, negatives elongated
    x[:, F["shell_soft_fraction"]] += np.where(y == 1, -1.5, 1.5)
    return x, y


@pytest.mark.parametrize("kind", ["logistic", "stumps"])
def test_fit_predict_separable(kind: str) -> None:
    x, y = _separable(400, 0)
    flt = fit_candidate_filter(x, y, CandidateFilterConfig(kind=kind, n_rounds=60))
    xt, yt = _separable(300, 1)
    assert roc_auc(flt.predict_proba(xt), yt) > 0.95


def test_choose_threshold_and_auc_by_hand() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    labels = np.array([1, 1, 1, 1, 0, 0])
    assert choose_threshold(scores, labels, 0.75) == 0.7  # keep 3 of 4
    assert choose_threshold(scores, labels, 1.0) == 0.6
    # pairs (pos, neg): 0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1 -> 3/4; a tie counts 1/2
    assert roc_auc(np.array([0.8, 0.4, 0.5, 0.1]), np.array([1, 1, 0, 0])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    with pytest.raises(ValueError, match="no positive"):
        choose_threshold(scores, np.zeros(6), 0.9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "forest"}, "kind"),
        ({"l2": -1.0}, "l2"),
        ({"n_rounds": 0}, "n_rounds"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"target_sensitivity": 1.5}, "target_sensitivity"),
    ],
)
def test_invalid_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CandidateFilterConfig(**kwargs)


def test_fit_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_candidate_filter(np.zeros((4, len(FEATURE_NAMES))), np.zeros(4))


@pytest.mark.parametrize("kind", ["logistic", "stumps"])
def test_persistence_round_trip(tmp_path: Path, kind: str) -> None:
    x, y = _separable(200, 2)
    flt = fit_candidate_filter(x, y, CandidateFilterConfig(kind=kind, n_rounds=20))
    flt.threshold = 0.37
    p = save_candidate_filter(flt, tmp_path)
    assert p == tmp_path / FILENAME and not list(tmp_path.glob(".*.tmp"))
    back = load_from_checkpoint(tmp_path)
    assert back is not None and back.threshold == 0.37 and back.config == flt.config
    np.testing.assert_allclose(back.predict_proba(x), flt.predict_proba(x), rtol=1e-12)
    assert load_from_checkpoint(tmp_path / "elsewhere") is None


def test_damaged_file_names_file_and_key(tmp_path: Path) -> None:
    x, y = _separable(100, 3)
    p = save_candidate_filter(fit_candidate_filter(x, y), tmp_path)
    doc = json.loads(p.read_text())
    p.write_text(p.read_text()[:50])
    with pytest.raises(CorruptStateError, match="candidate_filter.json"):
        load_candidate_filter(p)
    del doc["threshold"]
    p.write_text(json.dumps(doc))
    with pytest.raises(CorruptStateError, match="'threshold'"):
        load_candidate_filter(p)
    doc["threshold"], doc["params"] = 0.5, {"mean": [0.0]}
    p.write_text(json.dumps(doc))
    with pytest.raises(CorruptStateError, match="params"):
        load_candidate_filter(p)


# ---------------------------------------------------------------------------------------------- wiring


class _Model(torch.nn.Module):
    """The triage-only part of a LungVL model: encoder features whose first scale is the probability logit."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(input=PreprocessConfig(spacing_mm=(5.0, 5.0, 5.0), size=None, antialias=False))
        self.seg_head = torch.nn.Identity()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, image: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(scales=[torch.full_like(image, -10.0)])


def _chest() -> tuple[CTVolume, np.ndarray, np.ndarray]:
    """Air, a soft-tissue body and two lungs (1.25 mm voxels) with a 5 mm ball and a 3 mm vessel."""
    shape = (48, 96, 128)
    zz, yy, xx = _axes(shape)
    hu = np.full(shape, -1000.0, np.float32)
    hu[:, 8:88, 8:120] = 40.0
    left, right = (xx >= 16) & (xx < 60) & (yy >= 16) & (yy < 80), (xx >= 68) & (xx < 112) & (yy >= 16) & (yy < 80)
    hu[(left | right) & (zz >= 4) & (zz < 44)] = -870.0
    ball = ((zz - 24) ** 2 + (yy - 48) ** 2 + (xx - 38) ** 2) * 1.25**2 <= 5.0**2
    tube = (((zz - 24) ** 2 + (yy - 48) ** 2) * 1.25**2 <= 1.5**2) & (xx >= 72) & (xx < 108)
    hu[ball | tube] = 40.0
    return CTVolume(hu, (1.25, 1.25, 1.25)), ball, tube


def _coarse_seg_fn(ball: np.ndarray, tube: np.ndarray) -> Callable[[torch.Tensor], np.ndarray]:
    """A triage map of :func:`_chest` on the 5 mm grid: 0.9 on the ball and on a 12-voxel piece of the tube."""

    def seg_fn(image: torch.Tensor) -> np.ndarray:
        prob = np.zeros(tuple(image.shape[2:]), np.float32)
        for m in (ball, tube & (np.arange(128) >= 84)[None, None, :] & (np.arange(128) < 96)[None, None, :]):
            g = np.unique(np.rint(np.argwhere(m) * 1.25 / 5.0).astype(int), axis=0)
            prob[g[:, 0], g[:, 1], g[:, 2]] = 0.9
        return prob

    return seg_fn


def test_analyse_candidates_filter_drops_the_tube_keeps_the_ball() -> None:
    from lungvl_model.inference.explain import analyse_candidates

    vol, ball, tube = _chest()
    seg_fn = _coarse_seg_fn(ball, tube)

    # a hand-set filter: round (elongation ~1) is a nodule, elongated (> 1.6) is not
    w = np.zeros(len(FEATURE_NAMES))
    w[F["elongation"]] = -10.0
    params = {"mean": [0.0] * len(w), "scale": [1.0] * len(w), "weights": w.tolist(), "bias": 16.0}
    flt = CandidateFilter(CandidateFilterConfig(), FEATURE_NAMES, params, threshold=0.5)
    base, st0 = analyse_candidates(_Model(), vol, 0.5, seg_fn)
    assert len(base) == 2 and all(f.nodule_probability is None for f in base)
    kept, st = analyse_candidates(_Model(), vol, 0.5, seg_fn, candidate_filter=flt)
    assert len(kept) == 1
    f = kept[0]
    assert f.nodule_probability is not None and f.nodule_probability > 0.9
    assert abs(f.centroid_zyx[2] - 38) < 2  # the ball
    assert len(st["candidates"]) == 2  # both scored for FROC, the tube below the threshold
    assert sorted(s for _, s in st["candidates"])[0] < 0.5


# ---------------------------------------------------------------- real CT: LIDC-IDRI-0001

LIDC = Path(__file__).resolve().parents[3] / "shared" / "data" / "lidc"


@pytest.mark.slow  # ~2.5 min on 2 shared cores: two synthetic sites, ~1,700 refined seeds, a 512x512x133 CT
@pytest.mark.skipif(not LIDC.is_dir(), reason="../shared/data/lidc is not available")
def test_lidc_0001_nodule_kept_and_held_out_anatomy_rejected(tmp_path: Path) -> None:
    from dataclasses import replace

    from lungvl_model.data.synth import SynthConfig, generate_site
    from lungvl_model.inference.anatomy import lung_mask
    from lungvl_model.training.candidate_filter import (
        SeedConfig,
        coarse_candidate,
        lidc_far_mask,
        lidc_negative_rows,
        lidc_slabs,
        read_lidc,
        seed_rows,
        summarize,
        train_candidate_filter,
        triage_grid,
    )

    # ~40 nodules: with a single 10-patient site (9 nodules) the 95 % threshold rests on one outlier
    # nodule and fell to 0.0005, keeping 20 of 21 held-out negatives
    sites = [tmp_path / "scr", tmp_path / "ref"]
    generate_site(SynthConfig(cohort="screening", n_studies=12, out_dir=sites[0], seed=11, matrix=160))
    generate_site(SynthConfig(cohort="referral", n_studies=12, out_dir=sites[1], seed=13, matrix=160))
    flt = train_candidate_filter(sites, tmp_path, lidc_dirs=[LIDC], seed=0)  # LIDC: training-slab negatives only
    assert (tmp_path / FILENAME).is_file()
    vol, marks, labels = read_lidc(LIDC)
    lungs = lung_mask(vol.hu)
    grid, shape = triage_grid(vol, 5.0)
    nodule = seed_rows(vol, lungs, [(coarse_candidate(labels == 1, grid, shape), "nodule", 1)], "lidc", grid)
    assert len(nodule.y) == 1 and flt.predict_proba(nodule.x)[0] >= flt.threshold  # the consensus nodule is kept
    sc = replace(SeedConfig(), negatives_per_kind=7)
    _, held = lidc_slabs(vol)
    far = lidc_far_mask(vol, marks, labels, sc.exclusion_mm)
    neg = lidc_negative_rows(vol, far, held, np.random.default_rng(1), sc, lungs=lungs)
    s = summarize(flt, neg)
    assert s["negatives_per_study_after"] <= 0.5 * s["negatives_per_study_before"]
