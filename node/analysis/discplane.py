"""A disc site's own plane and centre, from the two endplates around it.

The column's centre line gives each disc space a first centre and a plane across the line;
in a lordotic spine the line's tangent is not the disc's plane, and on a scan cropped
around the column the line can run off the bodies' centre. Here each site is measured on
the image: in a box around the first guess, every voxel column along the guessed normal
that starts in the disc finds the bone of the body above and below it (the endplates). A
plane through each endplate gives the normal (their bisector, for a wedge-shaped disc); the
columns that found both, connected to the centre, are the disc's footprint, whose centroid
is the new centre. Three rounds, each in the frame the one before found. Where the image does
not show two endplates (too few columns, an implausible height, a large turn or shift), the
site stays as the line gave it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.geometry import Grid, fit_plane, frame_from_normal

REACH_MM = 32.0  # half side of the box across the disc (a lumbar body is up to 50 mm wide)
STEP_MM = 1.0  # across the disc
W_STEP_MM = 0.5  # along the normal
PEAK_HU = 40.0  # an endplate's cortex stands this far over the disc before it
CORTEX_MM = 1.0  # peak to peak spans the disc and half of each cortex
CENTRAL_MM = 7.0
MIN_FOOTPRINT_MM2 = 150.0
MAX_TURN_DEG = 25.0
ROUNDS = 3
OPEN_MM = 5.0
SMALL_HOLE_MM2 = 40.0
MAX_SHIFT_MM = 14.0


def _sample(
    hu: np.ndarray, grid: Grid, centre: np.ndarray, frame: np.ndarray, reach_w: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    us = np.arange(-REACH_MM, REACH_MM + 1e-6, STEP_MM)
    ws = np.arange(-reach_w, reach_w + 1e-6, W_STEP_MM)
    idx = grid.lattice_index(centre, ((ws, frame[:, 2]), (us, frame[:, 0]), (us, frame[:, 1])))
    vals = ndimage.map_coordinates(
        hu, idx.reshape(3, -1), order=1, mode="constant", cval=-1000.0
    ).reshape(idx.shape[1:])
    return us, ws, ndimage.gaussian_filter(vals, (1.0, 0.6, 0.6))


def _first_peak(seg: np.ndarray) -> np.ndarray:
    """Per column (axis 0 from the disc outward), the index of the first local maximum that
    stands `PEAK_HU` over the darkest value before it (-1: none)."""
    runmin = np.minimum.accumulate(seg, axis=0)
    peak = np.zeros(seg.shape, dtype=bool)
    peak[1:-1] = (
        (seg[1:-1] >= seg[:-2]) & (seg[1:-1] >= seg[2:]) & (seg[1:-1] - runmin[1:-1] >= PEAK_HU)
    )
    first = np.argmax(peak, axis=0)
    return np.where(peak.any(axis=0), first, -1)


def _measure(
    hu: np.ndarray, grid: Grid, centre: np.ndarray, frame: np.ndarray, height: float
) -> tuple[np.ndarray, np.ndarray, float] | None:
    reach_w = max(height, 6.0) / 2 + 14.0
    us, ws, vals = _sample(hu, grid, centre, frame, reach_w)
    mid = len(ws) // 2
    r = np.hypot(*np.meshgrid(us, us, indexing="ij"))
    central = r <= CENTRAL_MM
    # each endplate is the first bright peak (its cortex) above and below the disc, standing
    # out from the darkest point passed on the way: in osteoporotic bone, and on thick slices
    # through a thin disc, the bodies can be as dark as the disc, their cortex is not
    up_idx = _first_peak(vals[mid:])
    down_idx = _first_peak(vals[: mid + 1][::-1])
    ok = (up_idx > 0) & (down_idx > 0)
    top = ws[mid] + up_idx * W_STEP_MM
    bottom = ws[mid] - down_idx * W_STEP_MM
    gap = np.where(ok, top - bottom, np.nan)
    if not ok[central].any():
        return None
    central_gap = float(np.nanmedian(gap[central]))
    ok &= (gap > 1.0) & (gap < max(2.0 * central_gap, central_gap + 6.0))
    lab, _ = ndimage.label(ok)
    near = lab[central & ok]
    if near.size == 0:
        return None
    foot = lab == np.bincount(near).argmax()
    holes, n = ndimage.label(ndimage.binary_fill_holes(foot) & ~foot)
    if n:  # noise makes small holes (the canal, a large one, stays out)
        small = np.flatnonzero(
            ndimage.sum(np.ones_like(foot), holes, range(1, n + 1)) * STEP_MM**2 <= SMALL_HOLE_MM2
        )
        foot = foot | np.isin(holes, small + 1)
    # opened by a disk: thin bridges to a pedicle, a facet or a rib head are not the disc
    deep = ndimage.distance_transform_edt(foot) * STEP_MM > OPEN_MM
    dl, n = ndimage.label(deep)
    if n:
        sizes = ndimage.sum(deep, dl, range(1, n + 1))
        deep = dl == 1 + int(np.argmax(sizes))
        foot = foot & (ndimage.distance_transform_edt(~deep) * STEP_MM <= OPEN_MM + 0.5)
    if foot.sum() * STEP_MM**2 < MIN_FOOTPRINT_MM2:
        return None
    uu, vv = np.meshgrid(us, us, indexing="ij")

    def pts(w: np.ndarray, sel: np.ndarray) -> np.ndarray:
        return (
            centre
            + uu[sel][:, None] * frame[:, 0]
            + vv[sel][:, None] * frame[:, 1]
            + w[sel][:, None] * frame[:, 2]
        )

    # the endplate planes from the inner part of the footprint (the rim is rounded)
    inner = foot & ok & (ndimage.distance_transform_edt(foot) * STEP_MM > 2.5)
    if inner.sum() < 20:
        inner = foot & ok
    _, n_top = fit_plane(pts(top, inner))
    _, n_bot = fit_plane(pts(bottom, inner))
    n_top = n_top if n_top @ frame[:, 2] > 0 else -n_top
    n_bot = n_bot if n_bot @ frame[:, 2] > 0 else -n_bot
    up = n_top + n_bot
    up /= np.linalg.norm(up)
    # the centre of its deep part: what joins the disc at its side (a vessel's wall, a rib
    # head, an osteophyte) barely moves it
    depth = ndimage.distance_transform_edt(foot)
    deep_part = depth >= 0.5 * depth.max()
    # front to back only: left to right, the column's line (between the canal's walls, or the
    # bodies' middle) is the better judge, and a vessel or crus beside the disc moves the
    # footprint's middle sideways more than forward
    cu_, cv_ = 0.0, float(vv[deep_part].mean())
    core = foot & ok & (np.hypot(uu - cu_, vv - cv_) <= CENTRAL_MM)
    if not core.any():
        core = foot & ok
    w_mid = float(np.median((top[core] + bottom[core]) / 2))
    new_centre = centre + cu_ * frame[:, 0] + cv_ * frame[:, 1] + w_mid * frame[:, 2]
    new_height = float(np.median(gap[core])) - CORTEX_MM
    return new_centre, frame_from_normal(up, frame[:, 0]), new_height


def refine_site(
    hu: np.ndarray, grid: Grid, centre: np.ndarray, frame: np.ndarray, height: float
) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """(centre, frame, height, refined) of a disc site measured on its endplates."""
    c, f, h = centre, frame, height
    for _ in range(ROUNDS):
        got = _measure(hu, grid, c, f, h)
        if got is None:
            return centre, frame, height, False
        c, f, h = got
    turn = float(np.degrees(np.arccos(min(1.0, abs(float(f[:, 2] @ frame[:, 2]))))))
    if (
        turn > MAX_TURN_DEG
        or float(np.linalg.norm(c - centre)) > MAX_SHIFT_MM
        or not 1.0 < h < 25.0
    ):
        return centre, frame, height, False
    return c, f, h, True
