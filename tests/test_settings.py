"""gem_backend.settings: environment parsing, per-project overrides, model_version, redaction."""

from __future__ import annotations

import json

import pytest

from gem_backend.algorithm.gem import DEFAULT_TEMPLATES
from gem_backend.algorithm.segmentation import DEFAULT_BACKGROUND_PROMPTS, SegmentationSettings
from gem_backend.settings import Settings, SettingsError, openai_templates, parse_extra_params, parse_templates

API_KEY = "ls-token-0123456789abcdef"
AUTH_PASS = "basic-pass-SECRET-42"
REDIS_PASS = "redis-pw-TOPSECRET"


# ---------------------------------------------------------------------------------- from_env
def test_defaults():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.model == "ViT-B-16-quickgelu" and s.pretrained == "metaclip_400m"
    assert (s.device, s.precision, s.depth, s.ss_attn_iter, s.ss_attn_temp) == ("auto", "auto", 7, 1, None)
    assert s.model_dir is None and s.label_studio_url is None and s.label_studio_api_key is None
    assert (s.host, s.port, s.workers, s.threads, s.log_level) == ("0.0.0.0", 9090, 1, 8, "INFO")
    assert s.basic_auth_user is None and s.basic_auth_pass is None and s.webhook_auth is False
    assert s.redis_url is None and s.text_cache_size == 4096
    assert s.state_dir.endswith("gem-backend")
    seg = s.segmentation
    assert seg == SegmentationSettings()
    assert (seg.input_size, seg.max_long_side, seg.square, seg.logit_scale) == (448, 896, False, 50.0)
    assert (seg.threshold, seg.min_area) == (0.3, 0.001)
    assert seg.background_prompts == DEFAULT_BACKGROUND_PROMPTS
    assert seg.templates == DEFAULT_TEMPLATES == ("a photo of a {}.",)


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("GEM_THRESHOLD", "0.45")
    monkeypatch.setenv("PORT", "9191")
    s = Settings.from_env()
    assert s.segmentation.threshold == 0.45 and s.port == 9191


def test_every_variable_is_parsed():
    env = {
        "GEM_MODEL": "ViT-B-32", "GEM_PRETRAINED": "/w/model.safetensors", "GEM_DEVICE": "cuda:1",
        "GEM_PRECISION": "bf16", "GEM_DEPTH": "5", "GEM_SS_ATTN_ITER": "2", "GEM_SS_ATTN_TEMP": "0.25",
        "MODEL_DIR": "/models", "LABEL_STUDIO_URL": "http://ls:8080", "LABEL_STUDIO_API_KEY": API_KEY,
        "HOST": "127.0.0.1", "PORT": "9999", "WORKERS": "3", "THREADS": "4", "LOG_LEVEL": "debug",
        "BASIC_AUTH_USER": "admin", "BASIC_AUTH_PASS": AUTH_PASS, "GEM_WEBHOOK_AUTH": "yes",
        "GEM_MAX_REQUEST_BYTES": "1234", "REDIS_URL": "redis://cache:6379/2", "GEM_TEXT_CACHE_SIZE": "17",
        "GEM_FETCH_TIMEOUT": "2.5", "GEM_MAX_IMAGE_BYTES": "999", "GEM_MAX_IMAGE_PIXELS": "4096",
        "GEM_INPUT_SIZE": "336", "GEM_MAX_LONG_SIDE": "672", "GEM_SQUARE": "true", "GEM_LOGIT_SCALE": "100",
        "GEM_THRESHOLD": "0.5", "GEM_BACKGROUND_PROMPTS": " grass , road,,", "GEM_MIN_AREA": "0.01",
        "GEM_TEMPLATES": "a {}.|the {}.",
    }
    s = Settings.from_env(env)
    assert (s.model, s.pretrained, s.device, s.precision) == ("ViT-B-32", "/w/model.safetensors", "cuda:1", "bf16")
    assert (s.depth, s.ss_attn_iter, s.ss_attn_temp) == (5, 2, 0.25)
    assert s.model_dir == "/models"
    assert s.state_dir == "/models/gem-state"  # MODEL_DIR holds the state unless GEM_STATE_DIR says
    assert (s.label_studio_url, s.label_studio_api_key) == ("http://ls:8080", API_KEY)
    assert (s.host, s.port, s.workers, s.threads, s.log_level) == ("127.0.0.1", 9999, 3, 4, "DEBUG")
    assert (s.basic_auth_user, s.basic_auth_pass, s.webhook_auth) == ("admin", AUTH_PASS, True)
    assert (s.max_request_bytes, s.redis_url, s.text_cache_size) == (1234, "redis://cache:6379/2", 17)
    assert (s.fetch_timeout, s.max_image_bytes, s.max_image_pixels) == (2.5, 999, 4096)
    assert s.segmentation == SegmentationSettings(
        input_size=336, max_long_side=672, square=True, logit_scale=100.0, threshold=0.5,
        background_prompts=("grass", "road"), min_area=0.01, templates=("a {}.", "the {}."))
    assert Settings.from_env({**env, "GEM_STATE_DIR": "/state"}).state_dir == "/state"


def test_label_studio_host_is_an_alias_of_the_url():
    assert Settings.from_env({"LABEL_STUDIO_HOST": "http://old:8080"}).label_studio_url == "http://old:8080"
    both = {"LABEL_STUDIO_HOST": "http://old:8080", "LABEL_STUDIO_URL": "http://new:8080"}
    assert Settings.from_env(both).label_studio_url == "http://new:8080"


def test_special_values():
    s = Settings.from_env({"GEM_THRESHOLD": "0", "GEM_BACKGROUND_PROMPTS": ""})
    assert s.segmentation.threshold == 0.0
    assert s.segmentation.background_prompts == ()  # "" means none, not the default
    assert Settings.from_env({"GEM_BACKGROUND_PROMPTS": " , "}).segmentation.background_prompts == ()
    openai = Settings.from_env({"GEM_TEMPLATES": "openai"}).segmentation.templates
    assert len(openai) == 80 and len(set(openai)) == 80
    assert all("{}" in t for t in openai)
    assert "a photo of a {}." in openai
    assert openai == openai_templates() == parse_templates("OpenAI")
    assert Settings.from_env({"GEM_TEMPLATES": "a {}.|the {}."}).segmentation.templates == ("a {}.", "the {}.")
    assert Settings.from_env({"GEM_SS_ATTN_TEMP": "none"}).ss_attn_temp is None
    assert Settings.from_env({"GEM_SS_ATTN_TEMP": ""}).ss_attn_temp is None
    for false in ("0", "false", "No", "off"):
        assert Settings.from_env({"GEM_SQUARE": false}).segmentation.square is False
    for true in ("1", "TRUE", "yes", "on"):
        assert Settings.from_env({"GEM_SQUARE": true}).segmentation.square is True
    # empty numeric variables mean "unset", not an error
    assert Settings.from_env({"GEM_THRESHOLD": "", "PORT": ""}) == Settings()


@pytest.mark.parametrize("name, value", [
    ("GEM_THRESHOLD", "high"), ("GEM_THRESHOLD", "1.5"), ("GEM_THRESHOLD", "-0.1"),
    ("GEM_MIN_AREA", "1"), ("GEM_MIN_AREA", "x"), ("GEM_INPUT_SIZE", "8"), ("GEM_INPUT_SIZE", "4.5"),
    ("GEM_MAX_LONG_SIDE", "100"), ("GEM_LOGIT_SCALE", "0"), ("GEM_LOGIT_SCALE", "hot"),
    ("GEM_SQUARE", "maybe"), ("GEM_TEMPLATES", "a photo"), ("GEM_TEMPLATES", "|"),
    ("GEM_DEPTH", "deep"), ("GEM_SS_ATTN_ITER", "1.5"), ("GEM_SS_ATTN_TEMP", "warm"),
    ("PORT", "http"), ("WORKERS", "two"), ("THREADS", "8.0"), ("GEM_WEBHOOK_AUTH", "sometimes"),
    ("GEM_MAX_REQUEST_BYTES", "20MB"), ("GEM_TEXT_CACHE_SIZE", "big"), ("GEM_FETCH_TIMEOUT", "30s"),
    ("GEM_MAX_IMAGE_BYTES", "1e"), ("GEM_MAX_IMAGE_PIXELS", "many"), ("GEM_ALLOWED_HOSTS", "10.0.0.0/33"),
    ("GEM_ALLOWED_HOSTS", "http://minio:9000"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)


def test_allowed_hosts_reach_the_image_fetcher():
    from gem_backend.serving.service import GEMService

    s = Settings.from_env({"GEM_ALLOWED_HOSTS": "minio, 10.0.0.0/8 ,*.corp.example,fd00::1"})
    assert s.allowed_hosts == ("minio", "10.0.0.0/8", "*.corp.example", "fd00::1")
    assert Settings.from_env({}).allowed_hosts == ()
    guard = GEMService(s).fetcher.guard
    assert guard.host_exempt("http", "MinIO", 9000) and guard.host_exempt("https", "a.corp.example", 443)
    assert not guard.host_exempt("http", "corp.example", 80)


def test_input_size_over_the_long_side_cap_names_both_variables():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"GEM_INPUT_SIZE": "1000"})
    assert "GEM_INPUT_SIZE" in str(info.value) and "GEM_MAX_LONG_SIDE" in str(info.value)


# ---------------------------------------------------------------------------------- per project
def test_segmentation_for_empty_params_is_the_default():
    s = Settings.from_env({"GEM_THRESHOLD": "0.4"})
    for empty in (None, "", "   ", "null", "{}", {}):
        assert s.segmentation_for(empty) is s.segmentation


def test_segmentation_for_json_string_and_dict():
    s = Settings()
    from_json = s.segmentation_for('{"threshold": 0.4, "min_area": 0.02, "templates": "a {}.|the {}."}')
    from_dict = s.segmentation_for({"threshold": 0.4, "min_area": 0.02, "templates": ["a {}.", "the {}."]})
    assert from_json == from_dict
    assert (from_json.threshold, from_json.min_area, from_json.templates) == (0.4, 0.02, ("a {}.", "the {}."))
    # untouched fields keep the process settings
    assert from_json.input_size == s.segmentation.input_size
    assert from_json.background_prompts == s.segmentation.background_prompts
    assert s.segmentation.threshold == 0.3  # not modified in place

    other = s.segmentation_for({"background_prompts": "grass, road", "square": True, "input_size": 336,
                                "logit_scale": 80, "max_long_side": 700})
    assert other.background_prompts == ("grass", "road")
    assert (other.square, other.input_size, other.logit_scale, other.max_long_side) == (True, 336, 80.0, 700)
    assert s.segmentation_for({"background_prompts": ""}).background_prompts == ()
    assert s.segmentation_for({"threshold": 0}).threshold == 0.0
    assert len(s.segmentation_for({"templates": "openai"}).templates) == 80


def test_segmentation_for_accepts_env_names():
    s = Settings()
    assert s.segmentation_for({"GEM_THRESHOLD": 0.6}).threshold == 0.6
    assert s.segmentation_for('{"gem_min_area": "0.05", "THRESHOLD": "0.2"}') == \
        SegmentationSettings(min_area=0.05, threshold=0.2)


@pytest.mark.parametrize("params, words", [
    ({"model": "RN50"}, ["unknown", "model"]),
    ('{"treshold": 0.4}', ["unknown", "treshold"]),
    ({"GEM_DEPTH": 3}, ["unknown", "GEM_DEPTH"]),
    ('{"threshold": 0.4', ["not valid JSON"]),
    ("threshold=0.4", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ('"text"', ["JSON object"]),
    ("42", ["JSON object"]),
    (["threshold"], ["JSON object"]),
    ({"threshold": 1.5}, ["threshold"]),
    ({"threshold": "high"}, ["threshold"]),
    ({"threshold": None}, ["threshold"]),
    ({"min_area": -1}, ["min_area"]),
    ({"input_size": "large"}, ["input_size"]),
    ({"square": "maybe"}, ["square"]),
    ({"templates": "a photo"}, ["templates"]),
    ({"templates": 5}, ["templates"]),
    ({"templates": {"a": 1}}, ["templates"]),
    ({"background_prompts": 3}, ["background_prompts"]),
    ({"max_long_side": 100}, ["max_long_side"]),
])
def test_segmentation_for_rejects_bad_params(params, words):
    with pytest.raises(SettingsError) as info:
        Settings().segmentation_for(params)
    for word in words:
        assert word in str(info.value)


def test_parse_extra_params():
    assert parse_extra_params(None) == {} and parse_extra_params("") == {}
    assert parse_extra_params(' {"a": 1} ') == {"a": 1}
    assert parse_extra_params({"a": 1}) == {"a": 1}


# ---------------------------------------------------------------------------------- model_version
def test_model_version_is_stable_for_equal_settings():
    env = {"GEM_MODEL": "ViT-B-32", "GEM_PRETRAINED": "openai", "GEM_THRESHOLD": "0.4"}
    a, b = Settings.from_env(env), Settings.from_env(dict(env))
    assert a.model_version() == b.model_version()
    assert a.model_version() == a.model_version(a.segmentation_for(None))
    assert a.model_version() == a.model_version(a.segmentation_for({"threshold": 0.4}))
    assert a.model_version().startswith("gem-ViT-B-32-openai-")
    # settings that do not change outputs do not change the version
    assert a.model_version() == a.replace(port=1234, workers=4, label_studio_api_key="k").model_version()


def test_model_version_changes_with_everything_that_changes_outputs(tmp_path):
    base = Settings()
    versions = {
        "base": base.model_version(),
        "model": base.replace(model="ViT-B-32").model_version(),
        "pretrained": base.replace(pretrained="metaclip_fullcc").model_version(),
        "random": base.replace(pretrained="none").model_version(),
        "threshold": base.model_version(base.segmentation_for({"threshold": 0.5})),
        "threshold_env": Settings.from_env({"GEM_THRESHOLD": "0.5"}).model_version(),
        "templates": base.model_version(base.segmentation_for({"templates": "openai"})),
        "templates_env": Settings.from_env({"GEM_TEMPLATES": "a {}.|the {}."}).model_version(),
        "min_area": base.model_version(base.segmentation_for({"min_area": 0.05})),
        "background": base.model_version(base.segmentation_for({"background_prompts": "grass"})),
        "input_size": base.model_version(base.segmentation_for({"input_size": 336})),
        "depth": base.replace(depth=5).model_version(),
    }
    # the same threshold given per project or by the environment is the same version
    assert versions.pop("threshold_env") == versions["threshold"]
    assert len(set(versions.values())) == len(versions), versions

    # a weights file: its content, not its folder, names the weights
    one, two = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "w.safetensors"
    for path, content in ((one, b"x" * 100), (two, b"x" * 100)):
        path.parent.mkdir()
        path.write_bytes(content)
    v_one = base.replace(pretrained=str(one)).model_version()
    assert v_one == base.replace(pretrained=str(two)).model_version()
    two.write_bytes(b"y" * 100)
    assert v_one != base.replace(pretrained=str(two)).model_version()


def test_text_namespace_separates_models_weights_and_templates():
    s = Settings()
    spaces = {s.text_namespace(("a {}.",)), s.text_namespace(("the {}.",)),
              s.replace(model="ViT-B-32").text_namespace(("a {}.",)),
              s.replace(pretrained="none").text_namespace(("a {}.",))}
    assert len(spaces) == 4


# ---------------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("redis_url", [
    f"redis://default:{REDIS_PASS}@cache:6379/0",
    f"redis://:{REDIS_PASS}@cache:6379/0",
    f"rediss://user:{REDIS_PASS}@cache.example.com:6380/1",
    f"redis://cache:6379/0?password={REDIS_PASS}",
])
def test_secrets_are_hidden(redis_url):
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": API_KEY, "BASIC_AUTH_USER": "admin",
                           "BASIC_AUTH_PASS": AUTH_PASS, "REDIS_URL": redis_url,
                           "LABEL_STUDIO_URL": "http://ls:8080"})
    assert s.redis_url == redis_url  # kept for use
    red = s.redacted()
    text = json.dumps(red, default=str)
    for secret in (API_KEY, AUTH_PASS, REDIS_PASS):
        assert secret not in text
        assert secret not in repr(s)
        assert secret not in str(s)
    assert red["label_studio_api_key"] == "***" and red["basic_auth_pass"] == "***"
    assert "***" in red["redis_url"] and "cache" in red["redis_url"]
    # the rest stays readable
    assert red["basic_auth_user"] == "admin" and red["label_studio_url"] == "http://ls:8080"
    assert red["segmentation"]["threshold"] == 0.3
    assert red["model"] == s.model


def test_redacted_leaves_unset_secrets_unset():
    red = Settings().redacted()
    assert red["label_studio_api_key"] is None and red["basic_auth_pass"] is None and red["redis_url"] is None
    json.dumps(red, default=str)  # loggable


def test_torch_threads_default_to_cores_per_process(monkeypatch):
    import os

    import gem_backend.settings as settings_module
    from gem_backend.settings import Settings, SettingsError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert settings_module.available_cores() == 16
    assert Settings.from_env({}).torch_thread_count() == 16
    assert Settings.from_env({"WORKERS": "4"}).torch_thread_count() == 4
    assert Settings.from_env({"WORKERS": "3"}).torch_thread_count() == 5   # 3 x 5 <= 16: never more
    assert Settings.from_env({"WORKERS": "32"}).torch_thread_count() == 1
    assert Settings.from_env({"WORKERS": "4", "GEM_TORCH_THREADS": "6"}).torch_thread_count() == 6
    assert Settings.from_env({"GEM_TORCH_THREADS": "auto"}).torch_thread_count(processes=2) == 8
    for workers in range(1, 20):
        assert workers * Settings.from_env({"WORKERS": str(workers)}).torch_thread_count() <= max(16, workers)
    with pytest.raises(SettingsError, match="GEM_TORCH_THREADS"):
        Settings.from_env({"GEM_TORCH_THREADS": "-2"})


def test_configure_torch_threads_sets_and_logs(monkeypatch, caplog):
    import logging

    import torch

    from gem_backend.settings import Settings, configure_torch_threads

    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            n, interop = configure_torch_threads(Settings.from_env({"GEM_TORCH_THREADS": "1"}), what="test")
        assert n == 1 and torch.get_num_threads() == 1 and interop >= 1
        assert "1 torch threads (GEM_TORCH_THREADS)" in caplog.text
    finally:
        torch.set_num_threads(before)
