"""BitmaskLabels output: PNG data URLs in the format Label Studio 1.23 stores, valid under the
SDK's validator, pixel for pixel the masks the brush output gives, in bulk, /predict and clicks.

The Label Studio round trip (stored, read back, decoded) is in tests/test_e2e_bitmask.py.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from gem_backend.algorithm.segmentation import nearest_indices
from gem_backend.labelstudio.annotations import bitmask_mask
from gem_backend.labelstudio.bitmask import label_pngs
from gem_backend.labelstudio.results import bitmask_data_url, bitmask_region, prediction
from gem_backend.labelstudio.spec import BitmaskTarget, parse_labeling_config
from gem_backend.serving.service import GEMService
from test_app import decoded_mask, loaded, make_app, make_settings, setup_body  # noqa: F401
from test_interactive import HEIGHT, WIDTH, Reference, click, interactive_body, photo_uri, point_where, post  # noqa: F401

BITMASK_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BitmaskLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BitmaskLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
</View>"""
BOTH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BitmaskLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BitmaskLabels>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def rgba(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGBA"))


def target() -> BitmaskTarget:
    return BitmaskTarget(from_name="mask", to_name="image", value_key="image", labels=("cat", "dog"),
                         prompts=("cat", "dog"))


def test_config_gives_a_bitmask_target():
    (t,) = parse_labeling_config(BITMASK_CONFIG).targets
    assert t == target() and t.kind == "bitmasklabels"


def test_png_is_opaque_black_inside_transparent_outside_at_the_stretched_size():
    rng = np.random.default_rng(0)
    small = rng.random((7, 9)) > 0.5
    rows = np.array([0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 6])
    cols = np.repeat(np.arange(9), 3)[:25]
    url = bitmask_data_url(small, (rows, cols))
    pixels = rgba(url)
    full = small[rows][:, cols]
    assert pixels.shape == (11, 25, 4)
    # what the Label Studio frontend writes: black, alpha 255 inside and 0 outside
    np.testing.assert_array_equal(pixels[full], np.tile([0, 0, 0, 255], (int(full.sum()), 1)))
    np.testing.assert_array_equal(pixels[~full], np.zeros((int((~full).sum()), 4), np.uint8))
    np.testing.assert_array_equal(bitmask_mask(url, 11, 25), full)
    # without a stretch: the mask as it is; widths that are not a multiple of 8 included
    np.testing.assert_array_equal(bitmask_mask(bitmask_data_url(full)), full)


def test_label_pngs_equal_the_stretched_masks_for_any_index_maps():
    rng = np.random.default_rng(1)
    for trial in range(40):
        h, w = rng.integers(1, 9, 2)
        label_map = rng.integers(0, 3, (h, w)).astype(np.uint16)
        rows = np.sort(rng.integers(0, h, rng.integers(1, 40)))
        cols = rng.integers(0, w, rng.integers(1, 40))
        if trial % 3 == 0:
            rows = rng.permutation(rows)  # not only nearest-neighbour (sorted) maps
        for value, png in zip((0, 1, 2, 7), label_pngs(label_map, [0, 1, 2, 7], rows, cols)):
            with Image.open(io.BytesIO(png)) as img:
                pixels = np.asarray(img.convert("RGBA"))
            np.testing.assert_array_equal(pixels[..., 3] > 0, (label_map == value)[rows][:, cols])


def test_label_png_zlib_stream_is_whole_at_12_megapixels():
    """The segments, the zero-run cache and the closed-form Adler-32 make one valid zlib stream."""
    rng = np.random.default_rng(2)
    label_map = rng.integers(0, 3, (45, 60)).astype(np.uint8)
    label_map[10:30] = 0  # long zero stretches for label 1 and 2
    rows, cols = nearest_indices(45, 3000), nearest_indices(60, 4000)
    for value, png in zip((1, 2), label_pngs(label_map, [1, 2], rows, cols)):
        at = png.index(b"IDAT")
        (length,) = struct.unpack(">I", png[at - 4:at])
        raw = zlib.decompress(png[at + 4:at + 4 + length])  # checks the Adler-32
        assert len(raw) == 3000 * (4000 // 8 + 1)
        with Image.open(io.BytesIO(png)) as img:
            assert img.size == (4000, 3000)
            np.testing.assert_array_equal(np.asarray(img.convert("RGBA"))[..., 3] > 0,
                                          (label_map == value)[rows][:, cols])


def test_region_is_valid_under_the_sdk_validator_and_a_wrong_label_is_refused():
    mask = np.zeros((20, 30), np.bool_)
    mask[5:15, 3:9] = True
    region = bitmask_region(mask, "dog", target(), 0.7)
    assert region["type"] == "bitmasklabels"
    assert (region["original_width"], region["original_height"]) == (30, 20)
    assert set(region["value"]) == {"imageDataURL", "bitmasklabels"} and region["value"]["bitmasklabels"] == ["dog"]
    interface = LabelInterface(BITMASK_CONFIG)
    assert interface.validate_region(region)
    assert interface.validate_prediction(prediction([region], "v1"), return_errors=True) == []
    # the validator does check: a label outside the config fails it
    bad = dict(region, value=dict(region["value"], bitmasklabels=["horse"]))
    assert interface.validate_prediction(prediction([bad], "v1"), return_errors=True) != []
    with pytest.raises(ValueError, match="horse"):
        bitmask_region(mask, "horse", target(), 0.7)


def test_predict_gives_bitmasks_equal_to_the_brush_masks(tmp_path, loaded, photo_uri):
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    assert client.post("/setup", json=setup_body(schema=BOTH_CONFIG)).status_code == 200
    pred = post(client, interactive_body(photo_uri, None, config=BOTH_CONFIG))
    assert LabelInterface(BOTH_CONFIG).validate_prediction(pred, return_errors=True) == []
    brush = {r["value"]["brushlabels"][0]: r for r in pred["result"] if r["type"] == "brushlabels"}
    bitmask = {r["value"]["bitmasklabels"][0]: r for r in pred["result"] if r["type"] == "bitmasklabels"}
    assert set(bitmask) == set(brush) == {"cat", "dog"}  # the random model gives both labels parts here
    for label, region in bitmask.items():
        assert region["from_name"] == "mask" and region["score"] == brush[label]["score"]
        assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(bitmask_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH),
                                      decoded_mask(brush[label]) > 0)


def test_bulk_predict_tasks_gives_bitmasks_for_every_task(tmp_path, loaded, photo_uri):
    service = GEMService(make_settings(tmp_path), loaded=loaded)
    spec = service.project(BITMASK_CONFIG, None)
    tasks = [{"id": i, "data": {"image": photo_uri}} for i in (1, 2, 3)]
    results = service.predict_tasks(tasks, label_config=None, spec=spec)
    assert len(results) == 3
    ref = Reference(loaded, tmp_path, photo_uri).seg
    for pred in results:
        assert {r["type"] for r in pred["result"]} == {"bitmasklabels"}
        for region in pred["result"]:
            index = ref.labels.index(region["value"]["bitmasklabels"][0]) + 1
            np.testing.assert_array_equal(bitmask_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH),
                                          ref.label_map == index)


def test_a_click_gives_one_bitmask_of_that_object(tmp_path, loaded, photo_uri):
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    ref = Reference(loaded, tmp_path, photo_uri)
    dog = ref.probs.argmax(axis=0) == 1
    x, y = point_where(dog)
    pred = post(client, interactive_body(photo_uri, [click(x, y, "dog", from_name="kp")], config=BITMASK_CONFIG))
    assert LabelInterface(BITMASK_CONFIG).validate_prediction(pred, return_errors=True) == []
    (region,) = pred["result"]
    assert region["type"] == "bitmasklabels" and region["value"]["bitmasklabels"] == ["dog"]
    np.testing.assert_array_equal(bitmask_mask(region["value"]["imageDataURL"], HEIGHT, WIDTH),
                                  ref.full(ref.component(1, x, y)))


def test_bench_bitmask_section_gives_one_json_record():
    from gem_backend.evaluation.bench import bench_bitmask

    rec = bench_bitmask(labels=3, runs=1, size=(300, 400), small=(45, 60))
    assert rec["bench"] == "bitmask" and rec["image"] == "400x300" and 1 <= rec["labels"] <= 3
    assert rec["bitmask_png_s"] > 0 and rec["brush_rle_s"] > 0 and rec["bitmask_reply_bytes"] > 0
    json_line = __import__("json").dumps(rec)
    assert "brush_reply_bytes" in json_line
