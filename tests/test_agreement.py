"""Agreement over time: the IoU between annotations and this backend's predictions, recorded
from the captured Label Studio webhooks replayed to the app, its running figures (JSON route,
/metrics, `gem-backend eval --project ID --agreement`), and Redis stopped during an event.

The real Label Studio round trip (webhook delivered by Label Studio) is in
tests/test_e2e_bitmask.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import time

import numpy as np
import pytest

from gem_backend.cli import main
from gem_backend.labelstudio.brush import mask2rle
from gem_backend.labelstudio.results import bitmask_region
from gem_backend.labelstudio.spec import parse_labeling_config
from gem_backend.serving.agreement import compare_results, find_our_prediction
from test_active_learning import CREATED, DELETED, UPDATED, H, W, photo_uri, webhook
from test_app import loaded, make_app, make_settings, metric, predict_body  # noqa: F401

CONFIG = parse_labeling_config('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                               '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')


def brush(mask: np.ndarray, label: str) -> dict:
    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "value": {"format": "rle",
                                                         "rle": mask2rle(mask.astype(np.uint8) * 255),
                                                         "brushlabels": [label]}}


def box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------------- the figures
def test_iou_per_label_and_overall_across_region_kinds():
    cat, dog = box(0, 32, 0, 48), box(32, 64, 48, 96)
    pred = [brush(cat, "cat"), brush(dog, "dog")]
    assert compare_results(pred, pred, CONFIG.targets) == {"iou": 1.0, "labels": {"cat": 1.0, "dog": 1.0},
                                                           "problems": []}
    # the annotator keeps the cat as a bitmask, moves half of it, and draws no dog
    target = parse_labeling_config('<View><Image name="image" value="$image"/><BitmaskLabels name="tag" '
                                   'toName="image"><Label value="cat"/></BitmaskLabels></View>').targets[0]
    moved = bitmask_region(box(0, 32, 24, 72), "cat", target, 1.0)
    out = compare_results([moved], pred, CONFIG.targets)
    assert out["labels"] == {"cat": pytest.approx(24 * 32 / (72 * 32)), "dog": 0.0}
    assert out["iou"] == pytest.approx((1 / 3 + 0) / 2)
    assert compare_results([], [], CONFIG.targets)["iou"] == 1.0


def test_iou_is_counted_over_every_band_of_a_tall_image():
    tall = np.zeros((700, 10), bool)
    tall[100:600] = True          # 500 rows: across the 256-row bands
    shifted = np.zeros((700, 10), bool)
    shifted[350:700] = True       # overlaps rows 350..599: 250 of 600 rows
    out = compare_results([brush(shifted, "cat")], [brush(tall, "cat")], CONFIG.targets)
    assert out["labels"] == {"cat": pytest.approx(250 / 600)}


def test_our_prediction_is_the_parent_or_the_newest_gem_one():
    preds = [{"id": 1, "model_version": "gem-a", "result": [], "created_at": "2026-01-01"},
             {"id": 2, "model_version": "gem-b", "result": [], "created_at": "2026-02-01"},
             {"id": 3, "model_version": "other-backend", "result": [], "created_at": "2026-03-01"}]
    assert find_our_prediction({}, preds)["id"] == 2
    assert find_our_prediction({"parent_prediction": 1}, preds)["id"] == 1
    assert find_our_prediction({"parent_prediction": 3}, preds)["id"] == 2
    assert find_our_prediction({}, preds[2:]) is None


# ----------------------------------------------------------------------------------- through the app
class Backend:
    """The app, our prediction for the photo task, and Label Studio's prediction list played
    by a function (what ``GET /api/predictions?task=ID`` answers)."""

    def __init__(self, tmp_path, loaded, **env):
        self.app, self.service = make_app(make_settings(tmp_path, **env), loaded)
        self.client = self.app.test_client()
        self.agreement = self.app.extensions["gem_agreement"]
        self.uri = photo_uri()
        r = self.client.post("/predict", json=predict_body([self.uri]))
        assert r.status_code == 200, r.data
        self.prediction = dict(r.get_json()["results"][0], id=11, task=1)
        assert {x["value"]["brushlabels"][0] for x in self.prediction["result"]} == {"cat", "dog"}
        self.agreement.predictions = lambda task: [self.prediction, {"id": 12, "model_version": "another-model",
                                                                     "result": [], "task": task}]

    def post(self, body, drain=True) -> dict:
        started = time.perf_counter()
        r = self.client.post("/webhook", json=body)
        assert time.perf_counter() - started < 1.0  # Label Studio's webhook timeout
        assert r.status_code == 200, r.data
        if drain:
            assert self.agreement.drain(60)
        return r.get_json()

    def figures(self, project=1, **args):
        r = self.client.get(f"/agreement/{project}", query_string=args)
        return r.status_code, r.get_json()


def test_created_updated_deleted_annotations_make_the_running_figures(tmp_path, loaded):
    b = Backend(tmp_path, loaded)
    ours = b.prediction["result"]
    assert b.post(webhook(CREATED, b.uri, annotation=5, result=ours))["agreement"] == "queued"
    status, fig = b.figures()
    assert status == 200
    assert fig["annotations"] == 1 and fig["mean_iou"] == pytest.approx(1.0)
    assert fig["labels"] == {"cat": {"annotations": 1, "mean_iou": 1.0}, "dog": {"annotations": 1, "mean_iou": 1.0}}
    assert fig["recent"][0]["prediction"] == 11 and fig["recent"][0]["model_version"].startswith("gem-")

    # the annotator redraws: everything is cat
    everything = np.ones((H, W), bool)
    b.post(webhook(UPDATED, b.uri, annotation=5, result=[brush(everything, "cat")],
                   updated_at="2030-01-01T00:00:00Z"))
    expected = compare_results([brush(everything, "cat")], ours, CONFIG.targets)
    assert expected["labels"]["dog"] == 0.0 and 0 < expected["labels"]["cat"] < 1
    status, fig = b.figures()
    assert fig["annotations"] == 1  # an update replaces the annotation's record
    assert fig["mean_iou"] == pytest.approx(expected["iou"])
    assert [e["action"] for e in fig["recent"]] == ["ANNOTATION_UPDATED", "ANNOTATION_CREATED"]
    # an older copy arriving late does not overwrite the newer one
    b.post(webhook(CREATED, b.uri, annotation=5, result=ours))
    assert b.figures()[1]["mean_iou"] == pytest.approx(expected["iou"])

    b.post(webhook(CREATED, b.uri, annotation=6, result=ours))
    status, fig = b.figures(last=1)
    assert fig["annotations"] == 2 and len(fig["recent"]) == 1
    assert fig["mean_iou"] == pytest.approx((expected["iou"] + 1.0) / 2)
    assert fig["labels"]["dog"] == {"annotations": 2, "mean_iou": 0.5}
    assert metric(b.client, "gem_agreement_iou", project="1") == pytest.approx(fig["mean_iou"])
    assert metric(b.client, "gem_agreement_label_iou", project="1", label="dog") == pytest.approx(0.5)
    assert metric(b.client, "gem_agreement_annotations", project="1") == 2
    assert metric(b.client, "gem_agreement_events_total", result="recorded") == 4

    b.post(webhook(DELETED, b.uri, annotation=6))
    assert b.figures()[1]["annotations"] == 1
    assert b.figures(project="bad id!")[0] == 400


def test_no_prediction_of_ours_records_nothing(tmp_path, loaded):
    b = Backend(tmp_path, loaded)
    b.agreement.predictions = lambda task: [{"id": 12, "model_version": "another-model", "result": [], "task": task}]
    b.post(webhook(CREATED, b.uri, annotation=5, result=b.prediction["result"]))
    assert b.figures()[1]["annotations"] == 0
    assert metric(b.client, "gem_agreement_events_total", result="no_prediction") == 1


def test_webhook_answers_at_once_while_label_studio_is_slow(tmp_path, loaded):
    b = Backend(tmp_path, loaded)
    slow = b.agreement.predictions
    b.agreement.predictions = lambda task: (time.sleep(2.0), slow(task))[1]
    b.post(webhook(CREATED, b.uri, annotation=5, result=b.prediction["result"]), drain=False)  # < 1 s
    assert b.agreement.drain(60)
    assert b.figures()[1]["annotations"] == 1


def test_redis_away_during_an_event_the_record_waits_and_is_written_when_it_is_back(tmp_path, loaded,
                                                                                    restartable_redis, monkeypatch):
    b = Backend(tmp_path, loaded, REDIS_URL=restartable_redis.url)
    b.post(webhook(CREATED, b.uri, annotation=5, result=b.prediction["result"]))
    assert b.figures()[1]["annotations"] == 1
    restartable_redis.stop()
    try:
        b.post(webhook(CREATED, b.uri, annotation=6, result=b.prediction["result"]))  # answered at once
        assert metric(b.client, "gem_agreement_events_total", result="pending") == 1
        assert metric(b.client, "gem_agreement_pending") == 1
        status, body = b.figures()
        assert status == 503 and "unavailable" in body["error"]
    finally:
        restartable_redis.start()
    deadline = time.monotonic() + 20
    while b.agreement.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    status, fig = b.figures()
    # the test server keeps nothing across a restart (no persistence): only the waiting record is there
    assert status == 200 and fig["annotations"] == 1 and fig["pending"] == 0
    assert [e["annotation"] for e in fig["recent"]] == ["6"]
    assert metric(b.client, "gem_agreement_events_total", result="written_late") == 1

    # the figures are in Redis, durable (no TTL), for every process and the CLI
    import redis

    client = redis.Redis.from_url(restartable_redis.url)
    assert client.ttl("gem:agreement:1:ann") == -1 and client.ttl("gem:agreement:1:recent") == -1
    monkeypatch.setenv("REDIS_URL", restartable_redis.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--project", "1", "--agreement"]) == 0
    printed = json.loads(out.getvalue())
    assert printed["project"] == "1" and printed["annotations"] == 1 and printed["mean_iou"] == pytest.approx(1.0)


def test_cli_agreement_from_the_file_store(tmp_path, loaded, monkeypatch):
    b = Backend(tmp_path, loaded)
    b.post(webhook(CREATED, b.uri, annotation=5, result=[brush(np.ones((H, W), bool), "cat")]))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("GEM_STATE_DIR", str(tmp_path))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--project", "1", "--agreement"]) == 0
    printed = json.loads(out.getvalue())
    assert printed["annotations"] == 1 and printed["mean_iou"] == pytest.approx(b.figures()[1]["mean_iou"])
    assert printed["mean_iou"] < 1.0


def test_cli_eval_says_what_is_missing(capsys):
    assert main(["eval", "--agreement"]) == 2
    assert "--agreement needs --project" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "give --dataset and --root (a benchmark), or --project ID" in capsys.readouterr().err
