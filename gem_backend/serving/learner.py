"""Learning prototypes from annotations as they come: the ``/webhook`` queue.

Label Studio posts ``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED`` and ``ANNOTATIONS_DELETED`` to
the backend's ``/webhook`` (with a short timeout). :class:`Learner` acknowledges at once and does
the work afterwards on one background thread per process: for a created or updated annotation of
a project whose settings have prototypes on, the annotated image's GEM features (from the image
cache when the task was predicted before) and the annotation's masks give its contribution, which
replaces the annotation's previous one in the project's :class:`~gem_backend.prototypes.PrototypeStore`;
a deletion subtracts it. A malformed annotation or result is skipped with a log line.

``gem-backend learn --project ID`` (:mod:`gem_backend.jobs.learn`) does the same for every
annotation a project already has.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from ..labelstudio.images import ImageError
from .prototypes import AnnotationError, annotation_key, contribution_for_annotation
from .service import GEMService, RequestError
from .webhook_queue import WebhookQueue, deleted_annotation_ids, project_id

log = logging.getLogger(__name__)

__all__ = ["Learner", "LEARN_ACTIONS", "DELETE_ACTIONS", "learn_one", "project_id"]

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED",)


class Learner(WebhookQueue):
    """Turns annotation webhooks into prototype updates, after the HTTP answer.

    Args:
        service: the process's :class:`GEMService` (model, image cache, prototype store).
        params: project id -> its ``extra_params`` (those ``/setup`` stored), since webhooks
            do not carry them.
        maxsize: events waiting at most; beyond, events are dropped with a warning
            (``gem-backend learn`` catches up).
    """

    ACTIONS = LEARN_ACTIONS + DELETE_ACTIONS
    THREAD_NAME = "gem-prototype-learner"
    DROPPED_MESSAGE = "webhook %s dropped: %d events waiting (run `gem-backend learn --project ID` to catch up)"
    FAILED_MESSAGE = "webhook %s: prototype update failed"
    logger = log

    def __init__(self, service: GEMService, params: Callable[[str], Any] | None = None, maxsize: int = 1000):
        super().__init__(maxsize)
        self.service = service
        self.params = params or (lambda pid: {})

    def count(self, result: str) -> None:
        """One event into ``gem_prototype_events_total{result}``."""
        self.service.metrics.prototype_events.labels(result=result).inc()

    def handle(self, body: Mapping) -> str:
        """Apply one webhook body to the store; returns ``learnt``, ``removed``, ``skipped``
        (malformed: logged) or ``off`` (the project's settings have prototypes off)."""
        action = body.get("action")
        try:
            pid = project_id(body.get("project"))
        except ValueError:
            log.warning("webhook %s without a usable project id: skipped", action)
            return "skipped"
        store = self.service.prototype_store
        if action in DELETE_ACTIONS:
            ids = deleted_annotation_ids(
                body, lambda item: log.warning("project %s: %s: bad annotation id %r skipped", pid, action, item))
            removed = store.remove(pid, ids)
            log.info("project %s: %d of %d deleted annotations removed from the prototypes", pid, removed, len(ids))
            return "removed"
        annotation, task = body.get("annotation"), body.get("task")
        project = body.get("project")
        if not isinstance(annotation, Mapping) or not isinstance(task, Mapping):
            log.warning("project %s: %s without annotation and task objects: skipped", pid, action)
            return "skipped"
        config = project.get("label_config") if isinstance(project, Mapping) else None
        try:
            spec = self.service.project(config, self.params(pid))
        except RequestError as err:
            log.warning("project %s: annotation %s skipped: %s", pid, annotation.get("id"), err)
            return "skipped"
        if not spec.segmentation.prototypes:
            log.debug("project %s: prototypes off, annotation %s not learnt", pid, annotation.get("id"))
            return "off"
        result = learn_one(self.service, spec, pid, task, annotation)
        return "skipped" if result == "not stored" else result


def learn_one(service: GEMService, spec, pid: str, task: Mapping, annotation: Mapping,
              skipped: list | None = None) -> str:
    """One annotation into the store: ``learnt``, ``not stored`` (deleted, or a newer copy is
    stored) or ``skipped`` (malformed, its image unreadable: logged, and ``(annotation id,
    reason)`` appended to ``skipped`` when given)."""
    aid = annotation.get("id")
    try:
        aid = annotation_key(aid)
        contribution, problems = contribution_for_annotation(service, spec, task, annotation)
    except (AnnotationError, ValueError, ImageError, OSError) as err:
        log.warning("project %s: annotation %s of task %s skipped: %s", pid, aid, task.get("id"), err)
        if skipped is not None:
            skipped.append((aid, str(err)))
        return "skipped"
    for problem in problems:
        log.warning("project %s: annotation %s of task %s: %s: skipped", pid, aid, task.get("id"), problem)
    stored = service.prototype_store.put(pid, aid, contribution)
    labels = ", ".join(f"{k} ({v.patches} patches)" for k, v in sorted(contribution.labels.items())) or "nothing"
    log.info("project %s: annotation %s of task %s %s: %s", pid, aid, task.get("id"),
             "learnt" if stored else "not stored (deleted, or a newer copy is stored)", labels)
    return "learnt" if stored else "not stored"
