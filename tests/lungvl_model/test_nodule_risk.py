"""Nodule risk: pooling, Brock-input encoding, noisy-OR, residual head, training, storage."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lungvl_model.errors import CorruptStateError
from lungvl_model.evaluation.classification_metrics import roc_auc
from lungvl_model.inference.findings import GridMap
from lungvl_model.models.nodule_features import (
    BROCK_DIM,
    BROCK_FEATURES,
    NoduleInputs,
    brock_logit_of,
    brock_vector,
    inputs_from_finding,
    margin_profile,
    pool_nodule_features,
    region_from_centroid,
    region_from_source_mask,
)
from lungvl_model.models.nodule_risk import (
    NoduleRiskConfig,
    NoduleRiskHead,
    load_nodule_risk,
    noisy_or,
    save_nodule_risk,
)
from lungvl_model.training.nodule_risk import (
    NoduleExample,
    RiskTrainConfig,
    choose_correction_scale,
    predict,
    study_folds,
    train_nodule_risk,
    true_inputs,
)


def _maps() -> list[torch.Tensor]:
    """Scale 0: (2, 4, 4, 4) with channel 0 = 16z + 4y + x, channel 1 = its negative; scale 1: (2, 2, 2, 2)."""
    idx0 = torch.arange(64, dtype=torch.float32).reshape(4, 4, 4)
    idx1 = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2) * 10
    return [torch.stack([idx0, -idx0]), torch.stack([idx1, idx1 + 1])]


def test_pool_masked_mean_and_max_by_hand() -> None:
    region = torch.zeros(4, 4, 4, dtype=torch.bool)
    region[0, 0, 0] = region[0, 0, 1] = True
    out = pool_nodule_features(_maps(), region, (0, 0, 0), neighbourhood=0)
    # scale 0: values 0 and 1 -> mean 0.5, max 1 (channel 1: -0.5, 0); scale 1: coarse voxel (0,0,0) only
    assert out.tolist() == [0.5, -0.5, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_pool_tiny_nodule_gets_the_centre_neighbourhood() -> None:
    empty = torch.zeros(4, 4, 4, dtype=torch.bool)
    out = pool_nodule_features(_maps()[:1], empty, (2.2, 1.8, 2.0), neighbourhood=1)
    # cube z, y, x in {1, 2, 3}: mean 16*2 + 4*2 + 2 = 42, max 16*3 + 4*3 + 3 = 63
    assert out.tolist() == [42.0, -42.0, 63.0, -21.0]
    corner = pool_nodule_features(_maps()[:1], empty, (0, 0, 0), neighbourhood=1)
    assert corner.tolist()[0] == pytest.approx(16 * 0.5 + 4 * 0.5 + 0.5)  # clipped cube {0, 1}^3
    single = pool_nodule_features(_maps()[:1], empty, (3, 3, 3), neighbourhood=0)
    assert single.tolist() == [63.0, -63.0, 63.0, -63.0]


def test_pool_rejects_a_map_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"scale 1 must be \(C, 2, 2, 2\)"):
        pool_nodule_features([_maps()[0], torch.zeros(2, 4, 4, 4)], torch.zeros(4, 4, 4, dtype=torch.bool), (0, 0, 0))


def test_region_from_source_mask_maps_through_the_grid() -> None:
    grid = GridMap(src_spacing=(1.0, 1.0, 1.0), dst_spacing=(2.0, 2.0, 2.0), start=(1.0, 0.0, 0.0))
    mask = np.zeros((2, 1, 1), bool)
    mask[:] = True  # source voxels (4, 2, 2) and (5, 2, 2) with offset (4, 2, 2)
    region, centre = region_from_source_mask(mask, (4, 2, 2), grid, (4, 4, 4))
    # model = src * 1/2 - start: (1, 1, 1) and (1.5 -> 2, 1, 1)
    assert sorted(map(tuple, np.argwhere(region).tolist())) == [(1, 1, 1), (2, 1, 1)]
    assert centre.tolist() == [1.25, 1.0, 1.0]


def test_margin_profile_by_hand() -> None:
    hu = np.full((9, 9, 9), -1000.0)
    for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
        hu[4 + dz, 4 + dy, 4 + dx] = 0.0  # the 6 face neighbours of the one-voxel nodule are tissue
    hu[4, 6, 4] = 0.0  # one voxel at distance 2
    mask = np.ones((1, 1, 1), bool)
    prof = margin_profile(hu, mask, (4, 4, 4), (1.0, 1.0, 1.0), (0.0, 1.0, 2.0))
    # shell (0, 1]: the 6 face neighbours, all tissue; shell (1, 2]: 12 at sqrt2 + 8 at sqrt3 + 6 at 2, one tissue
    assert prof.tolist() == pytest.approx([1.0, 1 / 26])
    # anisotropic spacing: with sz = 3 mm the z neighbours fall outside (0, 1]: only 4 voxels left
    prof = margin_profile(hu, mask, (4, 4, 4), (3.0, 1.0, 1.0), (0.0, 1.0))
    assert prof.tolist() == [1.0]


def test_region_from_centroid_is_a_ball_in_mm() -> None:
    ball = region_from_centroid((2, 2, 2), 10.0, (5.0, 5.0, 5.0), (5, 5, 5))
    # radius 5 mm = 1 voxel: the centre and its 6 face neighbours
    assert int(ball.sum()) == 7 and ball[2, 2, 2] and ball[1, 2, 2] and not ball[1, 1, 2]


def test_brock_vector_encoding() -> None:
    x = NoduleInputs(
        longest_diameter_mm=14.0,
        mean_diameter_mm=12.0,
        type="part_solid",
        upper_lobe=True,
        nodule_count=2,
        calcified=False,
        juxtapleural=True,
        spiculation=None,
        age=72.0,
        female=None,
        emphysema=True,
        family_history=None,
    )
    v = dict(zip(BROCK_FEATURES, brock_vector(x).tolist(), strict=True))
    assert len(v) == BROCK_DIM
    assert v == {
        "log2_mean_diameter_over_6mm": 1.0,
        "solid": 0.0,
        "part_solid": 1.0,
        "non_solid": 0.0,
        "spiculation": 0.0,
        "spiculation_missing": 1.0,
        "upper_lobe": 1.0,
        "count_centred": -0.5,
        "calcified": 0.0,
        "juxtapleural": 1.0,
        "age_centred": 1.0,
        "age_missing": 0.0,
        "female": 0.0,
        "sex_missing": 1.0,
        "emphysema": 1.0,
        "emphysema_missing": 0.0,
        "family_history": 0.0,
        "family_history_missing": 1.0,
    }


def test_brock_logit_matches_the_anchor_test_vector() -> None:
    # brock_model.md row 2: 62 y, female, 10 mm solid, upper lobe, 1 nodule, spiculated -> logit -1.3802
    x = NoduleInputs(10.0, 9.0, "solid", True, 1, spiculation=1.0, age=62.0, female=True)
    assert brock_logit_of(x) == pytest.approx(-1.3802, abs=1e-4)
    # unknown age/sex/spiculation take the reference values: row 1 (62 y male 4 mm, count 4) -> -6.7892
    assert brock_logit_of(NoduleInputs(4.0, 4.0, "solid", False, 4)) == pytest.approx(-6.7892, abs=1e-4)


def test_inputs_from_finding_drops_assumed_patient_fields() -> None:
    f = SimpleNamespace(
        longest_diameter_mm=8.0, mean_diameter_mm=6.0, type="solid", lobe="LUL", calcified=False, juxtapleural=True
    )
    known = inputs_from_finding(
        f, nodule_count=2, patient={"age": 70, "age_assumed": False, "sex": "F", "sex_assumed": False}
    )
    assert (known.age, known.female, known.upper_lobe, known.nodule_count) == (70.0, True, True, 2)
    assumed = inputs_from_finding(
        f, nodule_count=1, patient={"age": 62, "age_assumed": True, "sex": "", "sex_assumed": True}
    )
    assert assumed.age is None and assumed.female is None and assumed.spiculation is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"longest_diameter_mm": 0.0}, "longest_diameter_mm"),
        ({"type": "ggo"}, "type"),
        ({"nodule_count": 0}, "nodule_count"),
        ({"spiculation": 1.5}, "spiculation"),
        ({"age": 130.0}, "age"),
    ],
)
def test_invalid_inputs(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {
        "longest_diameter_mm": 5.0,
        "mean_diameter_mm": 5.0,
        "type": "solid",
        "upper_lobe": False,
        "nodule_count": 1,
    }
    with pytest.raises(ValueError, match=match):
        NoduleInputs(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_scales": 3}, "feature_scales"),
        ({"hidden": 30, "norm_groups": 4}, "hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"neighbourhood": -1}, "neighbourhood"),
        ({"empty_study_probability": 1.0}, "empty_study_probability"),
        ({"margin_shells_mm": (0.0, 2.0, 2.0)}, "margin_shells_mm"),
        ({"margin_shells_mm": (3.0,)}, "margin_shells_mm"),
    ],
)
def test_invalid_config(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoduleRiskConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inputs"):
        RiskTrainConfig(inputs="both_kinds")


def test_noisy_or_by_hand() -> None:
    assert noisy_or([0.5, 0.2]) == pytest.approx(1 - 0.5 * 0.8)
    assert noisy_or([0.1, 0.1, 0.1]) == pytest.approx(1 - 0.9**3)
    assert noisy_or([0.3]) == pytest.approx(0.3)
    assert noisy_or([]) == 0.0 and noisy_or([], empty=0.05) == 0.05
    with pytest.raises(ValueError, match="probabilities"):
        noisy_or([0.2, 1.5])


def test_residual_head_starts_exactly_at_brock() -> None:
    torch.manual_seed(0)
    cfg = NoduleRiskConfig(feature_channels=4, feature_scales=2, hidden=8, use_features=True)
    head = NoduleRiskHead(cfg).eval()
    feats, brock = torch.randn(5, cfg.feature_dim), torch.randn(5, BROCK_DIM)
    logit = torch.tensor([-6.0, -2.0, 0.0, 1.5, 3.0])
    out = head(feats, brock, logit)
    assert torch.equal(out.logit, logit) and torch.equal(out.correction, torch.zeros(5))
    free = NoduleRiskHead(NoduleRiskConfig(feature_channels=4, hidden=8, residual=False, use_features=True)).eval()
    assert not torch.equal(free(feats, brock, logit).logit, logit)
    with pytest.raises(ValueError, match="NoduleRiskHead expects"):
        head(feats[:, :3], brock, logit)


def _examples(n: int, seed: int) -> list[NoduleExample]:
    """Nodules whose malignancy is the sign of feature 0; Brock inputs identical (uninformative)."""
    rng = np.random.default_rng(seed)
    x = NoduleInputs(6.0, 6.0, "solid", False, 1, age=62.0, female=False)
    out = []
    for i in range(n):
        f = rng.normal(size=4).astype(np.float32)
        out.append(NoduleExample("1.2", "site", i + 1, int(f[0] > 0.3), f, x, None))
    return out


def test_tiny_training_separates_separable_vectors() -> None:
    cfg = NoduleRiskConfig(
        feature_channels=2, feature_scales=1, hidden=8, dropout=0.0, margin_shells_mm=(), use_features=True
    )
    train = RiskTrainConfig(epochs=150, lr=1e-2, weight_decay=0.0, inputs="true", seed=3)
    head, metrics = train_nodule_risk(_examples(120, 0), cfg, train)
    test = _examples(80, 1)
    p = predict(head, test, "true")
    y = np.asarray([e.malignant for e in test])
    assert metrics["final_loss"] < metrics["first_loss"]
    assert roc_auc(y, p) > 0.9
    again, _ = train_nodule_risk(_examples(120, 0), cfg, train)
    assert np.array_equal(predict(again, test, "true"), p)  # seeded


def test_training_needs_both_classes() -> None:
    only_benign = [e for e in _examples(40, 0) if e.malignant == 0]
    with pytest.raises(ValueError, match="malignant and benign"):
        train_nodule_risk(
            only_benign,
            NoduleRiskConfig(feature_channels=2, feature_scales=1, hidden=8, margin_shells_mm=()),
            RiskTrainConfig(inputs="true"),
        )


def test_true_inputs_from_label_rows() -> None:
    row = {"nodule_id": "1", "longest_diameter_mm": "9", "mean_diameter_mm": "7.5", "type": "non_solid",
           "lobe": "RLL", "spiculation": "1", "calcification": "0", "juxtapleural": ""}  # fmt: skip
    study = {"age": "66", "sex": "M", "emphysema": "1", "family_history": "", "nodule_count": "3"}
    x = true_inputs(row, study, 1)
    assert x == NoduleInputs(9.0, 7.5, "non_solid", False, 3, False, False, 1.0, 66.0, False, True, None)
    with pytest.raises(ValueError, match="needs a diameter"):
        true_inputs({**row, "type": ""}, study, 1)


def test_save_load_round_trip_and_damaged_files(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    assert load_nodule_risk(d) is None  # nothing trained
    torch.manual_seed(1)
    cfg = NoduleRiskConfig(feature_channels=2, feature_scales=1, hidden=8, residual=False, use_features=True)
    head = NoduleRiskHead(cfg).eval()
    head.set_feature_stats(torch.randn(10, cfg.feature_dim) * 3 + 1)
    save_nodule_risk(d, head, {"metrics": {"auc": 0.8}})
    loaded = load_nodule_risk(d)
    assert loaded is not None
    again, doc = loaded
    assert doc["metrics"] == {"auc": 0.8} and NoduleRiskConfig.from_dict(doc["config"]) == cfg == again.config
    args = (torch.randn(3, cfg.feature_dim), torch.randn(3, BROCK_DIM), torch.randn(3))
    assert torch.equal(again(*args).logit, head(*args).logit)
    assert not list(d.glob("*.tmp"))

    pt, js = d / "nodule_risk.pt", d / "nodule_risk.json"
    good = pt.read_bytes()
    pt.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptStateError, match=r"nodule_risk\.pt: sha256"):
        load_nodule_risk(d)
    pt.write_bytes(good)
    text = js.read_text()
    js.write_text(text[:-10])
    with pytest.raises(CorruptStateError, match=r"nodule_risk\.json: damaged"):
        load_nodule_risk(d)
    doc["config"]["hidden"] = 16  # weights of a hidden-8 head under a hidden-16 config
    js.write_text(json.dumps(doc))
    with pytest.raises(CorruptStateError, match=r"nodule_risk\.pt: damaged or does not fit"):
        load_nodule_risk(d)
    js.unlink()
    with pytest.raises(CorruptStateError, match=r"nodule_risk\.json: missing"):
        load_nodule_risk(d)


def test_load_frozen_encoder_reads_only_the_vision_weights(tmp_path: object) -> None:
    import hashlib
    from pathlib import Path

    from lungvl_model.models.config import LungVLConfig, VisionConfig
    from lungvl_model.models.vision import VisionEncoder
    from lungvl_model.training.nodule_risk import load_frozen_encoder

    d = Path(str(tmp_path))
    cfg = LungVLConfig(vision=VisionConfig(channels=(4, 4, 4, 4, 4), aggregation_channels=4, attention_scales=()))
    torch.manual_seed(0)
    enc = VisionEncoder(cfg.vision).eval()
    state = {f"vision.{k}": v for k, v in enc.state_dict().items()} | {"decoder.other": torch.zeros(3)}
    torch.save(state, d / "model.pt")
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    digest = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "meta.json").write_text(json.dumps({"stage": "ssl", "model_sha256": digest}))
    loaded, got_cfg, meta = load_frozen_encoder(d)
    x = torch.rand(1, 1, 32, 32, 32)
    assert torch.equal(loaded(x).scales[0], enc(x).scales[0])
    assert got_cfg.vision == cfg.vision and meta["stage"] == "ssl"
    assert not any(p.requires_grad for p in loaded.parameters())
    (d / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(CorruptStateError, match=r"model\.pt: sha256"):
        load_frozen_encoder(d)
    (d / "meta.json").write_text("{")
    with pytest.raises(CorruptStateError, match=r"meta\.json: damaged"):
        load_frozen_encoder(d)
    (d / "meta.json").write_text("{}")  # no hash recorded: the weights themselves fail to load
    with pytest.raises(CorruptStateError, match="no usable vision encoder"):
        load_frozen_encoder(d)


def test_score_findings_untrained_residual_head_reports_brock_and_its_noisy_or() -> None:
    from lungvl_model.models.nodule_risk import score_findings

    cfg = NoduleRiskConfig(feature_channels=2, feature_scales=2, hidden=8)
    head = NoduleRiskHead(cfg).eval()
    grid = GridMap(src_spacing=(2.5, 2.5, 2.5), dst_spacing=(5.0, 5.0, 5.0), start=(0.0, 0.0, 0.0))
    hu = np.full((8, 8, 8), -900.0)
    findings = [
        SimpleNamespace(longest_diameter_mm=12.0, mean_diameter_mm=10.0, type="solid", lobe="RUL", calcified=False,
                        juxtapleural=False, mask=np.ones((2, 2, 2), bool), offset=(2, 2, 2)),
        SimpleNamespace(longest_diameter_mm=5.0, mean_diameter_mm=4.0, type="non_solid", lobe="LLL", calcified=False,
                        juxtapleural=False, mask=np.ones((1, 1, 1), bool), offset=(6, 5, 1)),
    ]  # fmt: skip
    patient = {"age": 70, "age_assumed": False, "sex": "F", "sex_assumed": False}
    probs, study = score_findings(head, _maps(), grid, hu, (2.5, 2.5, 2.5), findings, patient=patient, emphysema=True)
    expected = [
        1 / (1 + math.exp(-brock_logit_of(inputs_from_finding(f, nodule_count=2, patient=patient, emphysema=True))))
        for f in findings
    ]
    assert probs == pytest.approx(expected, rel=1e-5)
    assert study == pytest.approx(1 - (1 - expected[0]) * (1 - expected[1]), rel=1e-5)
    assert score_findings(head, _maps(), grid, hu, (2.5, 2.5, 2.5), []) == ([], 0.0)


def test_correction_scale_shrinks_the_residual_by_hand() -> None:
    torch.manual_seed(0)
    cfg = NoduleRiskConfig(feature_channels=4, feature_scales=2, hidden=8, use_features=True, correction_scale=0.25)
    head = NoduleRiskHead(cfg).eval()
    last = head.mlp[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.bias.fill_(2.0)  # correction = 2 for every nodule
    logit = torch.tensor([-1.0, 0.5])
    out = head(torch.zeros(2, cfg.feature_dim), torch.zeros(2, BROCK_DIM), logit)
    assert out.correction.tolist() == [2.0, 2.0]
    assert out.logit.tolist() == [-0.5, 1.0]  # brock + 0.25 * 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"correction_scale": 1.5}, "correction_scale must be a number in \\[0, 1\\], got 1.5"),
        ({"correction_scale": -0.1}, "correction_scale"),
        ({"correction_scale": True}, "correction_scale"),
        ({"correction_scale": 0.5, "residual": False}, "residual head only"),
    ],
)
def test_invalid_correction_scale(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NoduleRiskConfig(**kwargs)  # type: ignore[arg-type]


def _brock_examples(n: int, seed: int, *, signal_in: str) -> list[NoduleExample]:
    """Nodules of 8 per study; malignancy follows the diameter (Brock) or feature 0 (``signal_in``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = rng.normal(size=2).astype(np.float32)
        d = float(rng.uniform(4.0, 30.0))
        x = NoduleInputs(d, d, "solid", False, 1, age=62.0, female=False)
        score = (d - 17.0) / 4.0 if signal_in == "brock" else 3.0 * float(f[0])
        mal = int(rng.random() < 1.0 / (1.0 + math.exp(-score)))
        out.append(NoduleExample(f"1.2.{i // 8}", "site", i % 8 + 1, mal, f, x, x))
    return out


_CV_CFG = NoduleRiskConfig(
    feature_channels=1, feature_scales=1, hidden=8, dropout=0.0, margin_shells_mm=(), use_features=True
)
_CV_TRAIN = RiskTrainConfig(epochs=150, lr=1e-2, weight_decay=0.0, inputs="measured", seed=0, cv_folds=4)


def test_correction_scale_kept_at_brock_when_the_features_are_noise() -> None:
    # an overfitting correction on noise features ranks held-out nodules worse than Brock alone
    scale, cv = choose_correction_scale(_brock_examples(160, 0, signal_in="brock"), _CV_CFG, _CV_TRAIN)
    assert cv["brock_auc"] > 0.8 and cv["auc"][0.0] == cv["brock_auc"]
    assert scale < 0.5 and cv["auc"][scale] >= cv["auc"][1.0]


def test_correction_scale_uses_the_correction_when_it_carries_the_signal() -> None:
    scale, cv = choose_correction_scale(_brock_examples(160, 1, signal_in="features"), _CV_CFG, _CV_TRAIN)
    assert cv["brock_auc"] < 0.65  # diameter says nothing here
    assert scale >= 0.5 and cv["auc"][scale] > 0.8
    assert study_folds(_brock_examples(16, 0, signal_in="brock"), 2, 0).tolist().count(0) == 8  # by study


def test_choose_correction_scale_rejects_bad_settings() -> None:
    ex = _brock_examples(40, 0, signal_in="brock")
    with pytest.raises(ValueError, match="residual head"):
        choose_correction_scale(
            ex, NoduleRiskConfig(feature_channels=1, feature_scales=1, hidden=8, residual=False), _CV_TRAIN
        )
    with pytest.raises(ValueError, match="cv_folds"):
        RiskTrainConfig(cv_folds=1)
