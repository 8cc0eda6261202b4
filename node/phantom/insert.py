"""Disc conditions inserted into a real CT at chosen levels (``idaics synth --base``).

A real CT with vertebra labels gives the anatomy: the two vertebral bodies of each disc,
their endplates and their edge. A bulge, a protrusion or a Schmorl's node (the paper's
definitions, as `plan.Disc` draws them for the phantoms) is drawn into the image there:

- measured on the image's own endplates and vertebral edge (the outline of the upper
  body 2 mm above the disc, followed outward from the disc centre);
- filled with the disc's own HU (its median at the centre) and carrying the image's own
  noise: the high-pass residual of the disc interior, moved into place by whole voxels so
  that its grain and correlation are the scanner's;
- with soft edges: a 1 mm partial-volume ramp, then the scanner's blur.

Levels left alone are "unknown" in ``truth.json``: a real disc may already be abnormal.
For training they are labelled as plain discs (``assumed_for_training``), which the card
says; evaluation skips them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from node.analysis.measure import BULGE_SHARE, Extension, disc_extension
from node.analysis.volume import Volume
from node.classes import DiscClass
from node.geometry import Grid, Plane, fit_plane, frame_from_normal, sample_plane
from node.phantom.generate import LABELS_FILE, SERIES_DIR, TRUTH_FILE, save_label_volumes
from node.phantom.plan import Disc
from node.phantom.series import write_volume_series

log = logging.getLogger(__name__)

#: Vertebra names by label id, for the two label schemes in common use.
TOTALSEGMENTATOR = (
    {26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2", 31: "L1"}
    | {32 + i: f"T{12 - i}" for i in range(12)}
    | {44: "C7", 45: "C6", 46: "C5", 47: "C4", 48: "C3", 49: "C2", 50: "C1"}
)
VERSE = (
    {i: f"C{i}" for i in range(1, 8)}
    | {7 + i: f"T{i}" for i in range(1, 13)}
    | {19 + i: f"L{i}" for i in range(1, 7)}
    | {26: "S1", 28: "T13"}
)
SCHEMES = {"totalsegmentator": TOTALSEGMENTATOR, "verse": VERSE}
SPINE_ORDER = (
    [f"C{i}" for i in range(1, 8)]
    + [f"T{i}" for i in range(1, 14)]
    + [f"L{i}" for i in range(1, 7)]
    + ["S1"]
)

RAYS = 360
#: Upper body's outline this far above the disc gives the vertebral edge.
EDGE_PLANE_MM = 2.0
PSF_MM = 0.6  # in-plane blur added to inserted edges (a standard kernel's sharpness)
RAMP_MM = 1.0  # partial-volume ramp across an inserted boundary
LESION_REACH_MM = 14.0  # how far past the vertebral edge a lesion's box reaches
NOISE_SIGMA_MM = 1.2  # low-pass that separates the image's noise from its anatomy
MARGIN_MM = 2.5
MEASURE_PX = 480
MEASURE_MM = 0.25


class BaseError(ValueError):
    """A base CT or its labels that cannot take inserted lesions."""


@dataclass(frozen=True)
class BaseCT:
    name: str
    hu: np.ndarray  # (k, r, c) float32, axial slices
    grid: Grid
    vertebra: np.ndarray  # uint8: 1 + index in `names`
    names: tuple[str, ...]  # vertebra names present, cranial first
    source: str

    def volume(self) -> Volume:
        """The CT as scanned, as the analysis reads a volume."""
        return Volume(
            hu=self.hu,
            grid=self.grid,
            study_uid="",
            series_uid="",
            frame_of_reference_uid="",
            sop_instance_uids=(),
        )


@dataclass(frozen=True)
class LevelAnatomy:
    """One disc of the base CT, measured on its labels: frame, endplates, vertebral edge."""

    level: str
    upper: str
    lower: str
    centre: np.ndarray  # LPS, mid disc
    frame: np.ndarray  # columns left (u), posterior (v), cranial (w)
    edge_mm: (
        np.ndarray
    )  # (RAYS,) vertebral edge (or the disc's margin) per angle (0 = left, 90 = posterior)
    top_mm: np.ndarray  # (RAYS,) lowest point of the upper body at 0.8 edge, along w
    bottom_mm: np.ndarray  # (RAYS,) highest point of the lower body
    height_mm: float  # at the centre
    disc_hu: float


@dataclass(frozen=True)
class Lesion:
    """What goes into one level; `Disc` carries the bulge/protrusion profile."""

    level: str
    disc: Disc
    node_into_upper: bool | None = None  # None: no Schmorl's node
    node_u: float = 0.0
    node_v: float = 0.0
    node_radius: float = 3.0
    node_depth: float = 5.0
    rim_mm: float = 1.2
    rim_hu: float = 600.0


def _reorient_axial(arr: np.ndarray, affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip the axes so that k runs along +z, r along +y, c along +x (LPS)."""
    cols = affine_lps[:3, :3]
    perm = [int(np.argmax(np.abs(cols[axis]))) for axis in (2, 1, 0)]
    if sorted(perm) != [0, 1, 2]:
        raise BaseError("the volume is too oblique to read as axial slices")
    arr = np.transpose(arr, perm)
    aff = np.eye(4)
    aff[:3, :3] = cols[:, perm]
    aff[:3, 3] = affine_lps[:3, 3]
    for new_axis, lps_axis in enumerate((2, 1, 0)):
        if aff[lps_axis, new_axis] < 0:
            arr = np.flip(arr, axis=new_axis)
            aff[:3, 3] += aff[:3, new_axis] * (arr.shape[new_axis] - 1)
            aff[:3, new_axis] *= -1
    return np.ascontiguousarray(arr), aff


def load_base(ct: Path, labels: Path, scheme: str, name: str | None = None) -> BaseCT:
    """A real CT (NIfTI, HU) with a vertebra label map on the same grid."""
    import nibabel as nib

    if scheme not in SCHEMES:
        raise BaseError(f"unknown label scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    img: Any = nib.load(str(ct))
    lab: Any = nib.load(str(labels))
    if img.shape != lab.shape or not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise BaseError(f"{labels}: not on the grid of {ct}")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    hu, aff = _reorient_axial(np.asarray(img.dataobj, dtype=np.float32), ras_to_lps @ img.affine)
    ids, _ = _reorient_axial(np.asarray(lab.dataobj).astype(np.int16), ras_to_lps @ img.affine)
    table = SCHEMES[scheme]
    present = sorted({table[i] for i in np.unique(ids) if i in table}, key=SPINE_ORDER.index)
    if len(present) < 2:
        raise BaseError(f"{labels}: fewer than two labelled vertebrae ({scheme} ids)")
    vertebra = np.zeros(ids.shape, dtype=np.uint8)
    for label_id, vname in table.items():
        if vname in present:
            vertebra[ids == label_id] = present.index(vname) + 1
    return BaseCT(
        name or ct.name.split(".")[0], hu, Grid(hu.shape, aff), vertebra, tuple(present), str(ct)
    )


def _body_points(base: BaseCT, code: int) -> np.ndarray:
    """LPS points of a vertebra's body: the front 40% of its voxels."""
    p = base.grid.to_patient(np.argwhere(base.vertebra == code))
    return p[p[:, 1] < np.percentile(p[:, 1], 40)]


def _first_exit(mask: np.ndarray, centre: tuple[float, float], px_mm: float) -> np.ndarray:
    """Per ray from ``centre``, mm to where the mask is first left (NaN: not inside at start)."""
    angles = np.radians(np.arange(RAYS) * 360.0 / RAYS)
    radii = np.arange(0.0, max(mask.shape) / 2, 0.5)
    rr = np.rint(centre[0] + np.outer(np.sin(angles), radii)).astype(int)
    cc = np.rint(centre[1] + np.outer(np.cos(angles), radii)).astype(int)
    ok = (rr >= 0) & (rr < mask.shape[0]) & (cc >= 0) & (cc < mask.shape[1])
    hit = np.zeros(rr.shape, dtype=bool)
    hit[ok] = mask[rr[ok], cc[ok]]
    out = np.argmin(hit, axis=1)  # first False
    out = np.where(hit[:, 0] & ~hit.all(axis=1), out, 0)
    r = radii[out] * px_mm
    return np.where(r > 0, r, np.nan)


def _circular_smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Median then mean over ``width`` rays, around the circle; NaNs filled from neighbours."""
    x = np.asarray(x, dtype=float)
    if np.isnan(x).all():
        raise BaseError("no vertebral edge found")
    idx = np.arange(x.size)
    good = ~np.isnan(x)
    x = np.interp(idx, idx[good], x[good], period=x.size)
    x = ndimage.median_filter(x, size=width, mode="wrap")
    return ndimage.uniform_filter1d(x, size=max(3, width // 3), mode="wrap")


def _plane_fit(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`fit_plane`, with the normal pointing cranial."""
    c, n = fit_plane(p)
    return c, n if n[2] > 0 else -n


def _endplates(
    base: BaseCT, cu: int, cl: int, guess: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre, normal (cranial) and central height of the disc between labels ``cu`` and ``cl``.

    Per voxel column near the bodies' centre, the lowest voxel of the upper vertebra and the
    highest of the lower give the two endplates; a plane through each gives the normal.
    """
    sp = base.grid.spacing
    g = base.grid.to_index(guess[None])[0]
    half = np.ceil(np.array([40.0, 30.0, 30.0]) / sp).astype(int)
    lo = np.maximum(np.floor(g).astype(int) - half, 0)
    hi = np.minimum(np.floor(g).astype(int) + half + 1, np.array(base.grid.shape))
    v = base.vertebra[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    ks = np.arange(lo[0], hi[0])[:, None, None]
    big = 10**6
    u_min = np.where(v == cu, ks, big).min(axis=0)
    l_max = np.where(v == cl, ks, -big).max(axis=0)
    rr, cc = np.mgrid[lo[1] : hi[1], lo[2] : hi[2]]
    xy = np.hypot((rr - g[1]) * sp[1], (cc - g[2]) * sp[2])
    gap = (u_min - l_max) * sp[0]
    ok = (u_min < big) & (l_max > -big) & (gap > 0) & (gap < 20.0) & (xy < 18.0)
    if ok.sum() < 30:
        raise BaseError("too few voxel columns through both vertebral bodies")
    top = base.grid.to_patient(np.stack([u_min[ok] - 0.5, rr[ok], cc[ok]], axis=1))
    bottom = base.grid.to_patient(np.stack([l_max[ok] + 0.5, rr[ok], cc[ok]], axis=1))
    ct, nt = _plane_fit(top)
    cb, nb = _plane_fit(bottom)
    up = nt + nb
    up /= np.linalg.norm(up)
    foot = (top + bottom) / 2
    centre = foot.mean(axis=0)
    centre = centre + up * (((ct + cb) / 2 - centre) @ up)
    d = foot - centre
    radial = np.linalg.norm(d - np.outer(d @ up, up), axis=1)
    central = radial < max(6.0, np.percentile(radial, 20))
    height = float(np.median(((top - bottom)[central]) @ up))
    centre = centre + up * float(np.median(((top + bottom)[central] / 2 - centre) @ up))
    return centre, up, height


def measure_level(base: BaseCT, upper: str, lower: str) -> LevelAnatomy:
    """Frame, endplates and vertebral edge of the disc between two labelled vertebrae."""
    cu, cl = base.names.index(upper) + 1, base.names.index(lower) + 1
    pu, pl = _body_points(base, cu), _body_points(base, cl)
    au = base.grid.to_patient(np.argwhere(base.vertebra == cu))
    al = base.grid.to_patient(np.argwhere(base.vertebra == cl))
    if len(pu) < 200 or len(pl) < 200:
        raise BaseError(f"{upper}-{lower}: a vertebral body is too small in view")
    centre, up, height = _endplates(base, cu, cl, (pu.mean(axis=0) + pl.mean(axis=0)) / 2)
    if not 1.5 < height < 25.0:
        raise BaseError(f"{upper}-{lower}: disc height {height:.1f} mm is implausible")
    frame = frame_from_normal(up)
    for _ in range(2):  # centre on the upper body's own outline
        plane = Plane(
            centre + up * (height / 2 + EDGE_PLANE_MM),
            frame[:, 0],
            frame[:, 1],
            MEASURE_PX,
            MEASURE_MM,
        )
        body = sample_plane((base.vertebra == cu).view(np.uint8), base.grid, plane, order=0) > 0
        body = ndimage.binary_fill_holes(ndimage.binary_opening(body, iterations=4))
        lab, n = ndimage.label(body)
        if n == 0:
            raise BaseError(f"{upper}-{lower}: no body outline above the disc")
        mid = MEASURE_PX / 2 - 0.5
        at = lab[int(mid), int(mid)]
        keep = at if at else 1 + int(np.argmax(ndimage.sum(body, lab, range(1, n + 1))))
        body = lab == keep
        rr, cc = np.nonzero(body)
        shift = (
            plane.pixel_to_patient(np.array([[rr.mean(), cc.mean()]]))[0]
            - plane.pixel_to_patient(np.array([[mid, mid]]))[0]
        )
        centre = centre + shift
    edge = _circular_smooth(_first_exit(body, (rr.mean(), cc.mean()), MEASURE_MM), 15)
    # endplate heights per angle, near the rim (0.6-0.9 of the edge)
    up = frame[:, 2]

    def rim_heights(p: np.ndarray, upper_body: bool) -> np.ndarray:
        d = p - centre
        w = d @ up
        u, v = d @ frame[:, 0], d @ frame[:, 1]
        a = (np.degrees(np.arctan2(v, u)) % 360).astype(int) % RAYS
        r = np.hypot(u, v)
        near = (r > 0.6 * edge[a]) & (r < 0.9 * edge[a]) & (np.abs(w) < height + 8)
        out = np.full(RAYS, np.nan)
        for b in range(0, RAYS, 10):
            sel = near & (a >= b) & (a < b + 10)
            if sel.sum() > 5:
                out[b : b + 10] = np.percentile(w[sel], 3 if upper_body else 97)
        return _circular_smooth(out, 31)

    top, bottom = rim_heights(au, True), rim_heights(al, False)
    top = np.maximum(top, bottom + 1.0)
    # the disc's own HU: its mid plane, inside half the edge
    mid_plane = Plane(centre, frame[:, 0], frame[:, 1], MEASURE_PX, MEASURE_MM)
    yy, xx = np.mgrid[:MEASURE_PX, :MEASURE_PX]
    rr_mm = np.hypot(yy - MEASURE_PX / 2, xx - MEASURE_PX / 2) * MEASURE_MM
    smooth = ndimage.gaussian_filter(sample_plane(base.hu, base.grid, mid_plane, order=1), 4.0)
    core = smooth[rr_mm < 0.5 * float(np.median(edge))]
    # partial volume with the endplates raises the median of thin, tilted discs: kept to the
    # range of disc tissue
    disc_hu = float(np.clip(np.median(core), 70.0, 120.0))
    # where the real disc already reaches past the bone (it borders darker canal, fat or
    # vessel there), lesions start from its own margin, at most `MARGIN_MM` out
    tissue = ndimage.binary_opening(smooth > disc_hu - 35.0, iterations=2)
    margin = _first_exit(tissue, (MEASURE_PX / 2 - 0.5, MEASURE_PX / 2 - 0.5), MEASURE_MM)
    margin = np.where(np.isnan(margin), edge, margin)
    edge = np.clip(_circular_smooth(margin, 15), edge, edge + MARGIN_MM)
    return LevelAnatomy(
        f"{upper}-{lower}", upper, lower, centre, frame, edge, top, bottom, height, disc_hu
    )


#: The highest disc that takes lesions: thoracic discs above it, thin and on few slices, gave no trustworthy outline.
FIRST_LEVEL = "T12-L1"


def base_levels(base: BaseCT) -> list[LevelAnatomy]:
    """Every disc from `FIRST_LEVEL` down between two labelled vertebrae that lies whole in view."""
    out = []
    for upper, lower in zip(base.names, base.names[1:]):
        if SPINE_ORDER.index(upper) < SPINE_ORDER.index(FIRST_LEVEL.split("-")[0]):
            continue
        between = SPINE_ORDER[SPINE_ORDER.index(upper) + 1 : SPINE_ORDER.index(lower)]
        if any(name not in ("T13", "L6") for name in between):
            continue  # a vertebra between them is not labelled
        try:
            lv = measure_level(base, upper, lower)
        except BaseError:
            continue
        if lv.edge_mm.min() < 0.5 * np.median(lv.edge_mm):
            continue  # the upper body's outline is cut by the field of view
        k = base.grid.to_index(lv.centre[None])[0]
        margin = np.array([(lv.height_mm / 2 + 3) / base.grid.spacing[0], 0, 0])
        if np.all(k - margin >= 0) and np.all(k + margin <= np.array(base.grid.shape) - 1):
            out.append(lv)
    return out


def _box(base: BaseCT, lv: LevelAnatomy) -> tuple[slice, slice, slice]:
    """The voxel box a lesion at ``lv`` may change: `LESION_REACH_MM` past its widest edge."""
    c = base.grid.to_index(lv.centre[None])[0]
    sp = np.array(base.grid.spacing)
    half = np.ceil((float(lv.edge_mm.max()) + LESION_REACH_MM) / sp).astype(int)
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.floor(c).astype(int) + half + 1, np.array(base.grid.shape))
    return (
        slice(int(lo[0]), int(hi[0])),
        slice(int(lo[1]), int(hi[1])),
        slice(int(lo[2]), int(hi[2])),
    )


def _local(
    base: BaseCT, lv: LevelAnatomy
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The level's `_box` and each of its voxels' (u, v, w, angle index, radius) in its frame."""
    box = _box(base, lv)
    idx = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij"), axis=-1)
    d = base.grid.to_patient(idx) - lv.centre
    u, v, w = d @ lv.frame[:, 0], d @ lv.frame[:, 1], d @ lv.frame[:, 2]
    a = (np.degrees(np.arctan2(v, u)) % 360).astype(int) % RAYS
    return box, u, v, w, a, np.hypot(u, v)


def _blur(m: np.ndarray, grid: Grid) -> np.ndarray:
    sp = grid.spacing
    return ndimage.gaussian_filter(
        m, sigma=(max(0.3, 0.35 / sp[0]), PSF_MM / sp[1], PSF_MM / sp[2])
    )


def _noise(base: BaseCT, box: tuple, lv: LevelAnatomy, a: np.ndarray) -> np.ndarray:
    """The image's own noise, taken from the disc interior and moved out by whole voxels."""
    sp = base.grid.spacing
    hu = base.hu
    res = hu[box] - ndimage.gaussian_filter(
        hu[box], sigma=(0.6, NOISE_SIGMA_MM / sp[1], NOISE_SIGMA_MM / sp[2])
    )
    inner = res[np.abs(res) < 200]
    sd = 1.4826 * float(np.median(np.abs(inner - np.median(inner)))) if inner.size else 20.0
    res = np.clip(res, -2.5 * sd, 2.5 * sd)  # noise, not the edges of bright structures
    out = np.zeros_like(res)
    inv = np.linalg.inv(base.grid.affine[:3, :3])
    for s in range(8):  # one translation per 45 degree sector
        theta = math.radians(s * 45 + 22.5)
        r = 0.75 * float(np.median(lv.edge_mm))
        vec = r * (math.cos(theta) * lv.frame[:, 0] + math.sin(theta) * lv.frame[:, 1])
        shift = np.rint(inv @ vec).astype(int)
        sel = (a // 45) == s
        out[sel] = ndimage.shift(res, shift, order=0, mode="reflect")[sel]
    return out


@dataclass(frozen=True)
class Drawn:
    """The label masks of one drawn level, inside its box of the volume."""

    box: tuple[slice, slice, slice]
    disc: np.ndarray
    node: np.ndarray


def insert(base: BaseCT, hu: np.ndarray, lv: LevelAnatomy, lesion: Lesion) -> Drawn:
    """Draw ``lesion`` into ``hu`` (in place); returns the label masks in the level's box."""
    box, u, v, w, a, r = _local(base, lv)
    code_u, code_l = base.names.index(lv.upper) + 1, base.names.index(lv.lower) + 1
    vert = base.vertebra[box]
    bone = (vert == code_u) | (vert == code_l)
    mid = (lv.top_mm[a] + lv.bottom_mm[a]) / 2
    half = np.maximum((lv.top_mm[a] - lv.bottom_mm[a]) / 2, 0.5)
    t = (w - mid) / half
    edge = lv.edge_mm[a]
    theta = a.astype(float)
    ext = lesion.disc.extension_mm(theta)
    prof = np.sqrt(np.clip(1.0 - t**2, 0.0, 1.0))
    outer = edge + ext * prof
    inside = (r < edge) & (np.abs(t) < 1.0) & ~bone & (base.hu[box] < 300)
    src = hu[box]
    extends = lesion.disc.bulge_mm > 0 or lesion.disc.protrusion_mm > 0
    # the scan's own noise, only where something is drawn (a level left alone only gets labels)
    drawn = extends or lesion.node_into_upper is not None
    noise = _noise(base, box, lv, a) if drawn else np.zeros_like(src)
    disc = inside.copy()
    if extends:
        soft = np.clip((outer - r) / RAMP_MM + 0.5, 0.0, 1.0) * np.clip(
            (r - (edge - 3.0)) / RAMP_MM, 0.0, 1.0
        )
        soft *= (np.abs(t) < 1.0) * (ext > 0.3) * ~bone
        m = _blur(soft.astype(np.float32), base.grid)
        src[...] = (1 - m) * src + m * (lv.disc_hu + noise)
        disc |= (r < outer) & (np.abs(t) < 1.0) & ~bone & (ext * prof > 0.5)
    node = np.zeros_like(disc)
    if lesion.node_into_upper is not None:
        sign = 1.0 if lesion.node_into_upper else -1.0
        plate = sign * lv.height_mm / 2  # the endplate near the centre, where nodes lie
        depth_in = sign * (w - plate)  # mm into the body
        q = ((u - lesion.node_u) ** 2 + (v - lesion.node_v) ** 2) / lesion.node_radius**2 + (
            np.maximum(depth_in, 0.0) / lesion.node_depth
        ) ** 2
        body_side = depth_in > -1.5
        ell = np.sqrt(q)
        cavity = np.clip((1.0 - ell) * lesion.node_radius / RAMP_MM + 0.5, 0, 1) * body_side
        rim_out = 1.0 + lesion.rim_mm / lesion.node_radius
        rim = (
            np.clip((rim_out - ell) * lesion.node_radius / RAMP_MM + 0.5, 0, 1) * (depth_in > 0)
            - cavity
        )
        rim = np.clip(rim, 0, 1)
        mr, mc = (
            _blur(rim.astype(np.float32), base.grid),
            _blur(cavity.astype(np.float32), base.grid),
        )
        src[...] = (1 - mr) * src + mr * np.maximum(src, lesion.rim_hu + noise)
        src[...] = (1 - mc) * src + mc * (lv.disc_hu + noise)
        node = (cavity > 0.5) & (depth_in > 0)
    hu[box] = src
    return Drawn(box, disc, node)


# -- planning and writing studies -------------------------------------------------------------

#: Share of inserted levels per condition (the rest of each variant's levels stay untouched).
MIX: tuple[tuple[str, float], ...] = (
    ("bulge", 0.30),
    ("protrusion", 0.35),
    ("schmorl", 0.20),
    ("bulge+schmorl", 0.075),
    ("protrusion+schmorl", 0.075),
)


def plan_lesions(
    levels: list[LevelAnatomy], rng: np.random.Generator, *, untouched: float = 0.2
) -> list[Lesion]:
    """Random lesions by the paper's definitions at most of ``levels``."""
    out = []
    names = [k for k, _ in MIX]
    p = np.array([w for _, w in MIX])
    for lv in levels:
        if rng.random() < untouched:
            continue
        out.append(draw_lesion(lv, str(rng.choice(names, p=p / p.sum())), rng))
    return out


def draw_lesion(lv: LevelAnatomy, kind: str, rng: np.random.Generator) -> Lesion:
    """One lesion of ``kind`` (a `MIX` name) at ``lv``, its size and place drawn from ``rng``."""
    kw: dict = {}
    if "bulge" in kind:
        kw = dict(
            bulge_mm=float(rng.uniform(2.5, 5.0)),
            bulge_half_arc_deg=float(rng.uniform(70, 180)),
            bulge_dir_deg=float(90 + rng.uniform(-40, 40)),
        )
    elif "protrusion" in kind:
        kw = dict(
            protrusion_mm=float(rng.uniform(3.0, 7.0)),
            protrusion_half_width_deg=float(rng.uniform(14, 32)),
            protrusion_dir_deg=float(90 + rng.choice([-1, 1]) * rng.uniform(0, 45)),
        )
    classes = tuple(DiscClass(c) for c in kind.split("+"))
    disc = Disc(level=lv.level, reported=True, upper=0, lower=1, classes=classes, **kw)
    node: dict = {}
    if "schmorl" in kind:
        rad = 0.45 * float(np.median(lv.edge_mm)) * math.sqrt(rng.random())
        ang = rng.uniform(0, 2 * math.pi)
        node = dict(
            node_into_upper=bool(rng.random() < 0.6),
            node_u=rad * math.cos(ang),
            node_v=rad * math.sin(ang),
            node_radius=float(rng.uniform(2.0, 4.5)),
            node_depth=float(rng.uniform(3.0, 7.0)),
            rim_mm=float(rng.uniform(0.8, 1.6)),
            rim_hu=float(rng.uniform(450, 800)),
        )
    return Lesion(lv.level, disc, **node)


def _measure(base: BaseCT, lv: LevelAnatomy, disc_level: np.ndarray, code: int) -> Extension:
    plane = Plane(lv.centre, lv.frame[:, 0], lv.frame[:, 1], MEASURE_PX, MEASURE_MM)
    disc = sample_plane(disc_level, base.grid, plane, order=0) == code
    yy, xx = np.mgrid[:MEASURE_PX, :MEASURE_PX]
    mid = MEASURE_PX / 2 - 0.5
    rr = np.hypot(yy - mid, xx - mid) * MEASURE_MM
    aa = (np.degrees(np.arctan2(yy - mid, xx - mid)) % 360).astype(int) % RAYS
    return disc_extension(disc, rr < lv.edge_mm[aa], MEASURE_MM)


def synth_from_base(
    base: BaseCT, out: Path, variants: int, seed: int, *, levels: list[LevelAnatomy] | None = None
) -> list[Path]:
    """Write ``variants`` studies of ``base`` with lesions: CT series, truth.json, labels."""
    levels = base_levels(base) if levels is None else levels
    if not levels:
        raise BaseError(f"{base.name}: no disc between two labelled vertebrae lies whole in view")
    folders = []
    for index in range(variants):
        rng = np.random.default_rng([seed, index, 17])
        folders.append(_one_variant(base, levels, out, seed, index, rng))
    return folders


def _one_variant(
    base: BaseCT,
    levels: list[LevelAnatomy],
    out: Path,
    seed: int,
    index: int,
    rng: np.random.Generator,
) -> Path:
    from pydicom.uid import generate_uid

    hu = base.hu.copy()
    disc_class = np.zeros(hu.shape, dtype=np.uint8)
    disc_level = np.zeros(hu.shape, dtype=np.uint8)
    lesions = {les.level: les for les in plan_lesions(levels, rng)}
    entries = []
    for code, lv in enumerate(levels, start=1):
        les = lesions.get(lv.level) or _scanned(lv.level)
        m, ext, les = _insert_checked(base, hu, lv, les, disc_level, disc_class, code, rng)
        inserted = les.disc.morphology is not DiscClass.NORMAL or les.node_into_upper is not None
        morph = les.disc.morphology
        classes = [c.value for c in les.disc.classes if c is not DiscClass.NORMAL]
        entry: dict = {
            "level": lv.level,
            "classes": classes if inserted else ["unknown"],
            "morphology": morph.value
            if (inserted and morph is not DiscClass.NORMAL)
            else "unknown",
            "assumed_for_training": None
            if (inserted and morph is not DiscClass.NORMAL)
            else "normal",
            "centre_lps": [round(float(x), 2) for x in lv.centre],
            "normal_lps": [round(float(x), 4) for x in lv.frame[:, 2]],
            "left_lps": [round(float(x), 4) for x in lv.frame[:, 0]],
            "height_mm": round(lv.height_mm, 2),
            "vertebrae": [lv.upper, lv.lower],
            "extension_mm": round(ext.max_mm, 2),
            "extension_share": round(ext.share, 3),
            "extension_direction_deg": round(ext.direction_deg, 1),
            "label_code": code,
            "disc_hu": round(lv.disc_hu, 1),
            "inserted": _inserted(les) if inserted else None,
        }
        if les.node_into_upper is not None:
            sign = 1.0 if les.node_into_upper else -1.0
            w = sign * (lv.height_mm / 2 + les.node_depth / 2)
            c = lv.centre + lv.frame @ np.array([les.node_u, les.node_v, w])
            entry["schmorl"] = {
                "vertebra": lv.upper if les.node_into_upper else lv.lower,
                "centre_lps": [round(float(x), 2) for x in c],
                "radius_mm": round(les.node_radius, 2),
                "depth_mm": round(les.node_depth, 2),
                "voxels": int(m.node.sum()),
            }
        entries.append(entry)
    folder = out / f"{base.name}-{seed}-{index:04d}"
    folder.mkdir(parents=True, exist_ok=True)

    def uid(what: str) -> str:
        return str(
            generate_uid(entropy_srcs=["idaics-inserted", base.name, str(seed), str(index), what])
        )

    write_volume_series(
        hu,
        base.grid,
        folder / SERIES_DIR,
        uid=uid,
        patient=f"{base.name}-{seed}-{index}",
        description=f"{base.name} with inserted disc lesions",
    )
    truth = {
        "generator": "idaics synth --base",
        "note": (
            "A real CT with disc lesions drawn into it at known levels; the lesions are synthetic, "
            "levels marked unknown were left as scanned."
        ),
        "base": {"name": base.name, "source": base.source, "vertebrae": list(base.names)},
        "seed": seed,
        "index": index,
        "study_instance_uid": uid("study"),
        "series_instance_uid": uid("series"),
        "grid": {
            "shape": list(base.grid.shape),
            "affine_kji_to_lps": np.round(base.grid.affine, 6).tolist(),
        },
        "levels": entries,
        "vertebrae": list(base.names),
        "label_legend": {
            "disc_class": {str(c.class_id + 1): c.value for c in DiscClass},
            "disc_level": {str(e["label_code"]): e["level"] for e in entries},
            "vertebra": {str(i + 1): n for i, n in enumerate(base.names)},
        },
    }
    tmp = folder / (TRUTH_FILE + ".tmp")
    tmp.write_text(json.dumps(truth, indent=1))
    os.replace(tmp, folder / TRUTH_FILE)
    save_label_volumes(
        folder / LABELS_FILE,
        base.grid,
        disc_class=disc_class,
        disc_level=disc_level,
        vertebra=base.vertebra,
    )
    return folder


def _scanned(level: str) -> Lesion:
    """No lesion: the level as scanned (its truth `unknown`)."""
    return Lesion(level, Disc(level, True, 0, 1, (DiscClass.NORMAL,)))


#: Draws of a lesion at one level before the level is left as scanned: on a real disc the
#: measured share of the circumference can contradict the class drawn (a wide protrusion on
#: a small or irregular disc reads over 25%, a narrow bulge under it).
DRAWS = 6


def _insert_checked(
    base: BaseCT,
    hu: np.ndarray,
    lv: LevelAnatomy,
    les: Lesion,
    disc_level: np.ndarray,
    disc_class: np.ndarray,
    code: int,
    rng: np.random.Generator,
) -> tuple[Drawn, Extension, Lesion]:
    """Draw ``les`` at ``lv`` and label it; where the result measures against its own class
    (a bulge over at most 25% of the circumference, a protrusion over 25% or more), the lesion
    is drawn again with new sizes, up to `DRAWS` times, and then the level is left as scanned
    (its truth `unknown`), with a warning."""
    kind = "+".join(c.value for c in les.disc.classes if c is not DiscClass.NORMAL)
    for attempt in range(DRAWS + 1):
        if attempt == DRAWS:
            log.warning("%s: no %s drawn there measures as one; left as scanned", lv.level, kind)
            les = _scanned(lv.level)
        before = None
        if attempt < DRAWS and les.disc.morphology in (DiscClass.BULGE, DiscClass.PROTRUSION):
            # only these can measure against their class: keep what the draw will change
            box = _box(base, lv)
            before = (box, hu[box].copy(), disc_level[box].copy(), disc_class[box].copy())
        m = insert(base, hu, lv, les)
        morph = les.disc.morphology
        dl, dc = disc_level[m.box], disc_class[m.box]
        dl[m.disc] = code
        dc[m.disc] = morph.class_id + 1
        dl[m.node] = code
        dc[m.node] = DiscClass.SCHMORL.class_id + 1
        ext = _measure(base, lv, disc_level, code)
        wrong = (morph is DiscClass.BULGE and ext.share <= BULGE_SHARE) or (
            morph is DiscClass.PROTRUSION and ext.share >= BULGE_SHARE
        )
        if not wrong or before is None:
            return m, ext, les
        box, h0, l0, c0 = before
        hu[box], disc_level[box], disc_class[box] = h0, l0, c0
        log.info(
            "%s: the %s drawn measures %.2f of the circumference; drawn again",
            lv.level,
            morph.value,
            ext.share,
        )
        les = draw_lesion(lv, kind, rng)
    raise AssertionError("unreachable")


def _inserted(les: Lesion) -> dict:
    d = les.disc
    out: dict = {}
    if d.bulge_mm:
        out["bulge"] = {
            "mm": round(d.bulge_mm, 2),
            "half_arc_deg": round(d.bulge_half_arc_deg, 1),
            "direction_deg": round(d.bulge_dir_deg, 1),
        }
    if d.protrusion_mm:
        out["protrusion"] = {
            "mm": round(d.protrusion_mm, 2),
            "half_width_deg": round(d.protrusion_half_width_deg, 1),
            "direction_deg": round(d.protrusion_dir_deg, 1),
        }
    if les.node_into_upper is not None:
        out["schmorl"] = {
            "into": "upper" if les.node_into_upper else "lower",
            "radius_mm": round(les.node_radius, 2),
            "depth_mm": round(les.node_depth, 2),
            "rim_mm": round(les.rim_mm, 2),
            "rim_hu": round(les.rim_hu, 1),
        }
    return out
