"""``gem-backend learn --project ID``: learn a project's prototypes from the annotations it has.

The same as the backend's ``/webhook`` (:mod:`gem_backend.serving.learner`) for every annotation
the project already holds, read through the Label Studio API; annotations gone from Label Studio
are dropped from the store:

    gem-backend learn --project 3

Label Studio API calls used (1.23): those of :func:`gem_backend.jobs.prelabel.resolve_target`,
then ``GET /api/tasks`` (tasks with annotations, ``fields=task_only``) and
``GET /api/tasks/{id}/annotations/``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from ..labelstudio.api import LabelStudioAPI, LabelStudioError
from ..options import add_label_studio_flags, add_model_flags, with_label_studio
from ..serving.learner import learn_one
from ..serving.prototypes import annotation_key, project_key
from ..serving.service import GEMService, ModelUnavailable
from .prelabel import PrelabelError, progress_bar, resolve_target

log = logging.getLogger(__name__)

__all__ = ["LearnSummary", "learn_project", "add_parser", "cmd_learn"]


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


def learn_project(service: GEMService, api, project: int, *, extra_params: Any = None, ml_backend: int | None = None,
                  progress: bool = False, echo: Callable[[str], None] = print) -> LearnSummary:
    """Learn every annotation of ``project`` (replacing what the store holds for each) and
    remove the stored annotations Label Studio no longer has."""
    target, notes = resolve_target(api, service, project, extra_params=extra_params, ml_backend=ml_backend,
                                   ignore_backend_version=True)
    for note in notes:
        echo(note)
    spec = service.project(target.label_config, target.extra_params)
    pid = project_key(project)
    summary = LearnSummary(int(project), prototypes_on=spec.segmentation.prototypes)
    tasks = list(api.iter_annotated_tasks(project))
    summary.tasks = len(tasks)
    seen: set[str] = set()
    if tasks:
        service.load()
    with progress_bar(len(tasks), progress, desc="learn") as bar:
        for task in tasks:
            for annotation in api.task_annotations(int(task["id"])):
                try:
                    aid = annotation_key(annotation.get("id"))
                except ValueError:
                    summary.skipped.append((annotation.get("id"), "no annotation id"))
                    continue
                seen.add(aid)
                if learn_one(service, spec, pid, task, annotation, summary.skipped) != "skipped":
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
    p = sub.add_parser(
        "learn", help="learn a project's label prototypes from its existing annotations (active learning)",
        description="Read every annotation of a Label Studio project through its API and store its visual "
                    "prototypes (per label, the mean GEM patch feature inside the annotated masks), as the "
                    "backend's /webhook does for new annotations; annotations gone from Label Studio are "
                    "removed. Use the backend's GEM_* settings and REDIS_URL / GEM_STATE_DIR, so that the "
                    "backend reads what this stores. Exit status: 0 done, 1 some annotations skipped, 2 error.")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    add_label_studio_flags(p)
    p.add_argument("--extra-params", help="JSON object of per-project settings instead of the ML backend's")
    p.add_argument("--ml-backend", type=int, help="ML backend id, when the project has several")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", help="also write the summary to this file (JSON)")
    add_model_flags(p)
    p.set_defaults(func=cmd_learn)


def cmd_learn(args) -> int:
    settings = with_label_studio(args)
    try:
        api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key,
                             timeout=(5.0, max(60.0, settings.fetch_timeout)))
    except (PrelabelError, LabelStudioError) as err:
        print(f"gem-backend learn: {err}", file=sys.stderr)
        return 2
    service = GEMService(settings)
    try:
        summary = learn_project(service, api, args.project, extra_params=args.extra_params,
                                ml_backend=args.ml_backend, progress=not args.no_progress,
                                echo=lambda line: print(line, file=sys.stderr))
    except (PrelabelError, LabelStudioError, ModelUnavailable) as err:
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
