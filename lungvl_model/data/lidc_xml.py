"""Parse LIDC-IDRI reader annotations (``LidcReadMessage`` XML, namespace ``http://www.nih.gov``).

One XML file holds the blinded/unblinded reads of one CT series: a ``readingSession`` per radiologist,
each with ``unblindedReadNodule`` entries (nodules >= 3 mm: per-slice contours and nine
characteristics; nodules < 3 mm: a single point and no characteristics) and ``nonNodule`` points.

Contours (``roi``) give the slice by ``imageSOP_UID`` and ``imageZposition`` (patient z, mm), an
``inclusion`` flag (``FALSE`` = a hole cut out of the nodule) and ``edgeMap`` pixel coordinates with
``xCoord`` = column and ``yCoord`` = row of the image.

Only :mod:`xml.etree.ElementTree` is used. A file that does not follow this structure raises
``ValueError`` naming the file and the element.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LIDC_NS = "http://www.nih.gov"
ROOT_TAG = "LidcReadMessage"

#: Valid rating range of each LIDC characteristic (calcification 6 = absent, internalStructure 1..4).
CHARACTERISTIC_RANGES: dict[str, tuple[int, int]] = {
    "subtlety": (1, 5),
    "internalStructure": (1, 4),
    "calcification": (1, 6),
    "sphericity": (1, 5),
    "margin": (1, 5),
    "lobulation": (1, 5),
    "spiculation": (1, 5),
    "texture": (1, 5),
    "malignancy": (1, 5),
}


@dataclass(frozen=True)
class LidcRoi:
    """One contour of a nodule on one slice.

    Attributes:
        z_position: ``imageZposition`` (patient z of the slice, mm).
        sop_uid: ``imageSOP_UID`` of the slice ("" when absent).
        inclusion: False for a hole (region excluded from the nodule).
        edge_map: ``(N, 2)`` int array of ``(x, y)`` = (column, row) pixel coordinates, in drawing order.
    """

    z_position: float
    sop_uid: str
    inclusion: bool
    edge_map: np.ndarray


@dataclass(frozen=True)
class LidcNodule:
    """One reader's mark of one nodule.

    Attributes:
        nodule_id: the reader's ``noduleID`` (unique only within the session).
        characteristics: rating per characteristic name (see :data:`CHARACTERISTIC_RANGES`); missing,
            empty or out-of-range ratings are absent.
        rois: the per-slice contours.
    """

    nodule_id: str
    characteristics: dict[str, int]
    rois: tuple[LidcRoi, ...]

    @property
    def is_small(self) -> bool:
        """True for a nodule < 3 mm: every roi is a single point (no contour)."""
        return all(len(r.edge_map) <= 1 for r in self.rois)


@dataclass(frozen=True)
class LidcNonNodule:
    """A ``nonNodule`` point (a finding the reader judged not to be a nodule).

    Attributes:
        non_nodule_id: ``nonNoduleID``.
        z_position: ``imageZposition`` (mm).
        sop_uid: ``imageSOP_UID``.
        locus: ``(x, y)`` = (column, row) pixel position.
    """

    non_nodule_id: str
    z_position: float
    sop_uid: str
    locus: tuple[int, int]


@dataclass(frozen=True)
class LidcReadingSession:
    """One radiologist's reading.

    Attributes:
        index: position of the session in the file (0-based); identifies the reader within the file.
        reader_id: ``servicingRadiologistID`` (anonymised; "" when absent).
        nodules: the nodules marked (>= 3 mm and < 3 mm).
        non_nodules: the non-nodule points.
    """

    index: int
    reader_id: str
    nodules: tuple[LidcNodule, ...]
    non_nodules: tuple[LidcNonNodule, ...] = ()


@dataclass
class LidcReadMessage:
    """A parsed LIDC annotation file.

    Attributes:
        path: the XML file.
        study_uid: ``StudyInstanceUID`` from the response header ("" when absent).
        series_uid: ``SeriesInstanceUid`` from the response header ("" when absent).
        sessions: the reading sessions.
        warnings: tolerated problems (out-of-range ratings...).
    """

    path: Path
    study_uid: str
    series_uid: str
    sessions: list[LidcReadingSession]
    warnings: list[str] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _child_text(elem: ET.Element, name: str) -> str | None:
    for c in elem:
        if _local(c.tag) == name:
            return (c.text or "").strip()
    return None


class _Ctx:
    """Error context: the file and the element path being parsed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, where: str, what: str) -> ValueError:
        return ValueError(f"{self.path}: malformed LIDC XML at {where}: {what}")


def _float(ctx: _Ctx, elem: ET.Element, name: str, where: str) -> float:
    text = _child_text(elem, name)
    if text is None or text == "":
        raise ctx.error(f"{where}/{name}", "missing")
    try:
        return float(text)
    except ValueError:
        raise ctx.error(f"{where}/{name}", f"not a number ({text!r})") from None


def _int(ctx: _Ctx, elem: ET.Element, name: str, where: str) -> int:
    text = _child_text(elem, name)
    if text is None or text == "":
        raise ctx.error(f"{where}/{name}", "missing")
    try:
        return int(float(text))
    except ValueError:
        raise ctx.error(f"{where}/{name}", f"not a number ({text!r})") from None


def _parse_characteristics(ctx: _Ctx, nod: ET.Element, where: str, warnings: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ch in _children(nod, "characteristics"):
        for name, (lo, hi) in CHARACTERISTIC_RANGES.items():
            text = _child_text(ch, name)
            if text is None or text == "":
                continue
            try:
                value = int(float(text))
            except ValueError:
                raise ctx.error(f"{where}/characteristics/{name}", f"not a number ({text!r})") from None
            if not lo <= value <= hi:
                warnings.append(f"{where}/characteristics/{name}: rating {value} outside {lo}..{hi}, ignored")
                continue
            out[name] = value
    return out


def _parse_roi(ctx: _Ctx, roi: ET.Element, where: str) -> LidcRoi:
    z = _float(ctx, roi, "imageZposition", where)
    sop = _child_text(roi, "imageSOP_UID") or ""
    inc_text = (_child_text(roi, "inclusion") or "TRUE").upper()
    if inc_text not in ("TRUE", "FALSE"):
        raise ctx.error(f"{where}/inclusion", f"expected TRUE or FALSE, got {inc_text!r}")
    pts = []
    for k, em in enumerate(_children(roi, "edgeMap")):
        ewhere = f"{where}/edgeMap[{k}]"
        pts.append((_int(ctx, em, "xCoord", ewhere), _int(ctx, em, "yCoord", ewhere)))
    if not pts:
        raise ctx.error(where, "roi without edgeMap points")
    return LidcRoi(z, sop, inc_text == "TRUE", np.asarray(pts, dtype=np.int64).reshape(-1, 2))


def is_lidc_xml(path: str | Path) -> bool:
    """Whether ``path`` is an XML file whose root element is ``LidcReadMessage`` (reads the first tag)."""
    try:
        for _event, elem in ET.iterparse(str(path), events=("start",)):
            return _local(elem.tag) == ROOT_TAG
    except (ET.ParseError, OSError):
        return False
    return False


def parse_lidc_xml(path: str | Path) -> LidcReadMessage:
    """Parse one LIDC annotation file.

    Args:
        path: the ``LidcReadMessage`` XML file.

    Returns:
        The reading sessions with their nodules.

    Raises:
        ValueError: unreadable or malformed file (not XML, wrong root element, a roi without a number
            where one is required...); the message names the file and the element.
    """
    p = Path(path)
    ctx = _Ctx(p)
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{p}: not well-formed XML ({e})") from e
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e})") from e
    if _local(root.tag) != ROOT_TAG:
        raise ctx.error(_local(root.tag), f"root element is {_local(root.tag)!r}, expected {ROOT_TAG!r}")
    study_uid = series_uid = ""
    for hdr in _children(root, "ResponseHeader"):
        study_uid = _child_text(hdr, "StudyInstanceUID") or study_uid
        series_uid = _child_text(hdr, "SeriesInstanceUid") or _child_text(hdr, "SeriesInstanceUID") or series_uid
    warnings: list[str] = []
    sessions: list[LidcReadingSession] = []
    for si, sess in enumerate(_children(root, "readingSession")):
        swhere = f"readingSession[{si}]"
        nodules = []
        for ni, nod in enumerate(_children(sess, "unblindedReadNodule")):
            nwhere = f"{swhere}/unblindedReadNodule[{ni}]"
            nid = _child_text(nod, "noduleID")
            if not nid:
                raise ctx.error(f"{nwhere}/noduleID", "missing")
            nwhere = f"{swhere}/unblindedReadNodule[{nid}]"
            rois = tuple(_parse_roi(ctx, r, f"{nwhere}/roi[{ri}]") for ri, r in enumerate(_children(nod, "roi")))
            if not rois:
                raise ctx.error(nwhere, "nodule without roi")
            chars = _parse_characteristics(ctx, nod, nwhere, warnings)
            nodules.append(LidcNodule(nid, chars, rois))
        non_nodules = []
        for ki, nn in enumerate(_children(sess, "nonNodule")):
            kwhere = f"{swhere}/nonNodule[{ki}]"
            loci = _children(nn, "locus")
            if not loci:
                raise ctx.error(kwhere, "nonNodule without locus")
            lwhere = f"{kwhere}/locus"
            locus = (_int(ctx, loci[0], "xCoord", lwhere), _int(ctx, loci[0], "yCoord", lwhere))
            non_nodules.append(
                LidcNonNodule(
                    _child_text(nn, "nonNoduleID") or "",
                    _float(ctx, nn, "imageZposition", kwhere),
                    _child_text(nn, "imageSOP_UID") or "",
                    locus,
                )
            )
        reader = _child_text(sess, "servicingRadiologistID") or ""
        sessions.append(LidcReadingSession(si, reader, tuple(nodules), tuple(non_nodules)))
    if not sessions:
        raise ctx.error(ROOT_TAG, "no readingSession element")
    return LidcReadMessage(p, study_uid, series_uid, sessions, warnings)
