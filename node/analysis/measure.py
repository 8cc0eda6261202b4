"""Measurements of a disc against the vertebral edge in a plane parallel to the disc.

Both the truth of the phantoms and the analysis of the model's masks use these, so that a
phantom's "share of circumference" means the same as the node's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: A ray counts as "beyond the vertebral edge" past this many millimetres.
EXTENDS_MM = 1.0
#: The paper's rule: over 25% of the circumference is a bulge, under it a protrusion.
BULGE_SHARE = 0.25


@dataclass(frozen=True)
class Extension:
    """Radial extension of a disc beyond its vertebral edge, per ray from the disc centre."""

    angles_deg: np.ndarray  # 0 = patient's left (+u), 90 = posterior (+v)
    extension_mm: np.ndarray  # NaN where a ray found no vertebral edge

    @property
    def max_mm(self) -> float:
        e = self.extension_mm
        return float(np.nanmax(e)) if np.isfinite(e).any() else 0.0

    @property
    def share(self) -> float:
        """Share of the circumference (share of valid rays) that extends past `EXTENDS_MM`."""
        e = self.extension_mm[np.isfinite(self.extension_mm)]
        return float(np.mean(e > EXTENDS_MM)) if e.size else 0.0

    @property
    def direction_deg(self) -> float:
        """Angle of the largest extension."""
        e = np.where(np.isfinite(self.extension_mm), self.extension_mm, -np.inf)
        return float(self.angles_deg[int(np.argmax(e))])

    def width_deg(self, level_mm: float) -> float:
        """Angular width of the extension around its peak where it exceeds ``level_mm``."""
        e = np.nan_to_num(self.extension_mm, nan=0.0)
        n = e.size
        peak = int(np.argmax(e))
        if e[peak] <= level_mm:
            return 0.0
        width = 1
        for step in (1, -1):
            i = peak
            for _ in range(n - 1):
                i = (i + step) % n
                if e[i] <= level_mm or i == peak:
                    break
                width += 1
        step_deg = 360.0 / n
        return min(360.0, width * step_deg)


def outer_radius(mask: np.ndarray, centre: tuple[float, float], angles: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Distance in pixels from ``centre`` to the last mask pixel along each ray (NaN if none)."""
    radii = np.arange(0.0, float(max(mask.shape)), step)
    rows = centre[0] + np.outer(np.sin(angles), radii)
    cols = centre[1] + np.outer(np.cos(angles), radii)
    ri, ci = np.rint(rows).astype(int), np.rint(cols).astype(int)
    valid = (ri >= 0) & (ri < mask.shape[0]) & (ci >= 0) & (ci < mask.shape[1])
    hit = np.zeros(ri.shape, dtype=bool)
    hit[valid] = mask[ri[valid], ci[valid]]
    any_hit = hit.any(axis=1)
    last = len(radii) - 1 - np.argmax(hit[:, ::-1], axis=1)
    return np.where(any_hit, radii[last], np.nan)


def disc_extension(
    disc: np.ndarray, vertebral_edge: np.ndarray, pixel_mm: float, *, rays: int = 360
) -> Extension:
    """Extension of the ``disc`` mask beyond the ``vertebral_edge`` mask, both in one plane.

    Rows of the plane run posterior (+v), columns to the patient's left (+u), so angle 90
    is posterior. The centre is the disc mask's centroid.
    """
    if not disc.any():
        raise ValueError("empty disc mask")
    rr, cc = np.nonzero(disc)
    centre = (float(rr.mean()), float(cc.mean()))
    angles = np.radians(np.arange(rays) * 360.0 / rays)
    r_disc = outer_radius(disc, centre, angles)
    r_edge = outer_radius(vertebral_edge, centre, angles)
    return Extension(np.degrees(angles), (r_disc - r_edge) * pixel_mm)
