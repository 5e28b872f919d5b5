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
import queue
import threading
import time
from typing import Any, Callable, Mapping

from ..labelstudio.images import ImageError
from .prototypes import AnnotationError, annotation_key, project_key, contribution_for_annotation
from .service import GEMService, RequestError

log = logging.getLogger(__name__)

__all__ = ["Learner", "LEARN_ACTIONS", "DELETE_ACTIONS", "learn_one", "project_id"]

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED",)


def project_id(project: Any) -> str:
    """The store key of a webhook's project (an object with an ``id``, or the id itself)."""
    value = project.get("id") if isinstance(project, Mapping) else project
    return project_key(value)


class Learner:
    """Turns annotation webhooks into prototype updates, after the HTTP answer.

    Args:
        service: the process's :class:`GEMService` (model, image cache, prototype store).
        params: project id -> its ``extra_params`` (those ``/setup`` stored), since webhooks
            do not carry them.
        maxsize: events waiting at most; beyond, events are dropped with a warning
            (``gem-backend learn`` catches up).
    """

    def __init__(self, service: GEMService, params: Callable[[str], Any] | None = None, maxsize: int = 1000):
        self.service = service
        self.params = params or (lambda pid: {})
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, body: Any) -> str:
        """Queue a webhook body; returns ``queued``, ``ignored`` (not an annotation event) or
        ``dropped`` (queue full). Never blocks, never raises."""
        action = body.get("action") if isinstance(body, Mapping) else None
        if action not in LEARN_ACTIONS + DELETE_ACTIONS:
            return "ignored"
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.warning("webhook %s dropped: %d events waiting (run `gem-backend learn --project ID` to catch up)",
                        action, self._queue.qsize())
            self.service.metrics.prototype_events.labels(result="dropped").inc()
            return "dropped"
        self._start()
        return "queued"

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="gem-prototype-learner", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            try:
                result = self.handle(body)
            except Exception:  # noqa: BLE001 - the thread must survive anything one event does
                log.exception("webhook %s: prototype update failed", body.get("action"))
                result = "failed"
            finally:
                self._queue.task_done()
            self.service.metrics.prototype_events.labels(result=result).inc()

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event is handled; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

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
            items = body.get("annotations")
            ids = []
            for item in items if isinstance(items, list) else []:
                try:
                    ids.append(annotation_key(item.get("id") if isinstance(item, Mapping) else item))
                except ValueError:
                    log.warning("project %s: %s: bad annotation id %r skipped", pid, action, item)
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
