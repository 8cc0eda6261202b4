"""Series assembly: what the listener learns of each instance, whether the instances of a
series form a whole stack, and why a complete series is not for this node.

The job state machine (`node.jobs`) uses these to move a series from RECEIVING on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from node.config import SeriesRules
from node.db import Instance, Job

CT_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MAX_OFF_AXIS_DEG = 30.0
EVEN_SPREAD = 0.05


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receiver learnt about one stored instance."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    path: str
    size: int
    calling_aet: str
    called_aet: str
    association: str
    modality: str | None = None
    study_date: str | None = None
    series_description: str | None = None
    body_part: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    position: float | None = None
    slice_thickness: float | None = None
    orientation: str | None = None
    frames: int = 1


def is_seg(sop_class_uids: set[str]) -> bool:
    """A series of segmentations only (a radiologist's correction, perhaps: `node.cases`)."""
    return bool(sop_class_uids) and sop_class_uids <= {SEG_STORAGE}


def _normal(orientation: str | None) -> np.ndarray | None:
    try:
        v = np.array([float(x) for x in (orientation or "").split("\\")], dtype=float)
    except ValueError:
        return None
    return np.cross(v[:3], v[3:]) if v.size == 6 else None


def evenly_stacked(instances: list[Instance]) -> bool:
    """Slice positions form an evenly spaced stack with no gap (or one multi-frame instance)."""
    if any(i.frames > 1 for i in instances):
        return len(instances) == 1
    pos = sorted(i.position for i in instances if i.position is not None)
    if len(pos) < 2 or len(pos) != len(instances):
        return False
    gaps = np.diff(pos)
    med = float(np.median(gaps))
    return med > 0 and bool(np.all(np.abs(gaps - med) <= EVEN_SPREAD * med))


def skip_reason(job: Job, instances: list[Instance], rules: SeriesRules) -> str | None:
    """Why a complete series is not for this node, or None when it is."""
    sop_classes = {i.sop_class_uid for i in instances}
    if (job.modality or "").upper() != "CT":
        return f"not a CT image series (modality {job.modality or 'missing'})"
    if not sop_classes <= set(CT_STORAGE):
        others = ", ".join(sorted(sop_classes - set(CT_STORAGE)))
        return f"not a CT image series (modality CT, but SOP class {others}, not a CT image storage class)"
    desc = job.series_description or ""
    for pattern in rules.skip_descriptions:
        if re.search(pattern, desc, re.IGNORECASE):
            return f"series description {desc!r} matches the skip rule {pattern!r}"
    if rules.body_parts and (job.body_part or "").upper() not in {
        b.upper() for b in rules.body_parts
    }:
        return f"body part {job.body_part or 'missing'} is not one of {', '.join(rules.body_parts)}"
    normals = [n for i in instances if (n := _normal(i.orientation)) is not None]
    if normals:
        off = float(
            np.degrees(np.arccos(min(1.0, abs(float(np.median([abs(n[2]) for n in normals]))))))
        )
        if off > MAX_OFF_AXIS_DEG:
            return f"not an axial series (slices {off:.0f} degrees from the body axis)"
    thick = [i.slice_thickness for i in instances if i.slice_thickness]
    if thick and float(np.median(thick)) > rules.max_slice_thickness_mm:
        return f"slices {float(np.median(thick)):.1f} mm thick (at most {rules.max_slice_thickness_mm:g} mm)"
    frames = sum(i.frames for i in instances)
    if frames < rules.min_instances:
        return f"only {frames} slices (at least {rules.min_instances})"
    return None
