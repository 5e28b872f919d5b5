"""The labeling spec: a project's labeling config -> what gem-backend fills.

No HTTP and no model here: this module turns the project's labeling config (the XML that
Label Studio sends as ``schema`` to ``/setup`` and as ``label_config`` to ``/predict``) into
target objects (:mod:`gem_backend.labelstudio.results` turns masks back into results).

Controls bound to an ``<Image>`` that gem-backend fills (:func:`parse_labeling_config`):

- ``<BrushLabels>`` -> :class:`BrushTarget`: one ``brushlabels`` mask per label;
- ``<BitmaskLabels>`` -> :class:`BitmaskTarget`: one ``bitmasklabels`` PNG mask per label;
- ``<PolygonLabels>`` -> :class:`PolygonTarget`: one ``polygonlabels`` polygon per connected
  part of a label's mask;
- ``<RectangleLabels>`` -> :class:`RectangleTarget`: one ``rectanglelabels`` box per
  connected part; a RectangleLabels with ``smart="true"``/``smartOnly="true"`` (or a smart
  ``<Label>``) is the annotator's smart tool, a prompt for interactive predictions, and
  gets no boxes of its own;
- ``<Choices>`` -> :class:`ChoicesTarget`: the choices whose label is present in the image;
- ``<TextArea>`` -> :class:`TextPromptTarget`: free-text prompts (not an output);
- ``<KeyPointLabels>`` is only read as a smart tool (interactive clicks).

:func:`parse_label_config` is the BrushLabels-only view that older callers use.

Attributes read from the config (the same ones the official label-studio-ml-backend examples
use, so a config written for them keeps working):

- ``<BrushLabels model_skip="true">``: the whole control is skipped.
- ``<BrushLabels model_score_threshold="0.4">``: per-control score threshold
  (``score_threshold`` is accepted as the older spelling).
- ``<Label model_skip="true">``: that label gets no predictions.
- ``<Label model_score_threshold="0.4">``: that label's pixel threshold (a pixel it wins is
  background under it), in place of the global ``threshold``; ``extra_params``
  ``label_thresholds`` override it.
- ``<Label predicted_values="tabby cat, kitten">``: comma-separated words the model should
  look for instead of the label's text. The official backends use it as a list of model class
  names that map onto one Label Studio label; GEM takes one free-text prompt per label, so the
  FIRST entry is used as the prompt and the others are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence


__all__ = [
    "BitmaskTarget",
    "BrushTarget",
    "ChoicesTarget",
    "LabelConfigError",
    "LabelTarget",
    "LabelingConfig",
    "PolygonTarget",
    "RectangleTarget",
    "SUPPORTED_CONTROLS",
    "TextPromptTarget",
    "match_label",
    "parse_label_config",
    "parse_labeling_config",
]

SUPPORTED_CONTROLS = ("<BrushLabels>, <BitmaskLabels>, <PolygonLabels>, <RectangleLabels> (a box output, not only a smart "
                      "tool) or <Choices>")

_TRUE = {"1", "true", "yes"}
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>", re.IGNORECASE)


class LabelConfigError(ValueError):
    """The labeling config cannot be used by this backend.

    The message is meant for the Label Studio admin (it is shown when connecting the model),
    so it says what is missing or wrong in the config.
    """


@dataclass(frozen=True)
class LabelTarget:
    """One labels control (``kind`` says which) bound to one ``<Image>`` object.

    - ``from_name``: the control's ``name`` (goes into each result).
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
    - ``label_thresholds``: ``(label, threshold)`` of the ``<Label>``s that carry their own
      ``model_score_threshold`` (a pixel threshold, not a region one).
    """

    from_name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    prompts: tuple[str, ...]
    score_threshold: float | None = None
    label_thresholds: tuple[tuple[str, float], ...] = ()

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.prompts):
            raise ValueError(f"{type(self).__name__} needs exactly one prompt per label")


@dataclass(frozen=True)
class BrushTarget(LabelTarget):
    """A ``<BrushLabels>`` control on an ``<Image>``: one ``brushlabels`` mask per label."""

    kind: ClassVar[str] = "brushlabels"


@dataclass(frozen=True)
class BitmaskTarget(LabelTarget):
    """A ``<BitmaskLabels>`` control on an ``<Image>``: one ``bitmasklabels`` mask per label,
    a PNG data URL at the image's size (Label Studio 1.23)."""

    kind: ClassVar[str] = "bitmasklabels"


@dataclass(frozen=True)
class PolygonTarget(LabelTarget):
    """A ``<PolygonLabels>`` control on an ``<Image>``: a polygon per part of a label's mask."""

    kind: ClassVar[str] = "polygonlabels"


@dataclass(frozen=True)
class RectangleTarget(LabelTarget):
    """A ``<RectangleLabels>`` control on an ``<Image>``: a box per part of a label's mask."""

    kind: ClassVar[str] = "rectanglelabels"


@dataclass(frozen=True)
class ChoicesTarget(LabelTarget):
    """A ``<Choices>`` control on an ``<Image>``: ``labels`` are its choices; ``multiple``
    when ``choice="multiple"`` (every present choice), else the single strongest one."""

    multiple: bool = False
    kind: ClassVar[str] = "choices"


@dataclass(frozen=True)
class TextPromptTarget:
    """A ``<TextArea>`` bound to an ``<Image>``: the annotator's free-text prompts.

    ``value_key`` is the image's task data key; ``from_name`` (the TextArea's name) is also
    the task data key a prompt may come in (``task["data"][from_name]``)."""

    from_name: str
    to_name: str
    value_key: str


@dataclass(frozen=True)
class LabelingConfig:
    """What :func:`parse_labeling_config` finds.

    - ``targets``: the output controls (brush, bitmask, polygon, rectangle, choices targets), in
      config order, ``model_skip`` ones removed.
    - ``text_prompts``: TextAreas bound to an Image.
    - ``smart_tools``: names of the KeyPointLabels/RectangleLabels smart tools.
    """

    targets: tuple[LabelTarget, ...]
    text_prompts: tuple[TextPromptTarget, ...] = ()
    smart_tools: tuple[str, ...] = ()


def _is_true(value: Any) -> bool:
    return value is not None and str(value).strip().lower() in _TRUE


def _parse_threshold(control_name: str, attrs: dict, tag: str = "BrushLabels") -> float | None:
    raw = attrs.get("model_score_threshold")
    if raw is None or str(raw).strip() == "":
        raw = attrs.get("score_threshold")
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise LabelConfigError(
            f'<{tag} name="{control_name}">: model_score_threshold="{raw}" is not a number'
        ) from None
    if not (0.0 <= value <= 1.0):
        raise LabelConfigError(
            f'<{tag} name="{control_name}">: model_score_threshold="{raw}" '
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


_TARGET_CLASSES: dict[str, type[LabelTarget]] = {
    "brushlabels": BrushTarget,
    "bitmasklabels": BitmaskTarget,
    "polygonlabels": PolygonTarget,
    "rectanglelabels": RectangleTarget,
    "choices": ChoicesTarget,
}


def _image_problem(obj: Any, to_name: str) -> str | None:
    """Why ``obj`` (the object a control's toName names) cannot be predicted on, or None."""
    obj_tag = (obj.tag if obj is not None else "") or ""
    if obj is None:
        return "no such object tag"
    if obj_tag.lower() != "image":
        return f"<{obj_tag}>, not an <Image>"
    if (obj.attr or {}).get("valueList"):
        return "image list (valueList) is not supported"
    if not obj.value or not obj.value.startswith("$") or len(obj.value) < 2:
        return f'value="{obj.value}" is not a $variable'
    return None


def _is_smart_tool(control: Any) -> bool:
    attrs = control.attr or {}
    if _is_true(attrs.get("smart")) or _is_true(attrs.get("smartOnly")) or _is_true(attrs.get("smartonly")):
        return True
    return any(_is_true((tag.attr or {}).get("smart")) for tag in (control.labels_attrs or {}).values())


def _walk(xml: str, kinds: Sequence[str]) -> tuple[list[LabelTarget], list[TextPromptTarget], list[str],
                                                  list[str], int]:
    """Targets of the control tags in ``kinds`` (lower case), TextAreas, smart tools, the
    ``found`` listing for messages and the number of usable (control, image) pairs."""
    interface = _load_interface(xml)
    targets: list[LabelTarget] = []
    texts: list[TextPromptTarget] = []
    smart: list[str] = []
    found: list[str] = []
    usable_pairs = 0

    for control in interface.controls or []:
        objects = {obj.name: obj for obj in (control.objects or [])}
        tag = (control.tag or "").lower()
        is_smart = tag in ("keypointlabels", "rectanglelabels") and _is_smart_tool(control)
        if is_smart and control.name not in smart:
            smart.append(control.name)
        is_output = tag in kinds and not (tag == "rectanglelabels" and is_smart)
        for to_name in control.to_name or []:
            obj = objects.get(to_name)
            problem = _image_problem(obj, to_name)
            note = ""
            if is_output and problem:
                note = f" ({problem})"
            elif tag == "rectanglelabels" and is_smart and "rectanglelabels" in kinds and not problem:
                note = " (smart tool)"
            found.append(f"{control.tag}->{to_name}{note}")
            if tag == "textarea" and not problem:
                texts.append(TextPromptTarget(control.name, to_name, obj.value[1:]))
            if not is_output or problem:
                continue

            usable_pairs += 1
            attrs = control.attr or {}
            # validate even when skipped, so a typo shows up before the admin un-skips it
            threshold = _parse_threshold(control.name, attrs, control.tag)
            if _is_true(attrs.get("model_skip")):
                continue
            labels: list[str] = []
            prompts: list[str] = []
            label_thresholds: list[tuple[str, float]] = []
            for label, label_tag in (control.labels_attrs or {}).items():
                if _is_true((label_tag.attr or {}).get("model_skip")):
                    continue
                labels.append(label)
                prompts.append(_prompt_for(label_tag))
                own = (label_tag.attr or {}).get("model_score_threshold")
                if own is not None and str(own).strip():
                    value = _parse_threshold(f"{control.name}/{label}", {"model_score_threshold": own}, "Label")
                    if value >= 1.0:
                        raise LabelConfigError(f'<Label value="{label}">: model_score_threshold="{own}" must be under 1')
                    label_thresholds.append((label, value))
            if not labels:
                continue
            cls = _TARGET_CLASSES[tag]
            extra = {"multiple": str(attrs.get("choice") or "").lower() == "multiple"} if cls is ChoicesTarget else {}
            targets.append(cls(from_name=control.name, to_name=to_name, value_key=obj.value[1:],
                               labels=tuple(labels), prompts=tuple(prompts), score_threshold=threshold,
                               label_thresholds=tuple(label_thresholds), **extra))
    return targets, texts, smart, found, usable_pairs


def parse_label_config(xml: str) -> list[BrushTarget]:
    """Find every ``<BrushLabels>`` control bound to an ``<Image>`` in a labeling config.

    ``xml``: the labeling config string (``<View>...</View>``).

    Returns one :class:`BrushTarget` per (BrushLabels, Image) pair, in config order. A control
    with ``model_skip="true"``, or whose labels all have ``model_skip="true"``, yields none, so
    the list can be empty for a config that is otherwise fine.

    Raises :class:`LabelConfigError` when the XML does not parse, when no BrushLabels control
    is bound to an Image (the message lists the controls that were found), or when an
    attribute we read has a bad value.

    :func:`parse_labeling_config` also finds the other controls gem-backend can fill.
    """
    targets, _, _, found, usable_pairs = _walk(xml, ("brushlabels",))
    if usable_pairs == 0:
        listed = ", ".join(found) if found else "no control tags"
        raise LabelConfigError(
            f"label config has no <BrushLabels> control bound to an <Image>; found: {listed}"
        )
    return [t for t in targets if isinstance(t, BrushTarget)]


def parse_labeling_config(xml: str) -> LabelingConfig:
    """Every control of a labeling config that gem-backend fills or reads.

    Returns a :class:`LabelingConfig`: the output targets (BrushLabels, BitmaskLabels, PolygonLabels,
    RectangleLabels that are not smart tools, Choices; each bound to an Image), the TextArea
    prompt sources and the smart tools. ``model_skip`` works as in
    :func:`parse_label_config`, so the targets may be empty for a config that is fine.

    Raises :class:`LabelConfigError` when the XML does not parse, when no supported output
    control is bound to an Image (the message lists what is supported and what was found),
    or when an attribute we read has a bad value.
    """
    targets, texts, smart, found, usable_pairs = _walk(xml, tuple(_TARGET_CLASSES))
    if usable_pairs == 0:
        listed = ", ".join(found) if found else "no control tags"
        raise LabelConfigError(
            f"label config has nothing gem-backend can predict: it needs a {SUPPORTED_CONTROLS} "
            f"control bound to an <Image>; found: {listed}"
        )
    return LabelingConfig(tuple(targets), tuple(texts), tuple(smart))


def match_label(name: Any, target: LabelTarget) -> str | None:
    """The label of ``target`` that ``name`` (e.g. a smart tool's label, a prompt suffix)
    stands for: equal to a label (alias or value) or to a label's prompt, first exactly,
    then ignoring case and surrounding spaces; None when nothing matches."""
    if not isinstance(name, str):
        return None
    for label in target.labels:
        if name == label:
            return label
    for label, prompt in zip(target.labels, target.prompts):
        if name == prompt:
            return label
    folded = name.strip().casefold()
    for label, prompt in zip(target.labels, target.prompts):
        if folded in (label.strip().casefold(), prompt.strip().casefold()):
            return label
    return None
