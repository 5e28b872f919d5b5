"""Annotator-assisted segmentation: Label Studio smart-tool context -> one object's mask.

When an annotator clicks with a smart ``<KeyPointLabels>`` tool or draws a smart
``<RectangleLabels>`` box, Label Studio calls ``/predict`` with the task and
``params.context.result``: the regions just drawn, in percent of the image, with their label
and ``is_positive`` (``false`` for a negative click, Alt+click). A ``<TextArea>`` bound to
the image sends ``textarea`` items with the typed text. :func:`parse_context` reads them;
:func:`select_region` turns them into a mask on the label probability maps of GEM (the
cheap part, on cached image features).

The rule (all on the model-input grid, 4-connected parts):

- the label is the one on the clicks/boxes (the last positive item that names one); without
  one, the label whose probability is highest at the positive clicks (or, for boxes only,
  highest on average inside them);
- the label's map is where it wins against the other labels and the background prompts
  with at least ``threshold``; where the annotator's positive click or box says "this is the
  label" but the map disagrees, the annotator overrules the model: the label then competes
  with the background prompts only, and if a background prompt still wins at the click, the
  segment of the prompt that won there is taken under the annotator's label;
- a positive click selects the connected part of the map around it (inside the positive
  boxes when it lies in one); without positive clicks, a positive box selects the map inside
  it; several positive items add up;
- a negative click removes the connected part it lies in, or, when that part also holds a
  positive click, the pixels of it nearer the negative click than any of those positive
  clicks; a negative box removes what lies inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..algorithm.geometry import connected_components

__all__ = ["Box", "Click", "InteractiveContext", "Selection", "parse_context", "select_region"]

# value keys that may carry the label of a context region
_LABEL_KEYS = ("keypointlabels", "rectanglelabels", "labels", "brushlabels", "polygonlabels", "ellipselabels",
               "bitmasklabels")


@dataclass(frozen=True)
class Click:
    """A smart keypoint: ``x``/``y`` in percent of the image."""

    x: float
    y: float
    positive: bool = True
    label: str | None = None
    from_name: str = ""
    to_name: str = ""


@dataclass(frozen=True)
class Box:
    """A smart rectangle: top-left ``x``/``y`` and ``width``/``height`` in percent."""

    x: float
    y: float
    width: float
    height: float
    positive: bool = True
    label: str | None = None
    from_name: str = ""
    to_name: str = ""


@dataclass
class InteractiveContext:
    """The annotator's input of one interactive request."""

    clicks: list[Click] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    texts: list[tuple[str, str, str]] = field(default_factory=list)  # (from_name, to_name, text)

    @property
    def has_geometry(self) -> bool:
        return bool(self.clicks or self.boxes)

    @property
    def empty(self) -> bool:
        return not (self.clicks or self.boxes or self.texts)

    @property
    def to_name(self) -> str | None:
        """The image the clicks/boxes are on (the first one's ``to_name``)."""
        for item in [*self.clicks, *self.boxes]:
            if item.to_name:
                return item.to_name
        return None

    @property
    def from_name(self) -> str | None:
        for item in [*self.clicks, *self.boxes]:
            if item.from_name:
                return item.from_name
        return None

    @property
    def label(self) -> str | None:
        """The label of the last positive click/box that has one (else of any item)."""
        items = [*self.clicks, *self.boxes]
        for item in reversed(items):
            if item.positive and item.label:
                return item.label
        for item in reversed(items):
            if item.label:
                return item.label
        return None


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _label_of(value: Mapping) -> str | None:
    for key in _LABEL_KEYS:
        labels = value.get(key)
        if isinstance(labels, str) and labels:
            return labels
        if isinstance(labels, (list, tuple)):
            for label in labels:
                if isinstance(label, str) and label:
                    return label
    return None


def _positive(item: Mapping) -> bool:
    flag = item.get("is_positive", True)  # a click without the flag is an ordinary (positive) one
    if isinstance(flag, str):
        return flag.strip().lower() not in ("false", "0", "no", "")
    return bool(flag) if flag is not None else True


def _texts(value: Mapping) -> list[str]:
    raw = value.get("text")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        return []
    return [t for t in raw if isinstance(t, str) and t.strip()]


def parse_context(context: Any) -> InteractiveContext:
    """``params.context`` of a ``/predict`` call -> :class:`InteractiveContext`.

    Reads ``keypointlabels``/``keypoint`` items as clicks, ``rectanglelabels``/``rectangle``
    items as boxes and ``textarea`` items as text prompts; anything else, and items with
    unusable coordinates, is ignored. ``None`` or a context without ``result`` gives an
    empty one.
    """
    out = InteractiveContext()
    items = context.get("result") if isinstance(context, Mapping) else None
    if not isinstance(items, list):
        return out
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("value"), Mapping):
            continue
        kind = str(item.get("type") or "").lower()
        value = item["value"]
        names = dict(from_name=str(item.get("from_name") or ""), to_name=str(item.get("to_name") or ""))
        if kind == "textarea":
            out.texts.extend((names["from_name"], names["to_name"], t.strip()) for t in _texts(value))
            continue
        x, y = _number(value.get("x")), _number(value.get("y"))
        if x is None or y is None:
            continue
        if kind in ("keypointlabels", "keypoint"):
            out.clicks.append(Click(x, y, _positive(item), _label_of(value), **names))
        elif kind in ("rectanglelabels", "rectangle"):
            w, h = _number(value.get("width")), _number(value.get("height"))
            if w is None or h is None or w <= 0 or h <= 0:
                continue
            out.boxes.append(Box(x, y, w, h, _positive(item), _label_of(value), **names))
    return out


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """What :func:`select_region` chose: ``mask`` (``[h, w]`` bool on the model-input grid),
    ``label`` (index into the labels) and ``score`` (mean label probability inside)."""

    mask: np.ndarray
    label: int
    score: float


def _cell(x: float, y: float, shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    col = int(np.clip(np.floor(x / 100.0 * w), 0, w - 1))
    row = int(np.clip(np.floor(y / 100.0 * h), 0, h - 1))
    return row, col


def _box_slices(box: Box, shape: tuple[int, int]) -> tuple[slice, slice]:
    h, w = shape
    c0 = int(np.clip(np.floor(box.x / 100.0 * w), 0, w - 1))
    r0 = int(np.clip(np.floor(box.y / 100.0 * h), 0, h - 1))
    c1 = int(np.clip(np.ceil((box.x + box.width) / 100.0 * w), c0 + 1, w))
    r1 = int(np.clip(np.ceil((box.y + box.height) / 100.0 * h), r0 + 1, h))
    return slice(r0, r1), slice(c0, c1)


def _label_map(probs: np.ndarray, label: int, threshold: float, keep: np.ndarray | None = None) -> np.ndarray:
    """Where ``label`` wins among the prompts in ``keep`` (bool ``[C + K]``, default all),
    with at least ``threshold`` of their (renormalised) probability."""
    if keep is None:
        return (probs.argmax(axis=0) == label) & (probs[label] >= threshold)
    idx = np.flatnonzero(keep)
    sub = probs[idx]
    mine = int(np.searchsorted(idx, label))
    share = sub[mine] / np.maximum(sub.sum(axis=0), 1e-12)
    return (sub.argmax(axis=0) == mine) & (share >= threshold)


def _overruled(probs: np.ndarray, n_labels: int, label: int, row: int, col: int,
               threshold: float) -> np.ndarray:
    """The label's map where the annotator says ``(row, col)`` is the label but the model
    gave the pixel to another prompt: first the label against the background prompts only
    (another label that beat it there is taken to be wrong); if a background prompt still
    wins at the pixel, the segment of the prompt that won there, now called the label (the
    model found the object's extent, not its name)."""
    if probs.shape[0] == n_labels:  # no background prompts (threshold 0): nothing to compete with
        return probs.argmax(axis=0) == int(np.argmax(probs[:, row, col]))
    keep = np.zeros(probs.shape[0], bool)
    keep[n_labels:] = True
    keep[label] = True
    at = probs[keep, row, col]
    share = float(probs[label, row, col]) / max(float(at.sum()), 1e-12)
    if share >= float(at.max()) / max(float(at.sum()), 1e-12):
        return _label_map(probs, label, min(threshold, share), keep)
    return probs.argmax(axis=0) == int(np.argmax(probs[:, row, col]))


def _component(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    if not mask[row, col]:
        return np.zeros_like(mask)
    comps = connected_components(mask)
    return comps.labels == comps.labels[row, col]


def choose_label(probs: np.ndarray, n_labels: int, clicks: Sequence[Click], boxes: Sequence[Box]) -> int:
    """Index of the label strongest at the positive clicks (sum of probabilities), or, with
    boxes only, strongest on average inside the positive boxes."""
    shape = probs.shape[1:]
    labels = probs[:n_labels]
    pos = [c for c in clicks if c.positive]
    if pos:
        score = sum(labels[:, r, c] for r, c in (_cell(k.x, k.y, shape) for k in pos))
        return int(np.argmax(score))
    pos_boxes = [b for b in boxes if b.positive] or list(boxes)
    if pos_boxes:
        score = sum(labels[:, rs, cs].mean(axis=(1, 2)) for rs, cs in (_box_slices(b, shape) for b in pos_boxes))
        return int(np.argmax(score))
    return int(np.argmax(labels.mean(axis=(1, 2))))


def select_region(probs: np.ndarray, n_labels: int, label: int | None, clicks: Sequence[Click],
                  boxes: Sequence[Box], threshold: float) -> Selection:
    """The region the clicks and boxes designate (see the module docstring).

    Args:
        probs: ``[C + K, h, w]`` probabilities of the ``C`` labels then ``K`` background
            prompts (:meth:`GEMPredictor.probabilities`).
        n_labels: ``C``.
        label: index of the label, or None to pick the strongest at the clicks/boxes.
        clicks, boxes: in percent of the image.
        threshold: the project's decision threshold.
    """
    if probs.ndim != 3 or not 0 < n_labels <= probs.shape[0]:
        raise ValueError(f"probs must be [C + K, h, w] with C = {n_labels} labels, got {probs.shape}")
    shape = probs.shape[1:]
    if label is None:
        label = choose_label(probs, n_labels, clicks, boxes)
    base = _label_map(probs, label, threshold)

    pos_boxes = [b for b in boxes if b.positive]
    in_boxes = np.zeros(shape, bool)
    for box in pos_boxes:
        in_boxes[_box_slices(box, shape)] = True
    excluded = np.zeros(shape, bool)
    for box in boxes:
        if not box.positive:
            excluded[_box_slices(box, shape)] = True

    selected = np.zeros(shape, bool)
    positives = [_cell(k.x, k.y, shape) for k in clicks if k.positive]
    for r, c in positives:
        # a click inside a positive box grows within the boxes; one outside stands alone
        area = in_boxes if in_boxes[r, c] else np.ones(shape, bool)
        mask = base if base[r, c] else _overruled(probs, n_labels, label, r, c, threshold)
        selected |= _component(mask & area, r, c)
    if not positives:
        for box in pos_boxes:
            rs, cs = _box_slices(box, shape)
            inside = np.zeros(shape, bool)
            inside[rs, cs] = True
            part = base & inside
            if not part.any():
                # the model disagrees everywhere in the box: overrule it where the label comes closest
                margin = probs[label, rs, cs] - np.delete(probs[:, rs, cs], label, axis=0).max(axis=0)
                r, c = np.unravel_index(int(np.argmax(margin)), margin.shape)
                part = _overruled(probs, n_labels, label, rs.start + r, cs.start + c, threshold) & inside
            selected |= part
    selected &= ~excluded

    for neg in (k for k in clicks if not k.positive):
        r, c = _cell(neg.x, neg.y, shape)
        if not selected[r, c]:
            continue
        part = _component(selected, r, c)
        anchors = [(pr, pc) for pr, pc in positives if part[pr, pc]]
        if not anchors:
            selected &= ~part
            continue
        rows, cols = np.nonzero(part)
        d_neg = (rows - r) ** 2 + (cols - c) ** 2
        d_pos = np.min([(rows - pr) ** 2 + (cols - pc) ** 2 for pr, pc in anchors], axis=0)
        drop = d_neg < d_pos
        selected[rows[drop], cols[drop]] = False

    score = float(probs[label][selected].mean()) if selected.any() else 0.0
    return Selection(selected, int(label), score)
