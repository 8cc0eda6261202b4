"""Find the disc spaces of a CT volume along the spinal column and name their levels.

1. Column. Where closed spinal canals chain over `CHAIN_MIN_SPAN_MM` (`canal_points`):
   the bodies in front of them, chained along z and refined on the bone of the bodies
   near the line. Otherwise (a crop around the column): bone at 2 mm (HU above a
   threshold, cancellous interiors filled in coronal planes), opened with a 6 mm ball so
   that the bodies remain, and a smooth curve through it.
2. Discs. On the canal line: dips of the vertebral rim's brightness across the line
   (`column_profile`), the deepest set that keeps a column's rhythm (`_regular_chain`).
   On the bone line: dark stretches 1.5-15 mm wide of the mean HU across the line between
   endplate peaks (`mean_profile`); a body, even an osteoporotic one, is a longer stretch.
3. Levels: counted upwards from the sacrum, recognised by its alae, and downwards from the
   lowest ribs (T12). Disagreement is a warning; the sacrum wins. Without either anchor the
   disc spaces are found but not named.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, sparse
from scipy.signal import find_peaks

from node.analysis.discplane import refine_site
from node.analysis.volume import Volume
from node.classes import DISC_LEVELS, VERTEBRAE
from node.geometry import Grid, frame_from_normal
from node.masks import fill_holes, opening

log = logging.getLogger(__name__)

WORK_MM = 2.0
#: Threads for the per-slice scans (scipy.ndimage releases the GIL).
SCAN_THREADS = 2
BONE_HU = 120.0
OPEN_RADIUS_VOX = 3.0
STEP_MM = 0.5
DISC_MIN_MM, DISC_MAX_MM = 1.5, 15.0
ENDPLATE_PROMINENCE_HU = 100.0
#: Slices thicker than this average a disc with the endplates around it, and the disc's
#: valley in the rim profile shallows about as the thickness grows: the prominence asked of
#: it is scaled by THIN_SLICE_MM / spacing (60 HU at 5 mm, where 2.5 mm slices of the chest CT
#: averaged in pairs show its thoracolumbar discs 60-115 HU deep, 100-220 before).
#: On such slices a site also stays where the profile put it (`find_spine`): the endplates'
#: thin cortex, averaged with the disc and the body, no longer stands out along the normal,
#: and `refine_site` takes the far endplate of a body for the disc's.
THIN_SLICE_MM = 3.0
RIM_RAYS = 16
MEAN_PROMINENCE_HU = 90.0
RIM_R_MM = (4.0, 22.0)
MIN_DISC_SPACING_MM = 18.0
MIN_BODY_RATIO, MAX_BODY_RATIO = 0.75, 1.35
RHYTHM_WEIGHT = 0.5
MIN_SPANNED_BODY_MM = 22.0  # a spacing taken to span two bodies holds two of at least this
SHOULDER_MM = 12.0
BEYOND_MM = 4.0
EDGE_BODY_MM = 12.0
BEYOND_IN_VIEW_MM = 8.0  # a disc looked for past the last one found lies this far in view
#: ... one spacing (the last one's) past it, or a tenth or a fifth nearer: toward the
#: thorax the bodies shorten (the abdomen CT: L1-L2 to L2-L3 36.5 mm, T12-L1 to L1-L2
#: 32.5 mm), and a full spacing then starts the search inside the body past the disc
BEYOND_SPACINGS = (1.0, 0.9, 0.8)
BEYOND_SHIFT_MM = 8.0
#: A site refined to an offset from the centre line this far from its neighbours' is
#: measured again from theirs (`_refine_sites`)
NEIGHBOUR_OFFSET_MM = 6.0
BEYOND_MAX_HEIGHT_MM = 15.0
EDGE_DEPTH_RATIO = 0.7
BEYOND_DROP_HU = 30.0
SACRUM_WIDTH_RATIO = 1.35
#: ... or, where the sacrum's alae are too dark to count as body (older bone), the ilia
#: beside it: bone over `WING_BONE_HU` on this share of `WING_MM` to either side of the
#: column, in planes `WING_BELOW_MM` under the disc, and this much more than above it
WING_MM = (45.0, 90.0)
WING_BELOW_MM = (15.0, 25.0)
WING_BONE_HU = 150.0
WING_SHARE = 0.7
WING_RISE = 0.4
WING_SEEN = 0.5  # ... of what the field of view shows there, where it shows half of it
#: L5-S1 lies at least this far below the lowest rib (four lumbar bodies and their discs,
#: with 13 rib pairs): lateral bone higher up is ribs, not the ilia against the sacrum
#: (`_lumbosacral`)
SACRUM_BELOW_RIB_MM = 80.0
SACRAL_REMNANTS = 2  # dark lines below L5-S1 taken for discs (S1-S2; in a narrow view, iliac bone)
RIB_MEDIAL_MM = 30.0
RIB_REACH_MM = 68.0
RIB_HEAD_RISE_MM = 8.0
RIB_FREE_DISCS = 2  # discs seen below the lowest rib before it is taken for the twelfth
#: A rib is a bar: its bone per mm of lateral reach is no more than this cross-section (an
#: iliac wing, a plate, holds several times as much) ...
RIB_MAX_SECTION_MM2 = 200.0
#: ... and the lowest one lies within this of the next one up (the rib cage; bone this far
#: below all the others is the pelvis, cut by a small field of view into rib-like pieces)
RIB_CAGE_GAP_MM = 80.0
#: The lowest rib found names the levels (and keeps the ilia from being looked for) only
#: where the field of view shows at least this share of where a rib under it would have to
#: reach to be found (`rib_band_in_view`), down to `RIB_VIEW_BELOW_MM` under it: a view cut
#: close about the column (a 160 mm reconstruction circle) cuts off the lowest ribs, which
#: run forward as they go out, and a higher rib, or the pelvis, was taken for the twelfth.
RIB_VIEW_SHARE = 0.9
RIB_VIEW_BELOW_MM = 60.0
#: Below this is a reconstruction circle's padding, outside the field of view (no tissue or
#: air reads so low; scanners pad with -1500 to -3024).
OUT_OF_VIEW_HU = -1200.0
#: What the working volume holds outside the circle a square image is reconstructed in
#: (`outside_circle`), where the scanner wrote air there instead of padding.
PADDING_HU = -3024.0
CORTEX_HU = 200.0
CANAL_RING_HU = (200.0, 120.0)  # the ring round the canal: cortex, or any bone (thin cortex)
CANAL_MM2 = (60.0, 700.0)
CANAL_MAX_DEPTH_MM = 140.0
CANAL_MAX_HU = 90.0
CANAL_MAX_OFF_MIDLINE_MM = 28.0
LINE_BEYOND_MM = 40.0
CHAIN_GAP_MM = 90.0
CHAIN_MIN_SPAN_MM = 60.0
LINE_REACH_MM = 30.0
BODY_WINDOW_MM = (8.0, 22.0, 18.0)  # |x| and in front of / behind the line: the body
BEYOND_WINDOW_MM = 30.0  # |x| past the canals: the sacrum's body, not the ilia beside it
#: ... and no further along z than this past them: L5-S1 and the top of the sacrum, not the
#: pelvis below (there the bone in the window is coccyx, ilia and hip, and the line followed
#: it 80 mm to the side, its dark stretches taken for discs under L5-S1)
BEYOND_REACH_MM = 60.0


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
    named: tuple[DiscSite, ...] = ()  # every disc whose level was named, reported or not
    rib_anchor: bool = False  # the lowest ribs were found and named levels

    @property
    def skip_reason(self) -> str | None:
        """Why the series cannot be analysed as a lumbar spine, or None."""
        if not self.discs:
            return self.warnings[0] if self.warnings else "no disc space found"
        return None


def _axis_taps(n: int, n_out: int, box: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights, per output sample, of a box mean of ``box`` samples
    (scipy's `uniform_filter1d`, mode "nearest") followed by linear interpolation onto
    ``n_out`` samples that keep the outer edges (`zoom`, ``grid_mode=True``)."""
    x = np.clip((np.arange(n_out) + 0.5) * n / n_out - 0.5, 0, n - 1)
    i0 = np.floor(x).astype(int)
    w = x - i0
    # (1 - w) * mean(a[i0 + o]) + w * mean(a[i0 + 1 + o]) over the window offsets o: the
    # two windows share all but their ends, so box + 1 taps
    t = np.arange(box + 1)
    idx = np.clip(i0[:, None] + t - box // 2, 0, n - 1)
    wts = ((1 - w)[:, None] * (t < box) + w[:, None] * (t >= 1)) / box
    return idx, wts


def _taps(n: int, n_out: int, box: int, dtype: np.dtype) -> sparse.csr_matrix:
    idx, wts = _axis_taps(n, n_out, box)
    rows = np.repeat(np.arange(n_out), idx.shape[1])
    return sparse.csr_matrix((wts.ravel().astype(dtype), (rows, idx.ravel())), shape=(n_out, n))


def resample_iso(
    hu: np.ndarray, grid: Grid, mm: float = WORK_MM, *, peaks: bool = False
) -> tuple[np.ndarray, Grid]:
    """Average the volume down to roughly ``mm`` voxels (box mean, then linear zoom).

    Both are separable, so each axis is averaged and sampled in turn, as one sparse matrix
    of taps per axis: each pass works on the array the last one reduced (the same values as
    a box filter over the whole volume and a 3D zoom, to float rounding, in a twentieth of
    the time). A sheared grid (a gantry-tilted stack) comes out at right angles to its
    slices (`unsheared`, between the slices' pass and the in-plane ones). With ``peaks``
    each voxel is instead the brightest of the voxels its taps reach (the same grid).
    """
    spacing = list(grid.spacing)
    if grid.sheared:  # the slices' own distance, not the longer step along the stack
        spacing[0] = grid.plane_spacing(0)
    factors = np.array(spacing) / mm
    # average before sampling, so that a 1 mm cortical shell is not skipped between samples
    box = [max(1, int(round(1 / f))) for f in factors]
    # slices first (the leading axis: no copy), then rows and columns slice by slice, each
    # slice small enough to stay in cache
    n = hu.shape[0]
    m = int(round(n * factors[0]))
    out, grid = hu, _scaled(grid, (n / m, 1.0, 1.0))
    if m != n or box[0] > 1:
        if peaks:
            out = _brightest(np.ascontiguousarray(out), _axis_taps(n, m, box[0])[0], 0)
        else:
            taps = _taps(n, m, box[0], hu.dtype)
            out = (taps @ out.reshape(n, -1)).reshape((m,) + out.shape[1:])
    if grid.sheared:
        out, grid = unsheared(out, grid)
    shape = [int(round(n * f)) for n, f in zip(out.shape[1:], factors[1:])]
    changed = [m != n or b > 1 for n, m, b in zip(out.shape[1:], shape, box[1:])]
    if peaks:
        for axis in (1, 2):
            if changed[axis - 1]:
                n, m, b = out.shape[axis], shape[axis - 1], box[axis]
                out = _brightest(out, _axis_taps(n, m, b)[0], axis)
    elif any(changed):
        rows, cols = (
            _taps(n, m, b, hu.dtype) if c else None  # None: the axis stays as it is
            for n, m, b, c in zip(out.shape[1:], shape, box[1:], changed)
        )
        done = np.empty((out.shape[0], shape[0], shape[1]), dtype=out.dtype)
        for k in range(out.shape[0]):
            plane = out[k] if rows is None else rows @ out[k]
            done[k] = plane if cols is None else (cols @ plane.T).T
        out = done
    if any(changed):
        grid = _scaled(grid, (1.0, grid.shape[1] / shape[0], grid.shape[2] / shape[1]))
    return np.ascontiguousarray(out), grid


def _brightest(a: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    """Along ``axis``, the brightest of ``a`` over each output sample's taps (``idx``, one
    row of input indices per output sample)."""
    out = np.take(a, idx[:, 0], axis=axis)
    for t in range(1, idx.shape[1]):
        np.maximum(out, np.take(a, idx[:, t], axis=axis), out=out)
    return out


def _scaled(grid: Grid, scale: tuple[float, float, float]) -> Grid:
    """The grid of a volume whose axes were zoomed by 1 / ``scale`` keeping their outer
    edges (``grid_mode``)."""
    s = np.array(scale)
    affine = grid.affine.copy()
    affine[:3, :3] = grid.affine[:3, :3] * s
    affine[:3, 3] = grid.to_patient((s - 1) / 2)
    shape = tuple(int(round(n / f)) for n, f in zip(grid.shape, s))
    return Grid(shape, affine)  # type: ignore[arg-type]


def unsheared(hu: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """A sheared volume (a gantry-tilted stack: each slice shifted sideways from the last)
    on the grid at right angles to its slices, with the same slice planes and pixels: each
    slice is moved back by its shift (linear interpolation at the slices' own pixel size),
    and the slices are widened to hold all of every one; where no slice reaches is padding.
    The leading axis is the slices'."""
    cols = grid.affine[:3, :3]
    normal = np.cross(cols[:, 1], cols[:, 2])
    normal /= np.linalg.norm(normal)
    across = normal * float(cols[:, 0] @ normal)  # one slice to the next at right angles
    side = cols[:, 0] - across  # ... and the sideways shift of each slice, in its plane
    drift = np.array([side @ cols[:, i] / (cols[:, i] @ cols[:, i]) for i in (1, 2)])
    k = hu.shape[0] - 1
    low = np.minimum(0.0, k * drift)
    shape = (hu.shape[0], *(int(np.ceil(n + abs(k * d))) for n, d in zip(hu.shape[1:], drift)))
    out = np.empty(shape, dtype=hu.dtype)
    for i in range(hu.shape[0]):
        ndimage.affine_transform(
            hu[i],
            np.eye(2),
            offset=low - i * drift,
            output_shape=shape[1:],
            output=out[i],
            order=1,
            cval=PADDING_HU,
        )
    affine = grid.affine.copy()
    affine[:3, 0] = across
    affine[:3, 3] = grid.to_patient(np.array([0.0, *low]))
    return out, Grid(shape, affine)


def peaks_iso(hu: np.ndarray, grid: Grid, mm: float = WORK_MM) -> np.ndarray:
    """The working volume of `resample_iso` from the brightest voxel each working voxel
    reaches rather than their mean, smoothed as `smoothed`: the thin cortex of a rib's far
    end, which the mean spreads under `CORTEX_HU` at working voxels, stays as bright as it
    is."""
    return smoothed(resample_iso(hu, grid, mm, peaks=True)[0])


def smoothed(small: np.ndarray) -> np.ndarray:
    """The working volume lightly smoothed (sigma half a voxel), for bone thresholds."""
    return ndimage.gaussian_filter(small, 0.5)


def _ball(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    z, y, x = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (x * x + y * y + z * z) <= radius * radius


def _axis_of(grid: Grid, patient_axis: int) -> int:
    cols = np.abs(grid.affine[:3, :3]) / np.linalg.norm(grid.affine[:3, :3], axis=0)
    return int(np.argmax(cols[patient_axis]))


def body_mask(small: np.ndarray, grid: Grid, smooth: np.ndarray | None = None) -> np.ndarray:
    """Vertebral bodies (and the sacrum) at working resolution (``smooth``: `smoothed` ``small``)."""
    bone = (smoothed(small) if smooth is None else smooth) > BONE_HU
    # Fill cancellous interiors darker than the threshold inside their cortex, in coronal
    # planes: there a body is a closed rectangle, while the spinal canal is open.
    ap = _axis_of(grid, 1)
    moved = np.moveaxis(bone, ap, 0)
    filled = np.empty_like(moved)
    square = np.ones((3, 3), dtype=bool)

    def fill(j: int) -> None:
        filled[j] = fill_holes(ndimage.binary_closing(moved[j], structure=square))

    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        list(pool.map(fill, range(moved.shape[0])))
    bone |= np.moveaxis(filled, 0, ap)
    return opening(bone, _ball(OPEN_RADIUS_VOX))


def _outline(slice_hu: np.ndarray) -> np.ndarray:
    """The patient's body in one axial slice (soft tissue and everything it encloses)."""
    body = ndimage.binary_opening(slice_hu > -400.0, iterations=2)
    lab, n = ndimage.label(body)
    if n == 0:
        return body
    sizes = ndimage.sum_labels(body, lab, range(1, n + 1))
    return fill_holes(lab == 1 + int(np.argmax(sizes)))


def canal_points(small: np.ndarray, grid: Grid, smooth: np.ndarray | None = None) -> np.ndarray:
    """Points (LPS) of vertebral body centres, one per axial slice that shows a closed canal.

    In an axial slice through the pedicles a vertebra is a ring of bone around the spinal
    canal: a dark hole (CSF, cord and fat, under `CANAL_MAX_HU` on average) 6-32 mm wide,
    with the body in front of it (at least 14 mm deep) and the arch behind it. Each slice
    is tried with a ring of cortex and, for thin cortex, of any bone (`CANAL_RING_HU`).
    Contrast-filled vessels, the heart and bowel are never such a ring, and the hole must
    lie within `CANAL_MAX_DEPTH_MM` of the patient's back and `CANAL_MAX_OFF_MIDLINE_MM` of
    the body's midline (ribs, scapulae and the pelvis make rings too). Each point is the body's centre: on the canal's midline, halfway between
    the canal and the body's front.
    """
    zax = _axis_of(grid, 2)
    smooth = np.moveaxis(smoothed(small) if smooth is None else smooth, zax, 0)
    tissue = np.moveaxis(small, zax, 0)
    others = [a for a in range(3) if a != zax]
    pixel_mm2 = float(np.prod([grid.spacing[a] for a in others]))

    def lps(j: int, idx2: np.ndarray) -> np.ndarray:
        return grid.to_patient(np.insert(idx2.astype(float), zax, j, axis=1))

    # patient x of each pixel of a slice (the same for every slice of an axial stack)
    x_of = lps(0, np.argwhere(np.ones(smooth.shape[1:], dtype=bool)))[:, 0].reshape(
        smooth.shape[1:]
    )

    def scan(j: int) -> list[np.ndarray]:
        """The body centres in front of the canals of slice j."""
        out: list[np.ndarray] = []
        inside = _outline(tissue[j])
        if not inside.any():
            return out
        mid_x = float(np.median(x_of[inside]))
        body: np.ndarray | None = None  # the slice's body outline (LPS), once a hole is a candidate
        for thr in CANAL_RING_HU:
            # only bone near the midline: the pelvis or the ribs with the spine enclose larger
            # rings that would swallow the canal
            sl = (smooth[j] > thr) & (np.abs(x_of - mid_x) < CANAL_MAX_OFF_MIDLINE_MM + 17.0)
            if sl.sum() < 20:
                continue
            filled = fill_holes(sl)
            holes, n = ndimage.label(filled & ~sl)
            if n == 0:
                continue
            areas = ndimage.sum_labels(filled, holes, range(1, n + 1)) * pixel_mm2
            cand = np.flatnonzero((areas >= CANAL_MM2[0]) & (areas <= CANAL_MM2[1])) + 1
            if cand.size == 0:
                continue
            if body is None:
                body = lps(j, np.argwhere(inside))
            comp, _ = ndimage.label(sl)
            for h in cand:
                hole = holes == h
                p = lps(j, np.argwhere(hole))
                width, depth = np.ptp(p[:, 0]), np.ptp(p[:, 1])
                c = p.mean(axis=0)
                if not (6.0 <= width <= 32.0 and 5.0 <= depth <= 30.0):
                    continue
                if (
                    abs(c[0] - mid_x) > CANAL_MAX_OFF_MIDLINE_MM
                    or tissue[j][hole].mean() > CANAL_MAX_HU
                ):
                    continue  # off the midline, or the cancellous inside of a body (not a canal)
                column = body[np.abs(body[:, 0] - c[0]) < 3.0]
                if len(column) == 0 or column[:, 1].max() - c[1] > CANAL_MAX_DEPTH_MM:
                    continue
                labs = np.unique(comp[ndimage.binary_dilation(hole) & sl])
                part = fill_holes(np.isin(comp, labs[labs > 0])) & ~hole
                q = lps(j, np.argwhere(part))
                y0, y1 = p[:, 1].min(), p[:, 1].max()
                front = q[(np.abs(q[:, 0] - c[0]) < 8.0) & (q[:, 1] < y0) & (q[:, 1] > y0 - 50.0)]
                back = q[(np.abs(q[:, 0] - c[0]) < 10.0) & (q[:, 1] > y1)]
                if len(front) == 0 or len(back) == 0 or y0 - front[:, 1].min() < 14.0:
                    continue
                # the body's centre: halfway from its front to the canal, on the canal's midline
                out.append(np.array([c[0], (y0 + front[:, 1].min()) / 2, c[2]]))
        return out

    # slices are independent, and scipy.ndimage lets go of the GIL: two threads
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        found = [p for ps in pool.map(scan, range(smooth.shape[0])) for p in ps]
    return np.array(found).reshape(-1, 3)


def _line_from_mask(mask: np.ndarray, grid: Grid) -> np.ndarray | None:
    """A centre line through the bone nearest the median lateral position, for a field of
    view too small to show a closed canal (a crop around the column)."""
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


def _robust_chain(pts: np.ndarray) -> np.ndarray:
    """The longest run of points (sorted along z) that one column can pass through.

    Two points can follow each other when they are at most `CHAIN_GAP_MM` apart along z and
    the column would not bend more than a lordotic spine does between them (6 mm, plus 0.9
    mm per mm along z); rings of the ribs, the scapulae or the pelvis fall out of the run.
    """
    n = len(pts)
    best = np.ones(n, dtype=int)
    prev = np.full(n, -1)
    for j in range(n):
        for i in range(j):
            dz = pts[j, 2] - pts[i, 2]
            if dz > CHAIN_GAP_MM or best[i] + 1 <= best[j]:
                continue
            if np.linalg.norm(pts[j, :2] - pts[i, :2]) <= 6.0 + 0.9 * dz:
                best[j], prev[j] = best[i] + 1, i
    j = int(np.argmax(best))
    run = []
    while j >= 0:
        run.append(j)
        j = int(prev[j])
    return pts[run[::-1]]


def centre_line(
    small: np.ndarray, grid: Grid, mask: np.ndarray | None = None, smooth: np.ndarray | None = None
) -> np.ndarray | None:
    """Points (LPS, every `STEP_MM` along z, cranial first) of the column's centre line.

    The line runs through the vertebral bodies found in front of closed canals
    (`canal_points`), smoothed along z, and goes on for a body height past the last ones.
    """
    pts = canal_points(small, grid, smooth)
    if len(pts) >= 3:
        pts = _robust_chain(pts[np.argsort(pts[:, 2])])
    if len(pts) < 3 or np.ptp(pts[:, 2]) < CHAIN_MIN_SPAN_MM:
        return None  # too few vertebrae in view to chain (a crop around the column)
    line = _smooth_line(pts, grid)
    if mask is None:
        return line
    # twice: the bodies near the line, their front part bin by bin along z, so that the
    # line follows the bone where it bends past the last canal (the lumbosacral junction)
    bone_all = grid.to_patient(np.argwhere(mask))
    for _ in range(2):
        rev = line[::-1]
        dx = bone_all[:, 0] - np.interp(bone_all[:, 2], rev[:, 2], rev[:, 0])
        dy = bone_all[:, 1] - np.interp(bone_all[:, 2], rev[:, 2], rev[:, 1])
        win = (
            (np.abs(dx) < BODY_WINDOW_MM[0]) & (dy > -BODY_WINDOW_MM[1]) & (dy < BODY_WINDOW_MM[2])
        )
        # past the last canal (the sacrum, tilted so that no axial slice closes its canal)
        # the line is only extrapolated: there all the bone of the column counts
        # (a sliver of the field of view past the last canal, less than part of a body, is
        # the same column cut by the edge, not a sacrum: it keeps the window)
        lo, hi = pts[:, 2].min() - 5.0, pts[:, 2].max() + 5.0
        z_all = bone_all[:, 2]
        beyond = np.zeros(len(bone_all), dtype=bool)
        if lo - z_all.min() >= EDGE_BODY_MM:
            beyond |= z_all < lo
        if z_all.max() - hi >= EDGE_BODY_MM:
            beyond |= z_all > hi
        win = np.where(beyond, np.abs(dx) < BEYOND_WINDOW_MM, win)
        win &= (z_all > lo - BEYOND_REACH_MM) & (z_all < hi + BEYOND_REACH_MM)
        bone = np.column_stack(
            [np.where(beyond, bone_all[:, 0], bone_all[:, 0] - dx), bone_all[:, 1:]]
        )[win]
        if len(bone) == 0:
            break
        edges = np.arange(bone[:, 2].min(), bone[:, 2].max() + 4.0, 4.0)
        idx = np.digitize(bone[:, 2], edges) - 1
        counts = np.bincount(idx, minlength=len(edges))
        least = max(
            10.0, 0.4 * float(np.median(counts[counts > 0]))
        )  # a bin at a disc holds little
        fine = []
        for b in range(len(edges) - 1):
            sel = bone[idx == b]
            if len(sel) >= least:
                fine.append([np.median(sel[:, 0]), np.percentile(sel[:, 1], 40), sel[:, 2].mean()])
        if len(fine) < 3:
            break
        line = _smooth_line(np.array(fine), grid)
    return line


def _smooth_line(pts: np.ndarray, grid: Grid) -> np.ndarray:
    """A smooth line through ``pts`` (sorted along z), every `STEP_MM`, cranial first."""
    corners = grid.to_patient(
        np.array(
            [
                [i, j, k]
                for i in (0, grid.shape[0] - 1)
                for j in (0, grid.shape[1] - 1)
                for k in (0, grid.shape[2] - 1)
            ]
        )
    )
    z_lo = max(float(pts[:, 2].min()) - LINE_BEYOND_MM, float(corners[:, 2].min()))
    z_hi = min(float(pts[:, 2].max()) + LINE_BEYOND_MM, float(corners[:, 2].max()))
    zs = np.arange(z_hi, z_lo, -STEP_MM)
    # a smooth curve: a locally weighted line (tricube weights over +-LINE_REACH_MM)
    xy = np.empty((len(zs), 2))
    for i, z in enumerate(zs):
        d = np.abs(pts[:, 2] - z)
        reach = max(LINE_REACH_MM, float(np.sort(d)[min(5, len(d) - 1)]) * 1.2)
        w = np.clip(1 - (d / reach) ** 3, 0, None) ** 3
        sel = w > 0
        zc = pts[sel, 2] - z
        a = np.stack([np.ones(sel.sum()), zc], axis=1) * np.sqrt(w[sel])[:, None]
        coef, *_ = np.linalg.lstsq(a, pts[sel, :2] * np.sqrt(w[sel])[:, None], rcond=None)
        xy[i] = coef[0]
    return np.column_stack([xy, zs])


def _tangents(line: np.ndarray) -> np.ndarray:
    t = np.gradient(line, axis=0)
    t = -t  # the line runs caudal; tangents point cranial
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def column_profile(vol: Volume, line: np.ndarray) -> np.ndarray:
    """The brightness of the vertebral rim at each point of the centre line.

    In the plane across the line, the brightest HU along each of `RIM_RAYS` rays from
    `RIM_R_MM`; the profile is the median over the rays. Through a vertebral body every ray
    crosses its cortex (bright, osteoporotic or not); through a disc space it crosses only
    the annulus. The median ignores the few rays that meet the aorta, a rib head or an
    osteophyte.
    """
    tang = _tangents(line)
    left = np.array([1.0, 0.0, 0.0]) - tang * tang[:, :1]
    left /= np.linalg.norm(left, axis=1, keepdims=True)
    post = np.cross(tang, left)
    ang = np.linspace(0, 2 * np.pi, RIM_RAYS, endpoint=False)
    rr = np.arange(RIM_R_MM[0], RIM_R_MM[1] + 1e-6, 1.5)
    u = (np.cos(ang)[:, None] * rr[None, :]).ravel()
    v = (np.sin(ang)[:, None] * rr[None, :]).ravel()
    pts = (
        line[:, None, :] + u[None, :, None] * left[:, None, :] + v[None, :, None] * post[:, None, :]
    )
    vals = ndimage.map_coordinates(
        vol.hu, vol.grid.to_index(pts.reshape(-1, 3)).T, order=1, mode="nearest"
    )
    rim = np.median(vals.reshape(len(line), RIM_RAYS, len(rr)).max(axis=2), axis=1)
    return ndimage.gaussian_filter1d(rim, 0.5 / STEP_MM)


def mean_profile(vol: Volume, line: np.ndarray, radius: float = 7.0) -> np.ndarray:
    """Mean HU over a disc of ``radius`` across the centre line at each of its points: where
    the line's plane is not the disc's (the lordotic lumbosacral junction), it still shows
    the disc as darker than the bodies."""
    tang = _tangents(line)
    rr, aa = np.meshgrid(np.linspace(0, radius, 4), np.linspace(0, 2 * np.pi, 12, endpoint=False))
    offs = np.stack([rr.ravel() * np.cos(aa.ravel()), rr.ravel() * np.sin(aa.ravel())], axis=1)
    out = np.empty(len(line))
    for i, (p, t) in enumerate(zip(line, tang)):
        f = frame_from_normal(t)
        pts = p + offs[:, :1] * f[:, 0] + offs[:, 1:] * f[:, 1]
        out[i] = ndimage.map_coordinates(
            vol.hu, vol.grid.to_index(pts).T, order=1, mode="nearest"
        ).mean()
    return ndimage.gaussian_filter1d(out, 1.0 / STEP_MM)


def _valleys(
    profile: np.ndarray, min_depth: float, max_mm: float, lo: int = 0, hi: int | None = None
) -> list[tuple[tuple[int, int], float]]:
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


def _rhythm_cost(above: float, below: float) -> float | None:
    """How far two successive disc spacings (cranial first) are from one column's rhythm,
    in units of the largest step allowed (`MAX_BODY_RATIO`), plus one per disc taken as
    missed in between; None where they cannot follow each other.

    The lower body is `MIN_BODY_RATIO` to `MAX_BODY_RATIO` times the upper one, where
    either spacing may span two bodies of at least `MIN_SPANNED_BODY_MM` (a missed disc).
    """
    best = None
    for na, nb in ((1, 1), (2, 1), (1, 2)):
        a, b = above / na, below / nb
        if not MIN_BODY_RATIO <= b / a <= MAX_BODY_RATIO:
            continue
        if (na, nb) != (1, 1) and min(a, b) < MIN_SPANNED_BODY_MM:
            continue
        cost = abs(np.log(b / a)) / np.log(MAX_BODY_RATIO) + (na + nb - 2)
        best = cost if best is None else min(best, cost)
    return best


def _regular_chain(found: list[tuple[tuple[int, int], float]]) -> list[tuple[int, int]]:
    """The deepest set of valleys that a column of vertebrae can hold.

    Neighbouring discs are at least `MIN_DISC_SPACING_MM` apart, and successive spacings
    keep the rhythm of `_rhythm_cost` (bodies grow slowly towards the sacrum): a
    dark band inside a body (a vein, a fracture line) next to the true disc breaks that
    rhythm and falls out. Among the sets that keep the rhythm, the one whose valleys are
    deepest in total, less `RHYTHM_WEIGHT` median depths per step out of rhythm, wins.
    """
    cand = sorted(dict(found).items())
    n = len(cand)
    if n == 0:
        return []
    mid = np.array([(a + b) / 2 * STEP_MM for (a, b), _ in cand])
    dep = np.array([d for _, d in cand])
    unit = float(np.median(dep))  # what a step out of rhythm costs, in valley depth
    # best[i, j]: deepest chain ending in discs i then j (j = i: a chain of one disc)
    best = np.full((n, n), -np.inf)
    back = np.full((n, n), -1)
    for i in range(n):
        best[i, i] = dep[i]
    for j in range(n):
        for i in range(j):
            s_ij = mid[j] - mid[i]
            if s_ij < MIN_DISC_SPACING_MM:
                continue
            if best[i, i] + dep[j] > best[i, j]:
                best[i, j], back[i, j] = best[i, i] + dep[j], i
            for h in range(i):
                if best[h, i] == -np.inf or h == i:
                    continue
                s_hi = mid[i] - mid[h]
                cost = _rhythm_cost(s_hi, s_ij)
                if cost is None:
                    continue
                score = best[h, i] + dep[j] - RHYTHM_WEIGHT * unit * cost
                if score > best[i, j]:
                    best[i, j], back[i, j] = score, h
    before, last = (int(k) for k in np.unravel_index(int(np.argmax(best)), best.shape))
    chain = [last]
    while before != last:  # back to the chain's first disc (where before == last)
        chain.append(before)
        before, last = int(back[before, last]), before
    return [cand[k][0] for k in sorted(chain)]


def _deepest_apart(found: list[tuple[tuple[int, int], float]]) -> list[tuple[int, int]]:
    """Valleys closer than a body height are one disc: the deeper one stays."""
    depth = dict(found)
    kept: list[tuple[int, int]] = []
    for sp in sorted(depth, key=lambda x: -depth[x]):
        mid = (sp[0] + sp[1]) / 2
        if all(abs(mid - (k[0] + k[1]) / 2) * STEP_MM >= MIN_DISC_SPACING_MM for k in kept):
            kept.append(sp)
    return sorted(kept)


def disc_spans(
    profile: np.ndarray, *, regular: bool = True, prominence: float = ENDPLATE_PROMINENCE_HU
) -> list[tuple[int, int]]:
    """(start, end) indices of the dark stretches of the profile that are disc spaces.

    A disc space is a valley at least `ENDPLATE_PROMINENCE_HU` below the endplates around it
    and `DISC_MIN_MM` to `DISC_MAX_MM` wide at half its depth; the inside of a vertebral
    body may be as dark (osteoporotic bone) but is wider.
    """
    found = _valleys(profile, prominence, DISC_MAX_MM)
    kept = _regular_chain(found) if regular else _deepest_apart(found)
    if regular and len(kept) >= 3:
        # a dip at either end with less than part of a body beyond it before the line ends
        # (the edge of the field of view), and much shallower than the disc next to it, is
        # more likely a dark band inside that body
        depth = dict(found)
        edge = int(EDGE_BODY_MM / STEP_MM)
        if (
            kept[-1][1] >= len(profile) - edge
            and depth[kept[-1]] < EDGE_DEPTH_RATIO * depth[kept[-2]]
        ):
            kept = kept[:-1]
        if kept[0][0] < edge and depth[kept[0]] < EDGE_DEPTH_RATIO * depth[kept[1]]:
            kept = kept[1:]
    # a gap of about two spacings hides a disc whose endplates are faint: look again there
    # with relaxed criteria
    mids = [(a + b) / 2 for a, b in kept]
    if len(mids) >= 3:
        step = float(np.median(np.diff(mids)))
        for m0, m1 in zip(mids[:-1], mids[1:]):
            if m1 - m0 > 1.6 * step:
                extra = _deepest_valley(
                    profile,
                    prominence / 2,
                    1.4 * DISC_MAX_MM,
                    int(m0 + 0.5 * step),
                    int(m1 - 0.5 * step),
                )
                if extra is not None:
                    kept.append(extra)
    return sorted(kept)


def _deepest_valley(
    profile: np.ndarray, min_depth: float, max_mm: float, lo: int, hi: int
) -> tuple[int, int] | None:
    """The deepest of `_valleys` in ``[lo, hi)`` (None: none there)."""
    found = _valleys(profile, min_depth, max_mm, lo, hi)
    return max(found, key=lambda e: e[1])[0] if found else None


def _faint_disc_below(
    profile: np.ndarray, spans: list[tuple[int, int]], prominence: float = ENDPLATE_PROMINENCE_HU
) -> tuple[int, int] | None:
    """The deepest valley one spacing below the last disc space, at half the prominence
    `disc_spans` asks for (None: none there). Over the dense top of the sacrum, L5-S1 can
    stand just under that prominence; `find_spine` keeps it only where the sacrum then lies
    under it."""
    if len(spans) < 3:
        return None
    mids = [(a + b) / 2 for a, b in spans]
    step = float(np.median(np.diff(mids)))
    return _deepest_valley(
        profile,
        prominence / 2,
        DISC_MAX_MM,
        int(mids[-1] + 0.5 * step),
        int(mids[-1] + 1.5 * step),
    )


#: A disc site before naming: centre, frame, height, index on the centre line, and whether
#: it was already measured on its endplates.
_Site = tuple[np.ndarray, np.ndarray, float, int, bool]


def _front_width(bone: np.ndarray, grid: Grid, centre: np.ndarray, frame: np.ndarray) -> float:
    """Lateral extent of bone in front of the canal in the plane through ``centre``."""
    u = np.arange(-80.0, 80.0 + 1e-6, 1.0)
    v = np.arange(-20.0, 6.0 + 1e-6, 2.0)
    uu, vv = np.meshgrid(u, v)
    pts = centre + uu.ravel()[:, None] * frame[:, 0] + vv.ravel()[:, None] * frame[:, 1]
    hit = ndimage.map_coordinates(
        bone.astype(np.uint8), grid.to_index(pts).T, order=0, mode="constant"
    )
    cols = hit.reshape(uu.shape).any(axis=0)
    if not cols.any():
        return 0.0
    lab, _ = ndimage.label(cols)
    mid = lab[len(u) // 2]
    if mid == 0:
        return 0.0
    xs = u[lab == mid]
    return float(xs.max() - xs.min())


def _in_view(smooth: np.ndarray, grid: Grid, pts: np.ndarray) -> np.ndarray:
    """``smooth`` at the LPS points ``pts``; NaN where they lie outside the field of view
    (outside the volume, or in a reconstruction circle's padding, under `OUT_OF_VIEW_HU`)."""
    hu = ndimage.map_coordinates(smooth, grid.to_index(pts).T, order=1, cval=np.nan)
    return np.where(hu > OUT_OF_VIEW_HU, hu, np.nan)


def _wings(smooth: np.ndarray, grid: Grid, centre: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Share of `WING_MM` to the left and to the right of the column where bone (the
    brightest HU 40 mm in front of and behind ``centre``, over `WING_BONE_HU`) lies, in the
    plane through ``centre``: of the part in the field of view, where that is at least
    `WING_SEEN` of it (else NaN: too little of that side is in view)."""
    u = np.arange(-WING_MM[1], WING_MM[1] + 1e-6, 1.0)
    v = np.arange(-40.0, 40.0 + 1e-6, 2.0)
    uu, vv = np.meshgrid(u, v)
    pts = centre + uu.ravel()[:, None] * frame[:, 0] + vv.ravel()[:, None] * frame[:, 1]
    hu = _in_view(smooth, grid, pts).reshape(uu.shape)
    seen = np.isfinite(hu).any(axis=0)
    bone = np.where(seen, np.nan_to_num(hu, nan=-1000.0).max(axis=0), -1000.0) > WING_BONE_HU
    out = []
    for side in (u <= -WING_MM[0], u >= WING_MM[0]):
        # the share of what the field of view shows there (a small one cuts the ilia off)
        n = int((side & seen).sum())
        out.append(float(bone[side & seen].sum()) / n if n >= WING_SEEN * side.sum() else np.nan)
    return np.array(out)


def _lumbosacral(
    mask: np.ndarray,
    smooth: np.ndarray,
    grid: Grid,
    sites: list[_Site],
    rib_z: float | None = None,
) -> int | None:
    """Index of the L5-S1 disc among the lowest `SACRAL_REMNANTS` + 1 sites, or None without
    a sacrum.

    Under L5-S1 the bone in front of the canal (S1 with its alae) is much wider than the body
    above; or, where the alae are too dark to count as body, the ilia lie against the sacrum
    on both sides there (`_wings`), and not beside L5. Where the field of view is too narrow
    to show the ilia (cut 50-65 mm to either side of the column), the alae's cortex runs to
    its edge as a thin band that the bodies' ``mask`` loses to its opening: there the width
    is read on all bone over `BONE_HU`. Where the lowest rib is in view (at ``rib_z``), the
    ilia are not looked for less than `SACRUM_BELOW_RIB_MM` below it: the bone beside the
    column there is the lowest ribs (a chest CT cut 15 mm under its L1-L2 read them as the
    ilia, and every level was named four too low).
    """

    def wider_below(m: np.ndarray, centre: np.ndarray, frame: np.ndarray, height: float) -> bool:
        below = _front_width(m, grid, centre - frame[:, 2] * (height / 2 + 10.0), frame)
        above = _front_width(m, grid, centre + frame[:, 2] * (height / 2 + 10.0), frame)
        return above > 0 and below > SACRUM_WIDTH_RATIO * above

    all_bone: np.ndarray | None = None  # thresholded once, where a site needs it
    for j in reversed(range(max(0, len(sites) - 1 - SACRAL_REMNANTS), len(sites))):
        centre, frame, height = sites[j][:3]
        if wider_below(mask, centre, frame, height):
            return j
        wings = np.array(
            [
                _wings(smooth, grid, centre + side * frame[:, 2] * (height / 2 + d), frame)
                for side in (-1.0, 1.0)
                for d in WING_BELOW_MM
            ]
        )
        unseen = bool(np.isnan(wings[:2]).any())  # the ilia's side of the view cut off
        seen = np.nan_to_num(wings)  # a side out of view shows no bone
        under = (seen[0] + seen[1]) / 2
        over = (seen[2] + seen[3]) / 2
        near_rib = rib_z is not None and centre[2] > rib_z - SACRUM_BELOW_RIB_MM
        if not near_rib and np.all(under >= WING_SHARE) and np.all(under - over >= WING_RISE):
            return j
        if unseen:
            if all_bone is None:
                all_bone = smooth > BONE_HU
            if wider_below(all_bone, centre, frame, height):
                return j
    return None


def lowest_rib(
    small: np.ndarray, grid: Grid, line: np.ndarray, smooth: np.ndarray | None = None
) -> float | None:
    """Height (LPS z) at which the lowest rib meets the column, or None without ribs.

    Bone lateral to the column (more than `RIB_MEDIAL_MM` to either side, so the vertebrae
    and their arches are cut away and each rib stands alone) falls into pieces; a rib is a
    piece that starts next to the column, reaches more than `RIB_REACH_MM` to the side and
    spans less than 120 mm along z (contrast-filled vessels run long along the spine,
    transverse processes stay short). The height is that of its medial end, raised by
    `RIB_HEAD_RISE_MM` for the slope from the rib head to there. ``smooth`` is the volume
    thresholded (`find_spine` gives `peaks_iso`'s, where slender ribs keep their reach).
    """
    idx = np.argwhere((smoothed(small) if smooth is None else smooth) > CORTEX_HU)
    p = grid.to_patient(idx)
    rev = line[::-1]
    dx = p[:, 0] - np.interp(p[:, 2], rev[:, 2], rev[:, 0])
    dy = p[:, 1] - np.interp(p[:, 2], rev[:, 2], rev[:, 1])
    keep = (
        (p[:, 2] >= line[:, 2].min())
        & (p[:, 2] <= line[:, 2].max())
        & (np.abs(dx) >= RIB_MEDIAL_MM)
        & (np.abs(dx) < 140.0)
        & (dy > -30.0)
        & (dy < 60.0)
    )
    sel = np.zeros(small.shape, dtype=bool)
    sel[tuple(idx[keep].T)] = True
    lab, n = ndimage.label(sel)
    if n == 0:
        return None
    which = lab[tuple(idx[keep].T)]
    q, adx = p[keep], np.abs(dx[keep])
    voxel_mm3 = float(np.prod(grid.spacing))
    lows = []
    for c in range(1, n + 1):
        mine = which == c
        if mine.sum() < 40:
            continue
        a, z = adx[mine], q[mine, 2]
        if a.min() > RIB_MEDIAL_MM + 10.0 or a.max() < RIB_REACH_MM or np.ptp(z) > 120.0:
            continue
        if mine.sum() * voxel_mm3 / np.ptp(a) > RIB_MAX_SECTION_MM2:
            continue
        lows.append(float(z[a < a.min() + 5.0].mean()) + RIB_HEAD_RISE_MM)
    lows.sort()
    while len(lows) >= 2 and lows[1] - lows[0] > RIB_CAGE_GAP_MM:
        lows.pop(0)
    return lows[0] if lows else None


def outside_circle(source: Grid, grid: Grid) -> np.ndarray | None:
    """Voxels of ``grid`` (the working grid of a volume on ``source``) whose centre lies
    outside the circle inscribed in ``source``'s square slices: a CT is reconstructed in
    that circle, and some scanners write air (-1024) rather than padding outside it. None
    where the slices are not square (a crop or a resampled volume: no such circle)."""
    axis = source.slice_axis
    plane = [i for i in range(3) if i != axis]
    n = [source.shape[i] for i in plane]
    sp = [source.spacing[i] for i in plane]
    if n[0] != n[1] or abs(sp[0] - sp[1]) > 1e-3 * sp[0]:
        return None
    centre = (n[0] - 1) / 2

    def far(k: int) -> np.ndarray:
        """The working grid's slice ``k`` (along the slice axis) outside the circle."""
        idx = np.zeros((grid.shape[plane[0]], grid.shape[plane[1]], 3))
        idx[..., axis] = k
        idx[..., plane[0]] = np.arange(grid.shape[plane[0]])[:, None]
        idx[..., plane[1]] = np.arange(grid.shape[plane[1]])[None, :]
        src = source.to_index(grid.to_patient(idx))
        return np.hypot(src[..., plane[0]] - centre, src[..., plane[1]] - centre) > n[0] / 2

    if not source.sheared:  # the same circle in every slice
        return np.expand_dims(far(0), axis)
    # a tilted stack's circle moves sideways from slice to slice: each is mapped on its own
    return np.stack([far(k) for k in range(grid.shape[axis])], axis=axis)


def rib_band_in_view(smooth: np.ndarray, grid: Grid, line: np.ndarray, rib_z: float) -> float:
    """Share of where a rib under ``rib_z`` would have to reach to be found (`lowest_rib`:
    `RIB_REACH_MM` to either side of the column, from 30 mm in front of it to 60 mm behind;
    from ``rib_z`` down `RIB_VIEW_BELOW_MM`) that lies in the field of view (`_in_view`). 1
    where the line does not go below ``rib_z``."""
    low = max(rib_z - RIB_VIEW_BELOW_MM, float(line[:, 2].min()))
    if low >= rib_z:
        return 1.0
    zs = np.linspace(low, rib_z, 8)
    xs = np.array([-RIB_REACH_MM, RIB_REACH_MM])  # where a rib must reach, either side
    ys = np.arange(-30.0, 60.0 + 1e-6, 3.0)
    z, x, y = (a.ravel() for a in np.meshgrid(zs, xs, ys, indexing="ij"))
    rev = line[::-1]
    pts = np.stack(
        [np.interp(z, rev[:, 2], rev[:, 0]) + x, np.interp(z, rev[:, 2], rev[:, 1]) + y, z],
        axis=1,
    )
    return float(np.mean(np.isfinite(_in_view(smooth, grid, pts))))


def _names_from(anchor_disc: int, anchor_level: str, n: int) -> list[str]:
    """Level names of ``n`` discs (cranial first) given that disc ``anchor_disc`` is ``anchor_level``."""
    k0 = VERTEBRAE.index(anchor_level.split("-")[0]) - anchor_disc
    return [
        f"{VERTEBRAE[k0 + j]}-{VERTEBRAE[k0 + j + 1]}" if 0 <= k0 + j < len(VERTEBRAE) - 1 else ""
        for j in range(n)
    ]


def _level_offset(a: str, b: str) -> int:
    """How many levels apart two disc names are ("" counts as above T8)."""

    def pos(name: str) -> int:
        return VERTEBRAE.index(name.split("-")[0]) if name else -1

    return abs(pos(a) - pos(b))


def _disc_beyond(
    vol: Volume, line: np.ndarray, tang: np.ndarray, sites: list[_Site], *, bottom: bool
) -> _Site | None:
    """The disc one spacing (the last one's, `BEYOND_SPACINGS`) below the lowest site found,
    or above the highest, where the centre line goes on `BEYOND_IN_VIEW_MM` past it: kept only
    where its endplates are found there (`refine_site`), no further than `BEYOND_SHIFT_MM`
    from the line and no higher than `BEYOND_MAX_HEIGHT_MM` (inside a body, the nearest
    cortices are its own endplates, a body's height apart). The search starts on the line's
    own tangent at each spacing, then on the nearest disc's plane: at the edge of the field
    of view the line can bend 30-40 degrees away from the discs (the abdomen CT's top, on
    1 mm voxels stacked from the top down), further than a site may turn while refined.

    Near the edge of the field of view the endplates' footprint is cut short on the side the
    disc tilts away to, so the site takes only the plane (normal and height) from its own
    endplates; in the disc's plane it lies where the line does, moved as far as the nearest
    disc's endplates move that disc from the line (the line runs through the front of the
    bodies, 8-12 mm in front of the disc centres at the abdomen CT's L2-L3 to T12-L1).
    """
    if len(sites) < 2:
        return None
    near, next_ = (sites[-1], sites[-2]) if bottom else (sites[0], sites[1])
    c_near, f_near, _, near_ok = refine_site(vol.hu, vol.grid, near[0], near[1], near[2])
    margin = int(BEYOND_IN_VIEW_MM / STEP_MM)
    ats = [near[3] + round(share * (near[3] - next_[3])) for share in BEYOND_SPACINGS]
    ats = [at for at in ats if margin <= at < len(line) - margin]
    tries = [(at, frame_from_normal(tang[at])) for at in ats]
    tries += [(at, f_near) for at in ats] if near_ok else []
    for at, start in tries:
        c, f, h, ok = refine_site(vol.hu, vol.grid, line[at], start, near[2])
        if (
            ok
            and h <= BEYOND_MAX_HEIGHT_MM
            and float(np.linalg.norm(c - line[at])) <= BEYOND_SHIFT_MM
        ):
            break
    else:
        return None
    n = f[:, 2]
    off = c_near - line[near[3]] if near_ok else np.zeros(3)
    off = _in_plane(_in_plane(off, f_near[:, 2]), n)  # in the nearest disc's plane and this one's
    return (line[at] + float((c - line[at]) @ n) * n + off, f, h, at, True)


def _in_plane(d: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """``d`` without its part along the unit ``normal``: its part in that plane."""
    return d - float(d @ normal) * normal


def _refine_sites(
    vol: Volume, sites: list[_Site]
) -> list[tuple[np.ndarray, np.ndarray, float, bool]]:
    """Each site measured on its own endplates (`refine_site`), from the centre line's point;
    a site whose offset from the line (in its plane) then differs by more than
    `NEIGHBOUR_OFFSET_MM` from the mean of its measured neighbours' is measured again from
    where theirs put it, and kept so only where it then agrees with them. The line runs
    through the front of the bodies (8-12 mm in front of the disc centres at the abdomen
    CT's upper levels), and from the front of a disc its endplates can lead the plane
    astray."""
    measured = [
        (c, f, h, True) if done else refine_site(vol.hu, vol.grid, c, f, h)
        for c, f, h, _, done in sites
    ]

    def offset(k: int, centre: np.ndarray) -> np.ndarray:
        return _in_plane(centre - sites[k][0], sites[k][1][:, 2])

    for i, (c, f, h, _, done) in enumerate(sites):
        near = [k for k in (i - 1, i + 1) if 0 <= k < len(sites) and measured[k][3]]
        if done or not near:
            continue
        want = np.mean([offset(k, measured[k][0]) for k in near], axis=0)
        if (
            measured[i][3]
            and np.linalg.norm(offset(i, measured[i][0]) - want) <= NEIGHBOUR_OFFSET_MM
        ):
            continue
        again = refine_site(vol.hu, vol.grid, c + want, f, h)
        if again[3] and np.linalg.norm(offset(i, again[0]) - want) <= NEIGHBOUR_OFFSET_MM:
            measured[i] = again
    return measured


def find_spine(vol: Volume) -> Spine:
    """Disc sites of a CT volume, with their levels named from the sacrum and the ribs.

    The sacrum (the bone under the lowest disc much wider than the body above it) makes
    the lowest disc L5-S1; the lowest rib (`lowest_rib`) marks T12, so the first disc
    below it is T12-L1. Where both are in view and disagree (a transitional vertebra, 11
    or 13 rib pairs), the sacrum names the levels and a warning says by how much the ribs
    disagree; with one anchor the levels are named from it, and the warning says so.
    """
    slice_mm = vol.grid.plane_spacing(vol.grid.slice_axis)  # k for a DICOM series
    small, grid = resample_iso(vol.hu, vol.grid)  # at right angles to a tilted stack's slices
    smooth = smoothed(small)
    outside = outside_circle(vol.grid, grid)
    if outside is not None:  # no data there: what the view shows is read against it
        smooth = np.where(outside, np.float32(PADDING_HU), smooth)
    mask = body_mask(small, grid, smooth)
    line = centre_line(small, grid, mask, smooth)
    rib_z = None
    faint = None
    warnings: list[str] = []
    if line is not None:
        peaks = peaks_iso(vol.hu, vol.grid)
        if outside is not None:
            peaks = np.where(outside, np.float32(PADDING_HU), peaks)
        rib_z = lowest_rib(small, grid, line, peaks)
        # a rib is the lowest only where the view shows where a lower one would reach: in a
        # view cut close about the column, bone beside it may be a higher rib or the ilia
        shown = 1.0 if rib_z is None else rib_band_in_view(smooth, grid, line, rib_z)
        if shown < RIB_VIEW_SHARE:
            rib_z = None
            warnings.append(
                f"the field of view shows only {shown:.0%} of where a rib under the lowest "
                "one found would reach: no level is named from the ribs"
            )
        profile = column_profile(vol, line)
        prominence = ENDPLATE_PROMINENCE_HU * min(1.0, THIN_SLICE_MM / slice_mm)
        spans = disc_spans(profile, prominence=prominence)
        faint = _faint_disc_below(profile, spans, prominence)
    else:
        # no closed canal in view (a crop around the column): the bone of the bodies gives
        # the line, and the mean HU across it the discs
        line = _line_from_mask(mask, grid)
        if line is None:
            return Spine((), False, warnings=("no vertebral column found",))
        spans = disc_spans(mean_profile(vol, line), regular=False, prominence=MEAN_PROMINENCE_HU)
    tang = _tangents(line)

    def site(a: int, b: int) -> _Site:
        f = frame_from_normal(tang[(a + b) // 2])
        return ((line[a] + line[b]) / 2, f, (b - a) * STEP_MM, (a + b) // 2, False)

    sites = [site(a, b) for a, b in spans]
    if not sites:
        return Spine((), False, line, ("no disc space found along the column",))
    # the sacrum: the bone under L5-S1 (S1 with its alae) is much wider than the body above
    # it, or the ilia lie against it; the lowest dark lines may be the rudimentary S1-S2
    # disc or iliac bone (`SACRAL_REMNANTS`), so the ones above them are tried too, and what
    # lies below L5-S1 is dropped
    lumbosacral = _lumbosacral(mask, smooth, grid, sites, rib_z)
    if lumbosacral is None and faint is not None:
        # no sacrum under the discs found: a faint valley below them may be L5-S1 over it
        with_faint = [*sites, site(*faint)]
        lumbosacral = _lumbosacral(mask, smooth, grid, with_faint, rib_z)
        if lumbosacral is not None:
            sites = with_faint
    sacrum = lumbosacral is not None
    if lumbosacral is not None and lumbosacral < len(sites) - 1:
        sites = sites[: lumbosacral + 1]
    # a disc near the edge of the field of view may show too faint a valley in the profile
    # (its endplates tilted out of the plane across the line): one spacing beyond the first
    # and the last disc found, where the column goes on that far, its endplates decide
    # (below the sacrum's, none)
    for bottom in (False,) if sacrum else (False, True):
        extra = _disc_beyond(vol, line, tang, sites, bottom=bottom)
        if extra is not None:
            sites = sites + [extra] if bottom else [extra] + sites
    by_sacrum = _names_from(len(sites) - 1, "L5-S1", len(sites)) if sacrum else None
    by_ribs = None
    if rib_z is not None:
        below_ribs = [j for j, st in enumerate(sites) if st[0][2] < rib_z]
        if not below_ribs and not sacrum:
            return Spine(
                (),
                False,
                line,
                ("ribs down to the lowest vertebra in view: no lumbar spine in view",),
                rib_anchor=True,
            )
        # the lowest rib in view is the twelfth only if the column goes on below it
        if len(below_ribs) >= RIB_FREE_DISCS:
            # T12-L1 lies under the body that bears the lowest ribs; a first disc found
            # further down than a spacing and a half is L1-L2 (T12-L1 was missed)
            first = below_ribs[0]
            step = (
                float(np.median(np.diff([-st[0][2] for st in sites]))) if len(sites) > 1 else 30.0
            )
            below_rib = rib_z - sites[first][0][2]
            by_ribs = _names_from(
                first, "L1-L2" if below_rib > 1.5 * step else "T12-L1", len(sites)
            )
    if by_sacrum and by_ribs:
        names = by_sacrum
        if by_ribs != by_sacrum:
            both = next(j for j in range(len(sites)) if by_ribs[j] or by_sacrum[j])
            shift = _level_offset(by_ribs[both], by_sacrum[both])
            warnings.append(
                f"the sacrum and the lowest ribs disagree by {shift} level(s) (a transitional vertebra, or "
                "11 or 13 rib pairs?): levels are named from the sacrum; check the count"
            )
    elif by_sacrum:
        names = by_sacrum
    elif by_ribs:
        names = by_ribs
        warnings.append(
            "sacrum not in the field of view: levels are named from the lowest ribs (T12); "
            "check the count"
        )
    else:
        names = [""] * len(sites)
        warnings.append(
            "neither the sacrum nor the lowest ribs in the field of view: disc levels are not named"
        )
    spacing = np.diff([s[3] for s in sites]) * STEP_MM
    for i, gap in enumerate(spacing):
        if gap > 1.7 * float(np.median(spacing)):
            warnings.append(
                f"{gap:.0f} mm between disc spaces {i + 1} and {i + 2}: one may be missed"
            )
    discs = []
    if slice_mm <= THIN_SLICE_MM:  # on the disc's own endplates
        measured = _refine_sites(vol, sites)
    else:
        measured = [(c_, f_, h_, done) for c_, f_, h_, _, done in sites]
    for i, ((c_, f_, h_, _), n) in enumerate(zip(measured, names)):
        discs.append(DiscSite(i, n, c_, f_, h_))
    named = tuple(d for d in discs if d.level)
    if named:
        discs = [d for d in discs if d.level in DISC_LEVELS]
    return Spine(
        tuple(discs), sacrum, line, tuple(warnings), named=named, rib_anchor=by_ribs is not None
    )
