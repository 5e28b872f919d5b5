"""All settings in one typed object, read from the environment once.

Names follow the official Label Studio ML examples where they exist (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``, ``LOG_LEVEL``,
``WORKERS``, ``THREADS``, ``PORT``, ``MODEL_DIR``, ``REDIS_URL``); GEM's own have a ``GEM_``
prefix. Segmentation settings can be overridden per project through the ``extra_params``
JSON of ``/setup`` (keys without the prefix, e.g. ``{"threshold": 0.4}``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .algorithm.gem import DEFAULT_TEMPLATES
from .algorithm.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .algorithm.segmentation import DEFAULT_BACKGROUND_PROMPTS, SegmentationSettings


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


def openai_templates() -> tuple[str, ...]:
    """The 80 ImageNet prompt templates of OpenAI's CLIP, as ``{}`` format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def parse_templates(value: str | list | tuple) -> tuple[str, ...]:
    """``openai`` (the 80 templates), ``|``-separated format strings, or a list of them."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    elif not isinstance(value, str):
        raise SettingsError(f"templates must be a string or a list of strings, got {type(value).__name__}")
    elif value.strip().lower() in ("openai", "openai80", "imagenet"):
        return openai_templates()
    else:
        items = value.split("|")
    items = tuple(t.strip() for t in items if t.strip())
    if not items or any("{}" not in t for t in items):
        raise SettingsError(f"templates must be format strings with '{{}}', separated by '|'; got {value!r}")
    return items


def _parse_prompts(value: str | list | tuple) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    if not isinstance(value, str):
        raise SettingsError(f"background prompts must be a comma-separated string or a list, "
                            f"got {type(value).__name__}")
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _parse_score(value: str) -> str:
    from .algorithm.segmentation import SCORE_KINDS

    kind = str(value).strip().lower().replace("-", "_")
    if kind not in SCORE_KINDS:
        raise ValueError(f"must be one of {', '.join(SCORE_KINDS)}")
    return kind


def _parse_allowed_hosts(value: str) -> tuple[str, ...]:
    from .labelstudio.images import parse_allowed_hosts

    return parse_allowed_hosts(value)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        # a cache entry without a TTL is never evicted under volatile-lru and fills Redis
        raise ValueError("must be >= 1 (seconds): cache entries always expire")
    return number


def _parse_method(value: str) -> str:
    from .algorithm.methods import method_names

    name = str(value).strip().lower()
    if name not in method_names():
        raise ValueError(f"unknown method; valid methods: {', '.join(method_names())}")
    return name


def _json_object(value: str | Mapping, what: str) -> Mapping:
    """A setting given as a JSON object (text, empty = ``{}``) or as a mapping already; ``what``
    completes the error "must be a JSON object of ..."."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"not a JSON object: {err.msg}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a JSON object of {what}")
    return value


def _parse_options(value: str | Mapping) -> tuple[tuple[str, Any], ...]:
    value = _json_object(value, "the method's options, e.g. {\"gaussian_std\": 3}")
    return tuple(sorted((str(k), v) for k, v in value.items()))


def _parse_refine(value: str) -> str:
    from .algorithm.segmentation import REFINE_KINDS

    kind = str(value).strip().lower()
    if kind not in REFINE_KINDS:
        raise ValueError(f"must be one of {', '.join(REFINE_KINDS)}")
    return kind


def _parse_regions(value: str) -> str:
    from .algorithm.sam import INSTALL_HINT, sam2_available
    from .algorithm.segmentation import REGION_KINDS

    kind = str(value).strip().lower()
    if kind not in REGION_KINDS:
        raise ValueError(f"must be one of {', '.join(REGION_KINDS)}")
    if kind == "sam2" and not sam2_available():
        raise ValueError(INSTALL_HINT)
    return kind


def _parse_sam2_model(value: str) -> str:
    from .algorithm.sam import check_sam2_model

    return check_sam2_model(str(value).strip().lower())


def _parse_ints(value: str | list | tuple) -> tuple[int, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if isinstance(item, bool) or float(item) != int(float(item)):
            raise ValueError(f"not an integer: {item!r}")
        out.append(int(float(item)))
    if not out:
        raise ValueError("at least one integer is needed")
    return tuple(out)


def _parse_label_thresholds(value: str | Mapping) -> tuple[tuple[str, float], ...]:
    value = _json_object(value, "label -> threshold, e.g. {\"cat\": 0.4}")
    out = {}
    for label, raw in value.items():
        if isinstance(raw, bool):
            raise ValueError(f"{label!r}: not a number: {raw!r}")
        number = float(raw)
        if not 0.0 <= number < 1.0:
            raise ValueError(f"{label!r}: threshold must be in [0, 1), got {raw!r}")
        out[str(label)] = number
    return tuple(sorted(out.items()))


# Segmentation fields overridable per project: extra_params key -> (env name, parser)
_SEG_FIELDS: dict[str, tuple[str, Any]] = {
    "input_size": ("GEM_INPUT_SIZE", int),
    "max_long_side": ("GEM_MAX_LONG_SIDE", int),
    "square": ("GEM_SQUARE", _parse_bool),
    "logit_scale": ("GEM_LOGIT_SCALE", float),
    "threshold": ("GEM_THRESHOLD", float),
    "background_prompts": ("GEM_BACKGROUND_PROMPTS", _parse_prompts),
    "min_area": ("GEM_MIN_AREA", float),
    "templates": ("GEM_TEMPLATES", parse_templates),
    "polygon_tolerance": ("GEM_POLYGON_TOLERANCE", float),
    "score": ("GEM_SCORE", _parse_score),
    "prototypes": ("GEM_PROTOTYPES", _parse_bool),
    "prototype_strength": ("GEM_PROTOTYPE_STRENGTH", float),
    "prototype_min_annotations": ("GEM_PROTOTYPE_MIN_ANNOTATIONS", int),
    "method": ("GEM_METHOD", _parse_method),
    "method_options": ("GEM_METHOD_OPTIONS", _parse_options),
    "refine": ("GEM_REFINE", _parse_refine),
    "refine_iterations": ("GEM_REFINE_ITERATIONS", int),
    "refine_dilations": ("GEM_REFINE_DILATIONS", _parse_ints),
    "windows_above": ("GEM_WINDOWS_ABOVE", int),
    "window": ("GEM_WINDOW", int),
    "window_stride": ("GEM_WINDOW_STRIDE", int),
    "window_short_side": ("GEM_WINDOW_SHORT_SIDE", int),
    "label_thresholds": ("GEM_LABEL_THRESHOLDS", _parse_label_thresholds),
    "regions": ("GEM_REGIONS", _parse_regions),
    "regions_model": ("GEM_REGIONS_MODEL", _parse_sam2_model),
    "regions_points": ("GEM_REGIONS_POINTS", int),
    "regions_iou": ("GEM_REGIONS_IOU", float),
    "regions_stability": ("GEM_REGIONS_STABILITY", float),
}


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with defaults that work out of the box."""

    # model
    model: str = DEFAULT_MODEL                      # GEM_MODEL: open_clip name or config JSON path
    pretrained: str = DEFAULT_PRETRAINED            # GEM_PRETRAINED: tag, weights file, or "none"
    device: str = "auto"                            # GEM_DEVICE: auto, cpu, cuda, cuda:1, mps
    precision: str = "auto"                         # GEM_PRECISION: auto, fp32, bf16, fp16
    depth: int = 7                                  # GEM_DEPTH
    ss_attn_iter: int = 1                           # GEM_SS_ATTN_ITER
    ss_attn_temp: float | None = None               # GEM_SS_ATTN_TEMP (unset: adaptive)
    model_dir: str | None = None                    # MODEL_DIR: download cache for pretrained tags
    regions_pretrained: str = "hub"                 # GEM_REGIONS_PRETRAINED: SAM 2 weights: hub (HF cache), a file, or none
    # segmentation (per-project overridable)
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)
    # Label Studio
    label_studio_url: str | None = None             # LABEL_STUDIO_URL
    label_studio_api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY
    # serving
    host: str = "0.0.0.0"                           # HOST
    port: int = 9090                                # PORT
    workers: int = 1                                # WORKERS: model processes sharing this machine's cores
    threads: int = 8                                # THREADS
    torch_threads: int = 0                          # GEM_TORCH_THREADS: per process; 0 = cores / WORKERS
    log_level: str = "INFO"                         # LOG_LEVEL
    basic_auth_user: str | None = None              # BASIC_AUTH_USER
    basic_auth_pass: str | None = field(default=None, repr=False)  # BASIC_AUTH_PASS
    webhook_auth: bool = False                      # GEM_WEBHOOK_AUTH: Label Studio sends webhooks without auth
    max_request_bytes: int = 20 * 1024 * 1024       # GEM_MAX_REQUEST_BYTES
    # cache
    redis_url: str | None = field(default=None, repr=False)  # REDIS_URL
    text_cache_size: int = 4096                     # GEM_TEXT_CACHE_SIZE
    image_cache_mb: int = 512                       # GEM_IMAGE_CACHE_MB: in-process image-feature cache, 0 = off
    batch_size: int = 0                             # GEM_BATCH_SIZE: images per forward in a request; 0 = auto (8 on GPU, 1 on CPU)
    image_cache_ttl: int = 86400                    # GEM_IMAGE_CACHE_TTL: seconds image features live in Redis (>= 1)
    text_cache_ttl: int = 30 * 86400                # GEM_TEXT_CACHE_TTL: seconds text embeddings live in Redis (>= 1)
    cache_redis_url: str | None = field(default=None, repr=False)  # GEM_CACHE_REDIS_URL: caches elsewhere (default REDIS_URL)
    state_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "gem-backend")  # GEM_STATE_DIR
    # images
    fetch_timeout: float = 30.0                     # GEM_FETCH_TIMEOUT (read), connect is 5 s
    max_image_bytes: int = 50 * 1024 * 1024         # GEM_MAX_IMAGE_BYTES
    max_image_pixels: int = 100_000_000             # GEM_MAX_IMAGE_PIXELS
    allowed_hosts: tuple[str, ...] = ()             # GEM_ALLOWED_HOSTS: non-public hosts/IPs/CIDRs to fetch from

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read every setting from ``environ`` (default ``os.environ``); unset -> default."""
        env = os.environ if environ is None else environ

        def get(name, parse, default):
            raw = env.get(name)
            if raw is None or (raw == "" and parse is not _parse_prompts):
                return default
            try:
                return parse(raw)
            except (ValueError, SettingsError) as err:
                raise SettingsError(f"{name}={raw!r}: {err}") from None

        base = cls()
        seg = {key: get(env_name, parser, getattr(base.segmentation, key))
               for key, (env_name, parser) in _SEG_FIELDS.items()}
        try:
            segmentation = SegmentationSettings(**seg)
        except ValueError as err:
            # name the variable(s) the message is about, e.g. "threshold must be in [0, 1)"
            named = [env_name for key, (env_name, _) in _SEG_FIELDS.items() if re.search(rf"\b{key}\b", str(err))]
            raise SettingsError(f"{', '.join(named) or 'GEM_* segmentation settings'}: {err}") from None
        temp = env.get("GEM_SS_ATTN_TEMP", "").strip()
        try:
            ss_attn_temp = float(temp) if temp and temp.lower() != "none" else None
        except ValueError:
            raise SettingsError(f"GEM_SS_ATTN_TEMP={temp!r}: not a number (or 'none' for the adaptive one)") from None
        return cls(
            model=get("GEM_MODEL", str, base.model),
            pretrained=get("GEM_PRETRAINED", str, base.pretrained),
            device=get("GEM_DEVICE", str, base.device),
            precision=get("GEM_PRECISION", str, base.precision),
            depth=get("GEM_DEPTH", int, base.depth),
            ss_attn_iter=get("GEM_SS_ATTN_ITER", int, base.ss_attn_iter),
            ss_attn_temp=ss_attn_temp,
            model_dir=get("MODEL_DIR", str, None),
            regions_pretrained=get("GEM_REGIONS_PRETRAINED", str, base.regions_pretrained),
            segmentation=segmentation,
            label_studio_url=get("LABEL_STUDIO_URL", str, None) or get("LABEL_STUDIO_HOST", str, None),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY", str, None),
            host=get("HOST", str, base.host),
            port=get("PORT", int, base.port),
            workers=get("WORKERS", int, base.workers),
            threads=get("THREADS", int, base.threads),
            torch_threads=get("GEM_TORCH_THREADS", _parse_threads, base.torch_threads),
            log_level=get("LOG_LEVEL", str, base.log_level).upper(),
            basic_auth_user=get("BASIC_AUTH_USER", str, None),
            basic_auth_pass=get("BASIC_AUTH_PASS", str, None),
            webhook_auth=get("GEM_WEBHOOK_AUTH", _parse_bool, base.webhook_auth),
            max_request_bytes=get("GEM_MAX_REQUEST_BYTES", int, base.max_request_bytes),
            redis_url=get("REDIS_URL", str, None),
            text_cache_size=get("GEM_TEXT_CACHE_SIZE", int, base.text_cache_size),
            image_cache_mb=get("GEM_IMAGE_CACHE_MB", int, base.image_cache_mb),
            batch_size=get("GEM_BATCH_SIZE", int, base.batch_size),
            image_cache_ttl=get("GEM_IMAGE_CACHE_TTL", _positive_int, base.image_cache_ttl),
            text_cache_ttl=get("GEM_TEXT_CACHE_TTL", _positive_int, base.text_cache_ttl),
            cache_redis_url=get("GEM_CACHE_REDIS_URL", str, None),
            state_dir=get("GEM_STATE_DIR", str, None) or (os.path.join(env["MODEL_DIR"], "gem-state")
                                                          if env.get("MODEL_DIR") else base.state_dir),
            fetch_timeout=get("GEM_FETCH_TIMEOUT", float, base.fetch_timeout),
            max_image_bytes=get("GEM_MAX_IMAGE_BYTES", int, base.max_image_bytes),
            max_image_pixels=get("GEM_MAX_IMAGE_PIXELS", int, base.max_image_pixels),
            allowed_hosts=get("GEM_ALLOWED_HOSTS", _parse_allowed_hosts, base.allowed_hosts),
        )

    def torch_thread_count(self, processes: int | None = None) -> int:
        """Torch intra-op threads for one process: ``GEM_TORCH_THREADS``, else the cores this
        process may run on (``os.sched_getaffinity``) divided by the processes sharing them
        (``processes``, default ``WORKERS``), at least 1, so that the processes together never
        run more threads than there are cores."""
        if self.torch_threads > 0:
            return self.torch_threads
        return max(1, available_cores() // max(1, processes if processes is not None else self.workers))

    @property
    def caches_redis_url(self) -> str | None:
        """Where the caches (text embeddings, image features) live: ``GEM_CACHE_REDIS_URL``,
        else ``REDIS_URL``; durable state always stays on ``REDIS_URL``."""
        return self.cache_redis_url or self.redis_url

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ per project
    def segmentation_for(self, extra_params: str | Mapping | None) -> SegmentationSettings:
        """The segmentation settings of a project: these defaults updated by ``extra_params``.

        ``extra_params`` comes from Label Studio's ML backend form, as a JSON string or an
        object; keys are the field names of :class:`SegmentationSettings` (``GEM_`` env names
        are accepted too). Unknown keys or bad values raise :class:`SettingsError`.
        """
        params = parse_extra_params(extra_params)
        if not params:
            return self.segmentation
        by_env = {env_name: key for key, (env_name, _) in _SEG_FIELDS.items()}
        changes = {}
        for raw_key, value in params.items():
            key = by_env.get(str(raw_key).upper(), str(raw_key).lower())
            if key not in _SEG_FIELDS:
                raise SettingsError(f"extra_params: unknown setting {raw_key!r}; known: {', '.join(_SEG_FIELDS)}")
            parser = _SEG_FIELDS[key][1]
            try:
                changes[key] = parser(value)
            except (ValueError, TypeError, SettingsError) as err:
                raise SettingsError(f"extra_params: {raw_key}={value!r}: {err}") from None
        try:
            return dataclasses.replace(self.segmentation, **changes)
        except ValueError as err:
            raise SettingsError(f"extra_params: {err}") from None

    @property
    def weights_id(self) -> str:
        from .algorithm.models import weights_id

        return weights_id(self.pretrained)

    def model_version(self, segmentation: SegmentationSettings | None = None) -> str:
        """Names the model and every setting that changes outputs.

        Label Studio shows and keeps predictions per ``model_version``, so any change of
        model, weights or decision settings gives a new one.
        """
        seg = segmentation or self.segmentation
        parts = dict(model=self.model, weights=self.weights_id, depth=self.depth, iter=self.ss_attn_iter,
                     temp=self.ss_attn_temp, seg=_versioned(seg))
        if seg.regions != "none":  # added later: only then, so existing versions stay
            parts["regions_weights"] = self.regions_weights_id(seg)
        key = json.dumps(parts, sort_keys=True)
        model = os.path.basename(self.model).removesuffix(".json")
        return f"gem-{model}-{self.weights_id}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def regions_weights_id(self, segmentation: SegmentationSettings | None = None) -> str:
        """Id of the SAM 2 weights ``segmentation`` uses (no loading)."""
        from .algorithm.sam import sam2_weights_id

        return sam2_weights_id((segmentation or self.segmentation).regions_model, self.regions_pretrained)

    def text_namespace(self, templates: tuple[str, ...]) -> str:
        """Cache namespace of text embeddings: model, weights and template set."""
        return json.dumps([self.model, self.weights_id, list(templates)])

    def redacted(self) -> dict:
        """Settings for logs: secrets replaced by ``***``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("label_studio_api_key", "basic_auth_pass") and value:
                value = "***"
            elif f.name in ("redis_url", "cache_redis_url") and value:
                from .redaction import redact_url

                value = redact_url(value)
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out


def _versioned(seg: SegmentationSettings) -> dict:
    """The segmentation settings that enter the model version. Settings added later count
    only when they differ from their default, so adding one keeps existing versions."""
    out = dataclasses.asdict(seg)
    if not seg.prototypes:  # the prototype knobs change nothing while prototypes are off
        out.pop("prototype_strength")
        out.pop("prototype_min_annotations")
    if seg.refine == "none":
        out.pop("refine_iterations")
        out.pop("refine_dilations")
    if not seg.windows_above:
        for key in ("window", "window_stride", "window_short_side"):
            out.pop(key)
    if seg.regions == "none":
        for key in ("regions_model", "regions_points", "regions_iou", "regions_stability"):
            out.pop(key)
    for key, default in _LATER_SEG_DEFAULTS.items():
        if key in out and out[key] == default:
            out.pop(key)
    if "method_options" in out:
        out["method_options"] = dict(seg.method_options)
    if "label_thresholds" in out:
        out["label_thresholds"] = dict(seg.label_thresholds)
    return out


# (settings added after the first release: name -> default)
_LATER_SEG_DEFAULTS = {key: getattr(SegmentationSettings(), key) for key in (
    "polygon_tolerance", "score", "prototypes", "prototype_strength", "prototype_min_annotations", "method",
    "method_options", "refine", "refine_iterations", "refine_dilations", "windows_above", "window", "window_stride",
    "window_short_side", "label_thresholds", "regions")}


def parse_extra_params(extra_params: str | Mapping | None) -> dict:
    """Label Studio sends ``extra_params`` as null, a JSON string, or an object."""
    if extra_params is None:
        return {}
    if isinstance(extra_params, Mapping):
        return dict(extra_params)
    if isinstance(extra_params, str):
        text = extra_params.strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise SettingsError(f"extra_params is not valid JSON: {err.msg} at position {err.pos}") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SettingsError("extra_params must be a JSON object, e.g. {\"threshold\": 0.4}")
        return value
    raise SettingsError(f"extra_params must be a JSON object or string, got {type(extra_params).__name__}")


__all__ = ["Settings", "SettingsError", "parse_extra_params", "parse_templates", "openai_templates",
           "DEFAULT_TEMPLATES", "DEFAULT_BACKGROUND_PROMPTS"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parse_threads(raw: str) -> int:
    if raw.strip().lower() in ("", "0", "auto"):
        return 0
    value = int(raw)
    if value < 0:
        raise SettingsError("must be >= 1, or 0/auto for cores / WORKERS")
    return value


_THREADS_SET: list[tuple[int, int]] = []


def configure_torch_threads(settings: Settings, processes: int | None = None, what: str = "process",
                            logger: logging.Logger | None = None) -> tuple[int, int]:
    """Set this process's torch threads from the settings (:meth:`Settings.torch_thread_count`)
    and log them; returns ``(intra-op, inter-op)``.

    Call it once at start-up, before any torch work: ``torch.set_num_interop_threads`` fails
    once parallel work has started (then the inter-op count is left as it is and a warning
    says so). Inter-op threads (independent ops run side by side; the GEM forward barely uses
    them) are set to the same count, so that they cannot oversubscribe either.
    """
    import torch

    log_ = logger or logging.getLogger("gem_backend")
    n = settings.torch_thread_count(processes)
    torch.set_num_threads(n)
    interop = torch.get_num_interop_threads()
    if _THREADS_SET:
        interop = _THREADS_SET[-1][1]
    else:
        try:
            torch.set_num_interop_threads(n)
            interop = n
        except RuntimeError as err:  # parallel work already ran in this process
            log_.warning("torch inter-op threads left at %s: %s", interop, err)
        _THREADS_SET.append((n, interop))
    source = "GEM_TORCH_THREADS" if settings.torch_threads > 0 else (
        f"{available_cores()} cores / {max(1, processes if processes is not None else settings.workers)} processes")
    log_.info("%s %s: %s torch threads (%s), %s inter-op", what, os.getpid(), n, source, interop)
    return n, interop
