"""LIDC-IDRI import: XML parsing, rasterisation, clustering, consensus and the site writer."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from lungvl_model.data.dicom_io import read_series_dir, write_ct_series
from lungvl_model.data.lidc import (
    LidcNodule,
    LidcReadingSession,
    LidcReadMessage,
    LidcRoi,
    annotate_series,
    cluster_nodules,
    consensus_mask,
    fill_contour,
    import_lidc,
    parse_lidc_xml,
    reader_nodules,
    slice_sop_uids,
    summarize_ratings,
    texture_to_type,
)
from lungvl_model.data.measure import equivalent_sphere_diameter
from lungvl_model.data.nifti_io import read_label_nifti
from lungvl_model.data.site_layout import LABEL_COLUMNS, SiteManifest, mask_path, read_labels, read_reports
from lungvl_model.data.volume import CTVolume

LIDC_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "lidc"
LUNA16_DIAMETER_MM = 23.35  # LUNA16 annotations.csv, LIDC-IDRI-0001 large nodule

NS = "http://www.nih.gov"


# ---------------------------------------------------------------------------------------------
# Synthetic LIDC case: a sphere in a small CT, contoured by hand-built readers
# ---------------------------------------------------------------------------------------------


def _circle_edge(cx: float, cy: float, r: float) -> list[tuple[int, int]]:
    """Ordered boundary pixels (x, y) of a disc, as an LIDC edge map."""
    pts: list[tuple[int, int]] = []
    for a in np.linspace(0, 2 * np.pi, 720, endpoint=False):
        p = (int(round(cx + r * np.cos(a))), int(round(cy + r * np.sin(a))))
        if not pts or pts[-1] != p:
            pts.append(p)
    if pts[0] == pts[-1]:
        pts.pop()
    return pts


def _roi_xml(z: float, sop: str, pts: list[tuple[int, int]], inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
    return (
        f"<roi><imageZposition>{z:.6f} </imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
        f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"
    )


def _nodule_xml(nid: str, rois: list[str], chars: dict[str, int] | None) -> str:
    ch = ""
    if chars is not None:
        ch = "<characteristics>" + "".join(f"<{k}>{v}</{k}>" for k, v in chars.items()) + "</characteristics>"
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID>{ch}{''.join(rois)}</unblindedReadNodule>"


def _message_xml(study: str, series: str, sessions: list[list[str]]) -> str:
    body = "".join(
        f"<readingSession><servicingRadiologistID>R{i}</servicingRadiologistID>{''.join(nods)}</readingSession>"
        for i, nods in enumerate(sessions)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><LidcReadMessage xmlns="{NS}"><ResponseHeader>'
        f"<SeriesInstanceUid>{series}</SeriesInstanceUid><StudyInstanceUID>{study}</StudyInstanceUID>"
        f"</ResponseHeader>{body}</LidcReadMessage>"
    )


CHARS = {
    "subtlety": 5,
    "internalStructure": 1,
    "calcification": 6,
    "sphericity": 4,
    "margin": 4,
    "lobulation": 1,
    "spiculation": 1,
    "texture": 5,
    "malignancy": 3,
}


def _make_case(
    folder: Path,
    radii_px: tuple[float, ...] = (6, 8, 10),
    *,
    study: str = "1.2.826.0.1.3680043.8.498.1",
    series: str = "1.2.826.0.1.3680043.8.498.2",
) -> tuple[CTVolume, dict[int, str]]:
    """A 12x64x64 CT with a dense cylinder on slices 4-7; reader k contours a disc of radius radii_px[k]."""
    spacing = (2.5, 0.7, 0.7)
    hu = np.full((12, 64, 64), -850.0, dtype=np.float32)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 <= 10.5**2
    hu[4:8][:, disc] = 30.0
    vol = CTVolume(hu=hu, spacing=spacing, origin=(-22.0, -22.0, -100.0), study_uid=study, series_uid=series)
    files = write_ct_series(vol, folder, tags={"PatientID": "SYN-0001", "StudyDate": "20000101"})
    vol = read_series_dir(folder)
    sops = slice_sop_uids(files, vol)
    k_to_sop = {k: s for s, k in sops.items()}
    sessions = []
    for i, r in enumerate(radii_px):
        rois = [_roi_xml(-100.0 + 2.5 * k, k_to_sop[k], _circle_edge(30, 32, r)) for k in range(4, 8)]
        small = _nodule_xml(f"small{i}", [_roi_xml(-95.0, k_to_sop[2], [(50, 10)])], None)
        sessions.append([_nodule_xml(f"N{i}", rois, CHARS), small])
    (folder / "001.xml").write_text(_message_xml(vol.study_uid, vol.series_uid, sessions), encoding="utf-8")
    return vol, k_to_sop


# ---------------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------------


def test_fill_contour_includes_boundary_and_holes_exclude_interior() -> None:
    square = [(3, 3), (7, 3), (7, 7), (3, 7)]  # (x, y)
    full = fill_contour(np.array(square), (12, 12))
    assert full.sum() == 25 and full[3, 3] and full[7, 7] and not full[2, 3]
    inner = fill_contour(np.array(square), (12, 12), include_boundary=False)
    assert inner.sum() == 9 and inner[5, 5] and not inner[3, 5]
    # x = column, y = row
    wide = fill_contour(np.array([(1, 2), (9, 2), (9, 4), (1, 4)]), (12, 12))
    assert wide[:, 1:10].any(axis=0).all() and wide.any(axis=1).sum() == 3


def test_reader_mask_holes_and_slice_fallback_by_z(tmp_path: Path) -> None:
    vol = CTVolume(hu=np.zeros((3, 20, 20), np.float32), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, -10.0))
    outer = np.array([(2, 2), (12, 2), (12, 12), (2, 12)])
    hole = np.array([(5, 5), (9, 5), (9, 9), (5, 9)])
    rois = (
        LidcRoi(-10.0, "sop-a", True, outer),
        LidcRoi(-10.0, "sop-a", False, hole),
        LidcRoi(-8.1, "unknown-sop", True, outer),  # found by nearest z (slice 1 at -8.0)
        LidcRoi(-30.0, "unknown-sop", True, outer),  # matches no slice: ignored with a warning
    )
    session = LidcReadingSession(0, "R", (LidcNodule("n", {}, rois),))
    msg = LidcReadMessage(tmp_path / "x.xml", "", "", [session])
    warnings: list[str] = []
    (nod,) = reader_nodules(msg, vol, {"sop-a": 0}, warnings)
    assert nod.offset == (0, 2, 2) and nod.mask is not None and nod.mask.shape == (2, 11, 11)
    assert nod.mask[0].sum() == 121 - 9  # the hole's boundary stays, its 3x3 interior is cut out
    assert not nod.mask[0, 5, 5] and nod.mask[0, 3, 3] and nod.mask[1].sum() == 121
    assert any("match no slice" in w for w in warnings)


def test_consensus_rule_two_of_three_in_one_of_three_out() -> None:
    a = np.zeros((1, 1, 4), bool)
    b, c = a.copy(), a.copy()
    a[0, 0, [0, 1, 2]] = True  # voxel 0: 3 of 3, voxel 1: 2 of 3, voxel 2: 1 of 3, voxel 3: 0 of 3
    b[0, 0, [0, 1]] = True
    c[0, 0, [0]] = True
    assert consensus_mask([a, b, c]).ravel().tolist() == [True, True, False, False]
    # 4 readers: 2 of 4 is enough (>= 50 %); 2 readers: 1 of 2
    assert consensus_mask([a, b, c, np.zeros_like(a)]).ravel().tolist() == [True, True, False, False]
    assert consensus_mask([c, b]).ravel().tolist() == [True, True, False, False]


def test_consensus_of_three_reader_toy_case(tmp_path: Path) -> None:
    vol, _ = _make_case(tmp_path / "case", radii_px=(6, 8, 10))
    msg = parse_lidc_xml(tmp_path / "case" / "001.xml")
    files = sorted((tmp_path / "case").glob("*.dcm"))
    ann = annotate_series(msg, vol, slice_sop_uids(files, vol))
    assert len(ann.nodules) == 1 and ann.n_readers == 3
    nod = ann.nodules[0]
    assert nod.n_readers == 3 and nod.reader_ids == ["R0", "R1", "R2"]
    # discs of radius 6 < 8 < 10 are nested: 2 of 3 readers include exactly the radius-8 disc
    disc8 = fill_contour(np.array(_circle_edge(30, 32, 8)), (64, 64))
    expected = np.zeros(vol.shape, bool)
    expected[4:8] = disc8
    assert np.array_equal(ann.label_map == 1, expected)
    disc10 = fill_contour(np.array(_circle_edge(30, 32, 10)), (64, 64))
    assert not (ann.label_map[5][disc10 & ~disc8]).any()  # only reader 3 includes the outer ring
    assert nod.measurement.n_voxels == expected.sum()
    assert nod.ratings.type == "solid" and nod.ratings.malignancy_score == 3.0
    assert nod.ratings.margin == "smooth" and nod.ratings.spiculation == 0 and nod.ratings.calcification == 0
    assert ann.n_small == 1  # the three readers' < 3 mm points are one nodule
    assert 17 * 0.7 <= nod.measurement.longest_diameter_mm <= 19 * 0.7  # radius-8 px digital disc


def test_cluster_joins_close_nodules_of_different_readers_only() -> None:
    pts = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert cluster_nodules(pts, [0, 1], [6.0, 6.0]) == [[0, 1]]
    far = np.array([[0.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    assert cluster_nodules(far, [0, 1], [6.0, 6.0]) == [[0], [1]]
    # the same reader never contributes twice to one nodule
    assert cluster_nodules(pts, [0, 0], [6.0, 6.0]) == [[0], [1]]
    # large nodules join farther apart: half the larger diameter (30 mm -> 15 mm)
    mid = np.array([[0.0, 0.0, 0.0], [12.0, 0.0, 0.0]])
    assert cluster_nodules(mid, [0, 1], [30.0, 28.0]) == [[0, 1]]
    assert cluster_nodules(mid, [0, 1], [6.0, 6.0]) == [[0], [1]]
    # three readers: one cluster, plus a far nodule of reader 1
    three = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [50, 0, 0]], dtype=float)
    assert cluster_nodules(three, [0, 1, 2, 1], [8, 8, 8, 8]) == [[0, 1, 2], [3]]


def test_ratings_conventions() -> None:
    assert [texture_to_type(t) for t in (1, 2, 2.4, 2.5, 3, 3.49, 3.5, 4, 5)] == [
        *["non_solid"] * 3,
        *["part_solid"] * 3,
        *["solid"] * 3,
    ]
    r = summarize_ratings(
        [
            {"malignancy": 5, "texture": 5, "spiculation": 4, "lobulation": 3, "calcification": 6},
            {"malignancy": 4, "texture": 4, "spiculation": 2, "lobulation": 3, "calcification": 3},
            {},  # a reader without characteristics is tolerated
        ]
    )
    assert r.malignancy_score == 4.5 and r.type == "solid" and r.spiculation == 1 and r.margin == "spiculated"
    assert r.calcification == 0 and not r.benign_pattern  # 1 of 2 raters: no majority
    r2 = summarize_ratings([{"calcification": 4, "lobulation": 4, "spiculation": 1}, {"calcification": 4}])
    assert r2.calcification == 1 and not r2.benign_pattern and r2.margin == "lobulated"
    assert summarize_ratings([{}]).type is None


def test_malformed_xml_raises_value_error_naming_file_and_element(tmp_path: Path) -> None:
    bad = tmp_path / "broken.xml"
    bad.write_text("<LidcReadMessage><readingSession>", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.xml"):
        parse_lidc_xml(bad)
    edge = "<edgeMap><xCoord>1</xCoord><yCoord>1</yCoord></edgeMap>"
    roi = f"<roi><imageZposition>abc</imageZposition>{edge}</roi>"
    bad2 = tmp_path / "bad_z.xml"
    bad2.write_text(_message_xml("1", "2", [[_nodule_xml("N1", [roi], None)]]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_z\.xml.*imageZposition"):
        parse_lidc_xml(bad2)
    bad3 = tmp_path / "no_coord.xml"
    roi3 = "<roi><imageZposition>1</imageZposition><edgeMap><xCoord>1</xCoord></edgeMap></roi>"
    bad3.write_text(_message_xml("1", "2", [[_nodule_xml("N1", [roi3], None)]]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_coord\.xml.*edgeMap\[0\]/yCoord"):
        parse_lidc_xml(bad3)


def test_import_writes_good_case_and_reports_broken_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    vol, _ = _make_case(src / "LIDC-SYN-0001" / "1.2.3" / "1.2.3.4")
    broken = src / "LIDC-SYN-0002" / "1.2.5" / "1.2.5.6"
    _make_case(broken, study="1.2.826.0.1.3680043.8.498.3", series="1.2.826.0.1.3680043.8.498.4")
    (broken / "001.xml").write_text(
        f'<LidcReadMessage xmlns="{NS}"><readingSession><unblindedReadNodule>', encoding="utf-8"
    )
    calls: list[tuple[int, int, str]] = []
    out = tmp_path / "site"
    summary = import_lidc(src, out, progress=lambda d, t, c: calls.append((d, t, c)))
    assert [c.case for c in summary.ok] == ["LIDC-SYN-0001"]
    assert [c.case for c in summary.failed] == ["LIDC-SYN-0002"]
    assert "001.xml" in summary.failed[0].reason
    assert calls == [(1, 2, "LIDC-SYN-0001"), (2, 2, "LIDC-SYN-0002")]
    rows, problems = read_labels(out / "labels.csv")
    assert not problems and {r["study_uid"] for r in rows} == {vol.study_uid}
    assert [r["level"] for r in rows] == ["nodule", "study"]
    assert rows[1]["nodule_count"] == "1" and rows[0]["n_readers"] == "3"
    placed = sorted((out / "dicom" / vol.study_uid / vol.series_uid).iterdir())
    assert len(placed) == 12 and all(p.is_symlink() for p in placed)
    assert read_label_nifti(mask_path(out, vol.series_uid), vol).max() == 1
    assert not (out / "dicom" / "1.2.826.0.1.3680043.8.498.3").exists()
    # a single case folder is accepted as src too
    one = import_lidc(src / "LIDC-SYN-0001", tmp_path / "site1")
    assert [c.case for c in one.ok] == ["LIDC-SYN-0001"]


# ---------------------------------------------------------------------------------------------
# The real case LIDC-IDRI-0001
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidc_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    if not (LIDC_DIR / "LIDC-IDRI-0001").is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found under {LIDC_DIR} (shared test data absent)")
    out = tmp_path_factory.mktemp("lidc_site")
    return out, import_lidc(LIDC_DIR, out)


def test_lidc_0001_large_nodule(lidc_site: tuple[Path, object]) -> None:
    out, summary = lidc_site
    assert not summary.failed, [c.reason for c in summary.failed]  # type: ignore[attr-defined]
    (case,) = summary.ok  # type: ignore[attr-defined]
    assert case.case == "LIDC-IDRI-0001" and case.n_readers == 4
    (nod,) = case.nodules  # one nodule >= 3 mm; the other marks are < 3 mm points
    m = nod.measurement
    print(
        f"\nLIDC-IDRI-0001 nodule 1: longest {m.longest_diameter_mm} mm, short {m.short_axis_mm} mm, "
        f"mean {m.mean_diameter_mm} mm, volume {m.volume_mm3} mm3, "
        f"equivalent sphere {equivalent_sphere_diameter(m.volume_mm3):.2f} mm, z {nod.centroid_lps[2]:.1f} mm"
    )
    assert abs(nod.centroid_lps[2] - (-115.0)) < 5.0
    assert nod.n_readers == 4
    assert nod.ratings.malignancy_score >= 4 and nod.ratings.type == "solid"
    # LUNA16's 23.35 mm is the readers' mean volume-equivalent sphere diameter, not an axial diameter:
    assert abs(equivalent_sphere_diameter(m.volume_mm3) - LUNA16_DIAMETER_MM) <= 0.15 * LUNA16_DIAMETER_MM
    # the readers' own contours span 31-34 mm on the widest slice (edge-map pixels included)
    assert 28.0 <= m.longest_diameter_mm <= 38.0
    assert m.short_axis_mm <= m.longest_diameter_mm and 24.0 <= m.mean_diameter_mm <= 34.0
    assert nod.lung_rads in ("", "4B")  # solid >= 15 mm at baseline ("" while lung_rads is unavailable)
    assert case.n_small == 3


def test_lidc_0001_label_map_aligns_with_series(lidc_site: tuple[Path, object]) -> None:
    out, summary = lidc_site
    (case,) = summary.ok  # type: ignore[attr-defined]
    series_dir = out / "dicom" / case.study_uid / case.series_uid
    files = sorted(series_dir.iterdir())
    assert len(files) == 133 and all(f.is_symlink() for f in files)
    vol = read_series_dir(series_dir)
    labels = read_label_nifti(mask_path(out, case.series_uid), vol)  # raises on shape/affine mismatch
    assert labels.shape == vol.shape == (133, 512, 512)
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert float(vol.hu[labels == 1].mean()) > -400.0
    zyx = np.argwhere(labels == 1).mean(axis=0)
    assert np.allclose(vol.voxel_to_lps(zyx), case.nodules[0].centroid_lps, atol=1.0)


def test_lidc_0001_site_files(lidc_site: tuple[Path, object]) -> None:
    out, summary = lidc_site
    (case,) = summary.ok  # type: ignore[attr-defined]
    rows, problems = read_labels(out / "labels.csv")
    assert not problems and len(rows) == 2
    assert set(rows[0]) == set(LABEL_COLUMNS)
    nodule, study = rows
    assert nodule["level"] == "nodule" and nodule["nodule_id"] == "1"
    assert nodule["series_uid"] == case.series_uid
    assert float(nodule["longest_diameter_mm"]) > 20 and float(nodule["malignancy_score"]) >= 4
    assert nodule["type"] == "solid" and nodule["n_readers"] == "4" and nodule["malignant"] == ""
    assert nodule["spiculation"] in ("0", "1") and nodule["margin"] in ("smooth", "lobulated", "spiculated")
    assert nodule["lobe"] == "" and float(nodule["centroid_z_mm"]) < -100
    assert study["level"] == "study" and study["nodule_count"] == "1"
    assert study["lung_rads"] == nodule["lung_rads"]
    reports, rproblems = read_reports(out / "reports.jsonl")
    assert not rproblems and set(reports) == {case.study_uid}
    text = reports[case.study_uid].text
    assert "LIDC reader annotations" in text and "not a radiologist's report" in text
    assert "4 of 4 readers" in text
    assert json.loads((out / "reports.jsonl").read_text().splitlines()[0])["study_date"] == "20000101"
    manifest = SiteManifest.from_toml(out / "site.toml")
    assert manifest.name == "lidc" and manifest.cohort == "lidc" and "CC BY 3.0" in manifest.extra["license"]
    assert "Creative Commons Attribution 3.0" in manifest.description
    assert len(tomllib.loads((out / "site.toml").read_text())["site"]["references"]) == 3


def test_lung_rads_empty_without_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lungvl_model.data.lidc_consensus as consensus

    monkeypatch.setattr(consensus, "_lung_rads_module", lambda: None)
    _make_case(tmp_path / "src" / "LIDC-SYN-0001")
    summary = import_lidc(tmp_path / "src", tmp_path / "site")
    (case,) = summary.ok
    assert case.nodules[0].lung_rads == "" and case.lung_rads == ""
    rows, _ = read_labels(tmp_path / "site" / "labels.csv")
    assert [r["lung_rads"] for r in rows] == ["", ""]
