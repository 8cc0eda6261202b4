"""The fast mask operations give exactly what scipy.ndimage gives."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from node.analysis.spine import _ball, resample_iso
from node.geometry import Grid
from node.masks import disk, disk_opening, fill_holes, largest_component, opening


def _masks(rng: np.random.Generator, n: int, ndim: int):
    for _ in range(n):
        shape = tuple(int(x) for x in rng.integers(3, 30, size=ndim))
        yield ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.5 + rng.normal() * 0.03


def test_fill_holes_and_opening_equal_scipys():
    rng = np.random.default_rng(7)
    for m in _masks(rng, 80, 2):
        assert (fill_holes(m) == ndimage.binary_fill_holes(m)).all()
        for st in (np.ones((3, 3), bool), ndimage.generate_binary_structure(2, 1), _ball(2.0)[2]):
            assert (opening(m, st) == ndimage.binary_opening(m, structure=st)).all()
    for m in _masks(rng, 40, 3):
        assert (fill_holes(m) == ndimage.binary_fill_holes(m)).all()
        for st in (_ball(3.0), _ball(1.0), np.ones((3, 3, 3), bool)):
            assert (opening(m, st) == ndimage.binary_opening(m, structure=st)).all()
    assert not opening(np.zeros((5, 5), bool), np.ones((3, 3), bool)).any()


def test_the_disk_opening_by_distance_transforms_equals_scipys():
    """Radii whole and fractional, up to the vertebral edge's 8 mm at 0.5 mm (16 px), on
    masks that touch the array's border; a mask the disk does not fit in opens to nothing."""
    rng = np.random.default_rng(11)
    for i in range(120):
        n = int(rng.integers(20, 120))
        m = ndimage.gaussian_filter(rng.random((n, n + 7)), rng.uniform(1.0, 6.0)) > 0.5
        r = (1.0, 2.5, 4.2, 6.0, 8.33, 10.0, 16.0)[i % 7]
        assert (disk_opening(m, r) == ndimage.binary_opening(m, structure=disk(r))).all(), (i, r)
    assert not disk_opening(np.ones((5, 5), bool), 4.0).any()


def test_largest_component_keeps_the_biggest_piece():
    m = np.zeros((10, 10), bool)
    m[1:3, 1:3] = True  # 4 pixels
    m[5:9, 5:9] = True  # 16 pixels
    assert largest_component(m).sum() == 16 and largest_component(m)[6, 6]


def test_the_separable_resample_equals_a_box_filter_and_a_zoom():
    rng = np.random.default_rng(3)
    for shape, spacing in [
        ((47, 73, 73), (1.5, 1.5, 1.5)),
        ((40, 128, 120), (2.5, 0.7, 0.7)),
        ((61, 100, 90), (0.6, 0.5, 0.9)),
    ]:
        hu = (rng.normal(size=shape) * 100).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        factors = np.array(spacing) / 2.0
        box = [max(1, int(round(1 / f))) for f in factors]
        want = ndimage.zoom(
            ndimage.uniform_filter(hu, size=box, mode="nearest"),
            factors,
            order=1,
            prefilter=False,
            grid_mode=True,
            mode="nearest",
        )
        got, grid = resample_iso(hu, Grid(shape, affine))
        assert got.shape == want.shape == grid.shape
        assert np.abs(got - want).max() < 1e-3


def test_a_plane_cut_through_the_index_lattice_equals_one_cut_point_by_point():
    """`sample_plane` builds the grid indices of a plane by broadcasting; they are the same
    as mapping each pixel to LPS and back, on oblique planes of anisotropic, rotated grids."""
    from node.geometry import Plane, sample_plane

    rng = np.random.default_rng(11)
    vol = rng.normal(size=(40, 64, 64)).astype(np.float32) * 100
    for _ in range(10):
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        affine = np.eye(4)
        affine[:3, :3] = rot * rng.uniform(0.5, 2.5, 3)
        affine[:3, 3] = rng.uniform(-50, 50, 3)
        grid = Grid(vol.shape, affine)
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        v = np.cross(u, rng.normal(size=3))
        v /= np.linalg.norm(v)
        centre = grid.to_patient(np.array([20.0, 32.0, 32.0]) + rng.normal(size=3))
        plane = Plane(centre, u, v, 48, 0.7)
        i, j = np.mgrid[0:48, 0:48]
        idx = grid.to_index(plane.pixel_to_patient(np.stack([i, j], axis=-1).reshape(-1, 2)))
        for order in (0, 1):
            want = ndimage.map_coordinates(
                vol, idx.T, order=order, mode="constant", cval=-1000.0, prefilter=False
            ).reshape(48, 48)
            got = sample_plane(vol, grid, plane, order=order, fill=-1000.0)
            assert np.abs(got - want).max() < 1e-3
