"""Planar contours (RTSTRUCT) to a voxel mask on an image grid: a pure polygon fill.

Rule: on each slice, a voxel belongs to the region when its centre lies inside a contour
of that slice or on one (within ``tol`` voxels); contours of one slice combine by the
even-odd rule, so a contour inside another is a hole, while the hole's own outline stays
in the region (as the outline of the pixels a contouring tool traced around it).
"""

from __future__ import annotations

import numpy as np

#: Distance (in voxels) within which a voxel centre counts as lying on a contour.
ON_CONTOUR_TOL = 1e-3


def polygon_interior(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Voxels whose centre is inside or on a closed polygon, by scanlines.

    Parameters
    ----------
    vertices : ndarray of shape (m, 2)
        ``(x, y)`` = (column, row) continuous indices of the vertices, in order; the
        polygon closes from the last vertex to the first.
    shape : (rows, columns)

    Returns
    -------
    ndarray of bool, shape ``shape``
    """
    rows, cols = shape
    out = np.zeros(shape, dtype=bool)
    v = np.asarray(vertices, dtype=float)
    if len(v) < 3:
        return out | polygon_outline(v, shape)
    x0, y0 = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo = max(int(np.ceil(y0.min())), 0)
    hi = min(int(np.floor(y0.max())), rows - 1)
    for y in range(lo, hi + 1):
        # Half-open rule: an edge counts when the scanline is in [min y, max y).
        cross = ((y0 <= y) & (y < y1)) | ((y1 <= y) & (y < y0))
        if not cross.any():
            continue
        xs = np.sort(
            x0[cross] + (y - y0[cross]) * (x1[cross] - x0[cross]) / (y1[cross] - y0[cross])
        )
        for a, b in zip(xs[0::2], xs[1::2], strict=True):
            start = max(int(np.ceil(a - ON_CONTOUR_TOL)), 0)
            stop = min(int(np.floor(b + ON_CONTOUR_TOL)), cols - 1)
            if start <= stop:
                out[y, start : stop + 1] = True
    return out | polygon_outline(v, shape)


def polygon_outline(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Voxels whose centre lies on the polygon's edges (within :data:`ON_CONTOUR_TOL`)."""
    rows, cols = shape
    out = np.zeros(shape, dtype=bool)
    v = np.asarray(vertices, dtype=float)
    if len(v) == 0:
        return out
    ends = np.roll(v, -1, axis=0) if len(v) > 1 else v
    for (ax, ay), (bx, by) in zip(v, ends, strict=True):
        c0 = max(int(np.ceil(min(ax, bx) - ON_CONTOUR_TOL)), 0)
        c1 = min(int(np.floor(max(ax, bx) + ON_CONTOUR_TOL)), cols - 1)
        r0 = max(int(np.ceil(min(ay, by) - ON_CONTOUR_TOL)), 0)
        r1 = min(int(np.floor(max(ay, by) + ON_CONTOUR_TOL)), rows - 1)
        if c0 > c1 or r0 > r1:
            continue
        yy, xx = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.zeros_like(xx, dtype=float)
        if length2 > 0:
            t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / length2, 0.0, 1.0)
        dist2 = (xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2
        out[r0 : r1 + 1, c0 : c1 + 1] |= dist2 <= ON_CONTOUR_TOL**2
    return out


def fill_slice(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """One slice's region from its contours: even-odd of the interiors, plus outlines."""
    parity = np.zeros(shape, dtype=bool)
    outline = np.zeros(shape, dtype=bool)
    for polygon in polygons:
        parity ^= polygon_interior(polygon, shape)
        outline |= polygon_outline(polygon, shape)
    return parity | outline
