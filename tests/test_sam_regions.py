"""SAM 2 regions: Meta's package built with random weights on CPU, painted into instance maps,
encoded compactly, cached beside the image features (in process and in Redis) and reused by
re-predictions, threshold changes and clicks; the region vote in /predict; settings, /setup
errors and the offline message for missing SAM 2 weights."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest

import gem_backend
from gem_backend import paint_regions, vote_regions
from gem_backend.algorithm.sam import (SAM2_MODELS, RegionGenerator, RegionsUnavailable, decode_regions,
                                       encode_regions, load_sam2)
from gem_backend.algorithm.segmentation import GEMPredictor, resize_nearest
from gem_backend.serving.feature_cache import RegionCache, regions_namespace
from gem_backend.serving.service import GEMService
from gem_backend.settings import Settings, SettingsError
from test_app import loaded, make_app, make_settings, setup_body  # noqa: F401
from test_interactive import BRUSH_CONFIG, click, interactive_body, post
from test_methods_serving import jpeg_uri, photo

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sam2") is None,
                                reason="the sam2 extra is not installed (bash scripts/setup.sh --test installs it)")


@pytest.fixture(scope="module")
def tiny_sam():
    """SAM 2.1 hiera tiny from the package's own config, random weights, on CPU."""
    return load_sam2("hiera_tiny", "none", device="cpu")


# --------------------------------------------------------------------------- the package, on CPU
def test_sam2_tiny_with_random_weights_generates_masks_on_cpu_and_they_are_painted(tiny_sam):
    assert importlib.util.find_spec("sam2._C") is None  # built without the CUDA extension
    assert gem_backend.load_sam2 is load_sam2 and gem_backend.RegionGenerator is RegionGenerator
    assert tiny_sam.device.type == "cpu" and tiny_sam.weights_id == "random"
    assert all(p.device.type == "cpu" for p in tiny_sam.model.parameters())
    # thresholds 0 so random weights keep masks; max_side 32: masks at 32 x 24, not 64 x 48
    gen = RegionGenerator(tiny_sam, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_side=32)
    assert gen.generator.predictor._transforms.max_hole_area == 0  # the step that needs sam2._C is off
    image = photo(64, 48)
    masks = gen.masks(image)
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (24, 32) and len(masks) >= 1
    regions = gen.instance_map(image)
    assert regions.dtype == np.int64 and regions.shape == (24, 32)
    np.testing.assert_array_equal(regions, paint_regions(masks))
    assert set(np.unique(regions)) <= set(range(len(masks) + 1)) and regions.max() >= 1


def test_corrclip_generator_settings_are_the_defaults(tiny_sam):
    gen = RegionGenerator(tiny_sam)
    g = gen.generator
    assert (len(g.point_grids[0]), g.pred_iou_thresh, g.stability_score_thresh, g.multimask_output) == (64, 0.4, 0.4,
                                                                                                        False)
    with pytest.raises(ValueError, match=r"regions_points must be an integer in \[1, 64\]"):
        RegionGenerator(tiny_sam, points_per_side=0)
    with pytest.raises(ValueError, match=r"regions_iou must be in \[0, 1\]"):
        RegionGenerator(tiny_sam, pred_iou_thresh=1.5)


# --------------------------------------------------------------------------- weights
def test_missing_sam2_weights_offline_fail_fast_with_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(RegionsUnavailable) as err:
        load_sam2("hiera_tiny", "hub", device="cpu", cache_dir=str(tmp_path))
    assert time.perf_counter() - started < 8
    msg = str(err.value)
    assert "facebook/sam2.1-hiera-tiny" in msg and "sam2.1_hiera_tiny.pt" in msg and "HF_HUB_OFFLINE" in msg
    assert "GEM_REGIONS_PRETRAINED" in msg
    with pytest.raises(RegionsUnavailable, match="not found"):
        load_sam2("hiera_tiny", str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(RegionsUnavailable, match="hiera_large"):
        load_sam2("hiera_huge", "none")


def test_a_weights_file_loads_and_names_the_weights(tmp_path, tiny_sam):
    import torch

    path = tmp_path / "sam2-tiny.pt"
    torch.save({"model": tiny_sam.model.state_dict()}, path)  # the layout Meta publishes
    again = load_sam2("hiera_tiny", str(path), device="cpu")
    assert again.weights_id.startswith("sam2-tiny-")
    first = next(iter(tiny_sam.model.state_dict().values()))
    assert torch.equal(next(iter(again.model.state_dict().values())), first)


# --------------------------------------------------------------------------- compact encoding and caches
@pytest.mark.parametrize("top, width", [(0, 1), (255, 1), (256, 2), (70000, 4)])
def test_regions_encode_to_the_smallest_unsigned_type_and_back(top, width):
    rng = np.random.default_rng(0)
    regions = rng.integers(0, top + 1, size=(37, 53)).astype(np.int64)
    regions[0, 0] = top
    raw = encode_regions(regions)
    assert raw[12] == width
    back = decode_regions(raw)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, regions)
    assert decode_regions(raw[:-3]) is None and decode_regions(b"junk" * 10) is None and decode_regions(None) is None


def test_painted_maps_are_compact():
    masks = np.zeros((5, 768, 1024), bool)
    for k in range(5):
        masks[k, 100 * k:100 * k + 300, 50 * k:50 * k + 400] = True
    raw = encode_regions(paint_regions(masks))
    assert len(raw) < 8_000  # 768 x 1024 ids in a few KB


def test_regions_cache_round_trips_through_redis(redis_url):
    regions = paint_regions(np.eye(6, dtype=bool)[:, None, :].repeat(4, axis=1))
    writer = RegionCache(redis_url, ttl=60)
    writer.put("k1", regions)
    reader = RegionCache(redis_url, ttl=60)  # another process: nothing local
    got, where = reader.get("k1")
    assert where == "redis"
    np.testing.assert_array_equal(got, regions)
    again, where = reader.get("k1")
    assert where == "local" and np.array_equal(again, regions)
    assert reader.get("other") == (None, "miss")
    import redis

    client = redis.Redis.from_url(redis_url)
    assert 0 < client.ttl("gem:regions:k1") <= 60 and len(client.get("gem:regions:k1")) < 100


# --------------------------------------------------------------------------- settings
def test_regions_settings_from_env_and_extra_params_and_the_model_version():
    s = Settings.from_env({"GEM_REGIONS": "sam2", "GEM_REGIONS_MODEL": "hiera_tiny", "GEM_REGIONS_POINTS": "4",
                           "GEM_REGIONS_IOU": "0.5", "GEM_REGIONS_STABILITY": "0.6", "GEM_REGIONS_PRETRAINED": "none"})
    seg = s.segmentation
    assert (seg.regions, seg.regions_model, seg.regions_points, seg.regions_iou, seg.regions_stability) == (
        "sam2", "hiera_tiny", 4, 0.5, 0.6)
    base = Settings()
    assert base.segmentation.regions == "none" and base.segmentation.regions_model == "hiera_large"
    v0 = base.model_version()
    # regions off: its options change nothing, and the version is the one without them
    assert base.model_version(base.segmentation_for({"regions": "none", "regions_points": 16})) == v0
    on = base.segmentation_for({"regions": "sam2"})
    versions = {v0, base.model_version(on), base.model_version(base.segmentation_for({"regions": "sam2",
                                                                                      "regions_points": 16})),
                base.replace(regions_pretrained="none").model_version(on)}
    assert len(versions) == 4
    # the regions cache is keyed by SAM 2's options only: a threshold change reuses it
    assert regions_namespace(base, on) == regions_namespace(base, base.segmentation_for({"regions": "sam2",
                                                                                         "threshold": 0.7}))
    assert regions_namespace(base, on) != regions_namespace(base, base.segmentation_for({"regions": "sam2",
                                                                                         "regions_iou": 0.7}))


@pytest.mark.parametrize("env, words", [
    ({"GEM_REGIONS": "sam3"}, ["GEM_REGIONS", "none", "sam2"]),
    ({"GEM_REGIONS_MODEL": "hiera_xl"}, ["GEM_REGIONS_MODEL", "hiera_tiny", "hiera_small", "hiera_base_plus",
                                         "hiera_large"]),
    ({"GEM_REGIONS_POINTS": "0"}, ["GEM_REGIONS_POINTS", "[1, 64]"]),
    ({"GEM_REGIONS_IOU": "2"}, ["GEM_REGIONS_IOU", "[0, 1]"]),
])
def test_bad_regions_settings_name_what_is_valid(env, words):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_setup_rejects_bad_regions_options_with_the_valid_ones(tmp_path):
    app, service = make_app(make_settings(tmp_path))
    client = app.test_client()
    for params, words in (({"regions": "slic"}, ["none", "sam2"]),
                          ({"regions": "sam2", "regions_model": "vit_h"}, list(SAM2_MODELS)),
                          ({"regions": "sam2", "regions_stability": -1}, ["regions_stability", "[0, 1]"])):
        r = client.post("/setup", json=setup_body(extra_params=params))
        assert r.status_code == 400, params
        assert all(w in r.get_json()["error"] for w in words), r.get_json()
    ok = client.post("/setup", json=setup_body(extra_params={"regions": "sam2", "regions_model": "hiera_tiny"}))
    assert ok.status_code == 200 and service.model_state == "not loaded"


# --------------------------------------------------------------------------- serving
class StandInRegions:
    """A region generator: one region over all but the first row (id 0, unsegmented)."""

    def __init__(self):
        self.calls = 0

    def instance_map(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        out = np.ones(image.shape[:2], np.int64)
        out[:1] = 0
        return out


def without_ids(pred: dict) -> list:
    return [{k: v for k, v in r.items() if k != "id"} for r in pred["result"]]


def served_labels(pred: dict) -> set:
    return {lab for r in pred["result"] for lab in r["value"]["brushlabels"]}


def test_regions_are_voted_in_predict_and_computed_once_per_image(tmp_path, loaded, monkeypatch):
    # min_area 3%: what the one unsegmented row (1.25%) keeps of another label is dropped
    settings = make_settings(tmp_path, GEM_REGIONS="sam2", GEM_REGIONS_PRETRAINED="none", GEM_MIN_AREA="0.03")
    service = GEMService(settings, loaded=loaded)
    stand_in = StandInRegions()
    monkeypatch.setattr(service, "region_generator", lambda seg: stand_in)
    tasks = [{"id": 1, "data": {"image": jpeg_uri(photo(120, 80))}}]
    plain = GEMService(make_settings(tmp_path, GEM_MIN_AREA="0.03"), loaded=loaded).predict_tasks(tasks, BRUSH_CONFIG)[0]
    assert served_labels(plain) == {"cat", "dog"}  # without regions both labels are there
    [first] = service.predict_tasks(tasks, BRUSH_CONFIG)
    # with one region over the image, its majority label takes it
    assert len(served_labels(first)) == 1 and first["model_version"] != plain["model_version"]
    [again] = service.predict_tasks(tasks, BRUSH_CONFIG)
    [other] = service.predict_tasks(tasks, BRUSH_CONFIG, {"threshold": 0.01})
    assert without_ids(again) == without_ids(first) and other["model_version"] != first["model_version"]
    assert stand_in.calls == 1  # a re-prediction and a threshold change reuse the cached regions
    # a fresh process (the in-process caches empty) with Redis would also not run it: see the Redis test


def test_the_vote_is_on_the_small_label_map(loaded):
    predictor = GEMPredictor(loaded, make_settings("/nonexistent").segmentation)
    emb = predictor.set_image(photo(120, 80))
    plain = predictor.predict(["cat", "dog"], emb)
    regions = np.zeros((40, 60), np.int64)
    regions[:, 30:] = 1
    regions[20:, :30] = 2
    voted = predictor.predict(["cat", "dog"], emb, regions=regions)
    small = plain.input_map
    expected = vote_regions(small, resize_nearest(regions, small.shape))  # nearest onto the small map
    np.testing.assert_array_equal(voted.input_map, expected)
    assert not np.array_equal(voted.input_map, small)
    assert sum(voted.areas.values()) == pytest.approx(1.0)  # areas after the vote (threshold 0: all labelled)


def test_clicks_reuse_the_cached_regions_and_snap_to_them(tmp_path, loaded, monkeypatch):
    settings = make_settings(tmp_path, GEM_REGIONS="sam2", GEM_REGIONS_PRETRAINED="none")
    app, service = make_app(settings, loaded=loaded)
    stand_in = StandInRegions()
    monkeypatch.setattr(service, "region_generator", lambda seg: stand_in)
    uri = jpeg_uri(photo(120, 80))
    client = app.test_client()
    post(client, interactive_body(uri, None))
    clicked = post(client, interactive_body(uri, [click(50, 50, "cat")]))
    assert stand_in.calls == 1  # the click used the regions of the first prediction
    assert [r["value"]["brushlabels"] for r in clicked["result"]] == [["cat"]]


def test_sam2_runs_once_per_image_through_the_real_package(tmp_path, loaded, monkeypatch):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    settings = make_settings(tmp_path, GEM_REGIONS="sam2", GEM_REGIONS_MODEL="hiera_tiny",
                             GEM_REGIONS_PRETRAINED="none", GEM_REGIONS_POINTS="2", GEM_REGIONS_IOU="0",
                             GEM_REGIONS_STABILITY="0")
    service = GEMService(settings, loaded=loaded)
    calls = []
    original = SAM2AutomaticMaskGenerator.generate
    monkeypatch.setattr(SAM2AutomaticMaskGenerator, "generate",
                        lambda self, image: calls.append(image.shape) or original(self, image))
    tasks = [{"id": 1, "data": {"image": jpeg_uri(photo(96, 64))}}]
    [first] = service.predict_tasks(tasks, BRUSH_CONFIG)
    [second] = service.predict_tasks(tasks, BRUSH_CONFIG)
    assert calls == [(64, 96, 3)] and without_ids(first) == without_ids(second) and first["result"]
    assert service.region_cache.stats["local_hits"] == 1


# --------------------------------------------------------------------------- eval
def eval_args(out, *extra) -> list[str]:
    from test_evaluation import VOC_MINI, _model_args

    return ["eval", "--dataset", "voc21", "--root", str(VOC_MINI), "--input-size", "112", "--limit", "2",
            "--out", str(out), "--save-predictions", str(out / "pred")] + _model_args() + list(extra)


def test_eval_votes_in_the_regions_after_decide_and_fingerprints_them(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from gem_backend import cli
    from gem_backend.evaluation import harness

    stand_in = StandInRegions()
    seen = []
    monkeypatch.setattr(harness, "region_generator_for", lambda cfg, loaded: seen.append(cfg) or stand_in)
    assert cli.main(eval_args(tmp_path / "plain")) == 0 and stand_in.calls == 0
    assert cli.main(eval_args(tmp_path / "voted", "--regions", "sam2", "--regions-model", "hiera_tiny",
                              "--regions-points", "4")) == 0
    assert stand_in.calls == 2 and (seen[0].regions_model, seen[0].regions_points) == ("hiera_tiny", 4)
    for png in sorted((tmp_path / "plain" / "pred").glob("*.png")):
        plain = np.array(Image.open(png))
        voted = np.array(Image.open(tmp_path / "voted" / "pred" / png.name))
        regions = np.ones(plain.shape, np.int64)
        regions[:1] = 0
        np.testing.assert_array_equal(voted, vote_regions(plain, regions))  # at the original size
        assert len(np.unique(voted[1:])) == 1
    run = json.loads((tmp_path / "voted" / "run.json").read_text())["fingerprint"]
    assert run["regions"] == dict(kind="sam2", model="hiera_tiny", weights="facebook/sam2.1-hiera-tiny", points=4,
                                  iou=0.4, stability=0.4)
    assert "regions" not in json.loads((tmp_path / "plain" / "run.json").read_text())["fingerprint"]
    # the same folder with regions off is another run: refused
    assert cli.main(eval_args(tmp_path / "voted")) == 2
    assert "regions" in capsys.readouterr().err


def test_eval_regions_errors_and_offline_sam2_weights(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from gem_backend import cli

    assert cli.main(eval_args(tmp_path / "a", "--regions", "sam2", "--regions-points", "0")) == 2
    assert "regions_points" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    started = time.perf_counter()
    assert cli.main(eval_args(tmp_path / "b", "--regions", "sam2", "--regions-model", "hiera_tiny")) == 2
    assert time.perf_counter() - started < 20  # the GEM model loads too; SAM 2 fails at once
    err = capsys.readouterr().err
    assert "facebook/sam2.1-hiera-tiny" in err and "HF_HUB_OFFLINE" in err


def test_bulk_streams_compute_regions_once_per_image_and_share_them_through_redis(tmp_path, loaded, monkeypatch,
                                                                                 redis_url):
    settings = make_settings(tmp_path, GEM_REGIONS="sam2", GEM_REGIONS_PRETRAINED="none", GEM_MIN_AREA="0.03",
                             REDIS_URL=redis_url)
    a, b = jpeg_uri(photo(120, 80)), jpeg_uri(photo(90, 60))
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate([a, b, a], start=1)]
    service = GEMService(settings, loaded=loaded)
    stand_in = StandInRegions()
    monkeypatch.setattr(service, "region_generator", lambda seg: stand_in)
    preds = list(service.predict_stream(tasks, service.project(BRUSH_CONFIG)))  # what the bulk jobs run
    assert stand_in.calls == 2 and all(len(served_labels(p)) == 1 for _, p in preds)
    # another worker: no in-process caches, the regions come from Redis
    other = GEMService(settings, loaded=loaded)
    fresh = StandInRegions()
    monkeypatch.setattr(other, "region_generator", lambda seg: fresh)
    again = other.predict_tasks(tasks, BRUSH_CONFIG)
    assert fresh.calls == 0 and other.region_cache.stats["redis_hits"] == 2
    assert [without_ids(p) for p in again] == [without_ids(p) for _, p in preds]


def test_predict_answers_503_naming_the_missing_sam2_weights_offline(tmp_path, loaded, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    settings = make_settings(tmp_path, GEM_REGIONS="sam2", GEM_REGIONS_MODEL="hiera_tiny",
                             MODEL_DIR=str(tmp_path / "models"))
    app, service = make_app(settings, loaded=loaded)
    started = time.perf_counter()
    r = app.test_client().post("/predict", json=interactive_body(jpeg_uri(photo(60, 40)), None))
    assert time.perf_counter() - started < 8
    assert r.status_code == 503
    assert "facebook/sam2.1-hiera-tiny" in r.get_data(as_text=True)
