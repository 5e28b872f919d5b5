"""A ``/webhook`` consumer's queue: bodies acknowledged at once, handled afterwards on one thread.

Label Studio gives a webhook a short timeout, so the consumers (:class:`~.learner.Learner`,
:class:`~.agreement.Agreement`) only queue the body in the request; :class:`WebhookQueue` owns
that bounded queue, the daemon thread started on the first body (and again after it ended),
:meth:`~WebhookQueue.drain`, and the loop that handles each body and counts its result.
:func:`project_id` and :func:`deleted_annotation_ids` read the parts of a body both handle alike.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Mapping

from .prototypes import annotation_key, project_key

__all__ = ["WebhookQueue", "deleted_annotation_ids", "project_id"]


def project_id(project: Any) -> str:
    """The store key of a webhook's project (an object with an ``id``, or the id itself)."""
    value = project.get("id") if isinstance(project, Mapping) else project
    return project_key(value)


def deleted_annotation_ids(body: Mapping, bad: Callable[[Any], None] | None = None) -> list[str]:
    """The annotation keys of an ``ANNOTATIONS_DELETED`` body (its ``annotations``: objects with
    an ``id``, or the ids); an item without a usable id is left out and given to ``bad``."""
    items = body.get("annotations")
    ids = []
    for item in items if isinstance(items, list) else []:
        try:
            ids.append(annotation_key(item.get("id") if isinstance(item, Mapping) else item))
        except ValueError:
            if bad is not None:
                bad(item)
    return ids


class WebhookQueue:
    """Base of a webhook consumer: a bounded queue of bodies and one lazily started daemon thread.

    A subclass sets :attr:`ACTIONS` (the actions it takes), :attr:`THREAD_NAME`,
    :attr:`DROPPED_MESSAGE` and :attr:`FAILED_MESSAGE` (log formats, the first with the action
    and the number of events waiting, the second with the action) and :attr:`logger` (its
    module's, so the log lines keep their logger), and implements :meth:`handle` (one body ->
    a result word) and :meth:`count` (that word into its metric). :meth:`next_body` and
    :meth:`process` are the hooks of a thread that does more than handle bodies.

    Args:
        maxsize: events waiting at most; beyond, an event is dropped with a warning.
    """

    ACTIONS: tuple = ()
    THREAD_NAME = "gem-webhook"
    DROPPED_MESSAGE = "webhook %s dropped: %d events waiting"
    FAILED_MESSAGE = "webhook %s failed"
    logger = logging.getLogger(__name__)

    def __init__(self, maxsize: int = 1000):
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, body: Any) -> str:
        """Queue a webhook body: ``queued``, ``ignored`` (not an action of :attr:`ACTIONS`) or
        ``dropped`` (queue full). Never blocks, never raises."""
        action = body.get("action") if isinstance(body, Mapping) else None
        if action not in self.ACTIONS:
            return "ignored"
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.logger.warning(self.DROPPED_MESSAGE, action, self._queue.qsize())
            self.count("dropped")
            return "dropped"
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
                self._thread.start()
        return "queued"

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event is handled; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ------------------------------------------------------------------ hooks
    def handle(self, body: Mapping) -> str:
        """One webhook body -> the word its result is counted under."""
        raise NotImplementedError

    def count(self, result: str) -> None:
        """Count one handled (or dropped, or failed) event under ``result``."""
        raise NotImplementedError

    def next_body(self) -> Mapping | None:
        """The next queued body, waiting as long as it takes; None ends the thread (an override
        that ends it also clears ``_thread`` under ``_lock``, so the next body starts another)."""
        return self._queue.get()

    def process(self, body: Mapping) -> str:
        """What the thread does with one body: :meth:`handle` it."""
        return self.handle(body)

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while True:
            body = self.next_body()
            if body is None:
                return
            try:
                result = self.process(body)
            except Exception:  # noqa: BLE001 - the thread must survive anything one event does
                self.logger.exception(self.FAILED_MESSAGE, body.get("action"))
                result = "failed"
            finally:
                self._queue.task_done()
            self.count(result)
