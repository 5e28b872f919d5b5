"""Batching the tasks of one request (GEM_BATCH_SIZE): same predictions as one by one,
fewer image-tower calls, failures still isolated per task."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from gem_backend.algorithm.models import load_gem_model
from gem_backend.serving.service import GEMService
from gem_backend.settings import Settings
from helpers import GOLDEN

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="cat"/><Label value="dog"/><Label value="grass"/></BrushLabels></View>')


def _data_uri(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def loaded():
    return load_gem_model(str(GOLDEN / "config.json"), str(GOLDEN / "weights.safetensors"),
                          device="cpu", precision="fp32")


def _service(loaded, tmp_path, batch: int) -> GEMService:
    settings = Settings.from_env({
        "GEM_MODEL": str(GOLDEN / "config.json"), "GEM_PRETRAINED": str(GOLDEN / "weights.safetensors"),
        "GEM_THRESHOLD": "0", "GEM_MIN_AREA": "0", "GEM_INPUT_SIZE": "112", "GEM_DEVICE": "cpu",
        "GEM_STATE_DIR": str(tmp_path), "GEM_BATCH_SIZE": str(batch), "GEM_IMAGE_CACHE_MB": "0"})
    return GEMService(settings, loaded=loaded)


def test_batched_request_equals_one_by_one(loaded, tmp_path, monkeypatch):
    # two input sizes (landscape and portrait), a duplicate image, and a broken task
    tasks = [{"id": i, "data": {"image": _data_uri(*size, seed=i)}}
             for i, size in enumerate([(160, 120), (120, 160), (160, 120), (160, 120), (120, 160)])]
    tasks.append({"id": 9, "data": {"image": tasks[0]["data"]["image"]}})
    tasks.append({"id": 10, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}})

    calls = []
    tower = loaded.method("gem")  # the dense method the predictor runs (GEM's tokens)
    original = tower.encode_image

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(tower, "encode_image", counting)
    one = _service(loaded, tmp_path, 1).predict_tasks(tasks, CONFIG)
    one_calls = list(calls)
    calls.clear()
    batched = _service(loaded, tmp_path, 3).predict_tasks(tasks, CONFIG)

    assert len(one_calls) == 6  # every good task alone (the duplicate too: cache off)
    assert sorted(calls) == [2, 3]  # 3 landscape images in one batch, 2 portrait in another
    assert len(batched) == len(one) == len(tasks)
    for a, b in zip(one, batched):
        assert [r["value"]["brushlabels"] for r in a["result"]] == [r["value"]["brushlabels"] for r in b["result"]]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        for ra, rb in zip(a["result"], b["result"]):
            assert (ra["original_width"], ra["original_height"]) == (rb["original_width"], rb["original_height"])
    assert batched[-1]["result"] == [] and batched[-1]["score"] == 0
    assert batched[0]["result"] and batched[1]["result"][0]["original_height"] == 160


def test_brush_rle_from_the_small_map_is_the_sdk_rle_of_the_full_mask(loaded, tmp_path):
    """/predict's brush RLE is computed from the label map at the model input size; it must be
    the SDK's mask2rle of the full-size mask (the nearest upsampling of that map), byte for
    byte, also at a non-integer scale factor (161 x 119 from a 112 x 152 input)."""
    from label_studio_sdk.converter.brush import mask2rle as sdk_mask2rle

    from gem_backend.algorithm.segmentation import resize_nearest
    from gem_backend.labelstudio.images import decode_image

    service = _service(loaded, tmp_path, 1)
    uri = _data_uri(161, 119, seed=4)
    pred = service.predict_tasks([{"id": 1, "data": {"image": uri}}], CONFIG)[0]
    assert len(pred["result"]) >= 2
    image = np.asarray(decode_image(base64.b64decode(uri.split(",", 1)[1]), "t.png", 10**8, "image/png"))
    seg = service.segment(image, ["cat", "dog", "grass"], service.project(CONFIG).segmentation)
    assert seg.input_map.shape != seg.original_size == (119, 161)
    for region in pred["result"]:
        label = region["value"]["brushlabels"][0]
        full = resize_nearest(seg.input_map, seg.original_size) == seg.labels.index(label) + 1
        assert region["value"]["rle"] == list(sdk_mask2rle(full.astype(np.uint8) * 255))
        assert seg.areas[label] == full.mean()  # areas exact at the full size


def _without_ids(pred: dict) -> dict:
    return {**pred, "result": [{k: v for k, v in r.items() if k != "id"} for r in pred["result"]]}


@pytest.mark.parametrize("batch", [1, 2])
def test_pipelined_predictions_equal_sequential_and_failures_stay_per_task(loaded, tmp_path, batch):
    """predict_tasks fetches and decodes the next tasks in a thread pool while the current
    ones are in the model; the predictions must be those of one task at a time (same RLE,
    scores), and a task whose image fails (in a prefetch thread) must fail alone."""
    tasks = [{"id": i, "data": {"image": _data_uri(150 + 7 * i, 120 - 3 * i, seed=i)}} for i in range(9)]
    tasks.insert(4, {"id": 99, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}})
    service = _service(loaded, tmp_path, batch)
    spec = service.project(CONFIG)
    sequential = [service.predict_task(task, spec) for task in tasks]
    pipelined = service.predict_tasks(tasks, CONFIG)
    assert [_without_ids(p) for p in pipelined] == [_without_ids(p) for p in sequential]
    assert pipelined[4]["result"] == [] and pipelined[4]["score"] == 0
    assert all(p["result"] for i, p in enumerate(pipelined) if i != 4)
    outcomes = list(service.predict_stream(tasks, spec))
    assert [t["id"] for t, _ in outcomes] == [t["id"] for t in tasks]
    assert isinstance(outcomes[4][1], Exception) and "image" in str(outcomes[4][1]).lower()


def test_next_images_are_fetched_while_the_model_runs(loaded, tmp_path, monkeypatch):
    import threading
    import time

    service = _service(loaded, tmp_path, 1)
    events = []
    tower = loaded.method("gem")  # the dense method the predictor runs
    fetch, forward = service.fetcher.fetch_raw, tower.encode_image

    def slow_fetch(url, task_id=None):
        events.append(("fetch", task_id, threading.current_thread() is threading.main_thread(), time.perf_counter()))
        return fetch(url, task_id)

    def slow_forward(x):
        events.append(("forward start", None, True, time.perf_counter()))
        time.sleep(0.2)
        out = forward(x)
        events.append(("forward end", None, True, time.perf_counter()))
        return out

    monkeypatch.setattr(service.fetcher, "fetch_raw", slow_fetch)
    monkeypatch.setattr(tower, "encode_image", slow_forward)
    tasks = [{"id": i, "data": {"image": _data_uri(160, 120, seed=i)}} for i in range(8)]
    preds = service.predict_tasks(tasks, CONFIG)
    assert all(p["result"] for p in preds)
    fetches = [e for e in events if e[0] == "fetch"]
    assert sorted(e[1] for e in fetches) == list(range(8)) and not any(e[2] for e in fetches)  # in the pool
    first_end = next(e[3] for e in events if e[0] == "forward end")
    # tasks 4..7 (the next window) are fetched before the first window's first forward is over
    assert any(e[1] >= 4 and e[3] < first_end for e in fetches)
