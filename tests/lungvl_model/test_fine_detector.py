"""The cascade's fine stage: detector config and storage, grid mapping, candidates, training on a phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lungvl_model.data.volume import CTVolume
from lungvl_model.errors import CorruptStateError
from lungvl_model.inference.anatomy import lung_mask
from lungvl_model.inference.fine_detection import fine_candidates, lung_box, resample_to, to_fine_grid
from lungvl_model.models.config import VisionConfig
from lungvl_model.models.fine_detector import (
    DETECTOR_FILES,
    FineDetector,
    FineDetectorConfig,
    load_fine_detector,
    save_fine_detector,
)
from lungvl_model.training.fine_detector import (
    DetectorTrainConfig,
    component_recall,
    crop_patch,
    fine_target,
    lr_at,
    prepare_study,
    sample_batch,
    train_fine_detector,
)
from tests.lungvl_model.test_candidate_filter import _chest, _Model

SMALL = FineDetectorConfig(
    patch=32, vision=VisionConfig(channels=(4, 4, 8, 8, 8), aggregation_channels=4, attention_scales=(4,))
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spacing_mm": 0.0}, "spacing_mm"),
        ({"spacing_mm": 9.0}, "spacing_mm"),
        ({"patch": 40}, "patch"),
        ({"hu_window": (400.0, -1000.0)}, "hu_window"),
        ({"prior": 1.0}, "prior"),
        ({"head_hidden": 6}, "head_hidden"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FineDetectorConfig(**kwargs)


def test_config_round_trip_and_unknown_key() -> None:
    d = SMALL.to_dict()
    assert FineDetectorConfig.from_dict(json.loads(json.dumps(d))) == SMALL
    with pytest.raises(ValueError, match="unknown keys \\['spacing'\\]"):
        FineDetectorConfig.from_dict({**d, "spacing": 1.0})


def test_train_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="fg_prob \\+ hard_prob"):
        DetectorTrainConfig(fg_prob=0.7, hard_prob=0.5)
    with pytest.raises(ValueError, match="max_steps"):
        DetectorTrainConfig(max_steps=0)


def test_forward_shape_and_prior() -> None:
    det = FineDetector(SMALL).eval()
    with torch.no_grad():
        out = det(torch.rand(2, 1, 32, 16, 16))
    assert out.shape == (2, 1, 32, 16, 16)
    # an untrained head starts near its prior: nothing crosses 0.5, so it proposes nothing
    assert float(torch.sigmoid(out).max()) < 0.5
    assert torch.allclose(det.normalise(torch.tensor([-2000.0, -300.0, 900.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_save_load_round_trip_and_damage(tmp_path: Path) -> None:
    det = FineDetector(SMALL).eval()
    assert load_fine_detector(tmp_path) is None
    save_fine_detector(tmp_path, det, {"metrics": {"held_out_recall": 0.5}})
    back = load_fine_detector(tmp_path)
    assert back is not None and back.config == SMALL and not back.training
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(det(x), back(x), atol=2e-2)  # float16 storage
    pt, js = (tmp_path / n for n in DETECTOR_FILES)
    pt.write_bytes(pt.read_bytes()[:-8])
    with pytest.raises(CorruptStateError, match="fine_detector.pt: sha256"):
        load_fine_detector(tmp_path)
    pt.unlink()
    with pytest.raises(CorruptStateError, match="fine_detector.pt: missing"):
        load_fine_detector(tmp_path)
    save_fine_detector(tmp_path, det)
    js.write_text(js.read_text().replace('"format": 1', '"format": 9'))
    with pytest.raises(CorruptStateError, match="format 9"):
        load_fine_detector(tmp_path)


def test_resample_keeps_the_grid_convention() -> None:
    # one bright voxel at source index (6, 10, 4) with (1, 0.5, 2) mm voxels: on a 2 mm grid it lands at
    # output (3, 2.5, 4) -> the grid map (o * 2 / src) brings the peak back to the source index
    a = np.zeros((12, 24, 10), np.float32)
    a[6, 10, 4] = 1000.0
    out = resample_to(a, (1.0, 0.5, 2.0), 2.0, order=1, cval=0.0)
    assert out.shape == (6, 6, 10)
    z, y, x = np.unravel_index(np.argmax(out), out.shape)
    assert (z, x) == (3, 4) and y in (2, 3)


def test_fine_grid_maps_back_to_the_source() -> None:
    vol, ball, _ = _chest()
    lungs = lung_mask(vol.hu)
    fg = to_fine_grid(vol, lungs, 2.0)
    box = lung_box(lungs, vol.spacing, 10.0)
    assert fg.hu.shape == tuple(int(np.ceil((s.stop - s.start) * 1.25 / 2.0)) for s in box)
    assert fg.offset == tuple(s.start for s in box)
    dense = np.argwhere(fg.hu > -300.0)
    # the ball's centre (24, 48, 38) source voxels comes back through the grid map within a voxel
    on_fine = fg.grid.src_to_model(np.array([24.0, 48.0, 38.0]))
    assert fg.hu[tuple(np.rint(on_fine).astype(int))] > -300.0
    assert np.allclose(fg.grid.model_to_src(on_fine), [24.0, 48.0, 38.0])
    assert len(dense) > 0 and fg.lungs.any()


def test_fine_candidates_rank_by_peak_and_stay_near_the_lungs() -> None:
    prob = np.zeros((20, 20, 20), np.float32)
    lungs = np.zeros_like(prob, bool)
    lungs[2:12, 2:12, 2:12] = True
    prob[4:6, 4:6, 4:6] = 0.7  # inside, lower peak
    prob[8:10, 8:10, 8:10] = 0.9  # inside, higher peak
    prob[17:19, 17:19, 17:19] = 0.99  # 7+ voxels (14 mm) from the lungs
    out = fine_candidates(prob, lungs, 2.0, threshold=0.5)
    assert [round(p, 2) for _, p in out] == [0.9, 0.7]
    assert out[0][0][8, 8, 8] and not out[0][0][4, 4, 4]
    assert len(fine_candidates(prob, lungs, 2.0, threshold=0.5, envelope_mm=30.0)) == 3
    with pytest.raises(ValueError, match="threshold"):
        fine_candidates(prob, lungs, 2.0, threshold=1.5)
    with pytest.raises(ValueError, match="shape"):
        fine_candidates(prob, lungs[:5], 2.0)


def test_crop_patch_pads_outside() -> None:
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    p = crop_patch(a, np.array([-1, -1, -1]), 3, -5.0)
    assert p[0, 0, 0] == -5.0 and p[1, 1, 1] == a[0, 0, 0] and p[2, 2, 2] == a[1, 1, 1]


def test_lr_schedule() -> None:
    tr = DetectorTrainConfig(max_steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(0, tr) == pytest.approx(1e-4)
    assert lr_at(9, tr) == pytest.approx(1e-3)
    assert lr_at(99, tr) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * 89 / 90))))


def test_prepare_study_pools_and_negatives_only() -> None:
    vol, ball, tube = _chest()
    rng = np.random.default_rng(0)
    tr = DetectorTrainConfig()
    st = prepare_study("phantom", vol, ball.astype(np.uint8), SMALL, tr, rng)
    assert st.target.any() and len(st.pools["nodule"]) == int(st.target.sum())
    assert len(st.pools["hard"]) > 0 and len(st.pools["lung"]) > 0
    # hard negatives keep exclusion_mm from the nodule
    nod = np.argwhere(st.target)
    d = np.min(np.linalg.norm(st.pools["hard"][:, None, :] - nod[None], axis=2), axis=1) * SMALL.spacing_mm
    assert d.min() >= tr.exclusion_mm
    neg = prepare_study("lidc-like", vol, ball.astype(np.uint8), SMALL, tr, rng, negatives_only=True)
    assert not neg.target.any() and len(neg.pools["nodule"]) == 0
    # a negatives-only patch never holds a nodule voxel (the whole window, not only its centre)
    half = SMALL.patch // 2
    for c in np.concatenate([neg.pools["hard"], neg.pools["lung"]]):
        box = tuple(slice(max(0, int(v) - half), int(v) + half) for v in c)
        assert not st.target[box].any()


def test_sample_batch_shapes_and_foreground() -> None:
    vol, ball, _ = _chest()
    rng = np.random.default_rng(1)
    tr = DetectorTrainConfig(batch_size=6, fg_prob=0.99, hard_prob=0.0)
    st = prepare_study("phantom", vol, ball.astype(np.uint8), SMALL, tr, rng)
    x, y, kinds = sample_batch([st], SMALL.patch, tr, rng)
    assert x.shape == y.shape == (6, 1, 32, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert kinds.count("nodule") >= 5 and all(bool(y[i].any()) for i, k in enumerate(kinds) if k == "nodule")


def test_trained_on_a_phantom_it_finds_the_ball_and_the_pipeline_keeps_it() -> None:
    """A short run on one phantom: the detector must light up the ball, and the pipeline must keep it."""
    from lungvl_model.inference.explain import analyse_candidates

    torch.set_num_threads(2)
    vol, ball, tube = _chest()
    rng = np.random.default_rng(0)
    tr = DetectorTrainConfig(max_steps=60, batch_size=2, lr=5e-3, warmup_steps=5, fg_prob=0.5, hard_prob=0.3)
    st = prepare_study("phantom", vol, ball.astype(np.uint8), SMALL, tr, rng)
    lungs = to_fine_grid(vol, lung_mask(vol.hu), SMALL.spacing_mm).lungs
    det, metrics = train_fine_detector([st], [(st, lungs)], SMALL, tr, log=lambda m: None)
    assert metrics["held_out_recall"] == 1.0  # the ball (its own training study: a learning check)
    assert metrics["loss_last_50"] < metrics["loss_first_50"]
    assert metrics["held_out_false_candidates_per_scan"] <= 2.0

    # the coarse pass of _Model sees nothing: every finding comes from the fine detector
    none, _ = analyse_candidates(_Model(), vol, 0.5)
    assert none == []
    found, state = analyse_candidates(_Model(), vol, 0.5, fine_detector=det)
    assert any(abs(f.centroid_zyx[2] - 38) < 2 and abs(f.centroid_zyx[1] - 48) < 2 for f in found)
    assert len(state["candidates"]) == len(found)
    # component_recall counts what it touches: a map that is the target itself touches all, falsely nothing
    assert component_recall(st.target.astype(np.float32), st.target, lungs, 2.0) == (1, 1, 0)


def test_lidc_sites_are_recognised_as_negative_only(tmp_path: Path) -> None:
    from lungvl_model.training.candidate_filter import is_lidc_site

    imported, synthetic, broken = tmp_path / "lidc", tmp_path / "synth", tmp_path / "broken"
    for d, body in ((imported, '[site]\nname = "lidc"\ncohort = "lidc"\n'), (synthetic, '[site]\nname = "a"\n')):
        d.mkdir()
        (d / "site.toml").write_text(body)
    broken.mkdir()
    (broken / "site.toml").write_text("[site\n")
    assert is_lidc_site(imported) and not is_lidc_site(synthetic) and not is_lidc_site(broken)
    assert not is_lidc_site(tmp_path / "missing")


def test_fine_target_keeps_nodules_no_voxel_covers_by_half() -> None:
    frac = np.zeros((10, 10, 10), np.float32)
    frac[2:5, 2:5, 2:5] = 0.9  # a nodule that covers its voxels
    frac[7, 7, 6:9] = [0.15, 0.35, 0.2]  # a 3 mm nodule smeared over three 2 mm voxels by a 5 mm slice
    frac[0, 9, 9] = 0.03  # interpolation dust
    t = fine_target(frac)
    assert t[2:5, 2:5, 2:5].all()
    assert t[7, 7].tolist()[6:9] == [False, True, True]  # its peak and what reaches half of it
    assert not t[0, 9, 9] and int(t.sum()) == 27 + 2
    assert not fine_target(np.zeros((4, 4, 4), np.float32)).any()


def test_subsolid_nodules_are_drawn_more_often_and_init_continues() -> None:
    vol, ball, _ = _chest()
    ggn = vol.hu.copy()
    ggn[ball] = -650.0  # the same ball as ground glass
    rng = np.random.default_rng(0)
    tr = DetectorTrainConfig(subsolid_weight=4.0)
    solid = prepare_study("solid", vol, ball.astype(np.uint8), SMALL, tr, rng)
    sub = prepare_study("ggn", CTVolume(ggn, vol.spacing), ball.astype(np.uint8), SMALL, tr, rng)
    assert solid.nodule_weights.tolist() == [1.0] and sub.nodule_weights.tolist() == [4.0]
    # a 5 mm ball (equivalent diameter under small_mm = 8) is drawn small_weight times as often, on top
    zz, yy, xx = np.indices(vol.shape)
    small = ((zz - 24) ** 2 + (yy - 48) ** 2 + (xx - 38) ** 2) * 1.25**2 <= 2.5**2
    hu_small = vol.hu.copy()
    hu_small[ball & ~small] = -850.0  # lung around it
    small_vol = CTVolume(hu_small, vol.spacing)
    assert prepare_study("s", small_vol, small.astype(np.uint8), SMALL, tr, rng).nodule_weights.tolist() == [1.0]
    heavy = DetectorTrainConfig(small_weight=3.0)
    assert prepare_study("s", small_vol, small.astype(np.uint8), SMALL, heavy, rng).nodule_weights.tolist() == [3.0]
    assert prepare_study("b", vol, ball.astype(np.uint8), SMALL, heavy, rng).nodule_weights.tolist() == [1.0]  # 10 mm
    with pytest.raises(ValueError, match="small_weight must be > 0, got 0"):
        DetectorTrainConfig(small_weight=0)
    tr1 = DetectorTrainConfig(batch_size=400, fg_prob=0.99, hard_prob=0.0, subsolid_weight=4.0)
    x, y, kinds = sample_batch([solid, sub], SMALL.patch, tr1, np.random.default_rng(1))
    # which study a nodule patch came from: the ground-glass ball is darker
    centre = x[:, 0, 12:20, 12:20, 12:20].amax(dim=(1, 2, 3))
    nod = [i for i, k in enumerate(kinds) if k == "nodule"]
    share = float(np.mean([float(centre[i]) < 0.5 for i in nod]))
    assert 0.7 < share < 0.9  # 4 / (4 + 1) = 0.8
    det = FineDetector(SMALL)
    with pytest.raises(ValueError, match="config differs"):
        train_fine_detector([solid], [], FineDetectorConfig(), DetectorTrainConfig(max_steps=1), init=det)
    out, _ = train_fine_detector([solid], [], SMALL, DetectorTrainConfig(max_steps=1, batch_size=1), init=det)
    assert out is det
