"""Generate phantom studies: CT series, ``truth.json`` and ``labels.npz`` per study."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.analysis.measure import Extension, disc_extension
from node.analysis.volume import Volume
from node.classes import DiscClass
from node.geometry import Grid, Plane, axial_grid, sample_plane
from node.phantom.anatomy import POSTERIOR_ELEMENT_OFFSET, Painted, acquire, disc_geometry, paint
from node.phantom.plan import StudyPlan, plan_study
from node.phantom.series import MANUFACTURER, phantom_uid, write_series

TRUTH_FILE = "truth.json"
LABELS_FILE = "labels.npz"
SERIES_DIR = "ct"
MEASURE_PLANE_PX = 480
MEASURE_PIXEL_MM = 0.25


@dataclass(frozen=True)
class GeneratedStudy:
    folder: Path
    truth: dict


def study_grid(plan: StudyPlan) -> Grid:
    sc = plan.scanner
    return axial_grid(
        rows=512,
        columns=512,
        slices=sc.slices,
        pixel_spacing=(sc.pixel_spacing, sc.pixel_spacing),
        slice_spacing=sc.slice_spacing,
        first_position=plan.first_position,
    )


def measure_against_vertebrae(
    disc_mask: np.ndarray,
    vertebra: np.ndarray,
    grid: Grid,
    *,
    centre: np.ndarray,
    frame: np.ndarray,
    up_mm: float,
    down_mm: float,
    upper_code: int,
    lower_code: int,
) -> Extension:
    """Measure a disc's extension in its mid plane against its two vertebral bodies.

    The vertebral edge is the union of the bodies' outlines in planes 1.5 to 4.5 mm past
    each endplate, so that a wedge-shaped disc is measured against bone all round.
    """
    plane = Plane(centre, frame[:, 0], frame[:, 1], MEASURE_PLANE_PX, MEASURE_PIXEL_MM)
    disc = sample_plane(disc_mask.view(np.uint8), grid, plane, order=0) > 0
    edge = np.zeros_like(disc)
    for off in (1.5, 3.0, 4.5):
        edge |= sample_plane(vertebra, grid, plane.shifted(up_mm + off), order=0) == upper_code
        edge |= sample_plane(vertebra, grid, plane.shifted(-down_mm - off), order=0) == lower_code
    return disc_extension(disc, edge, MEASURE_PIXEL_MM)


def _disc_truth(
    plan: StudyPlan, grid: Grid, painted: Painted, index: int, measure: bool = True
) -> dict | None:
    disc = plan.discs[index]
    code = index + 1
    g = disc_geometry(plan, disc)
    idx = grid.to_index(g.centre[None])[0]
    margin = (g.height_mm / 2 + 2) / grid.spacing[0]
    if not (margin <= idx[0] <= grid.shape[0] - 1 - margin):
        return None  # disc not (fully) inside the scanned range
    if not measure:
        return {
            "level": disc.level,
            "centre_lps": [round(float(x), 2) for x in g.centre],
            "normal_lps": [round(float(x), 4) for x in g.frame[:, 2]],
        }
    ext = measure_against_vertebrae(
        painted.disc_level == code,
        painted.vertebra,
        grid,
        centre=g.centre,
        frame=g.frame,
        up_mm=g.up_mm,
        down_mm=g.down_mm,
        upper_code=disc.upper + 1,
        lower_code=disc.lower + 1,
    )
    entry: dict = {
        "level": disc.level,
        "classes": [c.value for c in disc.classes]
        if disc.classes != (DiscClass.NORMAL,)
        else ["normal"],
        "morphology": disc.morphology.value,
        "centre_lps": [round(float(x), 2) for x in g.centre],
        "normal_lps": [round(float(x), 4) for x in g.frame[:, 2]],
        "left_lps": [round(float(x), 4) for x in g.frame[:, 0]],
        "height_mm": round(g.height_mm, 2),
        "up_mm": round(g.up_mm, 3),
        "down_mm": round(g.down_mm, 3),
        "vertebrae": [plan.vertebrae[disc.upper].name, plan.vertebrae[disc.lower].name],
        "extension_mm": round(ext.max_mm, 2),
        "extension_share": round(ext.share, 3),
        "extension_direction_deg": round(ext.direction_deg, 1),
        "label_code": code,
        "voxels": int((painted.disc_level == code).sum()),
        "lookalikes": [
            name
            for name, on in (
                ("height_loss", disc.height_loss),
                ("vacuum", disc.vacuum is not None),
                (
                    "osteophytes",
                    bool(
                        plan.vertebrae[disc.upper].osteophytes
                        or plan.vertebrae[disc.lower].osteophytes
                    ),
                ),
            )
            if on
        ],
    }
    if disc.schmorl is not None:
        node = disc.schmorl
        vert = plan.vertebrae[disc.upper if node.into_upper else disc.lower]
        sign = -1.0 if node.into_upper else 1.0
        e = vert.frame[:, 2]
        tip = (
            vert.centre
            + sign * e * vert.height / 2
            + vert.frame[:, 0] * node.offset_u
            + vert.frame[:, 1] * node.offset_v
            - sign * e * node.depth / 2
        )
        entry["schmorl"] = {
            "vertebra": vert.name,
            "centre_lps": [round(float(x), 2) for x in tip],
            "radius_mm": round(node.radius, 2),
            "depth_mm": round(node.depth, 2),
            "voxels": int(
                (
                    (painted.disc_level == code)
                    & (painted.disc_class == DiscClass.SCHMORL.class_id + 1)
                ).sum()
            ),
        }
    return entry


def _skeleton_truth(plan: StudyPlan, grid: Grid) -> dict:
    """The ribs, pelvis and variants of a study, and which anchors lie inside its scan."""
    sk = plan.skeleton
    if sk is None:
        return {}
    z = grid.to_patient(np.array([[0, 0, 0], [grid.shape[0] - 1, 0, 0]], dtype=float))[:, 2]
    lo, hi = float(z.min()), float(z.max())
    names = [v.name for v in plan.vertebrae]
    s1 = plan.vertebrae[-1]
    lowest = plan.vertebrae[names.index(sk.rib_bearing[-1])]
    return {
        "rib_pairs": sk.rib_pairs,
        "lowest_rib_bearing_vertebra": sk.rib_bearing[-1],
        "sacrum_in_view": bool(lo < s1.centre[2] < hi),
        "lowest_ribs_in_view": bool(lo < lowest.centre[2] < hi),
        "vessel_hu": round(sk.vessel_hu, 1),
        "sacral_remnant_mm": round(sk.sacral_remnant_mm, 2),
        "endplate_sclerosis": list(sk.sclerosis),
        "bridging_osteophytes": list(sk.bridging),
        "osteoporotic": bool(all(v.cancellous_hu < 125 for v in plan.vertebrae[:-1])),
    }


def phantom_volume(
    seed: int, index: int, *, slices: int | None = None, **plan_kw: Any
) -> tuple[Volume, dict]:
    """The HU volume a study's series holds (rounded as its stored integers are), without
    writing or reading the series, with the truth the spine finder is judged on: each
    level's centre and normal, the skeleton and the scanner's slice spacing."""
    plan = plan_study(seed, index, slices=slices, **plan_kw)
    grid = study_grid(plan)
    painted = paint(plan, grid)
    levels = [
        t
        for i, d in enumerate(plan.discs)
        if d.reported and (t := _disc_truth(plan, grid, painted, i, measure=False))
    ]
    # rounded as the series stores it, integers after the intercept, in place: the values
    # the int16 pixels would give, without three more volumes in memory
    icpt = np.float32(plan.scanner.rescale_intercept)
    hu = acquire(painted.hu, grid, plan)
    hu -= icpt
    np.rint(hu, out=hu)
    np.clip(hu, -32768, 32767, out=hu)
    hu += icpt
    vol = Volume(
        hu=hu,
        grid=grid,
        study_uid=phantom_uid(plan, "study"),
        series_uid=phantom_uid(plan, "series"),
        frame_of_reference_uid=phantom_uid(plan, "frame-of-reference"),
        sop_instance_uids=(),
    )
    truth = {
        "levels": levels,
        "skeleton": _skeleton_truth(plan, grid),
        "scanner": {"slice_spacing_mm": plan.scanner.slice_spacing},
    }
    return vol, truth


def generate_study(
    out: Path, seed: int, index: int, *, slices: int | None = None, **plan_kw: Any
) -> GeneratedStudy:
    """Generate one study into ``out/study-SEED-INDEX``."""
    plan = plan_study(seed, index, slices=slices, **plan_kw)
    grid = study_grid(plan)
    painted = paint(plan, grid)
    levels = [
        t
        for i, d in enumerate(plan.discs)
        if d.reported and (t := _disc_truth(plan, grid, painted, i))
    ]
    folder = out / f"study-{seed}-{index:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    hu = acquire(painted.hu, grid, plan)
    write_series(hu, grid, plan, folder / SERIES_DIR)
    sc = plan.scanner
    truth = {
        "generator": "idaics synth",
        "manufacturer": MANUFACTURER,
        "note": "Synthetic phantom with known disc conditions; not patient data.",
        "seed": seed,
        "index": index,
        "study_instance_uid": phantom_uid(plan, "study"),
        "series_instance_uid": phantom_uid(plan, "series"),
        "frame_of_reference_uid": phantom_uid(plan, "frame-of-reference"),
        "grid": {"shape": list(grid.shape), "affine_kji_to_lps": np.round(grid.affine, 6).tolist()},
        "scanner": {
            "model": sc.model,
            "kernel": sc.kernel,
            "pixel_spacing_mm": sc.pixel_spacing,
            "slice_thickness_mm": sc.slice_thickness,
            "slice_spacing_mm": sc.slice_spacing,
            "slices": sc.slices,
            "noise_sd_hu": round(sc.noise_sd, 2),
            "kvp": sc.kvp,
        },
        "anatomy": {k: round(float(v), 2) for k, v in plan.extras.items()}
        | {"patient_rotation_deg": round(plan.body.rotation_deg, 2)},
        "levels": levels,
        "vertebrae": [v.name for v in plan.vertebrae],
        "skeleton": _skeleton_truth(plan, grid),
        "label_legend": {
            "disc_class": {str(c.class_id + 1): c.value for c in DiscClass},
            "disc_level": {str(i + 1): d.level for i, d in enumerate(plan.discs)},
            "vertebra": {str(i + 1): v.name for i, v in enumerate(plan.vertebrae)}
            | {
                f"{i + 1 + POSTERIOR_ELEMENT_OFFSET}": f"{v.name} posterior elements"
                for i, v in enumerate(plan.vertebrae)
            },
        },
    }
    tmp = folder / (TRUTH_FILE + ".tmp")
    tmp.write_text(json.dumps(truth, indent=1))
    os.replace(tmp, folder / TRUTH_FILE)
    save_labels(folder / LABELS_FILE, painted, grid)
    return GeneratedStudy(folder, truth)


def save_labels(path: Path, painted: Painted, grid: Grid) -> None:
    """Store a phantom's label volumes (see `save_label_volumes`)."""
    save_label_volumes(
        path,
        grid,
        disc_class=painted.disc_class,
        disc_level=painted.disc_level,
        vertebra=painted.vertebra,
    )


def save_label_volumes(
    path: Path, grid: Grid, *, disc_class: np.ndarray, disc_level: np.ndarray, vertebra: np.ndarray
) -> None:
    """Store label volumes cropped to their bounding box (most of a CT is no spine)."""
    any_label = (vertebra > 0) | (disc_level > 0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(any_label.any(axis=other))
        box.append((int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0))
    sl = tuple(slice(a, b) for a, b in box)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        disc_class=disc_class[sl],
        disc_level=disc_level[sl],
        vertebra=vertebra[sl],
        offset=np.array([b[0] for b in box]),
        shape=np.array(grid.shape),
        affine=grid.affine,
    )
    os.replace(tmp, path)


@dataclass(frozen=True)
class Labels:
    """A study's truth label volumes, full size, on the CT's grid (see `Painted`)."""

    disc_class: np.ndarray
    disc_level: np.ndarray
    vertebra: np.ndarray
    grid: Grid


def load_labels(folder: Path) -> Labels:
    with np.load(folder / LABELS_FILE) as z:
        a, b, c = (int(x) for x in z["shape"])
        shape = (a, b, c)
        off = [int(x) for x in z["offset"]]
        out = {}
        for name in ("disc_class", "disc_level", "vertebra"):
            crop = z[name]
            full = np.zeros(shape, dtype=np.uint8)
            full[tuple(slice(o, o + n) for o, n in zip(off, crop.shape))] = crop
            out[name] = full
        return Labels(grid=Grid(shape, z["affine"]), **out)


def _one(args: tuple) -> Path:
    out, seed, index, kw = args
    return generate_study(out, seed, index, **kw).folder


def generate_studies(
    out: Path, studies: int, seed: int, *, workers: int = 1, progress: bool = True, **kw: Any
) -> list[Path]:
    """Generate ``studies`` studies from ``seed`` into ``out`` (one folder each)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i, kw) for i in range(studies)]
    if workers <= 1:
        return [_one(j) for j in tqdm(jobs, desc="phantoms", unit="study", disable=not progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(
                pool.map(_one, jobs),
                total=len(jobs),
                desc="phantoms",
                unit="study",
                disable=not progress,
            )
        )
