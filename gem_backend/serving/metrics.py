"""Prometheus metrics of one process, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Requests, latency, text-cache hits, model forward and image fetch times."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gem_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("gem_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram("gem_model_forward_seconds", "GEM image tower forward time per image",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.fetch_seconds = Histogram("gem_image_fetch_seconds", "Image download and decode time",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.text_cache = Counter("gem_text_cache", "Text embedding lookups by result "
                                  "(local_hits, redis_hits, misses)", ["result"], registry=r)
        self.image_cache = Counter("gem_image_cache", "Image feature lookups by result "
                                   "(local_hits, redis_hits, misses)", ["result"], registry=r)
        self.task_failures = Counter("gem_task_failures", "Tasks answered with an empty prediction, by reason",
                                     ["reason"], registry=r)
        self.predictions = Counter("gem_predictions", "Task predictions returned", registry=r)
        self.model_load_seconds = Gauge("gem_model_load_seconds", "Time the model took to load", registry=r)
        self.model_loaded = Gauge("gem_model_loaded", "1 when the model is loaded", registry=r)
        self.prototype_events = Counter("gem_prototype_events", "Annotation webhooks handled for prototypes, by "
                                        "result (learnt, removed, skipped, off, failed, dropped)", ["result"],
                                        registry=r)
        self.agreement_events = Counter("gem_agreement_events", "Annotation webhooks handled for agreement, by "
                                        "result (recorded, removed, pending, written_late, no_prediction, "
                                        "skipped, failed, dropped)", ["result"], registry=r)
        self.agreement_pending = Gauge("gem_agreement_pending", "Agreement records waiting for the store "
                                       "(Redis away)", registry=r)
        self.agreement_annotations = Gauge("gem_agreement_annotations", "Annotations compared with a prediction "
                                           "of this backend, per project", ["project"], registry=r)
        self.agreement_iou = Gauge("gem_agreement_iou", "Mean IoU between annotations and this backend's "
                                   "predictions, per project", ["project"], registry=r)
        self.agreement_label_iou = Gauge("gem_agreement_label_iou", "Mean IoU per label between annotations "
                                         "and this backend's predictions", ["project", "label"], registry=r)

    def render(self) -> bytes:
        """Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
