"""Bulk pre-labeling against a real Label Studio 1.23 (the rig of ../shared/label-studio) and a real Redis.

One Label Studio serves the whole module (started from the rig's prebuilt data dir on a free
port, as ``e2e.sh`` does). Each test makes its own project of small uploaded PNGs, so task
images are ``/data/upload/...`` URLs fetched with the API key. The model is the fixed small CLIP
of the golden reference at a 64 px input (threshold 0: it labels something on any image).

Where a run must last long enough to be interrupted or to kill a worker in the middle of a job,
the processes talk to Label Studio through :class:`SlowProxy`, which delays image downloads.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageDraw

from helpers import GOLDEN, shared_path

ROOT = Path(__file__).resolve().parents[1]
RIG = Path(os.environ.get("RIG", ROOT / ".label-studio-rig"))
TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')
GEM_ENV = {
    "GEM_MODEL": str(GOLDEN / "config.json"), "GEM_PRETRAINED": str(GOLDEN / "weights.safetensors"),
    "GEM_THRESHOLD": "0", "GEM_MIN_AREA": "0", "GEM_DEVICE": "cpu", "GEM_INPUT_SIZE": "64",
    "OMP_NUM_THREADS": "1",  # 2 cores shared with Label Studio and a second worker
}
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(i: int) -> bytes:
    im = Image.new("RGB", (64, 48), (20 + i % 50, 30, 30))
    ImageDraw.Draw(im).rectangle([i % 24, 6, 30 + i % 24, 36], fill=(220, 40 + i % 100, 40))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------- Label Studio
class LabelStudio:
    """A running Label Studio with helpers to build projects and read predictions back."""

    def __init__(self, url: str):
        self.url = url
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Token {TOKEN}"
        self.s.trust_env = False

    def req(self, method: str, path: str, **kw):
        r = self.s.request(method, self.url + path, timeout=60, **kw)
        assert r.status_code in (200, 201), f"{method} {path} -> {r.status_code}: {r.text[:300]}"
        return r.json()

    def project(self, n: int, *, broken: int = 0, title: str = "prelabel test") -> tuple[int, list[int]]:
        """A project with ``n`` uploaded 64x48 PNGs (+ ``broken`` uploads that are not images)."""
        pid = self.req("POST", "/api/projects", json={"title": title, "label_config": CONFIG})["id"]
        files = {f"f{i:03d}": (f"img{i:03d}.png", _png(i), "image/png") for i in range(n)}
        files.update({f"b{i}": (f"broken{i}.png", b"not a png at all", "image/png") for i in range(broken)})
        imported = self.req("POST", f"/api/projects/{pid}/import", files=files)
        assert imported["task_count"] == n + broken, imported
        return pid, self.task_ids(pid)

    def task_ids(self, pid: int) -> list[int]:
        tasks = self.req("GET", "/api/tasks", params={"project": pid, "page_size": 1000, "fields": "task_only"})
        return sorted(t["id"] for t in tasks["tasks"])

    def predictions(self, pid: int) -> dict[int, list[dict]]:
        """task id -> its predictions, for every task of the project."""
        out: dict[int, list[dict]] = {t: [] for t in self.task_ids(pid)}
        for p in self.req("GET", "/api/predictions", params={"project": pid}):
            out.setdefault(p["task"], []).append(p)
        return out

    def versions(self, pid: int) -> dict[int, list[str]]:
        return {t: [p["model_version"] for p in preds] for t, preds in self.predictions(pid).items()}


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    binary = RIG / "venv" / "bin" / "label-studio"
    template = RIG / "lsdata-template"
    shared_path("label-studio", "e2e.sh")
    if not binary.exists() or not (template / "label_studio.sqlite3").exists():
        pytest.fail(f"no Label Studio rig in {RIG} (needs venv/bin/label-studio and lsdata-template): run "
                    f"`RIG={RIG} bash ../shared/label-studio/setup_rig.sh` and "
                    f"`bash ../shared/label-studio/e2e.sh --dummy http://127.0.0.1:9191` once (scripts/test.sh does it)")
    work = tmp_path_factory.mktemp("ls")
    data = work / "lsdata"
    shutil.copytree(template, data, symlinks=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **NO_PROXY,
           "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false", "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
           "LABEL_STUDIO_HOST": url, "LABEL_STUDIO_LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "",
           "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    log_path = work / "ls.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                 str(port), "--data-dir", str(data), "--log-level", "WARNING"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio not up after 240 s:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield LabelStudio(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class SlowProxy:
    """Forwards everything to Label Studio; image downloads (``/data/upload/``) wait ``delay`` s."""

    def __init__(self, upstream: str, delay: float):
        session = requests.Session()
        session.trust_env = False

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                if self.path.startswith("/data/upload/"):
                    time.sleep(delay)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                r = session.request(self.command, upstream + self.path, headers=headers, data=body,
                                    allow_redirects=False, timeout=120)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients killed by the tests drop their connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def slow_ls(label_studio):
    proxy = SlowProxy(label_studio.url, delay=0.3)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def connected_backend(label_studio, tmp_path_factory):
    """The real backend app (model not loaded: /health and /setup need none) on a free port,
    for connecting to projects; yields its URL."""
    from werkzeug.serving import make_server

    from gem_backend.serving.app import create_app
    from gem_backend.settings import Settings

    settings = Settings.from_env({**GEM_ENV, "GEM_STATE_DIR": str(tmp_path_factory.mktemp("state"))})
    server = make_server("127.0.0.1", 0, create_app(settings, load_model=False), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """In-process predictions: one thread, as the subprocesses (OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(ls_url: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEM_", "LABEL_STUDIO_", "REDIS_URL"))}
    env.update(NO_PROXY)
    env.update(GEM_ENV, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=TOKEN, PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gem_backend.cli", *args]


def _run(args, env, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _main_in_process(monkeypatch, ls_url: str, *args: str, **extra_env) -> int:
    """``gem-backend ...`` in this process (no interpreter start-up), with the test env."""
    from gem_backend import cli

    for k in list(os.environ):
        if k.startswith(("GEM_", "LABEL_STUDIO_")) or k == "REDIS_URL":
            monkeypatch.delenv(k)
    for k, v in _env(ls_url, **extra_env).items():
        if k.startswith(("GEM_", "LABEL_STUDIO_")) or k == "REDIS_URL":
            monkeypatch.setenv(k, v)
    return cli.main(list(args))


def _connect(ls: LabelStudio, pid: int, backend_url: str, extra_params: dict) -> dict:
    ml = ls.req("POST", "/api/ml", json={"url": backend_url, "project": pid, "title": "gem",
                                         "extra_params": json.dumps(extra_params)})
    assert ml.get("state") == "CO", ml
    return ml


def _assert_one_each(ls: LabelStudio, pid: int, version: str, tasks=None) -> None:
    preds = ls.predictions(pid)
    tasks = list(preds) if tasks is None else tasks
    wrong = {t: [p["model_version"] for p in preds[t]] for t in tasks
             if [p["model_version"] for p in preds[t]] != [version]}
    assert not wrong, f"tasks without exactly one prediction of {version}: {wrong}"
    for t in tasks:
        result = preds[t][0]["result"]
        assert result and result[0]["type"] == "brushlabels" and result[0]["value"]["rle"], preds[t][0]


# ----------------------------------------------------------------------------------- unit parts
def test_parse_ids():
    from gem_backend.jobs.prelabel import PrelabelError, parse_ids

    assert parse_ids("3, 1,5-7 3") == [3, 1, 5, 6, 7]
    for bad in ("", "a", "5-3", "1,,x"):
        with pytest.raises(PrelabelError):
            parse_ids(bad)


def test_recorded_done_is_never_downgraded(redis_url):
    import redis

    from gem_backend.jobs.prelabel import Outcome
    from gem_backend.jobs.worker import RunKeys, record_outcome

    client = redis.Redis.from_url(redis_url)
    record_outcome(client, "r1", Outcome(5, "failed", "timeout"))
    record_outcome(client, "r1", Outcome(5, "done"))
    record_outcome(client, "r1", Outcome(5, "skipped", "stored meanwhile"))  # the retry of a killed job
    record_outcome(client, "r1", Outcome(6, "skipped", "had it"))
    keys = RunKeys("r1")
    assert client.hget(keys.tasks, "5") == b"done\t"
    assert {k.decode(): int(v) for k, v in client.hgetall(keys.counts).items()} == {"done": 1, "skipped": 1,
                                                                                    "failed": 0}
    assert 0 < client.ttl(keys.tasks) <= 7 * 24 * 3600


# ----------------------------------------------------------------------------------- single process
def test_single_process_prelabels_every_task_once_and_rerun_stores_nothing(label_studio, connected_backend,
                                                                           tmp_path, monkeypatch, capsys):
    ls = label_studio
    pid, tasks = ls.project(32)
    assert len(tasks) == 32
    ml = _connect(ls, pid, connected_backend, {"min_area": 0.0001})
    version = ml["model_version"]  # what the backend's /setup answered for this project's extra_params
    from gem_backend.settings import Settings

    assert version.startswith("gem-") and version != Settings.from_env(GEM_ENV).model_version()

    out = tmp_path / "first.json"
    proc = _run(["prelabel", "--project", str(pid), "--batch-size", "8", "--summary-json", str(out)], _env(ls.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    first = _summary(out)
    assert (first["done"], first["skipped"], first["failed"], first["selected"]) == (32, 0, [], 32), first
    assert first["model_version"] == version
    assert "32 done, 0 skipped" in proc.stdout
    assert "task/s" in proc.stderr or "s/task" in proc.stderr, proc.stderr[-2000:]  # the progress bar
    _assert_one_each(ls, pid, version, tasks)

    out = tmp_path / "second.json"
    rc = _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--summary-json", str(out))
    assert rc == 0
    second = _summary(out)
    assert (second["done"], second["skipped"], second["failed"]) == (0, 32, []), second
    assert "0 done, 32 skipped" in capsys.readouterr().out
    _assert_one_each(ls, pid, version, tasks)

    from gem_backend.jobs.prelabel import LabelStudioAPI

    api = LabelStudioAPI(ls.url, TOKEN)  # pagination: 7 pages of 5
    assert [t["id"] for t in api.iter_tasks(pid, page_size=5)] == tasks
    assert api.task_ids_with_version(pid, version) == set(tasks)


def test_settings_other_than_the_backends_are_refused(label_studio, connected_backend, monkeypatch, capsys):
    ls = label_studio
    pid, tasks = ls.project(2)
    _connect(ls, pid, connected_backend, {"threshold": 0})
    # a setting the project's extra_params do not override differs from the backend's
    rc = _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--min-area", "0.01")
    err = capsys.readouterr().err
    assert rc == 2 and "reports model_version" in err and "--ignore-backend-version" in err, err
    assert ls.versions(pid) == {t: [] for t in tasks}
    # the project's extra_params override the process's settings, as in the backend
    rc = _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--no-progress", "--threshold", "0.5")
    assert rc == 0, capsys.readouterr()


def test_limit_ids_and_view(label_studio, monkeypatch, tmp_path):
    ls = label_studio
    pid, tasks = ls.project(6)
    from gem_backend.settings import Settings

    version = Settings.from_env(GEM_ENV).model_version()  # no backend connected: this process's settings
    s = tmp_path / "s.json"

    def run(*args) -> dict:
        rc = _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--no-progress",
                              "--summary-json", str(s), *args)
        summary = _summary(s)
        assert rc == 0 and summary["failed"] == [], summary
        return summary

    first = run("--limit", "2")
    assert (first["done"], first["selected"]) == (2, 6)
    stored = [t for t, v in ls.versions(pid).items() if v]
    assert stored == tasks[:2]  # Data Manager order

    second = run("--ids", f"{tasks[0]},{tasks[4]}-{tasks[5]},999999")
    assert (second["done"], second["skipped"], second["selected"], second["missing_ids"]) == (2, 1, 3, [999999])
    assert sorted(t for t, v in ls.versions(pid).items() if v) == sorted(tasks[:2] + tasks[4:])

    view = ls.req("POST", "/api/dm/views", json={"project": pid, "data": {"title": "middle", "filters": {
        "conjunction": "and", "items": [{"filter": "filter:tasks:id", "operator": "in", "type": "Number",
                                         "value": {"min": tasks[1], "max": tasks[3]}}]}}})
    third = run("--view", str(view["id"]))
    assert (third["done"], third["skipped"], third["selected"]) == (2, 1, 3)

    fourth = run()
    assert (fourth["done"], fourth["skipped"]) == (0, 6)
    _assert_one_each(ls, pid, version, tasks)


def test_broken_tasks_are_reported_failed_and_the_others_done(label_studio, monkeypatch, tmp_path, capsys):
    ls = label_studio
    pid, _ = ls.project(3, broken=1)
    ls.req("POST", f"/api/projects/{pid}/import", json=[{"data": {"image": f"/data/upload/{pid}/gone.png"}}])
    # mixed data fields (Label Studio's import checks the key, an edit of the task does not): no image
    # key, an empty and a non-string image value
    before = set(ls.task_ids(pid))
    ls.req("POST", f"/api/projects/{pid}/import", json=[{"data": {"image": f"/data/upload/{pid}/x{i}.png"}}
                                                        for i in range(3)])
    for task, data in zip(sorted(set(ls.task_ids(pid)) - before), ({"img": "/x.png"}, {"image": ""}, {"image": 7})):
        ls.req("PATCH", f"/api/tasks/{task}", json={"data": data})
    tasks = ls.task_ids(pid)
    s = tmp_path / "s.json"
    rc = _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--no-progress",
                          "--summary-json", str(s))
    out = capsys.readouterr().out
    summary = _summary(s)
    assert rc == 1 and summary["done"] == 3, (rc, summary)
    reasons = {f["task"]: f["reason"] for f in summary["failed"]}
    assert len(reasons) == 5, reasons
    assert any("not an image" in r and "plain text" in r for r in reasons.values()), reasons
    assert any(r.startswith("HTTP ") and "gone.png" in r for r in reasons.values()), reasons  # LS answers 500
    assert sum("data.image" in r for r in reasons.values()) == 3, reasons  # the key each task lacks or misuses
    assert "5 failed" in out and "failed:" in out and "not an image" in out, out
    versions = ls.versions(pid)
    assert all(versions[t] == [] for t in reasons)  # a failed task gets no (empty) prediction
    assert sum(1 for t in tasks if versions[t]) == 3


def test_concurrent_stores_of_one_task_store_it_once(label_studio, redis_url):
    """Two processes predicting the same task (a retried job whose first worker is alive after
    all): both pass the first check, the per-task lock and the re-check keep one store."""
    import redis

    from gem_backend.labelstudio.results import prediction
    from gem_backend.jobs.prelabel import LabelStudioAPI, TaskLocks, Target, predict_and_store
    from gem_backend.serving.service import GEMService
    from gem_backend.settings import Settings

    ls = label_studio
    pid, tasks = ls.project(2)
    real = GEMService(Settings.from_env(GEM_ENV))
    spec = real.project(CONFIG, {})

    class SlowService:  # the real spec; a canned prediction after a pause, so both runs overlap
        def project(self, *a, **kw):
            return spec

        def predict_stream(self, tasks, spec):
            for task in tasks:
                time.sleep(0.5)
                yield task, prediction([], spec.model_version)

    target = Target(pid, CONFIG, {}, spec.model_version)
    api = LabelStudioAPI(ls.url, TOKEN)
    locks = TaskLocks(redis.Redis.from_url(redis_url))
    results, barrier = [], threading.Barrier(2)

    def one():
        barrier.wait()
        results.append(predict_and_store(SlowService(), api, target, [{"id": tasks[0], "data": {"image": "/x.png"}}],
                                         locks=locks)[0].status)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["done", "skipped"]
    assert ls.versions(pid)[tasks[0]] == [spec.model_version]


def test_sigint_stops_after_the_current_batch(label_studio, slow_ls, tmp_path, monkeypatch, capsys):
    ls = label_studio
    pid, tasks = ls.project(12)
    from gem_backend.settings import Settings

    version = Settings.from_env(GEM_ENV).model_version()
    out = tmp_path / "interrupted.json"
    proc = subprocess.Popen(_cli("prelabel", "--project", str(pid), "--batch-size", "4", "--summary-json", str(out)),
                            env=_env(slow_ls.url), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(ls.versions(pid).values()):  # the first batch is stored
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no batch stored in 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr[-3000:]
    assert "stopping after the current batch" in stderr and "interrupted:" in stdout, stdout + stderr[-2000:]
    summary = _summary(out)
    stored = sum(1 for v in ls.versions(pid).values() if v)
    assert summary["interrupted"] and summary["done"] == stored and summary["failed"] == [], summary
    assert 0 < stored < 12 and stored % 4 == 0, stored  # whole batches only
    assert summary["not_processed"] == 12 - stored

    s = tmp_path / "resumed.json"
    rc = _main_in_process(monkeypatch, ls.url, "prelabel", "--project", str(pid), "--no-progress",
                          "--summary-json", str(s))
    resumed = _summary(s)
    assert rc == 0 and (resumed["done"], resumed["skipped"]) == (12 - stored, stored), resumed
    _assert_one_each(ls, pid, version, tasks)


# ----------------------------------------------------------------------------------- queue
def _start_worker(name: str, env: dict, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")
    try:
        return subprocess.Popen(
            _cli("worker", "--name", name, "--heartbeat-interval", "1", "--abandon-after", "5",
                 "--maintenance-interval", "2"),
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # own process group: SIGKILL takes all of it, like a lost machine
    finally:
        log.close()


def test_queue_with_two_workers_one_killed_mid_run(label_studio, slow_ls, redis_url, tmp_path):
    from datetime import datetime, timezone

    import redis
    from rq import Queue
    from rq.executions import Execution
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.worker import Worker

    from gem_backend.settings import Settings
    from gem_backend.jobs.worker import _serializer

    ls = label_studio
    pid, tasks = ls.project(32)
    version = Settings.from_env(GEM_ENV).model_version()
    client = redis.Redis.from_url(redis_url)
    worker_env = _env(slow_ls.url, REDIS_URL=redis_url)
    workers = {name: _start_worker(name, worker_env, tmp_path) for name in ("w1", "w2")}
    logs = lambda: "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text(errors="replace")[-3000:]
                             for n in workers)
    follower = None
    try:
        deadline = time.monotonic() + 120
        while len(Worker.all(connection=client)) < 2:
            assert all(p.poll() is None for p in workers.values()), logs()
            assert time.monotonic() < deadline, "workers did not register in 120 s\n" + logs()
            time.sleep(0.2)
        out = tmp_path / "queue.json"
        follower = subprocess.Popen(
            _cli("prelabel", "--project", str(pid), "--queue", "--wait", "--batch-size", "4", "--retries", "3",
                 "--summary-json", str(out)),
            env=_env(ls.url, REDIS_URL=redis_url), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        # once the run has stored something, kill w1 (its whole process group) in the middle of a job
        deadline = time.monotonic() + 120
        while True:
            assert follower.poll() is None, follower.communicate()
            assert time.monotonic() < deadline, "w1 never ran a job\n" + logs()
            if any(ls.versions(pid).values()):
                w1 = Worker.find_by_key(Worker.redis_worker_namespace_prefix + "w1", connection=client,
                                        serializer=_serializer())
                job_id = w1.get_current_job_id() if w1 is not None else None
                job = Job.fetch(job_id, connection=client, serializer=_serializer()) if job_id else None
                if job is not None and job.started_at is not None and \
                        (datetime.now(timezone.utc) - job.started_at).total_seconds() > 0.4:
                    os.killpg(workers["w1"].pid, signal.SIGKILL)
                    workers["w1"].wait(10)
                    break
            time.sleep(0.05)
        # the job(s) w1 was running when it died, as RQ sees them
        queue = Queue("gem-prelabel", connection=client, serializer=_serializer())
        abandoned = [jid for jid, eid in StartedJobRegistry(queue=queue).get_job_and_execution_ids(cleanup=False)
                     if Execution.fetch(eid, jid, connection=client).worker_name == "w1"]
        assert len(abandoned) == 1, abandoned
        stdout, stderr = follower.communicate(timeout=180)
        assert follower.returncode == 0, stdout + stderr[-3000:] + logs()
        summary = _summary(out)
        assert summary["failed"] == [] and summary["done"] + summary["skipped"] == 32, summary
        assert summary["run"] and "32 selected" in stdout
        _assert_one_each(ls, pid, version, tasks)
        # RQ's abandoned-job handling put it back on the queue (one retry used) and w2 ran it
        job = Job.fetch(abandoned[0], connection=client, serializer=_serializer())
        assert job.get_status().value == "finished" and job.retries_left == 2, (job.get_status(), job.retries_left)
        assert abandoned[0] in (tmp_path / "w2.log").read_text(), logs()

        # a rerun enqueues nothing and stores nothing
        out2 = tmp_path / "queue2.json"
        proc = _run(["prelabel", "--project", str(pid), "--queue", "--wait", "--summary-json", str(out2)],
                    _env(ls.url, REDIS_URL=redis_url))
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        again = _summary(out2)
        assert (again["done"], again["skipped"], again["failed"]) == (0, 32, []), again
        _assert_one_each(ls, pid, version, tasks)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
