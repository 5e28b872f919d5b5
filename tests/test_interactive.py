"""Annotator-assisted segmentation: smart-tool clicks and boxes, the image-feature cache,
TextArea prompts, and the PolygonLabels / RectangleLabels / Choices outputs.

Selection semantics are checked on synthetic probability maps with known answers; the
Label Studio path runs the Flask app around the fixed small CLIP of the golden reference
(GEM_INPUT_SIZE=112, threshold 0, like tests/test_app.py) on a real VOC photo cropped to
400 x 260, and compares with what the same model gives when asked directly.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from gem_backend.serving.feature_cache import EmbeddingCache, decode_embedding, embedding_key, encode_embedding
from gem_backend.labelstudio.interactive import Box, Click, parse_context, select_region
from gem_backend.algorithm.geometry import connected_components
from gem_backend.algorithm.segmentation import GEMPredictor, ImageEmbedding, resize_nearest
from gem_backend.serving.service import GEMService
from helpers import shared_path
from test_app import data_uri, decoded_mask, loaded, make_app, make_settings, metric, setup_body  # noqa: F401
from test_geometry import rasterize

CAPTURED_INTERACTIVE = "label-studio/captured/04_predict__interactive_annotating_with_context.json"
BRUSH_CONFIG = ('<View>\n  <Image name="image" value="$image"/>\n  <BrushLabels name="tag" toName="image">\n'
                '    <Label value="cat"/>\n    <Label value="dog"/>\n  </BrushLabels>\n</View>')
SAM_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""
SHAPES_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <Choices name="one" toName="image"><Choice value="cat"/><Choice value="dog"/></Choices>
  <Choices name="many" toName="image" choice="multiple"><Choice value="cat"/><Choice value="dog"/></Choices>
</View>"""
TEXT_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""
WIDTH, HEIGHT = 400, 260
LABELS = ["cat", "dog"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def photo_uri() -> str:
    # a photo on which the random golden model gives both labels sizeable parts (cat ~80%, dog ~20%)
    path = shared_path("data", "voc-mini", "VOC2012", "JPEGImages", "dlv3_120.jpg")
    with Image.open(path) as im:
        crop = im.convert("RGB").crop((0, 0, WIDTH, HEIGHT))
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=92)
    return data_uri(buf.getvalue(), "image/jpeg")


def click(x, y, label="cat", positive=True, from_name="tag", kind="keypointlabels") -> dict:
    value = {"x": x, "y": y, "width": 1.0}
    if label is not None:
        value["labels"] = [label]
        value[kind] = [label]
    return {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "value": value,
            "is_positive": positive, "id": f"c{x}-{y}", "from_name": from_name, "to_name": "image",
            "type": kind, "origin": "manual"}


def box(x, y, w, h, label="cat", positive=True, from_name="box") -> dict:
    item = click(x, y, label, positive, from_name, "rectanglelabels")
    item["value"].update(width=w, height=h)
    return item


def textarea(*texts, from_name="prompt") -> dict:
    return {"value": {"text": list(texts)}, "id": "t1", "from_name": from_name, "to_name": "image",
            "type": "textarea", "origin": "manual"}


def interactive_body(url: str, items: list[dict] | None, config: str = BRUSH_CONFIG, data: dict | None = None) -> dict:
    """The captured interactive /predict body with our image, config and context items."""
    body = copy.deepcopy(json.loads(shared_path(CAPTURED_INTERACTIVE).read_text())["body"])
    body["tasks"][0]["data"] = dict(data or {}, image=url)
    body["label_config"] = config
    if items is None:
        body.pop("params")
    else:
        body["params"]["context"] = {"result": items}
    return body


def post(client, body) -> dict:
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.data
    results = r.get_json()["results"]
    assert len(results) == 1
    return results[0]


def validate(config: str, pred: dict) -> None:
    assert LabelInterface(config).validate_prediction(pred, return_errors=True) == []
    ids = [region["id"] for region in pred["result"]]
    assert len(ids) == len(set(ids))


class Reference:
    """The same model asked directly: embedding, probabilities, label map at the input size."""

    def __init__(self, loaded, tmp_path, uri: str, **env):
        settings = make_settings(tmp_path / "ref", **env)
        self.service = GEMService(settings, loaded=loaded)
        self.spec = self.service.project(BRUSH_CONFIG, None)
        self.predictor = self.service.predictor(self.spec.segmentation)
        self.embedding = self.service.image_embedding(self.predictor, uri, 1, self.spec.segmentation)
        self.probs = self.predictor.probabilities(LABELS, self.embedding)
        self.seg = self.predictor.predict(LABELS, self.embedding)
        self.grid = self.probs.shape[1:]

    def cell(self, x: float, y: float) -> tuple[int, int]:
        h, w = self.grid
        return int(y / 100 * h), int(x / 100 * w)

    def component(self, label: int, x: float, y: float) -> np.ndarray:
        """The connected part of ``label``'s map around the point (threshold 0: argmax)."""
        mask = self.probs.argmax(axis=0) == label
        r, c = self.cell(x, y)
        comps = connected_components(mask)
        return comps.labels == comps.labels[r, c]

    def full(self, small: np.ndarray) -> np.ndarray:
        return resize_nearest(small.astype(np.uint8), (HEIGHT, WIDTH)).astype(bool)


def point_where(mask: np.ndarray, grid_point: tuple[int, int] | None = None) -> tuple[float, float]:
    """Percent coordinates of the centre of a pixel of ``mask`` (the given one or the first)."""
    h, w = mask.shape
    r, c = grid_point if grid_point is not None else np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    return (c + 0.5) / w * 100, (r + 0.5) / h * 100


# --------------------------------------------------------------------------- context parsing


def test_parse_the_captured_context():
    body = json.loads(shared_path(CAPTURED_INTERACTIVE).read_text())["body"]
    ctx = parse_context(body["params"]["context"])
    assert ctx.clicks == [Click(25.0, 25.0, True, "cat", "tag", "image")]
    assert (ctx.boxes, ctx.texts, ctx.label, ctx.to_name, ctx.from_name) == ([], [], "cat", "image", "tag")


def test_parse_boxes_texts_and_junk():
    ctx = parse_context({"result": [
        box(10, 20, 30, 40, "dog", positive=False),
        click(5, 5, None),
        textarea("tabby_cat", "  "),
        {"type": "keypointlabels", "value": {"x": "nan", "y": 3}},      # unusable coordinates
        {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 0, "height": 5}},
        "junk", {"type": "choices", "value": {"choices": ["cat"]}},
    ]})
    assert ctx.boxes == [Box(10, 20, 30, 40, False, "dog", "box", "image")]
    assert ctx.clicks == [Click(5, 5, True, None, "tag", "image")]
    assert ctx.texts == [("prompt", "image", "tabby_cat")]
    assert ctx.label == "dog"                    # no positive item names one: any item's label
    assert parse_context(None).empty and parse_context({"result": "x"}).empty


# --------------------------------------------------------------------------- selection (synthetic maps)


def synthetic_probs() -> np.ndarray:
    """[cat, dog, background] on a 20 x 30 grid: two cat blobs, one dog blob, background elsewhere."""
    p = np.full((3, 20, 30), 0.1)
    p[2] = 0.8
    p[0, 2:8, 2:8] = 0.9        # cat A: rows 2-7, cols 2-7
    p[0, 2:8, 20:28] = 0.9      # cat B: rows 2-7, cols 20-27
    p[1, 10:18, 10:20] = 0.9    # dog: rows 10-17, cols 10-19
    return p / p.sum(axis=0)


def pct(row: float, col: float) -> tuple[float, float]:
    """Percent (x, y) of a grid cell's centre on the 20 x 30 grid."""
    return (col + 0.5) / 30 * 100, (row + 0.5) / 20 * 100


def blob(rows, cols) -> np.ndarray:
    m = np.zeros((20, 30), bool)
    m[rows, cols] = True
    return m


CAT_A, CAT_B, DOG = blob(slice(2, 8), slice(2, 8)), blob(slice(2, 8), slice(20, 28)), blob(slice(10, 18), slice(10, 20))


def test_positive_click_selects_the_connected_part_around_it():
    sel = select_region(synthetic_probs(), 2, 0, [Click(*pct(4, 4))], [], 0.3)
    np.testing.assert_array_equal(sel.mask, CAT_A)
    assert sel.label == 0 and 0.4 < sel.score <= 1
    both = select_region(synthetic_probs(), 2, 0, [Click(*pct(4, 4)), Click(*pct(4, 25))], [], 0.3)
    np.testing.assert_array_equal(both.mask, CAT_A | CAT_B)


def test_negative_click_removes():
    probs = synthetic_probs()
    # in a part that a positive click holds: the pixels nearer the negative click go
    sel = select_region(probs, 2, 0, [Click(*pct(4, 4)), Click(*pct(4, 25)), Click(*pct(4, 22), positive=False)],
                        [], 0.3)
    np.testing.assert_array_equal(sel.mask, CAT_A | CAT_B & blob(slice(None), slice(24, 30)))
    # a box-selected part with a negative click in it is removed whole
    sel = select_region(probs, 2, 0, [Click(*pct(4, 22), positive=False)], [Box(0, 0, 100, 50)], 0.3)
    np.testing.assert_array_equal(sel.mask, CAT_A)
    # a negative click alone selects nothing
    assert not select_region(probs, 2, 0, [Click(*pct(4, 4), positive=False)], [], 0.3).mask.any()


def test_box_restricts():
    probs = synthetic_probs()
    right_half = Box(50, 0, 50, 100)
    sel = select_region(probs, 2, 0, [], [right_half], 0.3)
    np.testing.assert_array_equal(sel.mask, CAT_B)
    # a click inside a box grows within the box only
    narrow = Box(100 * 20.2 / 30, 0, 100 * 2.6 / 30, 100)      # cols 20-22
    sel = select_region(probs, 2, 0, [Click(*pct(4, 21))], [narrow], 0.3)
    np.testing.assert_array_equal(sel.mask, CAT_B & blob(slice(None), slice(20, 23)))
    # a negative box cuts
    sel = select_region(probs, 2, 0, [Click(*pct(4, 4))], [Box(0, 0, 100 * 4.8 / 30, 100, positive=False)], 0.3)
    np.testing.assert_array_equal(sel.mask, CAT_A & blob(slice(None), slice(5, 30)))


def test_no_label_takes_the_strongest_label_at_the_point():
    sel = select_region(synthetic_probs(), 2, None, [Click(*pct(12, 12))], [], 0.3)
    assert sel.label == 1
    np.testing.assert_array_equal(sel.mask, DOG)
    sel = select_region(synthetic_probs(), 2, None, [], [Box(0, 0, 40, 45)], 0.3)
    assert sel.label == 0
    np.testing.assert_array_equal(sel.mask, CAT_A)


def test_annotator_overrules_the_model():
    # "dog" on cat A: the model's segment there is taken under the annotator's label
    sel = select_region(synthetic_probs(), 2, 1, [Click(*pct(4, 4))], [], 0.3)
    assert sel.label == 1
    np.testing.assert_array_equal(sel.mask, CAT_A)


# --------------------------------------------------------------------------- the feature cache


def test_embedding_codec_and_lru_budget():
    torch.manual_seed(0)
    emb = ImageEmbedding(torch.randn(12, 8), (3, 4), (48, 64), (300, 400))
    back = decode_embedding(encode_embedding(emb))
    assert torch.equal(back.patches, emb.patches) and (back.grid, back.input_size, back.original_size) == (
        (3, 4), (48, 64), (300, 400))
    half = decode_embedding(encode_embedding(emb, "<f2"))
    assert torch.allclose(half.patches, emb.patches, rtol=1e-3, atol=1e-3)
    raw = encode_embedding(emb)
    assert decode_embedding(raw[:-4]) is None and decode_embedding(b"nope" + raw[4:]) is None
    assert decode_embedding(None) is None

    cache = EmbeddingCache(max_bytes=2 * (12 * 8 * 4 + 256))
    for name in "abc":
        cache.put(name, emb)
    assert cache.get("a") == (None, "miss") and cache.get("c")[1] == "local"
    assert cache.stats["entries"] == 2
    assert embedding_key(b"x", "ns") != embedding_key(b"x", "other") != embedding_key(b"y", "other")
    off = EmbeddingCache(max_bytes=0)
    off.put("a", emb)
    assert off.get("a")[1] == "miss"


# --------------------------------------------------------------------------- through the app


def test_captured_interactive_request_gets_that_objects_mask(tmp_path, loaded, photo_uri):
    app, _ = make_app(make_settings(tmp_path), loaded)
    client = app.test_client()
    version = client.post("/setup", json=setup_body()).get_json()["model_version"]
    ref = Reference(loaded, tmp_path, photo_uri)
    body = json.loads(shared_path(CAPTURED_INTERACTIVE).read_text())["body"]
    body["tasks"][0]["data"]["image"] = photo_uri       # the captured context as it is: cat at (25%, 25%)
    pred = post(client, body)
    assert pred["model_version"] == version
    (region,) = pred["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
    assert region["value"]["brushlabels"] == ["cat"]
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    mask = decoded_mask(region) > 0
    assert mask[int(0.25 * HEIGHT), int(0.25 * WIDTH)]
    # the random model gives that pixel to dog: the annotator's "cat" overrules it, and the
    # segment the model found there comes back under the label cat
    assert ref.probs.argmax(axis=0)[ref.cell(25, 25)] == 1
    np.testing.assert_array_equal(mask, ref.full(ref.component(1, 25.0, 25.0)))
    assert 0 < region["score"] <= 1
    validate(BRUSH_CONFIG, pred)


def test_clicks_boxes_and_labels_through_the_app(tmp_path, loaded, photo_uri):
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    ref = Reference(loaded, tmp_path, photo_uri)
    winner = ref.probs.argmax(axis=0)
    # a click without a label: the label strongest at that point
    for label in (0, 1):
        x, y = point_where(winner == label)
        (region,) = post(client, interactive_body(photo_uri, [click(x, y, None)]))["result"]
        assert region["value"]["brushlabels"] == [LABELS[label]]
        np.testing.assert_array_equal(decoded_mask(region) > 0, ref.full(ref.component(label, x, y)))
    # a negative click alone: nothing
    assert post(client, interactive_body(photo_uri, [click(30, 30, "cat", positive=False)]))["result"] == []
    # positive + negative in the same part: the negative's side of it goes
    comp = ref.component(0, *point_where(winner == 0))
    rows, cols = np.nonzero(comp)
    left = (rows[cols.argmin()], cols.min())
    right = (rows[cols.argmax()], cols.max())
    assert right[1] - left[1] >= 4
    px, py = point_where(comp, left)
    nx, ny = point_where(comp, right)
    (region,) = post(client, interactive_body(photo_uri, [click(px, py), click(nx, ny, positive=False)]))["result"]
    mask = decoded_mask(region) > 0
    assert mask[int(py / 100 * HEIGHT), int(px / 100 * WIDTH)]
    assert not mask[int(ny / 100 * HEIGHT), int(nx / 100 * WIDTH)]
    assert 0 < mask.sum() < ref.full(comp).sum() and not (mask & ~ref.full(comp)).any()
    # a box labelled dog: dog's map inside the box only
    pred = post(client, interactive_body(photo_uri, [box(50, 10, 45, 80, "dog")], config=SAM_CONFIG))
    (region,) = pred["result"]
    assert (region["from_name"], region["value"]["brushlabels"]) == ("tag", ["dog"])
    h, w = ref.grid
    inside = np.zeros((h, w), bool)
    inside[int(0.1 * h):int(np.ceil(0.9 * h)), int(0.5 * w):int(np.ceil(0.95 * w))] = True
    part = (winner == 1) & inside
    assert part.any()
    np.testing.assert_array_equal(decoded_mask(region) > 0, ref.full(part))
    validate(SAM_CONFIG, pred)


def test_sam_style_config_smart_tools_answer_on_the_brush_control(tmp_path, loaded, photo_uri):
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    r = client.post("/setup", json=setup_body(schema=SAM_CONFIG))
    assert r.status_code == 200, r.data
    pred = post(client, interactive_body(photo_uri, [click(60, 40, "dog", from_name="kp")], config=SAM_CONFIG))
    (region,) = pred["result"]
    assert (region["from_name"], region["type"], region["value"]["brushlabels"]) == ("tag", "brushlabels", ["dog"])
    validate(SAM_CONFIG, pred)
    # bulk pre-labeling: brush masks and polygons; the smart RectangleLabels gets no boxes
    bulk = post(client, interactive_body(photo_uri, None, config=SAM_CONFIG))
    types = {(reg["from_name"], reg["type"]) for reg in bulk["result"]}
    assert types == {("tag", "brushlabels"), ("poly", "polygonlabels")}
    validate(SAM_CONFIG, bulk)


def test_repeated_click_is_served_from_the_feature_cache(tmp_path, loaded, photo_uri, monkeypatch):
    calls = []
    original = GEMPredictor.set_image

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GEMPredictor, "set_image", counting)
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    first = post(client, interactive_body(photo_uri, [click(25, 25)]))
    assert len(calls) == 1
    for x, y in ((25, 25), (70, 60), (10, 90)):
        post(client, interactive_body(photo_uri, [click(x, y, "dog")]))
    post(client, interactive_body(photo_uri, None))          # bulk prediction of the same task too
    assert len(calls) == 1
    assert metric(client, "gem_image_cache_total", result="local_hits") == 4
    assert metric(client, "gem_image_cache_total", result="misses") == 1
    assert metric(client, "gem_model_forward_seconds_count") == 1
    again = post(client, interactive_body(photo_uri, [click(25, 25)]))
    assert [r["value"] for r in again["result"]] == [r["value"] for r in first["result"]]


def test_features_shared_through_redis(tmp_path, loaded, photo_uri, redis_url):
    one = make_app(make_settings(tmp_path / "a", REDIS_URL=redis_url), loaded)[0].test_client()
    two = make_app(make_settings(tmp_path / "b", REDIS_URL=redis_url), loaded)[0].test_client()
    body = interactive_body(photo_uri, [click(40, 40)])
    a = post(one, body)
    b = post(two, body)
    assert metric(two, "gem_image_cache_total", result="redis_hits") == 1
    assert metric(two, "gem_model_forward_seconds_count") == 0
    assert [r["value"] for r in a["result"]] == [r["value"] for r in b["result"]]   # bit-exact features


# --------------------------------------------------------------------------- free-text prompts


def test_textarea_prompts_are_mapped_to_labels(tmp_path, loaded, photo_uri):
    app, service = make_app(make_settings(tmp_path), loaded)
    client = app.test_client()
    assert client.post("/setup", json=setup_body(schema=TEXT_CONFIG)).status_code == 200
    encoded: list[str] = []
    original = service.encode_text

    def spy(labels, templates):
        encoded.extend(labels)
        return original(labels, templates)

    service.encode_text = spy
    # typed in the TextArea, GroundingSAM's convention: prompt_label
    pred = post(client, interactive_body(photo_uri, [textarea("tabby_cat")], config=TEXT_CONFIG))
    assert pred["result"] and {r["value"]["brushlabels"][0] for r in pred["result"]} == {"cat"}
    assert "tabby" in encoded and "cat" not in encoded
    validate(TEXT_CONFIG, pred)
    # from the task data, under the TextArea's name
    pred = post(client, interactive_body(photo_uri, None, config=TEXT_CONFIG, data={"prompt": "dog"}))
    assert {r["value"]["brushlabels"][0] for r in pred["result"]} == {"dog"}
    # a text that is no label: the label nearest to it in CLIP text space
    encoded.clear()
    pred = post(client, interactive_body(photo_uri, [textarea("a small furry animal")], config=TEXT_CONFIG))
    spec = service.project(TEXT_CONFIG, None)
    emb = original(["a small furry animal", "cat", "dog"], spec.segmentation.templates)
    nearest = LABELS[int(np.argmax(emb[1:] @ emb[0]))]
    assert {r["value"]["brushlabels"][0] for r in pred["result"]} == {nearest}
    assert "a small furry animal" in encoded
    # with a click: the text is the prompt of the click's label
    encoded.clear()
    pred = post(client, interactive_body(photo_uri, [click(30, 30, "cat"), textarea("tabby_cat")], config=TEXT_CONFIG))
    (region,) = pred["result"]
    assert region["value"]["brushlabels"] == ["cat"] and "tabby" in encoded


# --------------------------------------------------------------------------- other region types


def test_polygons_rectangles_and_choices(tmp_path, loaded, photo_uri):
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    r = client.post("/setup", json=setup_body(schema=SHAPES_CONFIG, extra_params={"polygon_tolerance": 0}))
    assert r.status_code == 200, r.data
    body = interactive_body(photo_uri, None, config=SHAPES_CONFIG)
    body["extra_params"] = {"polygon_tolerance": 0}
    pred = post(client, body)
    validate(SHAPES_CONFIG, pred)
    ref = Reference(loaded, tmp_path, photo_uri)
    small = ref.seg.input_map
    h, w = small.shape
    by_type: dict[str, list[dict]] = {}
    for region in pred["result"]:
        by_type.setdefault(region["from_name"], []).append(region)

    # polygons: one per connected part, filling back to exactly that part (tolerance 0)
    for label_index, label in enumerate(LABELS, start=1):
        comps = connected_components(small == label_index)
        polys = [p for p in by_type["poly"] if p["value"]["polygonlabels"] == [label]]
        assert len(polys) == comps.count
        painted = np.zeros((h, w), int)
        for poly in polys:
            pts = np.asarray(poly["value"]["points"]) * [w / 100, h / 100]
            part = rasterize(pts, (h, w))
            assert len(np.unique(comps.labels[part])) == 1 and comps.labels[part][0] > 0
            painted += part
            assert (poly["original_width"], poly["original_height"]) == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(painted, (small == label_index).astype(int))
        # rectangles: one per part, its bounding box in percent
        rects = sorted((r["value"]["x"], r["value"]["y"], r["value"]["width"], r["value"]["height"])
                       for r in by_type["rect"] if r["value"]["rectanglelabels"] == [label])
        expected = sorted((x0 / w * 100, y0 / h * 100, (x1 - x0) / w * 100, (y1 - y0) / h * 100)
                          for x0, y0, x1, y1 in comps.boxes.tolist())
        np.testing.assert_allclose(rects, expected, atol=1e-9)

    # choices: the present labels, or the one covering most of the image
    present = ref.seg.present
    (one,) = by_type["one"]
    (many,) = by_type["many"]
    assert one["value"]["choices"] == [max(present, key=lambda k: ref.seg.areas[k])]
    assert many["value"]["choices"] == present


def test_polygon_tolerance_and_min_area(tmp_path, loaded, photo_uri):
    client = make_app(make_settings(tmp_path, GEM_MIN_AREA="0.01"), loaded)[0].test_client()
    counts = {}
    for tol in (0, 1.0):
        body = interactive_body(photo_uri, None, config=SHAPES_CONFIG)
        body["extra_params"] = {"polygon_tolerance": tol}
        pred = post(client, body)
        validate(SHAPES_CONFIG, pred)
        polys = [r for r in pred["result"] if r["type"] == "polygonlabels"]
        counts[tol] = sum(len(p["value"]["points"]) for p in polys)
        ref = Reference(loaded, tmp_path / str(tol), photo_uri, GEM_MIN_AREA="0.01")
        small = ref.seg.input_map
        big_parts = sum(int((connected_components(small == k).areas >= np.ceil(0.01 * small.size)).sum())
                        for k in (1, 2))
        assert len(polys) == big_parts
        assert len([r for r in pred["result"] if r["type"] == "rectanglelabels"]) == big_parts
    assert counts[1.0] < counts[0]
    settings = make_settings(tmp_path)
    default = settings.model_version()
    assert settings.model_version(settings.segmentation_for({"polygon_tolerance": 0.25})) == default
    assert settings.model_version(settings.segmentation_for({"polygon_tolerance": 1})) != default


# --------------------------------------------------------------------------- config parsing


def test_parse_labeling_config_finds_every_control():
    from gem_backend.labelstudio.spec import (BrushTarget, ChoicesTarget, LabelConfigError, PolygonTarget,
                                         RectangleTarget, TextPromptTarget, parse_label_config,
                                         parse_labeling_config)

    sam = parse_labeling_config(SAM_CONFIG)
    assert [type(t) for t in sam.targets] == [BrushTarget, PolygonTarget]     # the smart box is a tool
    assert sam.smart_tools == ("kp", "box")
    assert parse_label_config(SAM_CONFIG) == [sam.targets[0]]                 # the BrushLabels-only view
    text = parse_labeling_config(TEXT_CONFIG)
    assert text.text_prompts == (TextPromptTarget("prompt", "image", "image"),)
    shapes = parse_labeling_config(SHAPES_CONFIG)
    assert [type(t) for t in shapes.targets] == [PolygonTarget, RectangleTarget, ChoicesTarget, ChoicesTarget]
    assert [getattr(t, "multiple", None) for t in shapes.targets] == [None, None, False, True]
    skipped = SHAPES_CONFIG.replace('<PolygonLabels name="poly"', '<PolygonLabels model_skip="true" name="poly"')
    assert [t.from_name for t in parse_labeling_config(skipped).targets] == ["rect", "one", "many"]
    smart_label = ('<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
                   '<Label value="cat" smart="true"/></RectangleLabels></View>')
    with pytest.raises(LabelConfigError, match=r"nothing gem-backend can predict.*<PolygonLabels>.*"
                                                r"found: RectangleLabels->image \(smart tool\)"):
        parse_labeling_config(smart_label)
    with pytest.raises(LabelConfigError, match="no <BrushLabels> control"):
        parse_label_config(SHAPES_CONFIG)


def test_click_on_a_polygon_only_project_returns_polygons(tmp_path, loaded, photo_uri):
    config = SHAPES_CONFIG.replace('<Choices name="one"', '<KeyPointLabels name="kp" toName="image" smart="true">'
                                   '<Label value="cat"/><Label value="dog"/></KeyPointLabels><Choices name="one"')
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    ref = Reference(loaded, tmp_path, photo_uri)
    x, y = point_where(ref.probs.argmax(axis=0) == 1)
    pred = post(client, interactive_body(photo_uri, [click(x, y, "dog", from_name="kp")], config=config))
    assert pred["result"] and {r["type"] for r in pred["result"]} == {"polygonlabels"}
    assert all(r["from_name"] == "poly" and r["value"]["polygonlabels"] == ["dog"] for r in pred["result"])
    h, w = ref.grid
    painted = np.zeros((h, w), bool)
    for region in pred["result"]:
        painted |= rasterize(np.asarray(region["value"]["points"]) * [w / 100, h / 100], (h, w))
    expected = ref.component(1, x, y)
    # simplified outline (0.25 % of the longer side): the same part up to a pixel along its edge
    assert (painted ^ expected).sum() <= 0.05 * expected.sum() + 2 * (h + w)
    assert painted[ref.cell(x, y)]
    validate(config, pred)
