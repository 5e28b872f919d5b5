import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from gem_backend.labelstudio.spec import BrushTarget, LabelConfigError, parse_label_config
from gem_backend.labelstudio.results import brush_region, new_region_id, prediction

CAPTURED = Path("/work/shared/label-studio/captured")
CAPTURED_CONFIG = (
    '<View>\n  <Image name="image" value="$image"/>\n  <BrushLabels name="tag" toName="image">\n'
    '    <Label value="cat"/>\n    <Label value="dog"/>\n  </BrushLabels>\n</View>'
)


def _captured_config() -> str:
    path = CAPTURED / "02_setup.json"
    if path.exists():
        return json.loads(path.read_text())["body"]["schema"]
    return CAPTURED_CONFIG  # same text, for checkouts without the shared folder


def _target(**kw) -> BrushTarget:
    args = dict(from_name="tag", to_name="image", value_key="image", labels=("cat", "dog"), prompts=("cat", "dog"))
    args.update(kw)
    return BrushTarget(**args)


# --- parse_label_config -------------------------------------------------------------


def test_captured_config():
    targets = parse_label_config(_captured_config())
    assert targets == [
        BrushTarget(
            from_name="tag", to_name="image", value_key="image",
            labels=("cat", "dog"), prompts=("cat", "dog"), score_threshold=None,
        )
    ]


def test_several_brush_controls_and_images():
    xml = """<View>
      <Image name="photo" value="$photo_url"/>
      <Image name="xray" value="$scan"/>
      <BrushLabels name="animals" toName="photo"><Label value="cat"/><Label value="dog"/></BrushLabels>
      <BrushLabels name="bones" toName="xray"><Label value="femur"/></BrushLabels>
      <BrushLabels name="both" toName="photo,xray"><Label value="text"/></BrushLabels>
      <RectangleLabels name="boxes" toName="photo"><Label value="car"/></RectangleLabels>
    </View>"""
    targets = parse_label_config(xml)
    assert [(t.from_name, t.to_name, t.value_key, t.labels) for t in targets] == [
        ("animals", "photo", "photo_url", ("cat", "dog")),
        ("bones", "xray", "scan", ("femur",)),
        ("both", "photo", "photo_url", ("text",)),
        ("both", "xray", "scan", ("text",)),
    ]


def test_nested_views_are_found():
    xml = """<View><View><Image name="img" value="$image"/></View>
      <View><BrushLabels name="b" toName="img"><View><Label value="sky"/></View></BrushLabels></View></View>"""
    (target,) = parse_label_config(xml)
    assert target.labels == ("sky",) and target.to_name == "img"


def test_predicted_values_first_word_is_the_prompt():
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image">
        <Label value="Vehicle" predicted_values=" car , truck,bus"/>
        <Label value="Person"/>
        <Label value="Tree" predicted_values=" , "/>
      </BrushLabels></View>"""
    (target,) = parse_label_config(xml)
    assert target.labels == ("Vehicle", "Person", "Tree")
    assert target.prompts == ("car", "Person", "Tree")


def test_alias_is_the_stored_label_and_value_the_prompt():
    # Label Studio stores the alias in results when a <Label> has one
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image"><Label value="Road surface" alias="road"/></BrushLabels></View>"""
    (target,) = parse_label_config(xml)
    assert target.labels == ("road",)
    assert target.prompts == ("Road surface",)


def test_model_skip_on_labels_and_controls():
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="a" toName="image">
        <Label value="cat"/><Label value="dog" model_skip="true"/><Label value="bird" model_skip="False"/>
        <Label value="fish" model_skip="1"/>
      </BrushLabels>
      <BrushLabels name="b" toName="image" model_skip="TRUE"><Label value="x"/></BrushLabels>
      <BrushLabels name="c" toName="image"><Label value="y" model_skip="yes"/></BrushLabels>
    </View>"""
    targets = parse_label_config(xml)
    assert [(t.from_name, t.labels, t.prompts) for t in targets] == [("a", ("cat", "bird"), ("cat", "bird"))]


def test_everything_skipped_gives_empty_list_not_error():
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="a" toName="image" model_skip="true"><Label value="cat"/></BrushLabels></View>"""
    assert parse_label_config(xml) == []


def test_model_score_threshold():
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="a" toName="image" model_score_threshold="0.35"><Label value="cat"/></BrushLabels>
      <BrushLabels name="b" toName="image" score_threshold="0.6"><Label value="dog"/></BrushLabels>
      <BrushLabels name="c" toName="image"><Label value="cow"/></BrushLabels>
    </View>"""
    assert [t.score_threshold for t in parse_label_config(xml)] == [0.35, 0.6, None]


@pytest.mark.parametrize("value", ["abc", "1.5", "-0.1", "nan"])
def test_bad_score_threshold(value):
    xml = f"""<View><Image name="image" value="$image"/>
      <BrushLabels name="a" toName="image" model_score_threshold="{value}"><Label value="cat"/></BrushLabels></View>"""
    with pytest.raises(LabelConfigError, match="model_score_threshold"):
        parse_label_config(xml)


def test_missing_brushlabels_names_what_was_found():
    xml = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image"><Label value="cat"/></RectangleLabels>
      <Choices name="quality" toName="image"><Choice value="ok"/></Choices></View>"""
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    message = str(err.value)
    assert "no <BrushLabels> control bound to an <Image>" in message
    assert "found: RectangleLabels->image, Choices->image" in message
    assert isinstance(err.value, ValueError)


def test_no_controls_at_all():
    with pytest.raises(LabelConfigError, match="found: no control tags"):
        parse_label_config('<View><Image name="image" value="$image"/></View>')


def test_brushlabels_bound_to_non_image():
    xml = """<View><Text name="txt" value="$text"/>
      <BrushLabels name="tag" toName="txt"><Label value="cat"/></BrushLabels></View>"""
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    assert "BrushLabels->txt (<Text>, not an <Image>)" in str(err.value)


def test_brushlabels_bound_to_missing_object_and_image_list():
    xml = """<View><Image name="pages" valueList="$pages"/>
      <BrushLabels name="a" toName="nothing"><Label value="cat"/></BrushLabels>
      <BrushLabels name="b" toName="pages"><Label value="cat"/></BrushLabels></View>"""
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(xml)
    assert "BrushLabels->nothing (no such object tag)" in str(err.value)
    assert "BrushLabels->pages (image list" in str(err.value)


def test_brushlabels_on_image_and_text_keeps_the_image():
    xml = """<View><Image name="image" value="$image"/><Text name="t" value="$t"/>
      <BrushLabels name="tag" toName="image,t"><Label value="cat"/></BrushLabels></View>"""
    assert [t.to_name for t in parse_label_config(xml)] == ["image"]


@pytest.mark.parametrize(
    "xml, message",
    [
        ("<View><Image name='image' value='$image'>", "label config is not valid XML: "),
        ("not xml at all", "label config is not valid XML: "),
        ("<View></Vew>", "label config is not valid XML: "),
        ("", "label config is empty"),
        ("   ", "label config is empty"),
    ],
)
def test_invalid_xml(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_xml_declaration_is_accepted():
    xml = '<?xml version="1.0" encoding="UTF-8"?>\n' + CAPTURED_CONFIG
    assert parse_label_config(xml)[0].labels == ("cat", "dog")


def test_brush_target_needs_one_prompt_per_label():
    with pytest.raises(ValueError):
        BrushTarget("tag", "image", "image", ("a", "b"), ("a",))


# --- results ------------------------------------------------------------------------


def _decode(region: dict) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3]


def _mask(h=48, w=64) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[5:30, 10:40] = 255
    mask[40:, 60:] = 255
    return mask


def test_brush_region_structure_and_rle_roundtrip():
    mask = _mask()
    region = brush_region(mask, "dog", _target(), 0.75, region_id="abc")
    assert set(region) == {
        "id", "from_name", "to_name", "type", "original_width", "original_height",
        "image_rotation", "score", "value",
    }
    assert region["id"] == "abc"
    assert region["from_name"] == "tag" and region["to_name"] == "image"
    assert region["type"] == "brushlabels"
    assert (region["original_width"], region["original_height"]) == (64, 48)
    assert region["image_rotation"] == 0
    assert region["score"] == 0.75 and type(region["score"]) is float
    assert region["value"]["format"] == "rle"
    assert region["value"]["brushlabels"] == ["dog"]
    assert all(type(v) is int for v in region["value"]["rle"])
    np.testing.assert_array_equal(_decode(region), mask)
    json.dumps(region)  # plain JSON types only


@pytest.mark.parametrize("shape", [(1, 1), (31, 17), (17, 31), (64, 64)])
@pytest.mark.parametrize("fill", ["random", "empty", "full"])
def test_rle_roundtrip_shapes(shape, fill):
    rng = np.random.default_rng(sum(shape))
    if fill == "random":
        mask = np.where(rng.random(shape) > 0.6, 255, 0).astype(np.uint8)
    else:
        mask = np.full(shape, 255 if fill == "full" else 0, np.uint8)
    np.testing.assert_array_equal(_decode(brush_region(mask, "cat", _target(), 0.5)), mask)


def test_uses_gem_backend_brush_when_present(monkeypatch):
    fake = types.ModuleType("gem_backend.labelstudio.brush")
    fake.mask2rle = lambda mask: [7, 7, 7]
    monkeypatch.setitem(sys.modules, "gem_backend.labelstudio.brush", fake)
    assert brush_region(_mask(), "cat", _target(), 0.5)["value"]["rle"] == [7, 7, 7]


def test_falls_back_to_sdk_encoder_without_gem_backend_brush(monkeypatch):
    from label_studio_sdk.converter.brush import mask2rle

    monkeypatch.setitem(sys.modules, "gem_backend.labelstudio.brush", None)  # import now fails
    mask = _mask(31, 17)
    assert brush_region(mask, "cat", _target(), 0.5)["value"]["rle"] == list(mask2rle(mask))


def test_bool_mask_is_accepted():
    mask = _mask()
    region = brush_region(mask > 0, "cat", _target(), 0.5)
    np.testing.assert_array_equal(_decode(region), mask)


def test_result_validates_against_the_sdk_label_interface():
    interface = LabelInterface(CAPTURED_CONFIG)
    region = brush_region(_mask(), "cat", _target(), 0.9)
    assert interface.validate_region(region)


@pytest.mark.parametrize(
    "mask, label, message",
    [
        (np.zeros((4, 4, 3), np.uint8), "cat", "shape"),
        (np.zeros((0, 4), np.uint8), "cat", "shape"),
        (np.ones((4, 4), np.float32), "cat", "uint8"),
        (np.full((4, 4), 1, np.uint8), "cat", "0 and 255"),
        (np.zeros((4, 4), np.uint8), "cow", "not one of"),
    ],
)
def test_brush_region_rejects_bad_input(mask, label, message):
    with pytest.raises(ValueError, match=message):
        brush_region(mask, label, _target(), 0.5)


def test_brush_region_rejects_nan_score():
    with pytest.raises(ValueError, match="finite"):
        brush_region(_mask(), "cat", _target(), float("nan"))


def test_region_ids_unique_and_short():
    ids = {brush_region(_mask(4, 4), "cat", _target(), 0.5)["id"] for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 10 and int(i, 16) >= 0 for i in ids)
    assert len(new_region_id()) == 10


def test_prediction_structure():
    regions = [
        brush_region(_mask(), "cat", _target(), 0.6),
        brush_region(_mask(), "dog", _target(), 0.8),
    ]
    pred = prediction(regions, "gem-v1")
    assert list(pred) == ["result", "score", "model_version"]
    assert pred["result"] == regions
    assert pred["score"] == pytest.approx(0.7)
    assert pred["model_version"] == "gem-v1"
    assert prediction(regions, "gem-v1", score=0.1)["score"] == 0.1
    json.dumps(pred)


def test_empty_prediction():
    assert prediction([], "gem-v1") == {"result": [], "score": 0.0, "model_version": "gem-v1"}
    assert prediction([], "gem-v1", score=0.9)["score"] == 0.0


def test_prediction_rejects_duplicate_ids():
    region = brush_region(_mask(), "cat", _target(), 0.6, region_id="same")
    with pytest.raises(ValueError, match="unique"):
        prediction([region, dict(region)], "v")


def test_prediction_shape_matches_captured_response():
    path = CAPTURED / "13_predict_response_example.json"
    if not path.exists():
        pytest.skip("shared captures not available")
    accepted = json.loads(path.read_text())["response"]["results"][0]
    accepted_region = accepted["result"][0]
    ours = prediction([brush_region(_mask(), "cat", _target(), 0.9)], "v")
    assert set(ours) == set(accepted)
    # Label Studio adds "origin" itself when storing
    assert set(ours["result"][0]) == set(accepted_region) - {"origin"}
    assert set(ours["result"][0]["value"]) == set(accepted_region["value"])


def test_dumps_writes_what_json_dumps_writes():
    """results.dumps (the /predict reply) takes a fast path for brush RLE lists: the text must
    parse back to the same object and equal Flask's compact sorted json.dumps."""
    import json

    from gem_backend.labelstudio.results import dumps

    rng = np.random.default_rng(0)
    region = brush_region(_mask(31, 17), "cat", _target(), 0.5)
    obj = {"results": [{"result": [region, {**region, "id": "x", "value": {**region["value"], "rle": []}}],
                        "score": 0.5, "model_version": 'v "1"'}],
           "model_version": "v1", "other": {"rle": "not a list", "list": [1, 2, 300]},
           "rle": [int(v) for v in rng.integers(0, 256, 5000)], "tricky": '"abc:0"'}
    text = dumps(obj)
    assert text == json.dumps(obj, separators=(",", ":"), sort_keys=True)
    assert json.loads(text) == obj
    assert dumps({"rle": [1, 999]}) == '{"rle":[1,999]}'  # not bytes: the plain encoder
