"""Active learning: the uncertainty score, prototypes learnt from annotation webhooks (the captured
Label Studio bodies, with masks built here), ``gem-backend learn`` against the real Label Studio,
and the simulated loop of ``gem-backend eval --active-learning`` on voc-mini.

The model is the fixed small random CLIP of the golden reference (its masks mean nothing, but its
features still carry colour and texture, which is what prototypes pick up)."""

from __future__ import annotations

import copy
import io
import json
import logging
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from gem_backend import cli
from gem_backend.labelstudio.brush import mask2rle
from gem_backend.serving.prototypes import BACKGROUND_KEY, FilePrototypeStore, feature_namespace
from gem_backend.algorithm.segmentation import GEMPredictor, ImageEmbedding, SegmentationSettings
from gem_backend.settings import Settings
from helpers import GOLDEN, VOC_MINI, shared_path
from test_app import captured, data_uri, loaded, make_app, make_settings, predict_body, setup_body  # noqa: F401
from test_prelabel import TOKEN, _main_in_process, label_studio  # noqa: F401

CREATED, UPDATED, DELETED = ("09_webhook_ANNOTATION_CREATED.json", "10_webhook_ANNOTATION_UPDATED.json",
                             "11_webhook_ANNOTATIONS_DELETED.json")
W, H = 96, 64


# ----------------------------------------------------------------------------------- uncertainty
def fixed_predictor(text: np.ndarray, labels, **seg) -> GEMPredictor:
    """A GEMPredictor whose text embeddings are ``text`` (rows in the order of ``labels``)."""
    rows = {label: text[i] for i, label in enumerate(labels)}
    fake = SimpleNamespace(gem=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    settings = SegmentationSettings(**{"threshold": 0.0, "min_area": 0.0, **seg})
    return GEMPredictor(fake, settings, text_encoder=lambda names, templates: np.stack([rows[n] for n in names]))


def uniform_image(cosines) -> ImageEmbedding:
    """Every patch has these cosines with the first len(cosines) unit axes (the text embeddings)."""
    c = np.asarray(cosines, np.float64)
    v = np.append(c, np.sqrt(1.0 - (c ** 2).sum()))
    patches = torch.from_numpy(np.tile(v, (16, 1)).astype(np.float32))
    return ImageEmbedding(patches=patches, grid=(4, 4), input_size=(32, 32), original_size=(32, 32))


def test_margin_score_puts_the_ambiguous_image_first_where_mean_prob_does_not():
    labels = ["cat", "dog", "bird", "cow", "sheep"]
    predictor = fixed_predictor(np.eye(5, 6), labels, logit_scale=10.0)
    # confident: one label clearly ahead of four equal ones; ambiguous: cat and dog neck and neck
    confident = predictor.predict(labels, uniform_image([0.5, 0.4, 0.4, 0.4, 0.4]))
    ambiguous = predictor.predict(labels, uniform_image([0.6, 0.59, 0.0, 0.0, 0.0]))
    p = np.exp([5.0, 4.0, 4.0, 4.0, 4.0]) / np.exp([5.0, 4.0, 4.0, 4.0, 4.0]).sum()
    assert confident.task_score("margin") == pytest.approx(p[0] - p[1], abs=1e-5)
    assert confident.task_score("margin") > 0.2 > 0.05 > ambiguous.task_score("margin")
    # the winning probability alone says the opposite: sorting by it would show the confident one first
    assert ambiguous.task_score("mean_prob") > confident.task_score("mean_prob")
    assert confident.task_score("mean_prob") == confident.score


def test_margin_of_the_chunked_decision_equals_the_direct_one():
    rng = np.random.default_rng(0)
    labels = [f"label {i}" for i in range(40)]  # > 32 prompts: the running-softmax path
    text = rng.normal(size=(40, 16)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    patches = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(30, 16)).astype(np.float32)), dim=1)
    emb = ImageEmbedding(patches=patches, grid=(5, 6), input_size=(40, 48), original_size=(40, 48))
    predictor = fixed_predictor(text, labels, logit_scale=20.0)
    winner, best, second = predictor._decide(labels, emb)
    probs = np.sort(predictor.probabilities(labels, emb), axis=0)
    np.testing.assert_allclose(best, probs[-1], atol=1e-5)
    np.testing.assert_allclose(second, probs[-2], atol=1e-5)
    seg = predictor.predict(labels, emb)
    assert 0.0 <= seg.task_score("margin") <= seg.task_score("mean_prob") <= 1.0


def test_score_kind_setting_through_predict(tmp_path, loaded):
    uri = photo_uri()
    out = {}
    for kind in ("mean_prob", "margin"):
        app, _ = make_app(make_settings(tmp_path / kind, GEM_SCORE=kind), loaded)
        r = app.test_client().post("/predict", json=predict_body([uri]))
        assert r.status_code == 200, r.data
        out[kind] = r.get_json()["results"][0]
    a, b = out["mean_prob"], out["margin"]
    assert [x["score"] for x in a["result"]] == [x["score"] for x in b["result"]]  # per-region scores stay
    assert 0.0 <= b["score"] < a["score"] <= 1.0  # margin = best - second <= best, pixel by pixel
    assert a["model_version"] != b["model_version"]  # the score kind is in the version
    assert Settings.from_env({"GEM_SCORE": "Margin"}).segmentation.score == "margin"
    assert Settings().model_version() == Settings.from_env({"GEM_PROTOTYPE_STRENGTH": "0.9"}).model_version()


# ----------------------------------------------------------------------------------- webhooks
def photo_uri() -> str:
    photo = sorted(shared_path("data", "voc-mini", "VOC2012", "JPEGImages").glob("*.jpg"))[0]
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").resize((W, H)).save(buf, "PNG")
    return data_uri(buf.getvalue())


def brush_result(mask: np.ndarray, label: str) -> dict:
    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}


def left_half() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[:, : W // 2] = True
    return mask


def webhook(name: str, uri: str, annotation: int = 1, project: int = 1, result=None, updated_at=None) -> dict:
    """A captured webhook body, for our annotation id, project, image and result."""
    body = copy.deepcopy(captured(name))
    body["project"]["id"] = project
    if "annotations" in body:  # ANNOTATIONS_DELETED
        body["annotations"] = [{"id": annotation}]
        return body
    body["annotation"].update(id=annotation, project=project)
    body["task"]["data"] = {"image": uri}
    if result is not None:
        body["annotation"]["result"] = result
    if updated_at:
        body["annotation"]["updated_at"] = updated_at
    return body


class Backend:
    """The app with prototypes on (n_min 2), and helpers."""

    def __init__(self, tmp_path, loaded, **env):
        env = {"GEM_PROTOTYPES": "on", "GEM_PROTOTYPE_MIN_ANNOTATIONS": "2", **env}
        self.settings = make_settings(tmp_path, **env)
        self.app, self.service = make_app(self.settings, loaded)
        self.client = self.app.test_client()
        self.learner = self.app.extensions["gem_learner"]

    def post(self, body) -> dict:
        started = time.perf_counter()
        r = self.client.post("/webhook", json=body)
        assert time.perf_counter() - started < 1.0  # Label Studio's webhook timeout
        assert r.status_code == 200, r.data
        return r.get_json()

    def learn(self, body) -> dict:
        out = self.post(body)
        assert self.learner.drain(60)
        return out

    def version(self, project) -> str:
        r = self.client.post("/setup", json=setup_body(project=f"{project}.1716"))
        assert r.status_code == 200, r.data
        return r.get_json()["model_version"]

    def totals(self, project=1) -> dict:
        return {k: v.annotations for k, v in self.service.prototype_store.totals(project).items()}


def test_created_updated_deleted_webhooks_update_the_store(tmp_path, loaded):
    b = Backend(tmp_path, loaded, GEM_THRESHOLD="0.3")
    uri = photo_uri()
    started = time.perf_counter()
    answer = b.post(webhook(CREATED, uri, result=[brush_result(left_half(), "cat")]))
    assert answer == {"status": "ok", "action": "ANNOTATION_CREATED", "prototypes": "queued", "agreement": "queued"}
    assert time.perf_counter() - started < 1.0
    assert b.learner.drain(60)
    assert b.totals() == {"cat": 1, BACKGROUND_KEY: 1}
    c = b.service.prototype_store.contribution(1, 1)
    seg = b.service.project(captured(CREATED)["project"]["label_config"]).segmentation
    grid = b.service.image_embedding(b.service.predictor(seg), uri, 1, seg).grid  # from the image cache
    assert c.labels["cat"].patches == grid[0] * grid[1] // 2  # the left half of the token grid
    assert c.labels[BACKGROUND_KEY].patches == grid[0] * grid[1] // 2

    b.learn(webhook(UPDATED, uri, result=[brush_result(~left_half(), "dog")], updated_at="2030-01-01T00:00:00Z"))
    assert b.totals() == {"dog": 1, BACKGROUND_KEY: 1}  # replaced, not added
    assert b.learn(webhook(DELETED, uri))["prototypes"] == "queued"
    assert b.totals() == {}
    assert b.learn(webhook(CREATED, uri, result=[brush_result(left_half(), "cat")]))  # deleted stays deleted
    assert b.totals() == {}
    assert b.post({"action": "TASKS_CREATED"})["prototypes"] == "ignored"


def test_webhook_answers_before_slow_learning_finishes(tmp_path, loaded, monkeypatch):
    b = Backend(tmp_path, loaded)
    release = threading.Event()
    real = b.service.image_embedding

    def slow(*args, **kwargs):  # an image download or forward pass far slower than Label Studio waits
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(b.service, "image_embedding", slow)
    for aid in (1, 2, 3):
        assert b.post(webhook(CREATED, photo_uri(), annotation=aid,
                              result=[brush_result(left_half(), "cat")]))["prototypes"] == "queued"
    assert b.totals() == {}  # nothing learnt yet: all of it happens after the answers
    release.set()
    assert b.learner.drain(60)
    assert b.totals() == {"cat": 3, BACKGROUND_KEY: 3}


def test_model_version_changes_with_enough_annotations_not_with_each(tmp_path, loaded):
    b = Backend(tmp_path, loaded)
    uri = photo_uri()
    base = b.version(1)
    versions = []
    for aid in range(1, 6):
        b.learn(webhook(CREATED, uri, annotation=aid, result=[brush_result(left_half(), "cat")]))
        versions.append(b.version(1))
    assert versions[0] == base                                 # 1 annotation < n_min = 2: text only
    assert versions[1] != base and versions[1].startswith(base + "-p")
    assert versions[2] == versions[1]                          # 3: same bucket as 2
    assert versions[3] != versions[2] and versions[4] == versions[3]  # 4 and 5: the next one
    assert b.version(2) == base                                # another project: untouched

    with_protos = b.client.post("/predict", json=predict_body([uri], project="1.99")).get_json()
    other = b.client.post("/predict", json=predict_body([uri], project="2.99")).get_json()
    assert with_protos["model_version"] == versions[-1] and other["model_version"] == base
    assert with_protos["results"][0]["score"] != other["results"][0]["score"]  # the blend changed the maps


def test_malformed_annotations_are_skipped_with_a_log_line(tmp_path, loaded, caplog):
    b = Backend(tmp_path, loaded)
    uri = photo_uri()
    bad = brush_result(left_half(), "cat")
    bad["value"]["rle"] = bad["value"]["rle"][:9]
    good = brush_result(left_half(), "dog")
    with caplog.at_level(logging.WARNING, logger="gem_backend"):
        b.learn(webhook(CREATED, uri, annotation=1, result=[bad, good]))    # the bad result only
        b.learn(webhook(CREATED, uri, annotation=2, result="not a list"))  # the whole annotation
        b.learn({"action": "ANNOTATION_CREATED", "project": {"id": 1}})    # no annotation at all
        body = webhook(CREATED, uri, annotation=3, result=[good])
        body["task"]["data"] = {"image": "data:image/png;base64,AAAA"}     # an image that cannot be decoded
        b.learn(body)
    assert b.totals() == {"dog": 1, BACKGROUND_KEY: 1}  # annotation 1's good result only
    text = caplog.text
    assert "annotation 1 of task 1" in text and "bad RLE" in text
    assert "annotation 2 of task 1 skipped" in text and "not a list" in text
    assert "without annotation and task" in text and "annotation 3 of task 1 skipped" in text


def test_prototypes_off_learns_nothing_and_answers_the_same(tmp_path, loaded):
    b = Backend(tmp_path, loaded, GEM_PROTOTYPES="off")
    base = b.version(1)
    assert b.learn(webhook(CREATED, photo_uri(), result=[brush_result(left_half(), "cat")]))["prototypes"] == "queued"
    assert b.totals() == {} and b.version(1) == base == b.settings.model_version()
    # per project: extra_params turn them on for one project only
    r = b.client.post("/setup", json=setup_body(project="4.1", extra_params={"prototypes": True,
                                                                              "prototype_min_annotations": 1}))
    assert r.status_code == 200
    b.learn(webhook(CREATED, photo_uri(), annotation=9, project=4, result=[brush_result(left_half(), "cat")]))
    assert b.totals(4)["cat"] == 1 and b.version(1) == base
    r = b.client.post("/setup", json=setup_body(project="4.2", extra_params={"prototypes": True,
                                                                              "prototype_min_annotations": 1}))
    assert "-p" in r.get_json()["model_version"][len(base):]


def test_workers_sharing_redis_share_prototypes(tmp_path, loaded, redis_url):
    one = Backend(tmp_path / "a", loaded, REDIS_URL=redis_url, GEM_PROTOTYPE_MIN_ANNOTATIONS="1")
    two = Backend(tmp_path / "b", loaded, REDIS_URL=redis_url, GEM_PROTOTYPE_MIN_ANNOTATIONS="1")
    base = two.version(1)
    one.learn(webhook(CREATED, photo_uri(), result=[brush_result(left_half(), "cat")]))
    assert two.totals() == {"cat": 1, BACKGROUND_KEY: 1}
    assert two.version(1) == one.version(1) != base
    two.learn(webhook(DELETED, photo_uri()))
    assert one.totals() == {} and one.version(1) == base


# ----------------------------------------------------------------------------------- gem-backend learn
LEARN_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                '<Label value="cat"/><Label value="dog"/></BrushLabels>'
                '<PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>'
                '</View>')


def test_learn_reads_existing_annotations_through_the_api(label_studio, monkeypatch, tmp_path, capsys):  # noqa: F811
    ls = label_studio
    pid = ls.req("POST", "/api/projects", json={"title": "learn test", "label_config": LEARN_CONFIG})["id"]
    photo = io.BytesIO()
    Image.open(sorted((VOC_MINI / "VOC2012" / "JPEGImages").glob("*.jpg"))[1]).convert("RGB").resize((W, H)).save(
        photo, "PNG")
    files = {f"f{i}": (f"img{i}.png", photo.getvalue(), "image/png") for i in range(2)}
    ls.req("POST", f"/api/projects/{pid}/import", files=files)
    t1, t2 = ls.task_ids(pid)
    polygon = {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": W,
               "original_height": H, "value": {"points": [[70, 30], [90, 30], [90, 70], [70, 70]],
                                               "polygonlabels": ["dog"]}}
    a1 = ls.req("POST", f"/api/tasks/{t1}/annotations", json={"result": [brush_result(left_half(), "cat"), polygon]})
    a2 = ls.req("POST", f"/api/tasks/{t2}/annotations", json={"result": [brush_result(~left_half(), "dog")]})
    state = tmp_path / "state"
    args = ["learn", "--project", str(pid), "--no-progress", "--summary-json", str(tmp_path / "s.json")]
    env = dict(GEM_STATE_DIR=str(state), GEM_PROTOTYPES="on", GEM_PROTOTYPE_MIN_ANNOTATIONS="1")
    assert _main_in_process(monkeypatch, ls.url, *args, **env) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["learnt"] == 2 and summary["tasks"] == 2 and summary["removed"] == 0
    assert summary["labels"] == {"cat": 1, "dog": 2, BACKGROUND_KEY: 2}
    settings = Settings.from_env({k: v for k, v in _env_for_learn(ls.url, env).items()})
    store = FilePrototypeStore(state, feature_namespace(settings))
    assert store.annotation_ids(pid) == {str(a1["id"]), str(a2["id"])}
    assert "-p" in summary["model_version"] and "annotations per label" in capsys.readouterr().out

    requests.delete(f"{ls.url}/api/annotations/{a2['id']}/", headers={"Authorization": f"Token {TOKEN}"},
                    timeout=30).raise_for_status()
    assert _main_in_process(monkeypatch, ls.url, *args, **env) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["removed"] == 1 and summary["labels"] == {"cat": 1, "dog": 1, BACKGROUND_KEY: 1}
    assert store.annotation_ids(pid) == {str(a1["id"])}


def _env_for_learn(ls_url: str, extra: dict) -> dict:
    from test_prelabel import _env

    return {k: v for k, v in _env(ls_url, **extra).items() if k.startswith("GEM_")}


# ----------------------------------------------------------------------------------- the simulated loop
def test_eval_loop_on_voc_mini_prototypes_raise_miou(tmp_path, capsys):
    shared_path("data", "voc-mini", "VOC2012", "ImageSets", "Segmentation", "val.txt")
    out = tmp_path / "al"
    args = ["eval", "--dataset", "voc21", "--root", str(VOC_MINI), "--input-size", "224",
            "--model", str(GOLDEN / "config.json"), "--pretrained", str(GOLDEN / "weights.safetensors"),
            "--device", "cpu", "--precision", "fp32", "--no-progress", "--out", str(out),
            "--active-learning", "1,2,4,8", "--prototype-min-annotations", "1", "--prototype-strength", "0.5"]
    assert cli.main(args) == 0
    results = json.loads((out / "active_learning.json").read_text())
    assert results["random_weights"] and results["images"] == 17
    rows = {r["k"]: r for r in results["rows"]}
    assert sorted(rows) == [1, 2, 4, 8]
    for k, r in rows.items():
        assert r["predicted"] == 17 - k
        assert r["mIoU_after"] > r["mIoU_before"], r  # the prototypes help for every k
    assert rows[8]["annotations_per_class"]["background"] == 8
    md = (out / "active_learning.md").read_text()
    assert "| 8 | 9 |" in md and "Random weights" in capsys.readouterr().out
