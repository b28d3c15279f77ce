"""The site's own policy (site.toml [privacy]): refusals whatever the server asks, metered evaluation on
hold-out patients only, and an accountant state reconciled with the audit ledger at start-up."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from typer.testing import CliRunner

import client.app as client_app
from client.app import SiteEndpoint
from client.config import ClientConfig
from client.deploy import SiteDeployConfig, SiteNotReady, preflight
from client.ledger import LEDGER_FILENAME, AuditLedger
from client.trainer import TRAIN_REPLY, SiteTrainer, payload_bytes
from federation.arrays import model_to_arrays
from federation.protocol import ARRAYS, CONFIG, METRICS, RoundConfig
from federation.records import arrays_to_record
from lungvl.cli import app as cli
from lungvl_model.data.site_layout import toml_dumps
from lungvl_model.data.synth import SynthConfig, generate_site
from lungvl_model.training.checkpoint import save_checkpoint
from lungvl_model.training.stages import build_model
from privacy.accountant import ACCOUNTANT_STATE_FILE, PrivacyAccountant
from privacy.budget import AccountantStateMismatch
from privacy.site_policy import SitePolicy, SitePolicyRefusal, check_evaluate, withhold_thin_metrics
from tests.client.test_deploy import write_site
from tests.client.test_trainer import CFG, DP

pytestmark = pytest.mark.usefixtures("one_thread")

SEG = RoundConfig(stage="seg", local_steps=1, batch_size=2)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic site of 7 usable studies of 6 patients (hold-out 0.5: 4 studies) and a model package."""
    root = tmp_path_factory.mktemp("policy")
    site = root / "site"
    generate_site(SynthConfig(cohort="referral", n_studies=6, out_dir=site, seed=5, matrix=64, z_extent_mm=120.0))
    return site, save_checkpoint(root / "package", build_model(CFG, [site]), {"stage": "init"})


def make_trainer(package: tuple[Path, Path], state: Path, **overrides) -> SiteTrainer:
    site, model_dir = package
    return SiteTrainer(
        ClientConfig.from_toml(site / "site.toml", model_dir=model_dir, state_dir=state, device="cpu", **overrides)
    )


def serve(monkeypatch: pytest.MonkeyPatch, trainer: SiteTrainer) -> SiteEndpoint:
    """An endpoint whose ClientApp handlers use ``trainer``."""
    endpoint = SiteEndpoint(trainer.config.site_dir, state_dir=trainer.config.state_dir)
    monkeypatch.setitem(client_app._TRAINERS, endpoint, trainer)
    return endpoint


def request(kind: str, rc: RoundConfig, arrays: list[np.ndarray]) -> Message:
    content = RecordDict({ARRAYS: arrays_to_record(arrays), CONFIG: ConfigRecord(dict(rc.to_record()))})
    return Message(content, 7, kind)


def assert_unchanged(before: list[np.ndarray], trainer: SiteTrainer) -> None:
    for a, b in zip(before, model_to_arrays(trainer.model), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------- train


def test_required_dp_sgd_refuses_a_plain_train_request(package, tmp_path: Path, monkeypatch, task_identity) -> None:
    state = tmp_path / "state"
    trainer = make_trainer(package, state, require_dp_sgd=True)
    endpoint = serve(monkeypatch, trainer)
    before = model_to_arrays(trainer.model)
    shifted = [a + 1.0 for a in before]
    plain = RoundConfig(server_round=2, local_steps=1)
    reply = client_app.handle_train(request(MessageType.TRAIN, plain, shifted), endpoint)
    reason = str(reply.error.reason)
    assert reply.has_error() and reason.startswith("site refused: ")
    assert "[privacy] require_dp_sgd = true" in reason and "without DP-SGD" in reason
    (entry,) = trainer.ledger.entries()  # the refusal left the site: it is in the audit ledger
    assert (entry["kind"], entry["round"], entry["run_id"]) == ("error_reply", 2, "1")
    assert entry["sha256"] == hashlib.sha256(reason.encode()).hexdigest()
    assert_unchanged(before, trainer)  # nothing trained, not even the arrays loaded
    assert trainer.budget.accountant.steps == 0 and not (state / ACCOUNTANT_STATE_FILE).exists()
    trainer.check_train_policy(RoundConfig(**DP))  # a DP-SGD request passes the policy
    trainer.close()


def test_noise_floor_step_cap_and_round_cap(package, tmp_path: Path) -> None:
    state = tmp_path / "state"
    policy = {"min_dp_sgd_noise_multiplier": 2.0, "max_steps_per_round": 2, "max_rounds": 1}
    trainer = make_trainer(package, state, **policy)
    w = model_to_arrays(trainer.model)
    low = RoundConfig(stage="seg", local_steps=1, dp_sgd=True, dp_sgd_noise_multiplier=1.0)
    with pytest.raises(SitePolicyRefusal, match=r"\[privacy\] min_dp_sgd_noise_multiplier = 2: .*σ = 1") as err:
        trainer.fit([a + 1.0 for a in w], low)
    assert (err.value.rule, err.value.requested, err.value.limit) == ("min_dp_sgd_noise_multiplier", 1.0, 2.0)
    with pytest.raises(SitePolicyRefusal, match=r"max_steps_per_round = 2: .*local_steps = 3"):
        trainer.fit(w, RoundConfig(stage="seg", local_steps=3))
    assert trainer.budget.accountant.steps == 0
    assert_unchanged(w, trainer)
    res = trainer.fit(w, SEG)  # round 1: within the policy, trained and answered
    trainer.record_outbound(1, TRAIN_REPLY, payload_bytes(res.delta), res.metrics)
    with pytest.raises(SitePolicyRefusal, match="local_steps = 2, on top of 1 already trained in this round"):
        trainer.fit(w, RoundConfig(stage="seg", local_steps=2))  # a second request may not pass the round's cap
    round2 = RoundConfig(server_round=2, stage="seg", local_steps=1)
    with pytest.raises(SitePolicyRefusal, match=r"max_rounds = 1: the site has trained in 1 server round"):
        trainer.fit(w, round2)
    trainer.close()
    restarted = make_trainer(package, state, **policy)  # the count lives in the state dir's ledger
    with pytest.raises(SitePolicyRefusal, match="max_rounds = 1"):
        restarted.fit(w, round2)
    restarted.run_id = "another run"  # a new server run's round 1 is one more round too
    with pytest.raises(SitePolicyRefusal, match="max_rounds = 1"):
        restarted.fit(w, SEG)
    restarted.close()


# ------------------------------------------------------------------------------------------- evaluate


def test_evaluation_on_training_studies_is_refused_under_dp_sgd(
    package, tmp_path: Path, monkeypatch, task_identity, caplog
) -> None:
    trainer = make_trainer(package, tmp_path / "a")  # holdout_fraction 0: every study is a training study
    w = model_to_arrays(trainer.model)
    with pytest.raises(SitePolicyRefusal, match=r"\[training\] holdout_fraction = 0: .*asked for in this round"):
        trainer.evaluate(w, RoundConfig(stage="seg", **DP))
    with caplog.at_level(logging.WARNING, logger="client.trainer"):  # no DP anywhere: allowed, and said so
        n, metrics = trainer.evaluate(w, SEG, max_batches=1)
    assert n == 2 and "val_loss" in metrics and "evaluates on its training studies" in caplog.text
    trainer.budget.record(noise_multiplier=4.0, sample_rate=0.5, steps=1)  # once ε is spent, never again
    with pytest.raises(SitePolicyRefusal, match=r"holdout_fraction = 0: .*already spent"):
        trainer.evaluate(w, SEG)
    trainer.close()
    required = make_trainer(package, tmp_path / "b", require_dp_sgd=True)
    before = model_to_arrays(required.model)
    reply = client_app.handle_evaluate(
        request(MessageType.EVALUATE, SEG, [a + 1.0 for a in before]), serve(monkeypatch, required)
    )
    reason = str(reply.error.reason)
    assert reply.has_error() and reason.startswith("site refused: ") and "required by the site's policy" in reason
    assert [e["kind"] for e in required.ledger.entries()] == ["error_reply"]
    assert_unchanged(before, required)
    required.close()


def test_a_hold_out_smaller_than_min_eval_studies_is_refused(package, tmp_path: Path) -> None:
    small = make_trainer(package, tmp_path / "a", holdout_fraction=0.5)  # min_eval_studies defaults to 5
    w = model_to_arrays(small.model)
    held = len(small.dataset("seg", "holdout"))
    assert 1 < held < 5
    with pytest.raises(SitePolicyRefusal, match=rf"min_eval_studies = 5: the site's hold-out has {held} usable"):
        small.evaluate(w, SEG)
    small.close()
    ok = make_trainer(package, tmp_path / "b", holdout_fraction=0.5, min_eval_studies=held)
    n, metrics = ok.evaluate(w, SEG)  # hold-out patients only
    assert n == held and metrics["num_examples"] == held and "val_loss" in metrics
    with pytest.raises(SitePolicyRefusal, match=r"min_eval_studies = \d+: only 1 hold-out studies were scored"):
        ok.evaluate(w, RoundConfig(stage="seg", batch_size=1), max_batches=1)  # a local cut counts too
    ok.close()


def test_metrics_on_too_few_studies_are_withheld() -> None:
    metrics = {"num_examples": 9, "val_loss": 0.5, "val_auc": 0.7, "val_auc_thin": 1.0, "val_sensitivity": 0.5}
    support = {"val_loss": 9, "val_auc": 9, "val_auc_thin": 2, "val_sensitivity": 4}
    kept, withheld = withhold_thin_metrics(metrics, support, 5)
    assert kept == {"num_examples": 9, "val_loss": 0.5, "val_auc": 0.7}
    assert withheld == ["val_auc_thin", "val_sensitivity"]
    with pytest.raises(SitePolicyRefusal, match="max_evaluations_per_round = 0"):
        check_evaluate(SitePolicy(max_evaluations_per_round=0), answered_this_round=0, holdout=True, holdout_studies=9)


def test_one_evaluation_per_round_even_after_a_restart(package, tmp_path: Path, monkeypatch, task_identity) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    state = tmp_path / "state"
    trainer = make_trainer(package, state, holdout_fraction=0.5, min_eval_studies=1)
    endpoint = serve(monkeypatch, trainer)
    w = model_to_arrays(trainer.model)
    round2 = RoundConfig(server_round=2, stage="seg", batch_size=2)
    first = client_app.handle_evaluate(request(MessageType.EVALUATE, SEG, w), endpoint)
    assert not first.has_error() and "val_loss" in first.content.metric_records[METRICS]
    second = client_app.handle_evaluate(request(MessageType.EVALUATE, SEG, w), endpoint)
    reason = str(second.error.reason)
    assert reason.startswith("site refused: ") and "max_evaluations_per_round = 1" in reason
    assert not client_app.handle_evaluate(request(MessageType.EVALUATE, round2, w), endpoint).has_error()
    trainer.close()
    restarted = make_trainer(package, state, holdout_fraction=0.5, min_eval_studies=1)
    endpoint = serve(monkeypatch, restarted)
    again = client_app.handle_evaluate(request(MessageType.EVALUATE, round2, w), endpoint)
    assert again.has_error() and "max_evaluations_per_round = 1" in str(again.error.reason)
    TaskIdentity.run_id = 2  # another server run has rounds of its own
    assert not client_app.handle_evaluate(request(MessageType.EVALUATE, round2, w), endpoint).has_error()
    kinds = [(e["run_id"], e["round"], e["kind"]) for e in restarted.ledger.entries()]
    assert kinds == [
        ("1", 1, "evaluate_reply"),
        ("1", 1, "error_reply"),
        ("1", 2, "evaluate_reply"),
        ("1", 2, "error_reply"),
        ("2", 2, "evaluate_reply"),
    ]
    restarted.close()


# ------------------------------------------------------------------------------------------- start-up


def test_forgotten_accountant_state_is_refused_at_start_up(package, tmp_path: Path) -> None:
    state = tmp_path / "state"
    trainer = make_trainer(package, state)
    trainer.budget.record(noise_multiplier=4.0, sample_rate=0.5, steps=2)
    spent = trainer.epsilon_spent
    trainer.record_outbound(1, TRAIN_REPLY, b"update", {"num_examples": 7}, dp={})
    trainer.close()
    ledger, accountant = state / LEDGER_FILENAME, state / ACCOUNTANT_STATE_FILE
    accountant.unlink()  # deleted: ε would silently restart at 0
    with pytest.raises(AccountantStateMismatch) as err:
        make_trainer(package, state)
    assert str(ledger) in str(err.value) and str(accountant) in str(err.value) and f"{spent:.6g}" in str(err.value)
    reset = PrivacyAccountant("rdp")  # reset to less than was spent
    reset.step(noise_multiplier=4.0, sample_rate=0.5, num_steps=1)
    reset.save(accountant)
    with pytest.raises(AccountantStateMismatch) as err:
        make_trainer(package, state)
    less = reset.get_epsilon(1e-5)
    assert f"holds ε = {less:.6g}" in str(err.value) and f"ε = {spent:.6g} that {ledger}" in str(err.value)
    reset.step(noise_multiplier=4.0, sample_rate=0.5, num_steps=1)  # the backup: all that was spent
    reset.save(accountant)
    restored = make_trainer(package, state)
    assert restored.epsilon_spent == pytest.approx(spent)
    restored.close()


def test_site_join_preflight_refuses_a_forgotten_accountant_state(tmp_path: Path) -> None:
    cfg = SiteDeployConfig.from_toml(write_site(tmp_path))
    assert preflight(cfg, check_data=False, check_connect=False)["policy"] == SitePolicy().to_dict()
    ledger = AuditLedger(cfg.state_dir / LEDGER_FILENAME)
    ledger.record(round=1, kind="train_reply", payload=b"x", metrics={}, dp={}, epsilon=0.75, delta=1e-5)
    ledger.close()
    with pytest.raises(SiteNotReady, match=r"records ε = 0\.75 spent .* accountant state .* does not exist") as err:
        preflight(cfg, check_data=False, check_connect=False)
    assert str(cfg.state_dir / LEDGER_FILENAME) in str(err.value)
    assert str(cfg.state_dir / ACCOUNTANT_STATE_FILE) in str(err.value)


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("require_dp_sgd", "yes", "must be true or false, got 'yes'"),
        ("min_dp_sgd_noise_multiplier", -0.5, "must be a finite number >= 0, got -0.5"),
        ("min_dp_sgd_noise_multiplier", "1", "must be a finite number >= 0, got '1'"),
        ("max_steps_per_round", -1, "must be an integer >= 0, got -1"),
        ("max_steps_per_round", 2.5, "must be an integer >= 0, got 2.5"),
        ("max_rounds", -3, "must be an integer >= 0, got -3"),
        ("min_eval_studies", 0, "must be an integer >= 1, got 0"),
        ("max_evaluations_per_round", -1, "must be an integer >= 0, got -1"),
        ("max_evaluations_per_round", True, "must be an integer >= 0, got True"),
    ],
)
def test_invalid_policy_values_name_the_file_key_and_value(tmp_path: Path, key: str, value, match: str) -> None:
    (tmp_path / "site.toml").write_text(toml_dumps({"site": {"name": "a"}, "privacy": {key: value}}))
    with pytest.raises(ValueError) as err:
        ClientConfig.from_toml(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'site.toml'}: [privacy] {key} ") and match in message


def test_policy_defaults_round_trip_and_site_check_prints_it(package, tmp_path: Path) -> None:
    site, model_dir = package
    cfg = ClientConfig.from_toml(site, model_dir=model_dir)
    assert cfg.policy == SitePolicy() and SitePolicy().to_dict() == {
        "require_dp_sgd": False,
        "min_dp_sgd_noise_multiplier": 0.0,
        "max_steps_per_round": 0,
        "max_rounds": 0,
        "min_eval_studies": 5,
        "max_evaluations_per_round": 1,
    }
    strict = ClientConfig.from_toml(site, require_dp_sgd=True, min_dp_sgd_noise_multiplier=1, max_rounds=3)
    assert ClientConfig.from_dict(strict.to_dict()) == strict and strict.min_dp_sgd_noise_multiplier == 1.0
    assert strict.policy.describe().startswith("DP-SGD required; σ >= 1;")
    (tmp_path / "site.toml").write_text(toml_dumps({"site": {"name": "a"}, "privacy": {"require_dpsgd": True}}))
    with pytest.raises(KeyError, match="did you mean 'require_dp_sgd'"):
        ClientConfig.from_toml(tmp_path)
    res = CliRunner().invoke(cli, ["site", "check", str(site)])
    assert res.exit_code == 0 and "policy: DP-SGD not required" in res.stdout
    (tmp_path / "dicom").mkdir()
    (tmp_path / "site.toml").write_text(toml_dumps({"site": {"name": "a"}, "privacy": {"max_rounds": -1}}))
    res = CliRunner().invoke(cli, ["site", "check", str(tmp_path)])
    assert res.exit_code == 2 and "max_rounds" in res.stderr
