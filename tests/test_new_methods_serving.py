"""SC-CLIP, SFP and CorrCLIP where a project chooses a method: extra_params and the environment,
/setup errors, model_version, the image-feature cache key, /predict, bulk and smart-tool clicks;
CorrCLIP's DINO shared by the process and SAM 2's regions fed into its image tower.

The golden models of ``../shared/golden`` (12 blocks, as SC-CLIP/SFP need) give meaningless
masks: these tests check the wiring, not quality.
"""

from __future__ import annotations

import pytest
import torch

from gem_backend.algorithm.methods import method_takes_regions
from gem_backend.algorithm.models import load_gem_model
from gem_backend.serving.feature_cache import image_namespace
from gem_backend.serving.service import GEMService
from gem_backend.settings import Settings, SettingsError
from helpers import SHARED
from test_app import make_app, make_settings, setup_body
from test_interactive import BRUSH_CONFIG, click, interactive_body, post
from test_methods_serving import jpeg_uri, photo
from test_sam_regions import StandInRegions

SC = SHARED / "golden" / "scclip-reference"
CORR = SHARED / "golden" / "corrclip-reference"
CORR_OPTIONS = {"dino_model": str(CORR / "dino_config.json"), "dino_pretrained": str(CORR / "dino_weights.safetensors")}


def settings_for(tmp_path, golden, **env) -> Settings:
    return make_settings(tmp_path, GEM_MODEL=str(golden / "config.json"),
                         GEM_PRETRAINED=str(golden / "weights.safetensors"), GEM_INPUT_SIZE="224", **env)


@pytest.fixture(scope="module")
def sc_loaded():
    return load_gem_model(str(SC / "config.json"), str(SC / "weights.safetensors"), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def corr_loaded():
    return load_gem_model(str(CORR / "config.json"), str(CORR / "weights.safetensors"), device="cpu",
                          precision="fp32")


def test_the_new_methods_are_chosen_from_the_environment_and_extra_params():
    s = Settings.from_env({"GEM_METHOD": "sfp", "GEM_METHOD_OPTIONS": '{"pm": "L2"}'})
    assert s.segmentation.method == "sfp" and dict(s.segmentation.method_options) == {"pm": "L2", "res_cls": 0.3}
    base = Settings()
    versions = {base.model_version(base.segmentation_for(p)) for p in (
        {}, {"method": "scclip"}, {"method": "sfp"}, {"method": "sfp", "method_options": {"pm": "LOF"}},
        {"method": "corrclip"}, {"method": "corrclip", "regions": "sam2"}, {"method": "scclip", "refine": "pamr"})}
    assert len(versions) == 7  # each its own model_version
    spaces = {image_namespace(base, base.segmentation_for(p)) for p in (
        {}, {"method": "scclip"}, {"method": "sfp"}, {"method": "corrclip"})}
    assert len(spaces) == 4  # and its own image-feature cache key
    # SAM 2 regions change CorrCLIP's tokens (its key), not another method's (voted after the decision)
    assert method_takes_regions("corrclip") and not method_takes_regions("scclip")
    assert image_namespace(base, base.segmentation_for({"method": "corrclip", "regions": "sam2"})) != \
        image_namespace(base, base.segmentation_for({"method": "corrclip"}))
    assert image_namespace(base, base.segmentation_for({"method": "scclip", "regions": "sam2"})) == \
        image_namespace(base, base.segmentation_for({"method": "scclip"}))
    with pytest.raises(SettingsError, match="SOM"):
        Settings.from_env({"GEM_METHOD": "sfp", "GEM_METHOD_OPTIONS": '{"pm": "median"}'})


@pytest.mark.parametrize("params, words", [
    ({"method": "sfp", "method_options": {"pm": "median"}}, ["pm", "SOM", "L2", "LOF"]),
    ({"method": "scclip", "method_options": {"lof_k": 5}}, ["lof_k", "pre_adjust_idx", "res_cls"]),
    ({"method": "scclip", "method_options": {"multi_start_idx": 9, "multi_end_idx": 4}}, ["multi_start_idx"]),
    ({"method": "corrclip", "method_options": {"dino": "x"}}, ["dino_model", "dino_pretrained"]),
])
def test_setup_refuses_bad_options_of_the_new_methods_naming_the_valid_ones(tmp_path, params, words):
    app, _ = make_app(make_settings(tmp_path))
    r = app.test_client().post("/setup", json=setup_body(extra_params=params))
    assert r.status_code == 400
    for word in words:
        assert word in r.get_json()["error"], r.get_json()["error"]


@pytest.mark.parametrize("method, options", [("scclip", {}), ("sfp", {}), ("sfp", {"pm": "LOF"})])
def test_a_project_choosing_scclip_or_sfp_gets_predictions_tagged_with_it(tmp_path, sc_loaded, method, options):
    settings = settings_for(tmp_path, SC)
    service = GEMService(settings, loaded=sc_loaded)
    tasks = [{"id": i, "data": {"image": jpeg_uri(photo(w, h))}} for i, (w, h) in enumerate([(300, 224), (224, 260)])]
    params = {"method": method, "method_options": options}
    preds = service.predict_tasks(tasks, BRUSH_CONFIG, params)  # bulk: two tasks through the stream
    expected = settings.model_version(settings.segmentation_for(params))
    assert [p["model_version"] for p in preds] == [expected] * 2
    assert expected != settings.model_version() and all(p["result"] for p in preds)
    tower = sc_loaded.method(method, dict(settings.segmentation_for(params).method_options))
    assert tower.name == method  # built on the shared CLIP, once per options
    assert sc_loaded.method(method, dict(settings.segmentation_for(params).method_options)) is tower


def test_smart_tool_clicks_with_scclip_through_windows_reuse_the_cached_features(tmp_path, sc_loaded, monkeypatch):
    settings = settings_for(tmp_path, SC, GEM_METHOD="scclip", GEM_WINDOWS_ABOVE="300", GEM_WINDOW="224",
                            GEM_WINDOW_STRIDE="112", GEM_WINDOW_SHORT_SIDE="224")
    app, service = make_app(settings, loaded=sc_loaded)
    tower = sc_loaded.method("scclip", dict(settings.segmentation.method_options))
    calls = []
    original = tower.encode_image
    monkeypatch.setattr(tower, "encode_image", lambda x, **kw: calls.append(x.shape[0]) or original(x, **kw))
    uri = jpeg_uri(photo(400, 300))
    client = app.test_client()
    first = post(client, interactive_body(uri, None))
    assert first["model_version"] == settings.model_version(settings.segmentation) and first["result"]
    n = sum(calls)
    assert n >= 2  # through windows
    clicked = post(client, interactive_body(uri, [click(50, 50, "cat")]))
    assert sum(calls) == n  # the click ran no image tower
    assert [r["value"]["brushlabels"] for r in clicked["result"]] == [["cat"]]


def test_corrclip_in_a_project_shares_one_dino_per_process(tmp_path, corr_loaded):
    from gem_backend import create_method

    settings = settings_for(tmp_path, CORR)
    service = GEMService(settings, loaded=corr_loaded)
    tasks = [{"id": 1, "data": {"image": jpeg_uri(photo(300, 224))}}]
    params = {"method": "corrclip", "method_options": CORR_OPTIONS}
    [pred] = service.predict_tasks(tasks, BRUSH_CONFIG, params)
    [again] = service.predict_tasks(tasks, BRUSH_CONFIG, dict(params, threshold=0.2))
    assert pred["result"] and pred["model_version"] == settings.model_version(settings.segmentation_for(params))
    assert again["model_version"] != pred["model_version"]
    options = dict(settings.segmentation_for(params).method_options)
    tower = corr_loaded.method("corrclip", options)
    assert tower.grid_for(224, 336) == (28, 42)  # DINO's patch-8 grid
    # another CorrCLIP on the same CLIP (another project, another options tuple) reuses the DINO
    assert create_method("corrclip", corr_loaded.gem.model, **options).dino is tower.dino


def test_corrclip_takes_sam2_regions_into_its_tower_and_votes_after(tmp_path, corr_loaded, monkeypatch):
    settings = settings_for(tmp_path, CORR, GEM_REGIONS="sam2", GEM_REGIONS_PRETRAINED="none")
    service = GEMService(settings, loaded=corr_loaded)
    stand_in = StandInRegions()
    monkeypatch.setattr(service, "region_generator", lambda seg: stand_in)
    params = {"method": "corrclip", "method_options": CORR_OPTIONS}
    tower = corr_loaded.method("corrclip", dict(settings.segmentation_for(params).method_options))
    seen = []
    original = tower.encode_image
    monkeypatch.setattr(tower, "encode_image",
                        lambda x, regions=None, **kw: seen.append(regions) or original(x, regions=regions, **kw))
    tasks = [{"id": 1, "data": {"image": jpeg_uri(photo(300, 224))}}]
    [pred] = service.predict_tasks(tasks, BRUSH_CONFIG, params)
    assert stand_in.calls == 1 and pred["result"]
    assert len(seen) == 1 and seen[0] is not None
    r = seen[0][0]
    # the window's regions: the stand-in's map (0 on the first row, 1 elsewhere) at the input size,
    # padded with 10000 to the window multiple of 56
    assert set(torch.unique(r).tolist()) <= {0, 1, 10000} and (r == 1).float().mean() > 0.8
    # the same task again: features and regions from the caches, no tower, no SAM 2
    service.predict_tasks(tasks, BRUSH_CONFIG, params)
    assert len(seen) == 1 and stand_in.calls == 1
    labels = {lab for res in pred["result"] for lab in res["value"]["brushlabels"]}
    assert len(labels) == 1  # one region over (nearly) the whole image: its majority label took it
