"""Label Studio results -> masks and label maps: brush RLE, polygons, rectangles and bitmasks.

No model and no server: this module reads annotation (or prediction) ``result`` lists as
Label Studio 1.23 stores them and draws them at the image's pixel size:

- ``brushlabels``: ``value.rle`` (alpha words of RGBA, :func:`~.brush.rle2mask`), a pixel is
  inside when its alpha is at least 128;
- ``polygonlabels``: ``value.points`` in percent of the image, filled by pixel centre, even-odd (:func:`fill_polygon`);
- ``rectanglelabels``: ``value.x/y/width/height`` in percent (``rotation`` about the top-left
  corner, as Label Studio draws it);
- ``bitmasklabels``: ``value.imageDataURL``, a PNG data URL; a pixel is inside when its alpha
  is over 0 (what the Label Studio frontend tests, e.g. for hovering).

:func:`result_masks` gives one boolean mask per label (the label's regions OR-ed);
:func:`label_map` one ``[H, W]`` uint16 map for a control's labels.

Overlaps in :func:`label_map`: regions are painted in result order, so where two labels'
regions overlap the one that comes LATER in the result list wins (Label Studio draws later
regions on top). Pixels no region covers are background (0).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .brush import rle2mask
from .results import BITMASK_PREFIX

__all__ = ["AnnotationError", "MASK_KINDS", "bitmask_mask", "label_map", "polygon_mask", "fill_polygon", "rectangle_mask",
           "region_mask", "result_masks"]

MASK_KINDS = ("brushlabels", "polygonlabels", "rectanglelabels", "bitmasklabels")
MAX_PIXELS = 200_000_000


class AnnotationError(ValueError):
    """An annotation region that cannot be turned into a mask; the message says why."""


def region_size(result: Mapping, fallback: tuple[int, int] | None) -> tuple[int, int]:
    """``(H, W)`` of a region's image: its ``original_height``/``original_width``, else ``fallback``."""
    try:
        height, width = int(result["original_height"]), int(result["original_width"])
    except (KeyError, TypeError, ValueError):
        if fallback is None:
            raise AnnotationError("no original_width/original_height") from None
        height, width = fallback
    if height <= 0 or width <= 0 or height * width > MAX_PIXELS:
        raise AnnotationError(f"bad size {width}x{height}")
    return height, width


def polygon_mask(points: Any, height: int, width: int) -> np.ndarray:
    """``[H, W]`` bool: a polygon with ``points`` ``[[x, y], ...]`` in percent, filled
    (:func:`fill_polygon`: pixel centres inside, even-odd)."""
    if not isinstance(points, list) or len(points) < 3:
        raise AnnotationError("a polygon needs at least 3 points")
    xy = []
    for pt in points:
        if not (isinstance(pt, (list, tuple)) and len(pt) >= 2):
            raise AnnotationError(f"polygon point {pt!r} is not [x, y]")
        x, y = float(pt[0]), float(pt[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise AnnotationError("polygon point is not finite")
        xy.append((x / 100.0 * width, y / 100.0 * height))
    return fill_polygon(np.asarray(xy, dtype=np.float64), (height, width))


def fill_polygon(xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` bool: the pixels whose centre lies inside the polygon ``xy`` (``[N, 2]``
    pixel-corner coordinates ``(x, y)``), by the even-odd rule, so the zero-width cuts that
    join a hole to its outline leave the hole empty."""
    height, width = size
    out = np.zeros((height, width), bool)
    if len(xy) < 3:
        return out
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    rows = np.arange(height)[:, None] + 0.5
    crosses = (y0[None] <= rows) != (y1[None] <= rows)  # [H, E]: half-open, so a vertex counts once
    r, e = np.nonzero(crosses)
    if not r.size:
        return out
    x = x0[e] + (rows[r, 0] - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
    # each crossing toggles the pixels whose centre is right of it
    start = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), np.int64)
    np.add.at(toggles, (r, start), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)


def rectangle_mask(value: Mapping, height: int, width: int) -> np.ndarray:
    """``[H, W]`` bool: a ``rectanglelabels`` value (percent; ``rotation`` in degrees about
    the top-left corner), filled."""
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        raise AnnotationError("rectangle needs numeric x, y, width, height") from None
    if not all(math.isfinite(v) for v in (x, y, w, h, rotation)):
        raise AnnotationError("rectangle value is not finite")
    x0, y0, bw, bh = x / 100.0 * width, y / 100.0 * height, w / 100.0 * width, h / 100.0 * height
    if rotation == 0.0:
        # pixel (c, r) is inside when its centre is: the same cover as the polygon fill
        img = np.zeros((height, width), np.bool_)
        r0, r1 = (int(np.clip(round(v), 0, height)) for v in (y0, y0 + bh))
        c0, c1 = (int(np.clip(round(v), 0, width)) for v in (x0, x0 + bw))
        img[r0:r1, c0:c1] = True
        return img
    a = math.radians(rotation)
    cos, sin = math.cos(a), math.sin(a)
    corners = [(0.0, 0.0), (bw, 0.0), (bw, bh), (0.0, bh)]
    xy = np.array([(x0 + u * cos - v * sin, y0 + u * sin + v * cos) for u, v in corners])
    return fill_polygon(xy, (height, width))


def bitmask_mask(data_url: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """``[H, W]`` bool from a ``bitmasklabels`` ``imageDataURL``: alpha over 0 is inside.

    The PNG must be ``height x width`` when they are given (Label Studio draws it stretched
    over the image, so another size would not line up pixel for pixel)."""
    if not isinstance(data_url, str) or not data_url.startswith(BITMASK_PREFIX):
        raise AnnotationError("imageDataURL is not a PNG data URL")
    try:
        raw = base64.b64decode(data_url[len(BITMASK_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise AnnotationError("imageDataURL is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise AnnotationError(f"imageDataURL holds a {img.format}, not a PNG")
            if img.width * img.height > MAX_PIXELS:
                raise AnnotationError(f"bitmask of {img.width}x{img.height} pixels is too large")
            alpha = _alpha(img)
    except AnnotationError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a broken PNG
        raise AnnotationError(f"imageDataURL PNG cannot be decoded: {type(err).__name__}: {err}") from None
    if height is not None and width is not None and alpha.shape != (height, width):
        raise AnnotationError(f"bitmask is {alpha.shape[1]}x{alpha.shape[0]}, the image {width}x{height}")
    return alpha


def _alpha(img: Image.Image) -> np.ndarray:
    """Where a decoded PNG is not fully transparent (what a browser's canvas alpha > 0 is)."""
    if img.mode == "P" and "transparency" not in img.info:
        return np.ones((img.height, img.width), np.bool_)
    if img.mode == "P":
        trns = img.info["transparency"]
        table = np.full(256, 255, np.uint8)
        if isinstance(trns, bytes):
            table[: len(trns)] = np.frombuffer(trns, np.uint8)
        else:
            table[int(trns)] = 0
        return table[np.asarray(img)] > 0
    if img.mode in ("RGBA", "LA", "PA"):
        return np.asarray(img.getchannel("A")) > 0
    if "transparency" in img.info:  # grey or RGB with one transparent colour
        return np.asarray(img.convert("RGBA").getchannel("A")) > 0
    return np.ones((img.height, img.width), np.bool_)


def region_mask(result: Mapping, size: tuple[int, int] | None = None) -> tuple[list[str], np.ndarray]:
    """One result of a kind in :data:`MASK_KINDS` -> ``(its labels, [H, W] bool mask)``.

    ``size``: ``(H, W)`` used when the result carries no ``original_width``/``_height``.
    Raises :class:`AnnotationError` (a ValueError) saying what is wrong."""
    kind = result.get("type")
    if kind not in MASK_KINDS:
        raise AnnotationError(f"type {kind!r} is not a mask region")
    value = result.get("value")
    if not isinstance(value, Mapping):
        raise AnnotationError("no value object")
    labels = value.get(kind)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise AnnotationError(f"no {kind} label list")
    height, width = region_size(result, size)
    if kind == "brushlabels":
        if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
            raise AnnotationError("brush value is not RLE")
        try:
            mask = rle2mask(value["rle"], height, width) >= 128
        except ValueError as err:
            raise AnnotationError(f"bad RLE: {err}") from None
    elif kind == "polygonlabels":
        mask = polygon_mask(value.get("points"), height, width)
    elif kind == "rectanglelabels":
        mask = rectangle_mask(value, height, width)
    else:
        mask = bitmask_mask(value.get("imageDataURL"), height, width)
    return labels, mask


def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    return np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST))


def result_masks(results: Iterable[Mapping], to_name: str, size: tuple[int, int] | None = None,
                 kinds: Sequence[str] = MASK_KINDS, from_name: str | None = None
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Masks per label of the results of ``kinds`` drawn on ``to_name``.

    Masks of one label are OR-ed (resized to the first one's size when they differ). A result
    that cannot be decoded is skipped; the second item says why, one line per result.

    Args:
        results: an annotation's (or prediction's) ``result`` list.
        to_name: the ``<Image>`` the results must be drawn on.
        size: ``(H, W)`` used when a region carries no ``original_width``/``original_height``.
        kinds: the result types read (default every mask kind).
        from_name: only that control's results when given.
    """
    masks: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for i, result in enumerate(results):
        if not isinstance(result, Mapping) or result.get("to_name") != to_name:
            continue
        kind = result.get("type")
        if kind not in kinds or (from_name is not None and result.get("from_name") != from_name):
            continue
        try:
            labels, mask = region_mask(result, size)
        except (AnnotationError, TypeError, ValueError) as err:
            problems.append(f"result {i} ({kind}, id {result.get('id')}): {err}")
            continue
        for label in labels:
            prev = masks.get(label)
            if prev is not None:
                mask = _fit(mask, prev.shape)
            masks[label] = mask if prev is None else (prev | mask)
    return masks, problems


def label_map(results: Iterable[Mapping], labels: Sequence[str], to_name: str | None, size: tuple[int, int],
              from_name: str | None = None, kinds: Sequence[str] = MASK_KINDS) -> tuple[np.ndarray, list[str]]:
    """``([H, W] uint16 label map, problems)`` of the results on ``to_name``: ``i + 1`` where
    ``labels[i]`` is, 0 background; ``size`` is ``(H, W)`` (regions of another size are
    resized by nearest neighbour).

    Overlaps: the region later in the result list wins. Regions whose labels are not in
    ``labels`` are ignored (a region with several labels takes its first known one)."""
    height, width = (int(v) for v in size)
    out = np.zeros((height, width), np.uint16)
    index = {label: i + 1 for i, label in enumerate(labels)}
    problems: list[str] = []
    for i, result in enumerate(results):
        if not isinstance(result, Mapping) or (to_name is not None and result.get("to_name") != to_name):
            continue
        kind = result.get("type")
        if kind not in kinds or (from_name is not None and result.get("from_name") != from_name):
            continue
        try:
            names, mask = region_mask(result, (height, width))
        except (AnnotationError, TypeError, ValueError) as err:
            problems.append(f"result {i} ({kind}, id {result.get('id')}): {err}")
            continue
        value = next((index[n] for n in names if n in index), 0)
        if value:
            out[_fit(mask, (height, width))] = value
    return out, problems
