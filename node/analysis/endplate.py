"""Schmorl's nodes seen in the CT itself: a rounded defect through the endplate with a
sclerotic rim.

On planes parallel to the disc, from 1 mm inside the disc space to 8 mm into each body, a
node shows as a ring of sclerotic bone around a core of disc tissue (thin slices), or, where
the voxels are too coarse to resolve the core, as a compact bright spot in the cancellous
bone (3 mm voxels blur the rim over it). Each plane is searched inside the vertebral edge,
on the endplate's central part; a node is a finding at one place (within `ALIGN_MM`) on at
least `MIN_PLANES` planes, that is at least 2 mm deep, so that the endplate's own cortex,
cut for a millimetre where the plane grazes it, does not count. The model finds nodes too,
but on real CT it misses most (it was trained on phantoms); this reading does not depend on
it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.analysis.measure import PEDICLE_MM, outer_radius, vertebral_edge
from node.analysis.spine import DiscSite
from node.analysis.volume import Volume
from node.geometry import Plane, sample_plane
from node.masks import disk

PIXEL_MM = 0.5
FIELD_PX = 100  # 50 mm across, centred on the disc: nodes lie well inside the endplate
#: Planes from 1 mm inside the disc space (a tilted or concave endplate) to 8 mm into the
#: body, `STEP_MM` apart.
STEP_MM = 0.5
OFFSETS_MM = tuple(float(x) for x in np.arange(-1.0, 8.0 + STEP_MM / 2, STEP_MM))
SMOOTH_MM = 0.5
INNER_MM = 1.0  # a node lies inside the vertebral edge by at least this
#: ... and its centre lies on the central part of the endplate, at least this share of the
#: body's inscribed radius inside its edge: not in the sacral alae's foramina, nor in the
#: rim where the cortex curves.
CENTRAL = 0.4
#: ... within this share of the body's median radius of the disc centre (the vertebral edge
#: at L5-S1 takes in the sacral alae, which are deep enough inside it)
REACH = 0.7
#: A compact bright spot: this much brighter than the body's median on the plane, 1.2-6 mm in
#: radius, at most twice as long as wide, ringed (2 mm about it) by bone no brighter than the
#: median plus `AROUND_HU` (cancellous bone, not the cortex), within the body all round; read
#: 0-7 mm into the body and 2 mm inside its edge, clear of the cortex.
SPOT_HU = 150.0
SPOT_INNER_MM = 2.0
SPOT_OFFSETS_MM = (0.0, 7.0)
SPOT_RADIUS_MM = (1.2, 6.0)
AROUND_MM = 2.0
#: 3 mm voxels spread a node's sclerotic rim over the bone about it: 2 mm around the spot of
#: a node drawn into the abdomen CT (3 mm voxels) reads 60-90 HU above the median.
AROUND_HU = 80.0
AROUND_OUTSIDE = 0.2  # at most this share of the ring may lie outside the body
#: A spot or core at most this many times as long as wide: coarse slices cut a round node
#: into a short bar (on the abdomen CT's 3 mm voxels up to 2.5 times as long as wide)
ELONGATION = 3.0
#: A ring: bone this much brighter than the median closed around a core 0.8-5 mm in radius
#: that is no brighter than the median plus `CORE_HU` (disc tissue, not bone).
RING_HU = 120.0
CORE_RADIUS_MM = (0.8, 5.0)
CORE_HU = 100.0
ALIGN_MM = 2.5
MIN_PLANES = 4


@dataclass(frozen=True)
class NodeInCT:
    """A node seen in the CT: into the upper (+1) or lower (-1) body, where, how deep (the
    planes it was seen on, `STEP_MM` each), and its outline on each of them (for the SEG)."""

    side: int
    centre_lps: np.ndarray
    depth_mm: float
    outlines: tuple[tuple[Plane, np.ndarray], ...]


#: A shape seen on one plane: its offset past the endplate, its centre (row, column in
#: pixels), its mask and the plane.
Seen = tuple[float, np.ndarray, np.ndarray, Plane]


def _round(mask: np.ndarray) -> bool:
    rr, cc = np.nonzero(mask)
    if rr.size < 3:
        return False
    ev = np.linalg.eigvalsh(np.cov(np.stack([rr, cc]).astype(float)))
    return bool(ev[0] > 0 and ev[1] / ev[0] <= ELONGATION**2)


def _area_ok(mask: np.ndarray, radius_mm: tuple[float, float]) -> bool:
    area = float(mask.sum()) * PIXEL_MM**2
    return bool(np.pi * radius_mm[0] ** 2 <= area <= np.pi * radius_mm[1] ** 2)


def candidates(hu: np.ndarray, depth: np.ndarray, off: float) -> list[np.ndarray]:
    """The node-like shapes on one plane ``off`` mm past the endplate: bright spots (filled)
    and the cores of rings; ``depth`` is each pixel's distance inside the vertebral edge."""
    sm = ndimage.gaussian_filter(hu, SMOOTH_MM / PIXEL_MM)
    return _spots(sm, depth, off) + _ring_cores(sm, depth > INNER_MM / PIXEL_MM)


def _spots(sm: np.ndarray, depth: np.ndarray, off: float) -> list[np.ndarray]:
    inside = depth > SPOT_INNER_MM / PIXEL_MM
    if inside.sum() < 50 or not SPOT_OFFSETS_MM[0] <= off <= SPOT_OFFSETS_MM[1]:
        return []
    bg = float(np.median(sm[inside]))
    lab, n = ndimage.label(ndimage.binary_fill_holes((sm > bg + SPOT_HU) & inside))
    ring = disk(AROUND_MM / PIXEL_MM)
    out = []
    for i in range(1, n + 1):
        m = lab == i
        if not (_area_ok(m, SPOT_RADIUS_MM) and _round(m)):
            continue
        around = ndimage.binary_dilation(m, ring) & ~m
        if (
            around.any()
            and float(np.median(sm[around])) <= bg + AROUND_HU
            and float(np.mean(around & ~inside)) <= AROUND_OUTSIDE
        ):
            out.append(m)
    return out


def _ring_cores(sm: np.ndarray, inside: np.ndarray) -> list[np.ndarray]:
    bg = float(np.median(sm[inside]))
    rim = (sm > bg + RING_HU) & inside
    lab, n = ndimage.label(ndimage.binary_fill_holes(rim) & ~rim)
    out = []
    for i in range(1, n + 1):
        m = lab == i
        if _area_ok(m, CORE_RADIUS_MM) and _round(m) and float(np.mean(sm[m])) <= bg + CORE_HU:
            out.append(m)
    return out


def find_node(vol: Volume, site: DiscSite) -> NodeInCT | None:
    """The deepest-seen node next to ``site``'s endplates, or None."""
    u, v = site.frame[:, 0], site.frame[:, 1]
    base = Plane(site.centre, u, v, FIELD_PX, PIXEL_MM)
    half = site.height_mm / 2
    edge = vertebral_edge(vol, base, half, half, root_mm=PEDICLE_MM)
    depth = ndimage.distance_transform_edt(np.pad(edge, 1))[1:-1, 1:-1]
    if np.sum(depth > INNER_MM / PIXEL_MM) < 50:
        return None
    central = CENTRAL * float(depth.max())
    c = (FIELD_PX - 1) / 2
    radius = float(np.nanmedian(outer_radius(edge, (c, c), np.radians(np.arange(0, 360, 5.0)))))
    best: NodeInCT | None = None
    best_n = 0
    for side in (1, -1):
        found: list[Seen] = []
        for off in OFFSETS_MM:
            plane = base.shifted(side * (half + off))
            hu = sample_plane(vol.hu, vol.grid, plane, order=1, fill=-1000.0)
            for m in candidates(hu, depth, off):
                rr, cc = np.nonzero(m)
                at = np.array([rr.mean(), cc.mean()])
                near = np.hypot(at[0] - c, at[1] - c) <= REACH * radius
                if near and depth[int(round(at[0])), int(round(at[1]))] >= central:
                    found.append((off, at, m, plane))
        for _, at, _, _ in found:
            same = [f for f in found if np.hypot(*(f[1] - at)) * PIXEL_MM < ALIGN_MM]
            offs = sorted({f[0] for f in same})
            if len(offs) < MIN_PLANES or len(offs) <= best_n:
                continue
            best_n = len(offs)
            one: dict[float, Seen] = {}
            for f in same:  # one outline per plane: the largest there
                if f[0] not in one or f[2].sum() > one[f[0]][2].sum():
                    one[f[0]] = f
            mid = one[offs[len(offs) // 2]]
            centre = mid[3].pixel_to_patient(mid[1][None, :])[0]
            best = NodeInCT(
                side,
                centre,
                len(offs) * STEP_MM,
                tuple((f[3], f[2]) for f in one.values()),
            )
    return best
