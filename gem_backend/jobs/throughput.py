"""Throughput driver of ``gem-backend bench --sections throughput`` (one process per run).

    python -m gem_backend.jobs.throughput --urls FILE --mode predict_tasks|prelabel \
        [--share I/N] [--labels 10] [--barrier DIR]

``predict_tasks``: every URL as one task, all in one :meth:`GEMService.predict_tasks` call.
``prelabel``: the tasks ``I::N`` of the list through :func:`~gem_backend.jobs.prelabel.run_local`
(the bulk path: predict in batches, check, store) against :class:`MemoryLabelStudio`, an
in-memory stand-in for Label Studio's API (no Label Studio server: the stores are JSON-encoded
as the real client would send them, then kept in memory), as one of ``N`` worker processes.
Settings (model, precision, threads: ``WORKERS``/``GEM_TORCH_THREADS``) come from the
environment. Prints one JSON line: images, seconds (after the model is loaded and warm),
images per second, start/end wall-clock times, threads, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from ..labelstudio.api import LabelStudioAPI
from ..serving.service import GEMService
from ..settings import Settings, configure_torch_threads
from .prelabel import Selection, Target, run_local


class MemoryLabelStudio(LabelStudioAPI):
    """The API calls of a prelabel run, answered from memory."""

    def __init__(self):
        super().__init__("http://label-studio.invalid", "token")
        self.stored: dict[int, str] = {}
        self.bytes_sent = 0

    def has_version(self, task: int, model_version: str) -> bool:
        return self.stored.get(int(task)) == model_version

    def import_predictions(self, project: int, predictions: list[dict]) -> int | None:
        self.bytes_sent += len(json.dumps(predictions))  # what the real client puts on the wire
        for item in predictions:
            self.stored[int(item["task"])] = item["model_version"]
        return len(predictions)


def config(labels: int) -> str:
    names = "".join(f'<Label value="label {i}"/>' for i in range(labels))
    return (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{names}'
            f'</BrushLabels></View>')


def _wait(barrier: str | None, share: str) -> None:
    """Start together with the other processes of the run (files in ``barrier``)."""
    if not barrier:
        return
    index, total = (int(v) for v in share.split("/"))
    Path(barrier, f"ready-{index}").touch()
    deadline = time.monotonic() + 600
    while len(list(Path(barrier).glob("ready-*"))) < total and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--urls", required=True, help="file with one image URL per line")
    ap.add_argument("--mode", choices=["predict_tasks", "prelabel"], required=True)
    ap.add_argument("--share", default="0/1", help="I/N: this process takes tasks I::N")
    ap.add_argument("--labels", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8, help="prelabel batch (tasks per store)")
    ap.add_argument("--barrier", help="folder: start when all N processes are ready")
    a = ap.parse_args(argv)
    settings = Settings.from_env()
    threads, _ = configure_torch_threads(settings, what=f"throughput {a.mode} {a.share}")
    index, total = (int(v) for v in a.share.split("/"))
    urls = [u for u in Path(a.urls).read_text().split() if u][index::total]
    tasks = [{"id": 1000 * index + i + 1, "data": {"image": u}} for i, u in enumerate(urls)]
    service = GEMService(settings)
    service.load()
    spec = service.project(config(a.labels), {"threshold": 0, "min_area": 0})
    # warm: text embeddings, lazy imports, a forward of each input size is not needed for timing
    service.predict_tasks([{"id": 0, "data": {"image": urls[0]}}], None, spec=spec)
    service.image_cache.clear_local()
    _wait(a.barrier, a.share)
    started, wall_start = time.perf_counter(), time.time()
    if a.mode == "predict_tasks":
        preds = service.predict_tasks(tasks, None, spec=spec)
        done = sum(1 for p in preds if p["result"])
    else:
        api = MemoryLabelStudio()
        target = Target(1, config(a.labels), {"threshold": 0, "min_area": 0}, spec.model_version)
        summary = run_local(service, api, target, Selection(len(tasks), tasks, 0), batch_size=a.batch_size,
                            progress=False)
        done = len(api.stored)
        if summary.error:
            raise SystemExit(f"prelabel run failed: {summary.error}")
    seconds = time.perf_counter() - started
    print(json.dumps(dict(mode=a.mode, share=a.share, images=len(tasks), done=done, seconds=seconds,
                          images_per_s=len(tasks) / seconds, start=wall_start, end=time.time(),
                          threads=threads, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          pid=os.getpid())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
