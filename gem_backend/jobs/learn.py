"""Learning prototypes from annotations: the ``/webhook`` queue and ``gem-backend learn``.

Label Studio posts ``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED`` and ``ANNOTATIONS_DELETED`` to
the backend's ``/webhook`` (with a short timeout). :class:`Learner` acknowledges at once and does
the work afterwards on one background thread per process: for a created or updated annotation of
a project whose settings have prototypes on, the annotated image's GEM features (from the image
cache when the task was predicted before) and the annotation's masks give its contribution, which
replaces the annotation's previous one in the project's :class:`~gem_backend.prototypes.PrototypeStore`;
a deletion subtracts it. A malformed annotation or result is skipped with a log line.

``gem-backend learn --project ID`` does the same for every annotation the project already has,
read through the Label Studio API, and drops from the store the annotations that no longer exist:

    gem-backend learn --project 3

Label Studio API calls used (1.23): those of :func:`gem_backend.prelabel.resolve_target`, then
``GET /api/tasks`` (tasks with annotations, ``fields=task_only``) and
``GET /api/tasks/{id}/annotations/``.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..labelstudio.images import ImageError
from ..serving.prototypes import AnnotationError, _annotation_key, _project_key, contribution_for_annotation
from ..serving.service import GEMService, ModelUnavailable, RequestError

log = logging.getLogger(__name__)

__all__ = ["Learner", "LEARN_ACTIONS", "DELETE_ACTIONS", "LearnSummary", "learn_project", "add_parser", "cmd_learn"]

LEARN_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED",)


def _project_id(project: Any) -> str:
    value = project.get("id") if isinstance(project, Mapping) else project
    return _project_key(value)


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
            pid = _project_id(body.get("project"))
        except ValueError:
            log.warning("webhook %s without a usable project id: skipped", action)
            return "skipped"
        store = self.service.prototype_store
        if action in DELETE_ACTIONS:
            items = body.get("annotations")
            ids = []
            for item in items if isinstance(items, list) else []:
                try:
                    ids.append(_annotation_key(item.get("id") if isinstance(item, Mapping) else item))
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
        return learn_one(self.service, spec, pid, task, annotation)


def learn_one(service: GEMService, spec, pid: str, task: Mapping, annotation: Mapping) -> str:
    """One annotation into the store: ``learnt`` or ``skipped`` (logged)."""
    aid = annotation.get("id")
    try:
        aid = _annotation_key(aid)
        contribution, problems = contribution_for_annotation(service, spec, task, annotation)
    except (AnnotationError, ValueError, ImageError, OSError) as err:
        log.warning("project %s: annotation %s of task %s skipped: %s", pid, aid, task.get("id"), err)
        return "skipped"
    for problem in problems:
        log.warning("project %s: annotation %s of task %s: %s: skipped", pid, aid, task.get("id"), problem)
    stored = service.prototype_store.put(pid, aid, contribution)
    labels = ", ".join(f"{k} ({v.patches} patches)" for k, v in sorted(contribution.labels.items())) or "nothing"
    log.info("project %s: annotation %s of task %s %s: %s", pid, aid, task.get("id"),
             "learnt" if stored else "not stored (deleted, or a newer copy is stored)", labels)
    return "learnt" if stored else "skipped"


# ----------------------------------------------------------------------------------- CLI
@dataclass
class LearnSummary:
    """What ``gem-backend learn`` did."""

    project: int
    tasks: int = 0
    learnt: int = 0
    skipped: list[tuple[Any, str]] = field(default_factory=list)   # (annotation id, reason)
    removed: int = 0
    labels: dict[str, int] = field(default_factory=dict)            # label -> annotations holding it
    model_version: str = ""
    prototypes_on: bool = False

    def text(self) -> str:
        lines = [f"project {self.project}: {self.learnt} annotations learnt from {self.tasks} tasks, "
                 f"{len(self.skipped)} skipped, {self.removed} removed (gone from Label Studio)"]
        lines += [f"  skipped annotation {aid}: {why}" for aid, why in self.skipped[:20]]
        if self.labels:
            lines.append("  annotations per label: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        lines.append(f"  model_version {self.model_version}" + (
            "" if self.prototypes_on else " (prototypes are off for this project: set GEM_PROTOTYPES=on or "
                                          "extra_params {\"prototypes\": true} to use them)"))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dict(project=self.project, tasks=self.tasks, learnt=self.learnt,
                    skipped=[dict(annotation=a, reason=r) for a, r in self.skipped], removed=self.removed,
                    labels=self.labels, model_version=self.model_version, prototypes_on=self.prototypes_on)


def iter_annotated_tasks(api, project: int) -> Iterator[dict]:
    """The project's tasks holding at least one annotation (``{"id", "data", ...}``)."""
    query = {"filters": {"conjunction": "and", "items": [{
        "filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]}}
    yield from api.iter_tasks(project, query=query)


def task_annotations(api, task: int) -> list[dict]:
    body = api.request("GET", f"/api/tasks/{task}/annotations/")
    return body if isinstance(body, list) else (body or {}).get("results", [])


def learn_project(service: GEMService, api, project: int, *, extra_params: Any = None, ml_backend: int | None = None,
                  progress: bool = False, echo: Callable[[str], None] = print) -> LearnSummary:
    """Learn every annotation of ``project`` (replacing what the store holds for each) and
    remove the stored annotations Label Studio no longer has."""
    from .prelabel import progress_bar, resolve_target

    target, notes = resolve_target(api, service, project, extra_params=extra_params, ml_backend=ml_backend,
                                   ignore_backend_version=True)
    for note in notes:
        echo(note)
    spec = service.project(target.label_config, target.extra_params)
    pid = _project_key(project)
    summary = LearnSummary(int(project), prototypes_on=spec.segmentation.prototypes)
    tasks = list(iter_annotated_tasks(api, project))
    summary.tasks = len(tasks)
    seen: set[str] = set()
    if tasks:
        service.load()
    with progress_bar(len(tasks), progress, desc="learn") as bar:
        for task in tasks:
            for annotation in task_annotations(api, int(task["id"])):
                try:
                    aid = _annotation_key(annotation.get("id"))
                except ValueError:
                    summary.skipped.append((annotation.get("id"), "no annotation id"))
                    continue
                seen.add(aid)
                try:
                    contribution, problems = contribution_for_annotation(service, spec, task, annotation)
                except (AnnotationError, ValueError, ImageError, OSError) as err:
                    log.warning("project %s: annotation %s of task %s skipped: %s", pid, aid, task.get("id"), err)
                    summary.skipped.append((aid, str(err)))
                    continue
                for problem in problems:
                    log.warning("project %s: annotation %s: %s: skipped", pid, aid, problem)
                service.prototype_store.put(pid, aid, contribution)
                summary.learnt += 1
            bar.update(1)
    stale = service.prototype_store.annotation_ids(pid) - seen
    if stale:
        summary.removed = service.prototype_store.remove(pid, sorted(stale))
    totals = service.prototype_store.totals(pid)
    summary.labels = {k: v.annotations for k, v in totals.items()}
    summary.model_version = service.project(target.label_config, target.extra_params, project=pid).model_version
    return summary


def add_parser(sub) -> None:
    """Register ``learn`` on the ``gem-backend`` subcommand parser."""
    from ..cli import _add_model_flags

    p = sub.add_parser(
        "learn", help="learn a project's label prototypes from its existing annotations (active learning)",
        description="Read every annotation of a Label Studio project through its API and store its visual "
                    "prototypes (per label, the mean GEM patch feature inside the annotated masks), as the "
                    "backend's /webhook does for new annotations; annotations gone from Label Studio are "
                    "removed. Use the backend's GEM_* settings and REDIS_URL / GEM_STATE_DIR, so that the "
                    "backend reads what this stores. Exit status: 0 done, 1 some annotations skipped, 2 error.")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--ls-url", help="Label Studio URL (default LABEL_STUDIO_URL)")
    p.add_argument("--api-key", help="Label Studio legacy token or personal access token "
                                     "(default LABEL_STUDIO_API_KEY)")
    p.add_argument("--extra-params", help="JSON object of per-project settings instead of the ML backend's")
    p.add_argument("--ml-backend", type=int, help="ML backend id, when the project has several")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", help="also write the summary to this file (JSON)")
    _add_model_flags(p)
    p.set_defaults(func=cmd_learn)


def cmd_learn(args) -> int:
    from ..cli import _settings_from_args
    from .prelabel import LabelStudioAPI, PrelabelError

    settings = _settings_from_args(args)
    settings = settings.replace(label_studio_url=args.ls_url or settings.label_studio_url,
                                label_studio_api_key=args.api_key or settings.label_studio_api_key)
    try:
        api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key,
                             timeout=(5.0, max(60.0, settings.fetch_timeout)))
    except PrelabelError as err:
        print(f"gem-backend learn: {err}", file=sys.stderr)
        return 2
    service = GEMService(settings)
    try:
        summary = learn_project(service, api, args.project, extra_params=args.extra_params,
                                ml_backend=args.ml_backend, progress=not args.no_progress,
                                echo=lambda line: print(line, file=sys.stderr))
    except (PrelabelError, ModelUnavailable) as err:
        print(f"gem-backend learn: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Redis or the state folder failing: say so, no traceback
        import redis

        if not isinstance(err, (redis.RedisError, OSError)):
            raise
        print(f"gem-backend learn: the prototype store failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        api.close()
    print(summary.text(), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(summary.as_dict(), fh, indent=1)
    return 1 if summary.skipped else 0
