"""The Flask app (gem_backend.app.create_app) route by route, as Label Studio 1.23 calls it.

The model is the fixed small CLIP of the golden reference, loaded once for the module and
shared by every app built here (each test gets its own GEMService, so metrics and text
caches start empty). ``GEM_THRESHOLD=0`` makes every pixel go to its best label, so the
random model always paints something; ``GEM_INPUT_SIZE=112`` keeps each forward pass short.

Task images come from a small HTTP server on 127.0.0.1 that plays Label Studio's
``/data/upload/...`` (it refuses requests without the API key), or from ``data:`` URIs; the
photos are real VOC images read from ../shared (not copied into the repo).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageOps
from prometheus_client.parser import text_string_to_metric_families

from gem_backend.serving.app import MODEL_CLASS, create_app
from gem_backend.algorithm.models import load_gem_model
from gem_backend.serving.service import GEMService
from gem_backend.settings import Settings
from helpers import GOLDEN, shared_path

CAPTURED = "label-studio/captured"
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # legacy token, as in the captured /setup
LABELS = ("cat", "dog")
SLOW_SECONDS = 2.0


# --------------------------------------------------------------------------- helpers


def captured(name: str) -> dict:
    """The body of a request Label Studio really sent (``../shared/label-studio/captured``)."""
    return json.loads(shared_path(CAPTURED, name).read_text())["body"]


SETUP_FILE = "02_setup.json"
PREDICT_FILE = "03_predict__dm_action_retrieve_tasks_predictions.json"
WEBHOOK_FILES = (
    "08_webhook_START_TRAINING__api_ml_id_train.json",
    "09_webhook_ANNOTATION_CREATED.json",
    "10_webhook_ANNOTATION_UPDATED.json",
    "11_webhook_ANNOTATIONS_DELETED.json",
    "12_webhook_TASKS_CREATED.json",
)


def make_settings(state_dir, **env) -> Settings:
    base = {
        "GEM_MODEL": str(GOLDEN / "config.json"),
        "GEM_PRETRAINED": str(GOLDEN / "weights.safetensors"),
        "GEM_THRESHOLD": "0",
        "GEM_MIN_AREA": "0",
        "GEM_INPUT_SIZE": "112",
        "GEM_STATE_DIR": str(state_dir),
        "GEM_DEVICE": "cpu",
    }
    base.update({k: str(v) for k, v in env.items()})
    return Settings.from_env(base)


def make_app(settings: Settings, loaded=None, load_model: bool = False):
    service = GEMService(settings, loaded=loaded)
    return create_app(settings, service=service, load_model=load_model), service


def png_bytes(width: int, height: int) -> bytes:
    """A two-tone picture (left half light, right half dark) as PNG."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (230, 200, 40)
    arr[:, width // 2 :] = (20, 60, 160)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


SMALL_URI = data_uri(png_bytes(40, 24))


def predict_body(urls, project=None, **extra) -> dict:
    """The captured /predict body with one task per URL (ids 1..n) instead of its own task."""
    body = copy.deepcopy(captured(PREDICT_FILE))
    template = body["tasks"][0]
    body["tasks"] = [dict(copy.deepcopy(template), id=i + 1, inner_id=i + 1, data={"image": url})
                     for i, url in enumerate(urls)]
    if project is not None:
        body["project"] = project
    body.update(extra)
    return body


def setup_body(project=None, **extra) -> dict:
    body = copy.deepcopy(captured(SETUP_FILE))
    if project is not None:
        body["project"] = project
    body.update(extra)
    return body


def metric_values(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value}; fails on malformed text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(client, name: str, **labels) -> float:
    r = client.get("/metrics")
    assert r.status_code == 200
    return metric_values(r.get_data(as_text=True)).get((name, frozenset(labels.items())), 0.0)


def cache_counts(client) -> dict[str, float]:
    return {k: metric(client, "gem_text_cache_total", result=k) for k in ("local_hits", "redis_hits", "misses")}


def without_ids(prediction: dict) -> dict:
    """A prediction with its random region ids removed, to compare two runs."""
    out = copy.deepcopy(prediction)
    for region in out["result"]:
        region.pop("id")
    return out


def decoded_mask(region: dict) -> np.ndarray:
    """``[H, W]`` alpha channel of a brushlabels region, via the Label Studio SDK decoder."""
    h, w = region["original_height"], region["original_width"]
    flat = np.asarray(decode_rle(region["value"]["rle"]))
    assert flat.size == h * w * 4, f"rle decodes to {flat.size} values, expected {h}x{w}x4"
    return flat.reshape(h, w, 4)[:, :, 3]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loaded():
    s = make_settings("/nonexistent")
    return load_gem_model(s.model, s.pretrained, device=s.device, precision=s.precision, depth=s.depth,
                          ss_attn_iter=s.ss_attn_iter, ss_attn_temp=s.ss_attn_temp)


class ImageServer:
    """Plays Label Studio's file server: ``/data/upload/1/<name>`` needs ``Token <API_KEY>``."""

    def __init__(self, files: dict[str, tuple[bytes, str]]):
        self.files = files
        self.auth_seen: list[str | None] = []
        self.slow_started = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization")
                server.auth_seen.append(auth)
                if auth != f"Token {API_KEY}":
                    return self._send(401, b'{"detail": "no credentials"}', "application/json")
                name = self.path.rsplit("/", 1)[-1]
                if name not in server.files:
                    return self._send(404, b"<html><body>Not found</body></html>", "text/html")
                if name.startswith("slow"):
                    server.slow_started.set()
                    time.sleep(SLOW_SECONDS)
                data, ctype = server.files[name]
                self._send(200, data, ctype)

            def _send(self, status, data, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _photos() -> list[Path]:
    photos = sorted(shared_path("data", "voc-mini", "VOC2012", "JPEGImages").glob("*.jpg"))
    assert len(photos) >= 2, "voc-mini should hold real JPEG photos"
    return photos


@pytest.fixture(scope="module")
def images():
    """(server, {name: (width, height) as Label Studio shows it, after EXIF orientation})."""
    photo_a, photo_b = _photos()[:2]
    photo = photo_a.read_bytes()
    # a real photo, shrunk to 120x80 and stored with EXIF orientation 6 (rotate 90 degrees
    # clockwise to display): Label Studio shows it 80 wide and 120 high
    with Image.open(photo_b) as im:
        small = im.convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    small.save(buf, "JPEG", exif=exif, quality=90)
    rotated = buf.getvalue()
    with Image.open(io.BytesIO(rotated)) as im:
        assert im.size == (120, 80) and ImageOps.exif_transpose(im).size == (80, 120)
    with Image.open(photo_a) as im:
        photo_size = ImageOps.exif_transpose(im).size
    wide = png_bytes(96, 40)
    server = ImageServer({
        "wide.png": (wide, "image/png"),
        "rotated.jpg": (rotated, "image/jpeg"),
        "photo.jpg": (photo, "image/jpeg"),
        "slow.png": (png_bytes(48, 32), "image/png"),
    })
    sizes = {"wide.png": (96, 40), "rotated.jpg": (80, 120), "photo.jpg": photo_size, "slow.png": (48, 32)}
    yield server, sizes
    server.close()


@pytest.fixture
def ls_settings(tmp_path, images):
    """Settings with LABEL_STUDIO_URL/API_KEY pointing at the image server."""
    server, _ = images

    def build(**env):
        return make_settings(tmp_path / "state", LABEL_STUDIO_URL=server.url, LABEL_STUDIO_API_KEY=API_KEY, **env)

    return build


def upload(name: str) -> str:
    """A task image URL as Label Studio sends it: relative to LABEL_STUDIO_URL."""
    return f"/data/upload/1/{name}"


# --------------------------------------------------------------------------- /health


def test_health_reports_up_with_model_class(tmp_path, loaded):
    settings = make_settings(tmp_path)
    app, _ = make_app(settings, loaded)
    client = app.test_client()
    for path in ("/health", "/"):
        r = client.get(path)
        assert r.status_code == 200, r.data
        body = r.get_json()
        assert body["status"] == "UP"
        assert body["model_class"] == MODEL_CLASS == "GEMBackend"
        assert body["model"] == "loaded"
        assert body["model_version"] == settings.model_version()


def test_health_and_setup_answer_fast_while_a_predict_runs(ls_settings, loaded, images):
    """Label Studio gives /health 1 s (and /setup 3 s) while a batch of predictions runs."""
    from werkzeug.serving import make_server

    server, sizes = images
    server.slow_started.clear()
    app, _ = make_app(ls_settings(), loaded)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    base = f"http://127.0.0.1:{httpd.server_port}"
    serving = threading.Thread(target=httpd.serve_forever, daemon=True)
    serving.start()
    outcome = {}

    def run_predict():
        started = time.perf_counter()
        outcome["response"] = requests.post(f"{base}/predict", json=predict_body([upload("slow.png")]), timeout=60)
        outcome["seconds"] = time.perf_counter() - started

    predicting = threading.Thread(target=run_predict, daemon=True)
    try:
        predicting.start()
        assert server.slow_started.wait(30), "the predict never asked for its image"
        started = time.perf_counter()
        health = requests.get(f"{base}/health", timeout=1)
        health_seconds = time.perf_counter() - started
        started = time.perf_counter()
        setup = requests.post(f"{base}/setup", json=setup_body(), timeout=3)
        setup_seconds = time.perf_counter() - started
        still_running = predicting.is_alive()
        predicting.join(60)
    finally:
        httpd.shutdown()
        httpd.server_close()

    assert still_running, "the predict finished before /health was timed: the test proves nothing"
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert health_seconds < 1.0, f"/health took {health_seconds:.2f} s during a predict"
    assert setup.status_code == 200 and setup_seconds < 1.0, f"/setup took {setup_seconds:.2f} s"
    r = outcome["response"]
    assert r.status_code == 200, r.text
    assert outcome["seconds"] >= SLOW_SECONDS * 0.9
    (pred,) = r.json()["results"]
    assert pred["result"], "the slow image should still be segmented"
    assert {(x["original_width"], x["original_height"]) for x in pred["result"]} == {sizes["slow.png"]}


@pytest.mark.parametrize("problem", ["missing weights", "garbage weights", "unusable device"])
def test_model_that_cannot_load_gives_503_with_the_reason(tmp_path, problem):
    path = tmp_path / "weights.safetensors"
    env = {"GEM_PRETRAINED": str(path)}
    if problem == "garbage weights":
        path.write_bytes(b"this is not a safetensors file\n" * 64)
    elif problem == "unusable device":
        # torch raises RuntimeError here (no driver, or no such GPU), not a ModelLoadError
        env = {"GEM_DEVICE": "cuda:99"}
    settings = make_settings(tmp_path / "state", **env)
    app, service = make_app(settings, loaded=None, load_model=True)
    deadline = time.monotonic() + 60
    while service.model_state != "error" and time.monotonic() < deadline:
        assert service.model_state != "loaded", "garbage weights must not load"
        time.sleep(0.05)
    assert service.model_state == "error"
    client = app.test_client()

    r = client.get("/health")
    assert r.status_code == 503
    body = r.get_json()
    assert body["status"] == "ERROR"
    assert body["model_class"] == "GEMBackend"
    reason = body["error"]
    assert body["model"] == "error"
    assert "could not load: " in reason and reason.split("could not load: ", 1)[1].strip()
    if problem != "unusable device":
        assert str(path) in reason

    r = client.post("/predict", json=predict_body([SMALL_URI]))
    assert r.status_code == 503
    assert r.get_json()["error"] == reason

    # /setup needs no model: Label Studio can still connect and show the version
    r = client.post("/setup", json=setup_body())
    assert r.status_code == 200 and r.get_json()["model_version"] == settings.model_version()


# --------------------------------------------------------------------------- /setup


def test_setup_with_captured_body_returns_version_without_loading_a_model(tmp_path):
    settings = make_settings(tmp_path)
    app, service = make_app(settings, loaded=None, load_model=False)
    client = app.test_client()
    body = setup_body()
    assert body["extra_params"] is None and "<BrushLabels" in body["schema"]
    r = client.post("/setup", json=body)
    assert r.status_code == 200, r.data
    version = r.get_json()["model_version"]
    assert version == settings.model_version()
    assert version.startswith("gem-config-weights-")
    assert service.model_state == "not loaded"


def test_setup_extra_params_as_string_or_object_change_the_version(tmp_path):
    settings = make_settings(tmp_path)
    app, service = make_app(settings)
    client = app.test_client()
    default = client.post("/setup", json=setup_body()).get_json()["model_version"]
    as_string = client.post("/setup", json=setup_body(extra_params='{"threshold": 0.5}'))
    as_object = client.post("/setup", json=setup_body(extra_params={"threshold": 0.5}))
    other = client.post("/setup", json=setup_body(extra_params={"threshold": 0.4}))
    blank = client.post("/setup", json=setup_body(extra_params="  "))
    for r in (as_string, as_object, other, blank):
        assert r.status_code == 200, r.data
    assert as_string.get_json()["model_version"] == as_object.get_json()["model_version"] != default
    assert other.get_json()["model_version"] not in (default, as_object.get_json()["model_version"])
    assert blank.get_json()["model_version"] == default
    assert service.model_state == "not loaded"


@pytest.mark.parametrize("change, words", [
    (dict(extra_params='{"threshold": 0.5'), ["extra_params", "not valid JSON"]),
    (dict(extra_params="[1, 2]"), ["extra_params", "JSON object"]),
    (dict(extra_params={"treshold": 0.5}), ["unknown setting", "treshold", "threshold"]),
    (dict(extra_params={"threshold": 2}), ["threshold"]),
    # only smart tools (prompts, no output) and a TextArea: nothing GEM can predict
    (dict(schema='<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
                 '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>'
                 '<RectangleLabels name="box" toName="image" smartOnly="true"><Label value="cat"/></RectangleLabels>'
                 '</View>'),
     ["BrushLabels", "PolygonLabels", "RectangleLabels", "Choices", "found: TextArea->image, KeyPointLabels->image",
      "RectangleLabels->image (smart tool)"]),
    (dict(schema=None), ["label config"]),
])
def test_setup_rejects_bad_params_and_configs_with_a_message(tmp_path, change, words):
    app, service = make_app(make_settings(tmp_path))
    r = app.test_client().post("/setup", json=setup_body(**change))
    assert r.status_code == 400, r.data
    message = r.get_json()["error"]
    for word in words:
        assert word in message, message
    assert service.model_state == "not loaded"


def test_setup_body_that_is_not_json_is_400(tmp_path):
    app, _ = make_app(make_settings(tmp_path))
    r = app.test_client().post("/setup", data="project=1", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and "JSON" in r.get_json()["error"]


# --------------------------------------------------------------------------- extra_params -> /predict


@pytest.mark.parametrize("topology", ["one app", "two apps, one GEM_STATE_DIR", "two apps, one REDIS_URL"])
def test_setup_extra_params_reach_later_predicts_of_the_project(request, tmp_path, loaded, topology):
    """/setup gets project "7.123"; the /predict of "7.456" (same project, later) uses its params."""
    if topology == "one app":
        first = make_app(make_settings(tmp_path / "state"), loaded)[0]
        second = first
    elif topology == "two apps, one GEM_STATE_DIR":  # two gunicorn workers of one machine
        first = make_app(make_settings(tmp_path / "state"), loaded)[0]
        second = make_app(make_settings(tmp_path / "state"), loaded)[0]
    else:  # two machines: nothing shared but Redis
        url = request.getfixturevalue("redis_url")
        first = make_app(make_settings(tmp_path / "a", REDIS_URL=url), loaded)[0]
        second = make_app(make_settings(tmp_path / "b", REDIS_URL=url), loaded)[0]
    default = make_settings(tmp_path).model_version()

    # logit_scale changes the version (and the masks) without adding background prompts
    r = first.test_client().post("/setup", json=setup_body(project="7.123", extra_params='{"logit_scale": 20}'))
    assert r.status_code == 200, r.data
    version = r.get_json()["model_version"]
    assert version != default

    client = second.test_client()
    r = client.post("/predict", json=predict_body([SMALL_URI], project="7.456"))
    assert r.status_code == 200, r.data
    assert [p["model_version"] for p in r.get_json()["results"]] == [version]
    # another project keeps the defaults
    r = client.post("/predict", json=predict_body([SMALL_URI], project="8.456"))
    assert r.status_code == 200, r.data
    assert r.get_json()["results"][0]["model_version"] == default


# --------------------------------------------------------------------------- /predict


def test_predict_captured_shape_one_prediction_per_task_in_order(ls_settings, loaded, images):
    server, sizes = images
    app, _ = make_app(ls_settings(), loaded)
    client = app.test_client()
    r = client.post("/setup", json=setup_body())
    assert r.status_code == 200
    version = r.get_json()["model_version"]

    square = png_bytes(30, 30)
    tasks = [
        (upload("wide.png"), sizes["wide.png"]),
        (upload("rotated.jpg"), sizes["rotated.jpg"]),
        (upload("gone.png"), None),  # 404
        (upload("photo.jpg"), sizes["photo.jpg"]),
        (data_uri(square), (30, 30)),
    ]
    body = predict_body([url for url, _ in tasks])
    assert body["project"] == setup_body()["project"] and body["params"]["context"] is None
    server.auth_seen.clear()
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.data
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    assert all(a == f"Token {API_KEY}" for a in server.auth_seen) and len(server.auth_seen) == 4

    all_ids = []
    for (url, size), pred in zip(tasks, results):
        assert set(pred) == {"result", "score", "model_version"}
        assert pred["model_version"] == version
        if size is None:
            assert pred["result"] == [] and pred["score"] == 0
            continue
        width, height = size
        assert pred["result"], f"{url}: threshold 0 labels every pixel, so some region is expected"
        union = np.zeros((height, width), np.int64)
        scores = []
        for region in pred["result"]:
            assert region["type"] == "brushlabels"
            assert region["from_name"] == "tag" and region["to_name"] == "image"
            assert region["value"]["format"] == "rle"
            assert len(region["value"]["brushlabels"]) == 1 and region["value"]["brushlabels"][0] in LABELS
            assert (region["original_width"], region["original_height"]) == (width, height), url
            assert isinstance(region["id"], str) and region["id"]
            assert 0.0 < region["score"] <= 1.0
            scores.append(region["score"])
            mask = decoded_mask(region)
            assert set(np.unique(mask)) <= {0, 255}
            assert mask.any(), f"{url}: an empty region was returned"
            union += mask == 255
            all_ids.append(region["id"])
        labels = [x["value"]["brushlabels"][0] for x in pred["result"]]
        assert len(labels) == len(set(labels)), "one region per label"
        # threshold 0: every pixel belongs to exactly one label
        assert (union == 1).all(), f"{url}: masks overlap or leave pixels out"
        assert min(scores) - 1e-9 <= pred["score"] <= max(scores) + 1e-9
    assert len(all_ids) == len(set(all_ids)), "region ids must be unique"


@pytest.mark.parametrize("name", [
    PREDICT_FILE,
    "04_predict__interactive_annotating_with_context.json",
    "05_predict__api_ml_predict_test_random.json",
    "06_predict__auto_on_GET_api_tasks_id.json",
])
def test_every_captured_predict_body_is_answered(ls_settings, loaded, images, name):
    """The bodies exactly as Label Studio sent them, only the image file name changed."""
    _, sizes = images
    client = make_app(ls_settings(), loaded)[0].test_client()
    version = client.post("/setup", json=setup_body()).get_json()["model_version"]
    body = captured(name)
    assert body["tasks"][0]["data"]["image"].startswith("/data/upload/1/")
    for task in body["tasks"]:
        task["data"]["image"] = upload("wide.png")
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.data
    results = r.get_json()["results"]
    assert len(results) == len(body["tasks"])
    for pred in results:
        assert pred["model_version"] == version and pred["result"]
        assert {(x["original_width"], x["original_height"]) for x in pred["result"]} == {sizes["wide.png"]}


def test_predict_with_no_tasks_answers_an_empty_list(tmp_path, loaded):
    client = make_app(make_settings(tmp_path), loaded)[0].test_client()
    r = client.post("/predict", json=predict_body([]))
    assert r.status_code == 200, r.data
    assert r.get_json()["results"] == []


@pytest.mark.parametrize("kwargs, words", [
    (dict(data='{"tasks": [', content_type="application/json"), ["JSON"]),
    (dict(json=[{"id": 1}]), ["JSON object", "list"]),
    (dict(json={"label_config": "<View/>", "project": "1.2"}), ["missing 'tasks'"]),
    (dict(json="TASKS"), ["JSON object"]),
    (dict(json=predict_body([SMALL_URI], tasks={"id": 1, "data": {"image": SMALL_URI}})), ["'tasks' must be a list"]),
    (dict(json=predict_body([SMALL_URI], tasks=[{"id": 1, "data": {"image": SMALL_URI}}, "task 2"])),
     ["tasks[1]", "str", "not a task object"]),
    (dict(json=predict_body([SMALL_URI], label_config=None)), ["label config"]),
    (dict(json=predict_body([SMALL_URI], label_config='<View><Image name="i" value="$image"/></View>')),
     ["BrushLabels"]),
    (dict(json=predict_body([SMALL_URI], extra_params='{"bogus": 1}')), ["unknown setting", "bogus"]),
])
def test_predict_rejects_malformed_requests_with_a_message(tmp_path, loaded, kwargs, words):
    app, _ = make_app(make_settings(tmp_path), loaded)
    client = app.test_client()
    r = client.post("/predict", **kwargs)
    assert r.status_code == 400, r.data
    message = r.get_json()["error"]
    for word in words:
        assert word in message, message
    assert metric(client, "gem_model_forward_seconds_count") == 0


@pytest.mark.parametrize("bad", [{"id": 2, "data": {"img": SMALL_URI}}, {"id": 2, "data": {"image": ""}},
                                 {"id": 2, "data": {"image": 7}}, {"id": 2, "data": {"image": [SMALL_URI]}},
                                 {"id": 2}])
def test_a_task_without_its_image_gets_its_own_empty_prediction(tmp_path, loaded, caplog, bad):
    app, _ = make_app(make_settings(tmp_path), loaded)
    tasks = [{"id": 1, "data": {"image": SMALL_URI}}, bad, {"id": 3, "data": {"image": SMALL_URI}}]
    r = app.test_client().post("/predict", json=predict_body([SMALL_URI], tasks=tasks))
    assert r.status_code == 200, r.data
    results = r.get_json()["results"]
    assert len(results) == 3
    assert results[0]["result"] and results[2]["result"]  # the others are predicted
    assert results[1]["result"] == [] and results[1]["score"] == 0
    assert results[1]["model_version"] == results[0]["model_version"]
    assert any("task 2" in rec.getMessage() and ("data.image" in rec.getMessage() or "'data'" in rec.getMessage())
               for rec in caplog.records)  # the reason, naming the task


def test_predict_body_over_the_limit_is_413(tmp_path, loaded):
    app, _ = make_app(make_settings(tmp_path, GEM_MAX_REQUEST_BYTES=4096), loaded)
    client = app.test_client()
    body = predict_body([data_uri(b"\0" * 8000)])
    assert len(json.dumps(body)) > 4096
    r = client.post("/predict", json=body)
    assert r.status_code == 413
    assert r.is_json and r.get_json()["error"]
    r = client.post("/predict", json=predict_body([SMALL_URI], label_config=None))
    assert r.status_code == 400, "a body under the limit is read"


# --------------------------------------------------------------------------- /webhook, /versions, /metrics


@pytest.mark.parametrize("name", WEBHOOK_FILES)
def test_webhook_accepts_each_captured_event_quickly(tmp_path, loaded, name):
    app, service = make_app(make_settings(tmp_path), loaded)
    body = captured(name)
    started = time.perf_counter()
    r = app.test_client().post("/webhook", json=body)
    assert time.perf_counter() - started < 1.0
    assert r.status_code == 200, r.data
    assert r.get_json()["action"] == body["action"]


def test_webhook_without_a_json_body_is_still_200(tmp_path):
    app, _ = make_app(make_settings(tmp_path))
    r = app.test_client().post("/webhook", data="ping", content_type="text/plain")
    assert r.status_code == 200


def test_versions_lists_the_model_version(tmp_path):
    settings = make_settings(tmp_path)
    app, _ = make_app(settings)
    r = app.test_client().get("/versions")
    assert r.status_code == 200
    body = r.get_json()
    assert body["versions"] == [settings.model_version()]
    assert body["model_version"] == settings.model_version()


def test_metrics_is_prometheus_text(tmp_path, loaded):
    app, _ = make_app(make_settings(tmp_path), loaded)
    client = app.test_client()
    assert client.get("/health").status_code == 200
    assert client.post("/predict", json=predict_body([SMALL_URI])).status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    for name in ("gem_requests_total", "gem_model_forward_seconds", "gem_text_cache_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in text and name in text
    values = metric_values(text)  # parses, or the test fails
    assert values[("gem_requests_total", frozenset({("route", "/predict"), ("status", "200")}))] == 1
    assert values[("gem_requests_total", frozenset({("route", "/health"), ("status", "200")}))] == 1
    assert values[("gem_model_forward_seconds_count", frozenset())] == 1
    assert values[("gem_text_cache_total", frozenset({("result", "misses")}))] == len(LABELS)
    assert values[("gem_predictions_total", frozenset())] == 1


# --------------------------------------------------------------------------- text cache


def test_repeated_label_set_does_no_text_tower_work(tmp_path, loaded, monkeypatch):
    app, _ = make_app(make_settings(tmp_path), loaded)
    client = app.test_client()
    calls = []
    original = loaded.gem.encode_text

    def counting(labels, templates):
        calls.append(list(labels))
        return original(labels, templates)

    monkeypatch.setattr(loaded.gem, "encode_text", counting)
    first = client.post("/predict", json=predict_body([SMALL_URI]))
    assert first.status_code == 200
    after_first = cache_counts(client)
    assert after_first["misses"] == len(LABELS) and calls, "the first request encodes its labels"
    calls.clear()

    second = client.post("/predict", json=predict_body([SMALL_URI]))
    assert second.status_code == 200
    after_second = cache_counts(client)
    assert calls == [], f"text tower ran again for {calls}"
    assert after_second["misses"] == after_first["misses"]
    assert after_second["local_hits"] - after_first["local_hits"] == len(LABELS)
    assert without_ids(second.get_json()["results"][0]) == without_ids(first.get_json()["results"][0])


def test_two_apps_with_one_redis_share_text_embeddings(tmp_path, loaded, redis_url):
    first = make_app(make_settings(tmp_path / "a", REDIS_URL=redis_url), loaded)[0].test_client()
    second = make_app(make_settings(tmp_path / "b", REDIS_URL=redis_url), loaded)[0].test_client()
    r1 = first.post("/predict", json=predict_body([SMALL_URI]))
    assert r1.status_code == 200
    assert cache_counts(first) == {"local_hits": 0, "redis_hits": 0, "misses": len(LABELS)}

    r2 = second.post("/predict", json=predict_body([SMALL_URI]))
    assert r2.status_code == 200
    counts = cache_counts(second)
    assert counts["redis_hits"] == len(LABELS) and counts["misses"] == 0, counts
    assert without_ids(r2.get_json()["results"][0]) == without_ids(r1.get_json()["results"][0])


def test_redis_stopped_mid_run_predict_still_answers_correctly(tmp_path, loaded, restartable_redis):
    settings = make_settings(tmp_path / "state", REDIS_URL=restartable_redis.url)
    client = make_app(settings, loaded)[0].test_client()
    extra = {"logit_scale": 30}
    r = client.post("/setup", json=setup_body(project="9.1", extra_params=extra))
    assert r.status_code == 200
    version = r.get_json()["model_version"]
    baseline = client.post("/predict", json=predict_body([SMALL_URI], project="9.2"))
    assert baseline.status_code == 200
    expected = without_ids(baseline.get_json()["results"][0])
    assert expected["model_version"] == version and expected["result"]

    restartable_redis.stop()
    started = time.perf_counter()
    r = client.post("/predict", json=predict_body([SMALL_URI], project="9.3"))
    assert r.status_code == 200, r.data
    assert without_ids(r.get_json()["results"][0]) == expected
    assert time.perf_counter() - started < 10

    # a worker started while Redis is down encodes the text itself
    fresh = make_app(settings.replace(state_dir=str(tmp_path / "other")), loaded)[0].test_client()
    r = fresh.post("/predict", json=predict_body([SMALL_URI], project="9.4", extra_params=extra))
    assert r.status_code == 200, r.data
    assert without_ids(r.get_json()["results"][0]) == expected
    counts = cache_counts(fresh)
    assert counts["misses"] == len(LABELS) and counts["redis_hits"] == 0


# --------------------------------------------------------------------------- basic auth

USER = "labelstudio"
PASSWORD = "pw-Zq8x!unlikely-0451"


def _auth(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _routes():
    """Every route with a request that succeeds when authorized."""
    return [
        ("GET", "/", {}),
        ("GET", "/health", {}),
        ("GET", "/versions", {}),
        ("GET", "/metrics", {}),
        ("POST", "/setup", dict(json=setup_body())),
        ("POST", "/predict", dict(json=predict_body([SMALL_URI]))),
        ("POST", "/webhook", dict(json=captured(WEBHOOK_FILES[1]))),
    ]


def test_basic_auth_protects_every_route_and_never_leaks_the_password(tmp_path, loaded, caplog):
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    assert PASSWORD not in repr(settings)
    client = make_app(settings, loaded)[0].test_client()
    seen = []
    wrong = {
        "none": {},
        "wrong password": _auth(USER, PASSWORD + "x"),
        "wrong user": _auth("admin", PASSWORD),
        "empty password": _auth(USER, ""),
        "bearer": {"Authorization": f"Bearer {PASSWORD}"},
    }
    for method, path, kwargs in _routes():
        for what, headers in wrong.items():
            if path == "/webhook":
                continue  # open by default, see below
            r = client.open(path, method=method, headers=headers, **kwargs)
            seen.append(r)
            assert r.status_code == 401, f"{method} {path} with {what}: {r.status_code}"
            assert r.headers["WWW-Authenticate"].startswith("Basic")
        r = client.open(path, method=method, headers=_auth(USER, PASSWORD), **kwargs)
        seen.append(r)
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.data[:200]!r}"

    # Label Studio sends webhooks without credentials: open unless GEM_WEBHOOK_AUTH=1
    r = client.post("/webhook", json=captured(WEBHOOK_FILES[0]))
    seen.append(r)
    assert r.status_code == 200
    strict = make_app(settings.replace(webhook_auth=True), loaded)[0].test_client()
    assert make_settings(tmp_path, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD,
                         GEM_WEBHOOK_AUTH="1").webhook_auth is True
    for what, headers in wrong.items():
        r = strict.post("/webhook", json=captured(WEBHOOK_FILES[0]), headers=headers)
        seen.append(r)
        assert r.status_code == 401, what
    r = strict.post("/webhook", json=captured(WEBHOOK_FILES[0]), headers=_auth(USER, PASSWORD))
    seen.append(r)
    assert r.status_code == 200

    for r in seen:
        assert PASSWORD not in r.get_data(as_text=True)
        assert all(PASSWORD not in value for _, value in r.headers.items())
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in str(record.args) for record in caplog.records)
