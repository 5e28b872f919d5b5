"""The ``prelabel`` and ``worker`` subcommands: parsing, and running a local or queued run
(:mod:`gem_backend.jobs.prelabel` predicts and stores, :mod:`gem_backend.jobs.worker` queues).
"""

from __future__ import annotations

import json
import sys

from ..labelstudio.api import LabelStudioAPI, LabelStudioError
from ..options import add_label_studio_flags, add_model_flags, with_label_studio
from ..serving.service import GEMService, ModelUnavailable
from ..settings import configure_torch_threads
from .prelabel import (DEFAULT_BATCH_SIZE, EXIT_ERROR, EXIT_OK, NO_LOCKS, PrelabelError, StopFlag, Summary,
                       TaskLocks, connect_redis, parse_ids, resolve_target, run_local, select_tasks)
from .worker import add_worker_parser, enqueue_run, follow_run

__all__ = ["add_parsers", "cmd_prelabel"]


def add_parsers(sub) -> None:
    """Register ``prelabel`` and ``worker`` on the ``gem-backend`` subcommand parser."""
    p = sub.add_parser(
        "prelabel", help="pre-annotate a Label Studio project through its API (resumable; --queue for workers)",
        description="Predict the tasks of a Label Studio project and store the predictions through its API, "
                    "in batches, skipping tasks that already hold this model_version (rerun to resume). "
                    "Exit status: 0 all done or skipped, 1 some tasks failed, 2 error, 130 interrupted.")
    p.add_argument("--project", type=int, help="Label Studio project id (required unless --follow)")
    add_label_studio_flags(p)
    g = p.add_argument_group("which tasks")
    g.add_argument("--ids", help="task ids and ranges, e.g. 1,2,10-20")
    g.add_argument("--view", type=int, help="Data Manager view (tab) id: its filters select the tasks")
    g.add_argument("--limit", type=int, help="predict at most N tasks that still need a prediction")
    g = p.add_argument_group("settings (default: those of the project's connected ML backend)")
    g.add_argument("--extra-params", help="JSON object of per-project settings, instead of the ML backend's "
                                          "extra_params, e.g. '{\"threshold\": 0.4}'")
    g.add_argument("--ml-backend", type=int, help="ML backend id, when the project has several")
    g.add_argument("--ignore-backend-version", action="store_true",
                   help="store even if the ML backend reports another model_version than these settings give")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"tasks per batch: stored together, one queue job each (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--summary-json", help="also write the summary to this file (JSON)")
    g = p.add_argument_group("queue (needs REDIS_URL; see `gem-backend worker`)")
    g.add_argument("--queue", nargs="?", const="gem-prelabel", metavar="NAME",
                   help="enqueue the batches as RQ jobs on queue NAME (default gem-prelabel) instead of predicting")
    g.add_argument("--wait", action="store_true", help="with --queue: follow the jobs with a progress bar")
    g.add_argument("--follow", metavar="RUN", help="follow an enqueued run (its id is printed by --queue)")
    g.add_argument("--retries", type=int, default=3, help="tries again of a failed or abandoned job (default 3)")
    g.add_argument("--job-timeout", type=int, help="seconds per job (default 600 + 120 per task)")
    add_model_flags(p)
    p.set_defaults(func=cmd_prelabel)

    add_worker_parser(sub)



def cmd_prelabel(args) -> int:
    settings = with_label_studio(args)
    import redis

    try:
        return _prelabel(args, settings)
    except (PrelabelError, LabelStudioError) as err:
        print(f"gem-backend prelabel: {err}", file=sys.stderr)
        return EXIT_ERROR
    except redis.RedisError as err:  # lost mid-run; what was stored stays, a rerun resumes
        print(f"gem-backend prelabel: Redis failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_ERROR


def _finish(summary: Summary, args) -> int:
    print(summary.text(), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w") as fh:
            json.dump(summary.as_dict(), fh, indent=1)
    return summary.exit_code


def _prelabel(args, settings) -> int:
    if args.follow:
        client = connect_redis(settings.redis_url, "--follow")
        with StopFlag() as stop:
            summary = follow_run(client, args.follow, progress=not args.no_progress, stop=stop)
        return _finish(summary, args)
    if args.project is None:
        raise PrelabelError("--project ID is required")
    if args.wait and not args.queue:
        raise PrelabelError("--wait follows queue jobs: use it with --queue")
    if args.batch_size < 1:
        raise PrelabelError("--batch-size must be at least 1")
    ids = parse_ids(args.ids) if args.ids else None
    redis_client = connect_redis(settings.redis_url, "--queue" if args.queue else "prelabel") if (
        args.queue or settings.redis_url) else None
    if not args.queue:  # this process predicts: cores / WORKERS torch threads, or GEM_TORCH_THREADS
        configure_torch_threads(settings, what="prelabel")
    service = GEMService(settings)
    api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key,
                         timeout=(5.0, max(60.0, settings.fetch_timeout)))
    try:
        target, notes = resolve_target(api, service, args.project, extra_params=args.extra_params,
                                       ml_backend=args.ml_backend, ignore_backend_version=args.ignore_backend_version)
        for note in notes:
            print(note, file=sys.stderr)
        selection = select_tasks(api, target, ids=ids, view=args.view, limit=args.limit)
        print(f"project {target.project}: {selection.selected} tasks selected, {selection.already} already have "
              f"model_version {target.model_version}, {len(selection.pending)} to predict", file=sys.stderr, flush=True)
        if args.queue:
            run = enqueue_run(redis_client, args.queue, target, selection, batch_size=args.batch_size,
                              retries=args.retries, job_timeout=args.job_timeout)
            if not args.wait:
                print(f"enqueued {len(selection.pending)} tasks in {run.jobs} jobs on queue {args.queue!r}, run {run.id}; "
                      f"start workers with `gem-backend worker --queue {args.queue}` and follow with "
                      f"`gem-backend prelabel --follow {run.id}`", flush=True)
                return EXIT_OK
            with StopFlag() as stop:
                summary = follow_run(redis_client, run.id, progress=not args.no_progress, stop=stop)
            return _finish(summary, args)
        locks = TaskLocks(redis_client) if redis_client is not None else NO_LOCKS
        with StopFlag() as stop:
            summary = run_local(service, api, target, selection, batch_size=args.batch_size, locks=locks,
                                progress=not args.no_progress, stop=stop)
        return _finish(summary, args)
    except ModelUnavailable as err:
        raise PrelabelError(str(err)) from None
    finally:
        api.close()
