"""The shipped model: the default of ``explain``/``evaluate`` without ``--model``, ``$LUNGVL_MODEL``, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungvl.cli import run
from lungvl_model.shipped import MODEL_ENV, SHIPPED_MODEL, shipped_model_dir
from tests.conftest import micro_checkpoint, write_mini_site


def test_env_names_another_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = micro_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv(MODEL_ENV, str(ckpt))
    assert shipped_model_dir() == ckpt


def test_without_a_model_the_error_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="nothing holds no model.pt: pass --model"):
        shipped_model_dir()


def test_default_is_the_repository_models_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV, raising=False)
    expected = Path(__file__).resolve().parents[2] / "models" / SHIPPED_MODEL
    if (expected / "model.pt").is_file():
        assert shipped_model_dir() == expected
    else:
        with pytest.raises(FileNotFoundError, match=SHIPPED_MODEL):
            shipped_model_dir()


def test_shipped_checkpoint_stays_under_5_mib() -> None:
    """The issue's budget for the committed model: weights, tokenizer, filter, detector, calibration (not the card)."""
    folder = Path(__file__).resolve().parents[2] / "models" / SHIPPED_MODEL
    if not folder.is_dir():
        pytest.skip("no shipped model in this checkout")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".md"]
    assert {"model.pt", "candidate_filter.json", "fine_detector.pt", "fine_detector.json", "calibration.json"} <= {
        p.name for p in files
    }
    assert sum(p.stat().st_size for p in files) <= 5 * 2**20


def test_explain_without_model_uses_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    ckpt = micro_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv(MODEL_ENV, str(ckpt))
    series = write_mini_site(tmp_path / "site", 1)
    study = next(iter(series))
    assert run(["explain", "--site", str(tmp_path / "site"), "--study", study, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["provenance"]["checkpoint"] == str(ckpt)
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "missing"))
    capsys.readouterr()
    assert run(["explain", "--dicom", str(series[study]), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "missing holds no model.pt" in err and "Traceback" not in err and not (tmp_path / "out2").exists()


def test_calibrate_never_writes_into_the_shipped_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["evaluate", str(tmp_path / "t"), "--out", str(tmp_path / "e"), "--validation", str(tmp_path / "v")]
    (tmp_path / "t").mkdir()
    (tmp_path / "v").mkdir()
    assert run([*args, "--calibrate"]) == 2
    assert "give --model" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_model_on_lidc_0001_writes_the_nodule_as_seg_and_sr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lungvl explain`` with no --model on LIDC-IDRI-0001: the readers' nodule found, measured, exported.

    The readers' 50 % consensus of the nodule is 7,764 mm³ in the left lower lobe; the issue asks for a volume
    within 30 % and at most two false positives. Whatever the generated text says, it may state no patient or
    technique fact the header does not hold, and a sentence that contradicts the finding defers the report.
    """
    import json

    import numpy as np

    from lungvl_model.training.candidate_filter import read_lidc
    from tests.lungvl.test_explain_dicom import _check_explain_dir, _lidc_series

    monkeypatch.delenv(MODEL_ENV, raising=False)
    case, files, _ = _lidc_series()
    out = tmp_path / "ex"
    assert run(["explain", "--dicom", str(case), "--out", str(out)]) == 0
    report = _check_explain_dir(out, files)  # SEG + SR read back, SR values == report.json, dciodvfy clean
    assert report["provenance"]["checkpoint"] == str(shipped_model_dir())
    # the consensus nodule's centroid (LPS mm), from the readers' XML
    vol, _, labels = read_lidc(case)
    centre = np.asarray(vol.voxel_to_lps(np.argwhere(labels > 0).mean(0)))
    near = [f for f in report["findings"] if np.linalg.norm(np.asarray(f["centroid_lps"]) - centre) <= 10.0]
    assert len(near) == 1 and near[0]["lobe"] == "LLL", report["findings"]
    assert abs(near[0]["volume_mm3"] / 7764.0 - 1) <= 0.30, near[0]
    assert len(report["findings"]) - 1 <= 2  # false positives
    text = " ".join(s["text"] for s in report["sentences"]).lower()
    assert not any(w in text for w in ("year-old", "pack-year", " male", "female", "kernel", "slice thickness"))
    review = report["fact_check"]
    assert review["n_unsupported"] == 0
    if review["n_contradictions"]:
        assert review["defer"] and report["defer_to_radiologist"]
    assert json.loads((out / "report.json").read_text())["dicom"]["seg"] == "seg.dcm"
