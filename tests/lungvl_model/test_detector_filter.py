"""The candidate filter fitted on the fine detector: its probability feature and its own candidates."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.anatomy import lung_mask
from lungvl_model.inference.candidate_features import FEATURE_NAMES
from lungvl_model.inference.candidate_filter import (
    CandidateFilter,
    CandidateFilterConfig,
    load_candidate_filter,
    save_candidate_filter,
    score_findings,
)
from lungvl_model.inference.checkpoint_parts import explain_parts
from lungvl_model.inference.findings import GridMap, measure_finding, refine_candidate
from lungvl_model.inference.fine_detection import probability_over, to_fine_grid
from tests.lungvl_model.test_candidate_filter import _chest, _coarse_seg_fn, _Model

F = {n: i for i, n in enumerate(FEATURE_NAMES)}


def _triage_only_filter(source: str) -> CandidateFilter:
    """A hand-set filter that reads the triage feature only: p = sigmoid(20 (t - 0.5))."""
    w = np.zeros(len(FEATURE_NAMES))
    w[F["triage_probability"]] = 20.0
    params = {"mean": [0.0] * len(w), "scale": [1.0] * len(w), "weights": w.tolist(), "bias": -10.0}
    return CandidateFilter(CandidateFilterConfig(), FEATURE_NAMES, params, threshold=0.5, triage_source=source)


def test_probability_over_maps_mask_voxels_to_the_detector_grid() -> None:
    # source voxels (1, 0.5, 0.5) mm, detector grid 2 mm starting at source voxel (4, 8, 8):
    # source (z, y, x) -> fine ((z - 4) / 2, (y - 8) / 4, (x - 8) / 4), rounded half to even
    grid = GridMap((1.0, 0.5, 0.5), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0))
    prob = np.zeros((5, 5, 5), np.float32)
    prob[2, 1, 3] = 0.8  # source (8, 12, 20)
    prob[0, 0, 0] = 0.3  # source (4, 8, 8)
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True  # offset (7, 11, 19) -> source (8, 12, 20)
    assert probability_over(prob, grid, mask, (7, 11, 19)) == pytest.approx(0.8)
    mask[0, 0, 0] = True  # source (7, 11, 19) -> fine (1.5, 0.75, 2.75) -> (2, 1, 3): the same voxel
    assert probability_over(prob, grid, mask, (7, 11, 19)) == pytest.approx(0.8)
    assert probability_over(prob, grid, mask, (3, 7, 7)) == pytest.approx(0.3)  # (4, 8, 8) is in the mask
    assert probability_over(prob, grid, mask, (100, 100, 100)) == 0.0  # outside the grid
    assert probability_over(prob, grid, np.zeros((2, 2, 2), bool), (7, 11, 19)) == 0.0


def test_filter_source_round_trips_and_version_1_reads_as_constant(tmp_path: Path) -> None:
    p = save_candidate_filter(_triage_only_filter("fine_detector"), tmp_path)
    doc = json.loads(p.read_text())
    assert doc["version"] == 2 and doc["triage_source"] == "fine_detector"
    assert load_candidate_filter(p).triage_source == "fine_detector"
    del doc["triage_source"]
    p.write_text(json.dumps(doc))
    with pytest.raises(CorruptStateError, match="'triage_source'"):
        load_candidate_filter(p)
    doc["version"] = 1  # written before the key existed: fitted on seeded rows, a constant
    p.write_text(json.dumps(doc))
    assert load_candidate_filter(p).triage_source == "constant"
    doc["version"], doc["triage_source"] = 2, "coarse"
    p.write_text(json.dumps(doc))
    with pytest.raises(CorruptStateError, match="'triage_source'.*'coarse'"):
        load_candidate_filter(p)
    with pytest.raises(ValueError, match="triage_source"):
        _triage_only_filter("coarse")


def test_scoring_feeds_what_the_filter_was_fitted_on() -> None:
    vol, ball, _ = _chest()
    lungs = lung_mask(vol.hu)
    grid = GridMap(vol.spacing, (5.0, 5.0, 5.0), (0.0, 0.0, 0.0))
    cand = np.zeros((12, 24, 32), bool)
    cand[6, 12, 9] = True  # the ball's 5 mm voxel
    refined = refine_candidate(vol, cand, grid, lungs=lungs)
    assert refined is not None
    f = measure_finding(vol, *refined, 0.05)  # a proposer that barely saw it
    # constant: 1.0 whatever the proposer said (the filter was fitted on 1.0)
    assert score_findings([f], vol, lungs, _triage_only_filter("constant"))[0] > 0.99
    flt = _triage_only_filter("fine_detector")
    with pytest.raises(ValueError, match="fine detector"):
        score_findings([f], vol, lungs, flt)
    assert score_findings([f], vol, lungs, flt, detector_probability=[0.9])[0] > 0.99
    assert score_findings([f], vol, lungs, flt, detector_probability=[0.1])[0] < 0.01


def test_analyse_candidates_scores_every_candidate_by_the_detector_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coarse candidate on the ball and one on the tube; the detector map lights the ball only."""
    from lungvl_model.inference import explain, fine_detection

    vol, ball, tube = _chest()
    fine = to_fine_grid(vol, lung_mask(vol.hu), 2.0)
    hand = np.zeros(fine.hu.shape, np.float32)
    c = np.rint(fine.grid.src_to_model(np.array([24.0, 48.0, 38.0]))).astype(int)
    hand[c[0], c[1], c[2]] = 0.45  # below the proposal threshold: no fine candidate, only the map
    monkeypatch.setattr(fine_detection, "detect", lambda _det, hu: hand if hu.shape == hand.shape else None)

    seg_fn = _coarse_seg_fn(ball, tube)
    det = SimpleNamespace(config=SimpleNamespace(spacing_mm=2.0))
    flt = _triage_only_filter("fine_detector")
    flt.threshold = 0.1
    kept, st = explain.analyse_candidates(_Model(), vol, 0.5, seg_fn, candidate_filter=flt, fine_detector=det)
    scores = sorted(s for _, s in st["candidates"])
    assert len(scores) == 2  # both coarse candidates refined and scored
    assert scores[0] < 1e-3  # the tube: 0 on the map
    assert scores[1] == pytest.approx(1 / (1 + np.exp(-20 * (0.45 - 0.5))), rel=1e-3)  # the ball: 0.45
    assert len(kept) == 1 and abs(kept[0].centroid_zyx[2] - 38) < 2
    with pytest.raises(ValueError, match="no fine detector"):
        explain.analyse_candidates(_Model(), vol, 0.5, seg_fn, candidate_filter=flt)


def test_explain_parts_refuses_a_detector_filter_without_its_detector(tmp_path: Path) -> None:
    save_candidate_filter(_triage_only_filter("fine_detector"), tmp_path)
    with pytest.raises(CorruptStateError, match="fine_detector.pt"):
        explain_parts(tmp_path)
    save_candidate_filter(_triage_only_filter("constant"), tmp_path)
    assert explain_parts(tmp_path)["candidate_filter"].triage_source == "constant"


def test_detector_rows_label_by_overlap_and_distance() -> None:
    from lungvl_model.inference.fine_detection import DetectorMap
    from lungvl_model.training.candidate_filter import detector_rows

    vol, ball, tube = _chest()
    lungs = lung_mask(vol.hu)
    fine = to_fine_grid(vol, lungs, 2.0)
    prob = np.zeros(fine.hu.shape, np.float32)
    for zyx, p in (((24.0, 48.0, 38.0), 0.95), ((24.0, 48.0, 90.0), 0.8), ((24.0, 48.0, 48.0), 0.7)):
        c = np.rint(fine.grid.src_to_model(np.array(zyx))).astype(int)
        prob[c[0], c[1], c[2]] = p
    dmap = DetectorMap(fine, prob, 2.0)
    far = np.ones(vol.shape, bool)
    far[:, :, 30:60] = False  # near the ball: the point 12 mm beside it gives no row
    rows = detector_rows(vol, lungs, dmap, "s1", ball, far)
    assert list(rows.kind) == ["detector_nodule", "detector"] and list(rows.y) == [1.0, 0.0]
    assert rows.x[:, F["triage_probability"]].tolist() == pytest.approx([0.95, 0.8])
    assert rows.seeds == {"detector": 3} and set(rows.group) == {"s1"}
    lidc = detector_rows(vol, lungs, dmap, "lidc", np.zeros(vol.shape, bool), far, "lidc_")
    assert list(lidc.kind) == ["lidc_detector"] and lidc.y.tolist() == [0.0]  # the tube only


def test_synthetic_rows_carry_the_detector_probability() -> None:
    """The training path with a real (untrained, prior 0.9) detector: every row's triage feature is the
    detector's map over the refined mask, everything else as without it."""
    import dataclasses

    import torch

    from lungvl_model.models.fine_detector import FineDetector
    from lungvl_model.training.candidate_filter import SeedConfig, synthetic_study_rows
    from tests.lungvl_model.test_fine_detector import SMALL

    torch.manual_seed(0)
    torch.set_num_threads(2)
    vol, ball, _ = _chest()
    det = FineDetector(dataclasses.replace(SMALL, prior=0.9))
    cfg = SeedConfig(negatives_per_kind=2)
    plain = synthetic_study_rows(vol, ball.astype(np.uint8), "s", np.random.default_rng(0), cfg)
    rows = synthetic_study_rows(vol, ball.astype(np.uint8), "s", np.random.default_rng(0), cfg, detector=det)
    assert set(plain.x[:, F["triage_probability"]]) == {1.0}
    seeded = rows.kind != "detector"
    seeded &= rows.kind != "detector_nodule"
    assert seeded.sum() == len(plain.y)  # the same seeds, refined the same way
    np.testing.assert_allclose(rows.x[seeded][:, : F["triage_probability"]], plain.x[:, : F["triage_probability"]])
    t = rows.x[:, F["triage_probability"]]
    assert np.all((t >= 0.0) & (t < 1.0)) and t.std() > 0  # the detector's map, not a constant
    assert "detector" in rows.seeds  # its own components were looked for (and counted, labelled as tested above)
