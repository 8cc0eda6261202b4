"""Binary mask operations that scipy.ndimage has, done faster where the masks are sparse.

Each gives exactly what its scipy namesake gives; the tests compare them on random masks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def disk(radius_px: float) -> np.ndarray:
    """A filled disk of ``radius_px`` pixels: the structuring element of 2D openings."""
    r = int(np.ceil(radius_px))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius_px * radius_px


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`ndimage.binary_fill_holes` (background connectivity 1), by labelling the background:
    every background component that does not touch the array's edge is a hole."""
    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    outside[0] = True  # the mask itself
    for ax in range(mask.ndim):
        for end in (0, -1):
            outside[np.take(lab, end, axis=ax)] = True
    return mask | ~outside[lab]


def opening(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """`ndimage.binary_opening` for a mask whose erosion is sparse: the dilation runs only
    over the eroded voxels' bounding box grown by the structure (the dilation of a sparse
    set in the whole array is what makes scipy's opening slow)."""
    eroded = ndimage.binary_erosion(mask, structure=structure)
    out = np.zeros_like(mask)
    if not eroded.any():
        return out
    grow = np.array(structure.shape) // 2
    found = ndimage.find_objects(eroded.astype(np.uint8))[0]
    box = tuple(slice(max(0, f.start - g), f.stop + g) for f, g in zip(found, grow))
    out[box] = ndimage.binary_dilation(eroded[box], structure=structure)
    return out


def disk_opening(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """`ndimage.binary_opening` of a 2D ``mask`` with `disk` (``radius_px``), the same pixel
    for pixel, by two Euclidean distance transforms: a pixel survives the erosion where no
    background lies within the radius, and the dilation reaches what lies within it of the
    eroded set. Their cost does not grow with the radius, as scipy's opening does."""
    pad = int(np.ceil(radius_px)) + 1  # scipy's border: outside the array is background
    eroded = ndimage.distance_transform_edt(np.pad(mask, pad)) > radius_px
    if not eroded.any():
        return np.zeros_like(mask, dtype=bool)
    out = ndimage.distance_transform_edt(~eroded) <= radius_px
    return np.asarray(out[pad:-pad, pad:-pad])


def largest_component(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, lab, range(1, n + 1))
    return lab == 1 + int(np.argmax(sizes))
