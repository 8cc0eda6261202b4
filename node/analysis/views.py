"""Slices through a disc, parallel to it (axial) and across it (sagittal), as model input.

The windowing and fields of view here are the ones the bundled model was trained with;
a model's card repeats them, and inference must use the card's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from node.geometry import Plane


class View(str, Enum):
    AXIAL = "axial"
    SAGITTAL = "sagittal"


@dataclass(frozen=True)
class Windowing:
    """Greyscale window in HU (DICOM window centre and width)."""

    center: float = 60.0
    width: float = 600.0

    def apply(self, hu: np.ndarray) -> np.ndarray:
        lo = self.center - self.width / 2
        return (np.clip((hu - lo) / self.width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class ViewSpec:
    """Image size and physical field of view of the model's input slices."""

    size: int = 512
    axial_fov_mm: float = 80.0
    sagittal_fov_mm: float = 100.0

    def fov(self, view: View) -> float:
        return self.axial_fov_mm if view is View.AXIAL else self.sagittal_fov_mm


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
