"""The study analysis: volume -> spine -> views -> inference -> fusion -> measurements."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from node.analysis.endplate import STEP_MM, NodeInCT, find_node
from node.analysis.fusion import (
    NODE_SUPPORT_CONF,
    Finding,
    SliceDetections,
    centre_detection,
    fuse,
    node_confidences,
    node_near_disc,
)
from node.analysis.grain import soften
from node.analysis.measure import Measurements, measure
from node.analysis.spine import DiscSite, find_spine
from node.analysis.views import disc_plane, native_plane, onto_view
from node.analysis.volume import Volume, VolumeError
from node.classes import DiscClass
from node.geometry import Plane, sample_plane
from node.inference.interface import Detection, View
from node.inference.model import DiscModel

log = logging.getLogger(__name__)

AXIAL_OFFSETS_MM = (-1.0, 0.0, 1.0)
SAGITTAL_OFFSETS_MM = (0.0, 6.0, -6.0)
ENDPLATE_BEYOND_MM = 2.5
#: Thickness in patient space that one 2D mask stands for, where it is not the disc's
#: own axial mask (which stands for the whole disc height): a sagittal or in-disc slice,
#: and an endplate slice (the node's depth into the body, read on both sides of it).
SLAB_MM = 3.0
ENDPLATE_SLAB_MM = 2 * ENDPLATE_BEYOND_MM
#: Below this vote the 25% rule on the model's mask decides between normal, bulge and
#: protrusion (chosen on held-out tuning phantoms, seed 2000, never on the reported set).
#: `analyze_volume` takes another (above 1: the rule decides wherever it can be read, which
#: measures the rule alone, as on a CT unlike any the model trained on).
RULE_BELOW_VOTE = 0.4
#: Where the disc's margin in the CT reads bulge or protrusion and the model says another
#: shape, its vote must reach this to stand (chosen on the tuning sets, seed 700/800 real-CT
#: lesions and seed 800/2000 phantoms): the model learnt on phantoms and one chest CT, and on
#: other real anatomy its votes of 0.4-0.5 are often the same for every disc at a level,
#: whatever was inserted there (the abdomen CT's L5-S1: bulge 0.41-0.48 at every disc).
#: A margin that reads normal keeps `RULE_BELOW_VOTE`: on thick slices it reads nothing.
RULE_HOLDS_VOTE = 0.55
#: Where a node is seen in the CT and the model is unsure of the disc's shape, the margin's
#: reading that is reported beside the node. On the tuning sets' real CT the margin reads a
#: bulge at 78% of inserted bulges but at 1 of 76 inserted protrusions, 1 of 47 node-only
#: levels and none of 76 untouched levels, while it reads a protrusion at most of them.
NODE_KEEPS = (DiscClass.BULGE,)


@dataclass(frozen=True)
class ViewSlice:
    disc: int  # index into the spine's discs
    view: View
    role: str  # "disc" or "endplate"
    offset_mm: float
    plane: Plane  # the disc-centred plane the detections are read on
    image: np.ndarray  # uint8, the model's input
    #: The plane the image was cut on, where it is not ``plane``: the whole slice that holds
    #: it, for a model trained on native views.
    source: Plane | None = None


@dataclass(frozen=True)
class MaskOnPlane:
    """A mask the model drew on one slice, with the plane that maps it to patient space.

    ``half_thickness_mm`` is how far along the plane's normal the mask stands for the
    structure: half the disc height for the disc's own axial mask, a thin slab elsewhere.
    """

    view: View
    offset_mm: float
    plane: Plane
    mask: np.ndarray
    cls: DiscClass
    confidence: float
    half_thickness_mm: float


@dataclass(frozen=True)
class DiscResult:
    site: DiscSite
    findings: tuple[Finding, ...]
    votes: dict[str, float]
    measurements: Measurements
    warnings: tuple[str, ...]
    masks: tuple[MaskOnPlane, ...]
    #: The outline of the vertebral bodies next to the disc on the plane of its mid axial
    #: mask (`vertebral_edge`): what lies outside it is beyond the vertebral edge.
    vertebral_edge: np.ndarray | None = field(default=None, repr=False)

    @property
    def level(self) -> str:
        return self.site.name

    @property
    def classes(self) -> tuple[DiscClass, ...]:
        return tuple(f.cls for f in self.findings)

    @property
    def confidence(self) -> float:
        return self.findings[0].confidence if self.findings else 0.0


@dataclass(frozen=True)
class StudyResult:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    model: str
    device: str
    discs: tuple[DiscResult, ...]
    warnings: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    model_version: str = ""
    column: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 3)), repr=False
    )  # centre line, LPS

    def to_dict(self) -> dict:
        return {
            "study_instance_uid": self.study_uid,
            "series_instance_uid": self.series_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "model": self.model,
            "model_version": self.model_version,
            "device": self.device,
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "levels": [
                {
                    "level": d.level,
                    "classes": [c.value for c in d.classes],
                    "confidence": round(d.confidence, 3),
                    "findings": [
                        {
                            "class": f.cls.value,
                            "confidence": round(f.confidence, 3),
                            "slices": f.slices,
                            "decided_by": "ct" if f.in_ct else "rule" if f.by_rule else "model",
                        }
                        for f in d.findings
                    ],
                    "votes": {k: round(v, 3) for k, v in d.votes.items()},
                    "centre_lps": [round(float(x), 2) for x in d.site.centre],
                    "normal_lps": [round(float(x), 4) for x in d.site.frame[:, 2]],
                    "measurements": {
                        k: (
                            round(v, 2)
                            if isinstance(v, float)
                            else (v.value if isinstance(v, DiscClass) else v)
                        )
                        for k, v in d.measurements.__dict__.items()
                    },
                    "warnings": list(d.warnings),
                }
                for d in self.discs
            ],
        }


def cut_views(vol: Volume, sites: tuple[DiscSite, ...], model: DiscModel) -> list[ViewSlice]:
    """The slices of every disc, cut as the model was trained: disc-centred, or the whole
    slice (native views) that holds each disc-centred one."""
    spec, window = model.card.views, model.card.windowing
    out = []
    for i, s in enumerate(sites):
        shots = [(View.AXIAL, "disc", o) for o in AXIAL_OFFSETS_MM]
        shots += [(View.SAGITTAL, "disc", o) for o in SAGITTAL_OFFSETS_MM]
        half = s.height_mm / 2 + ENDPLATE_BEYOND_MM
        shots += [(View.AXIAL, "endplate", half), (View.AXIAL, "endplate", -half)]
        for view, role, off in shots:
            plane = disc_plane(view, s.centre, s.frame, spec, offset_mm=off)
            source = native_plane(plane, vol.grid) if model.card.native else None
            cut = source or plane
            img = window.apply(sample_plane(vol.hu, vol.grid, cut, order=1, fill=-1000.0))
            out.append(ViewSlice(i, view, role, off, plane, img, source))
    return out


def on_views(views: list[ViewSlice], dets: list[list[Detection]]) -> list[list[Detection]]:
    """Each slice's detections on its disc-centred plane (carried there from a whole slice)."""
    out = []
    for v, ds in zip(views, dets):
        if v.source is None:
            out.append(ds)
            continue
        out.append([m for d in ds if (m := onto_view(d, v.source, v.plane)) is not None])
    return out


def _apply_rule(
    findings: list[Finding],
    votes: dict[str, float],
    m: Measurements,
    warnings: list[str],
    below: float,
    ct_node: NodeInCT | None = None,
    node_vote: float = 0.0,
    holds: float | None = None,
) -> list[Finding]:
    """Where the model's vote on the disc's shape is under ``below``, the paper's 25% rule
    decides; where the rule reads bulge or protrusion, under ``holds`` (default ``below``).

    The rule is read on the disc's own margin in the CT (`tissue_extension`), or where that
    could not be measured on the model's own mask of the disc, against the vertebral edge.
    Disagreements are always reported as a warning on the level.

    A Schmorl's node seen in the CT itself (``ct_node``, `find_node`) is a finding of the
    level even where the model found none (its confidence then is the model's best vote for
    a node here, ``node_vote``). Where the model is unsure of the disc's shape too, the node
    is the level's only finding, unless the margin reads a bulge: on real CT the margin
    reads a protrusion at most untouched discs, so that reading is then only a warning,
    while a bulge reading is rare there (see `NODE_KEEPS`).
    """
    vote = max(votes.values(), default=0.0)
    read = m.tissue_class if m.tissue_class is not None else m.rule_class
    if holds is not None and read is not None and read is not DiscClass.NORMAL:
        below = holds
    if ct_node is not None:
        body = "upper" if ct_node.side > 0 else "lower"
        seen = f"{ct_node.depth_mm:.1f} mm into the {body} body"
        if not any(f.cls is DiscClass.SCHMORL for f in findings):
            warnings.append(f"a Schmorl's node is seen in the CT ({seen}); the model found none")
            slices = len(ct_node.outlines)
            # as in `fuse`: a node makes the level abnormal, the disc itself stays unnamed
            findings = [f for f in findings if f.cls is not DiscClass.NORMAL]
            findings += [Finding(DiscClass.SCHMORL, node_vote, slices, by_rule=True, in_ct=True)]
    morph = next((f for f in findings if f.cls is not DiscClass.SCHMORL), None)
    node = [f for f in findings if f.cls is DiscClass.SCHMORL]
    if ct_node is not None and vote < below:
        rule = m.tissue_class
        if rule in NODE_KEEPS:
            warnings.append(
                f"a Schmorl's node is seen in the CT ({seen}) and the model is unsure of "
                f"the disc's shape (vote {vote:.2f}): the node and the 25% rule's "
                f"{rule.value} are the level's findings"
            )
            slices = morph.slices if morph else 0
            return [Finding(rule, votes.get(rule.value, 0.0), slices, by_rule=True)] + node
        unsaid = (
            f"; the 25% rule's {rule.value} is not reported: on real CT it calls most "
            "untouched discs abnormal"
            if rule is not None and rule is not DiscClass.NORMAL
            else ""
        )
        warnings.append(
            f"a Schmorl's node is seen in the CT ({seen}) and the model is unsure of the "
            f"disc's shape (vote {vote:.2f}): the node is the level's finding{unsaid}"
        )
        return node
    model_says = morph.cls if morph else DiscClass.NORMAL
    if m.tissue_class is not None:
        rule = m.tissue_class
        how = (
            f"the disc's margin in the CT beyond the vertebral edge over {m.tissue_arc_deg or 0:.0f} "
            f"degrees of the posterior half, at most {m.tissue_extension_mm or 0:.1f} mm"
        )
    elif m.rule_class is not None:
        rule = m.rule_class
        how = (
            f"its mask beyond the vertebral edge over {(m.extension_share or 0) * 100:.0f}% of "
            f"the circumference, at most {m.extension_mm or 0:.1f} mm"
        )
    else:
        return findings
    if rule is model_says and findings:
        return findings
    if vote >= below:
        warnings.append(f"model says {model_says.value}, the 25% rule says {rule.value} ({how})")
        return findings
    warnings.append(
        f"model unsure ({model_says.value}, vote {vote:.2f}); the 25% rule decides "
        f"{rule.value} ({how})"
    )
    shape = [Finding(rule, votes.get(rule.value, 0.0), morph.slices if morph else 0, by_rule=True)]
    if rule is DiscClass.NORMAL and node:
        shape = []
    return shape + node


def analyze_volume(
    vol: Volume,
    model: DiscModel,
    *,
    rule_below_vote: float = RULE_BELOW_VOTE,
    rule_holds_vote: float = RULE_HOLDS_VOTE,
) -> StudyResult:
    """Analyse one loaded CT volume with a loaded model; the 25% rule decides a disc's shape
    where the model's vote is under ``rule_below_vote``, or under ``rule_holds_vote`` where
    the disc's margin reads bulge or protrusion."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    vol, grain = soften(vol)
    t["grain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spine = find_spine(vol)
    t["spine"] = time.perf_counter() - t0
    if spine.skip_reason:
        raise VolumeError(f"no lumbar spine to analyse: {spine.skip_reason}")
    warnings = list(vol.warnings) + ([grain.warning()] if grain.smoothed else [])
    warnings += list(spine.warnings)
    t0 = time.perf_counter()
    views = cut_views(vol, spine.discs, model)
    t["views"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dets = on_views(views, model.predict([v.image for v in views]))
    t["inference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = []
    calibration = model.card.calibration
    for i, site in enumerate(spine.discs):
        mine = [(v, d) for v, d in zip(views, dets) if v.disc == i]
        sl = [
            SliceDetections(v.role, v.view.value, tuple(d), v.plane.size, v.plane.pixel_mm)
            for v, d in mine
        ]
        findings, votes = fuse(sl, site.height_mm / 2)
        masks = []
        mid = None
        for (v, d), s in zip(mine, sl):
            c = centre_detection(tuple(d), v.plane.size)
            if v.role == "disc" and c is not None and v.offset_mm == 0.0:
                half = site.height_mm / 2 if v.view is View.AXIAL else SLAB_MM / 2
                masks.append(
                    MaskOnPlane(
                        v.view,
                        v.offset_mm,
                        v.plane,
                        c.mask,
                        DiscClass(c.class_name),
                        c.confidence,
                        half,
                    )
                )
                if v.view is View.AXIAL:
                    mid = (v.plane, c.mask)
            for x in d:
                if (
                    x.class_name == DiscClass.SCHMORL.value
                    and x.confidence >= NODE_SUPPORT_CONF
                    and node_near_disc(x, s, site.height_mm / 2)
                ):
                    half = ENDPLATE_SLAB_MM / 2 if v.role == "endplate" else SLAB_MM / 2
                    masks.append(
                        MaskOnPlane(
                            v.view,
                            v.offset_mm,
                            v.plane,
                            x.mask,
                            DiscClass.SCHMORL,
                            x.confidence,
                            half,
                        )
                    )
        # the disc's mid axial plane, cut for the model whether or not it drew a mask there
        plane = next(
            v.plane
            for v, _ in mine
            if v.view is View.AXIAL and v.role == "disc" and v.offset_mm == 0.0
        )
        m, edge = measure(vol, site, plane, mid[1] if mid else None)
        ct_node = find_node(vol, site)
        if ct_node is not None:
            m = replace(m, node_in_ct_mm=ct_node.depth_mm)
        node_vote = max(node_confidences(sl, site.height_mm / 2), default=0.0)
        w = []
        if not findings:
            w.append("the model found no disc at this level")
        findings = _apply_rule(
            findings, votes, m, w, rule_below_vote, ct_node, node_vote, rule_holds_vote
        )
        if (
            ct_node is not None
            and any(f.cls is DiscClass.SCHMORL for f in findings)
            and not any(k.cls is DiscClass.SCHMORL for k in masks)
        ):
            conf = next(f.confidence for f in findings if f.cls is DiscClass.SCHMORL)
            masks += [
                MaskOnPlane(
                    View.AXIAL,
                    float((p.centre - site.centre) @ site.frame[:, 2]),
                    p,
                    outline,
                    DiscClass.SCHMORL,
                    conf,
                    STEP_MM / 2,  # each plane stands for one step between planes
                )
                for p, outline in ct_node.outlines
            ]
        if calibration is not None:  # the chance the class is right, as measured on held-out discs
            findings = [
                replace(f, confidence=calibration(f.confidence, by_rule=f.by_rule))
                for f in findings
            ]
        results.append(DiscResult(site, tuple(findings), votes, m, tuple(w), tuple(masks), edge))
    t["fusion+measure"] = time.perf_counter() - t0
    return StudyResult(
        study_uid=vol.study_uid,
        series_uid=vol.series_uid,
        frame_of_reference_uid=vol.frame_of_reference_uid,
        sop_instance_uids=vol.sop_instance_uids,
        model=f"{model.card.name}",
        model_version=model.card.version,
        device=model.device,
        discs=tuple(results),
        warnings=tuple(warnings),
        timings=t,
        column=spine.centre_line,
    )
