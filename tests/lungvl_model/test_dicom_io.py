from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungvl_model.data.dicom_io import (
    SeriesError,
    read_series,
    read_series_dir,
    scan_dicom_tree,
    write_ct_series,
)
from lungvl_model.data.phi import phi_in_files
from tests.conftest import make_volume


def test_round_trip_values_and_geometry(tmp_path: Path) -> None:
    vol = make_volume()
    paths = write_ct_series(vol, tmp_path / "s", tags={"PatientID": "X1", "ConvolutionKernel": "B70f"})
    assert len(paths) == vol.shape[0]
    back = read_series_dir(tmp_path / "s")
    np.testing.assert_array_equal(back.hu, vol.hu)
    assert back.spacing == pytest.approx(vol.spacing, abs=1e-4)
    assert back.origin == pytest.approx(vol.origin, abs=1e-3)
    np.testing.assert_allclose(back.direction, np.eye(3), atol=1e-6)
    assert back.study_uid == vol.study_uid and back.series_uid == vol.series_uid
    assert back.meta["ConvolutionKernel"] == "B70f"
    # a voxel maps to the same LPS point in both
    np.testing.assert_allclose(back.voxel_to_lps([3, 5, 7]), vol.voxel_to_lps([3, 5, 7]), atol=1e-3)


def test_shuffled_files_and_nesting_are_sorted_along_normal(tmp_path: Path) -> None:
    vol = make_volume(seed=3)
    paths = write_ct_series(vol, tmp_path / "flat")
    random.Random(1).shuffle(paths)
    for i, p in enumerate(paths):  # random names in random sub-folders
        dst = tmp_path / "nested" / f"d{i % 3}" / f"x{random.Random(i).randint(0, 10**6)}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dst)
    scan = scan_dicom_tree(tmp_path / "nested")
    assert len(scan.series) == 1
    back = read_series(random.sample(next(iter(scan.series.values())).files, vol.shape[0]))
    np.testing.assert_array_equal(back.hu, vol.hu)


def test_reversed_slice_order_in_patient_space(tmp_path: Path) -> None:
    vol = make_volume()
    vol.direction = np.diag([1.0, 1.0, -1.0]) @ np.eye(3)  # slices stacked toward the feet
    vol.direction = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    write_ct_series(vol, tmp_path / "s")
    back = read_series_dir(tmp_path / "s")
    assert np.all(np.diff([back.voxel_to_lps([k, 0, 0])[2] for k in range(3)]) > 0)


def test_missing_slice_is_detected(tmp_path: Path) -> None:
    vol = make_volume()
    paths = write_ct_series(vol, tmp_path / "s")
    paths[5].unlink()
    with pytest.raises(SeriesError, match=r"missing slice") as e:
        read_series_dir(tmp_path / "s")
    assert vol.series_uid in str(e.value)


def test_uneven_spacing_and_duplicates(tmp_path: Path) -> None:
    vol = make_volume()
    paths = write_ct_series(vol, tmp_path / "s")
    ds = pydicom.dcmread(paths[4])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.8]
    ds.save_as(paths[4])
    with pytest.raises(SeriesError, match="uneven slice spacing"):
        read_series_dir(tmp_path / "s")
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] - 2.5]
    ds.save_as(paths[4])
    with pytest.raises(SeriesError, match="duplicate slice position"):
        read_series_dir(tmp_path / "s")


def test_gantry_tilt_is_detected(tmp_path: Path) -> None:
    vol = make_volume()
    paths = write_ct_series(vol, tmp_path / "s")
    for k, p in enumerate(paths):  # positions drift in y as z advances: a tilted acquisition
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * k, ipp[2]]
        ds.save_as(p)
    with pytest.raises(SeriesError, match="gantry tilt"):
        read_series_dir(tmp_path / "s")


def test_scan_skips_non_ct_localizer_garbage_with_reasons(tmp_path: Path) -> None:
    vol = make_volume()
    paths = write_ct_series(vol, tmp_path / "s")
    mr = pydicom.dcmread(paths[0])
    mr.Modality = "MR"
    mr.SOPInstanceUID = "1.2.3.4.5"
    mr.save_as(tmp_path / "s" / "mr.dcm")
    loc = pydicom.dcmread(paths[1])
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.SOPInstanceUID = "1.2.3.4.6"
    loc.SeriesInstanceUID = "1.2.3.4.7"
    loc.save_as(tmp_path / "s" / "scout.dcm")
    (tmp_path / "s" / "notes.bin").write_bytes(b"hello world, not a dicom")
    trunc = tmp_path / "s" / "broken.dcm"
    trunc.write_bytes(paths[2].read_bytes()[:300])
    scan = scan_dicom_tree(tmp_path)
    assert len(scan.series) == 1 and len(next(iter(scan.series.values())).files) == vol.shape[0]
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert "modality MR is not CT" in reasons["mr.dcm"]
    assert "localizer" in reasons["scout.dcm"]
    assert "not a DICOM file" in reasons["notes.bin"]
    assert "broken.dcm" in reasons


def test_phi_check_lists_identifying_tags(tmp_path: Path) -> None:
    vol = make_volume()
    paths = write_ct_series(
        vol, tmp_path / "s", tags={"PatientName": "Doe^Jane", "InstitutionName": "St Elsewhere", "PatientID": "A"}
    )
    found = {f.keyword: f.value for f in phi_in_files(paths)}
    assert {"PatientName": "Doe^Jane", "InstitutionName": "St Elsewhere", "PatientID": "A"}.items() <= found.items()
    clean = write_ct_series(make_volume(series_uid="1.2.3.9"), tmp_path / "c", tags={"PatientName": ""})
    assert phi_in_files(clean) == []
