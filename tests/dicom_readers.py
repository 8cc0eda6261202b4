"""Independent readers of the node's DICOM objects: plain pydicom walks, no node code."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

IMAGING_MEASUREMENTS = "126010"
MEASUREMENT_GROUP = "125007"
TRACKING_IDENTIFIER = "112039"
TRACKING_UID = "112040"
FINDING = "121071"
FINDING_SITE = "363698007"


def _code(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodingSchemeDesignator), str(c.CodeValue)


def report_groups(sr: Dataset) -> list[dict]:
    """Each measurement group of a TID 1500 report as a plain dict."""
    groups = []
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER" and _code(item)[1] == IMAGING_MEASUREMENTS:
            for g in item.ContentSequence:
                if g.ValueType != "CONTAINER" or _code(g)[1] != MEASUREMENT_GROUP:
                    continue
                out: dict = {"findings": [], "measurements": {}, "segment": None, "region": None}
                for x in g.ContentSequence:
                    value = _code(x)[1]
                    if value == TRACKING_IDENTIFIER:
                        out["tracking_id"] = str(x.TextValue)
                    elif value == TRACKING_UID:
                        out["tracking_uid"] = str(x.UID)
                    elif value == FINDING and x.ValueType == "CODE":
                        out["findings"].append(str(x.ConceptCodeSequence[0].CodeValue))
                    elif value == FINDING_SITE:
                        out["site"] = str(x.ConceptCodeSequence[0].CodeMeaning)
                    elif x.ValueType == "NUM":
                        mv = x.MeasuredValueSequence[0]
                        out["measurements"][str(x.ConceptNameCodeSequence[0].CodeMeaning)] = (
                            float(mv.NumericValue),
                            str(mv.MeasurementUnitsCodeSequence[0].CodeValue),
                        )
                    elif (
                        x.ValueType == "IMAGE"
                        and "ReferencedSegmentNumber" in x.ReferencedSOPSequence[0]
                    ):
                        out["segment"] = int(x.ReferencedSOPSequence[0].ReferencedSegmentNumber)
                    elif x.ValueType == "SCOORD":
                        ref = x.ContentSequence[0].ReferencedSOPSequence[0]
                        out["region"] = (
                            str(x.GraphicType),
                            np.array(x.GraphicData, dtype=float).reshape(-1, 2),
                            str(ref.ReferencedSOPInstanceUID),
                        )
                groups.append(out)
    return groups


def report_comments(sr: Dataset) -> list[str]:
    return [
        str(t.TextValue)
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER"
        for t in getattr(item, "ContentSequence", [])
        if t.ValueType == "TEXT"
    ]


def seg_voxels_lps(seg: Dataset) -> dict[int, np.ndarray]:
    """Each segment's set pixels as LPS points, from the frames' own plane positions."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    ps = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    out: dict[int, list[np.ndarray]] = {}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        r, c = np.nonzero(frames[f])
        out.setdefault(number, []).append(
            ipp + np.outer(c * ps[1], iop[:3]) + np.outer(r * ps[0], iop[3:])
        )
    return {n: np.concatenate(v) for n, v in out.items()}


def as_set(lps: np.ndarray, decimals: int = 2) -> set[tuple[float, float, float]]:
    return set(map(tuple, np.round(lps, decimals)))
