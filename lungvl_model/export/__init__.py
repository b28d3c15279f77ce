"""DICOM exports of an explanation: a SEG of the kept findings and a Comprehensive 3D SR (TID 1500).

:mod:`.dicom_seg` and :mod:`.dicom_sr` build them with highdicom from the explanation (report.json's dict
for the SR) and the source series' headers (:mod:`.source`); :mod:`.write` writes them beside report.json;
:mod:`.batch` does it for every study of some sites.
"""
