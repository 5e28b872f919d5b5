"""Agreement over time: how close the annotators' final masks are to this backend's predictions.

Label Studio posts ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED`` to ``/webhook``; the payload
holds the annotation, its task and its project (with the labeling config) but not the
prediction (``annotation.prediction`` is ``{}`` in Label Studio 1.23, see
``/work/shared/label-studio/captured/09_webhook_ANNOTATION_CREATED.json``). :class:`Agreement`
acknowledges at once and, on one background thread per process:

1. finds the task's prediction from this backend: ``annotation.prediction`` when Label Studio
   sends one, else ``GET /api/predictions?task=ID`` (``LABEL_STUDIO_URL``/``_API_KEY``), the
   prediction ``annotation.parent_prediction`` names if it is ours, else the newest of ours.
   Ours = a ``model_version`` starting with :data:`OUR_VERSION_PREFIX` (``gem-``, every
   version :meth:`gem_backend.settings.Settings.model_version` gives);
2. rasterises both, per control of the labeling config that draws masks (BrushLabels,
   BitmaskLabels, PolygonLabels, RectangleLabels), to label maps at the image's size
   (:func:`gem_backend.labelstudio.annotations.label_map`) and computes the IoU per label
   (labels present in either) and overall (their mean; 1.0 when both are empty);
3. stores the record per annotation (an update replaces the annotation's record unless the
   stored one is newer; a deletion removes it) and appends it to the project's recent events.

Running figures per project (:meth:`AgreementStore.summary`): ``annotations`` (count),
``mean_iou``, ``labels`` (``{label: {"annotations", "mean_iou"}}``) and ``recent`` (the last
events, newest first). Served at ``GET /agreement/<project>``, as Prometheus gauges in
``/metrics``, and by ``gem-backend eval --project ID --agreement``.

Store (:func:`open_agreement_store`): with ``REDIS_URL``, durable keys without TTL
``gem:agreement:<project>:ann`` (hash: annotation id -> JSON record),
``gem:agreement:<project>:recent`` (list, newest first, trimmed to :data:`RECENT_KEPT`) and
``gem:agreement:projects`` (set); else a JSON file per project under
``GEM_STATE_DIR/agreement/`` (atomic writes under an exclusive ``flock``).

Redis away: a record that cannot be written waits in a bounded in-process queue
(:data:`PENDING_MAX`, oldest dropped first with a warning) and is written when Redis answers
again (retried every :data:`RETRY_SECONDS` and before each new event); nothing is recomputed.
A process that ends while Redis is away loses its waiting records (counted as ``pending``).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..labelstudio.annotations import MASK_KINDS, label_map
from ..labelstudio.spec import ChoicesTarget, LabelTarget
from .prototypes import annotation_key, project_key
from .webhook_queue import WebhookQueue, deleted_annotation_ids, project_id

log = logging.getLogger(__name__)

__all__ = ["Agreement", "AgreementStore", "FileAgreementStore", "OUR_VERSION_PREFIX", "RedisAgreementStore",
           "compare_results", "find_our_prediction", "is_ours", "open_agreement_store"]

OUR_VERSION_PREFIX = "gem-"
RECENT_KEPT = 100
PENDING_MAX = 1000
RETRY_SECONDS = 2.0
EVENT_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTIONS = ("ANNOTATIONS_DELETED",)


def is_ours(prediction: Any) -> bool:
    """Whether a Label Studio prediction object came from this backend (its model_version)."""
    return isinstance(prediction, Mapping) and str(prediction.get("model_version") or "").startswith(
        OUR_VERSION_PREFIX)


def find_our_prediction(annotation: Mapping, predictions: Iterable[Mapping]) -> Mapping | None:
    """The prediction of ours an annotation is compared with: the one ``parent_prediction``
    names when it is ours, else the newest of ours (largest id), else None."""
    ours = [p for p in predictions if is_ours(p) and isinstance(p.get("result"), list)]
    parent = annotation.get("parent_prediction")
    for p in ours:
        if parent is not None and p.get("id") == parent:
            return p
    return max(ours, key=lambda p: (str(p.get("created_at") or ""), int(p.get("id") or 0)), default=None)


def _size(results: Sequence[Mapping], target: LabelTarget) -> tuple[int, int] | None:
    for r in results:
        if isinstance(r, Mapping) and r.get("to_name") == target.to_name and r.get("type") in MASK_KINDS:
            try:
                return int(r["original_height"]), int(r["original_width"])
            except (KeyError, TypeError, ValueError):
                continue
    return None


def _joint_histogram(ours: np.ndarray, theirs: np.ndarray, n: int, rows: int = 256) -> np.ndarray:
    """``[n, n]`` pixel counts of (ours, theirs) label pairs, in bands of rows (a 12 MP map
    as one int64 array would be 96 MB)."""
    joint = np.zeros(n * n, np.int64)
    for r in range(0, ours.shape[0], rows):
        pairs = ours[r:r + rows].astype(np.intp) * n + theirs[r:r + rows]
        joint += np.bincount(pairs.ravel(), minlength=n * n)
    return joint.reshape(n, n)


def compare_results(annotation: Sequence[Mapping], prediction: Sequence[Mapping],
                    targets: Sequence[LabelTarget]) -> dict:
    """IoU between an annotation's and a prediction's ``result`` lists.

    For each mask control in ``targets`` both are rasterised to label maps at the image's size
    (the first region's ``original_height``/``_width``; a control neither draws on is left
    out); per label, pixels are summed over controls. Returns ``{"iou": overall, "labels":
    {label: iou}, "problems": [...]}``: a label counts when either side has it; overall is
    the mean of the labels' IoUs, 1.0 when neither side has any label."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    problems: list[str] = []
    for target in targets:
        if isinstance(target, ChoicesTarget):
            continue
        size = _size(annotation, target) or _size(prediction, target)
        if size is None:
            continue
        ours, p1 = label_map(prediction, target.labels, target.to_name, size, from_name=target.from_name)
        theirs, p2 = label_map(annotation, target.labels, target.to_name, size, from_name=target.from_name)
        problems += [f"prediction {p}" for p in p1] + [f"annotation {p}" for p in p2]
        joint = _joint_histogram(ours, theirs, len(target.labels) + 1)
        for i, label in enumerate(target.labels, start=1):
            both = int(joint[i, i])
            either = int(joint[i, :].sum() + joint[:, i].sum()) - both
            if either:
                inter[label] = inter.get(label, 0) + both
                union[label] = union.get(label, 0) + either
    labels = {label: inter[label] / union[label] for label in union}
    overall = float(np.mean(list(labels.values()))) if labels else 1.0
    return {"iou": overall, "labels": labels, "problems": problems}


# ----------------------------------------------------------------------------------- store
def _summary(records: Iterable[Mapping], recent: list) -> dict:
    records = list(records)
    per_label: dict[str, list[float]] = {}
    for r in records:
        for label, iou in (r.get("labels") or {}).items():
            per_label.setdefault(label, []).append(float(iou))
    return {
        "annotations": len(records),
        "mean_iou": float(np.mean([float(r["iou"]) for r in records])) if records else None,
        "labels": {label: {"annotations": len(v), "mean_iou": float(np.mean(v))}
                   for label, v in sorted(per_label.items())},
        "recent": recent,
    }


class AgreementStore:
    """Agreement records per project and annotation (see the module docstring)."""

    def put(self, project: Any, annotation_id: Any, record: Mapping) -> bool:
        """Store ``record`` (with ``stamp``, the annotation's ``updated_at``) unless a newer one
        is stored; appends it to the recent events. False when a newer record was kept."""
        raise NotImplementedError

    def remove(self, project: Any, annotation_ids: Iterable[Any]) -> int:
        raise NotImplementedError

    def records(self, project: Any) -> dict[str, dict]:
        raise NotImplementedError

    def recent(self, project: Any, n: int) -> list[dict]:
        raise NotImplementedError

    def projects(self) -> list[str]:
        raise NotImplementedError

    def summary(self, project: Any, last: int = 10) -> dict:
        """``{"project", "annotations", "mean_iou", "labels": {label: {"annotations",
        "mean_iou"}}, "recent": [last events, newest first]}``."""
        pid = project_key(project)
        out = _summary(self.records(pid).values(), self.recent(pid, last) if last > 0 else [])
        return {"project": pid, **out}


_PUT_SCRIPT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local stamp = cjson.decode(old)['stamp']
  if type(stamp) == 'string' and ARGV[3] < stamp then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""


class RedisAgreementStore(AgreementStore):
    """Durable Redis keys without TTL: ``gem:agreement:<project>:ann`` (hash), ``...:recent``
    (list) and ``gem:agreement:projects`` (set); a put is one Lua script (atomic)."""

    PREFIX = "gem:agreement:"

    def __init__(self, url_or_client: Any, timeout: float = 2.0):
        if isinstance(url_or_client, str):
            import redis

            self.redis = redis.Redis.from_url(url_or_client, socket_timeout=timeout, socket_connect_timeout=timeout)
        else:
            self.redis = url_or_client
        self.script = self.redis.register_script(_PUT_SCRIPT)

    def keys(self, pid: str) -> tuple[str, str]:
        return f"{self.PREFIX}{pid}:ann", f"{self.PREFIX}{pid}:recent"

    def put(self, project, annotation_id, record):
        pid, aid = project_key(project), annotation_key(annotation_id)
        text = json.dumps(record, sort_keys=True)
        ann, recent = self.keys(pid)
        return bool(self.script(keys=[ann, recent, self.PREFIX + "projects"],
                                args=[aid, text, str(record.get("stamp") or ""), RECENT_KEPT, pid]))

    def remove(self, project, annotation_ids):
        ids = [annotation_key(a) for a in annotation_ids]
        return int(self.redis.hdel(self.keys(project_key(project))[0], *ids)) if ids else 0

    def records(self, project):
        raw = self.redis.hgetall(self.keys(project_key(project))[0])
        return {_text(k): json.loads(v) for k, v in raw.items()}

    def recent(self, project, n):
        return [json.loads(v) for v in self.redis.lrange(self.keys(project_key(project))[1], 0, n - 1)]

    def projects(self):
        return sorted(_text(p) for p in self.redis.smembers(self.PREFIX + "projects"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FileAgreementStore(AgreementStore):
    """``root/agreement/<project>.json`` (``{"ann": {...}, "recent": [...]}``), rewritten
    atomically under an exclusive ``flock`` of ``<project>.lock``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "agreement"

    def _read(self, pid: str) -> dict:
        try:
            return json.loads((self.root / f"{pid}.json").read_text())
        except FileNotFoundError:
            return {"ann": {}, "recent": []}

    def _update(self, pid: str, change: Callable[[dict], Any]) -> Any:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{pid}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                state = self._read(pid)
                result = change(state)
                tmp = self.root / f".{pid}.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_text(json.dumps(state, sort_keys=True))
                os.replace(tmp, self.root / f"{pid}.json")
                return result
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def put(self, project, annotation_id, record):
        pid, aid = project_key(project), annotation_key(annotation_id)
        record = json.loads(json.dumps(record))

        def change(state):
            old = state["ann"].get(aid)
            if old and str(record.get("stamp") or "") < str(old.get("stamp") or ""):
                return False
            state["ann"][aid] = record
            state["recent"] = [record] + state["recent"][: RECENT_KEPT - 1]
            return True

        return self._update(pid, change)

    def remove(self, project, annotation_ids):
        ids = [annotation_key(a) for a in annotation_ids]
        return self._update(project_key(project), lambda s: sum(s["ann"].pop(a, None) is not None for a in ids))

    def records(self, project):
        return self._read(project_key(project))["ann"]

    def recent(self, project, n):
        return self._read(project_key(project))["recent"][:n]

    def projects(self):
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []


def open_agreement_store(settings) -> AgreementStore:
    """Redis with ``REDIS_URL``, else files under ``GEM_STATE_DIR``."""
    if settings.redis_url:
        return RedisAgreementStore(settings.redis_url)
    return FileAgreementStore(settings.state_dir)


# ----------------------------------------------------------------------------------- webhook
class Agreement(WebhookQueue):
    """Annotation webhooks -> agreement records, after the HTTP answer (one thread, which also
    writes the records waiting for the store and ends when idle with none waiting; ``drain``
    waits for the queued events, not for those writes).

    Args:
        service: the process's :class:`~gem_backend.serving.service.GEMService` (settings,
            labeling-config parsing, metrics).
        store: default :func:`open_agreement_store` of the service's settings.
        predictions: task id -> that task's predictions; default the Label Studio API
            (none without ``LABEL_STUDIO_URL``).
    """

    ACTIONS = EVENT_ACTIONS + DELETE_ACTIONS
    THREAD_NAME = "gem-agreement"
    DROPPED_MESSAGE = "agreement: webhook %s dropped, %d events waiting"
    FAILED_MESSAGE = "agreement: webhook %s failed"
    logger = log

    def __init__(self, service, store: AgreementStore | None = None,
                 predictions: Callable[[Any], list] | None = None, maxsize: int = 1000):
        super().__init__(maxsize)
        self.service = service
        self._store = store
        self.predictions = predictions
        self._api = None
        self.pending: collections.deque = collections.deque()
        self._warned = 0.0

    @property
    def store(self) -> AgreementStore:
        with self._lock:
            if self._store is None:
                self._store = open_agreement_store(self.service.settings)
            return self._store

    def task_predictions(self, task_id: Any) -> list:
        """The task's predictions from Label Studio (``GET /api/predictions?task=ID``)."""
        if self.predictions is not None:
            return self.predictions(task_id)
        if not self.service.settings.label_studio_url:
            return []  # nothing to compare with: counted as no_prediction
        if self._api is None:
            from ..labelstudio.api import LabelStudioAPI

            s = self.service.settings
            self._api = LabelStudioAPI(s.label_studio_url, s.label_studio_api_key, timeout=(5.0, 30.0))
        return self._api.task_predictions(int(task_id))

    # -- queue --------------------------------------------------------------------------
    def count(self, result: str, n: int = 1) -> None:
        """``n`` events into ``gem_agreement_events_total{result}``."""
        self.service.metrics.agreement_events.labels(result=result).inc(n)

    def next_body(self) -> Mapping | None:
        """The next body; while none comes, the waiting records are written every
        :data:`RETRY_SECONDS`, and the thread ends (None) once none waits either."""
        while True:
            try:
                return self._queue.get(timeout=RETRY_SECONDS)
            except queue.Empty:
                self.flush()
                if not self.pending:
                    with self._lock:
                        if self._queue.empty():  # idle and nothing waits: the thread ends
                            self._thread = None
                            return None

    def process(self, body: Mapping) -> str:
        """Write the waiting records first (they are older), then handle the body."""
        self.flush()
        return self.handle(body)

    # -- store writes, with the retry queue ---------------------------------------------
    def _write(self, op: tuple) -> bool:
        kind, pid, arg1, arg2 = op
        if kind == "put":
            self.store.put(pid, arg1, arg2)
        else:
            self.store.remove(pid, arg1)
        self._publish(pid)
        return True

    def _write_or_keep(self, op: tuple) -> str:
        if not self.pending:
            try:
                self._write(op)
                return "recorded" if op[0] == "put" else "removed"
            except Exception as err:  # noqa: BLE001 - Redis away, unwritable file
                self._warn(err)
        if len(self.pending) >= PENDING_MAX:
            self.pending.popleft()
            log.warning("agreement: %d records wait for the store; the oldest is dropped", PENDING_MAX)
            self.count("dropped")
        self.pending.append(op)
        self.service.metrics.agreement_pending.set(len(self.pending))
        return "pending"

    def _warn(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > 30.0:
            self._warned = now
            log.warning("agreement: store unavailable (%s: %s); records wait in memory and are written "
                        "when it is back", type(err).__name__, err)

    def flush(self) -> int:
        """Write the records waiting for the store, in order; stops at the first failure.
        Returns how many were written."""
        done = 0
        while self.pending:
            try:
                self._write(self.pending[0])
            except Exception as err:  # noqa: BLE001
                self._warn(err)
                break
            self.pending.popleft()
            done += 1
        if done:
            log.info("agreement: %d waiting records written", done)
            self.count("written_late", done)
        self.service.metrics.agreement_pending.set(len(self.pending))
        return done

    def _publish(self, pid: str) -> None:
        """Set the project's gauges from the store (its figures across every process)."""
        s = self.store.summary(pid, last=0)
        m = self.service.metrics
        m.agreement_annotations.labels(project=pid).set(s["annotations"])
        if s["mean_iou"] is not None:
            m.agreement_iou.labels(project=pid).set(s["mean_iou"])
        for label, v in s["labels"].items():
            m.agreement_label_iou.labels(project=pid, label=label).set(v["mean_iou"])

    # -- one event ----------------------------------------------------------------------
    def handle(self, body: Mapping) -> str:
        """One webhook body: ``recorded``, ``removed``, ``pending`` (store away: kept),
        ``no_prediction`` (the task has none of ours) or ``skipped`` (malformed: logged)."""
        action = body.get("action")
        project = body.get("project")
        try:
            pid = project_id(project)
        except ValueError:
            log.warning("agreement: webhook %s without a usable project id: skipped", action)
            return "skipped"
        if action in DELETE_ACTIONS:
            return self._write_or_keep(("remove", pid, deleted_annotation_ids(body), None))
        annotation, task = body.get("annotation"), body.get("task")
        if not isinstance(annotation, Mapping) or not isinstance(task, Mapping):
            log.warning("agreement: project %s: %s without annotation and task objects: skipped", pid, action)
            return "skipped"
        if annotation.get("was_cancelled"):
            return "skipped"
        try:
            aid = annotation_key(annotation.get("id"))
        except ValueError:
            return "skipped"
        config = project.get("label_config") if isinstance(project, Mapping) else None
        from ..labelstudio.spec import LabelConfigError, parse_labeling_config

        try:  # only the controls matter here, not the project's settings
            targets = parse_labeling_config(config).targets if isinstance(config, str) else None
        except LabelConfigError as err:
            targets, config = None, f"{err}"
        if targets is None:
            log.warning("agreement: project %s: annotation %s skipped: no usable labeling config (%s)", pid, aid,
                        "missing" if config is None else config)
            return "skipped"
        given = annotation.get("prediction")
        if is_ours(given) and isinstance(given.get("result"), list):
            pred = given
        else:
            from ..labelstudio.api import LabelStudioError

            try:
                pred = find_our_prediction(annotation, self.task_predictions(task.get("id")))
            except (LabelStudioError, TypeError, ValueError) as err:
                log.warning("agreement: project %s: annotation %s: the task's predictions cannot be read: %s",
                            pid, aid, err)
                return "failed"
        if pred is None:
            log.debug("agreement: project %s: task %s has no prediction of ours", pid, task.get("id"))
            return "no_prediction"
        results = annotation.get("result")
        figures = compare_results(results if isinstance(results, list) else [], pred["result"], targets)
        for problem in figures.pop("problems"):
            log.warning("agreement: project %s: annotation %s: %s: skipped", pid, aid, problem)
        record = {"annotation": aid, "task": task.get("id"), "action": action,
                  "model_version": pred.get("model_version"), "prediction": pred.get("id"),
                  "stamp": str(annotation.get("updated_at") or annotation.get("created_at") or ""),
                  "at": time.time(), **figures}
        log.info("agreement: project %s: annotation %s of task %s: IoU %.3f", pid, aid, task.get("id"),
                 figures["iou"])
        return self._write_or_keep(("put", pid, aid, record))
