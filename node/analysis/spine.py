"""Find the disc spaces of a CT volume along the spinal column and name their levels.

1. Column: bone at 2 mm (HU above a threshold, cancellous interiors filled in coronal
   planes where the cortex encloses them), opened with a 6 mm ball so that vertebral
   bodies remain and thin posterior elements, ribs and the table go. A smooth curve through
   the centroids of that mask, slab by slab, is the column's centre line.
2. Discs: the mean HU over a 7 mm disc across the centre line, sampled every 0.5 mm along
   it, shows each endplate as a bright peak. A disc space is a dark stretch 1.5-15 mm wide
   (at half its depth) between two endplate peaks, with bone going on past both; a body,
   even one with dark (osteoporotic) cancellous bone, is a longer stretch, so the two are
   told apart by length, not by brightness.
3. Levels: counted upwards from the sacrum, recognised by its alae (bone lateral to the
   body in front of the transverse processes). Without a sacrum in view the disc spaces are
   found but not named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.signal import find_peaks

from node.analysis.volume import Volume
from node.classes import DISC_LEVELS, VERTEBRAE
from node.geometry import Grid

log = logging.getLogger(__name__)

WORK_MM = 2.0
BONE_HU = 120.0
OPEN_RADIUS_VOX = 3.0
STEP_MM = 0.5
PROFILE_RADIUS_MM = 7.0
DISC_MIN_MM, DISC_MAX_MM = 1.5, 15.0
ENDPLATE_PROMINENCE_HU = 90.0
MIN_DISC_SPACING_MM = 18.0
SHOULDER_MM = 12.0
BEYOND_MM = 4.0
BEYOND_DROP_HU = 30.0
SACRUM_WIDTH_RATIO = 1.35


@dataclass(frozen=True)
class DiscSite:
    """A disc space: where the views are cut."""

    index: int  # cranial to caudal, from 0
    level: str  # "L4-L5", or "" where the levels could not be named
    centre: np.ndarray  # LPS
    frame: np.ndarray  # columns: left, posterior, cranial
    height_mm: float

    @property
    def name(self) -> str:
        return self.level or f"disc {self.index + 1}"


@dataclass(frozen=True)
class Spine:
    discs: tuple[DiscSite, ...]
    sacrum_found: bool
    centre_line: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)
    warnings: tuple[str, ...] = ()


def resample_iso(hu: np.ndarray, grid: Grid, mm: float = WORK_MM) -> tuple[np.ndarray, Grid]:
    """Average the volume down to roughly ``mm`` voxels (box mean, then linear zoom)."""
    factors = np.array(grid.spacing) / mm
    # average before sampling, so that a 1 mm cortical shell is not skipped between samples
    box = [max(1, int(round(1 / f))) for f in factors]
    smooth = ndimage.uniform_filter(hu, size=box, mode="nearest") if max(box) > 1 else hu
    out = ndimage.zoom(smooth, factors, order=1, prefilter=False, grid_mode=True, mode="nearest")
    scale = np.array(hu.shape) / np.array(out.shape)
    affine = grid.affine.copy()
    affine[:3, :3] = grid.affine[:3, :3] * scale
    affine[:3, 3] = grid.to_patient((scale - 1) / 2)  # grid_mode keeps the outer edges
    return out, Grid(tuple(out.shape), affine)


def _ball(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    z, y, x = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (x * x + y * y + z * z) <= radius * radius


def _axis_of(grid: Grid, patient_axis: int) -> int:
    cols = np.abs(grid.affine[:3, :3]) / np.linalg.norm(grid.affine[:3, :3], axis=0)
    return int(np.argmax(cols[patient_axis]))


def body_mask(small: np.ndarray, grid: Grid) -> np.ndarray:
    """Vertebral bodies (and the sacrum) at working resolution."""
    bone = ndimage.gaussian_filter(small, 0.5) > BONE_HU
    # Fill cancellous interiors darker than the threshold inside their cortex, in coronal
    # planes: there a body is a closed rectangle, while the spinal canal is open.
    ap = _axis_of(grid, 1)
    moved = np.moveaxis(bone, ap, 0)
    filled = np.empty_like(moved)
    square = np.ones((3, 3), dtype=bool)
    for j in range(moved.shape[0]):
        filled[j] = ndimage.binary_fill_holes(ndimage.binary_closing(moved[j], structure=square))
    bone |= np.moveaxis(filled, 0, ap)
    return ndimage.binary_opening(bone, structure=_ball(OPEN_RADIUS_VOX))


def centre_line(mask: np.ndarray, grid: Grid) -> np.ndarray | None:
    """Points (LPS, every `STEP_MM` along z, cranial first) of the column's centre line."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(mask, lab, range(1, n + 1))
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    big = [i + 1 for i, s in enumerate(sizes) if s * voxel_ml >= 4.0]
    if not big:
        return None
    pts = grid.to_patient(np.argwhere(np.isin(lab, big)))
    # the column: bone near the median lateral position (not iliac wings or other bone)
    x0 = float(np.median(pts[:, 0]))
    pts = pts[np.abs(pts[:, 0] - x0) < 45.0]
    z = pts[:, 2]
    z_lo, z_hi = float(z.min()), float(z.max())
    if z_hi - z_lo < 20.0:
        return None
    edges = np.arange(z_lo, z_hi + 4.0, 4.0)
    idx = np.digitize(z, edges) - 1
    zc, xc, yc, wc = [], [], [], []
    for b in range(len(edges) - 1):
        sel = idx == b
        if sel.sum() < 10:
            continue
        zc.append(z[sel].mean())
        xc.append(np.median(pts[sel, 0]))
        # the front part of the column: the bodies, not what is left of the arches
        yc.append(np.percentile(pts[sel, 1], 40))
        wc.append(np.sqrt(sel.sum()))
    if len(zc) < 4:
        return None
    # a short field of view gets a straighter line: end bins are too few to bend it
    deg = int(np.clip((z_hi - z_lo) // 60, 1, min(4, len(zc) - 1)))
    px = np.polyfit(zc, xc, deg, w=wc)
    py = np.polyfit(zc, yc, deg, w=wc)
    zs = np.arange(z_hi, z_lo, -STEP_MM)
    return np.stack([np.polyval(px, zs), np.polyval(py, zs), zs], axis=1)


def _tangents(line: np.ndarray) -> np.ndarray:
    t = np.gradient(line, axis=0)
    t = -t  # the line runs caudal; tangents point cranial
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def _frame(up: np.ndarray) -> np.ndarray:
    left = np.array([1.0, 0.0, 0.0]) - up * up[0]
    left /= np.linalg.norm(left)
    return np.stack([left, np.cross(up, left), up], axis=1)


def column_profile(vol: Volume, line: np.ndarray, radius: float = PROFILE_RADIUS_MM) -> np.ndarray:
    """Mean HU over a disc of ``radius`` across the centre line at each of its points."""
    tang = _tangents(line)
    rr, aa = np.meshgrid(np.linspace(0, radius, 4), np.linspace(0, 2 * np.pi, 12, endpoint=False))
    offs = np.stack([rr.ravel() * np.cos(aa.ravel()), rr.ravel() * np.sin(aa.ravel())], axis=1)
    out = np.empty(len(line))
    for i, (p, t) in enumerate(zip(line, tang)):
        f = _frame(t)
        pts = p + offs[:, :1] * f[:, 0] + offs[:, 1:] * f[:, 1]
        out[i] = ndimage.map_coordinates(vol.hu, vol.grid.to_index(pts).T, order=1, mode="nearest").mean()
    return ndimage.gaussian_filter1d(out, 1.0 / STEP_MM)


def _valleys(profile: np.ndarray, min_depth: float, max_mm: float, lo: int = 0, hi: int | None = None):
    """Valleys of the profile in ``[lo, hi)`` as ((start, end), depth).

    A valley's depth is measured against the lower of the highest points within
    `SHOULDER_MM` on either side (an endplate on one side may be faint), and its width at
    half that depth.
    """
    hi = len(profile) if hi is None else hi
    reach = int(SHOULDER_MM / STEP_MM)
    minima, _ = find_peaks(-profile[lo:hi])
    out = []
    for i in minima + lo:
        left = profile[max(0, i - reach) : i + 1].max()
        right = profile[i : i + reach + 1].max()
        depth = float(min(left, right) - profile[i])
        if depth < min_depth:
            continue
        level = profile[i] + depth / 2
        a = i
        while a > 0 and profile[a - 1] < level:
            a -= 1
        b = i
        while b < len(profile) - 1 and profile[b + 1] < level:
            b += 1
        if not DISC_MIN_MM <= (b - a + 1) * STEP_MM <= max_mm:
            continue
        # bone must go on past both endplates: a dark stretch at the end of the column (the
        # last body's inside, or a body cut by the field of view) is no disc space
        beyond = int(BEYOND_MM / STEP_MM)
        before, after = profile[max(0, a - beyond) : a], profile[b + 1 : b + 1 + beyond]
        if before.size == 0 or after.size == 0:
            continue  # the valley runs into the end of the field of view
        if min(before.mean(), after.mean()) < profile[i] - BEYOND_DROP_HU:
            continue
        out.append(((a, b), depth))
    return out


def disc_spans(profile: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) indices of the dark stretches of the profile that are disc spaces.

    A disc space is a valley at least `ENDPLATE_PROMINENCE_HU` below the endplates around it
    and `DISC_MIN_MM` to `DISC_MAX_MM` wide at half its depth; the inside of a vertebral
    body may be as dark (osteoporotic bone) but is wider.
    """
    found = _valleys(profile, ENDPLATE_PROMINENCE_HU, DISC_MAX_MM)
    depth = dict(found)
    # two candidates closer than a body height are one disc: keep the deeper one
    kept: list[tuple[int, int]] = []
    for sp in sorted(depth, key=lambda x: -depth[x]):
        mid = (sp[0] + sp[1]) / 2
        if all(abs(mid - (k[0] + k[1]) / 2) * STEP_MM >= MIN_DISC_SPACING_MM for k in kept):
            kept.append(sp)
    kept.sort()
    # a gap of about two spacings hides a disc whose endplates are faint: look again there
    # with relaxed criteria
    mids = [(a + b) / 2 for a, b in kept]
    if len(mids) >= 3:
        step = float(np.median(np.diff(mids)))
        for m0, m1 in zip(mids[:-1], mids[1:]):
            if m1 - m0 > 1.6 * step:
                extra = _valleys(profile, ENDPLATE_PROMINENCE_HU / 2, 1.4 * DISC_MAX_MM,
                                 int(m0 + 0.5 * step), int(m1 - 0.5 * step))
                if extra:
                    kept.append(max(extra, key=lambda e: e[1])[0])
    return sorted(kept)


def _front_width(mask: np.ndarray, grid: Grid, centre: np.ndarray, frame: np.ndarray) -> float:
    """Lateral extent of bone in front of the canal in the plane through ``centre``."""
    u = np.arange(-80.0, 80.0 + 1e-6, 1.0)
    v = np.arange(-20.0, 6.0 + 1e-6, 2.0)
    uu, vv = np.meshgrid(u, v)
    pts = centre + uu.ravel()[:, None] * frame[:, 0] + vv.ravel()[:, None] * frame[:, 1]
    hit = ndimage.map_coordinates(mask.astype(np.uint8), grid.to_index(pts).T, order=0, mode="constant")
    cols = hit.reshape(uu.shape).any(axis=0)
    if not cols.any():
        return 0.0
    lab, _ = ndimage.label(cols)
    mid = lab[len(u) // 2]
    if mid == 0:
        return 0.0
    xs = u[lab == mid]
    return float(xs.max() - xs.min())


def find_spine(vol: Volume) -> Spine:
    """Disc sites of a CT volume, with their levels named where the sacrum is in view."""
    small, grid = resample_iso(vol.hu, vol.grid)
    mask = body_mask(small, grid)
    line = centre_line(mask, grid)
    if line is None:
        return Spine((), False, warnings=("no vertebral column found",))
    profile = column_profile(vol, line)
    spans = disc_spans(profile)
    tang = _tangents(line)
    sites = [((line[a] + line[b]) / 2, _frame(tang[(a + b) // 2]), (b - a) * STEP_MM, (a + b) // 2)
             for a, b in spans]
    warnings: list[str] = []
    if not sites:
        return Spine((), False, line, ("no disc space found along the column",))
    # the sacrum: the bone under the lowest disc is much wider than the body above it
    centre, frame, height, c = sites[-1]
    below = centre - frame[:, 2] * (height / 2 + 10.0)
    above = centre + frame[:, 2] * (height / 2 + 10.0)
    w_below, w_above = _front_width(mask, grid, below, frame), _front_width(mask, grid, above, frame)
    sacrum = w_above > 0 and w_below > SACRUM_WIDTH_RATIO * w_above
    names = [""] * len(sites)
    if sacrum:
        s1 = VERTEBRAE.index("S1")
        for j in range(len(sites)):
            k = s1 - (len(sites) - j)
            names[j] = f"{VERTEBRAE[k]}-{VERTEBRAE[k + 1]}" if k >= 0 else ""
    else:
        warnings.append("sacrum not in the field of view: disc levels are not named")
    spacing = np.diff([s[3] for s in sites]) * STEP_MM
    for i, gap in enumerate(spacing):
        if gap > 1.7 * float(np.median(spacing)):
            warnings.append(f"{gap:.0f} mm between disc spaces {i + 1} and {i + 2}: one may be missed")
    discs = [DiscSite(i, n, c_, f_, h_) for i, ((c_, f_, h_, _), n) in enumerate(zip(sites, names))]
    if sacrum:
        discs = [d for d in discs if d.level in DISC_LEVELS]
    return Spine(tuple(discs), sacrum, line, tuple(warnings))
