"""Stages chain through checkpoints; explain and evaluate run end to end on a small synthetic site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungvl_model.clinical.lung_rads import MAX_LESION_MM
from lungvl_model.data.catalogue import build_catalogue
from lungvl_model.data.crops import ForegroundCrops
from lungvl_model.data.dataset import SiteDataset
from lungvl_model.data.dicom_io import read_series
from lungvl_model.data.preprocess import PreprocessConfig
from lungvl_model.data.synth import SynthConfig, generate_site
from lungvl_model.evaluation.evaluate import evaluate
from lungvl_model.inference.densitometry import emphysema_sentence
from lungvl_model.inference.explain import explain_study
from lungvl_model.inference.render import write_explanation
from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig
from lungvl_model.training.checkpoint import load_checkpoint
from lungvl_model.training.config import TrainConfig
from lungvl_model.training.peer import train_dynunet
from lungvl_model.training.stages import run_stage, seg_crops

CFG = LungVLConfig(
    preset="test",
    vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
    text=TextConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, n_positions=48, visual_scales=(2, 3)),
    heads=HeadsConfig(hidden=16),
    input=PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), size=(32, 32, 32)),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipe")
    site = root / "site"
    generate_site(
        SynthConfig(
            cohort="referral", n_studies=3, out_dir=site, seed=5, matrix=64, z_extent_mm=120.0, prior_fraction=1.0
        )
    )
    prev = None
    for stage in ("text", "ssl", "seg", "vl"):
        run = run_stage(
            [site],
            root / stage,
            TrainConfig(stage=stage, max_steps=2, batch_size=2, device="cpu", seg_crop=(16, 16, 16)),
            config=CFG if prev is None else None,
            init=prev,
            log=lambda m: None,
        )
        prev = run.checkpoint
    return site, prev


def test_stage_checkpoints_chain(trained, tmp_path: Path) -> None:
    site, ckpt = trained
    model, meta = load_checkpoint(ckpt)
    assert meta["history_stages"] == ["text", "ssl", "seg", "vl"]
    assert model.config == CFG
    for stage in ("ssl", "seg", "vl"):
        out = ckpt.parent.parent / stage
        assert (out / "metrics.json").exists() and (out / "loss_curve.png").exists()
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["train"]["stage"] == stage and cfg["model"]["preset"] == "test"
    assert json.loads((ckpt.parent.parent / "seg" / "config.json").read_text())["train"]["seg_crop"] == [16, 16, 16]


def test_seg_crops_feed_both_the_model_and_the_dynunet_anchor(trained, tmp_path: Path) -> None:
    site, _ = trained
    train = TrainConfig(stage="seg", max_steps=2, batch_size=2, device="cpu", seg_crop=(16, 16, 16), seg_fg_prob=1.0)
    data = SiteDataset([site], CFG.input)
    crops = seg_crops(data, train)
    assert isinstance(crops, ForegroundCrops) and crops[0]["image"].shape == (1, 16, 16, 16)
    assert seg_crops(data, TrainConfig(stage="vl", seg_crop=(16, 16, 16))) is data  # only the seg stage crops
    # DynUNet's InstanceNorm needs > 1 voxel at its 1/16 bottleneck: 32³ crops (here the whole grid)
    result = train_dynunet([site], tmp_path / "dyn", CFG, TrainConfig(**{**train.to_dict(), "seg_crop": (32, 32, 32)}))
    assert result.steps == 2 and (tmp_path / "dyn" / "peer.pt").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"seg_crop": (16, 20, 16)}, "multiples of 16"), ({"seg_fg_prob": 1.2}, "1.2")]
)
def test_invalid_train_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(stage="seg", **kwargs)


def test_explain_writes_every_output(trained, tmp_path: Path) -> None:
    site, ckpt = trained
    model, _ = load_checkpoint(ckpt)
    cat = build_catalogue(site)
    entry = next(e for e in cat.usable if e.nodule_labels and e.prior_study_uid)
    vol = read_series(entry.series.files)
    prior = read_series(cat.studies[entry.prior_study_uid].series.files)
    # a low triage threshold so that the untrained model proposes candidates to measure
    exp = explain_study(model, vol, prior=prior, ask="what about nodule 1?", prob_threshold=0.0, max_new_tokens=12)
    paths = write_explanation(exp, vol, tmp_path / "ex")
    rep = json.loads((tmp_path / "ex" / "report.json").read_text())
    for key in ("findings", "sentences", "model", "lung_rads_rule_engine", "defer_to_radiologist", "answer", "flags"):
        assert key in rep
    assert rep["schema_version"] == 2 and rep["software_version"] and "provenance" in rep
    assert rep["fact_check"] is not None and rep["deferral_signals"] is not None
    assert rep["model"]["lung_rads"] in ("1", "2", "3", "4A", "4B", "4X")
    assert 0.0 <= rep["model"]["malignancy_probability"] <= 1.0
    assert (tmp_path / "ex" / "report.md").read_text().startswith("# lungvl explanation")
    assert rep["findings"], "with threshold 0 the triage must propose at least one candidate"
    f = rep["findings"][0]
    assert f["mean_diameter_mm"] > 0 and f["type"] in ("solid", "part_solid", "non_solid")
    if f["mean_diameter_mm"] <= MAX_LESION_MM:
        assert f["lung_rads"] and f["context"] in ("new", "growing", "stable")  # compared with the prior
    else:  # at threshold 0 the untrained model may call the whole lung a candidate: no category, and it says why
        assert not f["lung_rads"] and any("at most 300" in n for n in f["notes"]), f["notes"]
    assert any(p.name == "nodule_1.png" for p in paths)
    assert rep["answer"]["nodule"] == 1 and "Nodule 1" in rep["answer"]["measured"]
    # the emphysema sentence is the measurement's, the last of FINDINGS, and the fact check reads it as supported
    measured = [s for s in rep["sentences"] if s["decoding"] == "measured"]
    assert [s["text"] for s in measured] == [emphysema_sentence(rep["emphysema_index_laa950"])]
    assert (
        measured[0]["section"] == "findings"
        and measured[0] is [s for s in rep["sentences"] if s["section"] == "findings"][-1]
    )
    assert measured[0]["text"] in exp.text.split("IMPRESSION:")[0]
    k = rep["sentences"].index(measured[0])
    assert [v["verdict"] for v in rep["fact_check"]["verdicts"] if v["sentence"] == k] == ["supported"]


def test_evaluate_end_to_end(trained) -> None:
    site, ckpt = trained
    model, _ = load_checkpoint(ckpt)
    # the plumbing only: the same site serves as validation and test here (the CLI refuses that)
    res = evaluate(model, [site], validation_dirs=[site])
    o = res["overall"]
    assert res["calibration"]["validation_studies"] > 0
    assert res["calibration_state"].deferral_policy is not None
    for key in ("froc", "facts", "risk_coverage", "auc_nodule_malignancy"):
        assert key in o, key
    assert len(o["froc"]["sensitivity"]) == 7 and 0.0 <= o["froc"]["cpm"] <= 1.0
    assert 0.0 <= o["risk_coverage"]["deferral_rate"] <= 0.3 + 1e-9
    assert o["n_studies"] == len(build_catalogue(site).usable)
    for key in (
        "dice",
        "detection",
        "auc_model_malignancy",
        "auc_brock_true",
        "accuracy_lung_rads_model",
        "accuracy_lung_rads_rule",
        "bleu4",
        "rouge_l",
        "concept_f1",
        "lung_rads_confusion",
        "deferral",
    ):
        assert key in o
    assert 0.0 <= o["bleu4"] <= 1.0 and 0.0 <= o["rouge_l"] <= 1.0
    assert sum(map(sum, o["lung_rads_confusion"])) == o["n_studies"]
    assert "referral" in res["by_cohort"]
    # the concept table sums the per-study counts concept_f1 is computed from
    per_study = [st["concepts"] for st in res["studies"]]
    for k, c in o["concepts"].items():
        assert (c["hits"], c["predicted"], c["gold"]) == tuple(sum(p[k][i] for p in per_study) for i in range(3))
        assert c["hits"] <= c["predicted"] <= c["gold"]
    assert o["concepts"]["nodule_present"]["gold"] == o["n_studies"]  # every synthetic report says it
    from lungvl.cmd_evaluate import results_markdown

    md = results_markdown(res, None)
    assert "## Clinical concepts of the generated text" in md and "| emphysema |" in md


def test_coronal_overlay_puts_the_head_at_the_top() -> None:
    import numpy as np

    from lungvl_model.data.volume import CTVolume
    from lungvl_model.inference.render import coronal_origin

    hu = np.zeros((4, 4, 4), np.float32)
    assert coronal_origin(CTVolume(hu, (2.0, 1.0, 1.0))) == "lower"  # z towards the head: row 0 is the feet
    feet_last = np.diag([1.0, 1.0, -1.0])  # the slice axis (third column) points to the feet
    assert coronal_origin(CTVolume(hu, (2.0, 1.0, 1.0), direction=feet_last)) == "upper"
