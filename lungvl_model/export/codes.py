"""Coded concepts shared by the DICOM SEG and SR exports.

Standard codes (SNOMED CT, DCM, UCUM) where DICOM has one; lungvl's own concepts (the Lung-RADS v2022
category, the nodule attenuation type, the risk models) use the private coding scheme ``99LUNGVL``,
which the SR declares in its Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from lungvl_model.version import software_version

#: Private coding scheme designator for lungvl's own concepts.
SCHEME = "99LUNGVL"
MANUFACTURER = "lungvl"
MODEL_NAME = "lungvl explain"

NODULE_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
NODULE_TYPE = codes.SCT.Nodule
LUNG = codes.SCT.Lung
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
UPPER_LOBE = Code("45653009", "SCT", "Upper lobe of lung")
MIDDLE_LOBE_RIGHT = Code("72481006", "SCT", "Middle lobe of right lung")
LOWER_LOBE = Code("90572001", "SCT", "Lower lobe of lung")

#: lobe code of :func:`lungvl_model.inference.anatomy.lobe_from_position` → (structure, laterality)
LOBES: dict[str, tuple[Code, Code]] = {
    "RUL": (UPPER_LOBE, RIGHT),
    "RML": (MIDDLE_LOBE_RIGHT, RIGHT),
    "RLL": (LOWER_LOBE, RIGHT),
    "LUL": (UPPER_LOBE, LEFT),
    "LLL": (LOWER_LOBE, LEFT),
}

MM = Code("mm", "UCUM", "millimeter")
MM3 = Code("mm3", "UCUM", "cubic millimeter")
NO_UNITS = Code("1", "UCUM", "no units")
LONG_AXIS = codes.SCT.LongAxis
SHORT_AXIS = codes.SCT.ShortAxis
DIAMETER = codes.SCT.Diameter
MEAN = codes.SCT.Mean
VOLUME = codes.SCT.Volume
PROBABILITY_OF_CANCER = codes.DCM.ProbabilityOfCancer
FINDING = codes.DCM.Finding
IMPRESSION = codes.DCM.Impression
DEVICE = codes.DCM.Device
NONE = Code("260413007", "SCT", "None")
PROCEDURE = codes.LN.CTUnspecifiedBodyRegion

NODULE_ATTENUATION = Code("nodule-type", SCHEME, "Nodule attenuation type")
ATTENUATION = {
    "solid": Code("solid", SCHEME, "Solid"),
    "part_solid": Code("part-solid", SCHEME, "Part-solid"),
    "non_solid": Code("non-solid", SCHEME, "Non-solid (ground glass)"),
}
LUNG_RADS = Code("lung-rads", SCHEME, "Lung-RADS v2022 category")
LUNG_RADS_MODEL = Code("lung-rads-model", SCHEME, "Lung-RADS v2022 category, model head")
BROCK = Code("brock", SCHEME, "Brock (PanCan) model, measured features")
NODULE_RISK_HEAD = Code("nodule-risk-head", SCHEME, "lungvl nodule-level risk head")
STUDY_RISK = Code("study-risk", SCHEME, "lungvl study-level malignancy")
STUDY = Code("study", SCHEME, "Whole study")


def lung_rads_code(category: str) -> Code:
    """The coded Lung-RADS v2022 category (``"1"``, ``"2"``, ``"3"``, ``"4A"``, ``"4B"``, ``"4X"``, ``"0"``...).

    Raises:
        ValueError: an empty category.
    """
    cat = str(category).strip().upper()
    if not cat:
        raise ValueError("empty Lung-RADS category")
    return Code(f"LR-{cat}", SCHEME, f"Lung-RADS {cat}")


def attenuation_code(kind: str) -> Code:
    """The coded nodule attenuation type.

    Raises:
        ValueError: an unknown type (the message names it and the known ones).
    """
    try:
        return ATTENUATION[kind]
    except KeyError:
        raise ValueError(f"nodule type {kind!r} is not one of {sorted(ATTENUATION)}") from None


def finding_site(lobe: str) -> hd.sr.FindingSite:
    """The SR finding site of a lobe code; the whole lung when the lobe is unknown."""
    if lobe in LOBES:
        structure, side = LOBES[lobe]
        return hd.sr.FindingSite(anatomic_location=structure, laterality=side)
    return hd.sr.FindingSite(anatomic_location=LUNG)


def algorithm_name() -> str:
    """The algorithm's name as written into the SEG and SR."""
    return "lungvl"


def seg_algorithm() -> hd.AlgorithmIdentificationSequence:
    """Algorithm identification for the SEG's segments."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name(), family=codes.cid7162.ArtificialIntelligence, version=software_version()
    )


def sr_algorithm() -> hd.sr.AlgorithmIdentification:
    """Algorithm identification for the SR's measurement groups."""
    return hd.sr.AlgorithmIdentification(name=algorithm_name(), version=software_version())


def coding_scheme_identification() -> Dataset:
    """A Coding Scheme Identification Sequence item declaring ``99LUNGVL``."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "lungvl private concepts"
    item.CodingSchemeResponsibleOrganization = "lungvl"
    return item
