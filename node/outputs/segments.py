"""From a study's findings to segments on the CT's own voxel grid.

Each finding of each disc becomes one segment: a disc's morphology (normal, bulge,
protrusion) is the disc's mid axial mask, which stands for the whole disc height, united
with its mid sagittal mask; a Schmorl's node is the union of the node masks next to that
disc's endplates. Masks drawn on oblique disc-parallel slices are carried back onto the
series' grid (`plane_mask_voxels`), so that the SEG lies on a grid that PACS already has.
Segments do not overlap: a voxel belongs to the first segment that claims it, nodes first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from node.analysis.study import DiscResult, StudyResult
from node.classes import DiscClass
from node.geometry import Grid, plane_mask_voxels


@dataclass(frozen=True)
class Segment:
    number: int  # 1..n, as in the SEG
    disc: int  # index into the result's discs
    level: str  # "L4-L5", or "disc 2" where levels are not named
    cls: DiscClass
    confidence: float
    voxels: np.ndarray  # (n, 3) indices (k, r, c) on the volume grid

    @property
    def label(self) -> str:
        return f"{self.level} {self.cls.display}"


def _finding_voxels(disc: DiscResult, cls: DiscClass, grid: Grid) -> np.ndarray:
    if cls is DiscClass.SCHMORL:
        masks = [m for m in disc.masks if m.cls is DiscClass.SCHMORL]
    else:
        masks = [m for m in disc.masks if m.cls is not DiscClass.SCHMORL and m.offset_mm == 0.0]
    parts = [plane_mask_voxels(m.mask, m.plane, m.half_thickness_mm, grid) for m in masks]
    parts = [p for p in parts if len(p)]
    return np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 3), dtype=np.int64)


def build_segments(result: StudyResult, grid: Grid) -> list[Segment]:
    """One segment per finding that has voxels, numbered cranial to caudal, nodes of a
    level before its disc."""
    taken = np.zeros(grid.shape, dtype=bool)
    found: list[tuple[int, DiscClass, float, np.ndarray]] = []
    for i, disc in enumerate(result.discs):
        order = sorted(disc.findings, key=lambda f: f.cls is not DiscClass.SCHMORL)
        for f in order:
            vox = _finding_voxels(disc, f.cls, grid)
            if len(vox):
                free = ~taken[vox[:, 0], vox[:, 1], vox[:, 2]]
                vox = vox[free]
                taken[vox[:, 0], vox[:, 1], vox[:, 2]] = True
            if len(vox):
                found.append((i, f.cls, f.confidence, vox))
    return [Segment(n, i, result.discs[i].level, cls, conf, vox)
            for n, (i, cls, conf, vox) in enumerate(found, start=1)]


def label_volume(segments: list[Segment], shape: tuple[int, int, int]) -> np.ndarray:
    """The segments as one label volume (0 background, else the segment number)."""
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    for s in segments:
        out[s.voxels[:, 0], s.voxels[:, 1], s.voxels[:, 2]] = s.number
    return out
