from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from lungvl.cli import app
from tests.conftest import write_mini_site

runner = CliRunner()


def test_rules_lung_rads_bad_row_named_rest_answered(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text(
        "type,mean_diameter_mm,solid_component_mm,context,juxtapleural,benign_pattern,suspicious_features\n"
        "solid,7,,baseline,0,0,0\n"
        "solid,abc,,baseline,0,0,0\n"
        "part_solid,12,8,baseline,0,0,0\n"
    )
    res = runner.invoke(app, ["rules", "lung-rads", "--csv", str(csv)])
    assert res.exit_code == 1
    lines = res.stdout.strip().splitlines()
    assert lines[0].endswith("lung_rads")
    assert lines[1].endswith(",3") and lines[3].endswith(",4B")
    assert "row 2" in res.stderr and "mean_diameter_mm" in res.stderr and "abc" in res.stderr


def test_rules_brock(tmp_path: Path) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text(
        "age,female,family_history,emphysema,longest_diameter_mm,type,upper_lobe,nodule_count,spiculation\n"
        "62,1,0,0,10,solid,1,1,1\n"
    )
    res = runner.invoke(app, ["rules", "brock", "--csv", str(csv)])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip().splitlines()[1].endswith("0.20097")


def test_site_check_exit_codes(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_mini_site(site, 2)
    res = runner.invoke(app, ["site", "check", str(site), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["usable"] == 2
    empty = tmp_path / "empty"
    (empty / "dicom").mkdir(parents=True)
    (empty / "dicom" / "x.txt.bin").write_bytes(b"nope")
    res = runner.invoke(app, ["site", "check", str(empty)])
    assert res.exit_code == 1
    res = runner.invoke(app, ["site", "check", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_report_label_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text(
        '{"id": "a", "text": "No pulmonary nodules. Lung-RADS 1."}\n'
        "this is not json\n"
        '{"id": "b", "text": "8 mm spiculated solid nodule in the left upper lobe. Lung-RADS 4X."}\n'
    )
    res = runner.invoke(app, ["report", "label", "--jsonl", str(f)])
    assert res.exit_code == 1
    out = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [o["id"] for o in out] == ["a", "b"]
    assert out[0]["nodule_present"] is False and out[0]["lung_rads"] == "1"
    assert out[1]["nodules"][0]["lobe"] == "LUL" and out[1]["nodules"][0]["margin"] == "spiculated"
    assert out[1]["lung_rads"] == "4X"
    assert "line 2" in res.stderr


def test_report_label_names_empty_and_oversized_reports(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "text": "No pulmonary nodules."},
        {"id": "e", "text": "  "},
        {"id": "big", "text": "[/x] 6 mm nodule. " * 60_000},  # 1,080,000 characters; markup-like text
        {"id": "b", "text": "8 mm nodule in the left upper lobe."},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["report", "label", "--jsonl", str(f)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)  # no traceback
    assert [json.loads(line)["id"] for line in res.stdout.strip().splitlines()] == ["a", "b"]
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 2
    assert "line 2: id 'e': empty report text" in errors[0]
    assert "line 3: id 'big': report text of 1,080,000 characters is over the labeler's limit of 1,000,000" in errors[1]


def test_data_synth_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "site"
    (out / "my_notes").mkdir(parents=True)
    (out / "readme.txt").write_text("mine")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    res = runner.invoke(app, ["data", "synth", "--cohort", "screening", "--studies", "1", "--out", str(out)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert len(res.stderr.strip().splitlines()) == 1
    assert "2 entries this generator did not write: my_notes, readme.txt" in res.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "readme.txt").read_text() == "mine"


def test_train_refuses_a_bad_seg_crop(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["train", str(tmp_path), "--stage", "seg", "--out", str(tmp_path / "o"), "--seg-crop", "32", "20", "32"]
    )
    assert res.exit_code == 2 and "multiples of 16" in res.stderr and "(32, 20, 32)" in res.stderr


def test_train_detector_options_are_checked_where_they_enter(tmp_path: Path) -> None:
    def train(*extra: str) -> tuple[int, str]:
        res = runner.invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
        return res.exit_code, " ".join(res.stderr.split())

    code, msg = train("--stage", "seg", "--detector-spacing", "1.5")
    assert code == 2 and "apply to --stage detector, not 'seg'" in msg
    code, msg = train("--stage", "detector", "--detector-spacing", "0.1")
    assert code == 2 and "spacing_mm must be in [0.25, 5] mm, got 0.1" in msg
    code, msg = train("--stage", "detector", "--detector-small-weight", "0")
    assert code == 2 and "small_weight must be > 0, got 0.0" in msg
    code, msg = train("--stage", "detector", "--detector-spacing", "1.5", "--init", str(tmp_path))
    assert code == 2 and "--detector-spacing 1.5 with --init" in msg and "keeps its own grid" in msg
    assert not (tmp_path / "o").exists()  # nothing written


def test_version() -> None:
    from lungvl_model.version import software_version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"lungvl {software_version()}"
    assert software_version() != "unknown"  # the test environment installs the package


def test_simulate_init_must_be_a_model_package(tmp_path: Path) -> None:
    """``lungvl simulate --init DIR`` starts the federation from a checkpoint; a folder without model.pt is
    refused in one line, exit 2, before anything is generated."""
    scenario = Path(__file__).resolve().parents[2] / "simulations" / "scenarios" / "curriculum.toml"
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    res = runner.invoke(app, ["simulate", str(scenario), "--out", str(tmp_path / "run"), "--init", str(empty)])
    assert res.exit_code == 2, res.output
    assert "--init" in res.output and "no model.pt" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
