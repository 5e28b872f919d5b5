"""Bulk pre-labeling: predict a whole Label Studio project and store the predictions via its API.

Label Studio's "Retrieve predictions" sends every selected task to ``/predict`` in one request
with a 100 s timeout, which on CPU covers a few dozen images at most. ``gem-backend prelabel``
instead lists the project's tasks itself, predicts them in batches with the same function as
``/predict`` (:meth:`GEMService.predict_stream`) and the same settings and
``model_version`` as the project's connected backend, and stores each batch through the API:

    gem-backend prelabel --project 3                       # one process, progress bar, summary
    gem-backend prelabel --project 3 --ids 1,2,10-20       # only these tasks
    gem-backend prelabel --project 3 --view 7 --limit 100  # a Data Manager tab, at most 100 tasks
    gem-backend prelabel --project 3 --queue --wait        # RQ jobs for `gem-backend worker`s

Every run skips the tasks that already hold a prediction of the project's ``model_version``, so
a second run stores nothing and an interrupted run resumes where it stopped.

No task gets the version twice: right before a batch is stored, each task's predictions are read
again and tasks that got the version meanwhile are dropped from the batch. With Redis
(``REDIS_URL``) that check and the store happen under a per-task lock (:class:`TaskLocks`), so two
processes working on the same task (a retried job whose first worker was only presumed dead, two
runs at once) cannot both store it.

Label Studio API calls used (1.23): ``GET /api/projects/{id}``, ``GET /api/ml?project={id}``,
``GET /api/tasks`` (Data Manager list, paginated, ``fields=task_only``),
``GET /api/predictions?task={id}``, ``POST /api/projects/{id}/import/predictions`` (falls back to
one ``POST /api/predictions`` per task on instances without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence


from ..labelstudio.api import LabelStudioAPI, LabelStudioError
from ..serving.service import GEMService, ProjectSpec, RequestError, check_tasks
from ..redaction import redact_url
from ..settings import SettingsError, parse_extra_params

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
LOCK_TTL_S = 120        # > connect + read timeout of one store request, so a live holder never loses it
LOCK_WAIT_S = 150       # > LOCK_TTL_S: a lock left by a killed process has expired by then
_LOCK_PREFIX = "gem:prelabel:lock:"

EXIT_OK, EXIT_FAILED_TASKS, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class PrelabelError(RuntimeError):
    """The run cannot start or go on (bad project, settings, Label Studio or Redis); the message
    says what to do. The CLI prints it and exits with status 2."""


# ----------------------------------------------------------------------------------- locks
class TaskLocks:
    """Per-task locks in Redis around "check the task's predictions, then store".

    Key ``gem:prelabel:lock:<project>:<task>``, value a random token, set with ``SET NX PX``
    and a ``ttl`` (seconds) longer than one store request, deleted only by the holder (compare
    and delete in Lua). A holder that dies leaves the lock to expire; waiters poll for ``wait``
    seconds, longer than the ttl. Locks of a batch are taken in task-id order so that two
    batches that share tasks cannot deadlock.
    """

    _RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

    def __init__(self, redis_client, ttl: float = LOCK_TTL_S, wait: float = LOCK_WAIT_S, poll: float = 0.05):
        self.redis = redis_client
        self.ttl = ttl
        self.wait = wait
        self.poll = poll
        self._release = redis_client.register_script(self._RELEASE)

    @staticmethod
    def key(project: int, task: int) -> str:
        return f"{_LOCK_PREFIX}{project}:{task}"

    @contextlib.contextmanager
    def hold(self, project: int, tasks: Iterable[int]) -> Iterator[None]:
        """Hold the locks of ``tasks`` for the ``with`` block; raises :class:`PrelabelError`
        if one stays taken for ``wait`` seconds."""
        token = secrets.token_hex(16)
        held: list[str] = []
        try:
            for task in sorted(set(tasks)):
                key = self.key(project, task)
                deadline = time.monotonic() + self.wait
                while not self.redis.set(key, token, nx=True, px=int(self.ttl * 1000)):
                    if time.monotonic() > deadline:
                        raise PrelabelError(f"task {task}: its lock {key} stayed taken for {self.wait:.0f} s")
                    time.sleep(self.poll)
                held.append(key)
            yield
        finally:
            for key in held:
                try:
                    self._release(keys=[key], args=[token])
                except Exception as err:  # it expires anyway
                    log.warning("could not release %s: %s", key, type(err).__name__)


class _NoLocks:
    """Stand-in without Redis: the re-check before storing still runs, unlocked."""

    @contextlib.contextmanager
    def hold(self, project: int, tasks: Iterable[int]) -> Iterator[None]:
        yield


NO_LOCKS = _NoLocks()


# ----------------------------------------------------------------------------------- project
@dataclass(frozen=True)
class Target:
    """What every batch of a run needs, JSON-serialisable (it travels in queue jobs).

    ``project``: Label Studio project id; ``label_config``: its XML; ``extra_params``: the
    settings overrides (dict); ``model_version``: the version the predictions get, which every
    process must compute identically from these and its own ``GEM_*`` settings.
    """

    project: int
    label_config: str
    extra_params: dict
    model_version: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Target":
        return cls(int(data["project"]), str(data["label_config"]), dict(data.get("extra_params") or {}),
                   str(data["model_version"]))


def resolve_target(api: LabelStudioAPI, service: GEMService, project: int, *,
                   extra_params: str | Mapping | None = None, ml_backend: int | None = None,
                   ignore_backend_version: bool = False) -> tuple[Target, list[str]]:
    """The project's label config, settings and model_version, as its backend would use them.

    ``extra_params`` are those of the project's connected ML backend (``GET /api/ml``; with
    several, ``ml_backend`` picks one by id, else the one whose title is the project's
    ``model_version``), unless ``extra_params`` is given. When the backend reports a
    ``model_version`` other than the one computed here (the backend runs with other ``GEM_*``
    settings), this raises :class:`PrelabelError` unless ``ignore_backend_version``.

    Returns ``(target, notes)``: notes are lines for the user.
    """
    info = api.project(project)
    label_config = info.get("label_config") or ""
    notes: list[str] = []
    if info.get("evaluate_predictions_automatically"):
        # the Data Manager list then asks the backend for every listed task without a prediction
        notes.append(f"note: project {project} retrieves predictions automatically when tasks are listed; "
                     f"turn that off during a bulk run, or listing waits for the backend")
    try:
        backend = api.project_backend(project, info, ml_backend)
    except LabelStudioError as err:
        if err.status is not None:  # an API failure, not an ambiguous choice
            raise
        raise PrelabelError(str(err)) from None
    if extra_params is None:
        raw = backend.get("extra_params") if backend else None
        if backend is None:
            notes.append(f"project {project} has no ML backend connected: using this process's settings "
                         f"(pass --extra-params for per-project ones)")
    else:
        raw = extra_params
    try:
        params = parse_extra_params(raw)
        spec = service.project(label_config, params, project=project)
    except (SettingsError, RequestError) as err:
        raise PrelabelError(f"project {project}: {err}") from None
    reported = (backend or {}).get("model_version") or ""
    if backend is not None and reported and reported != spec.model_version:
        message = (f"the project's ML backend {backend.get('id')} ({backend.get('url')}) reports model_version "
                   f"{reported!r}, but these settings give {spec.model_version!r}: run prelabel with the backend's "
                   f"GEM_* settings (and its extra_params), or pass --ignore-backend-version")
        if not ignore_backend_version:
            raise PrelabelError(message)
        notes.append("warning: " + message.split(": run prelabel")[0])
    return Target(int(project), label_config, params, spec.model_version), notes


def _base_version(version: str) -> str:
    """A model_version without the prototype digest (``-p`` + 6 hex digits) that projects with
    prototypes on get."""
    return re.sub(r"-p[0-9a-f]{6}$", "", version)


# ----------------------------------------------------------------------------------- selection
def parse_ids(text: str) -> list[int]:
    """``"1,2, 5-9"`` -> ``[1, 2, 5, 6, 7, 8, 9]`` (order kept, duplicates dropped)."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise PrelabelError(f"--ids: {part!r} is not a task id or a range like 10-20")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi - lo > 1_000_000:
            raise PrelabelError(f"--ids: bad range {part!r}")
        out.extend(range(lo, hi + 1))
    if not out:
        raise PrelabelError("--ids: no task ids given")
    return list(dict.fromkeys(out))


@dataclass
class Selection:
    """The tasks a run was asked for, split into those still to predict and those skipped."""

    selected: int
    pending: list[dict]          # [{"id": int, "data": {...}}], listing order, --limit applied
    already: int                 # selected tasks that already hold the model_version
    missing_ids: list[int] = field(default_factory=list)   # --ids not found in the project/view


def select_tasks(api: LabelStudioAPI, target: Target, *, ids: Sequence[int] | None = None,
                 view: int | None = None, limit: int | None = None) -> Selection:
    """List the selected tasks and drop those that already hold ``target.model_version``.

    ``ids`` and ``view`` narrow the selection (both: the view's tasks among the ids);
    ``limit`` caps the number of tasks still to predict (so ``--limit 100`` pre-labels 100
    more tasks each time).
    """
    if ids is not None and view is None:
        wanted = list(ids)
        tasks = []
        for start in range(0, len(wanted), 200):  # the query travels in the URL: keep it short
            chunk = wanted[start:start + 200]
            query = {"selectedItems": {"all": False, "included": chunk}}
            tasks.extend(api.iter_tasks(target.project, query=query))
    else:
        tasks = list(api.iter_tasks(target.project, view=view))
        if ids is not None:
            keep = set(ids)
            tasks = [t for t in tasks if int(t["id"]) in keep]
    found = {int(t["id"]) for t in tasks}
    missing = [i for i in ids if i not in found] if ids is not None else []
    done = api.task_ids_with_version(target.project, target.model_version) if tasks else set()
    todo = [{"id": int(t["id"]), "data": t.get("data") or {}} for t in tasks if int(t["id"]) not in done]
    already = len(tasks) - len(todo)
    if limit is not None:
        todo = todo[:max(0, limit)]
    return Selection(selected=len(tasks), pending=todo, already=already, missing_ids=missing)


# ----------------------------------------------------------------------------------- one batch
@dataclass(frozen=True)
class Outcome:
    """What happened to one task: ``status`` is ``done`` (stored now), ``skipped`` (it already
    had the version) or ``failed`` (``reason`` says why; nothing stored)."""

    task: int
    status: str
    reason: str = ""


def predict_and_store(service: GEMService, api: LabelStudioAPI, target: Target, tasks: Sequence[Mapping], *,
                      locks=NO_LOCKS, spec: ProjectSpec | None = None,
                      on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Predict ``tasks`` (``[{"id", "data"}]``) and store the predictions; one outcome per task.

    1. tasks that hold the version already (stored by an earlier or concurrent run) are skipped
       before any work;
    2. the remaining tasks are predicted by :meth:`GEMService.predict_stream` (the function
       behind ``/predict``: the next images are fetched while the current ones are in the
       model); a task whose image cannot be fetched or decoded (or which
       lacks the image field) fails with the reason, and nothing is stored for it;
    3. under the tasks' locks, each prediction's task is checked again and the batch is stored
       in one request without those that got the version meanwhile.

    Raises :class:`PrelabelError` (Label Studio or Redis unusable) and
    :class:`~gem_backend.service.ModelUnavailable`; per-task problems are outcomes.
    """
    spec = spec or service.project(target.label_config, target.extra_params, project=target.project)
    outcomes: dict[int, Outcome] = {}

    def record(outcome: Outcome) -> None:
        outcomes[outcome.task] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    if spec.model_version != target.model_version:
        why = ("the project's prototypes changed since the run started (new annotations): run prelabel again"
               if _base_version(spec.model_version) == _base_version(target.model_version)
               else "start it with the same GEM_* settings")
        for task in tasks:
            record(Outcome(int(task["id"]), "failed",
                           f"this process's settings give model_version {spec.model_version!r}, the run "
                           f"uses {target.model_version!r}: {why}"))
        return [outcomes[int(t["id"])] for t in tasks]
    ready: list[tuple[int, dict]] = []
    todo = []
    for task in tasks:
        task_id = int(task["id"])
        if api.has_version(task_id, target.model_version):
            record(Outcome(task_id, "skipped", "already has a prediction of this model_version"))
            continue
        try:
            check_tasks([dict(task)], spec.targets)
        except RequestError as err:
            record(Outcome(task_id, "failed", str(err) or type(err).__name__))
            continue
        todo.append(task)
    # the function behind /predict, pipelined: the next images are fetched and decoded during
    # the current forward; an image that fails fails its task only
    for task, pred in service.predict_stream(todo, spec):
        if isinstance(pred, BaseException):
            record(Outcome(int(task["id"]), "failed", str(pred) or type(pred).__name__))
        else:
            ready.append((int(task["id"]), pred))
    if ready:
        for outcome in _store(api, target, ready, locks):
            record(outcome)
    return [outcomes[int(t["id"])] for t in tasks]


def _store(api: LabelStudioAPI, target: Target, ready: list[tuple[int, dict]], locks) -> list[Outcome]:
    """Check-then-store under the tasks' locks; see :func:`predict_and_store`."""
    out: list[Outcome] = []
    with locks.hold(target.project, [task for task, _ in ready]):
        fresh = []
        for task, pred in ready:
            if api.has_version(task, target.model_version):
                out.append(Outcome(task, "skipped", "stored meanwhile by another run or an earlier try"))
            else:
                fresh.append((task, pred))
        if not fresh:
            return out
        payload = [{"task": task, "result": pred["result"], "score": pred.get("score"),
                    "model_version": target.model_version} for task, pred in fresh]
        try:
            created = api.import_predictions(target.project, payload)
        except LabelStudioError as err:
            if err.status != 400:
                raise
            created = None  # one bad item (e.g. a task deleted meanwhile) refuses them all: isolate it
        if created is None:  # no bulk endpoint, or a refused batch: one request per task
            for (task, _), item in zip(fresh, payload):
                try:
                    api.create_prediction(item)
                    out.append(Outcome(task, "done"))
                except LabelStudioError as err:
                    if err.status is None or err.status >= 500:
                        raise
                    out.append(Outcome(task, "failed", f"Label Studio refused the prediction: {err}"))
        elif created == len(payload):
            out.extend(Outcome(task, "done") for task, _ in fresh)
        else:
            # Label Studio drops predictions that do not fit the label config and says only how
            # many it created: find out which ones
            for task, _ in fresh:
                if api.has_version(task, target.model_version):
                    out.append(Outcome(task, "done"))
                else:
                    out.append(Outcome(task, "failed", "Label Studio did not store the prediction (it drops "
                                       "predictions that do not fit the label config; see its log)"))
    return out


# ----------------------------------------------------------------------------------- summary
@dataclass
class Summary:
    """The result of a run (``--summary-json`` writes :meth:`as_dict`).

    JSON: ``{"project": int, "model_version": str, "selected": int, "done": int, "skipped": int,
    "failed": [{"task": int, "reason": str}], "not_processed": int, "interrupted": bool,
    "missing_ids": [int], "seconds": float, "run": str|null, "queue": str|null, "error": str|null}``.
    ``error``: why the run stopped early (Label Studio or Redis failed), else null.
    ``skipped`` counts tasks that already held the version (before the run or when stored).
    """

    project: int
    model_version: str
    selected: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[dict] = field(default_factory=list)
    not_processed: int = 0
    interrupted: bool = False
    missing_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0
    run: str | None = None
    queue: str | None = None
    error: str | None = None

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "done":
            self.done += 1
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed.append({"task": outcome.task, "reason": outcome.reason})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def exit_code(self) -> int:
        if self.error:
            return EXIT_ERROR
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED_TASKS if self.failed or self.not_processed else EXIT_OK

    def text(self) -> str:
        rate = f" ({self.done / self.seconds:.2f} tasks/s)" if self.seconds > 0 and self.done else ""
        lines = [f"project {self.project}, model_version {self.model_version}"
                 + (f", run {self.run}" if self.run else "") + ":",
                 f"  {self.done} done, {self.skipped} skipped (already had this model_version), "
                 f"{len(self.failed)} failed, of {self.selected} selected, in {self.seconds:.1f} s{rate}"]
        if self.missing_ids:
            shown = ", ".join(map(str, self.missing_ids[:20])) + (" ..." if len(self.missing_ids) > 20 else "")
            lines.append(f"  --ids not found in the project (or view): {shown}")
        if self.failed:
            lines.append("  failed:")
            for item in self.failed[:50]:
                lines.append(f"    task {item['task']}: {item['reason']}")
            if len(self.failed) > 50:
                lines.append(f"    ... and {len(self.failed) - 50} more (--summary-json FILE lists all)")
        if self.error:
            lines.append(f"  stopped: {self.error}")
            lines.append(f"  {self.not_processed} tasks not processed; run the same command again to resume")
        elif self.interrupted:
            lines.append(f"  interrupted: {self.not_processed} tasks not processed; run the same command "
                         f"again to resume")
        elif self.not_processed:
            lines.append(f"  {self.not_processed} tasks not processed (see above)")
        return "\n".join(lines)


def progress_bar(total: int, enabled: bool, desc: str = "prelabel"):
    """A tqdm bar on stderr: tasks, rate, ETA, and done/skipped/failed as postfix."""
    from tqdm import tqdm

    return tqdm(total=total, unit="task", desc=desc, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1, mininterval=0.5)


def show_counts(bar, summary: Summary) -> None:
    """Put the run's done/skipped/failed counts on its progress bar."""
    bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=len(summary.failed), refresh=False)


# ----------------------------------------------------------------------------------- local run
class StopFlag:
    """First SIGINT/SIGTERM: stop after the current batch. Second SIGINT: stop now
    (KeyboardInterrupt). Installed only in the main thread; restores the old handlers."""

    def __init__(self, message: Callable[[str], None] = lambda text: print(text, file=sys.stderr)):
        self.event = threading.Event()
        self._message = message
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.event.set()
        self._message(f"{signal.Signals(signum).name}: stopping after the current batch "
                      f"(Ctrl-C again to stop at once)")

    def is_set(self) -> bool:
        return self.event.is_set()


def run_local(service: GEMService, api: LabelStudioAPI, target: Target, selection: Selection, *,
              batch_size: int = DEFAULT_BATCH_SIZE, locks=NO_LOCKS, progress: bool = True,
              stop: StopFlag | None = None) -> Summary:
    """Predict and store ``selection.pending`` in batches in this process; see the module doc.

    ``stop`` (a :class:`StopFlag`) is checked between batches: the batch in flight is finished
    and stored, then the run ends with ``interrupted`` set.
    """
    summary = Summary(target.project, target.model_version, selected=selection.selected,
                      skipped=selection.already, missing_ids=selection.missing_ids)
    pending = selection.pending
    started = time.monotonic()
    if not pending:
        return summary
    service.load()
    spec = service.project(target.label_config, target.extra_params, project=target.project)
    seen = 0
    with progress_bar(len(pending), progress) as bar:
        def on_outcome(outcome: Outcome) -> None:
            nonlocal seen
            seen += 1
            summary.add(outcome)
            bar.update(1)
            show_counts(bar, summary)

        try:
            for start in range(0, len(pending), batch_size):
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
                predict_and_store(service, api, target, pending[start:start + batch_size], locks=locks,
                                  spec=spec, on_outcome=on_outcome)
        except KeyboardInterrupt:
            summary.interrupted = True
            bar.write("stopped during a batch: its tasks are checked again on the next run")
        except (PrelabelError, LabelStudioError) as err:  # Label Studio unreachable, a lock never freed: keep what is done
            summary.error = str(err)
        except Exception as err:
            import redis

            if not isinstance(err, redis.RedisError):
                raise
            summary.error = f"Redis failed: {type(err).__name__}: {err}"
        finally:
            summary.seconds = time.monotonic() - started
            # a batch cut short may have been stored or not: the next run's checks tell
            summary.not_processed = len(pending) - seen
    return summary


def connect_redis(url: str | None, what: str):
    """A Redis client for ``url``, checked with a ping; :class:`PrelabelError` saying what needs
    it (``what``) when unset or unreachable."""
    if not url:
        raise PrelabelError(f"{what} needs Redis: set REDIS_URL (e.g. redis://localhost:6379/0)")
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as err:
        hint = "" if what == "--queue" or "worker" in what else " (unset REDIS_URL to run without task locks)"
        raise PrelabelError(f"Redis at {redact_url(url)} is unreachable{hint}: {type(err).__name__}: {err}") from None
    return client


__all__ = ["PrelabelError", "TaskLocks", "NO_LOCKS", "Target", "Outcome",
           "Selection", "Summary", "StopFlag", "resolve_target", "select_tasks", "predict_and_store", "run_local",
           "parse_ids", "connect_redis", "show_counts", "EXIT_OK", "EXIT_FAILED_TASKS", "EXIT_ERROR",
           "EXIT_INTERRUPTED", "DEFAULT_BATCH_SIZE"]
