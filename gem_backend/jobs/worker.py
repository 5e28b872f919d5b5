"""Queue mode of bulk pre-labeling: task batches as RQ jobs, run by ``gem-backend worker``.

    gem-backend prelabel --project 3 --queue [NAME] [--wait]   # enqueue (and follow)
    gem-backend worker [--queue NAME]                           # any number, anywhere

A worker is a process with the model loaded once, taking jobs from the queue (default
``gem-prelabel``) on the Redis of ``REDIS_URL`` (the same Redis holds the text-embedding
cache). It needs to reach Label Studio (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``) and must
run with the same ``GEM_*`` settings as the backend: a job carries the run's ``model_version``
and a worker whose settings give another one fails the job's tasks instead of storing them.

One job = one batch (:func:`run_batch`), with a ``Retry(max=N)`` of RQ:

- a job that raises (Label Studio or Redis down) is put back on the queue, up to N times;
- a worker that dies (killed, OOM, machine lost) stops refreshing its job's entry in the
  queue's ``StartedJobRegistry``; ``abandon_after`` seconds after its last heartbeat the entry
  expires and the next registry cleanup (every live worker runs one every
  ``maintenance_interval`` seconds) hands the job to RQ's abandoned-job handling, which puts
  it back on the queue while it has retries left, else moves it to the failed registry;
- a job run twice stores nothing twice: tasks are checked before predicting and again under a
  per-task Redis lock right before storing (see :mod:`gem_backend.prelabel`).

Redis keys of a run (``<run>`` is ``<project>-<date>-<time>-<hex>``). They are durable state:
no TTL while the run is live, so a ``volatile-*`` eviction policy never takes them; once every
task of the run has an outcome they expire after 7 days (retention, not eviction):

- ``gem:prelabel:run:<run>``: hash ``project, model_version, queue, selected, already, tasks,
  jobs, created`` (unix time);
- ``gem:prelabel:run:<run>:jobs``: hash job id -> comma-separated task ids;
- ``gem:prelabel:run:<run>:tasks``: hash task id -> ``"<status>\\t<reason>"``, status ``done``,
  ``skipped`` or ``failed``; a ``done`` is never overwritten (a retried job finds the task
  stored and would report it skipped);
- ``gem:prelabel:run:<run>:counts``: hash ``done``, ``skipped``, ``failed`` -> counts of the above.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from ..serving.redis_gate import check_eviction_policy
from ..options import add_label_studio_flags, add_model_flags, with_label_studio
from ..labelstudio.api import LabelStudioAPI, LabelStudioError
from ..settings import SettingsError, configure_torch_threads
from .prelabel import (EXIT_ERROR, Outcome, PrelabelError, Selection, StopFlag, Summary, Target,
                       TaskLocks, connect_redis, show_counts, predict_and_store, progress_bar)

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "gem-prelabel"
RUN_TTL_S = 7 * 24 * 3600
EXIT_CONFIG = 78  # sysexits' EX_CONFIG: a restart with the same settings fails the same way
STOP_PROBE_S = 1.0
_TERMINAL = {"finished", "failed", "stopped", "canceled"}

_RECORD = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
local was = false
if old then was = string.match(old, '^[^\\t]*') end
if was == 'done' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\\t' .. ARGV[3])
if was then redis.call('HINCRBY', KEYS[2], was, -1) end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
-- durable while live (no TTL: volatile-* eviction never takes it); kept ARGV[4] s once complete
local total = tonumber(redis.call('HGET', KEYS[3], 'tasks') or '0')
if redis.call('HLEN', KEYS[1]) >= total then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
end
return 1
"""


class RunKeys:
    """Redis key names of one run (see the module doc)."""

    def __init__(self, run: str):
        self.run = run
        self.meta = f"gem:prelabel:run:{run}"
        self.jobs = self.meta + ":jobs"
        self.tasks = self.meta + ":tasks"
        self.counts = self.meta + ":counts"


@dataclass(frozen=True)
class Run:
    id: str
    queue: str
    jobs: int
    tasks: int


def _serializer():
    from rq.serializers import JSONSerializer

    return JSONSerializer  # job data stays readable and a worker never unpickles what Redis holds


def _queue(redis_client, name: str):
    from rq import Queue

    return Queue(name, connection=redis_client, serializer=_serializer())


def record_outcome(redis_client, run: str, outcome: Outcome) -> None:
    """Record one task's outcome in the run's hashes (atomically, a ``done`` is kept)."""
    keys = RunKeys(run)
    redis_client.eval(_RECORD, 4, keys.tasks, keys.counts, keys.meta, keys.jobs, str(outcome.task), outcome.status,
                      outcome.reason.replace("\t", " "), RUN_TTL_S)


# ----------------------------------------------------------------------------------- enqueue
def enqueue_run(redis_client, queue_name: str, target: Target, selection: Selection, *, batch_size: int,
                retries: int = 3, job_timeout: int | None = None) -> Run:
    """Enqueue ``selection.pending`` as jobs of ``batch_size`` tasks; returns the run."""
    from rq import Queue, Retry

    run_id = f"{target.project}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    keys = RunKeys(run_id)
    batches = [selection.pending[i:i + batch_size] for i in range(0, len(selection.pending), batch_size)]
    job_ids = [f"gem-prelabel-{run_id}-{i:06d}" for i in range(len(batches))]  # RQ: letters, digits, - and _ only
    with redis_client.pipeline() as pipe:
        pipe.hset(keys.meta, mapping={
            "project": target.project, "model_version": target.model_version, "queue": queue_name,
            "selected": selection.selected, "already": selection.already, "tasks": len(selection.pending),
            "jobs": len(batches), "created": time.time()})
        if batches:
            pipe.hset(keys.jobs, mapping={jid: ",".join(str(t["id"]) for t in batch)
                                          for jid, batch in zip(job_ids, batches)})
        if not batches:  # nothing will complete it: keep it for the retention period only
            pipe.expire(keys.meta, RUN_TTL_S)
        pipe.execute()
    queue = _queue(redis_client, queue_name)
    timeout = job_timeout or 600 + 120 * batch_size
    datas = [Queue.prepare_data(
        f"{__name__}.run_batch",
        kwargs={"run": run_id, "target": target.as_dict(), "tasks": batch},
        job_id=jid, timeout=timeout, result_ttl=RUN_TTL_S, failure_ttl=RUN_TTL_S,
        retry=Retry(max=retries) if retries > 0 else None,
        description=f"prelabel project {target.project} run {run_id} batch {i + 1}/{len(batches)}")
        for i, (jid, batch) in enumerate(zip(job_ids, batches))]
    for start in range(0, len(datas), 500):
        queue.enqueue_many(datas[start:start + 500])
    return Run(run_id, queue_name, len(batches), len(selection.pending))


# ----------------------------------------------------------------------------------- follow
def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no error recorded"


def follow_run(redis_client, run_id: str, *, progress: bool = True, stop: StopFlag | None = None,
               poll: float = 0.5, jobs_every: float = 2.0) -> Summary:
    """Follow a run until all its jobs have ended (or ``stop``); returns its summary.

    Progress comes from the run's counts; every ``jobs_every`` seconds the states of the jobs
    not yet ended are read (only read: re-queueing a dead worker's job is the workers' part).
    Tasks of a job that failed for good and that no try reported are recorded as failed with
    the job's last error.
    """
    from rq.job import Job

    keys = RunKeys(run_id)
    meta = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.meta).items()}
    if not meta:
        raise PrelabelError(f"no run {run_id!r} in this Redis (runs are kept 7 days; same REDIS_URL?)")
    total = _int(meta.get("tasks"))
    summary = Summary(_int(meta.get("project")), meta.get("model_version", ""), selected=_int(meta.get("selected")),
                      run=run_id, queue=meta.get("queue"))
    already = _int(meta.get("already"))
    job_tasks = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.jobs).items()}
    open_jobs = set(job_tasks)
    failed_jobs: dict[str, str] = {}
    last_check = 0.0

    def counts() -> dict[str, int]:
        return {k.decode(): _int(v) for k, v in redis_client.hgetall(keys.counts).items()}

    with progress_bar(total, progress, desc=f"run {run_id}") as bar:
        while True:
            c = counts()
            seen = c.get("done", 0) + c.get("skipped", 0) + c.get("failed", 0)
            summary.done, summary.skipped = c.get("done", 0), already + c.get("skipped", 0)
            summary.failed = [None] * c.get("failed", 0)  # for the postfix; the reasons are read at the end
            bar.update(seen - bar.n)
            show_counts(bar, summary)
            if not open_jobs:
                break
            if time.monotonic() - last_check >= jobs_every or seen >= total:
                last_check = time.monotonic()
                ids = sorted(open_jobs)
                for jid, job in zip(ids, Job.fetch_many(ids, connection=redis_client, serializer=_serializer())):
                    status = job.get_status(refresh=False) if job is not None else "gone"
                    status = getattr(status, "value", status)
                    if job is None or status in _TERMINAL:
                        open_jobs.discard(jid)
                        if status != "finished":
                            result = job.latest_result() if job is not None else None
                            failed_jobs[jid] = (f"job {jid} {status}: "
                                                + _last_line(getattr(result, "exc_string", None)))
                if not open_jobs:
                    continue  # one more count read, then out
            if stop is not None and stop.is_set():
                summary.interrupted = True
                break
            time.sleep(poll)
    # tasks of jobs that ended without reporting them (failed for good, expired)
    for jid, reason in failed_jobs.items():
        for task in (int(t) for t in job_tasks.get(jid, "").split(",") if t):
            if not redis_client.hexists(keys.tasks, task):
                record_outcome(redis_client, run_id, Outcome(task, "failed", reason))
    c = counts()
    summary.done, summary.skipped = c.get("done", 0), already + c.get("skipped", 0)
    summary.failed = []
    for task, value in redis_client.hscan_iter(keys.tasks):
        status, _, reason = value.decode().partition("\t")
        if status == "failed":
            summary.failed.append({"task": int(task), "reason": reason})
    summary.failed.sort(key=lambda item: item["task"])
    summary.not_processed = max(0, total - c.get("done", 0) - c.get("skipped", 0) - c.get("failed", 0))
    created = float(meta.get("created") or time.time())
    summary.seconds = time.time() - created
    if summary.interrupted:
        print(f"stopped following; the jobs go on: `gem-backend prelabel --follow {run_id}`", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------------- the job
_state: dict[str, Any] = {}
_state_lock = threading.Lock()


def _process_state() -> tuple[Any, LabelStudioAPI]:
    """This process's service and Label Studio client: set by ``gem-backend worker``, or built
    from the environment on first use (a plain ``rq worker`` also works)."""
    with _state_lock:
        if "service" not in _state:
            from ..serving.service import GEMService
            from ..settings import Settings

            settings = Settings.from_env()
            _state["service"] = GEMService(settings)
            _state["api"] = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key,
                                           timeout=(5.0, max(60.0, settings.fetch_timeout)))
        return _state["service"], _state["api"]


def run_batch(run: str, target: Mapping, tasks: list[dict]) -> dict:
    """RQ job: predict and store one batch of a run; records each task's outcome.

    ``target``: :meth:`Target.as_dict`; ``tasks``: ``[{"id": int, "data": {...}}]``.
    Returns ``{"done": n, "skipped": n, "failed": n}``. Raises (so RQ retries the job) when
    Label Studio or Redis is unusable or the model cannot load.
    """
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        connection = job.connection
    else:  # called directly (tests, debugging)
        from ..settings import Settings

        connection = connect_redis(Settings.from_env().redis_url, "run_batch")
    service, api = _process_state()
    counts = {"done": 0, "skipped": 0, "failed": 0}

    def on_outcome(outcome: Outcome) -> None:
        counts[outcome.status] += 1
        record_outcome(connection, run, outcome)

    predict_and_store(service, api, Target.from_dict(target), tasks, locks=TaskLocks(connection),
                      on_outcome=on_outcome)
    return counts


# ----------------------------------------------------------------------------------- the worker
def _worker_class():
    import redis
    from rq.exceptions import StopRequested
    from rq.utils import utcformat
    from rq.worker import SimpleWorker, WorkerStatus

    class PrelabelWorker(SimpleWorker):
        """An RQ worker that runs jobs in its own process (the model stays loaded between jobs)
        and refreshes the job's heartbeat from a thread while it runs.

        RQ's forking worker heartbeats from the parent while a child runs the job; a
        :class:`SimpleWorker` heartbeats only between jobs, so a long job would look abandoned,
        or (with a long ttl) a killed worker's job would wait that long. Here the job's entry in
        the ``StartedJobRegistry`` lives ``abandon_after`` seconds and is refreshed every
        ``heartbeat_interval`` seconds; an idle worker wakes up every ``maintenance_interval``
        seconds to clean the registries (RQ's default waits for jobs up to 6.5 minutes).

        Stopping (SIGTERM/SIGINT) never waits on Redis: RQ's handler writes to Redis, and a stop
        that arrives while Redis is down or hung is swallowed by a reconnect (redis-py turns it
        into a ``ConnectionError``, RQ retries) or waits out the socket timeouts. Here the handler
        only sets flags, and a watch thread pings Redis with 1 s timeouts: while Redis answers,
        the stop is RQ's warm one (the current job finishes); once it stops answering the worker
        exits at once. An idle worker then has nothing to lose (its registration expires by
        itself); a busy one leaves its job in the ``StartedJobRegistry``, where it is re-queued
        ``abandon_after`` seconds later like a dead worker's job (one retry used).
        """

        def __init__(self, *args, heartbeat_interval: float = 10.0, abandon_after: int = 60, **kwargs):
            super().__init__(*args, **kwargs)
            if abandon_after <= heartbeat_interval * 2:
                raise ValueError("abandon_after must exceed two heartbeat intervals")
            self.heartbeat_interval = heartbeat_interval
            self.abandon_after = int(abandon_after)

        stopping = False
        running_job: str | None = None

        def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
            return self.abandon_after

        def request_stop(self, signum, frame):
            if not self.stopping:
                self.stopping = True
                self.stop_signal = signum
                self.stop_requested_at = datetime.now(timezone.utc)
                threading.Thread(target=self.watch_stop, name="rq-stop-watch", daemon=True).start()
            super().request_stop(signum, frame)  # idle: raises StopRequested; busy: stop after the job

        def set_shutdown_requested_date(self):
            pass  # RQ calls it in the signal handler: the watch thread writes it instead, if it can

        def heartbeat(self, timeout=None, pipeline=None):
            # a stop swallowed by a reconnect surfaces here, before the next Redis call
            if self.stopping and pipeline is None and self.get_state() != WorkerStatus.BUSY:
                raise StopRequested()
            super().heartbeat(timeout, pipeline)

        def teardown(self):
            try:
                super().teardown()
            except redis.RedisError as err:  # unregistering is tidiness: the entry expires anyway
                self.log.warning("worker %s: could not unregister (%s: %s); its entry expires by itself",
                                 self.name, type(err).__name__, err)

        def stop_probe(self):
            """A client of the worker's Redis that answers or fails within a second."""
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            pool = self.connection.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": STOP_PROBE_S,
                      "socket_connect_timeout": STOP_PROBE_S, "retry": Retry(NoBackoff(), 0)}
            return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))

        def watch_stop(self) -> None:
            """After a stop request: exit at once when Redis stops answering (see the class doc)."""
            probe = self.stop_probe()
            stamped = False
            failures = 0
            while True:
                try:
                    probe.ping()
                    failures = 0
                    if not stamped:
                        stamped = True
                        probe.hset(self.key, "shutdown_requested_date", utcformat(self.stop_requested_at))
                except redis.RedisError:
                    failures += 1
                if failures >= 2:
                    break
                time.sleep(STOP_PROBE_S)
            job = self.running_job
            if job is None:
                self.log.warning("worker %s: Redis does not answer; stopping now (no job was running)", self.name)
                code = 0
            else:
                self.log.warning("worker %s: Redis does not answer; stopping now. Job %s stays in the started "
                                 "registry: %d s after its last heartbeat a worker puts it back on the queue",
                                 self.name, job, self.abandon_after)
                code = 128 + int(self.stop_signal)
            for handler in logging.getLogger().handlers + self.log.handlers:
                handler.flush()
            os._exit(code)  # the main thread may be stuck in a Redis call; nothing here is lost

        @property
        def dequeue_timeout(self) -> int:
            return max(1, int(self.maintenance_interval))

        def execute_job(self, job, queue):
            self.running_job = job.id
            execution = self.prepare_execution(job)
            done = threading.Event()
            beat = threading.Thread(target=self._beat, args=(job, execution, done), name="rq-heartbeat", daemon=True)
            beat.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                done.set()
                beat.join(timeout=10)
                self.running_job = None
            self.set_state(WorkerStatus.IDLE)

        def _beat(self, job, execution, done: threading.Event) -> None:
            while not done.wait(self.heartbeat_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as err:  # a missed beat is survivable; the next one may work
                    self.log.warning("heartbeat of job %s failed: %s: %s", job.id, type(err).__name__, err)

    return PrelabelWorker


def add_worker_parser(sub) -> None:
    p = sub.add_parser(
        "worker", help="run queued pre-labeling jobs (RQ worker; needs REDIS_URL)",
        description="Take the batches enqueued by `gem-backend prelabel --queue` from Redis (REDIS_URL), predict "
                    "them and store the predictions in Label Studio (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY). "
                    "Run as many as you like, on any machines; use the backend's GEM_* settings. "
                    "SIGTERM/SIGINT: stop after the current job.")
    p.add_argument("--queue", action="append", metavar="NAME",
                   help=f"queue to take jobs from; repeatable (default {DEFAULT_QUEUE})")
    add_label_studio_flags(p)
    p.add_argument("--name", help="worker name (default: random)")
    p.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    p.add_argument("--max-jobs", type=int, help="quit after this many jobs")
    p.add_argument("--heartbeat-interval", type=float, default=10.0,
                   help="seconds between heartbeats of the running job (default 10)")
    p.add_argument("--abandon-after", type=int, default=60,
                   help="a job whose worker sent no heartbeat for this many seconds is run again (default 60)")
    p.add_argument("--maintenance-interval", type=int, default=30,
                   help="seconds between this worker's cleanups of the queue registries, which re-queue "
                        "abandoned jobs (default 30)")
    p.add_argument("--wait-on-config-error", action="store_true",
                   help="when the settings keep it from working (no Label Studio URL or API key, no REDIS_URL, "
                        "bad GEM_* value, model that cannot load), report it once and wait until stopped "
                        "instead of exiting with 78: for restart policies (docker-compose.yml uses it)")
    add_model_flags(p)
    p.set_defaults(func=cmd_worker)


def wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


def cannot_work(problem: str, wait: bool) -> int:
    """Report once why this worker takes no jobs; with ``wait``, stay up until stopped, so a
    restart policy does not start it again and again with the same problem. Returns 78."""
    log.error("gem-backend worker takes no jobs: %s", problem)
    if wait:
        log.error("waiting until stopped (--wait-on-config-error): fix the setting and restart the worker")
        wait_for_stop()
    return EXIT_CONFIG


def cmd_worker(args: argparse.Namespace) -> int:
    from ..serving.service import GEMService, ModelUnavailable

    wait = args.wait_on_config_error
    try:  # what no restart fixes: settings, Label Studio URL or key, REDIS_URL
        settings = with_label_studio(args, exit_on_error=False)
        api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key,
                             timeout=(5.0, max(60.0, settings.fetch_timeout)))
        if not settings.redis_url:
            raise PrelabelError("it needs Redis: set REDIS_URL (e.g. redis://localhost:6379/0)")
    except (SettingsError, LabelStudioError, PrelabelError) as err:
        return cannot_work(str(err), wait)
    try:  # Redis may come up later: a restart can fix this one
        client = connect_redis(settings.redis_url, "gem-backend worker")
    except PrelabelError as err:
        print(f"gem-backend worker: {err}", file=sys.stderr)
        return EXIT_ERROR
    check_eviction_policy(client, settings.redis_url, log, caches_elsewhere=bool(settings.cache_redis_url))
    # cores / WORKERS torch threads (WORKERS: worker processes on this machine), or GEM_TORCH_THREADS
    configure_torch_threads(settings, what="prelabel worker", logger=log)
    service = GEMService(settings)
    try:
        service.load()  # fail now, not in every job; jobs then only predict
        worker_class = _worker_class()
        queues = [_queue(client, name) for name in (args.queue or [DEFAULT_QUEUE])]
        worker = worker_class(queues, connection=client, serializer=_serializer(), name=args.name,
                              maintenance_interval=args.maintenance_interval,
                              heartbeat_interval=args.heartbeat_interval, abandon_after=args.abandon_after)
    except (ModelUnavailable, ValueError) as err:
        return cannot_work(str(err), wait)
    with _state_lock:
        _state.update(service=service, api=api)
    log.info("worker %s on queues %s, model_version %s (without extra_params)", worker.name,
             ", ".join(q.name for q in queues), settings.model_version())
    import redis

    try:
        worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level)
    except redis.RedisError as err:  # lost while starting (the loop itself waits for Redis to return)
        log.error("gem-backend worker: Redis failed: %s: %s", type(err).__name__, err)
        return EXIT_ERROR
    return 0


__all__ = ["DEFAULT_QUEUE", "Run", "RunKeys", "enqueue_run", "follow_run", "record_outcome", "run_batch",
           "add_worker_parser", "cmd_worker", "cannot_work", "wait_for_stop", "EXIT_CONFIG"]
