"""A hospital's export as IT hands it over: DICOM folders, labels.csv and site.toml nobody here has seen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom

from tests.bad_inputs.framework import Case
from tests.conftest import write_mini_site

GOOD_LABELS = (
    "study_uid,level,nodule_id,longest_diameter_mm,mean_diameter_mm,type,lung_rads\n"
    "1.2.826.0.1.3680043.10.2.1,nodule,1,7,6,solid,3\n"
)


def site(change: Callable[[Path], None], *extra: str) -> Callable[[Path], list[str]]:
    """``lungvl site check`` on a 3-study mini site changed by ``change(site_dir)``."""

    def setup(tmp: Path) -> list[str]:
        root = tmp / "site"
        write_mini_site(root)
        change(root)
        return ["site", "check", str(root), *extra]

    return setup


def _series_files(root: Path, study: int = 0) -> list[Path]:
    return sorted((root / "dicom" / f"patient{study}" / "ct").glob("*.dcm"))


def _all_files(root: Path) -> list[Path]:
    return sorted((root / "dicom").rglob("*.dcm"))


def _edit_all(edit: Callable[[pydicom.Dataset], None]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        for p in _all_files(root):
            ds = pydicom.dcmread(p)
            edit(ds)
            ds.save_as(p)

    return change


def _labels(text: bytes | str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (root / "labels.csv").write_bytes(data)

    return change


def _toml(text: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        (root / "site.toml").write_text(text, encoding="utf-8")

    return change


def _slice_tag(study: int, index: int, keyword: str, value: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        p = _series_files(root, study)[index]
        ds = pydicom.dcmread(p)
        setattr(ds, keyword, value)
        ds.save_as(p)

    return change


def _private_tag(root: Path) -> None:
    p = _series_files(root)[3]
    ds = pydicom.dcmread(p)
    block = ds.private_block(0x0011, "ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", "patient card 12345")
    ds.save_as(p)


def _dicom_cases() -> list[Case]:
    def every_file(action: Callable[[Path], None]) -> Callable[[Path], None]:
        def change(root: Path) -> None:
            for p in _all_files(root):
                action(p)

        return change

    def truncate(p: Path) -> None:
        p.write_bytes(p.read_bytes()[:300])

    def drop_slice(root: Path) -> None:
        for i in range(3):
            _series_files(root, i)[4].unlink()

    def modality_mr(ds: pydicom.Dataset) -> None:
        ds.Modality = "MR"

    def no_pixels(ds: pydicom.Dataset) -> None:
        del ds.PixelData

    def tilt(ds: pydicom.Dataset) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]

    def uneven(root: Path) -> None:
        for i in range(3):
            files = _series_files(root, i)
            ds = pydicom.dcmread(files[5])
            pos = list(ds.ImagePositionPatient)
            pos[2] = float(pos[2]) + 1.1
            ds.ImagePositionPatient = pos
            ds.save_as(files[5])

    def text_files(root: Path) -> None:
        for p in _all_files(root):
            p.write_text("this is not DICOM\n")

    def no_dicom_folder(root: Path) -> None:
        import shutil

        shutil.rmtree(root / "dicom")

    spec: list[tuple[str, Callable[[Path], list[str]], int, tuple[str, ...]]] = [
        ("all-truncated", site(every_file(truncate)), 1, ("0 usable",)),
        ("all-empty-files", site(every_file(lambda p: p.write_bytes(b""))), 1, ("0 usable",)),
        ("all-text-files", site(text_files), 1, ("0 usable",)),
        ("missing-slice", site(drop_slice), 1, ("0 usable",)),
        ("modality-mr", site(_edit_all(modality_mr)), 1, ("0 usable",)),
        ("no-pixel-data", site(_edit_all(no_pixels)), 1, ("0 usable",)),
        ("gantry-tilt", site(_edit_all(tilt)), 1, ("0 usable",)),
        ("uneven-spacing", site(uneven), 1, ("0 usable",)),
        ("no-dicom-folder", site(no_dicom_folder), 2, ("dicom",)),
        ("site-missing", lambda t: ["site", "check", str(t / "nosite")], 2, ("nosite",)),
        (
            "phi-second-slice-fail",
            site(_slice_tag(1, 1, "PatientName", "Doe^Jane"), "--fail-on-phi"),
            1,
            ("PatientName", "Doe^Jane"),
        ),
        ("phi-patient-id-fail", site(lambda r: None, "--fail-on-phi"), 1, ("PatientID", "SYN000")),
        ("phi-private-tag-fail", site(_private_tag, "--fail-on-phi"), 1, ("private",)),
        (
            "phi-burned-in-fail",
            site(_slice_tag(2, 6, "BurnedInAnnotation", "YES"), "--fail-on-phi"),
            1,
            ("BurnedInAnnotation",),
        ),
        (
            "phi-address-fail",
            site(_slice_tag(0, 9, "PatientAddress", "1 Main Street"), "--fail-on-phi"),
            1,
            ("PatientAddress",),
        ),
    ]
    cases = [Case(f"dicom-site-{cid}", "dicom", setup, code, names) for cid, setup, code, names in spec]

    def explain(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
        from tests.bad_inputs.cases_state import _micro_checkpoint

        def setup(tmp: Path) -> list[str]:
            return [
                "explain",
                "--model",
                str(_micro_checkpoint()),
                "--out",
                str(tmp / "out"),
                "--dicom",
                str(make(tmp)),
            ]

        return setup

    def empty_dir(tmp: Path) -> Path:
        (tmp / "series").mkdir()
        return tmp / "series"

    def text_dir(tmp: Path) -> Path:
        (tmp / "series").mkdir()
        for i in range(3):
            (tmp / "series" / f"{i}.dcm").write_text("not dicom")
        return tmp / "series"

    def truncated_series(tmp: Path) -> Path:
        write_mini_site(tmp / "s", n_studies=1)
        files = _series_files(tmp / "s")
        files[2].write_bytes(files[2].read_bytes()[:400])
        return files[0].parent

    def one_slice(tmp: Path) -> Path:
        write_mini_site(tmp / "s", n_studies=1)
        for p in _series_files(tmp / "s")[1:]:
            p.unlink()
        return tmp / "s" / "dicom" / "patient0" / "ct"

    cases += [
        Case("dicom-explain-empty-folder", "dicom", explain(empty_dir), 2, ("series",)),
        Case("dicom-explain-text-files", "dicom", explain(text_dir), 2, ("series",)),
        Case("dicom-explain-truncated-slice", "dicom", explain(truncated_series), 2, ("series",)),
        Case("dicom-explain-one-slice", "dicom", explain(one_slice), 2, ("slice",)),
        Case("dicom-explain-missing-folder", "dicom", explain(lambda t: t / "none"), 2, ("none",)),
        Case(
            "dicom-explain-a-file",
            "dicom",
            explain(lambda t: (t / "f.dcm").write_bytes(b"x") and t / "f.dcm"),
            2,
            ("f.dcm",),
        ),
    ]
    return cases


def _label_cases() -> list[Case]:
    head = "study_uid,level,nodule_id,longest_diameter_mm,mean_diameter_mm,type,lung_rads\n"
    uid = "1.2.826.0.1.3680043.10.2.1"
    spec: list[tuple[str, bytes | str, tuple[str, ...]]] = [
        ("dropped-level-column", "study_uid,nodule_id\n" + uid + ",1\n", ("labels.csv", "level")),
        ("text-in-number", head + f"{uid},nodule,1,seven,6,solid,3\n", ("labels.csv", "longest_diameter_mm", "seven")),
        ("negative-size", head + f"{uid},nodule,1,-4,6,solid,3\n", ("labels.csv", "longest_diameter_mm", "-4")),
        ("huge-size", head + f"{uid},nodule,1,1e6,6,solid,3\n", ("labels.csv", "longest_diameter_mm")),
        ("unknown-lung-rads", head + f"{uid},nodule,1,7,6,solid,5\n", ("labels.csv", "lung_rads", "'5'")),
        ("unknown-type", head + f"{uid},nodule,1,7,6,ground_glass,3\n", ("labels.csv", "type", "ground_glass")),
        ("unknown-level", head + f"{uid},lesion,1,7,6,solid,3\n", ("labels.csv", "level", "lesion")),
        ("nodule-id-zero", head + f"{uid},nodule,0,7,6,solid,3\n", ("labels.csv", "nodule_id", "0")),
        ("nodule-id-float", head + f"{uid},nodule,1.5,7,6,solid,3\n", ("labels.csv", "nodule_id", "1.5")),
        ("unknown-study", head + "9.9.9,nodule,1,7,6,solid,3\n", ("labels.csv", "9.9.9")),
        ("unknown-column", "study_uid,level,diamter_mm\n" + uid + ",nodule,7\n", ("labels.csv", "diamter_mm")),
        ("empty-file", b"", ("labels.csv",)),
        ("non-utf8", head.encode() + uid.encode() + b",nodule,1,7,6,solide \xe9,3\n", ("labels.csv", "UTF-8")),
        ("short-row", head + f"{uid},nodule\n", ("labels.csv",)),
        ("long-row", head + f"{uid},nodule,1,7,6,solid,3,extra,cells\n", ("labels.csv",)),
        ("empty-study-uid", head + ",nodule,1,7,6,solid,3\n", ("labels.csv", "study_uid")),
        ("age-out-of-range", "study_uid,level,age\n" + uid + ",study,200\n", ("labels.csv", "age", "200")),
        ("sex-unknown", "study_uid,level,sex\n" + uid + ",study,X\n", ("labels.csv", "sex", "X")),
        (
            "malignant-not-flag",
            "study_uid,level,malignant\n" + uid + ",study,yes\n",
            ("labels.csv", "malignant", "yes"),
        ),
        (
            "brock-over-one",
            "study_uid,level,brock_probability\n" + uid + ",study,1.5\n",
            ("labels.csv", "brock_probability"),
        ),
    ]
    cases = [Case(f"labels-{cid}", "labels", site(_labels(text)), 1, names) for cid, text, names in spec]
    many = head + f"{uid},nodule,1,x,6,solid,3\n" * 20_000
    cases.append(Case("labels-20k-bad-rows-summarised", "labels", site(_labels(many)), 1, ("labels.csv", "more")))
    return cases


def _site_toml_cases() -> list[Case]:
    spec: list[tuple[str, str, tuple[str, ...]]] = [
        ("syntax-error", '[site]\nname = "a\n', ("site.toml",)),
        ("privacy-budget-negative", '[site]\nname = "a"\n[privacy]\nepsilon_budget = -1.0\n', ("epsilon_budget", "-1")),
        ("privacy-budget-text", '[site]\nname = "a"\n[privacy]\nepsilon_budget = "lots"\n', ("epsilon_budget", "lots")),
        ("privacy-delta-one", '[site]\nname = "a"\n[privacy]\ndelta = 1.0\n', ("delta",)),
        (
            "privacy-unknown-key",
            '[site]\nname = "a"\n[privacy]\nepsilon_budjet = 3.0\n',
            ("[privacy]", "epsilon_budjet"),
        ),
        ("privacy-max-rounds-float", '[site]\nname = "a"\n[privacy]\nmax_rounds = 2.5\n', ("max_rounds", "2.5")),
        ("privacy-min-eval-zero", '[site]\nname = "a"\n[privacy]\nmin_eval_studies = 0\n', ("min_eval_studies", "0")),
        (
            "privacy-require-dp-text",
            '[site]\nname = "a"\n[privacy]\nrequire_dp_sgd = "yes"\n',
            ("require_dp_sgd", "yes"),
        ),
        ("holdout-too-big", '[site]\nname = "a"\n[privacy]\nholdout_fraction = 1.0\n', ("holdout_fraction",)),
        (
            "federation-bad-address",
            '[site]\nname = "a"\n[federation]\nsuperlink = "nohostport"\n'
            'root_certificates = "ca.crt"\nprivate_key = "k"\n',
            ("[federation]", "superlink", "nohostport"),
        ),
        (
            "federation-unknown-key",
            '[site]\nname = "a"\n[federation]\nsuperlinks = "h:1"\nroot_certificates = "ca.crt"\nprivate_key = "k"\n',
            ("[federation]", "superlinks"),
        ),
        (
            "federation-port-text",
            '[site]\nname = "a"\n[federation]\nsuperlink = "h:1"\nroot_certificates = "c"\n'
            'private_key = "k"\nruntime_port = "x"\n',
            ("runtime_port",),
        ),
        ("no-site-table", '[sight]\nname = "a"\n', ("site.toml",)),
    ]
    return [Case(f"site-toml-{cid}", "site_toml", site(_toml(text)), 2, names) for cid, text, names in spec]


CASES: list[Case] = _dicom_cases() + _label_cases() + _site_toml_cases()
