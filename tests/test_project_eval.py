"""``gem-backend eval --project``: pre-annotations measured on a project's own annotations.

Unit tests of the annotation reader (brush RLE, polygons, bitmask PNG data URLs, the overlap
rule, which annotation counts), of the variant/sweep syntax and of per-label thresholds; then
against one real Label Studio 1.23 (the rig; one instance for the module) with voc-mini photos
whose official masks are stored as brush and polygon annotations. The model is the fixed small
random CLIP of the golden reference: its masks mean nothing, the tests assert the pipeline.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from helpers import GOLDEN, shared_path
from test_prelabel import GEM_ENV, TOKEN, _connect, _main_in_process, connected_backend, label_studio  # noqa: F401

from gem_backend.evaluation.project import (ProjectEvalConfig, ProjectEvalError, build_variants, choose_annotation,
                                            parse_sweeps, rasterise, run_project_eval)
from gem_backend.labelstudio.annotations import bitmask_mask as decode_bitmask
from gem_backend.labelstudio.brush import mask2rle

VOC_NAMES = json.loads(shared_path("data", "voc-mini", "SOURCES.json").read_text())["class_names"]
PHOTOS = ["dlv3_0", "dlv3_1", "dlv3_8", "dlv3_20"]


# ----------------------------------------------------------------------------------- reader
def _brush(mask: np.ndarray, label: str, name: str = "tag") -> dict:
    h, w = mask.shape
    return {"from_name": name, "to_name": "image", "type": "brushlabels", "original_width": w, "original_height": h,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}


def _bitmask(mask: np.ndarray, label: str) -> dict:
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask] = (255, 0, 0, 255)  # the SDK's format: foreground opaque, the rest transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"from_name": "tag", "to_name": "image", "type": "bitmasklabels",
            "value": {"imageDataURL": url, "bitmasklabels": [label]}}


def test_brush_and_bitmask_results_rasterise_exactly():
    rng = np.random.default_rng(0)
    a = rng.random((37, 53)) < 0.3
    b = rng.random((37, 53)) < 0.2
    got = rasterise([_brush(a, "cat"), _bitmask(b, "dog")], "tag", ["cat", "dog"], (37, 53))
    want = np.where(b, 2, np.where(a, 1, 0))
    assert np.array_equal(got, want)
    assert np.array_equal(decode_bitmask(_bitmask(b, "dog")["value"]["imageDataURL"]), b)


def test_polygon_percent_points_cover_the_pixels_inside():
    poly = {"from_name": "tag", "to_name": "image", "type": "polygonlabels",
            "value": {"points": [[10, 20], [60, 20], [60, 70], [10, 70]], "polygonlabels": ["cat"]}}
    got = rasterise([poly], "tag", ["cat"], (50, 100))  # pixel corners x 10..60, y 10..35
    want = np.zeros((50, 100), np.uint8)
    want[10:35, 10:60] = 1
    assert np.array_equal(got, want)


def test_polygons_of_a_mask_with_holes_fill_back_to_it():
    from gem_backend.algorithm.geometry import mask_polygons
    from gem_backend.labelstudio.annotations import fill_polygon
    from test_geometry import rasterize

    rng = np.random.default_rng(1)
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:55] = True
    mask[12:20, 10:30] = False          # a hole: joined to the outline by a zero-width cut
    mask |= rng.random(mask.shape) < 0.02
    polygons = mask_polygons(mask)[0]   # tolerance 0: every pixel corner kept
    filled = np.zeros_like(mask)
    for poly in polygons:
        filled |= fill_polygon(poly.points, mask.shape)
        # the same pixels as the geometry tests' reference rasteriser
        assert np.array_equal(fill_polygon(poly.points, mask.shape), rasterize(poly.points, mask.shape))
    assert np.array_equal(filled, mask)


def test_overlap_later_region_wins_other_controls_and_unknown_labels_ignored():
    full = np.ones((8, 8), bool)
    small = np.zeros((8, 8), bool)
    small[2:4, 2:4] = True
    results = [_brush(full, "dog"), _brush(small, "cat"), _brush(full, "cat", name="other"), _brush(full, "zebra")]
    got = rasterise(results, "tag", ["cat", "dog"], (8, 8))
    assert (got[2:4, 2:4] == 1).all() and (got == 2).sum() == 64 - 4
    # reversed order: the full dog mask is drawn last and covers the cat
    assert (rasterise(results[1::-1], "tag", ["cat", "dog"], (8, 8)) == 2).all()


def test_choose_annotation_newest_or_ground_truth_never_cancelled():
    anns = [dict(id=1, updated_at="2026-01-01T00:00:00Z", ground_truth=True),
            dict(id=2, updated_at="2026-02-01T00:00:00Z"),
            dict(id=3, updated_at="2026-03-01T00:00:00Z", was_cancelled=True)]
    assert choose_annotation(anns)["id"] == 2
    assert choose_annotation(anns, ground_truth_only=True)["id"] == 1
    assert choose_annotation(anns[1:], ground_truth_only=True) is None


def test_sweep_syntax_grid_and_label_thresholds():
    assert parse_sweeps(["threshold=0.2,0.4", "background_prompts=background,wall;sky;"]) == [
        ("threshold", [0.2, 0.4]), ("background_prompts", ["background,wall", "sky", ""])]
    variants = build_variants({"threshold": 0.3, "label_thresholds": {"dog": 0.5}}, "gem+pamr",
                              ["threshold:cat=0.1,0.6", "min_area=0,0.01"])
    assert variants[0].name == "current" and variants[1].params["refine"] == "pamr"
    grid = variants[2:]
    assert len(grid) == 4
    assert grid[0].params["label_thresholds"] == {"dog": 0.5, "cat": 0.1} and grid[0].params["min_area"] == 0
    with pytest.raises(ProjectEvalError):
        build_variants({}, "notamethod", [])


# ----------------------------------------------------------------------------------- per-label thresholds
def test_label_model_score_threshold_and_extra_params_enter_the_decision_and_version():
    from gem_backend.serving.service import GEMService
    from gem_backend.settings import Settings

    config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
              '<Label value="cat" model_score_threshold="0.99"/><Label value="dog"/></BrushLabels></View>')
    service = GEMService(Settings.from_env({**GEM_ENV}))
    plain = service.project(config.replace(' model_score_threshold="0.99"', ""))
    spec = service.project(config)
    assert spec.segmentation.label_thresholds == (("cat", 0.99),) and spec.model_version != plain.model_version
    # extra_params win over the config
    assert dict(service.project(config, {"label_thresholds": {"cat": 0.2}}).segmentation.label_thresholds) == {
        "cat": 0.2}
    photo = np.asarray(Image.open(shared_path("data", "voc-mini", "VOC2012", "JPEGImages", "dlv3_1.jpg")).convert("RGB"))
    predictor = service.predictor(plain.segmentation)
    emb = service.embed(predictor, photo)
    base = predictor.predict(["cat", "dog"], emb)
    assert (base.input_map == 1).any(), "threshold 0: every pixel is cat or dog"
    high = predictor.predict(["cat", "dog"], emb, thresholds={"cat": 0.999999})
    low_conf = (base.input_map == 1) & (base.confidence < 0.999999)
    assert np.array_equal(high.input_map == 0, low_conf) and np.array_equal(high.input_map == 2, base.input_map == 2)


def test_label_thresholds_reach_the_prompt_a_label_is_predicted_with():
    from gem_backend.algorithm.segmentation import SegmentationSettings
    from gem_backend.serving.service import prompt_thresholds
    from gem_backend.settings import Settings, SettingsError

    seg = SegmentationSettings(label_thresholds={"Cat": 0.4, "dog": 0.7})
    # label "Cat" predicted with the prompt "tabby cat" (predicted_values); "dog" named by its prompt
    assert prompt_thresholds(seg, [("Cat", "tabby cat"), ("Dog", "dog"), ("Bird", "bird")]) == {"tabby cat": 0.4,
                                                                                               "dog": 0.7}
    assert Settings.from_env({"GEM_LABEL_THRESHOLDS": '{"cat": 0.25}'}).segmentation.label_thresholds == (("cat", 0.25),)
    with pytest.raises(SettingsError):
        Settings.from_env({}).segmentation_for({"label_thresholds": {"cat": 1.5}})


# ----------------------------------------------------------------------------------- Label Studio
def _config(labels) -> str:
    items = "".join(f'<Label value="{n}"/>' for n in labels)
    return ('<View><Image name="image" value="$image"/>'
            f'<BrushLabels name="tag" toName="image">{items}</BrushLabels>'
            f'<PolygonLabels name="poly" toName="image">{items}</PolygonLabels></View>')


@pytest.fixture(scope="module")
def loaded():
    from gem_backend.algorithm.models import load_gem_model

    return load_gem_model(str(GOLDEN / "config.json"), str(GOLDEN / "weights.safetensors"), device="cpu")


@pytest.fixture(scope="module")
def voc_project(label_studio):
    """A project of 4 voc-mini photos with their official masks as brush + polygon annotations
    (ground truth); ``(pid, task ids, labels, masks by task)``."""
    from gem_backend.algorithm.geometry import mask_polygons, to_percent

    root = shared_path("data", "voc-mini", "VOC2012")
    masks = {p: np.asarray(Image.open(root / "SegmentationClass" / f"{p}.png")) for p in PHOTOS}
    present = sorted({int(v) for m in masks.values() for v in np.unique(m) if 0 < v < 255})
    labels = [VOC_NAMES[v] for v in present]
    pid = label_studio.req("POST", "/api/projects", json={"title": "eval", "label_config": _config(labels)})["id"]
    files = {p: (f"{p}.jpg", (root / "JPEGImages" / f"{p}.jpg").read_bytes(), "image/jpeg") for p in PHOTOS}
    label_studio.req("POST", f"/api/projects/{pid}/import", files=files)
    tasks = label_studio.req("GET", "/api/tasks", params={"project": pid, "page_size": 100})["tasks"]
    by_task = {}
    for task in sorted(tasks, key=lambda t: t["id"]):
        photo = next(p for p in PHOTOS if p in task["data"]["image"])
        gt = masks[photo]
        h, w = gt.shape
        result = []
        for v in present:
            m = gt == v
            if not m.any():
                continue
            result.append(_brush(m, VOC_NAMES[v]))
            for poly in mask_polygons(m, min_area=4)[0]:
                result.append({"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": w,
                               "original_height": h, "value": {"points": to_percent(poly.points, (h, w)),
                                                               "polygonlabels": [VOC_NAMES[v]]}})
        label_studio.req("POST", f"/api/tasks/{task['id']}/annotations/", json={"result": result, "ground_truth": True})
        by_task[task["id"]] = np.where((gt > 0) & (gt < 255), gt, 0)
    return pid, sorted(by_task), labels, present, by_task


def _service(ls_url: str, loaded, **env):
    from gem_backend.serving.service import GEMService
    from gem_backend.settings import Settings

    settings = Settings.from_env({**GEM_ENV, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, **env})
    return GEMService(settings, loaded=loaded)


def _api(ls_url: str):
    from gem_backend.labelstudio.api import LabelStudioAPI

    return LabelStudioAPI(ls_url, TOKEN)


def test_official_masks_read_back_and_the_contract_files(label_studio, voc_project, loaded, tmp_path):
    pid, tids, labels, present, gts = voc_project
    pdir = tmp_path / "pred"
    out = run_project_eval(ProjectEvalConfig(pid, str(tmp_path / "out"), save_predictions=str(pdir), progress=False,
                                             overlays=2), _service(label_studio.url, loaded), _api(label_studio.url),
                           echo=lambda s: None)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results == json.loads(json.dumps(out["results"]))
    assert results["project"] == pid and results["control"] == "tag" and results["images"] == len(tids)
    assert [c["name"] for c in results["per_class"]] == ["background", *labels]
    assert {t["id"] for t in results["tasks"]} == set(tids)
    assert [t["iou"] for t in results["tasks"]] == sorted(t["iou"] for t in results["tasks"])
    assert all(0 <= results[k] <= 100 for k in ("mIoU", "mAcc", "aAcc"))
    assert len(results["overlays"]) == 2 and all(Image.open(p).size[0] > 100 for p in results["overlays"])
    remap = {v: i + 1 for i, v in enumerate(present)}
    for tid, gt in gts.items():
        ann = np.asarray(Image.open(pdir / f"{tid}_annotation.png"))
        assert np.array_equal(ann, np.vectorize(lambda v: remap.get(v, 0))(gt)), "brush annotation read exactly"
        assert np.asarray(Image.open(pdir / f"{tid}.png")).shape == gt.shape
    # the polygons of the same masks: read back close to them
    run_project_eval(ProjectEvalConfig(pid, str(tmp_path / "poly"), control="poly", save_predictions=str(tmp_path / "pp"),
                                       progress=False, overlays=0),
                     _service(label_studio.url, loaded), _api(label_studio.url), echo=lambda s: None)
    for tid, gt in gts.items():
        ann = np.asarray(Image.open(tmp_path / "pp" / f"{tid}_annotation.png"))
        want = np.vectorize(lambda v: remap.get(v, 0))(gt)
        assert (ann == want).mean() > 0.97, f"task {tid}: polygon annotation far from its mask"


def _annotate_with(label_studio, service, pid, tids, source_of, extra_params=None, ground_truth=False):
    """Store, for task t, the backend's prediction of task ``source_of(t)`` as a new annotation."""
    spec = service.project(label_studio.req("GET", f"/api/projects/{pid}")["label_config"], extra_params or {},
                           project=pid)
    tasks = {t: label_studio.req("GET", f"/api/tasks/{t}") for t in tids}
    preds = {t: service.predict_task_or_raise({"id": t, "data": tasks[t]["data"]}, spec) for t in tids}
    for t in tids:
        src = source_of(t)
        result = [r for r in preds[src]["result"] if r["from_name"] == "tag"]
        if src != t:  # another image's regions: at this image's size (Label Studio checks nothing)
            own = preds[t]["result"][0]
            h, w = own["original_height"], own["original_width"]
            from gem_backend.labelstudio.brush import rle2mask

            result = [_brush(np.asarray(Image.fromarray(rle2mask(r["value"]["rle"], r["original_height"], r["original_width"]))
                                        .resize((w, h), Image.NEAREST)) > 0, r["value"]["brushlabels"][0]) for r in result]
        label_studio.req("POST", f"/api/tasks/{t}/annotations/", json={"result": result, "ground_truth": ground_truth})


def test_own_predictions_score_one_shuffled_lower_and_ground_truth_only(label_studio, voc_project, loaded, tmp_path):
    pid, tids, labels, present, gts = voc_project
    service = _service(label_studio.url, loaded)
    _annotate_with(label_studio, service, pid, tids, lambda t: t)
    both = run_project_eval(ProjectEvalConfig(pid, str(tmp_path / "own"), progress=False, overlays=0,
                                              compare="clip+pamr"), service, _api(label_studio.url), echo=lambda s: None)
    own = both["results"]
    assert [v["variant"] for v in both["comparison"]["variants"]] == ["current", "clip+pamr"]
    assert both["comparison"]["variants"][1]["settings"] == {"method": "clip", "refine": "pamr"}
    assert both["comparison"]["best"]["variant"] == "current" and both["comparison"]["best"]["gain"] == 0
    scored = [c for c in own["per_class"] if c["iou"] is not None]
    assert scored and all(c["iou"] == 100.0 for c in scored), own["per_class"]
    assert own["mIoU"] == 100.0 and all(t["iou"] == 100.0 for t in own["tasks"])
    # newer annotations: each task gets the next task's prediction
    _annotate_with(label_studio, service, pid, tids, lambda t: tids[(tids.index(t) + 1) % len(tids)])
    shuffled = run_project_eval(ProjectEvalConfig(pid, str(tmp_path / "shuf"), progress=False, overlays=0), service,
                                _api(label_studio.url), echo=lambda s: None)["results"]
    assert shuffled["mIoU"] < 90.0
    gt_only = run_project_eval(ProjectEvalConfig(pid, str(tmp_path / "gt"), progress=False, overlays=0,
                                                 ground_truth_only=True), service, _api(label_studio.url),
                               echo=lambda s: None)["results"]
    assert gt_only["ground_truth_only"] and gt_only["mIoU"] != shuffled["mIoU"]


def _backend_with(label_studio, pid: int, url: str, params: dict) -> dict:
    """The project's ML backend (connected now if none is) holding ``params`` as extra_params."""
    api = _api(label_studio.url)
    backend = api.project_backend(pid)
    if backend is None:
        return _connect(label_studio, pid, url, params)
    api.update_ml_backend(backend, params)
    return backend


def _extra_params(label_studio, backend: dict) -> dict:
    stored = label_studio.req("GET", f"/api/ml/{backend['id']}")["extra_params"]
    return json.loads(stored) if isinstance(stored, str) else stored


def test_sweep_finds_the_planted_threshold_on_cached_features_and_apply(label_studio, voc_project, loaded, tmp_path,
                                                                     connected_backend, monkeypatch, redis_url):
    from gem_backend.algorithm.segmentation import GEMPredictor

    pid, tids, labels, present, gts = voc_project
    planted = {"threshold": 0.6}
    _annotate_with(label_studio, _service(label_studio.url, loaded), pid, tids, lambda t: t, planted)
    ml = _backend_with(label_studio, pid, connected_backend, {"threshold": 0})
    calls = []
    real = GEMPredictor.embed_batch
    # regions too: embed_batch takes SAM 2's regions since CorrCLIP does (None here)
    monkeypatch.setattr(GEMPredictor, "embed_batch",
                        lambda self, x, sizes, regions=None: calls.append(len(sizes)) or real(self, x, sizes, regions))
    service = _service(label_studio.url, loaded, REDIS_URL=redis_url)  # a cold feature cache
    cfg = ProjectEvalConfig(pid, str(tmp_path / "sweep"), sweeps=["threshold=0.2,0.6,0.95"], progress=False,
                            overlays=0, apply=True)
    lines = []
    run_project_eval(cfg, service, _api(label_studio.url), echo=lines.append)
    assert sum(calls) == len(tids), f"image tower ran {sum(calls)} times for {len(tids)} images and 4 variants"
    comparison = json.loads((tmp_path / "sweep" / "comparison.json").read_text())
    assert [v["variant"] for v in comparison["variants"]] == ["current", "threshold=0.2", "threshold=0.6",
                                                              "threshold=0.95"]
    best = comparison["best"]
    assert best["variant"] == "threshold=0.6" and best["mIoU"] == 100.0 and best["settings"] == planted
    assert best["gain"] > 0 and all(v["mIoU"] < 100.0 for v in comparison["variants"] if v["variant"] != best["variant"])
    assert comparison["small_sample"] and any("Small sample" in line for line in lines)
    # applied: Label Studio and the backend's Redis store hold it, and the backend's next /predict uses it
    import redis

    assert json.loads(redis.Redis.from_url(redis_url).get(f"gem:project:{pid}:params")) == planted
    assert _extra_params(label_studio, ml) == planted
    task = label_studio.req("GET", f"/api/tasks/{tids[0]}")
    s = requests.Session()
    s.trust_env = False
    reply = s.post(connected_backend + "/predict", json={
        "tasks": [{"id": task["id"], "data": task["data"]}], "project": f"{pid}.123",
        "label_config": label_studio.req("GET", f"/api/projects/{pid}")["label_config"]}, timeout=120).json()
    assert reply["model_version"] == best["model_version"] != comparison["variants"][0]["model_version"]


def test_sweep_finds_a_planted_label_threshold_and_dry_run_writes_nothing(label_studio, voc_project, loaded, tmp_path,
                                                                         connected_backend):
    pid, tids, labels, present, gts = voc_project
    current = {"threshold": 0.6}
    ml = _backend_with(label_studio, pid, connected_backend, current)
    label = labels[0]
    planted = {**current, "label_thresholds": {label: 0.8}}
    service = _service(label_studio.url, loaded)
    _annotate_with(label_studio, service, pid, tids, lambda t: t, planted)
    out = run_project_eval(ProjectEvalConfig(pid, str(tmp_path / "label"), sweeps=[f"threshold:{label}=0.7,0.8,0.9"],
                                             progress=False, overlays=0, apply=True, dry_run=True),
                           service, _api(label_studio.url), echo=lambda s: None)
    comparison = out["comparison"]
    assert comparison["best"]["variant"] == f"threshold:{label}=0.8" and comparison["best"]["mIoU"] == 100.0
    assert comparison["best"]["settings"] == planted
    assert all(v["mIoU"] < 100.0 for v in comparison["variants"] if v["variant"] != comparison["best"]["variant"])
    # dry run: the body it would send, nothing written
    assert out["applied"]["body"] == {"url": connected_backend, "project": pid, "extra_params": planted}
    assert _extra_params(label_studio, ml) == current


def test_apply_without_a_connected_backend_exits_non_zero(label_studio, monkeypatch, tmp_path, capsys):
    pid = label_studio.req("POST", "/api/projects", json={"title": "no backend", "label_config": _config(["cat"])})["id"]
    code = _main_in_process(monkeypatch, label_studio.url, "eval", "--project", str(pid), "--out", str(tmp_path),
                            "--sweep", "threshold=0.1,0.2", "--apply")
    assert code == 2
    assert "no ML backend connected" in capsys.readouterr().err


def test_cli_runs_a_sweep_and_writes_the_contract_files(label_studio, voc_project, monkeypatch, tmp_path, capsys):
    pid, tids, *_ = voc_project
    code = _main_in_process(monkeypatch, label_studio.url, "eval", "--project", str(pid), "--out", str(tmp_path / "o"),
                            "--sweep", "min_area=0,0.5", "--save-predictions", str(tmp_path / "p"), "--no-progress")
    assert code == 0, capsys.readouterr().err
    comparison = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert [v["variant"] for v in comparison["variants"]] == ["current", "min_area=0.5"]
    assert set(comparison["best"]) >= {"variant", "settings", "mIoU", "gain"}
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(
        [f"{t}.png" for t in tids] + [f"{t}_annotation.png" for t in tids])
    assert "Best:" in capsys.readouterr().out


def test_benchmark_flags_are_refused_with_a_project_instead_of_ignored(capsys):
    from gem_backend.cli import main

    assert main(["eval", "--project", "3", "--method", "scclip", "--regions", "sam2"]) == 2
    err = capsys.readouterr().err
    assert "--method, --regions do not apply with --project" in err and "--compare" in err
