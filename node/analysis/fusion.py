"""From the detections of every slice of a disc to that disc's findings.

Each disc is seen in several slices: axial slices parallel to the disc and sagittal slices
across it ("disc" slices, centred on the disc), and axial slices just beyond each endplate
("endplate" slices, where a Schmorl's node shows as a hole in the body). The disc's
morphology (normal, bulge, protrusion) is the confidence-weighted vote of the detections
covering the centre of the disc slices; a Schmorl's node is reported when a node is found
next to this disc's endplates with enough confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.classes import DiscClass
from node.inference.interface import Detection

MORPHOLOGY = (DiscClass.NORMAL, DiscClass.BULGE, DiscClass.PROTRUSION)
NODE_MIN_CONF = 0.4
NODE_SUPPORT_CONF = 0.25
#: A node goes through the central part of an endplate: in an endplate slice a detection
#: whose centre lies further than this to either side of the disc centre is not one (a
#: lumbar body is 40-50 mm wide). At the sacrum's top the model takes the alae and the S1
#: foramina, round holes in bone 13-26 mm from the centre, for nodes; its nodes at levels
#: with an inserted one lay within 10.7 mm (seed 800 and 3000 sets).
NODE_LATERAL_MM = 12.0


@dataclass(frozen=True)
class SliceDetections:
    """The detections of one slice; the disc centre is at the image centre, and in sagittal
    slices image rows run caudal."""

    role: str  # "disc" or "endplate"
    view: str
    detections: tuple[Detection, ...]
    size: int
    pixel_mm: float


@dataclass(frozen=True)
class Finding:
    cls: DiscClass
    confidence: float
    slices: int  # how many slices support it
    #: the class was decided by the paper's 25% rule on the disc's margin, not by the model's
    #: vote (which stays the confidence until it is calibrated)
    by_rule: bool = False
    #: a Schmorl's node read in the CT itself (`endplate.find_node`) where the model found
    #: none; it is calibrated as the rule's classes are (``by_rule`` is set too)
    in_ct: bool = False


def centre_detection(
    dets: tuple[Detection, ...], size: int, classes: tuple[DiscClass, ...] = MORPHOLOGY
) -> Detection | None:
    """The most confident detection of ``classes`` covering the image centre (or nearest it)."""
    c = size // 2
    cands = [d for d in dets if d.class_name in {k.value for k in classes}]
    on = [d for d in cands if d.mask.shape[0] > c and d.mask[c, c]]
    if not on:
        on = [d for d in cands if d.box[0] <= c <= d.box[2] and d.box[1] <= c <= d.box[3]]
    return max(on, key=lambda d: d.confidence) if on else None


def node_near_disc(d: Detection, s: SliceDetections, disc_half_height_mm: float) -> bool:
    """A node in an endplate slice belongs to this disc if it lies within `NODE_LATERAL_MM`
    of its centre, one in a sagittal disc slice if it touches its endplates."""
    if s.role == "endplate":
        cols = np.nonzero(d.mask)[1]
        return (
            cols.size > 0 and abs(float(cols.mean()) - s.size / 2) * s.pixel_mm <= NODE_LATERAL_MM
        )
    if s.view != "sagittal":
        return False
    ys = np.nonzero(d.mask)[0]
    if ys.size == 0:
        return False
    dy_mm = abs(float(ys.mean()) - s.size / 2) * s.pixel_mm
    return dy_mm < disc_half_height_mm + 10.0


def node_confidences(slices: list[SliceDetections], disc_half_height_mm: float) -> list[float]:
    """The confidence of every Schmorl's node detection that belongs to this disc."""
    return [
        d.confidence
        for s in slices
        for d in s.detections
        if d.class_name == DiscClass.SCHMORL.value and node_near_disc(d, s, disc_half_height_mm)
    ]


def fuse(
    slices: list[SliceDetections], disc_half_height_mm: float
) -> tuple[list[Finding], dict[str, float]]:
    """Findings of one disc (primary first) and the vote per morphology class."""
    votes = dict.fromkeys(MORPHOLOGY, 0.0)
    support = dict.fromkeys(MORPHOLOGY, 0)
    disc_slices = [s for s in slices if s.role == "disc"]
    for s in disc_slices:
        d = centre_detection(s.detections, s.size)
        if d is not None:
            c = DiscClass(d.class_name)
            votes[c] += d.confidence
            support[c] += 1
    node_confs = node_confidences(slices, disc_half_height_mm)
    findings: list[Finding] = []
    n = max(len(disc_slices), 1)
    if any(votes.values()):
        morph = max(MORPHOLOGY, key=lambda c: votes[c])
        findings.append(Finding(morph, votes[morph] / n, support[morph]))
    node = (
        max(node_confs, default=0.0) >= NODE_MIN_CONF
        or sum(c >= NODE_SUPPORT_CONF for c in node_confs) >= 2
    )
    if node:
        nf = Finding(
            DiscClass.SCHMORL, max(node_confs), sum(c >= NODE_SUPPORT_CONF for c in node_confs)
        )
        if findings and findings[0].cls is DiscClass.NORMAL:
            findings = [nf]  # a node makes the level abnormal; the disc body itself is normal
        else:
            findings.append(nf)
    return findings, {c.value: v / n for c, v in votes.items()}
