"""Measurements of a disc against the vertebral edge in a plane parallel to the disc.

Both the truth of the phantoms and the analysis of the model's masks use `disc_extension`,
so that a phantom's "share of circumference" means the same as the node's. `vertebral_edge`
finds the bodies' outline in the CT itself, and `measure` takes a disc's measurements and the
paper's 25% rule from the model's mask against it. `tissue_extension` finds the disc's own
margin in the CT, where the disc meets the fat and CSF behind it, so that the rule can also be
read without the model's mask (`tissue_rule`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from node.analysis.spine import DiscSite
from node.analysis.volume import Volume
from node.classes import DiscClass
from node.geometry import Plane, sample_plane
from node.masks import disk, disk_opening, fill_holes

#: A ray counts as "beyond the vertebral edge" past this many millimetres.
EXTENDS_MM = 1.0
#: The paper's rule: over 25% of the circumference is a bulge, under it a protrusion.
BULGE_SHARE = 0.25
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
#: ... and behind the disc centre, where the pedicle roots and the foramina's margins leave
#: the body at its posterior corners and a 5 mm disk lets them through as body.
PEDICLE_ROOT_MM = 8.0
CANAL_BEHIND_MM = 10.0  # a hole further behind the disc centre than this is the canal
#: The disc's own margin in the CT: where the HU (the mean over +-1 mm about the disc's mid
#: plane, smoothed 0.8 mm) falls this far below the disc's interior (the median inside the
#: vertebral edge, 4 mm in from it, at most `TISSUE_DISC_MAX_HU`). It is read over the
#: posterior half only, where the disc meets the canal's and the foramina's fat and CSF; in
#: front and at the sides the psoas and the vessels are as dense as disc. The 25% of the
#: circumference of the paper's rule is 90 degrees of arc, which the posterior half can show
#: whole.
TISSUE_DROP_HU = 35.0
TISSUE_SECTOR_DEG = (20.0, 160.0)
TISSUE_STEP_DEG = 2.0
TISSUE_SMOOTH_MM = 0.8
TISSUE_INNER_MM = 4.0
#: Disc reads 60-110 HU on CT. An interior median above this is endplate bone averaged into
#: the +-1 mm slab (thick slices, a concave or tilted endplate): the margin is then read
#: against the disc's soft tissue, not against the bone, which would take the disc itself for
#: the dark outside it.
TISSUE_DISC_MAX_HU = 120.0
TISSUE_REACH_MM = 12.0  # rays are followed this far past the vertebral edge
TISSUE_BEYOND_MM = 2.0  # a ray counts as beyond the edge past this ...
TISSUE_BULGE_ARC_DEG = 90.0  # ... and over more of the arc than this, the disc bulges
TISSUE_FOCAL_MM = 4.5  # a narrower extension at least this far is a protrusion


@dataclass(frozen=True)
class Extension:
    """Radial extension of a disc beyond its vertebral edge, per ray from the disc centre."""

    angles_deg: np.ndarray  # 0 = patient's left (+u), 90 = posterior (+v)
    extension_mm: np.ndarray  # NaN where a ray found no vertebral edge

    @property
    def max_mm(self) -> float:
        e = self.extension_mm
        return float(np.nanmax(e)) if np.isfinite(e).any() else 0.0

    @property
    def share(self) -> float:
        """Share of the circumference (share of valid rays) that extends past `EXTENDS_MM`."""
        e = self.extension_mm[np.isfinite(self.extension_mm)]
        return float(np.mean(e > EXTENDS_MM)) if e.size else 0.0

    @property
    def direction_deg(self) -> float:
        """Angle of the largest extension."""
        e = np.where(np.isfinite(self.extension_mm), self.extension_mm, -np.inf)
        return float(self.angles_deg[int(np.argmax(e))])

    def width_deg(self, level_mm: float) -> float:
        """Angular width of the extension around its peak where it exceeds ``level_mm``."""
        e = np.nan_to_num(self.extension_mm, nan=0.0)
        n = e.size
        peak = int(np.argmax(e))
        if e[peak] <= level_mm:
            return 0.0
        width = 1
        for step in (1, -1):
            i = peak
            for _ in range(n - 1):
                i = (i + step) % n
                if e[i] <= level_mm or i == peak:
                    break
                width += 1
        step_deg = 360.0 / n
        return min(360.0, width * step_deg)


def outer_radius(
    mask: np.ndarray, centre: tuple[float, float], angles: np.ndarray, step: float = 0.5
) -> np.ndarray:
    """Distance in pixels from ``centre`` to the last mask pixel along each ray (NaN if none)."""
    radii = np.arange(0.0, float(max(mask.shape)), step)
    rows = centre[0] + np.outer(np.sin(angles), radii)
    cols = centre[1] + np.outer(np.cos(angles), radii)
    ri, ci = np.rint(rows).astype(int), np.rint(cols).astype(int)
    valid = (ri >= 0) & (ri < mask.shape[0]) & (ci >= 0) & (ci < mask.shape[1])
    hit = np.zeros(ri.shape, dtype=bool)
    hit[valid] = mask[ri[valid], ci[valid]]
    any_hit = hit.any(axis=1)
    last = len(radii) - 1 - np.argmax(hit[:, ::-1], axis=1)
    return np.where(any_hit, radii[last], np.nan)


def disc_extension(
    disc: np.ndarray, vertebral_edge: np.ndarray, pixel_mm: float, *, rays: int = 360
) -> Extension:
    """Extension of the ``disc`` mask beyond the ``vertebral_edge`` mask, both in one plane.

    Rows of the plane run posterior (+v), columns to the patient's left (+u), so angle 90
    is posterior. The centre is the disc mask's centroid.
    """
    if not disc.any():
        raise ValueError("empty disc mask")
    rr, cc = np.nonzero(disc)
    centre = (float(rr.mean()), float(cc.mean()))
    angles = np.radians(np.arange(rays) * 360.0 / rays)
    r_disc = outer_radius(disc, centre, angles)
    r_edge = outer_radius(vertebral_edge, centre, angles)
    return Extension(np.degrees(angles), (r_disc - r_edge) * pixel_mm)


@dataclass(frozen=True)
class Measurements:
    height_mm: float
    extension_mm: float | None = None
    extension_share: float | None = None
    extension_direction_deg: float | None = None
    disc_area_mm2: float | None = None
    rule_class: DiscClass | None = None  # what the 25% rule says from the masks
    #: The disc's own margin in the CT (`tissue_extension`): the arc of the posterior half
    #: beyond the vertebral edge, the largest extension there, and what the rule says of them.
    tissue_arc_deg: float | None = None
    tissue_extension_mm: float | None = None
    tissue_class: DiscClass | None = None
    #: How deep a Schmorl's node seen in the CT reaches into its body (`endplate.find_node`),
    #: None where none is seen.
    node_in_ct_mm: float | None = None


def _body_holes(bone: np.ndarray, plane: Plane) -> np.ndarray:
    """Holes in the bone that lie in front of the canal: a body's dark cancellous inside.

    The spinal canal is a hole too (ringed by the arch) but lies behind the disc centre.
    """
    holes = fill_holes(bone) & ~bone
    lab, n = ndimage.label(holes)
    if n == 0:
        return holes
    rows = ndimage.center_of_mass(holes, lab, range(1, n + 1))
    centre = (plane.size - 1) / 2
    keep = [
        i + 1 for i, (r, _) in enumerate(rows) if (r - centre) * plane.pixel_mm < CANAL_BEHIND_MM
    ]
    return np.isin(lab, keep)


def vertebral_edge(
    vol: Volume, plane: Plane, up_mm: float, down_mm: float, *, root_mm: float = PEDICLE_ROOT_MM
) -> np.ndarray:
    """Outline of the two vertebral bodies next to a disc, projected onto the disc's plane.

    On each side the brightest HU over planes 1.5-6 mm past the endplate (at 0.5 mm,
    lightly smoothed) shows the body's cortex as a ring, even where the cancellous bone
    inside is as dark as soft tissue (osteoporotic or thick-sliced bone) and the ring is
    broken where the basivertebral vein leaves the body. The ring above `EDGE_BONE_HU` is
    closed over such gaps, filled (the canal, a hole behind the disc centre, is not), and
    opened with a disk wider than a pedicle so that the arch does not count as body: in front
    of the disc centre with `PEDICLE_MM`, behind it with ``root_mm`` (`PEDICLE_ROOT_MM`), so
    that the pedicle roots at the posterior corners are cut off too; a vessel lying against
    the body (`_vessels`) is taken out first. The outline is that of either body (their
    union), on ``plane``'s own pixel grid.
    """
    factor = max(1, int(round(EDGE_PIXEL_MM / plane.pixel_mm)))
    coarse = Plane(plane.centre, plane.u, plane.v, plane.size // factor, plane.pixel_mm * factor)
    across = np.min(
        _slices(vol, coarse, tuple(f * (up_mm + down_mm) / 2 for f in (-0.5, 0.0, 0.5))), axis=0
    )
    vessel = _vessels(_bright(across, coarse), coarse)
    centre = coarse.size // 2
    edge = np.zeros((coarse.size, coarse.size), dtype=bool)
    for d in (up_mm, -down_mm):
        side = np.sign(d) or 1.0
        brightest = np.max(
            _slices(vol, coarse, tuple(d + side * off for off in EDGE_OFFSETS_MM)), axis=0
        )
        bone = _bright(brightest, coarse)
        bone = ndimage.binary_closing(bone & ~vessel, structure=disk(RING_GAP_MM / coarse.pixel_mm))
        body = bone | _body_holes(bone, coarse)
        front = _centre_body(disk_opening(body, PEDICLE_MM / coarse.pixel_mm))
        back = (
            front
            if root_mm == PEDICLE_MM
            else _centre_body(disk_opening(body, root_mm / coarse.pixel_mm))
        )
        edge[:centre] |= front[:centre]
        edge[centre:] |= back[centre:]
    edge = _centre_body(edge)
    # The pedicles leave the body at its posterior corners: nothing more than
    # `CONCAVE_MM` behind the posterior wall at the midline (the first row behind the disc
    # centre that is no body) counts; where no wall shows there, the body is taken as about
    # as deep behind the disc centre as in front of it.
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


def _slices(vol: Volume, plane: Plane, offsets: tuple[float, ...]) -> np.ndarray:
    """HU on ``plane`` shifted by each of ``offsets`` (mm) along its normal, stacked."""
    return np.stack(
        [sample_plane(vol.hu, vol.grid, plane.shifted(o), order=1, fill=-1000.0) for o in offsets]
    )


def _bright(hu: np.ndarray, plane: Plane) -> np.ndarray:
    """Where ``hu``, lightly smoothed, is as bright as cortex (`EDGE_BONE_HU`)."""
    return ndimage.gaussian_filter(hu, EDGE_SMOOTH_MM / plane.pixel_mm) > EDGE_BONE_HU


def _vessels(across: np.ndarray, plane: Plane) -> np.ndarray:
    """A vessel lying against the body (a contrast-filled aorta), grown by 1 mm: what stays
    bright right across the disc space (``across``), in parts wider than `VESSEL_MM`, of at
    least `VESSEL_AREA_MM2`, centred more than `VESSEL_AWAY_MM` from the disc centre and in
    front of it. A plane that grazes an endplate (thin, concave or tilted discs) is bright in
    one of the planes across the disc space, not in all; the arch lies behind the disc."""
    wide = disk_opening(across, VESSEL_MM / plane.pixel_mm)
    lab, n = ndimage.label(wide)
    if n:
        area = ndimage.sum_labels(wide, lab, range(1, n + 1)) * plane.pixel_mm**2
        at = np.array(ndimage.center_of_mass(wide, lab, range(1, n + 1))) - (plane.size - 1) / 2
        away = np.hypot(at[:, 0], at[:, 1]) * plane.pixel_mm
        ahead = at[:, 0] < 0
        keep = (area >= VESSEL_AREA_MM2) & (away > VESSEL_AWAY_MM) & ahead
        wide = np.isin(lab, 1 + np.nonzero(keep)[0])
    return ndimage.binary_dilation(wide, structure=disk(1.0 / plane.pixel_mm))


def _centre_body(mask: np.ndarray) -> np.ndarray:
    """The part of ``mask`` under the disc centre (else its largest part): the body, not
    other bone."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    c = mask.shape[0] // 2
    keep = lab[c, c] or int(np.argmax(ndimage.sum_labels(mask, lab, range(1, n + 1)))) + 1
    return lab == keep


def tissue_extension(vol: Volume, plane: Plane, edge: np.ndarray) -> Extension:
    """Extension of the disc's own margin in the CT beyond ``edge`` (on ``plane``, the disc's
    mid plane), per ray over the posterior half (`TISSUE_SECTOR_DEG`) from the body's centre.

    Along each ray, from 2 mm inside the edge, the margin is the first point darker than the
    disc's interior (at most `TISSUE_DISC_MAX_HU`) by `TISSUE_DROP_HU`; a ray that finds none
    within `TISSUE_REACH_MM` counts as reaching that far (a disc filling the canal up to the
    arch).
    """
    px = plane.pixel_mm
    hu = np.mean(_slices(vol, plane, (-1.0, -0.5, 0.0, 0.5, 1.0)), axis=0)
    # `edge` eroded by a disk of TISSUE_INNER_MM (outside the plane counts as outside): the
    # same pixels as binary_erosion with `disk`, through the distance map, far faster
    inner = ndimage.distance_transform_edt(np.pad(edge, 1))[1:-1, 1:-1] > TISSUE_INNER_MM / px
    disc_hu = min(float(np.median(hu[inner if inner.any() else edge])), TISSUE_DISC_MAX_HU)
    smooth = ndimage.gaussian_filter(hu, TISSUE_SMOOTH_MM / px)
    rr, cc = np.nonzero(edge)
    centre = (float(rr.mean()), float(cc.mean()))
    deg = np.arange(TISSUE_SECTOR_DEG[0], TISSUE_SECTOR_DEG[1] + 1e-6, TISSUE_STEP_DEG)
    angles = np.radians(deg)
    r_edge = outer_radius(edge, centre, angles)
    steps = np.arange(-2.0, TISSUE_REACH_MM + 1e-6, 0.25) / px
    rad = np.nan_to_num(r_edge)[:, None] + steps[None, :]
    rows = centre[0] + np.sin(angles)[:, None] * rad
    cols = centre[1] + np.cos(angles)[:, None] * rad
    values = ndimage.map_coordinates(smooth, [rows, cols], order=1, cval=-1000.0)
    dark = values < disc_hu - TISSUE_DROP_HU
    first = np.where(dark.any(axis=1), np.argmax(dark, axis=1), steps.size - 1)
    ext = np.where(np.isfinite(r_edge), steps[first] * px, np.nan)
    return Extension(deg, ext)


def tissue_arc_deg(ext: Extension) -> float:
    """Degrees of a `tissue_extension`'s arc where the margin lies more than
    `TISSUE_BEYOND_MM` beyond the vertebral edge."""
    return float(np.sum(ext.extension_mm > TISSUE_BEYOND_MM)) * TISSUE_STEP_DEG


def tissue_rule(ext: Extension) -> DiscClass:
    """The paper's rule on the disc's own margin: beyond the edge over more than a quarter of
    the circumference is a bulge, a narrower extension of `TISSUE_FOCAL_MM` a protrusion."""
    if tissue_arc_deg(ext) > TISSUE_BULGE_ARC_DEG:
        return DiscClass.BULGE
    return DiscClass.PROTRUSION if ext.max_mm >= TISSUE_FOCAL_MM else DiscClass.NORMAL


def measure(
    vol: Volume, site: DiscSite, plane: Plane, disc_mask: np.ndarray | None
) -> tuple[Measurements, np.ndarray | None]:
    """The disc's measurements on ``plane`` (its mid axial plane), and the vertebral edge they
    were taken against: the disc's own margin in the CT always, the model's mask where there
    is one."""
    edge = vertebral_edge(vol, plane, site.height_mm / 2, site.height_mm / 2)
    if not edge.any():
        return Measurements(height_mm=site.height_mm), None
    tissue = tissue_extension(vol, plane, edge)
    base = Measurements(
        site.height_mm,
        tissue_arc_deg=tissue_arc_deg(tissue),
        tissue_extension_mm=tissue.max_mm,
        tissue_class=tissue_rule(tissue),
    )
    if disc_mask is None or not disc_mask.any():
        return base, edge
    area = float(disc_mask.sum()) * plane.pixel_mm**2
    ext = disc_extension(disc_mask, edge, plane.pixel_mm)
    share, mx = ext.share, ext.max_mm
    rule = (
        DiscClass.BULGE
        if share > BULGE_SHARE
        else DiscClass.PROTRUSION
        if mx > EXTENDS_MM and share > 0
        else DiscClass.NORMAL
    )
    return (
        replace(
            base,
            extension_mm=mx,
            extension_share=share,
            extension_direction_deg=ext.direction_deg,
            disc_area_mm2=area,
            rule_class=rule,
        ),
        edge,
    )
