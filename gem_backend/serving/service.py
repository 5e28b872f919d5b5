"""The prediction service: Label Studio tasks + labeling spec -> predictions.

One :class:`GEMService` per process holds the model (loaded once), the image fetcher and
the text-embedding caches. The HTTP app (``/predict``), the CLI and the bulk pre-labeling
workers all call :meth:`GEMService.predict_tasks`, so they give the same predictions and
the same ``model_version``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .feature_cache import EmbeddingCache, RegionCache, embedding_key, image_namespace, regions_namespace
from ..labelstudio.images import ImageError, ImageFetcher, decode_image, original_size
from ..labelstudio.interactive import InteractiveContext, parse_context, select_region
from ..labelstudio.spec import BitmaskTarget, BrushTarget, ChoicesTarget, LabelConfigError, LabelTarget, PolygonTarget, RectangleTarget, TextPromptTarget, match_label, parse_labeling_config
from ..labelstudio.brush import stretched_label_rles
from ..labelstudio.bitmask import label_pngs
from ..labelstudio.results import bitmask_region, bitmask_region_from_png, brush_region, brush_region_from_rle, choices_region, polygon_region, prediction, rectangle_region
from .metrics import Metrics
from ..algorithm.geometry import bounding_boxes, component_means, connected_components, mask_polygons, to_percent
from ..algorithm.segmentation import (BACKGROUND_KEY, GEMPredictor, ImageEmbedding, Segmentation, SegmentationSettings,
                                      nearest_indices)
from ..settings import Settings, SettingsError
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
    """What one project asks for: its output targets (brush, polygon, rectangle, choices),
    settings, model version, and the TextAreas whose text is a prompt.

    With prototypes on (``segmentation.prototypes``) and a ``project`` id, ``prototypes``
    holds the project's active visual prototypes (``{label: (unit vector, weight a)}``,
    :mod:`gem_backend.prototypes`) and ``model_version`` ends in ``-p<digest>`` of their
    coarse state."""

    targets: tuple[LabelTarget, ...]
    segmentation: SegmentationSettings
    model_version: str
    text_prompts: tuple[TextPromptTarget, ...] = ()
    project: str = ""
    prototypes: Mapping[str, tuple] | None = field(default=None, compare=False, repr=False)


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
        self._image_cache: EmbeddingCache | None = None
        self._region_cache: RegionCache | None = None
        self._sam2: dict[str, Any] = {}  # SAM 2 models by name, loaded on first use
        self._sam2_errors: dict[str, str] = {}  # like the GEM model's load error: kept, not retried per request
        self._sam2_lock = threading.Lock()
        self._prototype_store = None
        self._store_warned = 0.0
        self._prefetch_pool: ThreadPoolExecutor | None = None

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
            if self.settings.segmentation.regions != "none":  # SAM 2 too, before the first request needs it
                self.region_generator(self.settings.segmentation)
        except ModelUnavailable:
            pass  # recorded in _load_error (or the SAM 2 error); /health and /predict report it

    def load(self):
        """The loaded model; loads it on first call. Raises :class:`ModelUnavailable`."""
        if self._loaded is not None:
            return self._loaded
        with self._load_lock:
            if self._loaded is None:
                if self._load_error:
                    raise ModelUnavailable(self._load_error)
                from ..algorithm.models import load_gem_model

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
    def project(self, label_config: str | None, extra_params: Any = None, project: Any = None) -> ProjectSpec:
        """Parse a project's label config and extra params; no model needed.

        ``project``: the Label Studio project id (``"3"`` or Label Studio's ``"3.1716..."``);
        with prototypes on, the project's active prototypes and their digest in the
        ``model_version`` come with the spec (:meth:`with_prototypes`).

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
                config = parse_labeling_config(label_config)
                seg = self.settings.segmentation_for(extra_params)
                seg = with_config_thresholds(seg, config.targets)
            except (LabelConfigError, SettingsError, ValueError) as err:
                raise RequestError(str(err)) from None
            spec = ProjectSpec(config.targets, seg, self.settings.model_version(seg), config.text_prompts)
            if key:
                if len(self._specs) >= 256:  # projects x param sets: a handful in practice
                    self._specs.clear()
                self._specs[key] = spec
        return self.with_prototypes(spec, project) if project not in (None, "") else spec

    # ------------------------------------------------------------------ prototypes
    @property
    def prototype_store(self):
        """The per-project prototype store (Redis with ``REDIS_URL``, else files)."""
        with self._caches_lock:
            if self._prototype_store is None:
                from .prototypes import open_store

                self._prototype_store = open_store(self.settings)
            return self._prototype_store

    def with_prototypes(self, spec: ProjectSpec, project: Any) -> ProjectSpec:
        """``spec`` for ``project``: with prototypes on, its active prototypes (labels of the
        config and the background) and ``model_version + "-p" + digest`` once any is active.
        A store that cannot be read gives text-only predictions (a warning every 30 s)."""
        from .prototypes import project_key, active_prototypes, prototype_digest

        try:
            pid = project_key(project)
        except ValueError:
            return spec
        if not spec.segmentation.prototypes:
            return dataclasses.replace(spec, project=pid)
        try:
            totals = self.prototype_store.totals(pid)
        except Exception as err:  # noqa: BLE001 - Redis down, unreadable file: never fail a prediction
            now = time.monotonic()
            if now - self._store_warned > 30.0:
                self._store_warned = now
                log.warning("project %s: prototypes unavailable (%s: %s); predicting from text only",
                            pid, type(err).__name__, err)
            return dataclasses.replace(spec, project=pid)
        labels = {label for target in spec.targets for label in target.labels}
        active = active_prototypes(totals, spec.segmentation, labels)
        if spec.segmentation.threshold <= 0:
            active.pop(BACKGROUND_KEY, None)  # no background prompts to blend it into
        digest = prototype_digest(totals, active)
        version = f"{spec.model_version}-p{digest}" if digest else spec.model_version
        return dataclasses.replace(spec, project=pid, prototypes=active or None, model_version=version)

    @staticmethod
    def prompt_prototypes(spec: ProjectSpec, pairs: Sequence[tuple[str, str]]) -> dict[str, tuple] | None:
        """``{prompt: (vector, a)}`` for a control's ``(label, prompt)`` pairs (a prompt shared by
        several labels takes the first one's prototype), plus the background's."""
        if not spec.prototypes:
            return None
        out: dict[str, tuple] = {}
        for label, prompt in pairs:
            if prompt not in out and label in spec.prototypes:
                out[prompt] = spec.prototypes[label]
        if BACKGROUND_KEY in spec.prototypes:
            out[BACKGROUND_KEY] = spec.prototypes[BACKGROUND_KEY]
        return out or None

    # ------------------------------------------------------------------ text
    def _cache(self, templates: tuple[str, ...]) -> TextEmbeddingCache:
        with self._caches_lock:
            cache = self._caches.get(templates)
            if cache is None:
                cache = TextEmbeddingCache(self.settings.text_namespace(templates), self.settings.caches_redis_url,
                                           maxsize=self.settings.text_cache_size, ttl=self.settings.text_cache_ttl)
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
              original_size: tuple[int, int] | None = None, regions: np.ndarray | None = None) -> ImageEmbedding:
        """The image tower on one image, serialised per process; timed for /metrics. ``regions``:
        the instance map, for a method whose tokens take regions (CorrCLIP)."""
        with self._infer_lock:
            started = time.perf_counter()
            embedding = predictor.set_image(image, original_size, regions)
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
        return embedding

    def segment(self, image: np.ndarray, prompts: Sequence[str], segmentation: SegmentationSettings,
                original_size: tuple[int, int] | None = None) -> Segmentation:
        """One image (``[H, W, 3]`` uint8 RGB) -> :class:`Segmentation` of ``prompts`` at
        ``original_size`` (``(H0, W0)``, default the image's)."""
        predictor = self.predictor(segmentation)
        regions = None
        if segmentation.regions != "none":  # first: CorrCLIP's tower takes them
            generator = self.region_generator(segmentation)
            with self._infer_lock:
                regions = generator.instance_map(image)
        embedding = self.embed(predictor, image, original_size, regions)
        return predictor.predict(list(prompts), embedding, regions=regions)

    # ------------------------------------------------------------------ image features
    @property
    def image_cache(self) -> EmbeddingCache:
        """The image-feature cache (in-process LRU, and Redis with ``REDIS_URL``)."""
        with self._caches_lock:
            if self._image_cache is None:
                s = self.settings
                self._image_cache = EmbeddingCache(s.caches_redis_url, max_bytes=max(0, s.image_cache_mb) << 20,
                                                   ttl=s.image_cache_ttl)
            return self._image_cache

    def cached_embedding(self, key: str, segmentation: SegmentationSettings) -> ImageEmbedding | None:
        """The image cache's entry for ``key`` if these settings can use it (counted in the
        metrics), else None."""
        cached, where = self.image_cache.get(key)
        if cached is not None and cached.guide is None and segmentation.refine != "none":
            cached, where = None, None  # cached before images were kept: refinement needs it
        self.metrics.image_cache.labels(result={"local": "local_hits", "redis": "redis_hits"}.get(where, "misses")).inc()
        return cached

    def image_embedding(self, predictor: GEMPredictor, url: str, task_id: Any,
                        segmentation: SegmentationSettings) -> ImageEmbedding:
        """The GEM features of a task image (:meth:`image_features` without the regions)."""
        return self.image_features(predictor, url, task_id, segmentation, with_regions=False)[0]

    def image_features(self, predictor: GEMPredictor, url: str, task_id: Any, segmentation: SegmentationSettings,
                       with_regions: bool = True) -> tuple[ImageEmbedding, np.ndarray | None]:
        """``(GEM features, regions)`` of a task image: fetched bytes -> sha256 -> caches; only
        on a miss is the image decoded and run through the image tower (or SAM 2) and cached.
        ``regions``: the instance map with ``segmentation.regions`` on (:meth:`image_regions`),
        else None (also with ``with_regions`` False)."""
        if not with_regions:
            segmentation = dataclasses.replace(segmentation, regions="none")
        started = time.perf_counter()
        data, content_type, source = self.fetcher.fetch_raw(url, task_id)
        loaded = self.load()
        key = embedding_key(data, image_namespace(self.settings, segmentation, str(loaded.dtype)))
        embedding = self.cached_embedding(key, segmentation)
        # before the tower: a method like CorrCLIP takes the regions as its input
        regions = self.image_regions(data, segmentation, content_type=content_type, source=source)
        if embedding is not None:
            self.metrics.fetch_seconds.observe(time.perf_counter() - started)
            return embedding, regions
        # decoding large JPEGs at a reduced scale is enough for the model input
        image = decode_image(data, source, self.fetcher.max_pixels, content_type, min_size=segmentation.decode_short_side)
        width, height = original_size(image)
        check_usable(width, height, source)
        pixels = np.asarray(image)
        self.metrics.fetch_seconds.observe(time.perf_counter() - started)
        embedding = self.embed(predictor, pixels, (height, width), regions)
        self.image_cache.put(key, embedding)
        return embedding, regions

    # ------------------------------------------------------------------ regions
    @property
    def region_cache(self) -> RegionCache:
        """The regions cache (in-process LRU of compact instance maps, and Redis with ``REDIS_URL``,
        same TTL as the image features)."""
        with self._caches_lock:
            if self._region_cache is None:
                s = self.settings
                self._region_cache = RegionCache(s.caches_redis_url, max_bytes=max(0, s.image_cache_mb // 8) << 20,
                                                 ttl=s.image_cache_ttl)
            return self._region_cache

    def region_generator(self, segmentation: SegmentationSettings):
        """A :class:`~gem_backend.algorithm.sam.RegionGenerator` for ``segmentation``'s SAM 2
        options; the model is loaded once per name. Raises :class:`ModelUnavailable`."""
        from ..algorithm.sam import RegionGenerator, load_sam2

        seg = segmentation
        with self._sam2_lock:
            loaded = self._sam2.get(seg.regions_model)
            if loaded is None:
                if seg.regions_model in self._sam2_errors:
                    raise ModelUnavailable(self._sam2_errors[seg.regions_model])
                s = self.settings
                try:
                    loaded = load_sam2(seg.regions_model, s.regions_pretrained, device=s.device,
                                       cache_dir=s.model_dir)
                except Exception as err:  # noqa: BLE001 - offline, missing package or file: a 503 with why
                    self._sam2_errors[seg.regions_model] = f"SAM 2 regions unavailable: {err}"
                    log.error("%s", self._sam2_errors[seg.regions_model])
                    raise ModelUnavailable(self._sam2_errors[seg.regions_model]) from None
                self._sam2[seg.regions_model] = loaded
        return RegionGenerator(loaded, points_per_side=seg.regions_points, pred_iou_thresh=seg.regions_iou,
                               stability_score_thresh=seg.regions_stability)

    def image_regions(self, data: bytes, segmentation: SegmentationSettings, content_type: str | None = None,
                      source: str = "image") -> np.ndarray | None:
        """The instance map (``[h, w]`` int64, SAM 2's working size) of the image ``data``, or
        None with regions off: from the regions cache (keyed by the bytes, like the features),
        else SAM 2 on the image decoded for it (at SAM 2's working size, whatever the GEM input
        needed: the same regions on every path), serialised with the GEM forwards, then cached.
        A re-prediction, a threshold change or a click never runs SAM 2 again."""
        if segmentation.regions == "none":
            return None
        key = embedding_key(data, regions_namespace(self.settings, segmentation))
        regions, _ = self.region_cache.get(key)
        if regions is not None:
            return regions
        from ..algorithm.sam import MAX_WORKING_SIDE

        image = decode_image(data, source, self.fetcher.max_pixels, content_type, min_size=MAX_WORKING_SIDE)
        check_usable(*original_size(image), source)
        pixels = np.asarray(image)
        generator = self.region_generator(segmentation)
        with self._infer_lock:
            regions = generator.instance_map(pixels)
        self.region_cache.put(key, regions)
        return regions

    def predict_tasks(self, tasks: Sequence[Mapping], label_config: str, extra_params: Any = None,
                      spec: ProjectSpec | None = None, context: Any = None) -> list[dict]:
        """One prediction per task, in order.

        ``context``: Label Studio's ``params.context`` of an interactive call (smart-tool
        clicks/boxes, TextArea text); see :meth:`predict_task_or_raise`.

        Several tasks go through :meth:`predict_stream`: the next tasks' images are fetched
        and decoded while the current ones run through the model.

        A task whose image cannot be fetched, decoded or segmented, or that has no image URL
        under the key the label config reads (:func:`task_problem`), gets an empty
        prediction (``result: []``, score 0) and a warning naming the task and the reason;
        the other tasks are not affected.

        Raises:
            RequestError: the config/params are unusable, or ``tasks`` is not a list of
                task objects.
            ModelUnavailable: the model cannot be loaded.
        """
        spec = spec or self.project(label_config, extra_params)
        check_request_tasks(tasks)
        problems = [task_problem(task, spec.targets) for task in tasks]
        usable = [task for task, problem in zip(tasks, problems) if problem is None]
        if usable:
            self.load()
        if len(usable) < 2 or parse_context(context).has_geometry:
            done = iter([self.predict_task(task, spec, context) for task in usable])
        else:
            done = iter([self._failed(task, spec, out) if isinstance(out, BaseException) else out
                         for task, out in self.predict_stream(usable, spec, context)])
        return [next(done) if problem is None else self._failed(task, spec, RequestError(problem))
                for task, problem in zip(tasks, problems)]

    # images fetched and decoded ahead of the forward (threads: fetch and JPEG decode release the GIL)
    PREFETCH_THREADS = 2

    @property
    def prefetch_pool(self) -> ThreadPoolExecutor:
        """The small thread pool that fetches and decodes the next tasks' images."""
        with self._caches_lock:
            if self._prefetch_pool is None:
                self._prefetch_pool = ThreadPoolExecutor(self.PREFETCH_THREADS, thread_name_prefix="gem-prefetch")
            return self._prefetch_pool

    def predict_stream(self, tasks: Sequence[Mapping], spec: ProjectSpec, context: Any = None,
                       batch: int | None = None) -> Iterator[tuple[Mapping, dict | Exception]]:
        """``(task, prediction or the image error)`` per task, in order, pipelined: the tasks go
        in windows of ``4 * batch``; the images of window ``k + 1`` are fetched, hashed, looked
        up in the feature cache, decoded and resized in :attr:`prefetch_pool` while window
        ``k`` runs through the model, ``batch`` images of one input size per forward
        (``GEM_BATCH_SIZE``; default 8 on GPU, 1 on CPU). The predictions are those of
        :meth:`predict_task_or_raise` one task at a time; an image that fails (fetch, decode,
        unusable size: :class:`ImageError`, ``ValueError``, ``OSError``) fails its tasks only.
        ``/predict`` (:meth:`predict_tasks`) and the bulk jobs both use it."""
        loaded = self.load()
        batch = batch or self.settings.batch_size or (8 if loaded.device.type == "cuda" else 1)
        window = 4 * batch
        predictor = self.predictor(spec.segmentation)
        namespace = image_namespace(self.settings, spec.segmentation, str(loaded.dtype))
        chunks = [tasks[i:i + window] for i in range(0, len(tasks), window)]

        def submit(chunk: Sequence[Mapping]) -> dict[str, Future]:
            futures: dict[str, Future] = {}
            for task in chunk:
                data = task.get("data") if isinstance(task, Mapping) else None
                for target in spec.targets:
                    url = data.get(target.value_key) if isinstance(data, Mapping) else None
                    if isinstance(url, str) and url not in futures:
                        futures[url] = self.prefetch_pool.submit(self._prepare_image, url, task.get("id"),
                                                                 spec.segmentation, predictor, namespace)
            return futures

        upcoming = submit(chunks[0]) if chunks else {}
        try:
            for k, chunk in enumerate(chunks):
                current = upcoming
                # the next window's fetch and decode overlap this window's forwards
                upcoming = submit(chunks[k + 1]) if k + 1 < len(chunks) else {}
                ready_regions: dict[str, np.ndarray | None] = {}
                ready = self._embed_prepared(current, predictor, batch, ready_regions)
                for task in chunk:
                    try:
                        yield task, self.predict_task_or_raise(task, spec, context, ready, ready_regions)
                    except (ImageError, ValueError, OSError) as err:
                        yield task, err
        finally:
            for future in upcoming.values():  # the caller stopped early: drop what is not started
                future.cancel()

    def _prepare_image(self, url: str, task_id: Any, segmentation: SegmentationSettings,
                       predictor: GEMPredictor, namespace: str):
        """In a prefetch thread: ``("ready", ImageEmbedding, regions)`` from the cache, or ``("input",
        key, x [1, 3, H_in, W_in], (H, W), regions)`` decoded and resized for the model; regions as
        :meth:`image_regions` gives them (SAM 2 runs here on a miss). Raises image errors."""
        started = time.perf_counter()
        data, content_type, source = self.fetcher.fetch_raw(url, task_id)
        key = embedding_key(data, namespace)
        cached = self.cached_embedding(key, segmentation)
        if cached is not None:
            self.metrics.fetch_seconds.observe(time.perf_counter() - started)
            return ("ready", cached, self.image_regions(data, segmentation, content_type=content_type, source=source))
        image = decode_image(data, source, self.fetcher.max_pixels, content_type,
                             min_size=segmentation.decode_short_side)
        width, height = original_size(image)
        check_usable(width, height, source)
        x = predictor.preprocess(np.asarray(image), (height, width))
        self.metrics.fetch_seconds.observe(time.perf_counter() - started)
        return ("input", key, x, (height, width),
                self.image_regions(data, segmentation, content_type=content_type, source=source))

    def _embed_prepared(self, futures: Mapping[str, Future], predictor: GEMPredictor, batch: int,
                        regions: dict[str, np.ndarray | None] | None = None) -> dict[str, ImageEmbedding | Exception]:
        """Wait for the prepared images in order; run the model on ``batch`` of one input size
        at a time as they come (the rest at the end). ``{url: ImageEmbedding or image error}``;
        each image's regions (or None) go into ``regions`` by URL."""
        ready: dict[str, ImageEmbedding | Exception] = {}
        buckets: dict[tuple, list[tuple[str, str, torch.Tensor, tuple[int, int], np.ndarray | None]]] = {}

        def run(items) -> None:
            x = torch.cat([item[2] for item in items])
            with self._infer_lock:
                started = time.perf_counter()
                embeddings = predictor.embed_batch(x, [item[3] for item in items], [item[4] for item in items])
                per_image = (time.perf_counter() - started) / len(items)
            for (url, key, _, _, _), emb in zip(items, embeddings):
                self.metrics.forward_seconds.observe(per_image)
                self.image_cache.put(key, emb)
                ready[url] = emb

        for url, future in futures.items():
            try:
                prepared = future.result()
            except (ImageError, ValueError, OSError) as err:
                ready[url] = err
                continue
            if regions is not None:
                regions[url] = prepared[-1]
            if prepared[0] == "ready":
                ready[url] = prepared[1]
                continue
            _, key, x, size, image_regions = prepared
            bucket = buckets.setdefault(tuple(x.shape), [])
            bucket.append((url, key, x, size, image_regions))
            if len(bucket) >= batch:
                run(bucket)
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                run(bucket)
        return ready

    def _failed(self, task: Mapping, spec: ProjectSpec, err: BaseException) -> dict:
        self.metrics.task_failures.labels(reason=type(err).__name__).inc()
        log.warning("task %s: no prediction: %s", task.get("id"), err)
        return prediction([], spec.model_version)

    def predict_task(self, task: Mapping, spec: ProjectSpec, context: Any = None,
                     ready: Mapping[str, ImageEmbedding] | None = None) -> dict:
        """One task -> one prediction dict (never raises for image problems).

        ``ready``: image features computed beforehand (:meth:`predict_stream`), by URL; an
        exception there is the error of fetching that image, raised for this task.
        """
        try:
            return self.predict_task_or_raise(task, spec, context, ready)
        except (ImageError, ValueError, OSError) as err:
            return self._failed(task, spec, err)

    def predict_task_or_raise(self, task: Mapping, spec: ProjectSpec, context: Any = None,
                              ready: Mapping[str, ImageEmbedding] | None = None,
                              ready_regions: Mapping[str, np.ndarray | None] | None = None) -> dict:
        """One task -> one prediction dict; image problems raise (:class:`ImageError`,
        ``ValueError``, ``OSError``) so that a caller can report them.

        With smart-tool clicks or boxes in ``context`` (an interactive call), the prediction
        holds the one object they designate (:meth:`predict_interactive`). Otherwise every
        output control gets its regions; TextArea text (in ``context`` or the task data)
        replaces the labels' prompts (:meth:`text_prompts`). With regions on, each label map is
        voted in its image's regions (``ready_regions`` by URL, else :meth:`image_features`).
        """
        ctx = parse_context(context)
        if ctx.has_geometry:
            return self.predict_interactive(task, spec, ctx)
        task_id = task.get("id")
        predictor = self.predictor(spec.segmentation)
        texts = self.text_prompts(task, spec, ctx)
        regions: list[dict] = []
        areas: list[float] = []
        margins: list[float] = []
        embeddings: dict[str, ImageEmbedding] = dict(ready or {})
        regions_by_url: dict[str, np.ndarray | None] = dict(ready_regions or {})
        for target in spec.targets:
            pairs = self._label_prompts(target, texts.get(target.to_name), spec.segmentation)
            if not pairs:
                continue
            url = task["data"][target.value_key]
            if url not in embeddings:  # several controls on one image share its embedding
                embeddings[url], regions_by_url[url] = self.image_features(predictor, url, task_id,
                                                                           spec.segmentation)
            if isinstance(embeddings[url], Exception):
                raise embeddings[url]
            result = predictor.predict(list(dict.fromkeys(p for _, p in pairs)), embeddings[url],
                                       prototypes=self.prompt_prototypes(spec, pairs),
                                       thresholds=prompt_thresholds(spec.segmentation, pairs),
                                       regions=regions_by_url.get(url))
            for region, area, margin in self._target_regions(result, target, pairs, spec.segmentation):
                regions.append(region)
                areas.append(area)
                margins.append(margin)
        if not regions:
            return prediction([], spec.model_version)
        score = task_score(regions, areas, margins, spec.segmentation.score)
        return prediction(regions, spec.model_version, score=score)

    # ------------------------------------------------------------------ interactive
    def predict_interactive(self, task: Mapping, spec: ProjectSpec, ctx: InteractiveContext) -> dict:
        """The object the annotator's clicks/boxes designate, as one prediction on the output
        control of that image: the control the clicks were drawn on when it is one, else the
        first BrushLabels, else BitmaskLabels, else PolygonLabels, else RectangleLabels. Cheap after the first
        call on an image: its GEM features come from the cache."""
        target = self._interactive_target(spec, ctx)
        if target is None:
            log.info("task %s: interactive request for %s, which has no brush/polygon/rectangle control",
                     task.get("id"), ctx.to_name)
            return prediction([], spec.model_version)
        seg = spec.segmentation
        pairs = dict(zip(target.labels, target.prompts))
        texts = self.text_prompts(task, spec, ctx).get(target.to_name)
        for label, prompt in reversed(self._label_prompts(target, texts, seg) if texts else []):
            pairs[label] = prompt  # a typed prompt names what to look for under its label
        prompts = list(dict.fromkeys(pairs.values()))
        wanted = match_label(ctx.label, target) if ctx.label else None
        predictor = self.predictor(seg)
        embedding, image_regions = self.image_features(predictor, task["data"][target.value_key], task.get("id"), seg)
        probs = predictor.probabilities(prompts, embedding, prototypes=self.prompt_prototypes(
            spec, [(lab, pairs[lab]) for lab in pairs]))
        chosen = select_region(probs, len(prompts), prompts.index(pairs[wanted]) if wanted else None,
                               ctx.clicks, ctx.boxes, seg.threshold)
        small = chosen.mask
        if image_regions is not None:  # the object snapped to the regions it mostly covers
            small = predictor.vote(small.astype(np.uint8), image_regions).astype(bool)
        if not small.any():
            return prediction([], spec.model_version)
        label = wanted or next(lab for lab, p in pairs.items() if p == prompts[chosen.label])
        height, width = embedding.original_size
        if isinstance(target, BrushTarget):
            # the full-size mask is never built: its RLE comes from the small one
            stretch = (nearest_indices(small.shape[0], height), nearest_indices(small.shape[1], width))
            regions = [brush_region(small, label, target, chosen.score, stretch=stretch)]
        elif isinstance(target, BitmaskTarget):
            stretch = (nearest_indices(small.shape[0], height), nearest_indices(small.shape[1], width))
            regions = [bitmask_region(small, label, target, chosen.score, stretch=stretch)]
        else:
            regions = [region for region, _, _ in
                       self._shapes(small, small.astype(np.float32) * chosen.score, label, target, seg,
                                    (height, width), min_area=1)]
        return prediction(regions, spec.model_version, score=chosen.score)

    @staticmethod
    def _interactive_target(spec: ProjectSpec, ctx: InteractiveContext) -> LabelTarget | None:
        shapes = [t for t in spec.targets if not isinstance(t, ChoicesTarget)
                  and (ctx.to_name is None or t.to_name == ctx.to_name)]
        for target in shapes:
            if target.from_name == ctx.from_name:
                return target
        for kind in (BrushTarget, BitmaskTarget, PolygonTarget, RectangleTarget):
            for target in shapes:
                if isinstance(target, kind):
                    return target
        return None

    # ------------------------------------------------------------------ text prompts
    def text_prompts(self, task: Mapping, spec: ProjectSpec, ctx: InteractiveContext | None = None
                     ) -> dict[str, list[str]]:
        """Free-text prompts per image (``to_name``): the ``textarea`` items of an interactive
        context, else the task data under each TextArea's name (a string, one prompt per
        line, or a list of strings)."""
        out: dict[str, list[str]] = {}
        images = {t.to_name for t in spec.targets}
        by_name = {ta.from_name: ta.to_name for ta in spec.text_prompts}
        if ctx is not None and ctx.texts:
            for from_name, to_name, text in ctx.texts:
                for name in ([to_name] if to_name else [by_name[from_name]] if from_name in by_name else images):
                    out.setdefault(name, []).extend(_lines(text))
            return out
        data = task.get("data") or {}
        for ta in spec.text_prompts:
            value = data.get(ta.from_name)
            items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            for item in items:
                if isinstance(item, str):
                    out.setdefault(ta.to_name, []).extend(_lines(item))
        return {k: list(dict.fromkeys(v)) for k, v in out.items() if v}

    def _label_prompts(self, target: LabelTarget, texts: Sequence[str] | None,
                       segmentation: SegmentationSettings) -> list[tuple[str, str]]:
        """``[(label, prompt)]`` of a control: its labels' own prompts, or, given typed texts,
        each text under the label it maps to (:meth:`map_text`)."""
        if not texts:
            return list(zip(target.labels, target.prompts))
        return [self.map_text(text, target, segmentation) for text in texts]

    def map_text(self, text: str, target: LabelTarget, segmentation: SegmentationSettings) -> tuple[str, str]:
        """A typed prompt -> ``(label of target, prompt)``.

        ``"brown cat_cats"`` (GroundingSAM's convention: after the last underscore, a label
        of the control) -> ``("cats", "brown cat")``; a text that is itself a label (or a
        label's prompt) -> that label; any other text -> the label whose prompt is nearest to
        it in CLIP text space.
        """
        text = text.strip()
        head, sep, tail = text.rpartition("_")
        if sep and head.strip():
            label = match_label(tail, target)
            if label is not None:
                return label, head.strip()
        label = match_label(text, target)
        if label is not None:
            return label, text
        emb = self.encode_text([text, *target.prompts], segmentation.templates)
        return target.labels[int(np.argmax(emb[1:] @ emb[0]))], text

    # ------------------------------------------------------------------ regions
    def _target_regions(self, result: Segmentation, target: LabelTarget, pairs: Sequence[tuple[str, str]],
                        segmentation: SegmentationSettings) -> list[tuple[dict, float, float]]:
        """Regions of one control: ``[(region, area fraction, mean margin inside)]``."""
        out, used = [], set()
        present: list[tuple[str, str]] = []
        for label, prompt in pairs:
            if prompt not in result.scores or prompt in used:  # a shared prompt's mask goes to the first label
                continue
            used.add(prompt)
            present.append((label, prompt))
        if isinstance(target, ChoicesTarget):
            return self._choices(result, target, present)
        if isinstance(target, BrushTarget):
            # every label's RLE in one pass over the map at the model input size: the same bytes
            # as each full-size mask's (stretched_label_rles); no full-size array
            return self._painted_regions(result, target, present, stretched_label_rles, brush_region_from_rle)
        if isinstance(target, BitmaskTarget):
            # every label's PNG from the map at the model input size: no full-size array
            return self._painted_regions(result, target, present, label_pngs, bitmask_region_from_png)
        for label, prompt in present:
            out.extend(self._shapes(result.small_mask(prompt), result.confidence, label, target, segmentation,
                                    result.original_size, margin=result.margin))
        return out

    @staticmethod
    def _painted_regions(result: Segmentation, target: LabelTarget, present: Sequence[tuple[str, str]],
                         encode: Callable, region: Callable) -> list[tuple[dict, float, float]]:
        """Regions of a control painted per pixel (BrushLabels, BitmaskLabels): the labels
        scoring at least the control's threshold, all encoded at once from the map at the model
        input size by ``encode(map, ids, rows, cols)``, each made a region by ``region(encoded,
        size, label, target, score)``. ``[(region, area fraction, mean margin inside)]``."""
        kept = [(label, prompt) for label, prompt in present
                if target.score_threshold is None or result.scores[prompt] >= target.score_threshold]
        encoded = encode(result.input_map, [result.labels.index(p) + 1 for _, p in kept], result.rows, result.cols)
        return [(region(data, result.original_size, label, target, result.scores[prompt]),
                 result.areas[prompt], result.margins.get(prompt, result.scores[prompt]))
                for (label, prompt), data in zip(kept, encoded)]

    @staticmethod
    def _shapes(small: np.ndarray, confidence: np.ndarray, label: str, target: LabelTarget,
                segmentation: SegmentationSettings, size: tuple[int, int],
                min_area: int | None = None, margin: np.ndarray | None = None) -> list[tuple[dict, float, float]]:
        """Polygons (PolygonLabels) or boxes (RectangleLabels) of one label's mask at the
        model input size: one per connected part of at least ``min_area`` pixels (default:
        ``segmentation.min_area`` of the image), scored by the mean confidence inside.
        ``[(region, area fraction, mean margin inside (the score without a margin map))]``."""
        h, w = small.shape
        height, width = size
        if min_area is None:
            min_area = max(1, int(np.ceil(segmentation.min_area * h * w)))
        out = []
        if isinstance(target, PolygonTarget):
            tolerance = segmentation.polygon_tolerance / 100.0 * max(height, width)
            polygons, comps = mask_polygons(small, tolerance=tolerance, min_area=min_area,
                                            scale=(width / w, height / h))
            means = component_means(comps, confidence)
            sure = component_means(comps, margin) if margin is not None else means
            for poly in polygons:
                score = float(means[poly.component])
                if target.score_threshold is not None and score < target.score_threshold:
                    continue
                out.append((polygon_region(to_percent(poly.points, (h, w)), label, target, score, width, height),
                            poly.area / (h * w), float(sure[poly.component])))
        elif isinstance(target, RectangleTarget):
            comps = connected_components(small)
            means = component_means(comps, confidence)
            sure = component_means(comps, margin) if margin is not None else means
            for x0, y0, x1, y1, k in bounding_boxes(small, min_area, comps):
                score = float(means[k])
                if target.score_threshold is not None and score < target.score_threshold:
                    continue
                out.append((rectangle_region(100.0 * x0 / w, 100.0 * y0 / h, 100.0 * (x1 - x0) / w,
                                             100.0 * (y1 - y0) / h, label, target, score, width, height),
                            float(comps.areas[k]) / (h * w), float(sure[k])))
        return out

    @staticmethod
    def _choices(result: Segmentation, target: ChoicesTarget,
                 present: Sequence[tuple[str, str]]) -> list[tuple[dict, float, float]]:
        """The choices whose prompt has a mask: all of them (``choice="multiple"``) or the one
        covering most of the image."""
        found = [(label, result.scores[p], result.areas[p], result.margins.get(p, result.scores[p]))
                 for label, p in present
                 if target.score_threshold is None or result.scores[p] >= target.score_threshold]
        if not found:
            return []
        if not target.multiple:
            found = [max(found, key=lambda item: item[2])]
        area = sum(f[2] for f in found)
        score = sum(f[1] * f[2] for f in found) / max(area, 1e-12)
        margin = sum(f[3] * f[2] for f in found) / max(area, 1e-12)
        return [(choices_region([f[0] for f in found], target, score), area, margin)]


def with_config_thresholds(segmentation: SegmentationSettings,
                           targets: Sequence[LabelTarget]) -> SegmentationSettings:
    """``segmentation`` with the ``<Label model_score_threshold>``s of the config added to its
    ``label_thresholds`` (those from ``extra_params`` win), so that they enter the model version."""
    from_config: dict[str, float] = {}
    for target in targets:
        for label, value in target.label_thresholds:
            from_config.setdefault(label, value)
    if not from_config:
        return segmentation
    return dataclasses.replace(segmentation,
                               label_thresholds={**from_config, **dict(segmentation.label_thresholds)})


def prompt_thresholds(segmentation: SegmentationSettings, pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """``{prompt: threshold}`` of a control's ``(label, prompt)`` pairs from the per-label
    thresholds (keyed by label, or by prompt); a prompt shared by labels takes the first's."""
    table = dict(segmentation.label_thresholds)
    out: dict[str, float] = {}
    for label, prompt in pairs:
        value = table.get(label, table.get(prompt))
        if value is not None and prompt not in out:
            out[prompt] = value
    return out


def task_score(regions: Sequence[Mapping], areas: Sequence[float], margins: Sequence[float], kind: str) -> float:
    """A prediction's task-level score: the area-weighted mean over its regions of the region
    scores (``mean_prob``: mean winning probability) or of the mean per-pixel margin between
    the best and the second-best prompt (``margin``). Low = uncertain: sorting tasks by
    prediction score, ascending, puts the least certain first."""
    values = margins if kind == "margin" else [r["score"] for r in regions]
    return float(sum(v * a for v, a in zip(values, areas)) / max(sum(areas), 1e-12))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


MIN_IMAGE_SIDE = 2
MAX_ASPECT_RATIO = 200


def check_usable(width: int, height: int, source: str) -> None:
    """Raise :class:`ImageError` for images no segmentation can be drawn on: a side under
    ``MIN_IMAGE_SIDE`` pixels, or an aspect ratio over ``MAX_ASPECT_RATIO`` (a strip that
    the model would see as one row of patches)."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(f"image too small to segment: {source} is {width}x{height} pixels "
                         f"(at least {MIN_IMAGE_SIDE} per side)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image unusable: {source} is {width}x{height} pixels, an aspect ratio over "
                         f"{MAX_ASPECT_RATIO}:1")


def check_request_tasks(tasks: Any) -> None:
    """Raise :class:`RequestError` unless ``tasks`` is a list of task objects (a request
    malformed as a whole: nothing in it can be trusted)."""
    if not isinstance(tasks, list):
        raise RequestError("'tasks' must be a list of task objects")
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise RequestError(f"tasks[{i}] is {type(task).__name__}, not a task object")


def task_problem(task: Mapping, targets: Sequence[LabelTarget]) -> str | None:
    """Why this task cannot be predicted (no ``data`` object, no image URL under a key the
    label config reads), or None. One such task gets its own empty prediction; a project
    whose tasks were imported with mixed data fields keeps the others' predictions."""
    data = task.get("data")
    if not isinstance(data, Mapping):
        return f"task {task.get('id')} has no 'data' object"
    for key in sorted({t.value_key for t in targets}):
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in data else f"{type(value).__name__} {str(value)[:40]!r}"
            return (f"task {task.get('id')} has no image URL under data.{key} (the label config's "
                    f"<Image value=\"${key}\">; got {got})")
    return None


def check_tasks(tasks: Any, targets: Sequence[LabelTarget]) -> None:
    """Raise :class:`RequestError` unless ``tasks`` is a list of task objects with image data."""
    check_request_tasks(tasks)
    for task in tasks:
        problem = task_problem(task, targets)
        if problem:
            raise RequestError(problem)
