from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lungvl_model.data.dataset import SiteDataset, collate, known
from lungvl_model.data.nifti_io import read_label_nifti, write_label_nifti
from lungvl_model.data.preprocess import PreprocessConfig, preprocess
from lungvl_model.data.site_layout import mask_path, write_labels
from lungvl_model.data.targets import targets_from_labels
from tests.conftest import make_volume, write_mini_site


def test_preprocess_resamples_and_keeps_masks_aligned() -> None:
    vol = make_volume((20, 48, 48), spacing=(2.5, 0.8, 0.8))
    lab = (vol.hu > 0) & (vol.hu < 60)  # the nodule, and some body
    nod = np.zeros(vol.shape, np.uint8)
    z, y, x = np.mgrid[:20, :48, :48]
    nod[(z - 10) ** 2 + (y - 23.5) ** 2 + (x - 23.5) ** 2 <= 9] = 1
    cfg = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0), size=(32, 24, 24))
    out = preprocess(vol, cfg, {"nodules": nod})
    assert out.image.shape == (32, 24, 24) and out.labels["nodules"].shape == (32, 24, 24)
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    # the nodule stays at the centre, and the image is bright (soft tissue) where the mask is
    zz, yy, xx = np.nonzero(out.labels["nodules"])
    assert abs(yy.mean() - 11.5) <= 1.5 and abs(xx.mean() - 11.5) <= 1.5
    assert out.image[out.labels["nodules"] > 0].mean() > 0.35  # lung would be ~0.11 (labels keep partial voxels)
    del lab


def test_invalid_preprocess_config() -> None:
    with pytest.raises(ValueError, match="spacing_mm"):
        PreprocessConfig(spacing_mm=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="hu_window"):
        PreprocessConfig(hu_window=(400.0, -1000.0))
    with pytest.raises(KeyError, match="bogus"):
        PreprocessConfig.from_dict({"bogus": 1})
    cfg = PreprocessConfig(size=None)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


def test_nifti_round_trip(tmp_path: Path) -> None:
    vol = make_volume()
    lab = (np.arange(np.prod(vol.shape)).reshape(vol.shape) % 3).astype(np.uint8)
    write_label_nifti(lab, vol, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_label_nifti(tmp_path / "m.nii.gz", vol), lab)
    with pytest.raises(ValueError, match="does not match"):
        read_label_nifti(tmp_path / "m.nii.gz", make_volume((5, 32, 32)))


def test_site_dataset_items_cache_and_targets(tmp_path: Path) -> None:
    site = tmp_path / "site"
    series = write_mini_site(site, 2, shape=(10, 24, 24))
    uids = sorted(series)
    from lungvl_model.data.dicom_io import read_series_dir

    vol = read_series_dir(series[uids[0]])
    nod = np.zeros(vol.shape, np.uint8)
    nod[4:6, 10:14, 10:14] = 1
    write_label_nifti(nod, vol, mask_path(site, vol.series_uid))
    write_labels(
        site / "labels.csv",
        [
            {"study_uid": uids[0], "level": "study", "lung_rads": "4A", "malignant": 1, "nodule_count": 1},
            {
                "study_uid": uids[0],
                "level": "nodule",
                "nodule_id": 1,
                "type": "part_solid",
                "mean_diameter_mm": 9.0,
                "longest_diameter_mm": 10.0,
                "short_axis_mm": 8.0,
                "spiculation": 1,
                "growth_mm": 2.0,
            },
        ],
    )
    cfg = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), size=(8, 8, 8))
    ds = SiteDataset(site, cfg)
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (1, 8, 8, 8) and item["seg"].sum() > 0 and bool(item["has_mask"])
    t = item["targets"]
    assert t["lung_rads"].item() == 3 and t["malignant"].item() == 1.0 and t["nodule_type"].item() == 1
    assert t["roundness"].item() == pytest.approx(0.8) and t["growth_mm"].item() == 2.0
    assert len(list((site / ".cache").glob("*.npz"))) == 1
    again = SiteDataset(site, cfg)[0]  # from the cache
    assert torch.equal(again["image"], item["image"])
    # second study: no labels.csv rows -> weak labels from its report text ("A 6 mm solid nodule ... RUL")
    weak = ds[1]["targets"]
    assert weak["nodule_type"].item() == 0 and weak["diameter_mm"].item() == pytest.approx(6.0)
    assert not known(weak["malignant"]) and known(weak["nodule_type"])
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 1, 8, 8, 8) and len(batch["text"]) == 2


def test_targets_lidc_style_rows() -> None:
    rows = [
        {
            "study_uid": "s",
            "level": "nodule",
            "malignancy_score": "4.75",
            "type": "solid",
            "mean_diameter_mm": "20",
            "lung_rads": "4B",
        },
        {
            "study_uid": "s",
            "level": "nodule",
            "malignancy_score": "2",
            "type": "non_solid",
            "mean_diameter_mm": "5",
            "lung_rads": "2",
        },
    ]
    t = targets_from_labels(None, rows)
    assert t.malignant == 1.0 and t.lung_rads == 4 and t.nodule_type == 0 and t.n_nodules == 2
    assert math.isnan(t.growth_mm)


def test_small_nodules_survive_downsampling() -> None:
    from lungvl_model.data.preprocess import resample_labels

    lab = np.zeros((60, 60, 60), np.uint8)
    z, y, x = np.mgrid[:60, :60, :60]
    lab[(z - 31) ** 2 + (y - 22) ** 2 + (x - 37) ** 2 <= 4] = 1  # a 5 mm nodule at 1 mm spacing
    lab[40:50, 40:50, 40:50] = 2
    plain = np.rint(resample_labels(lab, (1.0, 1.0, 1.0), (5.0, 5.0, 5.0))).astype(int)
    kept = resample_labels(lab, (1.0, 1.0, 1.0), (5.0, 5.0, 5.0), keep_small=True)
    assert (kept == 1).sum() >= 1 and (kept == 2).sum() >= 8
    assert (kept > 0).sum() >= (plain > 0).sum()
