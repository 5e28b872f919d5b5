"""Label Studio labeling spec in, Label Studio prediction JSON out.

No HTTP and no model here: this module turns the project's labeling config (the XML that
Label Studio sends as ``schema`` to ``/setup`` and as ``label_config`` to ``/predict``) into
:class:`BrushTarget` objects, and turns masks back into ``brushlabels`` results.

Attributes read from the config (the same ones the official label-studio-ml-backend examples
use, so a config written for them keeps working):

- ``<BrushLabels model_skip="true">``: the whole control is skipped.
- ``<BrushLabels model_score_threshold="0.4">``: per-control score threshold
  (``score_threshold`` is accepted as the older spelling).
- ``<Label model_skip="true">``: that label gets no predictions.
- ``<Label predicted_values="tabby cat, kitten">``: comma-separated words the model should
  look for instead of the label's text. The official backends use it as a list of model class
  names that map onto one Label Studio label; GEM takes one free-text prompt per label, so the
  FIRST entry is used as the prompt and the others are ignored.

Result format (what Label Studio 1.23 stores and shows, see
``/work/shared/label-studio/captured/13_predict_response_example.json``)::

    {"result": [{"id": "3f9a0c1b7e", "from_name": "tag", "to_name": "image",
                 "type": "brushlabels", "original_width": W, "original_height": H,
                 "image_rotation": 0, "score": 0.87,
                 "value": {"format": "rle", "rle": [...], "brushlabels": ["cat"]}}],
     "score": 0.87, "model_version": "gem-..."}
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "BrushTarget",
    "LabelConfigError",
    "brush_region",
    "new_region_id",
    "parse_label_config",
    "prediction",
]

_TRUE = {"1", "true", "yes"}
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)


class LabelConfigError(ValueError):
    """The labeling config cannot be used by this backend.

    The message is meant for the Label Studio admin (it is shown when connecting the model),
    so it says what is missing or wrong in the config.
    """


@dataclass(frozen=True)
class BrushTarget:
    """One ``<BrushLabels>`` control bound to one ``<Image>`` object.

    - ``from_name``: the BrushLabels control's ``name`` (goes into each result).
    - ``to_name``: the Image object's ``name`` (goes into each result).
    - ``value_key``: the task data key holding the image URL, e.g. ``"image"`` for
      ``<Image value="$image">``: ``task["data"][value_key]``.
    - ``labels``: label strings as Label Studio stores them in results (a ``<Label>``'s
      ``alias`` when it has one, else its ``value``), in config order, ``model_skip`` ones
      removed.
    - ``prompts``: one text prompt per label, same order: the first ``predicted_values`` word
      if given, else the label's ``value`` (the text the annotator sees).
    - ``score_threshold``: the control's ``model_score_threshold`` in [0, 1], or None when
      unset (the caller then uses its default).
    """

    from_name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    prompts: tuple[str, ...]
    score_threshold: float | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.prompts):
            raise ValueError("BrushTarget needs exactly one prompt per label")


def _is_true(value: Any) -> bool:
    return value is not None and str(value).strip().lower() in _TRUE


def _parse_threshold(control_name: str, attrs: dict) -> float | None:
    raw = attrs.get("model_score_threshold")
    if raw is None or str(raw).strip() == "":
        raw = attrs.get("score_threshold")
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise LabelConfigError(
            f'<BrushLabels name="{control_name}">: model_score_threshold="{raw}" is not a number'
        ) from None
    if not (0.0 <= value <= 1.0):
        raise LabelConfigError(
            f'<BrushLabels name="{control_name}">: model_score_threshold="{raw}" '
            "must be between 0 and 1"
        )
    return value


def _prompt_for(label_tag: Any) -> str:
    attrs = label_tag.attr or {}
    for word in str(attrs.get("predicted_values") or "").split(","):
        word = word.strip()
        if word:
            return word
    # `value` is what the annotator reads; `alias` may be a code like "c1"
    return str(attrs.get("value") or label_tag.value)


def _load_interface(xml: str):
    from label_studio_sdk.label_interface import LabelInterface

    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty")
    # lxml refuses str input that carries an encoding declaration
    xml = _XML_DECLARATION.sub("", xml, count=1)
    try:
        return LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own classes, lxml's and plain Exception
        detail = str(exc).strip() or type(exc).__name__
        if "XMLSyntax" in type(exc).__name__:
            raise LabelConfigError(f"label config is not valid XML: {detail}") from None
        raise LabelConfigError(f"label config cannot be parsed: {detail}") from None


def parse_label_config(xml: str) -> list[BrushTarget]:
    """Find every ``<BrushLabels>`` control bound to an ``<Image>`` in a labeling config.

    ``xml``: the labeling config string (``<View>...</View>``).

    Returns one :class:`BrushTarget` per (BrushLabels, Image) pair, in config order. A control
    with ``model_skip="true"``, or whose labels all have ``model_skip="true"``, yields none, so
    the list can be empty for a config that is otherwise fine.

    Raises :class:`LabelConfigError` when the XML does not parse, when no BrushLabels control
    is bound to an Image (the message lists the controls that were found), or when an
    attribute we read has a bad value.
    """
    interface = _load_interface(xml)
    targets: list[BrushTarget] = []
    found: list[str] = []
    usable_pairs = 0

    for control in interface.controls or []:
        objects = {obj.name: obj for obj in (control.objects or [])}
        is_brush = (control.tag or "").lower() == "brushlabels"
        for to_name in control.to_name or []:
            obj = objects.get(to_name)
            obj_tag = (obj.tag if obj is not None else "") or ""
            problem = None
            if obj is None:
                problem = "no such object tag"
            elif obj_tag.lower() != "image":
                problem = f"<{obj_tag}>, not an <Image>"
            elif (obj.attr or {}).get("valueList"):
                problem = "image list (valueList) is not supported"
            elif not obj.value or not obj.value.startswith("$") or len(obj.value) < 2:
                problem = f'value="{obj.value}" is not a $variable'
            found.append(f"{control.tag}->{to_name}" + (f" ({problem})" if is_brush and problem else ""))
            if not is_brush or problem:
                continue

            usable_pairs += 1
            attrs = control.attr or {}
            # validate even when skipped, so a typo shows up before the admin un-skips it
            threshold = _parse_threshold(control.name, attrs)
            if _is_true(attrs.get("model_skip")):
                continue
            labels: list[str] = []
            prompts: list[str] = []
            for label, label_tag in (control.labels_attrs or {}).items():
                if _is_true((label_tag.attr or {}).get("model_skip")):
                    continue
                labels.append(label)
                prompts.append(_prompt_for(label_tag))
            if not labels:
                continue
            targets.append(
                BrushTarget(
                    from_name=control.name,
                    to_name=to_name,
                    value_key=obj.value[1:],
                    labels=tuple(labels),
                    prompts=tuple(prompts),
                    score_threshold=threshold,
                )
            )

    if usable_pairs == 0:
        listed = ", ".join(found) if found else "no control tags"
        raise LabelConfigError(
            f"label config has no <BrushLabels> control bound to an <Image>; found: {listed}"
        )
    return targets


def new_region_id() -> str:
    """A fresh region id: 10 random hex characters (40 bits, like Label Studio's own ids)."""
    return secrets.token_hex(5)


def _finite_score(score: Any, what: str) -> float:
    value = float(score)
    # NaN/inf would make the JSON reply invalid
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {score!r}")
    return value


def _mask2rle(mask: np.ndarray) -> list[int]:
    try:
        from gem_backend.brush import mask2rle
    except ModuleNotFoundError as exc:
        # gem_backend.brush is being written in parallel; only its absence falls back
        if exc.name != "gem_backend.brush":
            raise
        from label_studio_sdk.converter.brush import mask2rle
    return [int(v) for v in mask2rle(mask)]


def brush_region(
    mask: np.ndarray,
    label: str,
    target: BrushTarget,
    score: float,
    region_id: str | None = None,
) -> dict:
    """One Label Studio ``brushlabels`` result for one mask.

    - ``mask``: ``[H, W]`` uint8, 0 (background) or 255 (label); a bool mask is accepted and
      mapped False->0, True->255. H and W are the size of the image as Label Studio shows it
      (after EXIF orientation), they become ``original_height``/``original_width``.
    - ``label``: one of ``target.labels``.
    - ``score``: region confidence, usually in [0, 1].
    - ``region_id``: unique id within the prediction; a new random one when None.

    Returns ``{"id", "from_name", "to_name", "type": "brushlabels", "original_width",
    "original_height", "image_rotation": 0, "score", "value": {"format": "rle", "rle": [int,
    ...], "brushlabels": [label]}}``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty [H, W] array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8 (0 or 255) or bool, got {mask.dtype}")
    elif np.any((mask != 0) & (mask != 255)):
        # Label Studio draws the RLE value as alpha: 1..254 would show as a faint ghost
        raise ValueError("uint8 mask must only hold 0 and 255")
    if label not in target.labels:
        raise ValueError(f"label {label!r} is not one of {list(target.labels)} of {target.from_name!r}")

    height, width = mask.shape
    return {
        "id": region_id if region_id is not None else new_region_id(),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": _finite_score(score, "score"),
        "value": {
            "format": "rle",
            "rle": _mask2rle(np.ascontiguousarray(mask)),
            "brushlabels": [label],
        },
    }


def prediction(
    regions: Iterable[dict] | Sequence[dict],
    model_version: str,
    score: float | None = None,
) -> dict:
    """One task's prediction: ``{"result": [...], "score": float, "model_version": str}``.

    - ``regions``: results from :func:`brush_region`; their ids must be unique.
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
