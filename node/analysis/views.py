"""Slices through a disc, parallel to it (axial) and across it (sagittal), as model input.

The fields of view are the model card's (`node.inference.interface.ViewSpec`): inference cuts
the slices the card asks for.
"""

from __future__ import annotations

import numpy as np

from node.geometry import Plane
from node.inference.interface import View, ViewSpec


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
