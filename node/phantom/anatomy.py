"""Paint a `StudyPlan` into a HU volume and its truth label volumes.

Structures are drawn as implicit shapes in each vertebra's or disc's own frame (u to the
patient's left, v posterior, w along the spine towards the head), inside the bounding box
each one needs, so a 300-slice study takes a few seconds on one core. Discs fill the
wedge between the endplate planes of their two vertebrae, which is how lordosis tilts and
wedges them in real spines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.classes import DiscClass
from node.geometry import Grid
from node.phantom.plan import Disc, StudyPlan, Vertebra

AIR_HU = -1000.0
CSF_HU = 8.0
EPIDURAL_FAT_HU = -90.0
POSTERIOR_ELEMENT_HU = 520.0

#: Offset added to a vertebra's level code for its posterior elements in the label volume.
POSTERIOR_ELEMENT_OFFSET = 100


@dataclass
class Painted:
    """The noise-free HU volume and the truth labels on the CT's voxel grid.

    ``disc_class`` holds ``class_id + 1`` of `DiscClass` per disc voxel (0 elsewhere);
    ``disc_level`` the 1-based index of every painted disc, cranial to caudal (reported or
    not); ``vertebra`` the 1-based index of each vertebral body, plus
    `POSTERIOR_ELEMENT_OFFSET` on its posterior elements.
    """

    hu: np.ndarray
    disc_class: np.ndarray
    disc_level: np.ndarray
    vertebra: np.ndarray


def _ellipse_radius(theta: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1.0 / np.sqrt((np.cos(theta) / a) ** 2 + (np.sin(theta) / b) ** 2)


def _box(
    grid: Grid, centre: np.ndarray, frame: np.ndarray, lo: tuple, hi: tuple
) -> tuple[slice, ...] | None:
    """Index slices of the axis-aligned box holding a box given in a local frame."""
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    idx = grid.to_index(corners @ frame.T + centre)
    mn = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    mx = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, np.array(grid.shape))
    if np.any(mx <= mn):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(mn, mx))


def _local(grid: Grid, box: tuple, centre: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Local coordinates (u, v, w) of every voxel in ``box``: shape (3, nk, nr, nc)."""
    k, r, c = np.meshgrid(
        *(np.arange(s.start, s.stop, dtype=np.float32) for s in box), indexing="ij"
    )
    a = grid.affine.astype(np.float32)
    m = frame.T.astype(np.float32) @ a[:3, :3]
    t = frame.T.astype(np.float32) @ (a[:3, 3] - centre).astype(np.float32)
    return np.stack([m[i, 0] * k + m[i, 1] * r + m[i, 2] * c + t[i] for i in range(3)])


def _paint_background(hu: np.ndarray, grid: Grid, plan: StudyPlan) -> None:
    """Body outline, skin, fat, muscles, viscera, vessels and table, slab by slab.

    What does not depend on the spine's position is drawn once; the structures that
    follow the spine (psoas, paraspinal muscles, great vessels) are redrawn per slab of
    about 8 mm, inside a box around the spine only.
    """
    body = plan.body
    verts = plan.vertebrae
    nk, nr, nc = hu.shape
    ps = plan.scanner.pixel_spacing
    xs = grid.affine[0, 3] + np.arange(nc) * ps
    ys = grid.affine[1, 3] + np.arange(nr) * ps
    X, Y = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    ang = np.radians(body.rotation_deg)
    ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
    Xr = ca * (X - body.centre_x) + sa * (Y - body.centre_y)
    Yr = -sa * (X - body.centre_x) + ca * (Y - body.centre_y)
    rng = np.random.default_rng([plan.seed, plan.index, 7])

    base = np.full((nr, nc), AIR_HU, dtype=np.float32)
    base[(Xr / body.half_width) ** 2 + (Yr / body.half_depth) ** 2 <= 1.0] = 35.0  # skin
    a_f, b_f = body.half_width - 2.5, body.half_depth - 2.5
    base[(Xr / a_f) ** 2 + (Yr / b_f) ** 2 <= 1.0] = body.fat_hu
    a_m, b_m = a_f - body.fat_mm, b_f - body.fat_mm * 0.8
    wall = (Xr / a_m) ** 2 + (Yr / b_m) ** 2 <= 1.0
    base[wall] = body.muscle_hu
    a_v, b_v = a_m - 11.0, b_m - 11.0
    visc = (Xr / a_v) ** 2 + ((Yr + 8) / b_v) ** 2 <= 1.0
    base[visc] = body.visceral_hu
    for bx, by, s in rng.uniform(-1, 1, size=(12, 3)) * [0.55, 0.5, 1.0]:  # mesenteric fat
        r = 12 + 10 * abs(s)
        base[visc & ((Xr - bx * a_v) ** 2 + (Yr - by * b_v + 20) ** 2 <= r * r)] = body.fat_hu + 15
    for gx, gy in rng.uniform(-1, 1, size=(4, 2)) * [0.5, 0.35]:  # bowel gas
        base[visc & ((Xr - gx * a_v) ** 2 + (Yr - gy * b_v + 35) ** 2 <= 36.0)] = -950.0
    ty = body.half_depth + body.table_gap_mm  # table under the supine patient
    table = (Yr > ty) & (Yr < ty + 22) & (np.abs(Xr) < 0.9 * body.half_width + 20)
    base[table] = -880.0
    base[table & ((Yr < ty + 2.5) | (Yr > ty + 19.5))] = 250.0

    zc = np.array([v.centre[2] for v in verts])
    order = np.argsort(zc)
    vessel_hu = plan.skeleton.vessel_hu if plan.skeleton else 42.0
    slab = max(1, int(round(8.0 / plan.scanner.slice_spacing)))
    ms = body.muscle_scale
    for k0 in range(0, nk, slab):
        z = grid.to_patient(np.array([k0 + slab / 2, 0, 0]))[2]
        sx = np.interp(z, zc[order], [verts[i].centre[0] for i in order])
        sy = np.interp(z, zc[order], [verts[i].centre[1] for i in order])
        # a box around the spine, then the spine's position in the rotated body frame
        c0, c1 = np.clip([(sx - 125 - xs[0]) / ps, (sx + 125 - xs[0]) / ps], 0, nc).astype(int)
        r0, r1 = np.clip([(sy - 75 - ys[0]) / ps, (sy + 110 - ys[0]) / ps], 0, nr).astype(int)
        img = base.copy()
        sub = img[r0:r1, c0:c1]
        x, y, inwall, invisc = (
            Xr[r0:r1, c0:c1],
            Yr[r0:r1, c0:c1],
            wall[r0:r1, c0:c1],
            visc[r0:r1, c0:c1],
        )
        su = ca * (sx - body.centre_x) + sa * (sy - body.centre_y)
        sv = -sa * (sx - body.centre_x) + ca * (sy - body.centre_y)
        sub[invisc & (y > sv + 5)] = body.muscle_hu  # viscera stay in front of the spine
        lvl = float(np.interp(z, [verts[-1].centre[2], verts[5].centre[2]], [1.0, 0.2]))
        sub[(((x - su) / 75.0) ** 2 + ((y - sv - 10) / 45.0) ** 2 <= 1.0) & inwall] = (
            body.fat_hu + 10
        )
        for side in (-1.0, 1.0):
            pr = (10 + 18 * lvl) * ms  # psoas grows towards the lower lumbar levels
            sub[
                ((x - su - side * (24 + pr * 0.9)) / pr) ** 2 + ((y - sv + 2) / (pr * 0.8)) ** 2
                <= 1.0
            ] = body.muscle_hu
            sub[
                ((x - su - side * 36 * ms) / (26 * ms)) ** 2 + ((y - sv - 52 * ms) / (24 * ms)) ** 2
                <= 1.0
            ] = body.muscle_hu + 3
        if lvl < 0.75:  # aorta (left) and inferior vena cava (right) above the bifurcation
            sub[(x - su - 14) ** 2 + (y - sv + 34) ** 2 <= 100.0] = vessel_hu
            sub[((x - su + 20) / 11.0) ** 2 + ((y - sv + 32) / 8.0) ** 2 <= 1.0] = vessel_hu - 2.0
        else:
            for side in (-1.0, 1.0):
                sub[(x - su - side * 22) ** 2 + (y - sv + 30) ** 2 <= 36.0] = vessel_hu
        hu[k0 : k0 + slab] = img


@dataclass(frozen=True)
class DiscGeometry:
    """Where a disc lies: its centre, its frame (u left, v posterior, w cranial) and size."""

    centre: np.ndarray
    frame: np.ndarray
    half_width: float
    half_depth: float
    endplate_up: np.ndarray  # centre of the upper vertebra's inferior endplate
    endplate_down: np.ndarray  # centre of the lower vertebra's superior endplate
    up_mm: float  # from the centre along w to the upper endplate plane
    down_mm: float  # from the centre along -w to the lower endplate plane

    @property
    def height_mm(self) -> float:
        return self.up_mm + self.down_mm


def disc_geometry(plan: StudyPlan, disc: Disc) -> DiscGeometry:
    up, lo = plan.vertebrae[disc.upper], plan.vertebrae[disc.lower]
    e_up, e_lo = up.frame[:, 2], lo.frame[:, 2]
    p_up = up.centre - e_up * up.height / 2
    p_lo = lo.centre + e_lo * lo.height / 2
    centre = (p_up + p_lo) / 2
    q, r = np.linalg.qr((up.frame + lo.frame) / 2)
    frame = q * np.sign(np.diag(r))
    w = frame[:, 2]
    return DiscGeometry(
        centre=centre,
        frame=frame,
        half_width=(up.half_width + lo.half_width) / 2,
        half_depth=(up.half_depth + lo.half_depth) / 2,
        endplate_up=p_up,
        endplate_down=p_lo,
        up_mm=float(((p_up - centre) @ e_up) / (w @ e_up)),
        down_mm=float(-((p_lo - centre) @ e_lo) / (w @ e_lo)),
    )


def _paint_disc(p: Painted, grid: Grid, plan: StudyPlan, disc: Disc, level_code: int) -> None:
    up, lo = plan.vertebrae[disc.upper], plan.vertebrae[disc.lower]
    e_up, e_lo = up.frame[:, 2], lo.frame[:, 2]
    g = disc_geometry(plan, disc)
    p_up, p_lo, centre, frame = g.endplate_up, g.endplate_down, g.centre, g.frame
    a, b = g.half_width, g.half_depth
    reach = max(disc.bulge_mm, disc.protrusion_mm) + 3
    h = g.height_mm
    canal_b = max(up.canal_half_depth, lo.canal_half_depth)
    box = _box(
        grid,
        centre,
        frame,
        (-a - reach - 14, -b - reach - 4, -h - 6),
        (a + reach + 14, b + 2 * canal_b + 8, h + 6),
    )
    if box is None:
        return
    u, v, w = _local(grid, box, centre, frame)
    pts = np.stack([u, v, w], axis=-1) @ frame.T + centre
    d_up = -((pts - p_up) @ e_up)  # >0 below the upper endplate plane
    d_lo = (pts - p_lo) @ e_lo  # >0 above the lower endplate plane
    between = (d_up > 0) & (d_lo > 0)
    theta = np.arctan2(v, u)
    r = np.hypot(u, v)
    r_edge = _ellipse_radius(theta, a, b)
    t = np.clip(d_lo / np.maximum(d_up + d_lo, 1e-3), 0.0, 1.0)
    prof = np.sqrt(np.sin(np.pi * t))
    ext = disc.extension_mm(np.degrees(theta)).astype(np.float32) * prof
    inside = between & (r <= r_edge * 0.985 + ext)
    hu = p.hu[box]
    # canal behind the disc
    vc = b + 1.5 + canal_b
    ca = max(up.canal_half_width, lo.canal_half_width)
    canal = between & ((u / ca) ** 2 + ((v - vc) / canal_b) ** 2 <= 1.0) & ~inside
    hu[canal] = EPIDURAL_FAT_HU
    hu[canal & ((u / (0.78 * ca)) ** 2 + ((v - vc) / (0.75 * canal_b)) ** 2 <= 1.0)] = CSF_HU
    nucleus = inside & (r <= 0.55 * r_edge)
    hu[inside] = disc.annulus_hu
    hu[nucleus] = disc.nucleus_hu
    if disc.vacuum is not None:
        vu, vv, vr, vh = disc.vacuum
        gas = inside & (
            ((u - vu) / vr) ** 2 + ((v - vv) / (0.5 * vr)) ** 2 + ((d_lo - d_up) / (2 * vh)) ** 2
            <= 1.0
        )
        hu[gas] = -850.0
    if plan.skeleton is not None and disc.level in plan.skeleton.bridging:
        side = -40.0 if level_code % 2 else -140.0  # anterolateral, left or right
        d_ang = np.abs((np.degrees(theta) - side + 180.0) % 360.0 - 180.0)
        bridge = (
            (d_ang < 22.0)
            & (r > r_edge + ext)
            & (r <= r_edge + ext + 4.0)
            & (d_up > -2.0)
            & (d_lo > -2.0)
        )
        hu[bridge] = 650.0
    p.disc_class[box][inside] = disc.morphology.class_id + 1
    p.disc_level[box][inside] = level_code


def _paint_vertebra(
    p: Painted,
    grid: Grid,
    v_: Vertebra,
    code: int,
    rng: np.random.Generator,
    sclerotic: bool = False,
) -> None:
    a, b, h = v_.half_width, v_.half_depth, v_.height
    ca, cb = v_.canal_half_width, v_.canal_half_depth
    vc = b + 1.5 + cb
    sac = v_.is_sacrum
    reach_u = a + (20.0 if sac else 30.0)
    box = _box(
        grid,
        v_.centre,
        v_.frame,
        (-reach_u, -b - 8, -h / 2 - 14),
        (reach_u, vc + cb + 40, h / 2 + 6),
    )
    if box is None:
        return
    u, v, w = _local(grid, box, v_.centre, v_.frame)
    hu = p.hu[box]
    lab = p.vertebra[box]
    dom = np.abs(w) <= h / 2
    theta = np.arctan2(v, u)
    r = np.hypot(u, v)
    waist = 1.0 - 0.06 * (1.0 - (2.0 * w / h) ** 2)
    r_edge = _ellipse_radius(theta, a, b) * waist
    osteo = np.zeros_like(r)
    for ang, side, size in v_.osteophytes:
        d = np.abs((np.degrees(theta) - ang + 180.0) % 360.0 - 180.0)
        near = np.clip(1.0 - (h / 2 - side * w) / 5.0, 0.0, 1.0)
        osteo = np.maximum(osteo, size * np.clip(1 - d / 28.0, 0, 1) ** 1.5 * near)
    body = dom & (r <= r_edge + osteo)
    inner = dom & (r <= r_edge - 1.3) & (np.abs(w) <= h / 2 - 1.0)
    # canal within the vertebra's own slab
    canal = dom & ((u / ca) ** 2 + ((v - vc) / cb) ** 2 <= 1.0)
    hu[canal] = EPIDURAL_FAT_HU
    hu[canal & ((u / (0.78 * ca)) ** 2 + ((v - vc) / (0.75 * cb)) ** 2 <= 1.0)] = CSF_HU
    # posterior elements: arch (pedicles and laminae), spinous and transverse processes
    ring = ((u / (ca + 6.5)) ** 2 + ((v - vc) / (cb + 6.0)) ** 2 <= 1.0) & ~canal & (v > b * 0.55)
    if sac:
        arch = ring & (np.abs(w) <= h / 2) & ~body
        wings = (
            (np.abs(u) > a * 0.6)
            & (np.abs(u) < a + 18)
            & (v > -b * 0.6)
            & (v < b + 6)
            & (np.abs(w) <= h / 2)
            & ~body
        )
        post = arch | wings
    else:
        arch = ring & (w > -h * 0.2) & (w < h * 0.45) & ~body
        depth = v - (vc + cb)
        slant = -0.35 * np.clip(depth, 0, None)
        spinous = (
            (np.abs(u) < 3.5)
            & (depth > 0)
            & (depth < 32)
            & (w < h * 0.25 + slant)
            & (w > -h * 0.45 + slant)
        )
        tp_len = 24.0 if v_.name.startswith("L") else 12.0
        transverse = (
            (np.abs(u) > ca)
            & (np.abs(u) < ca + tp_len + 6)
            & (np.abs(v - vc * 0.75) < 4.5)
            & (w > -h * 0.05)
            & (w < h * 0.38)
        )
        post = arch | spinous | transverse
    hu[post] = POSTERIOR_ELEMENT_HU + 60.0 * rng.standard_normal(int(post.sum())).astype(np.float32)
    lab[post] = code + POSTERIOR_ELEMENT_OFFSET
    hu[body] = v_.cortical_hu
    hu[inner] = v_.cancellous_hu + 35.0 * rng.standard_normal(int(inner.sum())).astype(np.float32)
    if sclerotic:  # dense bone under both endplates
        hu[inner & (np.abs(w) > h / 2 - 4.0)] = 0.6 * v_.cortical_hu
    lab[body] = code


def _paint_schmorl(p: Painted, grid: Grid, plan: StudyPlan, disc: Disc, level_code: int) -> None:
    node = disc.schmorl
    assert node is not None
    vert = plan.vertebrae[disc.upper if node.into_upper else disc.lower]
    e = vert.frame[:, 2]
    sign = -1.0 if node.into_upper else 1.0  # endplate at w = sign * h/2
    plate = (
        vert.centre
        + sign * e * vert.height / 2
        + vert.frame[:, 0] * node.offset_u
        + vert.frame[:, 1] * node.offset_v
    )
    rr = node.radius + node.rim_mm + 1
    dd = node.depth + node.rim_mm + 1
    box = _box(grid, plate, vert.frame, (-rr, -rr, -dd), (rr, rr, dd))
    if box is None:
        return
    u, v, w = _local(grid, box, plate, vert.frame)
    into = -sign * w  # depth into the vertebral body
    inside_v = into > 0
    q = (u / node.radius) ** 2 + (v / node.radius) ** 2 + (into / node.depth) ** 2
    q_rim = (
        (u / (node.radius + node.rim_mm)) ** 2
        + (v / (node.radius + node.rim_mm)) ** 2
        + (into / (node.depth + node.rim_mm)) ** 2
    )
    core = inside_v & (q <= 1.0)
    rim = inside_v & (q_rim <= 1.0) & ~core & (p.vertebra[box] > 0)
    hu = p.hu[box]
    hu[rim] = node.rim_hu
    hu[core] = disc.nucleus_hu
    p.vertebra[box][core] = 0
    p.disc_class[box][core] = DiscClass.SCHMORL.class_id + 1
    p.disc_level[box][core] = level_code


def paint(plan: StudyPlan, grid: Grid) -> Painted:
    """Draw the study's anatomy (noise-free) and its truth labels."""
    rng = np.random.default_rng([plan.seed, plan.index, 11])
    p = Painted(
        hu=np.empty(grid.shape, dtype=np.float32),
        disc_class=np.zeros(grid.shape, dtype=np.uint8),
        disc_level=np.zeros(grid.shape, dtype=np.uint8),
        vertebra=np.zeros(grid.shape, dtype=np.uint8),
    )
    _paint_background(p.hu, grid, plan)
    for i, disc in enumerate(plan.discs):
        _paint_disc(p, grid, plan, disc, i + 1)
    sclerosis = plan.skeleton.sclerosis if plan.skeleton else ()
    for i, vert in enumerate(plan.vertebrae):
        _paint_vertebra(p, grid, vert, i + 1, rng, vert.name in sclerosis)
    for i, disc in enumerate(plan.discs):
        if disc.schmorl is not None:
            _paint_schmorl(p, grid, plan, disc, i + 1)
    _paint_sacral_segments(p, grid, plan, len(plan.vertebrae))
    _paint_ribs(p, grid, plan)
    _paint_pelvis(p, grid, plan)
    return p


def _stamp_tube(
    p: Painted, grid: Grid, pts: np.ndarray, radius: float, hu: tuple[float, float]
) -> None:
    """A bony tube (cortex ``hu[0]``, marrow ``hu[1]``) along ``pts`` (LPS, about 1 mm apart).

    Balls stamped along the path, each in the small box it needs; the cortex goes first
    and the marrow over it, so that where balls overlap the inside stays marrow.
    """
    spacing = np.array(grid.spacing)
    half = np.ceil(radius / spacing).astype(int) + 1
    centres = np.rint(grid.to_index(pts)).astype(int)
    frac = grid.to_index(pts) - centres
    offs = np.stack(
        np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    shape = np.array(grid.shape)
    for layer, r in ((0, radius), (1, radius - 1.2)):
        for c, f in zip(centres, frac):
            d = np.linalg.norm((offs - f) * spacing, axis=1)
            idx = offs[d <= r] + c
            idx = idx[np.all((idx >= 0) & (idx < shape), axis=1)]
            if len(idx) == 0:
                continue
            t = tuple(idx.T)
            keep = p.vertebra[t] == 0  # never over a vertebra
            p.hu[tuple(idx[keep].T)] = hu[layer]


#: How far around the chest each rib reaches (degrees from the back, at its end).
_RIB_END_DEG = {"T8": 165.0, "T9": 160.0, "T10": 140.0, "T11": 105.0, "T12": 75.0, "L1": 50.0}


def _paint_ribs(p: Painted, grid: Grid, plan: StudyPlan) -> None:
    """A pair of ribs on each rib-bearing vertebra: head at the body's back corner, neck
    past the transverse process, then round the chest wall, sloping down."""
    skel = plan.skeleton
    if skel is None:
        return
    body = plan.body
    ax = body.half_width - body.fat_mm - 14.0
    by = body.half_depth - body.fat_mm * 0.8 - 12.0
    for v_ in plan.vertebrae:
        if v_.name not in skel.rib_bearing:
            continue
        f, c = v_.frame, v_.centre
        for s in (-1.0, 1.0):
            head = c + f @ np.array(
                [s * v_.half_width * 0.8, v_.half_depth * 0.6, v_.height * 0.15]
            )
            tub = c + f @ np.array(
                [s * (v_.canal_half_width + 26.0), v_.half_depth + 8.0, v_.height * 0.05]
            )
            thetas = np.radians(np.arange(25.0, _RIB_END_DEG.get(v_.name, 120.0), 1.0))
            wall = np.stack(
                [
                    body.centre_x + s * ax * np.sin(thetas),
                    body.centre_y + by * np.cos(thetas),
                    np.zeros_like(thetas),
                ],
                axis=1,
            )
            wall = wall[np.abs(wall[:, 0] - c[0]) > abs(tub[0] - c[0]) + 5.0]
            path = (
                np.concatenate([head[None], tub[None], wall])
                if len(wall)
                else np.stack([head, tub])
            )
            # about 1 mm apart, sloping down by 0.3 mm per mm once past the tubercle
            seg = np.linalg.norm(np.diff(path[:, :2], axis=0), axis=1)
            s_at = np.concatenate([[0.0], np.cumsum(seg)])
            fine_s = np.arange(0.0, s_at[-1], 1.0)
            pts = np.stack([np.interp(fine_s, s_at, path[:, k]) for k in range(2)], axis=1)
            z = (
                head[2]
                + np.interp(fine_s, s_at[:2], [0.0, tub[2] - head[2]])
                - 0.3 * np.clip(fine_s - s_at[1], 0, None)
            )
            r = skel.rib_radius_mm * (0.8 if v_.name in ("T12", "L1") else 1.0)
            _stamp_tube(p, grid, np.column_stack([pts, z]), r, skel.rib_hu)


def _paint_pelvis(p: Painted, grid: Grid, plan: StudyPlan) -> None:
    """Iliac wings: curved plates from beside the sacrum round to the front, their crest
    near the L4-L5 disc, slice by slice."""
    skel = plan.skeleton
    if skel is None:
        return
    names = [v.name for v in plan.vertebrae]
    l4, l5, s1 = (plan.vertebrae[names.index(n)] for n in ("L4", "L5", "S1"))
    z_crest = (l4.centre[2] + l5.centre[2]) / 2 + skel.crest_offset_mm
    cx, cy = s1.centre[0], s1.centre[1] - 20.0
    # the wings' cross-section is the same on every slice of the axial stack; only how much
    # of it shows grows below the crest
    r_idx, c_idx = np.arange(grid.shape[1]), np.arange(grid.shape[2])
    yy = grid.to_patient(np.stack([np.zeros_like(r_idx), r_idx, np.zeros_like(r_idx)], axis=1))[
        :, 1
    ]
    xx = grid.to_patient(np.stack([np.zeros_like(c_idx), np.zeros_like(c_idx), c_idx], axis=1))[
        :, 0
    ]
    X, Y = np.meshgrid(xx - cx, yy - cy)
    ang = np.degrees(np.arctan2(np.abs(X), Y))  # 0 behind, 90 beside
    plate = (
        np.abs(np.hypot(X / 95.0, Y / 62.0) - 1.0) * 70.0
    )  # about the distance from the mid-surface, mm
    for k in range(grid.shape[0]):
        z = float(grid.to_patient(np.array([k, 0, 0]))[2])
        below = z_crest - z
        if below < 0 or below > 110.0:
            continue
        half = 0.5 * (115.0 - 40.0) * float(np.clip(below / 25.0, 0.15, 1.0))
        along = np.abs(ang - 77.5) <= half
        sl = p.hu[k]
        free = p.vertebra[k] == 0
        sl[along & (plate <= 3.5) & free] = skel.rib_hu[0] * 0.85
        sl[along & (plate <= 1.8) & free] = skel.rib_hu[1]


def _paint_sacral_segments(p: Painted, grid: Grid, plan: StudyPlan, code: int) -> None:
    """S2 and S3 under S1, each smaller and further back, with the rudimentary S1-S2 disc
    (thin, often part bone) between S1 and S2: a dark line that is no L5-S1."""
    skel = plan.skeleton
    s1 = plan.vertebrae[-1]
    if skel is None or not s1.is_sacrum:
        return
    e = s1.frame[:, 2]
    top = s1.centre - e * s1.height / 2  # S1's lower endplate
    segs = []
    gap = skel.sacral_remnant_mm
    for scale, back in ((0.75, 4.0), (0.55, 9.0)):
        h = s1.height * scale
        centre = top - e * (gap + h / 2) + s1.frame[:, 1] * back
        segs.append(
            (
                centre,
                h,
                s1.half_width * (0.5 + 0.4 * scale),
                s1.half_depth * (0.6 + 0.3 * scale),
                gap,
                top,
            )
        )
        top = centre - e * h / 2
        gap = 1.0
    for i, (centre, h, a, b, gap, _above) in enumerate(segs):
        box = _box(
            grid, centre, s1.frame, (-a - 2, -b - 2, -h / 2 - 1), (a + 2, b + 2, h / 2 + gap + 1)
        )
        if box is None:
            continue
        u, v, w = _local(grid, box, centre, s1.frame)
        r_edge = _ellipse_radius(np.arctan2(v, u), a, b)
        r = np.hypot(u, v)
        hu, lab = p.hu[box], p.vertebra[box]
        free = lab == 0
        disc = free & (w > h / 2) & (w <= h / 2 + gap) & (r <= r_edge)
        hu[disc] = skel.sacral_remnant_hu if i == 0 else 300.0
        bodyv = free & (np.abs(w) <= h / 2) & (r <= r_edge)
        hu[bodyv] = s1.cortical_hu
        hu[bodyv & (r <= r_edge - 1.3) & (np.abs(w) <= h / 2 - 1.0)] = s1.cancellous_hu
        lab[bodyv] = code


def _kernel_gain(sigma: float) -> float:
    """How much a 1D Gaussian of ``sigma`` pixels lowers the SD of white noise."""
    if sigma <= 0.2:
        return 1.0
    x = np.arange(-int(3 * sigma + 0.5), int(3 * sigma + 0.5) + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float(np.sqrt((w**2).sum()))


def acquire(hu: np.ndarray, grid: Grid, plan: StudyPlan) -> np.ndarray:
    """Slice profile, quantum noise, then the kernel's in-plane blur (in place).

    Noise goes in before the in-plane blur, so that its grain follows the kernel (fine for
    BONE, coarse for SOFT) as it does on real scanners; its SD is scaled so that the
    blurred noise has the planned SD. A block of 48 noise planes is reused with flips,
    which is indistinguishable by eye and saves most of the random number generation.
    """
    sc = plan.scanner
    sig_xy = sc.blur_mm / sc.pixel_spacing
    sig_z = (sc.slice_thickness / 2.355) / sc.slice_spacing
    if sig_z > 0.2:
        ndimage.gaussian_filter1d(hu, sig_z, axis=0, output=hu, truncate=3.0)
    rng = np.random.default_rng([plan.seed, plan.index, 13])
    block = rng.standard_normal((48,) + hu.shape[1:], dtype=np.float32)
    block *= np.float32(sc.noise_sd / (_kernel_gain(sig_xy) ** 2))
    views = [block, block[:, ::-1], block[:, :, ::-1], block[:, ::-1, ::-1]]
    for k in range(hu.shape[0]):
        hu[k] += views[(k // 48) % 4][k % 48]
    if sig_xy > 0.2:
        for axis in (1, 2):
            ndimage.gaussian_filter1d(hu, sig_xy, axis=axis, output=hu, truncate=3.0)
    return hu
