"""``gem-backend eval --project ID``: the pre-annotations measured on a project's own annotations.

The project's annotated tasks are the ground truth, in its own label vocabulary. For each task
the newest annotation (or, with ``--ground-truth-only``, the newest ground-truth-flagged one) is
rasterised into a label map of the evaluated control (:func:`rasterise`), the task is predicted
exactly as the connected backend would (:meth:`GEMService.predict_task_or_raise` with the
project's ``extra_params`` merged over this process's ``GEM_*`` settings), the prediction's
regions are rasterised the same way, and the two maps are compared pixel by pixel.

Variants (``--compare``, ``--sweep``) run task by task: every variant of one task follows the
first, so a variant whose image side (model, method, input size) is the one already computed
takes the features from the image cache and only re-runs the decision; the image bytes are
fetched once per task.

Label maps: 0 = background (no region covers the pixel), ``i + 1`` = the control's ``i``-th
label in config order. Overlapping regions: the later region in the annotation's result list
wins (the one drawn last, on top). Labels the control does not list (e.g. ``model_skip`` ones)
are left out (their pixels stay background).

Label Studio API calls: ``GET /api/projects/{id}``, ``GET /api/ml?project={id}``,
``GET /api/tasks`` (annotated tasks), ``GET /api/tasks/{id}/annotations/`` and, with
``--apply``, ``PATCH /api/ml/{id}``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .datasets import voc_palette
from .harness import confusion_matrix, save_label_png, segmentation_metrics
from ..algorithm.methods import method_names
from ..algorithm.segmentation import REFINE_KINDS
from ..labelstudio.api import LabelStudioAPI, LabelStudioError
from ..labelstudio.annotations import label_map
from ..labelstudio.images import ImageError, decode_image
from ..serving.service import GEMService, RequestError, task_problem
from ..settings import SettingsError, parse_extra_params

__all__ = ["add_project_flags", "cmd_eval_project", "ProjectEvalConfig", "ProjectEvalError", "Variant", "RASTER_KINDS", "SMALL_SAMPLE", "choose_annotation",
           "parse_compare", "parse_sweeps", "rasterise", "run_project_eval"]

# result types turned into label maps
RASTER_KINDS = ("brushlabels", "polygonlabels", "bitmasklabels")
# fewer annotated tasks than this: the comparison says its sample is small
SMALL_SAMPLE = 10


class ProjectEvalError(RuntimeError):
    """The evaluation cannot run or its result cannot be applied; the message says why."""


# ---------------------------------------------------------------------------------- rasterising
def rasterise(results: Iterable[Mapping], from_name: str, labels: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """The regions of control ``from_name`` -> ``[H, W]`` uint8 label map at ``size``.

    0 where no region is, ``i + 1`` where ``labels[i]`` is; brush (RLE), polygon (percent
    points) and bitmask (PNG data URL) results, read by
    :func:`gem_backend.labelstudio.annotations.label_map` (the reader the agreement figures
    use too); a region whose labels are not in ``labels`` is left out. Overlaps: the later
    region in ``results`` wins. Undecodable regions are left out.
    """
    if len(labels) > 254:
        raise ValueError("at most 254 labels per control")
    out, _ = label_map(results, labels, None, size, from_name=from_name, kinds=RASTER_KINDS)
    return out.astype(np.uint8)


def choose_annotation(annotations: Sequence[Mapping], ground_truth_only: bool = False) -> Mapping | None:
    """The newest annotation that was not skipped (of the ground-truth-flagged ones only, if
    asked); None when there is none."""
    usable = [a for a in annotations if not a.get("was_cancelled")
              and (a.get("ground_truth") or not ground_truth_only)]
    if not usable:
        return None
    return max(usable, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), int(a.get("id") or 0)))


# ---------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """Settings to try: ``params`` are the full ``extra_params`` (the project's, changed by
    ``changes``)."""

    name: str
    params: dict
    changes: dict = field(default_factory=dict)


def _value(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_compare(text: str) -> list[dict]:
    """``"gem,naclip+pamr,gem+threshold=0.2"`` -> one change set per item: a method name sets
    ``method``, a refinement (``pamr``) sets ``refine``, ``key=value`` sets that setting (so
    settings added later, e.g. regions, go through the same fields)."""
    out = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        changes: dict = {}
        for token in item.split("+"):
            token = token.strip()
            if "=" in token:
                key, _, raw = token.partition("=")
                changes[key.strip()] = _value(raw)
            elif token in method_names():
                changes["method"] = token
            elif token in REFINE_KINDS:
                changes["refine"] = token
            else:
                raise ProjectEvalError(f"--compare {item!r}: {token!r} is neither a method ({', '.join(method_names())}), "
                                       f"a refinement ({', '.join(REFINE_KINDS)}) nor a SETTING=VALUE")
        out.append(changes)
    if not out:
        raise ProjectEvalError("--compare needs at least one variant, e.g. gem,naclip+pamr")
    return out


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["threshold=0.2,0.3", "threshold:cat=0.1,0.4"]`` -> ``[(name, values)]``.

    Values are separated by ``,``, or by ``;`` when the item holds one (values that are lists
    themselves: ``background_prompts=background,wall;background;`` tries two lists and none).
    ``threshold:LABEL`` is that label's pixel threshold (``label_thresholds``)."""
    out = []
    for item in items:
        name, sep, raw = str(item).partition("=")
        name = name.strip()
        if not sep or not name:
            raise ProjectEvalError(f"--sweep {item!r}: expected NAME=V1,V2,...")
        parts = raw.split(";") if ";" in raw else raw.split(",")
        values = [_value(v) if name != "background_prompts" else v.strip() for v in parts]
        if name != "background_prompts":
            values = [v for v in values if v != ""]
        if not values:
            raise ProjectEvalError(f"--sweep {item!r}: no values")
        out.append((name, list(dict.fromkeys(json.dumps(v) for v in values))))
    return [(name, [json.loads(v) for v in values]) for name, values in out]


def _apply_change(params: dict, name: str, value: Any) -> None:
    if name.startswith("threshold:"):
        label = name.split(":", 1)[1]
        table = dict(params.get("label_thresholds") or {})
        table[label] = value
        params["label_thresholds"] = table
    else:
        params[name] = value


def _variant_name(changes: Mapping) -> str:
    parts = []
    method, refine = changes.get("method"), changes.get("refine")
    if method:
        parts.append(str(method) + (f"+{refine}" if refine and refine != "none" else ""))
    elif refine:
        parts.append(f"refine={refine}")
    parts += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in changes.items()
              if k not in ("method", "refine")]
    return " ".join(parts) or "current"


def build_variants(params: Mapping, compare: str | None, sweeps: Sequence[str]) -> list[Variant]:
    """The current settings first, then each ``--compare`` item, then the ``--sweep`` grid
    (every combination of the swept values) on top of the current settings."""
    variants = [Variant("current", dict(params))]
    change_sets = parse_compare(compare) if compare else []
    grid = parse_sweeps(sweeps) if sweeps else []
    if grid:
        names = [name for name, _ in grid]
        for combo in itertools.product(*(values for _, values in grid)):
            change_sets.append(dict(zip(names, combo)))
    seen = {json.dumps(variants[0].params, sort_keys=True)}
    for changes in change_sets:
        full = dict(params)
        for name, value in changes.items():
            _apply_change(full, name, value)
        key = json.dumps(full, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        variants.append(Variant(_variant_name(changes), full, dict(changes)))
    return variants


# ---------------------------------------------------------------------------------- the run
@dataclass
class ProjectEvalConfig:
    """What ``gem-backend eval --project`` was asked for (see the CLI's help)."""

    project: int
    out_dir: str
    control: str | None = None
    save_predictions: str | None = None
    compare: str | None = None
    sweeps: Sequence[str] = ()
    apply: bool = False
    dry_run: bool = False
    ground_truth_only: bool = False
    ml_backend: int | None = None
    limit: int | None = None
    overlays: int = 5
    progress: bool = True


class _TaskBytes:
    """The service's fetcher with the bytes of the last few URLs kept: the variants of one task
    fetch its image once."""

    def __init__(self, fetcher, keep: int = 4):
        self.inner = fetcher
        self.keep = keep
        self.memo: dict[str, tuple] = {}

    def fetch_raw(self, url: str, task_id: Any = None):
        if url not in self.memo:
            while len(self.memo) >= self.keep:
                self.memo.pop(next(iter(self.memo)))
            self.memo[url] = self.inner.fetch_raw(url, task_id)
        return self.memo[url]

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _target(spec, control: str | None):
    shapes = [t for t in spec.targets if t.kind in RASTER_KINDS]
    if control is not None:
        for t in shapes:
            if t.from_name == control:
                return t
        raise ProjectEvalError(f"--control {control!r}: the config's brush/polygon/bitmask controls are "
                               f"{[t.from_name for t in shapes] or 'none'}")
    if not shapes:
        raise ProjectEvalError("the labeling config has no <BrushLabels>, <PolygonLabels> or <BitmaskLabels> on an "
                               "<Image>: nothing to compare pixel by pixel")
    return shapes[0]


def _size_of(annotation: Mapping, from_name: str) -> tuple[int, int] | None:
    for r in annotation.get("result") or []:
        if r.get("from_name") == from_name and r.get("original_width") and r.get("original_height"):
            return int(r["original_height"]), int(r["original_width"])
    return None


def _blend(image: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    colours = voc_palette()
    out = image.astype(np.float32)
    mask = label_map > 0
    out[mask] = 0.5 * out[mask] + 0.5 * colours[label_map[mask]]
    return out.astype(np.uint8)


def _overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, title: str) -> Image.Image:
    """Prediction (left) beside annotation (right) over the image."""
    h, w = pred.shape
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h)))
    band = max(14, h // 25)
    canvas = Image.new("RGB", (2 * w + 8, h + band), (255, 255, 255))
    canvas.paste(Image.fromarray(_blend(image, pred)), (0, band))
    canvas.paste(Image.fromarray(_blend(image, gt)), (w + 8, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 1), f"prediction  {title}", fill=(0, 0, 0))
    draw.text((w + 12, 1), "annotation", fill=(0, 0, 0))
    return canvas


def _pct(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v) * 100.0, 4)


def _task_iou(cm: np.ndarray) -> float:
    m = segmentation_metrics(cm)
    return float(m["mIoU"]) if math.isfinite(m["mIoU"]) else 1.0


def _summary(names: Sequence[str], cm: np.ndarray) -> dict:
    m = segmentation_metrics(cm)
    return dict(mIoU=_pct(m["mIoU"]), mAcc=_pct(m["mAcc"]), aAcc=_pct(m["aAcc"]),
                per_class=[dict(name=n, iou=_pct(i), acc=_pct(a)) for n, i, a in zip(names, m["iou"], m["acc"])])


def run_project_eval(cfg: ProjectEvalConfig, service: GEMService, api: LabelStudioAPI,
                     echo: Callable[[str], None] = print) -> dict:
    """Evaluate (and compare, and apply) on one project; writes ``OUT/results.json`` and ``.md``
    (the current settings), ``OUT/comparison.json`` and ``.md`` with variants, overlays of the
    worst tasks under ``OUT/worst/``. Returns ``{"results", "comparison", "applied"}``.

    Raises :class:`ProjectEvalError` (also for Label Studio errors)."""
    try:
        return _run(cfg, service, api, echo)
    except LabelStudioError as err:
        raise ProjectEvalError(str(err)) from None


def _run(cfg: ProjectEvalConfig, service: GEMService, api: LabelStudioAPI, echo) -> dict:
    pid = int(cfg.project)
    info = api.project(pid)
    label_config = info.get("label_config") or ""
    backend = api.project_backend(pid, info, cfg.ml_backend)
    variants_asked = bool(cfg.compare or cfg.sweeps)
    if cfg.apply and backend is None:
        raise ProjectEvalError(f"project {pid} has no ML backend connected: --apply has nowhere to write the "
                               f"settings (connect gem-backend under Settings > Model first)")
    if cfg.apply and not variants_asked:
        raise ProjectEvalError("--apply needs --compare or --sweep: it writes the best variant's settings")
    try:
        params = parse_extra_params(backend.get("extra_params") if backend else None)
        variants = build_variants(params, cfg.compare, cfg.sweeps)
        specs = [service.project(label_config, v.params, project=pid) for v in variants]
    except (SettingsError, RequestError) as err:
        raise ProjectEvalError(f"project {pid}: {err}") from None
    # variants whose settings come out the same as an earlier one's (same model_version) are dropped
    kept = {}
    for variant, spec in zip(variants, specs):
        kept.setdefault(spec.model_version, (variant, spec))
    variants, specs = [v for v, _ in kept.values()], [s for _, s in kept.values()]
    if backend is None:
        echo(f"note: project {pid} has no ML backend connected: evaluating this process's GEM_* settings")
    elif backend.get("model_version") and backend["model_version"] != specs[0].model_version:
        echo(f"warning: the project's ML backend reports model_version {backend['model_version']!r}, these "
             f"settings give {specs[0].model_version!r}: run eval with the backend's GEM_* settings to measure it")
    target = _target(specs[0], cfg.control)
    names = ["background", *target.labels]
    n_classes = len(names)

    service.load()
    fetcher = service.fetcher
    service.fetcher = _TaskBytes(fetcher)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pdir = Path(cfg.save_predictions) if cfg.save_predictions else None
    if pdir is not None:
        pdir.mkdir(parents=True, exist_ok=True)
    cms = [np.zeros((n_classes, n_classes), np.int64) for _ in variants]
    seconds = [0.0 for _ in variants]
    per_task: list[list[dict]] = [[] for _ in variants]
    worst: list[tuple[float, int, np.ndarray, np.ndarray, str]] = []
    failed: list[dict] = []
    skipped = 0
    try:
        from tqdm import tqdm

        tasks = list(api.iter_annotated_tasks(pid))
        if cfg.limit is not None:
            tasks = tasks[:max(0, cfg.limit)]
        bar = tqdm(tasks, unit="task", dynamic_ncols=True, desc=f"project {pid} [{len(variants)} variant(s)]",
                   disable=not cfg.progress)
        for task in bar:
            tid = int(task["id"])
            annotation = choose_annotation(api.task_annotations(tid), cfg.ground_truth_only)
            if annotation is None:
                skipped += 1
                continue
            problem = task_problem(task, [target])
            if problem:
                failed.append(dict(id=tid, reason=problem))
                continue
            size = _size_of(annotation, target.from_name)
            gt = None
            done = []  # (cm, seconds, pred) per variant: a task counts for every variant or for none
            try:
                for variant, spec in zip(variants, specs):
                    started = time.perf_counter()
                    prediction = service.predict_task_or_raise(task, spec)
                    elapsed = time.perf_counter() - started
                    if size is None:
                        size = _size_of(prediction, target.from_name) or service.image_embedding(
                            service.predictor(spec.segmentation), task["data"][target.value_key], tid,
                            spec.segmentation).original_size
                    if gt is None:
                        gt = rasterise(annotation.get("result") or [], target.from_name, target.labels, size)
                    pred = rasterise(prediction.get("result") or [], target.from_name, target.labels, size)
                    done.append((confusion_matrix(pred, gt, n_classes), elapsed, pred))
            except (ImageError, ValueError, OSError) as err:
                failed.append(dict(id=tid, reason=f"{type(err).__name__}: {err}"))
                continue
            for k, (cm, elapsed, _) in enumerate(done):
                cms[k] += cm
                seconds[k] += elapsed
                per_task[k].append(dict(id=tid, iou=round(_task_iou(cm) * 100.0, 4), annotation=annotation.get("id")))
            pred = done[0][2]
            if pdir is not None:
                save_label_png(pdir / f"{tid}.png", pred, voc_palette())
                save_label_png(pdir / f"{tid}_annotation.png", gt, voc_palette())
            if cfg.overlays > 0:
                item = (-_task_iou(done[0][0]), tid, pred, gt, task["data"][target.value_key])
                if len(worst) < cfg.overlays:
                    heapq.heappush(worst, item)
                else:
                    heapq.heappushpop(worst, item)
        bar.close()
        overlays = _write_overlays(service, out, worst)
    finally:
        service.fetcher = fetcher
    evaluated = len(per_task[0])
    if evaluated == 0:
        raise ProjectEvalError(f"project {pid}: no annotated task could be evaluated "
                               f"({skipped} without a usable annotation, {len(failed)} failed"
                               + (f": {failed[0]['reason']}" if failed else "") + ")")
    results = dict(
        project=pid, control=target.from_name, control_type=target.kind, labels=list(target.labels),
        variant=variants[0].name, settings=variants[0].params, model_version=specs[0].model_version,
        images=evaluated, tasks=sorted(per_task[0], key=lambda t: t["iou"]),
        seconds_per_image=round(seconds[0] / evaluated, 4),
        skipped=skipped, failed=failed, ground_truth_only=cfg.ground_truth_only,
        random_weights=bool(getattr(service.load(), "random_weights", False)),
        metric="IoU per label (background included as a class, as VOC); mIoU over the classes present in "
               "the annotations or the predictions; the later region wins where regions overlap",
        overlays=overlays, predictions=str(pdir) if pdir else None,
        **_summary(names, cms[0]))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = results_markdown(results)
    (out / "results.md").write_text(md)
    echo(md)
    comparison = None
    if variants_asked:
        rows = []
        for k, (variant, spec) in enumerate(zip(variants, specs)):
            s = _summary(names, cms[k])
            rows.append(dict(variant=variant.name, settings=variant.params, changes=variant.changes,
                             model_version=spec.model_version, mIoU=s["mIoU"], mAcc=s["mAcc"], aAcc=s["aAcc"],
                             per_class=s["per_class"], images=evaluated,
                             seconds_per_image=round(seconds[k] / evaluated, 4)))
        # ties keep the earlier variant, the current settings first
        best = max(rows, key=lambda r: (r["mIoU"] if r["mIoU"] is not None else -1.0, -rows.index(r)))
        base = rows[0]["mIoU"] or 0.0
        comparison = dict(project=pid, control=target.from_name, tasks=evaluated, small_sample=evaluated < SMALL_SAMPLE,
                          variants=rows, best=dict(variant=best["variant"], settings=best["settings"],
                                                   mIoU=best["mIoU"], gain=round((best["mIoU"] or 0.0) - base, 4),
                                                   tasks=evaluated, model_version=best["model_version"]))
        (out / "comparison.json").write_text(json.dumps(comparison, indent=1))
        cmd = comparison_markdown(comparison)
        (out / "comparison.md").write_text(cmd)
        echo(cmd)
    echo(f"wrote {out / 'results.json'}" + (f" and {out / 'comparison.json'}" if comparison else ""))
    applied = None
    if cfg.apply:
        applied = _apply(cfg, api, service, backend, pid, comparison, echo)
    return dict(results=results, comparison=comparison, applied=applied)


def _write_overlays(service: GEMService, out: Path, worst) -> list[str]:
    written = []
    if not worst:
        return written
    folder = out / "worst"
    folder.mkdir(parents=True, exist_ok=True)
    for neg_iou, tid, pred, gt, url in sorted(worst, reverse=True):
        try:
            data, content_type, source = service.fetcher.fetch_raw(url, tid)
            image = np.asarray(decode_image(data, source, service.fetcher.max_pixels, content_type))
        except (ImageError, OSError, ValueError):
            image = np.full(pred.shape + (3,), 128, np.uint8)
        path = folder / f"{tid}.png"
        _overlay(image[..., :3], pred, gt, f"task {tid}: IoU {-neg_iou * 100:.1f}").save(path)
        written.append(str(path))
    return written


def _apply(cfg, api, service, backend, pid, comparison, echo) -> dict | None:
    best = comparison["best"]
    current = comparison["variants"][0]
    if best["variant"] == current["variant"]:
        echo("the current settings score best: nothing to apply")
        return None
    body = api.ml_backend_update({**backend, "project": backend.get("project") or pid}, best["settings"])
    if cfg.dry_run:
        echo(f"dry run: would PATCH /api/ml/{backend['id']} with:")
        echo(json.dumps(body, indent=1))
        return dict(dry_run=True, backend=backend["id"], body=body)
    api.update_ml_backend({**backend, "project": backend.get("project") or pid}, best["settings"])
    if service.settings.redis_url:
        # the backend reads a project's params from its store when /predict carries none
        from ..serving.app import ProjectParams

        ProjectParams(service.settings).set(pid, dict(best["settings"]))
    echo(f"applied {best['variant']!r} (mIoU {best['mIoU']:.2f}, {best['gain']:+.2f} over the current settings) "
         f"to ML backend {backend['id']}: model_version {best['model_version']}")
    return dict(dry_run=False, backend=backend["id"], body=body)


# ---------------------------------------------------------------------------------- reports
def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def results_markdown(r: Mapping) -> str:
    """Headline figures, the per-label table and the worst tasks."""
    lines = [f"# Project {r['project']}: pre-annotations against annotations ({r['control']})", ""]
    if r.get("random_weights"):
        lines += ["> **Random weights**: the model is untrained, so these numbers mean nothing.", ""]
    lines += [f"{r['images']} annotated tasks" + (" (ground-truth annotations only)" if r.get("ground_truth_only") else "")
              + f", settings `{json.dumps(r['settings'])}`, model_version `{r['model_version']}`, "
              f"{r['seconds_per_image']:.3f} s / image.", ""]
    if r["images"] < SMALL_SAMPLE:
        lines += [f"> Small sample: {r['images']} tasks; the figures may change a lot with more annotations.", ""]
    lines += ["| metric | value |", "|---|---:|", f"| mIoU | {_fmt(r['mIoU'])} |", f"| mAcc | {_fmt(r['mAcc'])} |",
              f"| aAcc | {_fmt(r['aAcc'])} |", "", "| label | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {c['name']} | {_fmt(c['iou'])} | {_fmt(c['acc'])} |" for c in r["per_class"]]
    lines += ["", "Worst tasks (IoU):", ""]
    lines += [f"- task {t['id']}: {t['iou']:.2f}" for t in r["tasks"][:10]]
    if r.get("failed"):
        lines += ["", f"{len(r['failed'])} task(s) failed: " + "; ".join(f"{f['id']}: {f['reason']}" for f in r["failed"][:5])]
    return "\n".join(lines) + "\n"


def comparison_markdown(c: Mapping) -> str:
    """One row per variant, then the best one with its gain."""
    lines = [f"# Project {c['project']}: settings compared on {c['tasks']} annotated tasks", "",
             "| variant | mIoU | mAcc | aAcc | s / image |", "|---|---:|---:|---:|---:|"]
    for r in c["variants"]:
        lines.append(f"| {r['variant']} | {_fmt(r['mIoU'])} | {_fmt(r['mAcc'])} | {_fmt(r['aAcc'])} | "
                     f"{r['seconds_per_image']:.3f} |")
    b = c["best"]
    lines += ["", f"Best: **{b['variant']}**, mIoU {_fmt(b['mIoU'])} ({b['gain']:+.2f} over the current settings), "
                  f"on {c['tasks']} tasks; settings `{json.dumps(b['settings'])}`."]
    if c.get("small_sample"):
        lines.append(f"Small sample: {c['tasks']} tasks (under {SMALL_SAMPLE}); annotate more before trusting the gain.")
    lines.append("Seconds per image after the first variant: the image features come from the cache.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- command line
def add_project_flags(p) -> None:
    """The ``eval --project`` flags (``--out``, ``--compare``, ``--save-predictions``, ``--limit``
    and ``--no-progress`` are the benchmark's own)."""
    from ..options import add_label_studio_flags

    g = p.add_argument_group("a Label Studio project's own annotations (instead of --dataset/--root)")
    g.add_argument("--project", type=int, help="Label Studio project id: compare the pre-annotations with its "
                                               "annotated tasks (the newest annotation of each)")
    add_label_studio_flags(g)
    g.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="try these values of a decision setting on the cached features (repeatable: every "
                        "combination): threshold, min_area, logit_scale, background_prompts (values separated by "
                        "';'), threshold:LABEL (that label's own threshold)")
    g.add_argument("--apply", action="store_true",
                   help="write the best variant's settings into the project's ML backend extra_params")
    g.add_argument("--dry-run", action="store_true", help="with --apply: print the JSON instead of writing it")
    g.add_argument("--ground-truth-only", action="store_true", help="only ground-truth-flagged annotations")
    g.add_argument("--control", help="the BrushLabels/PolygonLabels/BitmaskLabels name to compare (default the first)")
    g.add_argument("--ml-backend", type=int, help="the ML backend's id, when the project has several")
    g.add_argument("--overlays", type=int, default=5, help="overlay pictures of the N worst tasks (default 5)")


def cmd_eval_project(args) -> int:
    """``gem-backend eval --project``: 0 done, 2 when it cannot run (the message says why)."""
    import sys

    from ..options import with_label_studio
    from ..serving.service import ModelUnavailable

    if args.dry_run and not args.apply:
        print("gem-backend eval: --dry-run goes with --apply", file=sys.stderr)
        return 2
    settings = with_label_studio(args)
    cfg = ProjectEvalConfig(project=args.project, out_dir=args.out or f"out/eval/project-{args.project}",
                            control=args.control, save_predictions=args.save_predictions, compare=args.compare,
                            sweeps=list(args.sweep or []), apply=args.apply, dry_run=args.dry_run,
                            ground_truth_only=args.ground_truth_only, ml_backend=args.ml_backend, limit=args.limit,
                            overlays=max(0, args.overlays), progress=not args.no_progress)
    api = None
    try:
        api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
        service = GEMService(settings)
        run_project_eval(cfg, service, api)
    except (ProjectEvalError, LabelStudioError, ModelUnavailable) as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
    finally:
        if api is not None:
            api.close()
    return 0
