"""Label Studio prediction JSON: masks and shapes -> brush, bitmask, polygon, rectangle and choices results.

Result format (what Label Studio 1.23 stores and shows, see
``/work/shared/label-studio/captured/13_predict_response_example.json``)::

    {"result": [{"id": "3f9a0c1b7e", "from_name": "tag", "to_name": "image",
                 "type": "brushlabels", "original_width": W, "original_height": H,
                 "image_rotation": 0, "score": 0.87,
                 "value": {"format": "rle", "rle": [...], "brushlabels": ["cat"]}}],
     "score": 0.87, "model_version": "gem-..."}

A ``bitmasklabels`` region (Label Studio 1.23's ``<BitmaskLabels>``) holds its mask as a PNG
data URL at the image's pixel size, ``{"imageDataURL": "data:image/png;base64,...",
"bitmasklabels": ["cat"]}``: the frontend reads a pixel as inside when its alpha is over 0 and
writes RGBA PNGs, black and opaque inside, transparent outside. :func:`bitmask_data_url`
writes the same pixels as a 1-bit palette PNG (index 0 transparent black, 1 opaque black),
which browsers and Pillow decode to exactly those RGBA values
(:mod:`gem_backend.labelstudio.bitmask`).
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from typing import Any, Iterable, Sequence

import numpy as np

from .bitmask import mask_png
from .spec import BitmaskTarget, BrushTarget, LabelTarget

__all__ = ["bitmask_data_url", "bitmask_region", "bitmask_region_from_png", "png_data_url", "brush_region", "brush_region_from_rle", "choices_region", "dumps", "new_region_id", "polygon_region", "prediction", "rectangle_region"]


def new_region_id() -> str:
    """A fresh region id: 10 random hex characters (40 bits, like Label Studio's own ids)."""
    return secrets.token_hex(5)


def _finite_score(score: Any, what: str) -> float:
    value = float(score)
    # NaN/inf would make the JSON reply invalid
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {score!r}")
    return value


def _mask2rle(mask: np.ndarray, stretch: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
    try:
        from .brush import mask2rle
    except ModuleNotFoundError as exc:
        # a trimmed install without our encoder still answers, with the SDK's
        if exc.name != f"{__package__}.brush":
            raise
        from label_studio_sdk.converter.brush import mask2rle
    if stretch is not None:
        try:
            from .brush import stretched_mask2rle
        except ImportError:  # only the SDK's encoder: build the full-size mask
            mask = np.ascontiguousarray(mask[stretch[0]][:, stretch[1]])
        else:
            return stretched_mask2rle(mask, *stretch)
    return [int(v) for v in mask2rle(mask)]


def _image_region(kind: str, target: LabelTarget, width: int, height: int, score: float, value: dict,
                  region_id: str | None) -> dict:
    """The envelope every region on an image shares; ``value`` is the type's own part."""
    return {
        "id": region_id if region_id is not None else new_region_id(),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": _finite_score(score, "score"),
        "value": value,
    }


def brush_region(
    mask: np.ndarray,
    label: str,
    target: BrushTarget,
    score: float,
    region_id: str | None = None,
    stretch: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """One Label Studio ``brushlabels`` result for one mask.

    - ``mask``: ``[H, W]`` uint8, 0 (background) or 255 (label); a bool mask is accepted and
      mapped False->0, True->255. H and W are the size of the image as Label Studio shows it
      (after EXIF orientation), they become ``original_height``/``original_width``.
    - ``label``: one of ``target.labels``.
    - ``score``: region confidence, usually in [0, 1].
    - ``region_id``: unique id within the prediction; a new random one when None.
    - ``stretch``: ``(rows, cols)``, the full-size mask is ``mask[rows][:, cols]`` (a mask at
      the model input size and the nearest-upsampling index maps,
      :attr:`gem_backend.algorithm.segmentation.Segmentation.rows`/``cols``): the RLE is
      computed from the small mask (:func:`~gem_backend.labelstudio.brush.stretched_mask2rle`,
      the same bytes) and H x W is ``len(rows) x len(cols)``.

    Returns ``{"id", "from_name", "to_name", "type": "brushlabels", "original_width",
    "original_height", "image_rotation": 0, "score", "value": {"format": "rle", "rle": [int,
    ...], "brushlabels": [label]}}``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty [H, W] array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        # a bool array's bytes are 0/1: one multiply, no conversion pass (6x faster on 12 MP)
        mask = np.ascontiguousarray(mask).view(np.uint8) * np.uint8(255)
    elif mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8 (0 or 255) or bool, got {mask.dtype}")
    elif np.any((mask != 0) & (mask != 255)):
        # Label Studio draws the RLE value as alpha: 1..254 would show as a faint ghost
        raise ValueError("uint8 mask must only hold 0 and 255")
    if label not in target.labels:
        raise ValueError(f"label {label!r} is not one of {list(target.labels)} of {target.from_name!r}")

    if stretch is not None:
        rows, cols = (np.asarray(a, np.int64) for a in stretch)
        height, width = rows.size, cols.size
        if not height or not width:
            raise ValueError("stretch index maps must not be empty")
        value = {"format": "rle", "rle": _mask2rle(mask, (rows, cols)), "brushlabels": [label]}
    else:
        height, width = mask.shape
        value = {"format": "rle", "rle": _mask2rle(np.ascontiguousarray(mask)), "brushlabels": [label]}
    return _image_region("brushlabels", target, width, height, score, value, region_id)


def brush_region_from_rle(rle: list[int], size: tuple[int, int], label: str, target: BrushTarget, score: float,
                          region_id: str | None = None) -> dict:
    """A ``brushlabels`` result from an RLE already encoded for an ``(H, W)`` image (e.g. by
    :func:`~gem_backend.labelstudio.brush.stretched_label_rles`); as :func:`brush_region`."""
    _check_label(label, target)
    height, width = (int(v) for v in size)
    value = {"format": "rle", "rle": rle, "brushlabels": [label]}
    return _image_region("brushlabels", target, width, height, score, value, region_id)


BITMASK_PREFIX = "data:image/png;base64,"


def bitmask_data_url(mask: np.ndarray, stretch: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """A mask as Label Studio's ``bitmasklabels`` ``imageDataURL``: a PNG data URL, inside
    opaque black ``(0, 0, 0, 255)``, outside transparent ``(0, 0, 0, 0)`` once decoded to RGBA
    (:func:`~gem_backend.labelstudio.bitmask.mask_png`).

    - ``mask``: ``[h, w]`` bool (or 0/non-0 integers).
    - ``stretch``: ``(rows, cols)``, the full-size mask is ``mask[rows][:, cols]`` (the model
      input size mask and :attr:`~gem_backend.algorithm.segmentation.Segmentation.rows`/
      ``cols``); the PNG is then ``len(cols) x len(rows)``, and no full-size array is built.
    """
    rows, cols = stretch if stretch is not None else (None, None)
    return png_data_url(mask_png(mask, rows, cols))


def png_data_url(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return BITMASK_PREFIX + base64.b64encode(png).decode("ascii")


def bitmask_region_from_png(png: bytes, size: tuple[int, int], label: str, target: BitmaskTarget, score: float,
                            region_id: str | None = None) -> dict:
    """A ``bitmasklabels`` result from a PNG already made for an ``(H, W)`` image (e.g. by
    :func:`~gem_backend.labelstudio.bitmask.label_pngs`); as :func:`bitmask_region`."""
    _check_label(label, target)
    height, width = (int(v) for v in size)
    value = {"imageDataURL": png_data_url(png), "bitmasklabels": [label]}
    return _image_region("bitmasklabels", target, width, height, score, value, region_id)


def bitmask_region(mask: np.ndarray, label: str, target: BitmaskTarget, score: float,
                   region_id: str | None = None, stretch: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One Label Studio ``bitmasklabels`` result for one mask (arguments as :func:`brush_region`;
    ``mask`` is bool or 0/non-0).

    Returns ``{"id", "from_name", "to_name", "type": "bitmasklabels", "original_width",
    "original_height", "image_rotation": 0, "score", "value": {"imageDataURL":
    "data:image/png;base64,...", "bitmasklabels": [label]}}``."""
    rows, cols = stretch if stretch is not None else (None, None)
    size = (len(rows), len(cols)) if stretch is not None else np.asarray(mask).shape
    return bitmask_region_from_png(mask_png(mask, rows, cols), size, label, target, score, region_id)


def _check_label(label: str, target: LabelTarget) -> None:
    if label not in target.labels:
        raise ValueError(f"label {label!r} is not one of {list(target.labels)} of {target.from_name!r}")


def _percent(value: Any, what: str) -> float:
    v = _finite_score(value, what)
    if not -1e-9 <= v <= 100.0 + 1e-9:
        raise ValueError(f"{what} must be a percentage in [0, 100], got {value!r}")
    return min(max(v, 0.0), 100.0)


def polygon_region(
    points: Sequence[Sequence[float]],
    label: str,
    target: LabelTarget,
    score: float,
    width: int,
    height: int,
    region_id: str | None = None,
) -> dict:
    """One ``polygonlabels`` result.

    - ``points``: ``[[x, y], ...]`` in percent of the image width/height (at least 3, not
      repeating the first point at the end).
    - ``width``/``height``: the image as Label Studio shows it (``original_width``/``_height``).
    """
    pts = [[_percent(x, "polygon x"), _percent(y, "polygon y")] for x, y in points]
    if len(pts) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(pts)}")
    _check_label(label, target)
    value = {"points": pts, "closed": True, "polygonlabels": [label]}
    return _image_region("polygonlabels", target, width, height, score, value, region_id)


def rectangle_region(
    x: float,
    y: float,
    box_width: float,
    box_height: float,
    label: str,
    target: LabelTarget,
    score: float,
    width: int,
    height: int,
    region_id: str | None = None,
) -> dict:
    """One ``rectanglelabels`` result: top-left corner ``x``/``y`` and size, in percent of
    the image; ``width``/``height`` are the image's pixel size."""
    _check_label(label, target)
    value = {"x": _percent(x, "x"), "y": _percent(y, "y"), "width": _percent(box_width, "width"),
             "height": _percent(box_height, "height"), "rotation": 0}
    value["width"] = min(value["width"], 100.0 - value["x"])
    value["height"] = min(value["height"], 100.0 - value["y"])
    value["rectanglelabels"] = [label]
    return _image_region("rectanglelabels", target, width, height, score, value, region_id)


def choices_region(choices: Sequence[str], target: LabelTarget, score: float,
                   region_id: str | None = None) -> dict:
    """One ``choices`` result (a classification of the whole image) with ``choices``."""
    choices = list(choices)
    if not choices:
        raise ValueError("choices must not be empty")
    for choice in choices:
        _check_label(choice, target)
    return {
        "id": region_id if region_id is not None else new_region_id(),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "choices",
        "score": _finite_score(score, "score"),
        "value": {"choices": choices},
    }


def prediction(
    regions: Iterable[dict] | Sequence[dict],
    model_version: str,
    score: float | None = None,
) -> dict:
    """One task's prediction: ``{"result": [...], "score": float, "model_version": str}``.

    - ``regions``: results from :func:`brush_region` (or the polygon, rectangle and choices
      builders); their ids must be unique.
    - ``model_version``: must equal what ``/setup`` returned, or Label Studio hides it.
    - ``score``: the prediction's overall score; None means the mean of the region scores.
      An empty result always gets score 0.0.
    """
    result = list(regions)
    ids = [region.get("id") for region in result]
    if len(set(ids)) != len(ids):
        raise ValueError("region ids must be unique within a prediction")
    if not result:
        overall = 0.0
    elif score is None:
        overall = float(np.mean([float(region.get("score", 0.0)) for region in result]))
    else:
        overall = _finite_score(score, "prediction score")
    return {"result": result, "score": overall, "model_version": str(model_version)}


_BYTE_TEXT = [str(v) for v in range(256)]


def _byte_list_json(values: Sequence[int]) -> str:
    """``json.dumps(values, separators=(",", ":"))`` for a list of ints in [0, 255], ~3x faster."""
    data = bytes(values)  # checks the range: iterating it gives ints in [0, 255]
    return "[" + ",".join(map(_BYTE_TEXT.__getitem__, data)) + "]"


def dumps(obj: Any) -> str:
    """``obj`` as compact JSON with sorted keys (what Flask's ``jsonify`` writes), with brush
    RLE lists (``"rle": [int, ...]``, ~1 MB of ints for a 12 MP image with 20 labels) written
    by a vectorised path: ``json.dumps`` spends ~0.1 s per megabyte of small ints.
    ``json.loads(dumps(obj)) == obj``."""
    token = secrets.token_hex(8)
    texts: list[str] = []

    def swap(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "rle" and isinstance(value, list) and all(type(v) is int for v in value[:1]):
                    try:
                        text = _byte_list_json(value)
                    except (ValueError, TypeError):  # not bytes after all: the plain encoder
                        out[key] = swap(value)
                        continue
                    out[key] = f"{token}:{len(texts)}"
                    texts.append(text)
                else:
                    out[key] = swap(value)
            return out
        if isinstance(node, (list, tuple)):
            return [swap(v) for v in node]
        return node

    text = json.dumps(swap(obj), separators=(",", ":"), sort_keys=True)
    if not texts:
        return text
    parts = text.split(f'"{token}:')
    out = [parts[0]]
    for part in parts[1:]:
        index, _, rest = part.partition('"')
        out.append(texts[int(index)])
        out.append(rest)
    return "".join(out)
