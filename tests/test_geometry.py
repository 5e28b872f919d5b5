"""gem_backend.algorithm.geometry: mask geometry on synthetic masks with known answers."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from gem_backend.algorithm.geometry import (
    bounding_boxes,
    component_at,
    component_means,
    connected_components,
    fill_holes,
    mask_polygons,
    simplify_ring,
    to_percent,
    trace_rings,
)


def bfs_labels(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Plain flood fill, raster order: the reference for connected_components."""
    h, w = mask.shape
    out = np.zeros((h, w), np.int32)
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    n = 0
    for r in range(h):
        for c in range(w):
            if mask[r, c] and not out[r, c]:
                n += 1
                out[r, c] = n
                queue = deque([(r, c)])
                while queue:
                    y, x = queue.popleft()
                    for dy, dx in steps:
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not out[yy, xx]:
                            out[yy, xx] = n
                            queue.append((yy, xx))
    return out


def rasterize(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of a polygon (pixel-corner coordinates) sampled at pixel centres."""
    h, w = shape
    yc, xc = np.mgrid[0:h, 0:w] + 0.5
    inside = np.zeros(shape, bool)
    pts = np.asarray(points, float)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > yc) != (y1 > yc)
        x_at = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xc < x_at)
    return inside


def shoelace(points: np.ndarray) -> float:
    x, y = np.asarray(points, float).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def square_with_hole() -> np.ndarray:
    m = np.zeros((10, 12), bool)
    m[1:9, 2:10] = True       # 8 x 8 square
    m[3:6, 4:7] = False       # 3 x 3 hole
    return m


# --------------------------------------------------------------------------- components


def test_components_known_shapes_4_and_8_connected():
    m = np.zeros((5, 6), bool)
    m[0, 0] = m[1, 1] = True          # diagonal neighbours
    m[3:5, 3:6] = True                # a 2 x 3 block
    m[0, 5] = True
    four = connected_components(m, 4)
    assert four.count == 4
    assert four.areas.tolist() == [1, 1, 1, 6]                # raster order of first pixels
    assert four.boxes.tolist() == [[0, 0, 1, 1], [5, 0, 6, 1], [1, 1, 2, 2], [3, 3, 6, 5]]
    eight = connected_components(m, 8)
    assert eight.count == 3 and eight.areas.tolist() == [2, 1, 6]
    assert connected_components(np.zeros((3, 3), bool)).count == 0
    with pytest.raises(ValueError):
        connected_components(m, 6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity", [4, 8])
def test_components_match_flood_fill(seed, connectivity):
    rng = np.random.default_rng(seed)
    m = rng.random((23, 31)) < (0.3 + 0.08 * seed)
    comps = connected_components(m, connectivity)
    np.testing.assert_array_equal(comps.labels, bfs_labels(m, connectivity))
    assert comps.areas.tolist() == np.bincount(comps.labels.ravel())[1:].tolist()


def test_component_at_and_means():
    m = np.zeros((4, 8), bool)
    m[:, :3] = True
    m[:, 5:] = True
    left = component_at(m, 2, 1)
    assert left.sum() == 12 and not left[:, 5:].any()
    assert not component_at(m, 0, 4).any()                    # a background pixel selects nothing
    values = np.tile(np.arange(8, dtype=float), (4, 1))
    assert component_means(connected_components(m), values).tolist() == [1.0, 6.0]


def test_fill_holes_respects_the_size_limit():
    m = square_with_hole()
    m[7, 7] = False                                            # a 1-pixel hole too
    assert fill_holes(m).sum() == 64
    small_only = fill_holes(m, max_area=1)
    assert small_only[7, 7] and not small_only[4, 5]
    edge = np.ones((4, 4), bool)
    edge[0, 1] = False                                         # background touching the border: no hole
    assert not fill_holes(edge)[0, 1]


# --------------------------------------------------------------------------- boxes


def test_one_box_per_component_above_the_minimum_area():
    m = np.zeros((20, 30), bool)
    m[2:6, 3:10] = True      # 28 px
    m[10:12, 20:21] = True   # 2 px
    m[15:19, 25:30] = True   # 20 px, touching the right border
    boxes = bounding_boxes(m, min_area=3)
    assert [b[:4] for b in boxes] == [(3, 2, 10, 6), (25, 15, 30, 19)]
    assert len(bounding_boxes(m)) == 3


# --------------------------------------------------------------------------- outlines


def test_rings_of_a_square_with_a_hole():
    m = square_with_hole()
    rings = trace_rings(m)
    assert len(rings) == 2
    outer = next(r for r in rings if not r.hole)
    hole = next(r for r in rings if r.hole)
    assert outer.points.tolist() == [[2, 1], [10, 1], [10, 9], [2, 9]]   # clockwise on screen
    assert sorted(map(tuple, hole.points.tolist())) == [(4, 3), (4, 6), (7, 3), (7, 6)]
    assert shoelace(outer.points) == 64 and shoelace(hole.points) == -9
    assert outer.component == hole.component == 0


def test_diagonal_pixels_get_separate_rings():
    m = np.zeros((3, 3), bool)
    m[0, 0] = m[1, 1] = True
    rings = trace_rings(m)
    assert sorted(r.points.tolist() for r in rings) == [[[0, 0], [1, 0], [1, 1], [0, 1]],
                                                       [[1, 1], [2, 1], [2, 2], [1, 2]]]
    assert not any(r.hole for r in rings)


@pytest.mark.parametrize("seed", range(5))
def test_ring_areas_add_up_to_each_component(seed):
    rng = np.random.default_rng(100 + seed)
    m = rng.random((40, 50)) < 0.55
    comps = connected_components(m)
    area = np.zeros(comps.count)
    outers = np.zeros(comps.count, int)
    for ring in trace_rings(m, comps):
        area[ring.component] += shoelace(ring.points)
        outers[ring.component] += not ring.hole
        assert (ring.points >= 0).all() and (ring.points[:, 0] <= 50).all() and (ring.points[:, 1] <= 40).all()
    assert (outers == 1).all()                                  # exactly one outer outline each
    np.testing.assert_array_equal(area, comps.areas)            # outer minus holes = pixel count


# --------------------------------------------------------------------------- simplification


def _max_deviation(original: np.ndarray, simplified: np.ndarray) -> float:
    """Largest distance of an original vertex from the simplified closed polyline."""
    a = simplified
    b = np.roll(simplified, -1, axis=0)
    worst = 0.0
    for p in original:
        ab = b - a
        t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-12), 0, 1)
        d = np.hypot(*(a + t[:, None] * ab - p).T).min()
        worst = max(worst, float(d))
    return worst


def test_simplify_staircase_within_tolerance():
    m = np.tril(np.ones((40, 40), bool))                       # a right triangle with a staircase side
    (ring,) = trace_rings(m)
    assert len(ring.points) > 70
    assert simplify_ring(ring.points, 0).tolist() == ring.points.tolist()
    for tol in (0.75, 1.0, 3.0):                               # the stair corners lie 0.71 px off the diagonal
        simple = simplify_ring(ring.points, tol)
        assert 3 <= len(simple) <= 6
        assert _max_deviation(ring.points, simple) <= tol + 1e-9
    assert len(simplify_ring(ring.points, 0.6)) > 70            # a tighter tolerance keeps the stairs


def test_simplify_keeps_at_least_a_triangle():
    ring = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    assert len(simplify_ring(ring, 5.0)) >= 3


# --------------------------------------------------------------------------- polygons


def test_polygon_with_hole_fills_back_to_the_mask():
    m = square_with_hole()
    (poly,), comps = mask_polygons(m)
    assert poly.holes == 1 and poly.area == 55 and comps.count == 1
    np.testing.assert_array_equal(rasterize(poly.points, m.shape), m)


@pytest.mark.parametrize("seed", range(4))
def test_polygons_reproduce_random_blobs_exactly_at_zero_tolerance(seed):
    rng = np.random.default_rng(seed)
    small = rng.random((9, 12)) < 0.5
    m = np.kron(small, np.ones((3, 3), bool))                  # blocky blobs with holes and islands
    polygons, comps = mask_polygons(m)
    assert len(polygons) == comps.count
    painted = np.zeros(m.shape, bool)
    for poly in polygons:
        part = rasterize(poly.points, m.shape)
        np.testing.assert_array_equal(part, comps.labels == poly.component + 1)
        painted |= part
    np.testing.assert_array_equal(painted, m)


def test_small_holes_are_filled_and_small_parts_dropped():
    m = square_with_hole()
    m[0, 0] = True                                             # a 1-pixel island
    polygons, _ = mask_polygons(m, min_area=10)                # the 9-pixel hole is below 10 too
    assert len(polygons) == 1 and polygons[0].holes == 0
    np.testing.assert_array_equal(rasterize(polygons[0].points, m.shape), fill_holes(square_with_hole()))
    polygons, _ = mask_polygons(m, min_area=10, min_hole_area=5)
    assert polygons[0].holes == 1


def test_tolerance_is_in_scaled_units_and_reduces_points():
    yy, xx = np.mgrid[0:60, 0:80]
    disc = (yy - 30) ** 2 + (xx - 40) ** 2 < 25 ** 2
    (exact,), _ = mask_polygons(disc)
    (coarse,), _ = mask_polygons(disc, tolerance=1.5)
    (scaled,), _ = mask_polygons(disc, tolerance=1.5, scale=(10.0, 10.0))   # 1.5 px at 10x = 0.15 mask px
    assert len(coarse.points) < len(scaled.points) <= len(exact.points)
    assert _max_deviation(exact.points, coarse.points) <= 1.5 + 1e-9


def test_percent_coordinates():
    pts = np.array([[0, 0], [5, 2], [20, 10], [21, 11]], float)
    assert to_percent(pts, (10, 20)) == [[0.0, 0.0], [25.0, 20.0], [100.0, 100.0], [100.0, 100.0]]


@pytest.mark.parametrize("small_shape,size", [((9, 12), (31, 50)), ((7, 10), (24, 37)), ((12, 9), (12, 9)),
                                              ((10, 13), (73, 41))])
def test_polygons_traced_small_and_scaled_are_the_full_size_mask(small_shape, size):
    """What is compared: the service traces a label's outline on the mask at the model input
    size and scales the vertices to the original size (percent coordinates, ``to_percent``).
    The full-size mask is that small mask upsampled by ``resize_nearest``: full pixel ``j``
    takes small pixel ``floor((j + 0.5) * w / W)``, i.e. it is inside exactly when its centre
    lies inside the scaled outline. So filling the scaled polygon (percent -> full-size pixels)
    at full-size pixel centres gives the full-size mask itself, pixel for pixel (odd sizes and
    non-integer scale factors here; at tolerance 0, before any simplification)."""
    from gem_backend.algorithm.segmentation import nearest_indices, resize_nearest

    rng = np.random.default_rng(sum(small_shape) + sum(size))
    small = rng.random(small_shape) < 0.45
    (h, w), (H, W) = small_shape, size
    full = resize_nearest(small.astype(np.uint16), size).astype(bool)
    np.testing.assert_array_equal(full, small[nearest_indices(h, H)][:, nearest_indices(w, W)])
    polygons, comps = mask_polygons(small, tolerance=0.0, scale=(W / w, H / h))
    painted = np.zeros(size, bool)
    for poly in polygons:
        pct = np.array(to_percent(poly.points, (h, w)))
        at_full = pct * np.array([W, H]) / 100.0                    # what Label Studio draws
        part = rasterize(at_full, size)
        want = resize_nearest((comps.labels == poly.component + 1).astype(np.uint16), size).astype(bool)
        np.testing.assert_array_equal(part, want)
        painted |= part
    np.testing.assert_array_equal(painted, full)
    # boxes likewise: the small box scaled holds exactly the full-size component's pixel centres
    for x0, y0, x1, y1, k in bounding_boxes(small, 1, comps):
        ys, xs = np.nonzero(resize_nearest((comps.labels == k + 1).astype(np.uint16), size))
        for lo, hi, got, n_small, n_full in ((x0, x1, xs, w, W), (y0, y1, ys, h, H)):
            # a pixel belongs when its centre c has lo <= c * n_small / n_full < hi (a centre on the
            # left/top edge belongs: floor), and the box is tight
            assert got.min() - 0.5 < lo * n_full / n_small <= got.min() + 0.5
            assert got.max() + 0.5 < hi * n_full / n_small <= got.max() + 1.5
