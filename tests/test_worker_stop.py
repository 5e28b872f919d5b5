"""``gem-backend worker`` stopping and refusing to start, as a deployment sees it.

- SIGTERM while Redis is down or hung stops the worker within seconds, idle or busy, and the job
  it was running is not lost: after Redis comes back (from its append-only file) another worker
  re-queues and runs it.
- Settings that keep a worker from working (no Label Studio key or URL, no REDIS_URL, a bad
  GEM_* value) are reported once; with ``--wait-on-config-error`` the worker then waits for its
  stop instead of exiting into a restart loop, and exits 78 either way.

Workers are real subprocesses with the golden small CLIP; jobs are :mod:`worker_jobs` (no
Label Studio needed); Redis is a ``redis-server`` of each test's own with ``appendfsync always``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import GOLDEN

ROOT = Path(__file__).resolve().parents[1]
GEM_ENV = {"GEM_MODEL": str(GOLDEN / "config.json"), "GEM_PRETRAINED": str(GOLDEN / "weights.safetensors"),
           "GEM_DEVICE": "cpu", "GEM_INPUT_SIZE": "64", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AOFRedis:
    """A redis-server persisting every write to its append-only file; restartable on one port."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, (self.folder / "redis.log").read_text()[-2000:]
                time.sleep(0.05)

    def kill(self) -> None:  # a crash: what the append-only file holds is what comes back
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def aof_redis(tmp_path):
    server = AOFRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _worker_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEM_", "LABEL_STUDIO_", "REDIS_URL"))}
    env.update(GEM_ENV, LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="not-used-by-these-jobs",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "tests"))
    env.update(extra)
    return env


@contextlib.contextmanager
def _worker(log: Path, env: dict, *args: str):
    """A ``gem-backend worker`` subprocess logging to ``log``; killed on the way out if still running."""
    proc = subprocess.Popen([sys.executable, "-m", "gem_backend.cli", "worker", "--heartbeat-interval", "1",
                             "--abandon-after", "3", "--maintenance-interval", "1", *args],
                            env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _wait_for(what: str, check, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout} s; log:\n" + log.read_text()[-3000:]
        time.sleep(0.1)


def _idle(url: str, name: str) -> bool:
    """The worker is registered and waiting for jobs (past its start-up)."""
    import redis
    from rq.worker import Worker

    return any(w.name == name and w.get_state() == "idle" for w in Worker.all(connection=redis.Redis.from_url(url)))


def _stop_and_time(proc: subprocess.Popen, log: Path, limit: float = 10) -> tuple[int, float]:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(limit + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("worker still running 40 s after SIGTERM; log:\n" + log.read_text()[-3000:])
    return code, time.monotonic() - start


@pytest.mark.parametrize("outage", ["stopped", "hung"])
def test_idle_worker_stops_promptly_while_redis_is_out(aof_redis, tmp_path, outage):
    log = tmp_path / "worker.log"
    with _worker(log, _worker_env(REDIS_URL=aof_redis.url), "--name", "idle") as proc:
        _wait_for("the worker waits for jobs", lambda: _idle(aof_redis.url, "idle"), log)
        if outage == "stopped":
            aof_redis.kill()  # connections are refused
        else:
            os.kill(aof_redis.proc.pid, signal.SIGSTOP)  # connections open, nothing answers
        time.sleep(2.5)  # the worker is in its reconnect loop / blocked on a read
        code, took = _stop_and_time(proc, log)
    text = log.read_text()
    assert took < 10, f"stopped {took:.1f} s after SIGTERM\n" + text[-3000:]
    assert code == 0, f"exit status {code}\n" + text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_busy_worker_stops_promptly_when_redis_dies_and_the_job_is_run_later(aof_redis, tmp_path):
    import redis
    from rq import Queue, Retry
    from rq.job import Job
    from rq.registry import StartedJobRegistry

    from gem_backend.jobs.worker import DEFAULT_QUEUE
    from gem_backend.jobs.worker import _serializer as serializer  # the workers' own (JSON)

    client = redis.Redis.from_url(aof_redis.url)
    folder = tmp_path / "job"
    folder.mkdir()
    job = Queue(DEFAULT_QUEUE, connection=client, serializer=serializer()).enqueue(
        "worker_jobs.first_run_blocks", str(folder), retry=Retry(max=2), job_timeout=600)
    log1 = tmp_path / "w1.log"
    with _worker(log1, _worker_env(REDIS_URL=aof_redis.url), "--name", "w1") as w1:
        _wait_for("w1 starts the job", (folder / "started").exists, log1)
        time.sleep(1.5)  # a heartbeat or two of the running job reach Redis
        aof_redis.kill()
        code, took = _stop_and_time(w1, log1)
    text = log1.read_text()
    assert took < 10, f"w1 stopped {took:.1f} s after SIGTERM\n" + text[-3000:]
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert f"Job {job.id} stays in the started registry" in text, text[-3000:]

    aof_redis.start()  # from the append-only file
    client = redis.Redis.from_url(aof_redis.url)
    queue = Queue(DEFAULT_QUEUE, connection=client, serializer=serializer())
    assert job.id in StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)  # kept, not lost
    time.sleep(3.5)  # past abandon_after since w1's last heartbeat
    log2 = tmp_path / "w2.log"
    with _worker(log2, _worker_env(REDIS_URL=aof_redis.url), "--name", "w2", "--burst") as w2:
        assert w2.wait(120) == 0, log2.read_text()[-3000:]
    assert (folder / "finished").exists(), log2.read_text()[-3000:]
    again = Job.fetch(job.id, connection=client, serializer=serializer())
    assert again.get_status().value == "finished" and again.retries_left == 1, (again.get_status(),
                                                                                 again.retries_left)


CONFIG_PROBLEMS = {
    "no API key": ({"LABEL_STUDIO_API_KEY": ""}, "no Label Studio API key: set LABEL_STUDIO_API_KEY"),
    "no URL": ({"LABEL_STUDIO_URL": ""}, "no Label Studio URL: set LABEL_STUDIO_URL"),
    "no REDIS_URL": ({"REDIS_URL": ""}, "it needs Redis: set REDIS_URL"),
    "bad setting": ({"GEM_THRESHOLD": "high"}, "GEM_THRESHOLD"),
}


@pytest.mark.parametrize("problem", list(CONFIG_PROBLEMS))
def test_a_config_problem_is_reported_once_and_waits_instead_of_looping(tmp_path, problem):
    change, message = CONFIG_PROBLEMS[problem]
    env = _worker_env(**{"REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0", **change})  # never reached
    log = tmp_path / "worker.log"
    with _worker(log, env, "--wait-on-config-error") as proc:
        _wait_for("the problem is reported", lambda: message in log.read_text(), log, timeout=60)
        time.sleep(3)
        assert proc.poll() is None, "exited instead of waiting:\n" + log.read_text()
        code, took = _stop_and_time(proc, log)
    text = log.read_text()
    assert code == 78 and took < 5, (code, took, text)
    assert text.count(message) == 1, text
    assert "Traceback" not in text and "Connection refused" not in text, text

    # without the flag (a terminal, a supervisor that should see it fail): the same report, exit 78 at once
    plain = subprocess.run([sys.executable, "-m", "gem_backend.cli", "worker"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 78, plain.stderr
    assert plain.stderr.count(message) == 1, plain.stderr


def test_compose_runs_the_workers_with_the_wait_and_a_restart_policy_that_comes_back():
    import yaml

    from gem_backend.cli import build_parser

    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prelabel-worker"]
    command = service["command"]
    assert command[0] == "gem-backend"
    args = build_parser().parse_args(command[1:])  # the flags exist as written
    assert args.func.__name__ == "cmd_worker" and args.wait_on_config_error
    assert service["restart"] == "unless-stopped"
