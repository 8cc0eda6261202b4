"""A sharp kernel's grain, smoothed away before the analysis reads the image.

Spine CT is often reconstructed with a bone (sharp) kernel: at sub-millimetre pixels its
soft tissue carries noise of 40-80 HU from pixel to pixel, where a soft kernel carries 5-15.
The disc finder, the endplates, the disc's margin and the model were all set on softer
images (the phantoms read at most 21 HU here, the chest and abdomen CTs 10), and on such
grain they fail: the chest CT with fine-grained noise of 60 HU added finds 11 of 27 levels
instead of 27. Such a series is
smoothed in each slice's plane, the least that brings its grain to `TARGET_HU`, before it is
analysed; the SEG, SR and key images still show and reference the series as received.

Series with pixels of `FINE_PIXEL_MM` or more are left as they are: their voxels already
average the grain over their area, and a blur that would lower it erases the 1-2 mm
cortex and margin the analysis reads (the lumbar crop, 1.5 mm voxels and 50 HU here, fell
from 26 to 8 of 32 levels right when smoothed to 14 HU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from node.analysis.volume import Volume

log = logging.getLogger(__name__)

#: Grain above this (robust SD of a pixel against its 3x3 median, in soft tissue) is
#: smoothed; at or below it the series is analysed as it is.
MAX_HU = 30.0
#: ... down to at most this.
TARGET_HU = 20.0
#: In-plane Gaussian widths tried, smallest first.
SIGMAS_MM = (0.4, 0.6, 0.8, 1.0, 1.2)
#: Only series with finer pixels than this are smoothed.
FINE_PIXEL_MM = 1.0
#: Soft tissue: between these HU, 2 pixels inside such a region.
SOFT_HU = (-60.0, 160.0)
SLICES_READ = 16  # slices, spread over the series, the grain is read on ...
CENTRAL = 0.5  # ... over this share of their rows and columns about the centre (the spine's)


@dataclass(frozen=True)
class Grain:
    """What was read of a series' grain and done about it."""

    before_hu: float
    after_hu: float
    sigma_mm: float  # 0: left as it was
    pixel_mm: float

    @property
    def smoothed(self) -> bool:
        return self.sigma_mm > 0

    def warning(self) -> str:
        return (
            f"the series is grainy (soft tissue {self.before_hu:.0f} HU from pixel to pixel, a "
            f"sharp kernel or a low dose): analysed after smoothing each slice by "
            f"{self.sigma_mm:.1f} mm ({self.after_hu:.0f} HU)"
        )


def _sample(hu: np.ndarray, axis: int) -> list[np.ndarray]:
    """`SLICES_READ` slices along ``axis``, spread over the series (copies)."""
    stack = np.moveaxis(hu, axis, 0)  # a view: no copy of the volume
    n = stack.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(n, SLICES_READ)).astype(int))
    return [np.ascontiguousarray(stack[k]) for k in picks]


def _grain(slices: list[np.ndarray], widths: tuple[float, float] = (0.0, 0.0)) -> float:
    """The robust SD (1.4826 MAD) of each soft-tissue pixel against the median of its 3x3
    neighbourhood, over the central part of ``slices``, each first smoothed by ``widths``
    (Gaussian, pixels); 0 where no soft tissue shows."""
    res = []
    for s in slices:
        if any(widths):
            s = ndimage.gaussian_filter(s, widths)
        s = s[tuple(slice(int(m * (1 - CENTRAL) / 2), int(m * (1 + CENTRAL) / 2)) for m in s.shape)]
        soft = ndimage.binary_erosion((s > SOFT_HU[0]) & (s < SOFT_HU[1]), iterations=2)
        if soft.sum() >= 50:
            res.append((s - ndimage.median_filter(s, 3))[soft])
    if not res:
        return 0.0
    r = np.concatenate(res)
    return float(1.4826 * np.median(np.abs(r)))


def soften(vol: Volume) -> tuple[Volume, Grain]:
    """``vol`` as it is, or smoothed in plane where its grain is over `MAX_HU` at pixels finer
    than `FINE_PIXEL_MM`; with what was read. The width is chosen on the sampled slices, and
    the volume smoothed once."""
    axis = vol.grid.slice_axis
    in_plane = [s for i, s in enumerate(vol.grid.spacing) if i != axis]
    pixel = min(in_plane)
    sample = _sample(vol.hu, axis)
    before = _grain(sample)
    if before <= MAX_HU or pixel >= FINE_PIXEL_MM:
        return vol, Grain(before, before, 0.0, pixel)
    after, sigma = before, 0.0
    for sigma in SIGMAS_MM:
        after = _grain(sample, (sigma / in_plane[0], sigma / in_plane[1]))
        if after <= TARGET_HU:
            break
    widths = [0.0 if i == axis else sigma / s for i, s in enumerate(vol.grid.spacing)]
    hu = ndimage.gaussian_filter(vol.hu, widths).astype(np.float32, copy=False)
    grain = Grain(before, after, sigma, pixel)
    log.info("%s", grain.warning())
    return replace(vol, hu=hu), grain
