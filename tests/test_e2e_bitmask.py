"""BitmaskLabels and agreement against a real Label Studio 1.23 (the rig of ../shared/label-studio).

One project with a BitmaskLabels control (and a KeyPointLabels smart tool) and two uploaded
photos; the backend runs in this process on a free port with the fixed small CLIP of the golden
reference (threshold 0: it labels something on any image), connected to the project, so Label
Studio calls its /setup, /predict and /webhook itself:

- "Retrieve predictions" (Data Manager action) stores the first task's prediction, and
  ``gem-backend prelabel`` (bulk import) the second's; read back through the API, every
  bitmask's PNG decodes to the mask the backend computes for the image, pixel for pixel;
- the smart tool (``/api/ml/{id}/interactive-annotating``) answers with a bitmask;
- annotations created and updated through the API reach the backend as webhooks, and the
  agreement figures follow (IoU 1.0 for the prediction accepted as it is, lower once redrawn).

Needs the rig (``RIG``, see tests/test_prelabel.py).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from gem_backend.labelstudio.annotations import bitmask_mask
from gem_backend.labelstudio.results import bitmask_region
from gem_backend.serving.agreement import compare_results
from helpers import VOC_MINI
from test_app import data_uri
from test_prelabel import GEM_ENV, TOKEN, _main_in_process, label_studio  # noqa: F401

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BitmaskLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BitmaskLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
</View>"""
W, H = 120, 80


def photos() -> list[bytes]:
    out = []
    for path in sorted((VOC_MINI / "VOC2012" / "JPEGImages").glob("*.jpg"))[:2]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").resize((W, H)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture
def backend(label_studio, tmp_path):  # noqa: F811
    """The backend app on a free port, with Label Studio's URL and key (to read predictions)."""
    from werkzeug.serving import make_server

    from gem_backend.serving.app import create_app
    from gem_backend.settings import Settings

    settings = Settings.from_env({**GEM_ENV, "GEM_STATE_DIR": str(tmp_path / "state"),
                                  "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN})
    app = create_app(settings, load_model=False)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def wait_for(check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail("timed out waiting")


def test_bitmask_round_trip_and_agreement_through_label_studio(label_studio, backend, monkeypatch, tmp_path):  # noqa: F811
    ls = label_studio
    app, url = backend
    images = photos()
    pid = ls.req("POST", "/api/projects", json={"title": "bitmask e2e", "label_config": CONFIG})["id"]
    files = {f"f{i}": (f"img{i}.png", data, "image/png") for i, data in enumerate(images)}
    ls.req("POST", f"/api/projects/{pid}/import", files=files)
    t1, t2 = ls.task_ids(pid)
    ml = ls.req("POST", "/api/ml", json={"url": url, "project": pid, "title": "gem", "is_interactive": True})
    assert ml.get("state") == "CO", ml
    version = ml["model_version"]

    # task 1 through Label Studio's /predict call, task 2 through the bulk import of prelabel
    ls.req("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
           json={"selectedItems": {"all": False, "included": [t1]}})
    assert _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--no-progress",
                            GEM_STATE_DIR=str(tmp_path / "cli")) == 0
    service = app.extensions["gem_service"]
    spec = service.project(CONFIG, None)
    stored = {}
    for task, data in zip((t1, t2), images):
        (pred,) = ls.req("GET", "/api/predictions", params={"task": task})
        assert pred["model_version"] == version
        ours = service.predict_tasks([{"id": task, "data": {"image": data_uri(data)}}], label_config=None, spec=spec)[0]
        assert pred["result"] and {r["type"] for r in pred["result"]} == {"bitmasklabels"}
        mine = {r["value"]["bitmasklabels"][0]: r for r in ours["result"]}
        theirs = {r["value"]["bitmasklabels"][0]: r for r in pred["result"]}
        assert set(mine) == set(theirs)
        for label, region in theirs.items():
            assert (region["original_width"], region["original_height"]) == (W, H)
            decoded = bitmask_mask(region["value"]["imageDataURL"], H, W)
            assert decoded.any()
            np.testing.assert_array_equal(decoded, bitmask_mask(mine[label]["value"]["imageDataURL"], H, W))
        stored[task] = pred

    # the smart tool: a click gives one bitmask
    ctx = {"result": [{"original_width": W, "original_height": H, "image_rotation": 0,
                       "value": {"x": 50.0, "y": 50.0, "width": 1.0, "keypointlabels": ["cat"]},
                       "is_positive": True, "id": "kp1", "from_name": "kp", "to_name": "image",
                       "type": "keypointlabels", "origin": "manual"}]}
    answer = ls.req("POST", f"/api/ml/{ml['id']}/interactive-annotating", json={"task": t1, "context": ctx})
    (region,) = answer["data"]["result"]
    assert region["type"] == "bitmasklabels" and region["value"]["bitmasklabels"] == ["cat"]
    assert bitmask_mask(region["value"]["imageDataURL"], H, W)[H // 2, W // 2]

    # agreement: the prediction accepted as it is, then redrawn; Label Studio posts the webhooks
    client = app.test_client()

    def figures():
        return client.get(f"/agreement/{pid}").get_json()

    accepted = [{k: v for k, v in r.items() if k not in ("id", "score")} for r in stored[t1]["result"]]
    ann = ls.req("POST", f"/api/tasks/{t1}/annotations", json={"result": accepted})
    fig = wait_for(lambda: (f := figures())["annotations"] == 1 and f)
    assert fig["mean_iou"] == pytest.approx(1.0) and fig["recent"][0]["prediction"] == stored[t1]["id"]

    target = spec.targets[0]
    everything = bitmask_region(np.ones((H, W), bool), "cat", target, 1.0)
    redrawn = [{k: v for k, v in everything.items() if k not in ("id", "score")}]
    ls.req("PATCH", f"/api/annotations/{ann['id']}/", json={"result": redrawn})
    expected = compare_results(redrawn, stored[t1]["result"], spec.targets)["iou"]
    assert expected < 1.0
    fig = wait_for(lambda: (f := figures())["recent"][0]["action"] == "ANNOTATION_UPDATED" and f)
    assert fig["annotations"] == 1 and fig["mean_iou"] == pytest.approx(expected)
