"""The methods, PAMR and sliding windows as serving, the CLI and the evaluation use them:
settings and extra_params (errors named), model_version, the image-feature cache, the
predictor, /setup and /predict (also interactive clicks), and serving vs eval windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gem_backend import create_method, pamr
from gem_backend.algorithm.segmentation import GEMPredictor, SegmentationSettings, model_input_size, uses_windows
from gem_backend.algorithm.windows import sliding_windows, window_tokens
from gem_backend.evaluation.harness import (EvalError, Protocol, Segmenter, parse_variants, run_comparison,
                                            EvalConfig)
from gem_backend.serving.feature_cache import decode_embedding, encode_embedding, image_namespace
from gem_backend.serving.service import GEMService
from gem_backend.settings import Settings, SettingsError
from helpers import shared_path
from test_app import data_uri, loaded, make_app, make_settings, setup_body  # noqa: F401
from test_interactive import BRUSH_CONFIG, click, interactive_body, post, validate

TEMPLATE = ("a photo of a {}.",)
LABELS = ["cat", "dog"]


def photo(width: int, height: int) -> np.ndarray:
    path = shared_path("data", "voc-mini", "VOC2012", "JPEGImages", "dlv3_120.jpg")
    with Image.open(path) as im:
        return np.array(im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))


def jpeg_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=92)
    return data_uri(buf.getvalue(), "image/jpeg")


# --------------------------------------------------------------------------- settings
def test_method_and_refine_from_the_environment():
    s = Settings.from_env({"GEM_METHOD": "NACLIP", "GEM_METHOD_OPTIONS": '{"gaussian_std": 3}',
                           "GEM_REFINE": "pamr", "GEM_REFINE_DILATIONS": "1,2,4", "GEM_REFINE_ITERATIONS": "5"})
    seg = s.segmentation
    assert seg.method == "naclip" and seg.refine == "pamr"
    # complete, normalised options: the defaults filled in
    assert dict(seg.method_options) == {"arch": "reduced", "attn_strategy": "naclip", "gaussian_std": 3.0}
    assert seg.refine_dilations == (1, 2, 4) and seg.refine_iterations == 5


@pytest.mark.parametrize("env, words", [
    ({"GEM_METHOD": "segformer"}, ["GEM_METHOD", "gem", "sclip", "clearclip", "naclip", "clip"]),
    ({"GEM_METHOD": "naclip", "GEM_METHOD_OPTIONS": '{"sigma": 3}'}, ["sigma", "gaussian_std"]),
    ({"GEM_METHOD": "clearclip", "GEM_METHOD_OPTIONS": '{"attn_strategy": "kk"}'}, ["attn_strategy", "qq"]),
    ({"GEM_METHOD_OPTIONS": "[1]"}, ["GEM_METHOD_OPTIONS", "JSON object"]),
    ({"GEM_REFINE": "crf"}, ["GEM_REFINE", "none", "pamr"]),
    ({"GEM_REFINE_DILATIONS": "8,0"}, ["refine_dilations"]),
    ({"GEM_WINDOW": "448", "GEM_WINDOW_STRIDE": "500"}, ["window_stride"]),
])
def test_bad_method_settings_name_what_is_valid(env, words):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_extra_params_choose_method_and_refinement_and_tag_the_version():
    s = Settings()
    base = s.model_version()
    seg = s.segmentation_for({"method": "sclip", "refine": "pamr"})
    assert seg.method == "sclip" and seg.refine == "pamr"
    versions = {base, s.model_version(seg), s.model_version(s.segmentation_for({"method": "sclip"})),
                s.model_version(s.segmentation_for({"refine": "pamr"})),
                s.model_version(s.segmentation_for({"method": "naclip", "method_options": {"gaussian_std": 3}})),
                s.model_version(s.segmentation_for({"method": "naclip"}))}
    assert len(versions) == 6  # every choice its own model_version
    # the defaults said out loud keep the version predictions were stored under
    assert s.model_version(s.segmentation_for({"method": "gem", "refine": "none", "windows_above": 0})) == base
    with pytest.raises(SettingsError, match="unknown option 'std'.*gaussian_std"):
        s.segmentation_for({"method": "naclip", "method_options": {"std": 3}})


def test_setup_rejects_an_unknown_method_or_option_with_the_valid_ones(tmp_path):
    app, service = make_app(make_settings(tmp_path))
    client = app.test_client()
    r = client.post("/setup", json=setup_body(extra_params={"method": "mystery"}))
    assert r.status_code == 400
    assert all(m in r.get_json()["error"] for m in ("gem", "sclip", "clearclip", "naclip", "clip"))
    r = client.post("/setup", json=setup_body(extra_params={"method": "naclip", "method_options": {"arch": "x"}}))
    assert r.status_code == 400 and "reduced" in r.get_json()["error"]
    ok = client.post("/setup", json=setup_body(extra_params={"method": "naclip", "refine": "pamr"}))
    assert ok.status_code == 200 and service.model_state == "not loaded"


def test_feature_cache_namespace_names_method_and_windows_but_not_refinement():
    s = Settings()
    ns = {image_namespace(s, s.segmentation_for(p)) for p in (
        {}, {"method": "naclip"}, {"method": "sclip"}, {"windows_above": 2000})}
    assert len(ns) == 4
    assert image_namespace(s, s.segmentation_for({"refine": "pamr"})) == image_namespace(s, s.segmentation)


# --------------------------------------------------------------------------- predictor
@pytest.mark.parametrize("method", ["sclip", "clearclip", "naclip", "clip"])
def test_predictor_embeds_with_the_chosen_method(loaded, method):
    seg = SegmentationSettings(input_size=64, threshold=0, min_area=0, method=method)
    predictor = GEMPredictor(loaded, seg)
    image = photo(96, 64)
    emb = predictor.set_image(image)
    x = predictor.preprocess(image)
    with torch.inference_mode():
        expected = F.normalize(create_method(method, loaded.gem.model).encode_image(x)[0, 1:].float(), dim=-1)
    assert torch.allclose(emb.patches, expected, atol=1e-5)
    gem_emb = GEMPredictor(loaded, SegmentationSettings(input_size=64, threshold=0, min_area=0)).set_image(image)
    assert not torch.allclose(emb.patches, gem_emb.patches, atol=1e-3)  # another method, other tokens


def test_refinement_is_pamr_on_the_input_size_logits(loaded):
    image = photo(80, 64)
    plain = GEMPredictor(loaded, SegmentationSettings(input_size=64, threshold=0, min_area=0))
    refined = GEMPredictor(loaded, SegmentationSettings(input_size=64, threshold=0, min_area=0, refine="pamr",
                                                        refine_iterations=4, refine_dilations=(1, 2)))
    emb = refined.set_image(image)
    assert emb.guide is not None and emb.guide.dtype == torch.uint8 and tuple(emb.guide.shape) == (*emb.input_size, 3)
    text = refined.prompt_embeddings(LABELS)
    sim = (emb.patches @ text.t()).t().reshape(1, len(LABELS), *emb.grid)
    sim = F.interpolate(sim, size=emb.input_size, mode="bilinear", align_corners=False)
    guide = emb.guide.permute(2, 0, 1)[None].float()
    expected = torch.softmax(pamr(guide, sim, 4, (1, 2))[0] * refined.settings.logit_scale, dim=0).numpy()
    np.testing.assert_allclose(refined.probabilities(LABELS, emb), expected, atol=1e-5)
    assert not np.allclose(plain.probabilities(LABELS, emb), expected, atol=1e-4)


def test_refinement_in_label_chunks_equals_all_at_once(loaded, monkeypatch):
    from gem_backend.algorithm import segmentation

    labels = [f"thing {i}" for i in range(7)]
    pred = GEMPredictor(loaded, SegmentationSettings(input_size=64, threshold=0, min_area=0, refine="pamr",
                                                     refine_iterations=3, refine_dilations=(1, 2)))
    emb = pred.set_image(photo(64, 64))
    whole = pred.predict(labels, emb)
    monkeypatch.setattr(segmentation, "DECISION_CHUNK", 3)  # the running-softmax path, 3 prompts a chunk
    chunked = pred.predict(labels, emb)
    np.testing.assert_array_equal(whole.label_map, chunked.label_map)


def test_embedding_with_its_image_survives_the_feature_cache(loaded):
    pred = GEMPredictor(loaded, SegmentationSettings(input_size=64))
    emb = pred.set_image(photo(72, 64))
    back = decode_embedding(encode_embedding(emb))
    assert torch.equal(back.guide, emb.guide) and torch.allclose(back.patches, emb.patches)
    assert decode_embedding(encode_embedding(emb)[:-5]) is None  # truncated: refused, not misread


# --------------------------------------------------------------------------- windows
def test_window_sizing():
    seg = SegmentationSettings(windows_above=1000, window=448, window_stride=224, window_short_side=1344)
    assert not uses_windows(1000, 800, seg) and uses_windows(3000, 4000, seg)
    assert model_input_size(3000, 4000, seg, (16, 16)) == (1344, 1792)  # short side capped, aspect kept
    assert model_input_size(1100, 1100, seg, (16, 16)) == (1104, 1104)  # never enlarged beyond rounding
    assert len(sliding_windows(1344, 1792, 448, 224)) == 5 * 7


def test_window_tokens_encode_each_window_once_batched_by_size():
    calls = []

    class Tower:
        patch_size = (16, 16)

        def grid_for(self, h, w):
            return h // 16, w // 16

        def encode_image(self, x):  # CLS, then patch tokens of norm 2
            calls.append(tuple(x.shape))
            b, _, h, w = x.shape
            out = torch.zeros(b, 1 + (h // 16) * (w // 16), 4)
            out[:, 1:, 1] = 2.0
            return out

    boxes = sliding_windows(64, 96, 32, 16)
    tokens, wins = window_tokens(Tower(), torch.zeros(3, 64, 96), boxes, batch_size=4)
    assert sum(c[0] for c in calls) == len(boxes) and max(c[0] for c in calls) == 4  # one forward per window
    assert [w.box for w in wins] == boxes and all(w.grid == (2, 2) and w.pad == (0, 0, 0, 0) for w in wins)
    assert all(t.shape == (4, 4) for t in tokens)
    np.testing.assert_allclose(torch.cat(tokens)[:, 1].numpy(), 1.0)  # L2-normalised, CLS dropped
    calls.clear()
    _, wins = window_tokens(Tower(), torch.zeros(3, 60, 90), [(0, 60, 0, 90)])
    assert calls == [(1, 3, 64, 96)] and wins[0].pad == (2, 2, 3, 3) and wins[0].grid == (4, 6)  # centred padding


@pytest.mark.parametrize("method", ["gem", "naclip"])
def test_serving_and_eval_give_the_same_label_map_through_windows(loaded, method):
    image = photo(160, 96)  # multiples of the patch: no resize in either
    seg = SegmentationSettings(input_size=64, threshold=0, min_area=0, background_prompts=(), templates=TEMPLATE,
                               method=method, windows_above=64, window=64, window_stride=48, window_short_side=96)
    pred = GEMPredictor(loaded, seg)
    emb = pred.set_image(image)
    assert emb.input_size == (96, 160) and emb.grid == (6, 10)
    assert len(emb.windows) == len(sliding_windows(96, 160, 64, 48)) == 2 * 3  # edge windows, off the stride
    served = pred.predict(LABELS, emb).label_map.astype(np.int64) - 1

    protocol = Protocol(name="test", resize="none", crop=64, stride=48, templates=TEMPLATE)
    segmenter = Segmenter(loaded, protocol, method)
    text = segmenter.encode(LABELS)
    logits = segmenter.logits(image, text)
    evaluated = logits.argmax(dim=0).numpy()
    np.testing.assert_array_equal(served, evaluated)
    assert len(np.unique(served)) == 2  # both labels present: the comparison is not trivial
    # the same logits, not only the same argmax: one code for both
    torch.testing.assert_close(emb.logits(text), logits, rtol=0, atol=1e-6)


def test_a_large_image_is_served_through_windows_and_clicks_use_the_cached_window_features(tmp_path, loaded,
                                                                                     monkeypatch):
    settings = make_settings(tmp_path, GEM_METHOD="clearclip", GEM_WINDOWS_ABOVE="100", GEM_WINDOW="64",
                             GEM_WINDOW_STRIDE="32", GEM_WINDOW_SHORT_SIDE="96")
    app, service = make_app(settings, loaded=loaded)
    tower = loaded.method("clearclip", dict(settings.segmentation.method_options))
    calls = []
    original = tower.encode_image
    monkeypatch.setattr(tower, "encode_image", lambda x: calls.append(x.shape) or original(x))
    uri = jpeg_uri(photo(300, 200))
    client = app.test_client()
    first = post(client, interactive_body(uri, None))
    windows = len(sliding_windows(96, 144, 64, 32))
    assert sum(c[0] for c in calls) == windows and all(tuple(c[-2:]) == (64, 64) for c in calls)
    assert first["model_version"] == settings.model_version(settings.segmentation)
    assert first["result"] and first["result"][0]["original_width"] == 300
    validate(BRUSH_CONFIG, first)
    clicked = post(client, interactive_body(uri, [click(50, 50, "cat")]))
    assert sum(c[0] for c in calls) == windows  # the click reused the window features from the cache
    assert [r["value"]["brushlabels"] for r in clicked["result"]] == [["cat"]]
    validate(BRUSH_CONFIG, clicked)


def test_predict_with_each_method_and_refinement_through_extra_params(tmp_path, loaded):
    service = GEMService(make_settings(tmp_path), loaded=loaded)
    uri = jpeg_uri(photo(120, 80))
    versions = set()
    for params in ({}, {"method": "sclip"}, {"method": "naclip", "refine": "pamr"}, {"refine": "pamr"}):
        [pred] = service.predict_tasks([{"id": 1, "data": {"image": uri}}], BRUSH_CONFIG, params)
        assert pred["result"], params
        versions.add(pred["model_version"])
    assert len(versions) == 4


# --------------------------------------------------------------------------- eval comparison
def test_compare_variants_parse_and_refuse_unknown_ones():
    assert parse_variants("gem, naclip,naclip+pamr,gem") == [("gem", "none"), ("naclip", "none"), ("naclip", "pamr")]
    with pytest.raises(EvalError, match="sclip"):
        parse_variants("segformer")
    with pytest.raises(EvalError, match="pamr"):
        parse_variants("gem+crf")


def test_comparison_writes_one_table_with_every_variant(tmp_path, loaded):
    root = shared_path("data", "voc-mini")
    protocol = Protocol(name="gem", resize="square", size=64, templates=TEMPLATE)
    cfg = EvalConfig(dataset="voc21", root=str(root), protocol=protocol, out_dir=str(tmp_path / "cmp"), limit=2,
                     progress=False)
    result = run_comparison(cfg, loaded, parse_variants("gem,naclip,naclip+pamr"), echo=lambda line: None)
    assert [r["variant"] for r in result["variants"]] == ["gem", "naclip", "naclip+pamr"]
    assert all(0 <= r["mIoU"] <= 100 for r in result["variants"])
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| naclip+pamr |" in md and (tmp_path / "cmp" / "naclip" / "results.json").is_file()
    # refinement changes the predictions (the confusion matrices differ)
    a = np.load(tmp_path / "cmp" / "naclip" / "confusion.npy")
    b = np.load(tmp_path / "cmp" / "naclip+pamr" / "confusion.npy")
    assert not np.array_equal(a, b)
    again = run_comparison(cfg, loaded, parse_variants("naclip"), echo=lambda line: None)
    assert again["variants"][0]["seconds_per_image"] is None  # resumed from its cache
