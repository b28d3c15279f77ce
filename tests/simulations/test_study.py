"""The study: grid expansion, resumable runs (a rerun skips finished cells), the report from a filled registry.

The tests that touch the registry run twice (:func:`registry`): on the study directory's default SQLite
``registry.db`` and on a fresh PostgreSQL database given as ``db_url`` (``--db``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import simulations.study_run as study_run
from lungvl.cli import run as cli
from lungvl.errors import MISSING_DEPENDENCY
from server.registry import Registry
from simulations.study_config import Cell, StudyConfig, expand_grid
from simulations.study_report import write_report
from simulations.study_stats import estimate, load_study
from tests.server.test_registry_backends import BACKENDS, fresh_database

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ROOT / "simulations" / "studies"
SCENARIO = STUDIES / "svr_small_scenario.toml"


@pytest.fixture(params=BACKENDS)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str, str | None]]:
    """``(study_dir, url, db_url)``: SQLite is the study directory's own ``registry.db`` (``db_url`` None,
    the default), PostgreSQL a fresh database passed as ``db_url``."""
    out = tmp_path / "study"
    out.mkdir()
    with fresh_database(request.param, out) as url:
        yield out, url, None if request.param == "sqlite" else url


def study(**grid) -> StudyConfig:
    doc = {"study": {"name": "s", "scenario": str(SCENARIO), "seeds": [0, 1]}, "grid": grid}
    return StudyConfig.from_dict(doc)


def test_grid_expands_as_configured() -> None:
    s = study(
        strategies=["local", "fedavg", "fedavgm", "centralised"],
        fedavgm_server_lr=[0.5, 1.0],
        fedavgm_momentum=[0.0, 0.9],
        dp=["none", "sample", "client"],
        epsilons=[2.0, 8.0],
        dp_strategies=["local", "fedavgm"],
        dp_fedavgm=[1.0, 0.9],
        dg_penalty=[1.0],
        site_dro=[0.5],
    )
    cells = expand_grid(s)
    per_seed = [c.cell_id for c in cells if c.seed == 0]
    assert per_seed == [
        "local-s0", "local-sample2-s0", "local-sample8-s0",  # no client-level DP without aggregation
        "fedavg-s0",  # fedavg not in dp_strategies
        "fedavgm-lr0.5-m0-s0", "fedavgm-lr0.5-m0.9-s0", "fedavgm-lr1-m0-s0", "fedavgm-lr1-m0.9-s0",
        "fedavgm-lr1-m0.9-sample2-s0", "fedavgm-lr1-m0.9-sample8-s0",
        "fedavgm-lr1-m0.9-client2-s0", "fedavgm-lr1-m0.9-client8-s0",
        "centralised-s0",
        "fedavgm-lr1-m0.9-dg1-s0",
        "fedavgm-lr1-m0.9-sitedro0.5-s0",  # group DRO over sites at the server
    ]  # fmt: skip
    assert len(cells) == 2 * len(per_seed) and [c.seed for c in cells] == [0] * 15 + [1] * 15
    fedavg = next(c for c in cells if c.strategy == "fedavg")
    assert (fedavg.server_lr, fedavg.server_momentum) == (1.0, 0.0)
    assert all(Cell.from_dict(json.loads(json.dumps(c.to_dict()))) == c for c in cells)
    again = StudyConfig.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and len(study().cells()) == 2 * 4  # defaults: the four strategies, DP off


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"grid": {"stratgies": ["local"]}}, "did you mean 'strategies'"),
        ({"griid": {}}, "did you mean 'grid'"),
        ({"grid": {"strategies": ["fedprox"]}}, "fedprox"),
        ({"grid": {"dp": ["sample"], "epsilons": [1.0]}}, "must include 'none'"),
        ({"grid": {"dp": ["none", "client"]}}, "epsilons"),
        ({"grid": {"fedavgm_momentum": [1.0]}}, "momentum"),
        ({"grid": {"dp_fedavgm": [1.0]}}, "dp_fedavgm"),
        ({"study": {"name": "s", "scenario": "x.toml", "seeds": []}}, "seeds"),
        ({"study": {"name": "s"}}, "scenario"),
        ({"dp": {"delta": 2.0}}, "delta"),
        ({"grid": {"site_dro": [0.0]}}, "site_dro must be > 0"),
    ],
)
def test_invalid_study(doc, match) -> None:
    base = {"study": {"name": "s", "scenario": str(SCENARIO)}}
    with pytest.raises((KeyError, ValueError), match=match):
        StudyConfig.from_dict({**base, **doc})


def test_shipped_studies_parse() -> None:
    small = StudyConfig.from_toml(STUDIES / "screening_vs_referral_small.toml")
    full = StudyConfig.from_toml(STUDIES / "screening_vs_referral.toml")
    for s in (small, full):
        assert len(s.seeds) >= 3 and s.scenario.exists()
        base = study_run.base_scenario(s)
        kinds = sorted(x.cohort for x in base.sites)
        assert kinds.count("screening") >= 2 and "referral" in kinds and "low_resource" in kinds
        assert {c.dp for c in s.cells()} == {"none", "sample", "client"} and {2.0, 8.0} <= {
            c.epsilon for c in s.cells()
        }
        assert {c.strategy for c in s.cells()} == {"local", "fedavg", "fedavgm", "centralised"}
        assert any(c.dg_penalty for c in s.cells())
    assert len(small.cells()) == 30
    v2 = StudyConfig.from_toml(STUDIES / "screening_vs_referral_v2.toml")
    cells = v2.cells()
    assert len(v2.seeds) >= 3 and {c.strategy for c in cells} == {
        "initial",
        "local",
        "fedavg",
        "fedavgm",
        "centralised",
    }
    assert {(c.dp, c.epsilon) for c in cells} == {
        ("none", 0.0),
        *((k, e) for k in ("sample", "client") for e in (2, 8)),
    }
    assert any(c.site_dro_step for c in cells) and v2.init_model is not None
    assert [p.stage for p in study_run.base_scenario(v2).server.phases] == ["seg", "vl"]


def test_cell_scenarios_pick_the_noise_for_epsilon(tmp_path: Path) -> None:
    s = StudyConfig.from_toml(STUDIES / "screening_vs_referral_small.toml")
    base = study_run.base_scenario(s)
    assert all(x.epsilon_budget == 8.0 for x in base.sites)  # raised to the largest ε for DP-SGD
    dirs = {x.name: tmp_path / x.name for x in base.sites}
    sizes = {name: 5 for name in dirs} | {"referral": 3}  # training patients: DP-SGD's q is per patient
    cells = {c.cell_id: c for c in s.cells()}
    plain, _ = study_run.cell_scenario(s, base, cells["fedavg-s1"], dirs, sizes)
    assert plain.server.strategy == "fedavg" and plain.server.seed == 1 and not plain.server.client_dp
    assert not plain.server.dp_sgd and plain.server.clip_norm == 0 and plain.sites[0].path == dirs["screening-a"]
    c2, n2 = study_run.cell_scenario(s, base, cells["fedavgm-lr1-m0.9-client2-s0"], dirs, sizes)
    c8, n8 = study_run.cell_scenario(s, base, cells["fedavgm-lr1-m0.9-client8-s0"], dirs, sizes)
    assert c2.server.target_epsilon == 2.0 and c2.server.clip_norm == s.client_clip_norm
    assert n2["client_sigma"] > n8["client_sigma"] > 0 and c2.server.client_noise_multiplier == n2["client_sigma"]
    s8, ns = study_run.cell_scenario(s, base, cells["fedavgm-lr1-m0.9-sample8-s0"], dirs, sizes)
    assert s8.server.dp_sgd and not s8.server.client_dp and s8.server.dp_sgd_noise_multiplier == ns["sample_sigma"]
    from privacy.accountant import get_noise_multiplier

    steps = base.rounds * base.server.local_steps  # the smallest site (largest q) sets σ
    assert ns["sample_sigma"] == get_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=2 / 3, steps=steps)
    # a site-DRO cell reaches the server's settings; the other cells keep it off
    dro = Cell("fedavgm", 1.0, 0.9, seed=0, site_dro_step=0.5)
    d, _ = study_run.cell_scenario(s, base, dro, dirs, sizes)
    assert d.server.site_dro_step == 0.5 and plain.server.site_dro_step == 0 and d.name.endswith("sitedro0.5-s0")


def test_initial_models_tokenizer_comes_from_the_public_corpus_not_the_sites(tmp_path: Path) -> None:
    from lungvl_model.training.checkpoint import load_checkpoint
    from simulations.local_only import initial_model
    from simulations.simulate import _initial_model

    base = study_run.base_scenario(StudyConfig.from_toml(STUDIES / "screening_vs_referral_small.toml"))
    sites = {s.name: tmp_path / "no-such-site" for s in base.sites}  # no site is read (none exists)
    for target in (
        _initial_model(base, sites, tmp_path / "sim", lambda _: None),
        initial_model(base, sites, tmp_path / "lo"),
    ):
        model, meta = load_checkpoint(target)
        assert meta["tokenizer_corpus"] == "lungvl synthetic report generator (public)"
        assert len(model.tokenizer) > 300


def _fake_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: set[str]) -> list[str]:
    """Stub out sites, models and runs: each cell writes a tagged run into the registry (or fails)."""
    calls: list[str] = []
    monkeypatch.setattr(study_run, "prepare_sites", lambda base, out, log: {s.name: out / s.name for s in base.sites})
    monkeypatch.setattr(study_run, "_site_studies", lambda d, stage, holdout: 4)
    monkeypatch.setattr(study_run, "_site_patients", lambda d, stage, holdout: 3)
    monkeypatch.setattr(study_run, "initial_model", lambda base, sites, target, seed: target)

    def fake_run(cell, scenario, cell_dir, db, init, tag, log):
        calls.append(cell.cell_id)
        if cell.cell_id in fail:
            raise RuntimeError("boom")
        with Registry(db) as reg:
            run = reg.start_run(scenario.name, {"study": tag}, seed=cell.seed)
            reg.finish_run(run, "finished")
        return {"status": "finished"}

    monkeypatch.setattr(study_run, "_run_cell", fake_run)
    return calls


def test_rerun_skips_finished_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: tuple[Path, str, str | None]
) -> None:
    out, url, db_url = registry
    s = study(strategies=["local", "fedavg"], dp=["none", "client"], epsilons=[2.0], dp_strategies=["fedavg"])
    ids = [c.cell_id for c in s.cells()]
    assert ids == ["local-s0", "fedavg-s0", "fedavg-client2-s0", "local-s1", "fedavg-s1", "fedavg-client2-s1"]
    calls = _fake_study(tmp_path, monkeypatch, fail={"fedavg-s1"})
    lines: list[str] = []
    first = study_run.run_study(s, out, progress=lines.append, db_url=db_url)
    assert calls == ids and first["failed"].keys() == {"fedavg-s1"} and len(first["ran"]) == 5
    assert any(line.startswith("[2/6] fedavg-s0: finished") for line in lines)
    calls.clear()
    second = study_run.run_study(s, out, progress=lines.append, db_url=db_url)
    assert calls == ["fedavg-s1"] and second["skipped"] == 5 and second["ran"] == []  # fails again
    calls.clear()
    calls = _fake_study(tmp_path, monkeypatch, fail=set())
    third = study_run.run_study(s, out, only=["*-s1"], progress=lines.append, db_url=db_url)
    assert third["ran"] == ["fedavg-s1"] and third["skipped"] == 2
    with Registry(url) as reg:
        assert sorted(study_run.done_cells(reg, "s")) == sorted(ids)
    calls.clear()
    fourth = study_run.run_study(s, out, only=["fedavg-client2-*"], rerun=True, progress=lines.append, db_url=db_url)
    assert calls == ["fedavg-client2-s0", "fedavg-client2-s1"] and fourth["skipped"] == 0
    written = json.loads((out / "study.json").read_text())
    assert written["cells"][0]["cell_id"] == "local-s0" and written["registry"] == Registry(url).url
    assert (out / "registry.db").exists() == (db_url is None)  # --db: nothing in the study directory


# ------------------------------------------------------------------------------------------------ report

COHORTS = {"scr-a": "screening", "scr-b": "screening", "ref": "referral", "low": "low_resource"}


def _fill(db: str) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    """A registry with known final values: 3 arms x 2 seeds, 4 sites, 2 rounds; returns what was written."""
    rng = np.random.default_rng(0)
    written = {}
    cells = [Cell("fedavg", 1.0, 0.0), Cell("fedavgm", 1.0, 0.9), Cell("fedavgm", 1.0, 0.9, dp="client", epsilon=2.0)]
    with Registry(db) as reg:
        for cell in cells:
            for seed in (0, 1):
                c = Cell.from_dict({**cell.to_dict(), "seed": seed})
                tag = {"study": "known", "cell": c.to_dict(), "sites": COHORTS, "rounds": 2, "local_steps": 3}
                run = reg.start_run(f"known:{c.cell_id}", {"study": tag}, seed=seed)
                for rnd in (1, 2):
                    site_vals = {}
                    for site in COHORTS:
                        m = {k: float(rng.uniform(0.3, 0.9)) for k in ("val_auc", "val_lung_rads_acc", "val_dice")}
                        m |= {"val_sensitivity": float(rng.uniform()), "val_auc_thin": float(rng.uniform())}
                        reg.record_metrics(run, rnd, f"site:{site}", m)
                        site_vals[site] = m
                    reg.record_metrics(run, rnd, "global", {"val_auc": rnd * 0.1 + seed, "val_loss": 1.0 / rnd})
                    if c.dp == "client":
                        reg.record_privacy(
                            run, rnd, level="client", epsilon=rnd * 0.9, delta=1e-5,
                            noise_multiplier=3.0, sample_rate=1.0, steps=rnd, accountant="rdp",
                        )  # fmt: skip
                written[(c.arm, seed)] = site_vals  # the final round's values
                reg.finish_run(run, "finished")
        failed = reg.start_run("known:x", {"study": {"study": "known", "cell": Cell("local").to_dict()}}, seed=0)
        reg.finish_run(failed, "failed")  # not finished: left out
    return written


def _row(md: str, section: str, arm: str) -> list[str]:
    body = md.split(f"## {section}")[1].split("\n## ")[0]
    line = next(x for x in body.splitlines() if x.startswith(f"| {arm} |"))
    return [x.strip() for x in line.strip("|").split("|")]


def _parse(cell: str) -> tuple[float, float, float, int]:
    m = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\] \(n=(\d+)\)", cell)
    assert m, cell
    return float(m[1]), float(m[2]), float(m[3]), int(m[4])


def test_report_numbers_match_the_registry(registry: tuple[Path, str, str | None]) -> None:
    out, url, db_url = registry
    written = _fill(url)
    path = write_report(out, n_boot=500, db_url=db_url)
    md = path.read_text()
    report = json.loads((out / "results.json").read_text())
    assert report["study"] == "known" and report["arms"]["fedavg"]["seeds"] == [0, 1]
    assert (out / "convergence.png").stat().st_size > 0 and (out / "privacy_utility.png").exists()
    assert f"read from `{'registry.db' if db_url is None else Registry(url).url}` only" in md
    assert "6 finished runs in 3 arms" in md and "the replicate is the seed" in md
    assert "own training studies (no hold-out split)" in md  # the filled runs carry no hold-out fraction
    for arm, label in (("fedavgm-lr1-m0.9", "FedAvgM (η=1, β=0.9)"), ("fedavg", "FedAvg")):
        row = _row(md, "Final metrics", label)
        for col, metric in ((2, "val_auc"), (3, "val_lung_rads_acc"), (6, "val_dice")):
            per_seed = [np.mean([written[(arm, s)][site][metric] for site in COHORTS]) for s in (0, 1)]  # sites first
            half = 12.706205 * np.std(per_seed, ddof=1) / np.sqrt(2)  # t(0.975, 1) · sd / √n over the 2 seeds
            mean, low, high, n = _parse(row[col])
            assert n == 2 and mean == pytest.approx(np.mean(per_seed), abs=5e-4)
            assert low == pytest.approx(np.mean(per_seed) - half, abs=5e-4)
            assert high == pytest.approx(np.mean(per_seed) + half, abs=5e-4)
            assert report["arms"][arm]["metrics"][metric]["mean"] == pytest.approx(np.mean(per_seed))
        assert row[7] == "n/a" and report["arms"][arm]["metrics"]["val_concept_f1"]["mean"] is None  # not recorded
        assert row[5] == "n/a"  # Dice on found nodules: not recorded by these runs
        gap = _parse(_row(md, "Low-resource gap", label)[1])
        expected = [
            written[(arm, s)]["low"]["val_auc"]
            - np.mean([written[(arm, s)][x]["val_auc"] for x in COHORTS if x != "low"])
            for s in (0, 1)
        ]
        assert gap[0] == pytest.approx(np.mean(expected), abs=5e-4) and gap[3] == 2
    paired = _row(md, "Paired comparisons", "FedAvgM (η=1, β=0.9)")
    assert paired[1:3] == ["FedAvg", "malignancy AUC"]
    diffs = [
        np.mean(
            [written[("fedavgm-lr1-m0.9", s)][x]["val_auc"] - written[("fedavg", s)][x]["val_auc"] for x in COHORTS]
        )
        for s in (0, 1)
    ]
    assert _parse(paired[3])[0] == pytest.approx(np.mean(diffs), abs=5e-4) and _parse(paired[3])[3] == 2
    assert paired[4] in ("no difference detected", "yes (higher)", "yes (lower)")
    pairs = {(r["arm"], r["reference"]) for r in report["paired"]}
    assert pairs == {("fedavgm-lr1-m0.9", "fedavg"), ("fedavgm-lr1-m0.9-client2", "fedavgm-lr1-m0.9")}
    sub = _row(md, "Per site kind and subgroup", "FedAvg")
    screening_sens = [written[("fedavg", s)][x]["val_sensitivity"] for s in (0, 1) for x in ("scr-a", "scr-b")]
    assert _parse(sub[5])[0] == pytest.approx(
        np.mean(screening_sens), abs=5e-3
    )  # kinds sorted: low, referral, screening
    priv = _row(md, "Privacy–utility", "fedavgm-lr1-m0.9")
    assert priv[1] == "none"
    dp_line = next(x for x in md.splitlines() if x.startswith("| fedavgm-lr1-m0.9 | client | 2 |"))
    assert "| 1.8 |" in dp_line  # ε spent: the last round's client-level ε


def test_report_names_the_hold_out(registry: tuple[Path, str, str | None]) -> None:
    out, url, db_url = registry
    _fill(url)
    with Registry(url) as reg:  # one run of an older study: the fraction only in its scenario
        tag = {"study": "known", "cell": Cell("centralised", seed=7).to_dict(), "sites": COHORTS, "rounds": 2}
        run = reg.start_run("known:c", {"study": tag, "scenario": {"run": {"holdout_fraction": 0.25}}}, seed=7)
        reg.record_metrics(run, 2, "site:low", {"val_auc": 0.5})
        reg.finish_run(run, "finished")
    md = write_report(out, n_boot=100, db_url=db_url).read_text()
    assert "hold-out patients (about 25% of them" in md


def test_load_study_and_estimates(tmp_path: Path, registry: tuple[Path, str, str | None]) -> None:
    _, url, _ = registry
    _fill(url)
    with Registry(url, read_only=True) as reg:
        name, runs = load_study(reg)
        assert name == "known" and len(runs) == 6 and runs[0].final_round == 2
        with pytest.raises(ValueError, match="no study"):
            load_study(reg, "other")
    assert runs[-1].epsilon == pytest.approx(1.8) or runs[0].epsilon is None
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nowhere")


def test_cli_report_reads_the_db_given(
    registry: tuple[Path, str, str | None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, url, db_url = registry
    _fill(url)
    args = ["study", "report", str(out), "--bootstrap", "50", *(["--db", db_url] if db_url else [])]
    assert cli(args) == 0 and capsys.readouterr().out.strip() == str(out / "results.md")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert cli(["study", "report", str(elsewhere), "--db", url, "--bootstrap", "50"]) == 0
    assert (elsewhere / "results.md").read_text().count("6 finished runs in 3 arms") == 1


def test_cli_study_without_the_postgres_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if `lungvl[postgres]` were not installed
    toml = tmp_path / "s.toml"
    toml.write_text(f'[study]\nname = "s"\nscenario = "{SCENARIO}"\nseeds = [0]\n')
    url = "postgresql://lungvl:pw@127.0.0.1:1/lungvl"
    for args in (["run", str(toml), "--out", str(tmp_path / "out")], ["report", str(tmp_path)]):
        assert cli(["study", *args, "--db", url]) == MISSING_DEPENDENCY
        err = capsys.readouterr().err
        assert "lungvl[postgres]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "sites").exists()  # refused before any site was generated


@pytest.mark.parametrize(
    "values", [[0.5], [0.1, 0.9], [0.0, 0.0, 1.0], list(np.linspace(0, 1, 17)), [3.0, -1.0, 2.5, 8.0]]
)
def test_bootstrap_interval_contains_the_point_estimate(values) -> None:
    est = estimate(values, n_boot=300)
    assert est.low <= est.mean <= est.high and est.mean == pytest.approx(np.mean(values)) and est.n == len(values)
    assert estimate([math.nan]).fmt() == "n/a"


def test_dry_run_json_lists_every_cell(capsys: pytest.CaptureFixture[str]) -> None:
    """``study run --dry-run --json`` prints one JSON document with every cell's settings."""
    study = Path(__file__).resolve().parents[2] / "simulations" / "studies" / "screening_vs_referral_small.toml"
    code = cli(["study", "run", str(study), "--out", "/nonexistent-never-written", "--dry-run", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    expected = [c.cell_id for c in StudyConfig.from_toml(study).cells()]
    assert [c["cell_id"] for c in doc["cells"]] == expected and expected
    assert all("strategy" in c and "seed" in c for c in doc["cells"])
    assert cli(["study", "run", str(study), "--out", "/nonexistent-never-written", "--json"]) == 2


# ------------------------------------------------------------------------------------------------ init model

MODEL = ROOT / "models" / "lungvl-tiny-v1"


def test_init_model_resolves_against_the_study_file_and_round_trips(tmp_path: Path) -> None:
    doc = {"study": {"name": "s", "scenario": str(SCENARIO), "init_model": "../models/m"}}
    s = StudyConfig.from_dict(doc, base_dir=tmp_path / "studies")
    assert s.init_model == (tmp_path / "models" / "m").resolve()
    assert StudyConfig.from_dict(s.to_dict()) == s
    assert StudyConfig.from_dict({"study": {"name": "s", "scenario": str(SCENARIO)}}).init_model is None
    with pytest.raises(ValueError, match=r"init_model must be a non-empty path string, got 3"):
        StudyConfig.from_dict({"study": {**doc["study"], "init_model": 3}})


def test_check_init_model_refuses_another_architecture(tmp_path: Path) -> None:
    v2 = StudyConfig.from_toml(STUDIES / "screening_vs_referral_v2.toml")
    assert study_run.check_init_model(v2, study_run.base_scenario(v2)) == MODEL.resolve()
    small = StudyConfig.from_dict({"study": {"name": "s", "scenario": str(SCENARIO), "init_model": str(MODEL)}})
    with pytest.raises(ValueError, match=r"\[model\] at heads\.hidden, input\.size, .*hidden: package 64, scenario 16"):
        study_run.check_init_model(small, study_run.base_scenario(small))
    gone = StudyConfig.from_dict({"study": {"name": "s", "scenario": str(SCENARIO), "init_model": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match=re.escape(f"study init_model {tmp_path}: not a model package")):
        study_run.check_init_model(gone, study_run.base_scenario(gone))
    assert study_run.check_init_model(study(), study_run.base_scenario(study())) is None


def test_every_cell_starts_from_the_study_init_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = StudyConfig.from_toml(STUDIES / "screening_vs_referral_v2.toml")
    inits: dict[str, Path] = {}
    monkeypatch.setattr(study_run, "prepare_sites", lambda base, out, log: {x.name: out / x.name for x in base.sites})
    monkeypatch.setattr(study_run, "_site_studies", lambda d, stage, holdout: 4)
    monkeypatch.setattr(study_run, "_site_patients", lambda d, stage, holdout: 3)
    monkeypatch.setattr(study_run, "initial_model", lambda *a, **k: pytest.fail("no per-seed model with init_model"))

    def fake_run(cell, scenario, cell_dir, db, init, tag, log):
        inits[cell.cell_id] = init
        assert tag["init_model"] == str(init)
        with Registry(db) as reg:
            reg.finish_run(reg.start_run(scenario.name, {"study": tag}, seed=cell.seed), "finished")
        return {"status": "finished"}

    monkeypatch.setattr(study_run, "_run_cell", fake_run)
    result = study_run.run_study(s, tmp_path / "study", only=["fedavg-s*", "centralised-s0"], progress=lambda _: None)
    assert result["failed"] == {} and set(inits) == {"fedavg-s0", "fedavg-s1", "fedavg-s2", "centralised-s0"}
    assert set(inits.values()) == {MODEL.resolve()} and not (tmp_path / "study" / "init").exists()


def test_report_names_the_curriculum_and_compares_with_the_initial_model(tmp_path: Path) -> None:
    phases = [
        {"stage": "seg", "rounds": 2, "local_steps": 8, "batch_size": 4, "seg_patch": 32},
        {"stage": "vl", "rounds": 1, "local_steps": 4, "batch_size": 2, "seg_patch": 0},
    ]
    values = {("initial", 0): 0.6, ("initial", 1): 0.6, ("fedavg", 0): 0.7, ("fedavg", 1): 0.9}
    with Registry(tmp_path / "registry.db") as reg:
        for (strategy, seed), auc in values.items():
            cell = Cell(strategy, 1.0 if strategy == "fedavg" else 0.0, seed=seed)
            tag = {"study": "cur", "cell": cell.to_dict(), "sites": COHORTS, "rounds": 3, "local_steps": 4}
            tag["init_model"] = "/models/lungvl-tiny-v1"
            run = reg.start_run(f"cur:{cell.cell_id}", {"study": tag, "server": {"curriculum": phases}}, seed=seed)
            for rnd in (1,) if strategy == "initial" else (1, 2, 3):
                for site in COHORTS:
                    reg.record_metrics(run, rnd, f"site:{site}", {"val_auc": auc})
                reg.record_metrics(run, rnd, "global", {"val_auc": auc, "val_loss": 1.0})
            reg.finish_run(run, "finished")
    md = write_report(tmp_path, n_boot=100).read_text()
    assert "3 rounds, a curriculum: seg 2 × 8 local steps (batch 4, 32³ patches), vl 1 × 4 local steps (batch 2)" in md
    assert "Every arm starts from the same model package, `lungvl-tiny-v1`." in md
    row = _row(md, "Paired comparisons", "FedAvg")
    assert row[1] == "initial model (no training)" and row[2] == "malignancy AUC"
    mean, low, high, n = _parse(row[3])
    assert (mean, n) == (pytest.approx(0.2), 2) and low < 0.2 < high  # per seed +0.1 and +0.3
    doc = json.loads((tmp_path / "results.json").read_text())
    assert any(c["arm"] == "fedavg" and c["reference"] == "initial" for c in doc["paired"])
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_initial_arm_is_one_untrained_cell_per_seed() -> None:
    s = study(strategies=["initial", "fedavg"], dp=["none", "sample"], epsilons=[8.0], dp_strategies=["fedavg"])
    assert [c.cell_id for c in s.cells()] == [
        "initial-s0", "fedavg-s0", "fedavg-sample8-s0", "initial-s1", "fedavg-s1", "fedavg-sample8-s1"
    ]  # fmt: skip
    assert not Cell("initial").federated and Cell("initial").arm == "initial"
    with pytest.raises(ValueError, match="the initial baseline runs without DP"):
        Cell("initial", dp="sample", epsilon=2.0)
