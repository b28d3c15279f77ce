"""The site trainer: local training (plain and DP-SGD), evaluation, budget, audit, and the site config."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from client import trainer as trainer_module
from client.config import STATE_DIRNAME, ClientConfig
from client.ledger import METRIC_WHITELIST
from client.trainer import (
    TRAIN_REPLY,
    SiteTrainer,
    payload_bytes,
    site_seed,
)
from federation.arrays import array_keys, model_to_arrays
from federation.protocol import RoundConfig
from lungvl_model.data.crops import ForegroundCrops
from lungvl_model.data.dataset import collate
from lungvl_model.data.preprocess import PreprocessConfig
from lungvl_model.data.site_layout import toml_dumps
from lungvl_model.data.split import training_patients, training_studies
from lungvl_model.data.synth import SynthConfig, generate_site
from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig
from lungvl_model.training.checkpoint import save_checkpoint
from lungvl_model.training.loop import run_steps
from lungvl_model.training.stages import build_model
from privacy.accountant import ACCOUNTANT_STATE_FILE, PrivacyBudgetExceeded
from privacy.dp_sgd import EmptyBatchSafe, PoissonCollate, dp_sgd_ready
from privacy.site_policy import SitePolicyRefusal

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LungVLConfig(
    preset="test",
    vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
    text=TextConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=32, n_positions=48, visual_scales=(2, 3)),
    heads=HeadsConfig(hidden=16),
    input=PreprocessConfig(spacing_mm=(8.0, 8.0, 8.0), size=(32, 32, 32)),
)
DP = {"dp_sgd": True, "dp_sgd_noise_multiplier": 4.0, "dp_sgd_max_grad_norm": 1.0}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-study synthetic site (matrix 64) and the consortium's initial model package for it."""
    root = tmp_path_factory.mktemp("client")
    site = root / "site"
    generate_site(SynthConfig(cohort="referral", n_studies=3, out_dir=site, seed=5, matrix=64, z_extent_mm=120.0))
    model = build_model(CFG, [site])
    return site, save_checkpoint(root / "package", model, {"stage": "init"})


def make_trainer(package: tuple[Path, Path], state: Path, **overrides) -> SiteTrainer:
    site, model_dir = package
    return SiteTrainer(
        ClientConfig.from_toml(site / "site.toml", model_dir=model_dir, state_dir=state, device="cpu", **overrides)
    )


def assert_whitelisted(metrics: dict) -> None:
    assert set(metrics) <= METRIC_WHITELIST, set(metrics) - METRIC_WHITELIST
    assert all(math.isfinite(v) for v in metrics.values()), metrics


# ------------------------------------------------------------------------------------------- config


def test_holdout_split_keeps_evaluation_patients_out_of_training(package, tmp_path: Path) -> None:
    every = make_trainer(package, tmp_path / "a")
    train, hold = every.split()
    assert train == hold and len(train) == 3  # no hold-out: evaluation scores the training studies
    split = make_trainer(package, tmp_path / "b", holdout_fraction=0.5)
    train, hold = split.split()
    assert train and hold and set(train).isdisjoint(hold) and len(train) + len(hold) == 3
    assert {e[1].study_uid for e in split.dataset("seg").entries} == set(train)
    assert {e[1].study_uid for e in split.dataset("seg", "holdout").entries} == set(hold)
    sized = training_studies(split._catalogue, 0.5, require_report=True)  # what a study sizes DP-SGD's q with
    assert len(sized) == len(split.dataset("vl")) and set(sized) <= set(train)
    with pytest.raises(ValueError, match="'test'"):
        split.dataset("seg", "test")


def test_config_from_site_toml(package, tmp_path: Path) -> None:
    site, model_dir = package
    cfg = ClientConfig.from_toml(site, model_dir=model_dir)
    assert cfg.name == "site" and cfg.cohort == "referral" and cfg.site_dir == site
    assert cfg.state_dir == site / STATE_DIRNAME and cfg.model_dir == model_dir
    assert cfg.epsilon_budget == 8.0 and cfg.delta == 1e-5 and cfg.device == "auto" and cfg.batch_size is None
    assert ClientConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    toml = {
        "site": {"name": "a", "cohort": "screening"},
        "privacy": {"epsilon_budget": 3.0, "delta": 1e-6},
        "compute": {"device": "cpu", "bf16": False},
        "training": {"batch_size": 4, "num_workers": 1, "model_dir": "pkg"},
        "synth": {"anything": 1},  # other tools' tables are not ours to check
    }
    (tmp_path / "site.toml").write_text(toml_dumps(toml))
    cfg = ClientConfig.from_toml(tmp_path / "site.toml", batch_size=2)
    assert (cfg.epsilon_budget, cfg.delta, cfg.device, cfg.bf16) == (3.0, 1e-6, "cpu", False)
    assert cfg.batch_size == 2 and cfg.num_workers == 1 and cfg.model_dir == tmp_path / "pkg"


@pytest.mark.parametrize(
    ("table", "key", "hint"),
    [
        ("privacy", "epsilon_budgt", "epsilon_budget"),
        ("compute", "gpu", None),
        ("training", "batchsize", "batch_size"),
        ("site", "nmae", "name"),
    ],
)
def test_unknown_site_toml_key(tmp_path: Path, table: str, key: str, hint: str | None) -> None:
    data: dict = {"site": {"name": "a"}, table: {key: 1}}
    if table == "site":
        data["site"][key] = "x"
    (tmp_path / "site.toml").write_text(toml_dumps(data))
    with pytest.raises(KeyError, match=rf"{key}.*\[{table}\]") as err:
        ClientConfig.from_toml(tmp_path)
    if hint:
        assert f"did you mean {hint!r}" in str(err.value)


def test_invalid_args(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(toml_dumps({"site": {"name": "a", "n_studies": 3}}))
    assert ClientConfig.from_toml(tmp_path).name == "a"  # free extras of [site] are kept out of the way
    with pytest.raises(KeyError, match="did you mean 'model_dir'"):
        ClientConfig.from_toml(tmp_path, modeldir="x")
    for kw, match in [
        ({"delta": 2.0}, "delta"),
        ({"epsilon_budget": 0.0}, "epsilon_budget"),
        ({"batch_size": 0}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"name": ""}, "name"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"holdout_fraction": -0.1}, "holdout_fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClientConfig.from_toml(tmp_path, **kw)
    (tmp_path / "site.toml").write_text(toml_dumps({"privacy": {"delta": 1e-5}}))
    with pytest.raises(KeyError, match="name"):
        ClientConfig.from_toml(tmp_path)


# ------------------------------------------------------------------------------------------- fit / evaluate


def test_fit_returns_a_deterministic_update(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state")
    w = model_to_arrays(trainer.model)
    rc = RoundConfig(server_round=3, stage="vl", local_steps=1, batch_size=2, seed=11)
    res = trainer.fit(w, rc)
    assert [d.shape for d in res.delta] == [a.shape for a in w] and len(res.delta) == len(array_keys(trainer.model))
    assert all(d.dtype == np.float32 and np.isfinite(d).all() for d in res.delta)
    assert sum(float(np.abs(d).sum()) for d in res.delta) > 0
    np.testing.assert_array_equal(model_to_arrays(trainer.model)[0], w[0] + res.delta[0])
    assert res.num_examples == 3 and res.metrics["num_examples"] == 3
    assert_whitelisted(res.metrics)
    assert {"train_loss", "train_report_loss", "update_norm", "seconds"} <= set(res.metrics)
    assert "epsilon" not in res.metrics
    again = trainer.fit(w, rc)  # same arrays, same round config: same update
    for a, b in zip(res.delta, again.delta, strict=True):
        np.testing.assert_array_equal(a, b)
    # the audit ledger gets the exact bytes' size and hash
    payload = payload_bytes(res.delta)
    assert payload == payload_bytes([d.copy() for d in res.delta])
    trainer.record_outbound(3, TRAIN_REPLY, payload, res.metrics)
    (entry,) = trainer.ledger.entries()
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest() and entry["size_bytes"] == len(payload)
    assert entry["epsilon"] is None and entry["dp"] == {}
    trainer.close()


def test_evaluate_reports_whitelisted_metrics(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state")
    n, metrics = trainer.evaluate(model_to_arrays(trainer.model), RoundConfig(stage="vl", batch_size=2), max_batches=1)
    assert n == 2 and metrics["num_examples"] == 2 and metrics["num_batches"] == 1
    assert_whitelisted(metrics)
    assert metrics["val_loss"] > 0 and 0.0 <= metrics["val_dice"] <= 1.0
    trainer.close()


def test_site_seed_mixes_round_seed_and_site() -> None:
    assert site_seed(1, 2, "a") == site_seed(1, 2, "a")
    assert len({site_seed(1, 2, "a"), site_seed(1, 2, "b"), site_seed(2, 2, "a"), site_seed(1, 3, "a")}) == 4


def split_reports(trainer: SiteTrainer, part: int) -> list[str]:
    """The report texts of the studies of ``split()[part]`` (0: training, 1: hold-out), read from the catalogue."""
    studies = trainer._catalogue.studies
    return [studies[uid].report.text for uid in trainer.split()[part] if studies[uid].report is not None]


def test_text_stage_trains_the_decoder_alone_and_keeps_its_coherence_head(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state", holdout_fraction=0.3)  # 2 training patients, 1 held out
    reports = split_reports(trainer, 0)
    assert len(reports) == 2 and len(trainer.split()[1]) == 1
    w = model_to_arrays(trainer.model)
    rng = torch.get_rng_state()
    rc = RoundConfig(server_round=1, stage="text", local_steps=2, batch_size=2, lr=1e-3, seed=2)
    res = trainer.fit(w, rc)
    assert torch.equal(torch.get_rng_state(), rng)  # the warm-up forks the global RNG
    assert res.num_examples == len(reports) == res.metrics["num_examples"]
    assert_whitelisted(res.metrics)
    assert {"train_loss", "train_report_loss", "update_norm", "seconds", "local_steps"} <= set(res.metrics)
    assert res.metrics["train_report_loss"] > 0 and res.metrics["train_loss"] >= res.metrics["train_report_loss"]
    moved = set()
    for key, d in zip(array_keys(trainer.model), res.delta, strict=True):
        assert d.dtype == np.float32 and np.isfinite(d).all()
        if not key.startswith("decoder."):
            assert not d.any(), f"{key} is not a decoder array but changed in stage text"
        elif d.any():
            moved.add(key)
    assert any(".wte." in k for k in moved), sorted(moved)  # the decoder did train
    head = trainer._coherence
    assert head is not None
    trained = [p.detach().clone() for p in head.parameters()]
    again = trainer.fit(w, RoundConfig(server_round=2, stage="text", local_steps=1, batch_size=2, lr=1e-3))
    assert trainer._coherence is head  # one site-local head across rounds, trained further
    assert any(not torch.equal(a, b) for a, b in zip(trained, head.parameters(), strict=True))
    assert again.num_examples == 2 and len(again.delta) == len(w)
    assert not any("coherence" in k for k in array_keys(trainer.model))  # the head never leaves the site
    trainer.close()


def test_text_stage_refusals(package, tmp_path: Path) -> None:
    w = model_to_arrays(make_trainer(package, tmp_path / "w").model)
    rc = RoundConfig(stage="text", local_steps=1)
    thin = make_trainer(package, tmp_path / "thin", holdout_fraction=0.5)  # one training patient: one report
    shifted = [a + 1.0 for a in w]
    with pytest.raises(ValueError, match=r"site 'site' has 1 non-empty report\(s\) in its training split"):
        thin.fit(shifted, rc)
    for a, b in zip(w, model_to_arrays(thin.model), strict=True):
        np.testing.assert_array_equal(a, b)  # the arrays were not even loaded
    thin.close()
    strict = make_trainer(package, tmp_path / "strict", require_dp_sgd=True)  # text has no DP-SGD path
    with pytest.raises(SitePolicyRefusal, match="require_dp_sgd"):
        strict.fit(w, rc)
    strict.close()
    with pytest.raises(ValueError, match="DP-SGD"):
        RoundConfig(stage="text", **DP)


def test_text_stage_evaluate_scores_the_held_out_reports(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state", holdout_fraction=0.3, min_eval_studies=1)
    held_out = split_reports(trainer, 1)
    assert len(held_out) == 1
    n, metrics = trainer.evaluate(model_to_arrays(trainer.model), RoundConfig(stage="text", batch_size=2))
    assert n == len(held_out) == metrics["num_examples"] and metrics["num_batches"] == 1
    assert_whitelisted(metrics)
    assert metrics["val_loss"] > 0
    vocab = len(trainer.model.tokenizer)
    assert metrics["val_loss"] < 2 * math.log(vocab)  # a per-token NLL, not a sum
    with pytest.raises(SitePolicyRefusal, match="min_eval_studies"):  # one report is too thin for the default 5
        make_trainer(package, tmp_path / "thin", holdout_fraction=0.3).evaluate(
            model_to_arrays(trainer.model), RoundConfig(stage="text")
        )
    everyone = make_trainer(package, tmp_path / "all")  # no hold-out: scores the training reports
    n, metrics = everyone.evaluate(model_to_arrays(everyone.model), RoundConfig(stage="text", batch_size=2))
    assert n == 3 and metrics["num_batches"] == 2 and math.isfinite(metrics["val_loss"])
    with pytest.raises(ValueError, match="'nope'"):
        everyone.dataset("nope")
    trainer.close()
    everyone.close()


def seen_images(model: torch.nn.Module, seen: list[tuple[int, ...]]) -> torch.utils.hooks.RemovableHandle:
    """Record the ``image`` shape of every forward of ``model`` (a forward pre-hook; remove it after)."""

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        batch = args[0] if args else kwargs["batch"]
        seen.append(tuple(batch["image"].shape))

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_seg_stage_trains_on_foreground_patches(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state")
    w = model_to_arrays(trainer.model)
    seen: list[tuple[int, ...]] = []
    handle = seen_images(trainer.model, seen)
    try:
        res = trainer.fit(w, RoundConfig(stage="seg", local_steps=2, batch_size=2, seg_patch=16, seg_fg_prob=1.0))
        assert seen == [(2, 1, 16, 16, 16)] * 2  # two steps on (B, 1, p, p, p) patches
        assert res.num_examples == 3 and "train_seg_loss" in res.metrics and res.metrics["update_norm"] > 0
        assert_whitelisted(res.metrics)
        seen.clear()
        trainer.fit(w, RoundConfig(stage="seg", local_steps=1, batch_size=2))  # seg_patch = 0: whole volumes
        assert seen == [(2, 1, 32, 32, 32)]
    finally:
        handle.remove()
    before = model_to_arrays(trainer.model)
    with pytest.raises(ValueError, match=r"seg_patch = 48 .*input size \(32, 32, 32\)"):
        trainer.fit([a + 1.0 for a in w], RoundConfig(stage="seg", local_steps=1, seg_patch=48))
    for a, b in zip(before, model_to_arrays(trainer.model), strict=True):
        np.testing.assert_array_equal(a, b)  # refused before the arrays were loaded
    trainer.close()


def test_dp_sgd_seg_trains_on_patches_with_the_patient_groups(package, tmp_path: Path, monkeypatch) -> None:
    trainer = make_trainer(package, tmp_path / "state")
    calls: list[dict] = []
    real = trainer_module.dp_sgd_steps

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(trainer_module, "dp_sgd_steps", spy)
    rc = RoundConfig(stage="seg", local_steps=1, batch_size=2, seg_patch=16, seg_fg_prob=0.5, seed=3, **DP)
    res = trainer.fit(model_to_arrays(trainer.model), rc)
    ((kw,),) = [calls]
    crops = kw["dataset"]
    assert isinstance(crops, ForegroundCrops) and crops.size == (16, 16, 16) and crops.fg_prob == 0.5
    assert crops.base is trainer.dataset("seg") and kw["patients"] == trainer.patient_groups(trainer.dataset("seg"))
    assert crops[0]["image"].shape == (1, 16, 16, 16)
    assert res.metrics["dp_steps"] == 1 and res.metrics["epsilon"] > 0 and all(np.isfinite(d).all() for d in res.delta)
    assert_clean(trainer)
    trainer.close()


# ------------------------------------------------------------------------------------------- DP-SGD


def assert_clean(trainer: SiteTrainer) -> None:
    """Opacus leaves nothing behind: flags restored, no per-sample attributes, no hooks."""
    model = trainer.model
    assert all(p.requires_grad for p in model.parameters())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    # stale activations of modules that ran forward without a backward would resize the next stage's
    # per-sample gradients (vl after seg: "stack expects each tensor to be equal size")
    assert not any(hasattr(m, "activations") or hasattr(m, "max_batch_len") for m in model.modules())
    hooks = [
        h
        for m in model.modules()
        for d in (m._forward_hooks, m._backward_hooks, m._forward_pre_hooks, m._backward_pre_hooks)
        for h in d.values()
    ]  # transformers adds its own output-recording hooks; none may be Opacus' or ours
    owners = {getattr(getattr(h, "func", h), "__module__", "") for h in hooks}
    assert not any(o.startswith(("opacus", "client")) for o in owners), owners
    assert model.config.loss.contrastive == CFG.loss.contrastive


@pytest.mark.parametrize(("stage", "clipping"), [("seg", "hooks"), ("vl", "hooks"), ("vl", "microbatch")])
def test_dp_sgd_fit_spends_epsilon_that_survives_a_restart(package, tmp_path: Path, stage: str, clipping: str) -> None:
    state = tmp_path / "state"
    trainer = make_trainer(package, state, dp_sgd_clipping=clipping)
    w = model_to_arrays(trainer.model)
    rc = RoundConfig(stage=stage, local_steps=1, batch_size=2, **DP)
    res = trainer.fit(w, rc)
    assert all(np.isfinite(d).all() for d in res.delta) and res.metrics["update_norm"] > 0
    assert_whitelisted(res.metrics)
    m = res.metrics
    assert m["epsilon"] > 0 and m["dp_steps"] == 1 and m["sample_rate"] == pytest.approx(2 / 3)
    assert m["dp_sgd_noise_multiplier"] == 4.0 and m["delta"] == 1e-5
    assert "train_loss" not in m  # training losses are not privatised: they stay at the site
    frozen = {n for n, _ in trainer.model.named_parameters()} - trainer._dp_params[
        stage if clipping == "hooks" else f"{stage}/microbatch"
    ]
    # read through .weight: no per-study gradient from Opacus' hooks; exact per study in a microbatch of one
    assert ("heads.decompose.weight" in frozen) == (clipping == "hooks")
    if stage == "vl":  # GPT-2's positions get per-study ids under DP-SGD, so they still train
        assert "decoder.lm.transformer.wpe.weight" not in frozen and "image_proj.weight" in frozen  # no InfoNCE
    for key, d in zip(array_keys(trainer.model), res.delta, strict=True):
        if key in frozen:
            assert not d.any(), f"{key} is frozen under DP-SGD but changed"
    assert_clean(trainer)
    saved = json.loads((state / ACCOUNTANT_STATE_FILE).read_text())
    assert saved["history"] == [[4.0, pytest.approx(2 / 3), 1]]
    trainer.record_outbound(1, TRAIN_REPLY, payload_bytes(res.delta), res.metrics)
    entry = trainer.ledger.entries()[-1]
    assert entry["epsilon"] == pytest.approx(m["epsilon"]) and entry["dp"]["dp_steps"] == 1
    trainer.close()
    if stage != "seg":
        return
    restarted = make_trainer(package, state)  # a restarted client sees what was spent
    assert restarted.epsilon_spent == pytest.approx(m["epsilon"])
    restarted.close()
    tight = make_trainer(package, state, epsilon_budget=m["epsilon"] * 1.01)
    before = model_to_arrays(tight.model)
    shifted = [a + 1.0 for a in w]
    with pytest.raises(PrivacyBudgetExceeded, match="site: privacy budget exceeded"):
        tight.fit(shifted, rc)  # whatever the server asks
    for a, b in zip(before, model_to_arrays(tight.model), strict=True):
        np.testing.assert_array_equal(a, b)  # the arrays were not even loaded
    assert tight.epsilon_spent == pytest.approx(m["epsilon"])
    tight.close()


def test_dp_sgd_samples_patients_and_charges_the_patient_rate(package, tmp_path: Path) -> None:
    """Two patients with a prior and a current CT each: q is per patient (1/2), not per study (1/4)."""
    site = tmp_path / "priors"
    generate_site(
        SynthConfig(
            cohort="screening", n_studies=2, out_dir=site, seed=7, matrix=64, z_extent_mm=120.0, prior_fraction=1.0
        )
    )
    trainer = SiteTrainer(
        ClientConfig.from_toml(site / "site.toml", model_dir=package[1], state_dir=tmp_path / "state", device="cpu")
    )
    ds = trainer.dataset("seg")
    groups = trainer.patient_groups(ds)
    assert len(ds) == 4 and sorted(map(len, groups)) == [2, 2]
    patient = {e.study_uid: e.series.header.get("PatientID") for _, e in ds.entries}
    assert all(len({patient[ds.entries[i][1].study_uid] for i in g}) == 1 for g in groups)
    assert training_patients(trainer._catalogue, 0.0) == 2  # what a study sizes DP-SGD's q with
    res = trainer.fit(model_to_arrays(trainer.model), RoundConfig(stage="seg", local_steps=1, batch_size=1, **DP))
    assert res.metrics["sample_rate"] == 0.5 and res.metrics["dp_steps"] == 1
    saved = json.loads((tmp_path / "state" / ACCOUNTANT_STATE_FILE).read_text())
    assert saved["history"] == [[4.0, 0.5, 1]]  # the accountant is charged the patient-level q
    trainer.close()


def test_rounds_start_clean_after_dp_sgd_in_every_stage(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state", epsilon_budget=1e6, batch_size=1)  # empty batches likely
    w = model_to_arrays(trainer.model)
    for stage in ("ssl", "seg", "vl"):  # one model through the stages: nothing of a stage leaks into the next
        res = trainer.fit(w, RoundConfig(stage=stage, local_steps=3, **DP))
        assert res.metrics["dp_steps"] == 3 and all(np.isfinite(d).all() for d in res.delta)
        assert_clean(trainer)
    assert trainer.budget.accountant.steps == 9
    plain = RoundConfig(stage="vl", local_steps=1, seed=4)
    after_dp = trainer.fit(w, plain)
    fresh = make_trainer(package, tmp_path / "fresh", batch_size=1).fit(w, plain)
    for a, b in zip(after_dp.delta, fresh.delta, strict=True):
        np.testing.assert_array_equal(a, b)
    trainer.close()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_are_per_study_and_clipped(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state")
    model, ds = trainer.model, trainer.dataset("seg")
    batch = collate([ds[i] for i in range(3)])
    assert bool(batch["has_mask"].all())  # the seg loss is then a plain mean of per-study losses
    clip = 1e-3
    with dp_sgd_ready(model):
        for name, p in model.named_parameters():  # the segmentation head (GroupNorm included): cheap backward
            p.requires_grad_(name.startswith("seg_head."))
        params = [p for p in model.parameters() if p.requires_grad]
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=3
        )
        gsm(batch, stage="seg").loss.backward()
        assert all(p.grad_sample.shape == (3, *p.shape) for p in params)
        samples = [p.grad_sample.detach().clone() for p in params]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples], 1).norm(dim=1)  # (3,)
        assert bool((norms > clip).any())  # clipping is active for at least one study
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        clipped = norms * factors
        assert bool((clipped <= clip + 1e-6).all())
        opt.clip_and_accumulate()
        summed = torch.cat([p.summed_grad.flatten() for p in params])
        expected = torch.cat([torch.einsum("i,i...->...", factors, g).flatten() for g in samples])
        torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-9)
        assert float(summed.norm()) <= 3 * clip + 1e-6
        gsm.to_standard_module()
        # a study's per-sample gradient is the gradient of that study alone (the one with the largest)
        i = int(norms.argmax())
        model.zero_grad(set_to_none=True)
        model(collate([ds[i]]), stage="seg").loss.backward()
        for p, g in zip(params, samples, strict=True):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-2, atol=2e-3 * float(p.grad.abs().max()) + 1e-8)
    trainer.close()


def test_empty_poisson_batch_is_a_noise_only_step(package, tmp_path: Path) -> None:
    trainer = make_trainer(package, tmp_path / "state")
    model, ds = trainer.model, trainer.dataset("seg")
    empty = PoissonCollate(collate([ds[0]]))([])
    assert empty["image"].shape == (0, 1, 32, 32, 32) and empty["text"] == []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("seg_head."))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)
    result = run_steps(
        EmptyBatchSafe(gsm, params), iter([empty]), opt, stage="seg", steps=1, device=torch.device("cpu")
    )
    gsm.to_standard_module()
    assert result.history[0]["loss"] == 0.0 and result.examples == 0
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))  # noise moved them
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    trainer.close()
