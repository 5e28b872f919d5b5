"""Mask geometry, numpy only: connected components, outlines, polygons, boxes.

Everything here works on a boolean ``[h, w]`` mask (in gem-backend: a label's mask at the
model input size, whose nearest-neighbour upsampling is the full-size mask) and knows
nothing of Label Studio or the model.

Conventions:

- Foreground is **4-connected** (pixels touching by an edge belong together; diagonal
  neighbours do not), so holes (background inside an object) are 8-connected. This is the
  usual digital-topology pair, under which every component has exactly one outer outline.
- Outlines follow pixel edges: vertices are pixel corners, ``(x, y)`` with ``x`` in
  ``[0, w]`` and ``y`` in ``[0, h]``; pixel ``(row r, col c)`` is the square
  ``[c, c + 1] x [r, r + 1]``. With ``y`` pointing down, an outer outline runs clockwise on
  screen (positive shoelace area in these coordinates) and a hole counter-clockwise
  (negative area), the foreground always on its right-hand side.
- A component's polygon carries its holes by *bridges*: each hole is joined to the outer
  ring by a zero-width cut (the keyhole construction), so one simple list of points draws
  the region with its holes under both the even-odd and the non-zero fill rule (Label
  Studio's polygons have no separate hole rings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Components",
    "Polygon",
    "Ring",
    "bounding_boxes",
    "component_at",
    "component_means",
    "connected_components",
    "fill_holes",
    "mask_polygons",
    "simplify_ring",
    "to_percent",
    "trace_rings",
]


# --------------------------------------------------------------------------- components


@dataclass
class Components:
    """Connected components of a mask.

    Attributes:
        labels: ``[h, w]`` int32, 0 background, ``k + 1`` for component ``k``; components are
            numbered in raster order of their first pixel.
        count: number of components.
        areas: ``[count]`` int64 pixel counts.
        boxes: ``[count, 4]`` int64 ``(x0, y0, x1, y1)`` in pixel-corner coordinates
            (``x1``/``y1`` exclusive).
    """

    labels: np.ndarray
    count: int
    areas: np.ndarray
    boxes: np.ndarray


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: ``(row, start, end)`` (end exclusive), in raster order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # same rows, same order: every run starts then ends
    return rows.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def _ranges(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[i], lo[i] + counts[i])`` for all ``i``."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(lo - offsets, counts) + np.arange(total, dtype=np.int64)


def _union(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component representative (smallest member) of each of ``n`` nodes joined by edges a-b."""
    lab = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return lab
    while True:
        m = np.minimum(lab[a], lab[b])
        new = lab.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:  # pointer jumping: every node points at its representative's representative
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, lab):
            return lab
        lab = new


def connected_components(mask: np.ndarray, connectivity: int = 4) -> Components:
    """Label the connected components of a boolean mask.

    Run-based: the runs of each row are joined to the overlapping runs of the row above
    (vectorised), so the cost grows with the number of runs, not of pixels.

    Args:
        mask: ``[h, w]``, True (or non-zero) is foreground.
        connectivity: 4 (edge neighbours) or 8 (also diagonal ones).
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [h, w], got shape {mask.shape}")
    h, w = mask.shape
    rows, starts, ends = _runs(mask)
    n = rows.size
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return Components(labels, 0, np.zeros(0, np.int64), np.zeros((0, 4), np.int64))

    # runs of row r-1 touching run b of row r form a contiguous slice of the sorted runs
    stride = w + 2
    slack = 0 if connectivity == 4 else 1
    key_start = rows * stride + starts
    key_end = rows * stride + ends
    above = (rows - 1) * stride
    lo = np.searchsorted(key_end, above + starts - slack, side="right")
    hi = np.searchsorted(key_start, above + ends + slack, side="left")
    counts = np.maximum(hi - lo, 0)
    a = _ranges(lo, counts)
    b = np.repeat(np.arange(n, dtype=np.int64), counts)

    rep = _union(n, a, b)
    _, comp = np.unique(rep, return_inverse=True)  # representatives are raster-ordered run indices
    comp = comp.astype(np.int64).ravel()
    count = int(comp.max()) + 1

    lengths = ends - starts
    pixels = _ranges(rows * w + starts, lengths)
    labels.ravel()[pixels] = np.repeat(comp + 1, lengths).astype(np.int32)

    areas = np.bincount(comp, weights=lengths, minlength=count).astype(np.int64)
    boxes = np.empty((count, 4), np.int64)
    boxes[:, 0] = w
    boxes[:, 1] = h
    boxes[:, 2] = 0
    boxes[:, 3] = 0
    np.minimum.at(boxes[:, 0], comp, starts)
    np.minimum.at(boxes[:, 1], comp, rows)
    np.maximum.at(boxes[:, 2], comp, ends)
    np.maximum.at(boxes[:, 3], comp, rows + 1)
    return Components(labels, count, areas, boxes)


def component_at(mask: np.ndarray, row: int, col: int, connectivity: int = 4) -> np.ndarray:
    """``[h, w]`` bool: the connected component of ``mask`` containing pixel ``(row, col)``
    (all False when that pixel is background)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask[row, col]:
        return np.zeros_like(mask)
    comps = connected_components(mask, connectivity)
    return comps.labels == comps.labels[row, col]


def fill_holes(mask: np.ndarray, max_area: int | None = None) -> np.ndarray:
    """Fill holes (background regions not touching the border, 8-connected) of at most
    ``max_area`` pixels (all holes when None)."""
    mask = np.asarray(mask, dtype=bool)
    bg = connected_components(~mask, connectivity=8)
    if bg.count == 0:
        return mask.copy()
    h, w = mask.shape
    x0, y0, x1, y1 = bg.boxes.T
    inner = (x0 > 0) & (y0 > 0) & (x1 < w) & (y1 < h)
    if max_area is not None:
        inner &= bg.areas <= max_area
    fill = np.concatenate([[False], inner])
    return mask | fill[bg.labels]


def bounding_boxes(mask: np.ndarray, min_area: int = 1,
                   components: Components | None = None) -> list[tuple[int, int, int, int, int]]:
    """One box per connected component with at least ``min_area`` pixels.

    Returns ``[(x0, y0, x1, y1, k), ...]`` in raster order of the components: corners in
    pixel-corner coordinates (``x1``/``y1`` exclusive) and ``k`` the component's index in
    ``components`` (computed here when not given).
    """
    comps = components if components is not None else connected_components(mask)
    out = []
    for k in np.flatnonzero(comps.areas >= max(1, min_area)).tolist():
        x0, y0, x1, y1 = (int(v) for v in comps.boxes[k])
        out.append((x0, y0, x1, y1, k))
    return out


def component_means(components: Components, values: np.ndarray) -> np.ndarray:
    """``[count]`` mean of ``values`` (``[h, w]``) over each component's pixels."""
    sums = np.bincount(components.labels.ravel(), weights=np.asarray(values, np.float64).ravel(),
                       minlength=components.count + 1)[1:]
    return sums / np.maximum(components.areas, 1)


# --------------------------------------------------------------------------- outlines

# edge directions, y down: 0 = +x, 1 = +y, 2 = -x, 3 = -y; turning right is d + 1
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)


@dataclass
class Ring:
    """One closed outline of a mask.

    Attributes:
        points: ``[k, 2]`` float64 ``(x, y)`` pixel-corner vertices, corners only (no
            collinear points), not repeating the first point at the end.
        component: index of the component (:func:`connected_components`, 4-connected) whose
            pixels the ring bounds.
        hole: True for the outline of a hole inside that component.
    """

    points: np.ndarray
    component: int
    hole: bool


def _edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every directed boundary edge, foreground on its right: ``(x, y, direction)`` of its
    start vertex."""
    h, w = mask.shape
    p = np.zeros((h + 2, w + 2), bool)
    p[1:-1, 1:-1] = mask
    xs, ys, ds = [], [], []
    # horizontal edges at y = Y between pixel rows Y-1 (above) and Y (below)
    above, below = p[:-1, 1:-1], p[1:, 1:-1]
    Y, X = np.nonzero(~above & below)           # top side of foreground: +x
    xs.append(X); ys.append(Y); ds.append(np.full(X.size, 0))
    Y, X = np.nonzero(above & ~below)           # bottom side: -x, starts at the right corner
    xs.append(X + 1); ys.append(Y); ds.append(np.full(X.size, 2))
    # vertical edges at x = X between pixel columns X-1 (left) and X (right)
    left, right = p[1:-1, :-1], p[1:-1, 1:]
    Y, X = np.nonzero(left & ~right)            # right side of foreground: +y
    xs.append(X); ys.append(Y); ds.append(np.full(X.size, 1))
    Y, X = np.nonzero(~left & right)            # left side: -y, starts at the bottom corner
    xs.append(X); ys.append(Y + 1); ds.append(np.full(X.size, 3))
    return (np.concatenate(xs).astype(np.int64), np.concatenate(ys).astype(np.int64),
            np.concatenate(ds).astype(np.int64))


def trace_rings(mask: np.ndarray, components: Components | None = None) -> list[Ring]:
    """All outlines of a mask, outer rings and holes, each tagged with its component.

    At a corner where two foreground pixels touch only diagonally, the outline turns
    towards its own pixel, so diagonal neighbours get separate rings (4-connectivity).
    """
    mask = np.asarray(mask, dtype=bool)
    comps = components if components is not None else connected_components(mask)
    h, w = mask.shape
    x, y, d = _edges(mask)
    n = x.size
    if n == 0:
        return []
    stride = w + 1
    start_v = y * stride + x
    end_v = (y + _DY[d]) * stride + (x + _DX[d])
    order = np.lexsort((d, start_v))             # by start vertex, then direction
    x, y, d, start_v, end_v = x[order], y[order], d[order], start_v[order], end_v[order]
    first = np.searchsorted(start_v, end_v, side="left")
    count = np.searchsorted(start_v, end_v, side="right") - first
    # one way out, or a saddle (two): take the right turn, i.e. stay around our own pixel
    second = np.minimum(first + 1, n - 1)
    want = (d + 1) % 4
    succ = np.where((count > 1) & (d[first] != want), second, first)

    ring_id, pos = _cycles(succ)
    order = np.lexsort((pos, ring_id))         # edges ring by ring, in walking order
    ring_id, x, y, d = ring_id[order], x[order], y[order], d[order]
    bounds = np.flatnonzero(np.diff(ring_id)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    prev = np.arange(n) - 1
    prev[starts] = ends - 1                      # a ring's first edge follows its last
    corner = d != d[prev]                        # keep vertices where the direction changes
    # the foreground pixel on the right of each ring's first edge names the component
    e = starts
    px = x[e] - np.isin(d[e], (1, 2))
    py = y[e] - np.isin(d[e], (2, 3))
    comp = comps.labels[py, px].astype(np.int64) - 1
    keep_idx = np.flatnonzero(corner)
    ring_of = ring_id[keep_idx]
    first_kept = np.flatnonzero(np.r_[True, np.diff(ring_of) != 0])
    last_kept = np.r_[first_kept[1:], keep_idx.size] - 1
    pts = np.stack([x[keep_idx], y[keep_idx]], axis=1).astype(np.float64)
    nxt = np.arange(keep_idx.size) + 1
    nxt[last_kept] = first_kept
    cross = pts[:, 0] * pts[nxt, 1] - pts[nxt, 0] * pts[:, 1]
    area = 0.5 * np.add.reduceat(cross, first_kept)  # > 0 outer ring, < 0 hole
    return [Ring(pts[s:e + 1], int(comp[k]), hole=bool(area[k] < 0))
            for k, (s, e) in enumerate(zip(first_kept.tolist(), last_kept.tolist()))]


def _cycles(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation made of cycles: each element's cycle id (its smallest member) and
    its position along the cycle counted from that member (vectorised pointer jumping)."""
    n = succ.size
    ident = np.arange(n, dtype=np.int64)
    head = ident.copy()
    jump = succ.astype(np.int64)
    while True:
        # head: smallest member within 2^k steps; once doubling changes nothing, the windows
        # span whole cycles (else some element would still see the minimum one step later)
        new = np.minimum(head, head[jump])
        if np.array_equal(new, head):
            break
        head, jump = new, jump[jump]
    # list ranking on the cycles cut open before their heads: distance to the last element
    nxt = np.where(succ == head, ident, succ).astype(np.int64)
    dist = (nxt != ident).astype(np.int64)
    while True:
        step = nxt[nxt]
        if np.array_equal(step, nxt):
            break
        dist = dist + dist[nxt]
        nxt = step
    length = np.bincount(head, minlength=n)
    return head, length[head] - 1 - dist


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


# --------------------------------------------------------------------------- simplification


def _dp_keep(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on an open polyline; bool mask of the vertices kept (ends always)."""
    n = len(points)
    keep = np.zeros(n, bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, b = points[i], points[j]
        seg = points[i + 1:j]
        ab = b - a
        norm = float(np.hypot(ab[0], ab[1]))
        if norm == 0.0:
            dist = np.hypot(seg[:, 0] - a[0], seg[:, 1] - a[1])
        else:
            dist = np.abs(ab[0] * (seg[:, 1] - a[1]) - ab[1] * (seg[:, 0] - a[0])) / norm
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            m = i + 1 + k
            keep[m] = True
            stack.append((i, m))
            stack.append((m, j))
    return keep


def simplify_ring(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed ring: no point of the original outline
    lies farther than ``tolerance`` from the simplified one. At least 3 vertices are kept
    (a ring that would collapse keeps its 3-4 extreme points)."""
    pts = np.asarray(points, dtype=np.float64)
    if tolerance <= 0 or len(pts) <= 3:
        return pts.copy()
    # split the ring at two far-apart anchors: the first vertex and the farthest from it
    far = int(np.argmax(np.hypot(pts[:, 0] - pts[0, 0], pts[:, 1] - pts[0, 1])))
    first = pts[: far + 1]
    second = np.concatenate([pts[far:], pts[:1]])
    keep1 = _dp_keep(first, tolerance)
    keep2 = _dp_keep(second, tolerance)
    out = np.concatenate([first[keep1], second[keep2][1:-1]])
    if len(out) < 3:
        ext = [int(np.argmin(pts[:, 0])), int(np.argmin(pts[:, 1])),
               int(np.argmax(pts[:, 0])), int(np.argmax(pts[:, 1]))]
        out = pts[sorted(set(ext))]
        if len(out) < 3:
            return pts.copy()
    return out


# --------------------------------------------------------------------------- polygons


@dataclass
class Polygon:
    """One component as a polygon.

    Attributes:
        points: ``[k, 2]`` float64 pixel-corner ``(x, y)`` vertices: the outer ring with each
            kept hole spliced in by a bridge (see the module docstring).
        component: the component's index in the :class:`Components` returned alongside.
        area: the component's pixel count (holes excluded).
        holes: how many holes were spliced in.
    """

    points: np.ndarray
    component: int
    area: int
    holes: int


def _bridge(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Splice ``hole`` into ``outer`` through their closest pair of vertices."""
    d2 = ((hole[:, None, :] - outer[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(int(np.argmin(d2)), d2.shape)
    return np.concatenate([outer[: j + 1], hole[i:], hole[: i + 1], outer[j:]])


def _dedupe(points: np.ndarray) -> np.ndarray:
    """Drop consecutive repeated vertices (also last == first)."""
    if len(points) < 2:
        return points
    same = np.all(points == np.roll(points, 1, axis=0), axis=1)
    return points[~same] if not same.all() else points[:1]


def mask_polygons(mask: np.ndarray, tolerance: float = 0.0, min_area: int = 1,
                  min_hole_area: int | None = None,
                  scale: tuple[float, float] = (1.0, 1.0)) -> tuple[list[Polygon], Components]:
    """One polygon per connected component of ``mask`` with at least ``min_area`` pixels.

    Args:
        mask: ``[h, w]`` bool.
        tolerance: Douglas-Peucker tolerance, in the units of ``scale`` (e.g. original-image
            pixels when ``scale`` maps mask pixels to them); 0 keeps every corner.
        min_area: smallest component kept, in mask pixels.
        min_hole_area: holes with fewer pixels are filled; default ``min_area``.
        scale: ``(sx, sy)`` multiplying x and y before simplification; the returned points
            are divided back, so they stay in mask pixel-corner coordinates.
    Returns:
        the polygons in raster order of the components, and the components of the mask
        (after filling the small holes) that the polygons' ``component`` indices refer to.
    """
    mask = np.asarray(mask, dtype=bool)
    min_area = max(1, int(min_area))
    hole_limit = min_area if min_hole_area is None else int(min_hole_area)
    if hole_limit > 1:
        mask = fill_holes(mask, max_area=hole_limit - 1)
    comps = connected_components(mask)
    keep = comps.areas >= min_area
    if not keep.any():
        return [], comps
    if not keep.all():
        mask = mask & np.concatenate([[False], keep])[comps.labels]
    rings = trace_rings(mask, comps)
    sx, sy = scale
    factor = np.array([sx, sy], np.float64)
    outers: dict[int, np.ndarray] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for ring in rings:
        pts = simplify_ring(ring.points * factor, tolerance) / factor
        if ring.hole:
            holes.setdefault(ring.component, []).append(pts)
        else:
            outers[ring.component] = pts
    out = []
    for k in sorted(outers):
        pts = outers[k]
        for hole in holes.get(k, []):
            pts = _bridge(pts, hole)
        out.append(Polygon(_dedupe(pts), k, int(comps.areas[k]), len(holes.get(k, []))))
    return out, comps


def to_percent(points: np.ndarray, shape: tuple[int, int]) -> list[list[float]]:
    """Pixel-corner ``(x, y)`` points of an ``[h, w]`` mask -> ``[[x%, y%], ...]`` of the
    image, clipped to [0, 100]."""
    h, w = shape
    pts = np.asarray(points, dtype=np.float64)
    pct = np.clip(np.stack([pts[:, 0] * 100.0 / w, pts[:, 1] * 100.0 / h], axis=1), 0.0, 100.0)
    return [[float(px), float(py)] for px, py in pct]
