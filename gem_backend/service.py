"""The prediction service: Label Studio tasks + labeling spec -> predictions.

One :class:`GEMService` per process holds the model (loaded once), the image fetcher and
the text-embedding caches. The HTTP app (``/predict``), the CLI and the bulk pre-labeling
workers all call :meth:`GEMService.predict_tasks`, so they give the same predictions and
the same ``model_version``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .images import ImageError, ImageFetcher, original_size
from .labelstudio import BrushTarget, LabelConfigError, brush_region, parse_label_config, prediction
from .metrics import Metrics
from .segmentation import GEMPredictor, ImageEmbedding, Segmentation, SegmentationSettings
from .settings import Settings, SettingsError
from .text_cache import TextEmbeddingCache

log = logging.getLogger(__name__)


_WARMUP_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                  '<Label value="object"/></BrushLabels></View>')


class RequestError(ValueError):
    """The request itself is unusable (bad config, bad params, malformed tasks): a 4xx."""


class ModelUnavailable(RuntimeError):
    """The model could not be loaded; the message says why (a 503)."""


@dataclass(frozen=True)
class ProjectSpec:
    """What one project asks for: its brush targets, settings and model version."""

    targets: tuple[BrushTarget, ...]
    segmentation: SegmentationSettings
    model_version: str


class GEMService:
    """Model, caches and the task -> prediction function, shared by every entry point.

    Args:
        settings: the process settings.
        loaded: an already loaded model (tests, CLI); None loads ``settings.model`` lazily
            or in the background with :meth:`start_loading`.
        fetcher: image fetcher; default one from the settings.
        metrics: Prometheus metrics; default a fresh registry.
    """

    def __init__(self, settings: Settings, loaded=None, fetcher: ImageFetcher | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.fetcher = fetcher or ImageFetcher(
            settings.label_studio_url, settings.label_studio_api_key,
            timeout=(5.0, settings.fetch_timeout), max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels, allowed_hosts=settings.allowed_hosts)
        self._loaded = loaded
        self._load_error: str | None = None
        self._load_lock = threading.Lock()
        self._loaded_event = threading.Event()
        if loaded is not None:
            self._loaded_event.set()
        # one forward pass at a time per process: concurrent requests queue instead of thrashing
        self._infer_lock = threading.Lock()
        self._caches: dict[tuple[str, ...], TextEmbeddingCache] = {}
        self._specs: dict[tuple[str, str], ProjectSpec] = {}
        self._caches_lock = threading.Lock()

    # ------------------------------------------------------------------ model
    @property
    def model_state(self) -> str:
        """``loaded``, ``loading``, ``error`` or ``not loaded``."""
        if self._loaded is not None:
            return "loaded"
        if self._load_error:
            return "error"
        return "loading" if self._load_lock.locked() else "not loaded"

    @property
    def load_error(self) -> str | None:
        return self._load_error

    def start_loading(self) -> threading.Thread:
        """Load the model in a background thread, so the server answers /health meanwhile."""
        thread = threading.Thread(target=self._load_quietly, name="gem-model-loader", daemon=True)
        thread.start()
        return thread

    def _load_quietly(self) -> None:
        try:
            # the SDK's config parser loads lazily (~1 s): warm it before /setup's 3 s timeout matters
            self.project(_WARMUP_CONFIG)
            self.load()
        except ModelUnavailable:
            pass  # recorded in _load_error; /health and /predict report it

    def load(self):
        """The loaded model; loads it on first call. Raises :class:`ModelUnavailable`."""
        if self._loaded is not None:
            return self._loaded
        with self._load_lock:
            if self._loaded is None:
                if self._load_error:
                    raise ModelUnavailable(self._load_error)
                from .models import load_gem_model

                s = self.settings
                started = time.perf_counter()
                try:
                    self._loaded = load_gem_model(
                        s.model, s.pretrained, device=s.device, precision=s.precision, depth=s.depth,
                        ss_attn_iter=s.ss_attn_iter, ss_attn_temp=s.ss_attn_temp, cache_dir=s.model_dir)
                except Exception as err:  # noqa: BLE001 - e.g. RuntimeError for GEM_DEVICE=cuda without a
                    # GPU: recorded, so /health says ERROR with the reason instead of UP, and /predict
                    # answers 503 with it instead of retrying the load and failing with a bare 500
                    self._load_error = f"model {s.model!r} with weights {s.pretrained!r} could not load: {err}"
                    log.error("%s", self._load_error)
                    raise ModelUnavailable(self._load_error) from None
                finally:
                    self._loaded_event.set()
                self.metrics.model_load_seconds.set(time.perf_counter() - started)
        return self._loaded

    # ------------------------------------------------------------------ project spec
    def project(self, label_config: str | None, extra_params: Any = None) -> ProjectSpec:
        """Parse a project's label config and extra params; no model needed.

        Raises:
            RequestError: missing/invalid config or params, with a message for the admin.
        """
        if not label_config or not isinstance(label_config, str):
            raise RequestError("no label config: Label Studio sends it as 'schema' (/setup) or "
                               "'label_config' (/predict)")
        try:
            key = (label_config, json.dumps(extra_params, sort_keys=True, default=str))
        except (TypeError, ValueError):
            key = None
        spec = self._specs.get(key) if key else None
        if spec is None:
            try:
                targets = tuple(parse_label_config(label_config))
                seg = self.settings.segmentation_for(extra_params)
            except (LabelConfigError, SettingsError) as err:
                raise RequestError(str(err)) from None
            spec = ProjectSpec(targets, seg, self.settings.model_version(seg))
            if key:
                if len(self._specs) >= 256:  # projects x param sets: a handful in practice
                    self._specs.clear()
                self._specs[key] = spec
        return spec

    # ------------------------------------------------------------------ text
    def _cache(self, templates: tuple[str, ...]) -> TextEmbeddingCache:
        with self._caches_lock:
            cache = self._caches.get(templates)
            if cache is None:
                cache = TextEmbeddingCache(self.settings.text_namespace(templates), self.settings.redis_url,
                                           maxsize=self.settings.text_cache_size)
                self._caches[templates] = cache
            return cache

    def encode_text(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """``[C, D]`` float32 L2-normalised text embeddings, through the caches."""
        import torch

        templates = tuple(templates)
        gem = self.load().gem
        cache = self._cache(templates)
        before = cache.stats

        def encode(batch: list[str]) -> np.ndarray:
            with torch.inference_mode():
                return gem.encode_text(batch, templates).float().cpu().numpy()

        out = cache.get_or_encode(list(labels), encode)
        after = cache.stats
        for kind in ("local_hits", "redis_hits", "misses"):
            self.metrics.text_cache.labels(result=kind).inc(after[kind] - before[kind])
        return out

    def text_cache_stats(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        with self._caches_lock:
            caches = list(self._caches.values())
        for cache in caches:
            for key, value in cache.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        return totals

    def predictor(self, segmentation: SegmentationSettings) -> GEMPredictor:
        return GEMPredictor(self.load(), segmentation, text_encoder=self.encode_text)

    # ------------------------------------------------------------------ prediction
    def embed(self, predictor: GEMPredictor, image: np.ndarray,
              original_size: tuple[int, int] | None = None) -> ImageEmbedding:
        """The image tower on one image, serialised per process; timed for /metrics."""
        with self._infer_lock:
            started = time.perf_counter()
            embedding = predictor.set_image(image, original_size)
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
        return embedding

    def segment(self, image: np.ndarray, prompts: Sequence[str], segmentation: SegmentationSettings,
                original_size: tuple[int, int] | None = None) -> Segmentation:
        """One image (``[H, W, 3]`` uint8 RGB) -> :class:`Segmentation` of ``prompts`` at
        ``original_size`` (``(H0, W0)``, default the image's)."""
        predictor = self.predictor(segmentation)
        return predictor.predict(list(prompts), self.embed(predictor, image, original_size))

    def predict_tasks(self, tasks: Sequence[Mapping], label_config: str, extra_params: Any = None,
                      spec: ProjectSpec | None = None) -> list[dict]:
        """One prediction per task, in order.

        A task whose image cannot be fetched, decoded or segmented gets an empty
        prediction (``result: []``, score 0) and a warning naming the task and the reason;
        the other tasks are not affected.

        Raises:
            RequestError: the config/params are unusable or a task is malformed.
            ModelUnavailable: the model cannot be loaded.
        """
        spec = spec or self.project(label_config, extra_params)
        check_tasks(tasks, spec.targets)
        self.load()
        return [self.predict_task(task, spec) for task in tasks]

    def predict_task(self, task: Mapping, spec: ProjectSpec) -> dict:
        """One task -> one prediction dict (never raises for image problems)."""
        try:
            return self.predict_task_or_raise(task, spec)
        except (ImageError, ValueError, OSError) as err:
            self.metrics.task_failures.labels(reason=type(err).__name__).inc()
            log.warning("task %s: no prediction: %s", task.get("id"), err)
            return prediction([], spec.model_version)

    def predict_task_or_raise(self, task: Mapping, spec: ProjectSpec) -> dict:
        """One task -> one prediction dict; image problems raise (:class:`ImageError`,
        ``ValueError``, ``OSError``) so that a caller can report them."""
        task_id = task.get("id")
        predictor = self.predictor(spec.segmentation)
        regions: list[dict] = []
        areas: list[float] = []
        embeddings: dict[str, ImageEmbedding] = {}
        for target in spec.targets:
            url = task["data"][target.value_key]
            if url not in embeddings:  # several controls on one image share its embedding
                started = time.perf_counter()
                # decoding large JPEGs at a reduced scale is enough for the model input
                image = self.fetcher.fetch(url, task_id=task_id, min_size=spec.segmentation.input_size)
                width, height = original_size(image)
                pixels = np.asarray(image)
                self.metrics.fetch_seconds.observe(time.perf_counter() - started)
                embeddings[url] = self.embed(predictor, pixels, (height, width))
            result = predictor.predict(list(dict.fromkeys(target.prompts)), embeddings[url])
            for region, area in self._target_regions(result, target):
                regions.append(region)
                areas.append(area)
        if not regions:
            return prediction([], spec.model_version)
        score = sum(r["score"] * a for r, a in zip(regions, areas)) / max(sum(areas), 1e-12)
        return prediction(regions, spec.model_version, score=score)

    @staticmethod
    def _target_regions(result: Segmentation, target: BrushTarget) -> list[tuple[dict, float]]:
        """Brush regions of one control: ``[(region, area fraction)]``."""
        out, used = [], set()
        for label, prompt in zip(target.labels, target.prompts):
            if prompt not in result.scores or prompt in used:  # a shared prompt's mask goes to the first label
                continue
            used.add(prompt)
            score = result.scores[prompt]
            if target.score_threshold is not None and score < target.score_threshold:
                continue
            out.append((brush_region(result.mask(prompt), label, target, score), result.areas[prompt]))
        return out


def check_tasks(tasks: Any, targets: Sequence[BrushTarget]) -> None:
    """Raise :class:`RequestError` unless ``tasks`` is a list of task objects with image data."""
    if not isinstance(tasks, list):
        raise RequestError("'tasks' must be a list of task objects")
    keys = sorted({t.value_key for t in targets})
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise RequestError(f"tasks[{i}] is {type(task).__name__}, not a task object")
        data = task.get("data")
        if not isinstance(data, Mapping):
            raise RequestError(f"tasks[{i}] (id {task.get('id')}) has no 'data' object")
        for key in keys:
            value = data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise RequestError(f"tasks[{i}] (id {task.get('id')}) has no image URL under data.{key} "
                                   f"(the label config's <Image value=\"${key}\">)")
