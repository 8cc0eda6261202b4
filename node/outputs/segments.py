"""From a study's findings to segments on the CT's own voxel grid.

Per disc level, up to three segments, each one connected region:

- the **disc**: the model's mid axial mask of the disc (its largest piece, holes filled,
  opened with a 1 mm disk so that one-pixel spikes go), carried back onto the series'
  voxels across the disc space only: voxels whose centre lies within half the disc height
  of the disc plane, and not bone. A normal disc is labelled and coloured as normal; at a
  level with a bulge or protrusion it is the plain disc ("L4-L5 disc").
- the **extension** of a bulge or protrusion: the part of the disc mask more than
  `EXTENDS_MM` beyond the vertebral edge the measurements used, in the finding's colour, so
  that what is coloured is the finding itself. Where no part lies beyond the edge the disc
  segment carries the finding instead.
- a **Schmorl's node**: the node masks the model drew on the slices beyond the endplates,
  kept in the vertebral body next to the endplate (`NODE_DEPTH_MM` deep).

Masks drawn on oblique disc-parallel slices are carried back onto the series' grid
(`plane_mask_voxels`), so that the SEG lies on a grid that PACS already has. Segments do
not overlap: a voxel belongs to the first segment that claims it (node, extension, disc).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import ndimage

from node.analysis.measure import EXTENDS_MM
from node.analysis.study import DiscResult, MaskOnPlane, StudyResult
from node.classes import DiscClass
from node.geometry import Grid, Plane, plane_mask_voxels
from node.inference.interface import View
from node.masks import disk, fill_holes, largest_component, opening

#: Voxels brighter than this are bone, never disc.
BONE_HU = 250.0
#: Opening radius that removes spikes and slivers from a mask.
SMOOTH_MM = 1.0
#: How deep into the vertebral body beyond the endplate a node segment may reach.
NODE_DEPTH_MM = 8.0
#: Pieces of an extension smaller than this are partial-volume noise at the edge.
MIN_EXTENSION_MM2 = 4.0
#: Six-connected: what the tests and viewers call one region.
CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


class Part(str, Enum):
    DISC = "disc"
    EXTENSION = "extension"
    NODE = "node"


@dataclass(frozen=True)
class Segment:
    number: int  # 1..n, as in the SEG
    disc: int  # index into the result's discs
    level: str  # "L4-L5", or "" where levels are not named
    cls: DiscClass  # the finding the segment shows (for a plain disc: the level's finding)
    part: Part
    confidence: float
    voxels: np.ndarray  # (n, 3) indices (k, r, c) on the volume grid
    #: The disc of a level whose finding (its extension) is a segment of its own.
    plain: bool = False

    @property
    def label(self) -> str:
        where = self.level or f"disc {self.disc + 1}"
        return f"{where} disc" if self.plain else f"{where} {self.cls.display}"


def clean_mask(mask: np.ndarray, pixel_mm: float) -> np.ndarray:
    """One smooth region: the largest piece, holes filled, spikes opened away."""
    if not mask.any():
        return mask.astype(bool)
    m = fill_holes(largest_component(mask))
    opened = opening(m, disk(SMOOTH_MM / pixel_mm))
    return largest_component(opened) if opened.any() else m


def _slab_voxels(
    mask: np.ndarray, plane: Plane, grid: Grid, hu: np.ndarray, half_mm: float
) -> np.ndarray:
    """Voxels under ``mask`` whose centre lies within ``half_mm`` of the plane, not bone, in
    one piece."""
    vox = plane_mask_voxels(mask, plane, half_mm, grid)
    if not len(vox):
        return vox
    d = (grid.to_patient(vox) - plane.centre) @ plane.normal
    vox = vox[(np.abs(d) <= half_mm) & (hu[vox[:, 0], vox[:, 1], vox[:, 2]] <= BONE_HU)]
    return _one_piece(vox)


def _shape_class(disc: DiscResult) -> DiscClass | None:
    """The level's finding on the disc's shape (normal, bulge, protrusion), None where the
    only finding is a node or there is none."""
    return next((f.cls for f in disc.findings if f.cls is not DiscClass.SCHMORL), None)


def _one_piece(vox: np.ndarray) -> np.ndarray:
    if len(vox) < 2:
        return vox
    lo = vox.min(axis=0)
    box = np.zeros(tuple(vox.max(axis=0) - lo + 1), dtype=bool)
    box[tuple((vox - lo).T)] = True
    keep = largest_component(box, CONNECTIVITY)
    return np.argwhere(keep) + lo


def _mid_axial(disc: DiscResult) -> MaskOnPlane | None:
    return next(
        (
            m
            for m in disc.masks
            if m.cls is not DiscClass.SCHMORL and m.view is View.AXIAL and m.offset_mm == 0.0
        ),
        None,
    )


def disc_parts(disc: DiscResult, grid: Grid, hu: np.ndarray) -> dict[Part, np.ndarray]:
    """The voxels of each part (disc, extension, node) of one level; a part without voxels
    is left out."""
    out: dict[Part, np.ndarray] = {}
    half = disc.site.height_mm / 2
    node = [m for m in disc.masks if m.cls is DiscClass.SCHMORL]
    if any(f.cls is DiscClass.SCHMORL for f in disc.findings) and node:
        parts = []
        for m in node:
            vox = plane_mask_voxels(
                clean_mask(m.mask, m.plane.pixel_mm), m.plane, m.half_thickness_mm, grid
            )
            if not len(vox):
                continue
            # distance beyond the disc plane, towards the body the node was seen in (the
            # endplate slice it was drawn on; either body for a slice across the disc)
            d = (grid.to_patient(vox) - disc.site.centre) @ disc.site.frame[:, 2]
            d = d * np.sign(m.offset_mm) if m.view is View.AXIAL and m.offset_mm else np.abs(d)
            parts.append(vox[(d >= half) & (d <= half + NODE_DEPTH_MM)])
        vox = (
            np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 3), dtype=np.int64)
        )
        vox = _one_piece(vox)
        if len(vox):
            out[Part.NODE] = vox
    mid = _mid_axial(disc)
    if mid is None:
        return out
    shape = clean_mask(mid.mask, mid.plane.pixel_mm)
    disc_vox = _slab_voxels(shape, mid.plane, grid, hu, half)
    if _shape_class(disc) not in (None, DiscClass.NORMAL) and disc.vertebral_edge is not None:
        grown = ndimage.binary_dilation(
            disc.vertebral_edge, structure=disk(EXTENDS_MM / mid.plane.pixel_mm)
        )
        beyond = shape & ~grown
        if beyond.sum() * mid.plane.pixel_mm**2 >= MIN_EXTENSION_MM2:
            beyond = largest_component(opening(beyond, disk(0.5 / mid.plane.pixel_mm)))
        if beyond.sum() * mid.plane.pixel_mm**2 >= MIN_EXTENSION_MM2:
            ext = _slab_voxels(beyond, mid.plane, grid, hu, half)
            if len(ext):
                out[Part.EXTENSION] = ext
    if len(disc_vox):
        out[Part.DISC] = disc_vox
    return out


def build_segments(result: StudyResult, grid: Grid, hu: np.ndarray) -> list[Segment]:
    """The segments of every level, numbered cranial to caudal; within a level the node,
    the extension, then the disc."""
    taken = np.zeros(grid.shape, dtype=bool)
    found: list[tuple[int, DiscClass, Part, float, np.ndarray, bool]] = []
    for i, disc in enumerate(result.discs):
        parts = disc_parts(disc, grid, hu)
        conf = {f.cls: f.confidence for f in disc.findings}
        shape = _shape_class(disc)
        morph = shape or DiscClass.NORMAL
        made: set[Part] = set()
        for part in (Part.NODE, Part.EXTENSION, Part.DISC):
            if part not in parts:
                continue
            vox = parts[part]
            vox = vox[~taken[vox[:, 0], vox[:, 1], vox[:, 2]]]
            if part is Part.DISC:
                vox = _one_piece(vox)  # what a node or an extension left of it
            if not len(vox):
                continue
            taken[vox[:, 0], vox[:, 1], vox[:, 2]] = True
            cls = DiscClass.SCHMORL if part is Part.NODE else morph
            # the disc is plain anatomy beside its finding's own segment, or at a level whose
            # only finding is a node; where nothing lies beyond the edge it shows the finding
            plain = part is Part.DISC and (
                shape is None or (shape is not DiscClass.NORMAL and Part.EXTENSION in made)
            )
            made.add(part)
            found.append((i, cls, part, conf.get(cls, disc.confidence), vox, plain))
    return [
        Segment(n, i, result.discs[i].level, cls, part, conf, vox, plain)
        for n, (i, cls, part, conf, vox, plain) in enumerate(found, start=1)
    ]


def label_volume(segments: list[Segment], shape: tuple[int, int, int]) -> np.ndarray:
    """The segments as one label volume (0 background, else the segment number)."""
    dtype = np.uint8 if len(segments) < 256 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    for s in segments:
        out[s.voxels[:, 0], s.voxels[:, 1], s.voxels[:, 2]] = s.number
    return out
