"""Voxel grids in patient space (DICOM LPS) and oblique planes through them.

A `Grid` maps array indices ``(k, r, c)`` (slice, row, column) of a volume to patient
coordinates in millimetres. A `Plane` is a 2D sampling grid in patient space; `sample_plane`
reads a volume on it, which is how both the dataset builders and the analysis cut slices
parallel to a disc rather than to the scanner's axial plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid: ``lps = affine @ (k, r, c, 1)``."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # 4x4, index (k, r, c) -> LPS mm

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along k, r and c in mm."""
        cols = self.affine[:3, :3]
        return tuple(float(np.linalg.norm(cols[:, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def slice_axis(self) -> int:
        """The index axis that runs most nearly head to foot (a DICOM series' k)."""
        cols = self.affine[:3, :3]
        return int(np.argmax(np.abs(cols[2]) / np.linalg.norm(cols, axis=0)))

    @property
    def sheared(self) -> bool:
        """Whether the index axes are not at right angles (a gantry-tilted stack, whose
        slices shift sideways from one to the next)."""
        cols = self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)
        return bool(np.abs(cols.T @ cols - np.eye(3)).max() > 1e-4)

    def plane_spacing(self, axis: int) -> float:
        """Distance in mm between successive planes of index ``axis`` (less than the step
        along that axis where the grid is sheared)."""
        cols = self.affine[:3, :3]
        a, b = (cols[:, i] for i in range(3) if i != axis)
        n = np.cross(a, b)
        return float(abs(cols[:, axis] @ n) / np.linalg.norm(n))

    def to_patient(self, index: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` indices (k, r, c) to LPS."""
        index = np.asarray(index, dtype=float)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_index(self, lps: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` LPS points to fractional indices (k, r, c)."""
        inv = np.linalg.inv(self.affine)
        lps = np.asarray(lps, dtype=float)
        return lps @ inv[:3, :3].T + inv[:3, 3]

    def lattice_index(
        self, origin: np.ndarray, axes: tuple[tuple[np.ndarray, np.ndarray], ...]
    ) -> np.ndarray:
        """Fractional indices ``(3, n0, n1, ...)`` of the points ``origin + sum_k s_k * d_k``
        for every combination of the steps ``s_k`` (mm) of each axis ``(steps, direction)``.

        The indices are linear in the steps, so they are built by broadcasting, never as
        an array of LPS points (the cost of cutting a plane or a box out of a volume).
        """
        inv = np.linalg.inv(self.affine)
        m = inv[:3, :3]
        n = len(axes)
        idx = (m @ np.asarray(origin, dtype=float) + inv[:3, 3]).reshape((3,) + (1,) * n)
        for k, (steps, direction) in enumerate(axes):
            shape = [1] * (n + 1)
            shape[0], shape[k + 1] = 3, len(steps)
            step = (m @ direction)[:, None] * np.asarray(steps, dtype=float)[None, :]
            idx = idx + step.reshape(shape)
        return idx


def axial_grid(
    *,
    rows: int,
    columns: int,
    slices: int,
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    first_position: tuple[float, float, float],
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
) -> Grid:
    """The grid of a CT series whose slices go along the negative slice normal.

    ``pixel_spacing`` is (row spacing, column spacing) as in DICOM PixelSpacing;
    ``first_position`` is ImagePositionPatient of slice k = 0. Slice k lies at
    ``first_position - k * slice_spacing * normal``: the first slice is the most cranial
    one, as scanners usually store a supine spine series.
    """
    row_dir = np.array(orientation[:3], dtype=float)  # direction of increasing column
    col_dir = np.array(orientation[3:], dtype=float)  # direction of increasing row
    normal = np.cross(row_dir, col_dir)
    affine = np.eye(4)
    affine[:3, 0] = -normal * slice_spacing
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = row_dir * pixel_spacing[1]
    affine[:3, 3] = first_position
    return Grid(shape=(slices, rows, columns), affine=affine)


LEFT = np.array([1.0, 0.0, 0.0])


def frame_from_normal(up: np.ndarray, left_hint: np.ndarray = LEFT) -> np.ndarray:
    """The frame (columns left, posterior, cranial) of a plane with unit normal ``up``: left is
    ``left_hint`` (the patient's left by default) made orthogonal to it."""
    left = left_hint - up * (left_hint @ up)
    left = left / np.linalg.norm(left)
    return np.stack([left, np.cross(up, left), up], axis=1)


def fit_plane(points: np.ndarray, off_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane through ``(n, 3)`` points, fitted again without the points more than
    ``off_mm`` off it (where at least 10 remain): a point on it and its unit normal (either sign)."""
    c = points.mean(axis=0)
    n = np.linalg.svd(points - c, full_matrices=False)[2][2]
    keep = np.abs((points - c) @ n) < off_mm
    if keep.sum() >= 10:
        c = points[keep].mean(axis=0)
        n = np.linalg.svd(points[keep] - c, full_matrices=False)[2][2]
    return c, n


@dataclass(frozen=True)
class Plane:
    """A square 2D sampling grid in patient space.

    Pixel ``(i, j)`` (row, column) lies at ``centre + (j - (size-1)/2) * pixel_mm * u
    + (i - (size-1)/2) * pixel_mm * v``.
    """

    centre: np.ndarray  # LPS mm
    u: np.ndarray  # unit vector along columns
    v: np.ndarray  # unit vector along rows
    size: int
    pixel_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.u, self.v)

    def pixel_to_patient(self, ij: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` pixel coordinates (row, column) to LPS."""
        ij = np.asarray(ij, dtype=float)
        half = (self.size - 1) / 2.0
        return (
            self.centre
            + ((ij[..., 1:2] - half) * self.pixel_mm) * self.u
            + ((ij[..., 0:1] - half) * self.pixel_mm) * self.v
        )

    def patient_to_pixel(self, lps: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` LPS points to (row, column, distance from the plane in mm)."""
        d = np.asarray(lps, dtype=float) - self.centre
        half = (self.size - 1) / 2.0
        return np.stack(
            [d @ self.v / self.pixel_mm + half, d @ self.u / self.pixel_mm + half, d @ self.normal],
            axis=-1,
        )

    def shifted(self, mm: float) -> Plane:
        """The parallel plane ``mm`` along the normal."""
        return Plane(self.centre + mm * self.normal, self.u, self.v, self.size, self.pixel_mm)


def sample_plane(
    volume: np.ndarray, grid: Grid, plane: Plane, *, order: int = 1, fill: float = 0.0
) -> np.ndarray:
    """Resample ``volume`` on ``plane``; ``order`` 0 for label volumes, 1 for images."""
    half = (plane.size - 1) / 2.0
    steps = (np.arange(plane.size) - half) * plane.pixel_mm
    idx = grid.lattice_index(plane.centre, ((steps, plane.v), (steps, plane.u))).reshape(3, -1)
    out = ndimage.map_coordinates(
        volume, idx, order=order, mode="constant", cval=fill, prefilter=False
    )
    return out.reshape(plane.size, plane.size)


def plane_mask_voxels(
    mask: np.ndarray, plane: Plane, half_thickness_mm: float, grid: Grid
) -> np.ndarray:
    """The voxels of ``grid`` that a 2D mask on ``plane`` covers, as ``(n, 3)`` indices (k, r, c).

    A voxel belongs to the mask when its centre lies within ``half_thickness_mm`` of the
    plane (never less than half the grid's coarsest spacing, so a thin slab has no holes)
    and projects onto a set pixel of the mask. This is how a finding drawn on an oblique
    slice is carried back onto the grid of the series it came from.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    t = max(half_thickness_mm, 0.5 * max(grid.spacing))
    r0, r1, c0, c1 = rows.min() - 1, rows.max() + 1, cols.min() - 1, cols.max() + 1
    corners = plane.pixel_to_patient(
        np.array([[r0, c0], [r0, c1], [r1, c0], [r1, c1]], dtype=float)
    )
    corners = np.concatenate([corners + t * plane.normal, corners - t * plane.normal])
    idx = grid.to_index(corners)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, grid.shape)
    if np.any(hi <= lo):
        return np.zeros((0, 3), dtype=np.int64)
    box = np.stack(
        np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    rcd = plane.patient_to_pixel(grid.to_patient(box))
    ij = np.rint(rcd[:, :2]).astype(int)
    inside = (
        (np.abs(rcd[:, 2]) <= t) & (ij >= 0).all(axis=1) & (ij < np.array(mask.shape)).all(axis=1)
    )
    hit = np.zeros(len(box), dtype=bool)
    hit[inside] = mask[ij[inside, 0], ij[inside, 1]]
    return box[hit]
