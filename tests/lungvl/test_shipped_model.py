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
