"""Slices through a disc, parallel to it (axial) and across it (sagittal), as model input.

The fields of view are the model card's (`node.inference.interface.ViewSpec`): inference cuts
the slices the card asks for. A model trained on native views (whole slices, as the paper
annotated them) is shown the same planes at the series' own pixel size and field of view
(`native_plane`); what it finds is carried back onto the disc's view (`onto_view`), so the
fusion and the measures read every model's detections on the same disc-centred planes.
"""

from __future__ import annotations

import numpy as np

from node.geometry import Grid, Plane
from node.inference.interface import Detection, View, ViewSpec


def disc_plane(
    view: View, centre: np.ndarray, frame: np.ndarray, spec: ViewSpec, *, offset_mm: float = 0.0
) -> Plane:
    """The plane of one view through a disc with frame columns (left, posterior, cranial).

    Axial: rows run posterior, columns to the patient's left, shifted ``offset_mm`` along the
    disc normal. Sagittal: rows run caudal, columns posterior (anterior on the image's left),
    shifted ``offset_mm`` to the patient's left.
    """
    left, post, up = frame[:, 0], frame[:, 1], frame[:, 2]
    fov = spec.fov(view)
    if view is View.AXIAL:
        return Plane(centre + offset_mm * up, left, post, spec.size, fov / spec.size)
    return Plane(centre + offset_mm * left, post, -up, spec.size, fov / spec.size)


def native_plane(view: Plane, grid: Grid) -> Plane:
    """The whole slice that holds a disc's view: the view's orientation, the series' own
    in-plane pixel size and matrix, centred where the volume's centre falls on the plane
    (as a reconstructed slice is), moved only as far as keeps the whole view inside it."""
    pixel = min(grid.spacing[1], grid.spacing[2])
    size = max(grid.shape[1], grid.shape[2])
    middle = grid.to_patient((np.asarray(grid.shape, dtype=float) - 1) / 2)
    room = max((size * pixel - view.size * view.pixel_mm) / 2, 0.0)
    d = middle - view.centre
    du = float(np.clip(d @ view.u, -room, room))
    dv = float(np.clip(d @ view.v, -room, room))
    return Plane(view.centre + du * view.u + dv * view.v, view.u, view.v, size, pixel)


def onto_view(det: Detection, source: Plane, view: Plane) -> Detection | None:
    """A detection on ``source`` as it lies on ``view``, a plane of the same orientation (mask
    taken at the nearest source pixel); None where none of it falls on the view."""
    if not (np.allclose(source.u, view.u) and np.allclose(source.v, view.v)):
        raise ValueError("a detection is carried only between planes of the same orientation")
    scale = view.pixel_mm / source.pixel_mm
    off = view.centre - source.centre
    half_s, half_v = (source.size - 1) / 2, (view.size - 1) / 2
    r0 = float(off @ source.v) / source.pixel_mm + half_s - half_v * scale  # source row of row 0
    c0 = float(off @ source.u) / source.pixel_mm + half_s - half_v * scale
    x0, y0, x1, y1 = det.box
    box = ((x0 - c0) / scale, (y0 - r0) / scale, (x1 - c0) / scale, (y1 - r0) / scale)
    if box[2] < 0 or box[3] < 0 or box[0] > view.size or box[1] > view.size:
        return None
    steps = np.arange(view.size) * scale
    rows = np.rint(r0 + steps).astype(int)
    cols = np.rint(c0 + steps).astype(int)
    h, w = det.mask.shape
    ri = np.nonzero((rows >= 0) & (rows < h))[0]
    ci = np.nonzero((cols >= 0) & (cols < w))[0]
    mask = np.zeros((view.size, view.size), dtype=bool)
    if ri.size and ci.size:
        mask[np.ix_(ri, ci)] = det.mask[np.ix_(rows[ri], cols[ci])]
    if not mask.any() and det.mask.any():
        return None
    clipped = (
        max(box[0], 0.0),
        max(box[1], 0.0),
        min(box[2], float(view.size)),
        min(box[3], float(view.size)),
    )
    return Detection(det.class_id, det.confidence, clipped, mask)
