"""Shared fixtures: tiny CT volumes and sites written with lungvl's own DICOM writer."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lungvl_model.data.dicom_io import write_ct_series
from lungvl_model.data.site_layout import ReportRecord, toml_dumps, write_reports
from lungvl_model.data.volume import CTVolume

SHARED = Path(__file__).resolve().parents[2] / "shared"


def require_service(name: str, available: bool, how: str) -> None:
    """Skip the calling test when a system service is missing, except in CI where it must be there.

    ``.ci/run`` installs PostgreSQL, Chromium and dicom3tools and sets ``LUNGVL_REQUIRE_SERVICES=1``: there a
    missing service fails the test instead of skipping it (nothing skips silently in CI).

    Args:
        name: what is missing, for the message (e.g. "PostgreSQL").
        available: whether it is usable here.
        how: how to get it (e.g. "`. .ci/services.sh` sets LUNGVL_TEST_POSTGRES_URL").
    """
    if available:
        return
    msg = f"{name} not available ({how})"
    if os.environ.get("LUNGVL_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + "; LUNGVL_REQUIRE_SERVICES=1 says it must be", pytrace=False)
    pytest.skip(msg)


def postgres_url() -> str:
    """The scratch PostgreSQL database's SQLAlchemy URL (skips, or fails in CI, when there is none)."""
    url = os.environ.get("LUNGVL_TEST_POSTGRES_URL", "")
    require_service("PostgreSQL", bool(url), "`. .ci/services.sh` starts one and sets LUNGVL_TEST_POSTGRES_URL")
    return url


def chromium_paths() -> tuple[str, str]:
    """``(chromium, chromedriver)`` binaries from Debian's packages (skips, or fails in CI, when absent)."""
    chrome = shutil.which("chromium") or ""
    driver = shutil.which("chromedriver") or ""
    require_service("Chromium + ChromeDriver", bool(chrome and driver), "apt-get install chromium chromium-driver")
    return chrome, driver


def dciodvfy_path() -> str:
    """Debian dicom3tools' ``dciodvfy`` (skips, or fails in CI, when absent)."""
    exe = shutil.which("dciodvfy") or ""
    require_service("dciodvfy", bool(exe), "apt-get install dicom3tools")
    return exe


LIDC_DIR = SHARED / "data" / "lidc"


def make_volume(
    shape: tuple[int, int, int] = (12, 32, 32),
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    study_uid: str = "1.2.826.0.1.3680043.10.1.1",
    series_uid: str = "1.2.826.0.1.3680043.10.1.1.1",
    seed: int = 0,
) -> CTVolume:
    """A chest-like toy volume: air, a body ellipse of soft tissue, a lung of -850 HU, a nodule."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    body = ((y - cy) / (0.45 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2 <= 1
    lung = ((y - cy) / (0.3 * shape[1])) ** 2 + ((x - cx) / (0.3 * shape[2])) ** 2 <= 1
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[lung] = -850.0
    nod = (z - shape[0] / 2) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 9
    hu[nod] = 30.0
    hu += rng.normal(0, 5, shape).astype(np.float32)
    return CTVolume(
        hu=np.rint(hu), spacing=spacing, origin=(-12.0, -20.0, -100.0), study_uid=study_uid, series_uid=series_uid
    )


def write_mini_site(root: Path, n_studies: int = 3, *, shape=(10, 24, 24)) -> dict[str, Path]:
    """A site with ``n_studies`` toy studies, reports and a site.toml; returns study_uid → series dir."""
    root.mkdir(parents=True, exist_ok=True)
    series_dirs = {}
    records = []
    for i in range(n_studies):
        study = f"1.2.826.0.1.3680043.10.2.{i + 1}"
        vol = make_volume(shape, study_uid=study, series_uid=f"{study}.1", seed=i)
        d = root / "dicom" / f"patient{i}" / "ct"
        write_ct_series(vol, d, tags={"PatientID": f"SYN{i:03d}", "StudyDate": "20250101"})
        series_dirs[study] = d
        records.append(ReportRecord(study, f"A 6 mm solid nodule in the right upper lobe. Study {i}.", "20250101"))
    write_reports(root / "reports.jsonl", records)
    (root / "site.toml").write_text(toml_dumps({"site": {"name": "mini", "cohort": "screening"}}))
    return series_dirs


def micro_checkpoint(directory: Path, *, spacing_mm: float = 4.0, stage: str = "init") -> Path:
    """A micro LungVL model package (~100k parameters) saved to ``directory``."""
    from lungvl_model.data.preprocess import PreprocessConfig
    from lungvl_model.models.config import HeadsConfig, LungVLConfig, TextConfig, VisionConfig
    from lungvl_model.models.lungvl import LungVLModel
    from lungvl_model.text.tokenizer import train_tokenizer
    from lungvl_model.training.checkpoint import save_checkpoint

    cfg = LungVLConfig(
        preset="test",
        vision=VisionConfig(channels=(4, 8, 8, 16, 16), aggregation_channels=8, attention_scales=(3, 4)),
        text=TextConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, visual_scales=(2, 3), dropout=0.0),
        heads=HeadsConfig(hidden=16),
        input=PreprocessConfig(spacing_mm=(spacing_mm,) * 3, size=(32, 32, 32)),
    )
    texts = ["A 9 mm solid nodule in the right upper lobe. Lung-RADS 4A.", "No pulmonary nodules. Lung-RADS 1."] * 8
    model = LungVLModel(cfg, train_tokenizer(texts, vocab_size=300))
    return save_checkpoint(directory, model, {"stage": stage})


@pytest.fixture
def mini_site(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    site = tmp_path / "site"
    return site, write_mini_site(site)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (2 cores shared with other jobs: 2 threads thrash, 10-40x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages need a task identity; Flower's runtimes set it, an in-process test sets its own (run id 1)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old
