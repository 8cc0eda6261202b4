"""What a disc model takes and gives: the views it is shown (their size, field of view and
greyscale window) and the detections it returns. A leaf module: the analysis, the inference,
the training and the outputs all import it, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from node.classes import CLASS_NAMES


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


@dataclass(frozen=True)
class Detection:
    """One instance found in one image."""

    class_id: int
    confidence: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    mask: np.ndarray  # bool (h, w) in image pixels

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id]
