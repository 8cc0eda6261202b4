"""The study analysis: volume -> spine -> views -> inference -> fusion -> measurements."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from node.analysis.fusion import (
    NODE_SUPPORT_CONF,
    Finding,
    SliceDetections,
    centre_detection,
    fuse,
    node_near_disc,
)
from node.analysis.measure import BULGE_SHARE, EXTENDS_MM, disc_extension
from node.analysis.spine import DiscSite, find_spine
from node.analysis.views import disc_plane
from node.analysis.volume import Volume, VolumeError
from node.classes import DiscClass
from node.geometry import Plane, sample_plane
from node.inference.interface import View
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
RULE_BELOW_VOTE = 0.4
EDGE_PIXEL_MM = 0.5
#: The vertebral edge: cortex brighter than this on the brightest of planes this far past
#: each endplate, smoothed this much, with gaps in the ring up to this radius closed.
EDGE_BONE_HU = 150.0
EDGE_OFFSETS_MM = (1.5, 3.0, 4.5, 6.0)
EDGE_SMOOTH_MM = 0.6
RING_GAP_MM = 3.5
VESSEL_MM = 3.0  # opening radius that keeps a vessel's cross-section, not a grazed rim
VESSEL_AREA_MM2 = 150.0  # the aorta's cross-section, not an osteophyte's or a grazed endplate's
VESSEL_AWAY_MM = 20.0  # ... centred outside the body, not on a tilted endplate inside it
CONCAVE_MM = 3.0  # how far the posterior corners of a body reach behind its midline wall
PEDICLE_MM = 5.0  # opening radius: wider than half a pedicle, far narrower than a body
CANAL_BEHIND_MM = 10.0  # a hole further behind the disc centre than this is the canal


@dataclass(frozen=True)
class ViewSlice:
    disc: int  # index into the spine's discs
    view: View
    role: str  # "disc" or "endplate"
    offset_mm: float
    plane: Plane
    image: np.ndarray  # uint8, the model's input


@dataclass(frozen=True)
class Measurements:
    height_mm: float
    extension_mm: float | None = None
    extension_share: float | None = None
    extension_direction_deg: float | None = None
    disc_area_mm2: float | None = None
    rule_class: DiscClass | None = None  # what the 25% rule says from the masks


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
    column: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)  # centre line, LPS

    def to_dict(self) -> dict:
        return {
            "study_instance_uid": self.study_uid,
            "series_instance_uid": self.series_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "model": self.model,
            "device": self.device,
            "warnings": list(self.warnings),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "levels": [
                {
                    "level": d.level,
                    "classes": [c.value for c in d.classes],
                    "confidence": round(d.confidence, 3),
                    "findings": [{"class": f.cls.value, "confidence": round(f.confidence, 3), "slices": f.slices}
                                 for f in d.findings],
                    "votes": {k: round(v, 3) for k, v in d.votes.items()},
                    "centre_lps": [round(float(x), 2) for x in d.site.centre],
                    "normal_lps": [round(float(x), 4) for x in d.site.frame[:, 2]],
                    "measurements": {
                        k: (round(v, 2) if isinstance(v, float) else (v.value if isinstance(v, DiscClass) else v))
                        for k, v in d.measurements.__dict__.items()
                    },
                    "warnings": list(d.warnings),
                }
                for d in self.discs
            ],
        }


def cut_views(vol: Volume, sites: tuple[DiscSite, ...], model: DiscModel) -> list[ViewSlice]:
    spec, window = model.card.views, model.card.windowing
    out = []
    for i, s in enumerate(sites):
        shots = [(View.AXIAL, "disc", o) for o in AXIAL_OFFSETS_MM]
        shots += [(View.SAGITTAL, "disc", o) for o in SAGITTAL_OFFSETS_MM]
        half = s.height_mm / 2 + ENDPLATE_BEYOND_MM
        shots += [(View.AXIAL, "endplate", half), (View.AXIAL, "endplate", -half)]
        for view, role, off in shots:
            plane = disc_plane(view, s.centre, s.frame, spec, offset_mm=off)
            img = window.apply(sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0))
            out.append(ViewSlice(i, view, role, off, plane, img))
    return out


def _disk(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius_px * radius_px


def _body_holes(bone: np.ndarray, plane: Plane) -> np.ndarray:
    """Holes in the bone that lie in front of the canal: a body's dark cancellous inside.

    The spinal canal is a hole too (ringed by the arch) but lies behind the disc centre.
    """
    holes = ndimage.binary_fill_holes(bone) & ~bone
    lab, n = ndimage.label(holes)
    if n == 0:
        return holes
    rows = ndimage.center_of_mass(holes, lab, range(1, n + 1))
    centre = (plane.size - 1) / 2
    keep = [i + 1 for i, (r, _) in enumerate(rows) if (r - centre) * plane.pixel_mm < CANAL_BEHIND_MM]
    return np.isin(lab, keep)


def vertebral_edge(vol: Volume, plane: Plane, up_mm: float, down_mm: float) -> np.ndarray:
    """Outline of the two vertebral bodies next to a disc, projected onto the disc's plane.

    On each side the brightest HU over planes 1.5-6 mm past the endplate (at 0.5 mm,
    lightly smoothed) shows the body's cortex as a ring, even where the cancellous bone
    inside is as dark as soft tissue (osteoporotic or thick-sliced bone) and the ring is
    broken where the basivertebral vein leaves the body. The ring above `EDGE_BONE_HU` is
    closed over such gaps, filled (the canal, a hole behind the disc centre, is not), and
    opened with a disk wider than a pedicle so that the arch does not count as body; a
    vessel bright in the disc's own plane is taken out first. The outline is that of either
    body (their union), on ``plane``'s own pixel grid.
    """
    factor = max(1, int(round(EDGE_PIXEL_MM / plane.pixel_mm)))
    coarse = Plane(plane.centre, plane.u, plane.v, plane.size // factor, plane.pixel_mm * factor)
    # what stays bright right across the disc space (a contrast-filled aorta, a calcified
    # vessel lying against the body) is no body; a plane that grazes an endplate (thin,
    # concave or tilted discs) is bright in one of these planes, not in all
    across = np.min([sample_plane(vol.hu, vol.grid, coarse.shifted(f * (up_mm + down_mm) / 2), order=1,
                                  fill=-1000.0) for f in (-0.5, 0.0, 0.5)], axis=0)
    mid = ndimage.gaussian_filter(across, EDGE_SMOOTH_MM / coarse.pixel_mm) > EDGE_BONE_HU
    wide = ndimage.binary_opening(mid, structure=_disk(VESSEL_MM / coarse.pixel_mm))
    lab, n = ndimage.label(wide)
    if n:
        area = ndimage.sum_labels(wide, lab, range(1, n + 1)) * coarse.pixel_mm**2
        at = np.array(ndimage.center_of_mass(wide, lab, range(1, n + 1))) - (coarse.size - 1) / 2
        away = np.hypot(at[:, 0], at[:, 1]) * coarse.pixel_mm
        ahead = at[:, 0] < 0  # the great vessels lie in front of the column; the arch behind it
        wide = np.isin(lab, 1 + np.nonzero((area >= VESSEL_AREA_MM2) & (away > VESSEL_AWAY_MM) & ahead)[0])
    vessel = ndimage.binary_dilation(wide, structure=_disk(1.0 / coarse.pixel_mm))
    edge = np.zeros((coarse.size, coarse.size), dtype=bool)
    for d in (up_mm, -down_mm):
        side = np.sign(d) or 1.0
        brightest = np.max([sample_plane(vol.hu, vol.grid, coarse.shifted(d + side * off), order=1, fill=-1000.0)
                            for off in EDGE_OFFSETS_MM], axis=0)
        bone = ndimage.gaussian_filter(brightest, EDGE_SMOOTH_MM / coarse.pixel_mm) > EDGE_BONE_HU
        bone = ndimage.binary_closing(bone & ~vessel, structure=_disk(RING_GAP_MM / coarse.pixel_mm))
        body = bone | _body_holes(bone, coarse)
        body = ndimage.binary_opening(body, structure=_disk(PEDICLE_MM / coarse.pixel_mm))
        edge |= _centre_body(body)
    edge = _centre_body(edge)
    # The pedicles leave the body at its posterior corners: nothing more than
    # `CONCAVE_MM` behind the posterior wall at the midline (the first row behind the disc
    # centre that is no body) counts; where no wall shows there, the body is taken as about
    # as deep behind the disc centre as in front of it.
    centre = coarse.size // 2
    col = edge[:, centre]
    if col.any():
        behind = np.nonzero(~col[centre:])[0]
        if col[centre] and behind.size:
            cut = centre + int(behind[0]) + int(round(CONCAVE_MM / coarse.pixel_mm))
        else:
            cut = int(centre + 1.05 * (centre - int(np.argmax(col))))
        edge[cut + 1 :, :] = False
    full = np.kron(edge, np.ones((factor, factor), dtype=bool))
    out = np.zeros((plane.size, plane.size), dtype=bool)
    out[: full.shape[0], : full.shape[1]] = full[: plane.size, : plane.size]
    return out


def _centre_body(mask: np.ndarray) -> np.ndarray:
    """The part of ``mask`` under the disc centre (else its largest part): the body, not
    other bone."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    c = mask.shape[0] // 2
    keep = lab[c, c] or int(np.argmax(ndimage.sum_labels(mask, lab, range(1, n + 1)))) + 1
    return lab == keep


def measure(vol: Volume, site: DiscSite, plane: Plane, disc_mask: np.ndarray | None
            ) -> tuple[Measurements, np.ndarray | None]:
    """The disc's measurements, and the vertebral edge on ``plane`` they were taken against."""
    if disc_mask is None or not disc_mask.any():
        return Measurements(height_mm=site.height_mm), None
    edge = vertebral_edge(vol, plane, site.height_mm / 2, site.height_mm / 2)
    area = float(disc_mask.sum()) * plane.pixel_mm**2
    if not edge.any():
        return Measurements(height_mm=site.height_mm, disc_area_mm2=area), None
    ext = disc_extension(disc_mask, edge, plane.pixel_mm)
    share, mx = ext.share, ext.max_mm
    rule = (DiscClass.BULGE if share > BULGE_SHARE else DiscClass.PROTRUSION if mx > EXTENDS_MM and share > 0
            else DiscClass.NORMAL)
    return Measurements(site.height_mm, mx, share, ext.direction_deg, area, rule), edge


def _apply_rule(findings: list[Finding], votes: dict[str, float], m: Measurements, warnings: list[str]) -> list[Finding]:
    """Where the model's vote on the disc's shape is weak, the paper's 25% rule decides.

    The rule is measured on the model's own mask of the disc against the vertebral edge.
    Disagreements are always reported as a warning on the level.
    """
    morph = next((f for f in findings if f.cls is not DiscClass.SCHMORL), None)
    node = [f for f in findings if f.cls is DiscClass.SCHMORL]
    model_says = morph.cls if morph else DiscClass.NORMAL
    if m.rule_class is None or m.rule_class is model_says:
        return findings
    how = (f"{(m.extension_share or 0) * 100:.0f}% of the circumference, {m.extension_mm or 0:.1f} mm beyond "
           "the vertebral edge")
    vote = max(votes.values(), default=0.0)
    if vote >= RULE_BELOW_VOTE:
        warnings.append(f"model says {model_says.value}, the 25% rule on its mask says {m.rule_class.value} ({how})")
        return findings
    warnings.append(f"model unsure ({model_says.value}, vote {vote:.2f}); the 25% rule decides "
                    f"{m.rule_class.value} ({how})")
    shape = [Finding(m.rule_class, votes.get(m.rule_class.value, 0.0), morph.slices if morph else 0)]
    if m.rule_class is DiscClass.NORMAL and node:
        shape = []
    return shape + node


def analyze_volume(vol: Volume, model: DiscModel) -> StudyResult:
    """Analyse one loaded CT volume with a loaded model."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    spine = find_spine(vol)
    t["spine"] = time.perf_counter() - t0
    if spine.skip_reason:
        raise VolumeError(f"no lumbar spine to analyse: {spine.skip_reason}")
    warnings = list(vol.warnings) + list(spine.warnings)
    t0 = time.perf_counter()
    views = cut_views(vol, spine.discs, model)
    t["views"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dets = model.predict([v.image for v in views])
    t["inference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = []
    calibration = model.card.calibration
    for i, site in enumerate(spine.discs):
        mine = [(v, d) for v, d in zip(views, dets) if v.disc == i]
        sl = [SliceDetections(v.role, v.view.value, tuple(d), v.plane.size, v.plane.pixel_mm) for v, d in mine]
        findings, votes = fuse(sl, site.height_mm / 2)
        masks = []
        mid = None
        for (v, d), s in zip(mine, sl):
            c = centre_detection(tuple(d), v.plane.size)
            if v.role == "disc" and c is not None and v.offset_mm == 0.0:
                half = site.height_mm / 2 if v.view is View.AXIAL else SLAB_MM / 2
                masks.append(MaskOnPlane(v.view, v.offset_mm, v.plane, c.mask, DiscClass(c.class_name),
                                         c.confidence, half))
                if v.view is View.AXIAL:
                    mid = (v.plane, c.mask)
            for x in d:
                if (x.class_name == DiscClass.SCHMORL.value and x.confidence >= NODE_SUPPORT_CONF
                        and node_near_disc(x, s, site.height_mm / 2)):
                    half = ENDPLATE_SLAB_MM / 2 if v.role == "endplate" else SLAB_MM / 2
                    masks.append(MaskOnPlane(v.view, v.offset_mm, v.plane, x.mask, DiscClass.SCHMORL,
                                             x.confidence, half))
        m, edge = measure(vol, site, mid[0], mid[1]) if mid else (Measurements(site.height_mm), None)
        w = []
        if not findings:
            w.append("the model found no disc at this level")
        findings = _apply_rule(findings, votes, m, w)
        if calibration is not None:  # the chance the class is right, as measured on held-out discs
            findings = [replace(f, confidence=calibration(f.confidence)) for f in findings]
        results.append(DiscResult(site, tuple(findings), votes, m, tuple(w), tuple(masks), edge))
    t["fusion+measure"] = time.perf_counter() - t0
    return StudyResult(
        study_uid=vol.study_uid, series_uid=vol.series_uid, frame_of_reference_uid=vol.frame_of_reference_uid,
        sop_instance_uids=vol.sop_instance_uids, model=f"{model.card.name}", device=model.device,
        discs=tuple(results), warnings=tuple(warnings), timings=t, column=spine.centre_line,
    )
