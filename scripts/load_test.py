#!/usr/bin/env python
"""Load test of the ML backend on this machine, loopback only, bounded, self-stopping.

    .venv/bin/python scripts/load_test.py [--streams 8] [--duration 60] [--out summary.json]

Starts everything it talks to, on 127.0.0.1 only:

- a small image server playing Label Studio's ``/data/upload/`` (it wants the API key),
- ``gem-backend serve`` (gunicorn, gthread) with the fixed small CLIP of the golden reference
  (``../shared/golden/gem-reference``, or ``--model``/``--pretrained``), pointed at it,

then runs ``--streams`` concurrent ``/predict`` streams for ``--duration`` seconds while one
more client polls ``/health`` every ``--health-interval`` s, and samples the resident memory
(RSS) of the server's processes. Each ``/predict`` carries 1 to 3 tasks (photo-like JPEGs and
PNGs of several sizes, one in ten a missing image, label sets that vary) and must answer 200
with one prediction per task; anything else is a failed request.

Bounds: at most ``--max-requests`` ``/predict`` calls and ``--duration`` seconds (capped at
600); a watchdog ends the process ``--duration`` + 180 s after the start whatever happens;
the server is stopped (its own process group only) on every exit path.

Prints (and with ``--out`` writes) a JSON summary: requests, failures (with the first few
reasons), ``/predict`` and ``/health`` latency p50/p99/max, and the RSS of the server
(gunicorn master + worker): at start, the median of the first and of the last window
(<= 10 s) after the warm-up (``--warmup`` s), their difference (the growth), the slope after
the warm-up, the maximum, and samples every 0.5 s.
Exit status 1 when a request failed or ``--check`` limits are exceeded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden" / "gem-reference"
LOOPBACK = "127.0.0.1"
MAX_DURATION = 600.0
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}'
          '</BrushLabels></View>')
LABEL_SETS = (("cat", "dog"), ("person", "car", "tree"), ("sky", "road", "building", "grass"),
              ("bird", "boat", "water"), ("chair", "table", "sofa", "plant", "tv"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


def latency_summary(values: list[float]) -> dict:
    return {"count": len(values), "p50_s": percentile(values, 50), "p99_s": percentile(values, 99),
            "max_s": max(values) if values else None}


# ------------------------------------------------------------------------------ images
def synthetic_images(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """Photo-like pictures (smooth gradients, blobs, noise) in JPEG and PNG of a few sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for i, (w, h, fmt) in enumerate([(640, 480, "JPEG"), (1024, 768, "JPEG"), (500, 375, "PNG"),
                                      (1600, 1200, "JPEG"), (320, 640, "PNG")]):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            base[inside] = rng.uniform(0, 255, 3)
        base += rng.normal(0, 8, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        ext = "jpg" if fmt == "JPEG" else "png"
        out[f"img{i}.{ext}"] = (buf.getvalue(), f"image/{ext.replace('jpg', 'jpeg')}")
    return out


class ImageServer:
    """Label Studio's ``/data/upload/1/<name>`` on 127.0.0.1: 401 without ``Token <key>``."""

    def __init__(self, files: dict[str, tuple[bytes, str]], api_key: str):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.headers.get("Authorization") != f"Token {api_key}":
                    return self._send(401, b'{"detail": "no credentials"}', "application/json")
                entry = owner.files.get(self.path.rsplit("/", 1)[-1])
                if entry is None:
                    return self._send(404, b"<html><body>Not found</body></html>", "text/html")
                self._send(200, *entry)

            def _send(self, status, data, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client dropping a keep-alive connection (after a 404) is not news

        self.files = files
        self.httpd = Server((LOOPBACK, 0), Handler)
        self.url = f"http://{LOOPBACK}:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------ server
def server_env(model: str, pretrained: str, port: int, state_dir: str, **extra: str) -> dict[str, str]:
    """Environment of a ``gem-backend serve`` on 127.0.0.1:``port``, nothing inherited that
    could change the model or send it elsewhere (GEM_*, LABEL_STUDIO_*, REDIS_URL, proxies)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GEM_", "LABEL_STUDIO_", "BASIC_AUTH_"))
           and k not in ("REDIS_URL", "WORKERS", "THREADS", "PORT", "HOST", "LOG_LEVEL")
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({"GEM_MODEL": model, "GEM_PRETRAINED": pretrained, "GEM_DEVICE": "cpu", "HOST": LOOPBACK,
                "PORT": str(port), "GEM_STATE_DIR": state_dir, "LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_server(env: dict[str, str], log_path: str) -> subprocess.Popen:
    """``gem-backend serve`` in a process group of its own (stopped with :func:`stop_server`)."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "gem_backend.cli", "serve"], cwd=str(ROOT), env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()


def wait_until_loaded(base: str, proc: subprocess.Popen, timeout: float = 180.0, auth=None) -> dict:
    """Wait for ``/health`` to report the model loaded; raises RuntimeError otherwise."""
    import requests

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            r = requests.get(f"{base}/health", timeout=2, auth=auth)
            last = r.json()
            if last.get("model") == "loaded":
                return last
            if last.get("model") == "error":
                raise RuntimeError(f"model did not load: {last.get('error')}")
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"model not loaded after {timeout:.0f} s (last /health: {last})")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (gunicorn master and workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split())
        except OSError:
            pass
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_s = f"{mem / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        mem_s = "?"
    return f"{os.cpu_count()} CPUs ({cpu}), {mem_s} RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


# ------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> dict:
    import requests

    duration = min(float(args.duration), MAX_DURATION)
    api_key = "lt-" + "".join(random.choice("0123456789abcdef") for _ in range(40))
    files = synthetic_images()
    images = ImageServer(files, api_key)
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    work = tempfile.mkdtemp(prefix="gem-load-")
    log_path = os.path.join(work, "server.log")
    env = server_env(args.model, args.pretrained, port, os.path.join(work, "state"),
                     LABEL_STUDIO_URL=images.url, LABEL_STUDIO_API_KEY=api_key, GEM_INPUT_SIZE=str(args.input_size),
                     WORKERS=str(args.workers), THREADS=str(args.threads))
    started_at = time.monotonic()
    proc = start_server(env, log_path)
    summary: dict = {"machine": machine(), "streams": args.streams, "duration_s": duration,
                     "warmup_s": args.warmup, "input_size": args.input_size, "workers": args.workers,
                     "threads": args.threads, "model": args.model, "server_log": log_path}
    try:
        wait_until_loaded(base, proc)
        summary["startup_s"] = round(time.monotonic() - started_at, 2)
        pids = process_tree(proc.pid)
        summary["rss_start_mb"] = round(rss_bytes(pids) / 2**20, 1)
        names = sorted(files)
        lock = threading.Lock()
        stop = threading.Event()
        predict_lat: list[float] = []
        health_lat: list[float] = []
        failures: list[str] = []
        health_failures: list[str] = []
        counts = {"requests": 0, "tasks": 0, "empty_predictions": 0}
        rss_samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        deadline = t0 + duration

        def take_request() -> bool:
            with lock:
                if counts["requests"] >= args.max_requests or time.monotonic() >= deadline:
                    return False
                counts["requests"] += 1
                return True

        def stream(i: int) -> None:
            rng = random.Random(i)
            session = requests.Session()
            n = 0
            while not stop.is_set() and take_request():
                n += 1
                tasks = []
                for j in range(rng.randint(1, 3)):
                    name = "missing.png" if rng.random() < 0.1 else rng.choice(names)
                    tasks.append({"id": i * 1_000_000 + n * 10 + j, "data": {"image": f"/data/upload/1/{name}"}})
                labels = list(rng.choice(LABEL_SETS))
                if rng.random() < 0.2:
                    labels.append(f"thing {rng.randint(0, 199)}")  # a few new labels: text cache misses
                config = CONFIG.format(labels="".join(f'<Label value="{x}"/>' for x in labels))
                body = {"tasks": tasks, "label_config": config, "project": f"{i + 1}.1", "params": {}}
                started = time.perf_counter()
                try:
                    r = session.post(f"{base}/predict", json=body, timeout=args.request_timeout)
                    elapsed = time.perf_counter() - started
                    ok = r.status_code == 200 and len(r.json().get("results", [])) == len(tasks)
                    reason = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                    empty = sum(1 for p in r.json()["results"] if not p["result"]) if ok else 0
                except (requests.RequestException, ValueError) as err:
                    elapsed, ok, reason, empty = time.perf_counter() - started, False, type(err).__name__, 0
                with lock:
                    predict_lat.append(elapsed)
                    counts["tasks"] += len(tasks)
                    counts["empty_predictions"] += empty
                    if not ok:
                        failures.append(reason)

        def poll_health() -> None:
            session = requests.Session()
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    r = session.get(f"{base}/health", timeout=10)
                    elapsed = time.perf_counter() - started
                    if r.status_code != 200 or r.json().get("status") != "UP":
                        health_failures.append(f"HTTP {r.status_code}")
                except (requests.RequestException, ValueError) as err:
                    elapsed = time.perf_counter() - started
                    health_failures.append(type(err).__name__)
                health_lat.append(elapsed)
                stop.wait(max(0.0, args.health_interval - elapsed))

        def sample_rss() -> None:
            while not stop.is_set():
                rss_samples.append((time.monotonic() - t0, rss_bytes(process_tree(proc.pid))))
                stop.wait(0.5)

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(args.streams)]
        threads += [threading.Thread(target=poll_health, daemon=True), threading.Thread(target=sample_rss, daemon=True)]
        for t in threads:
            t.start()
        for t in threads[: args.streams]:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + args.request_timeout + 5)
        stop.set()
        for t in threads[args.streams:]:
            t.join(timeout=15)
        elapsed = time.monotonic() - t0

        # RSS after the warm-up: median of the first and of the last window (samples every 0.5 s
        # move by tens of MB as requests come and go), and the least-squares slope in between
        after = [(t, rss) for t, rss in rss_samples if t > args.warmup] or rss_samples[-1:]
        window = max(1.0, min(10.0, (after[-1][0] - after[0][0]) / 3))
        rss_warm = statistics.median(r for t, r in after if t <= after[0][0] + window)
        rss_end = statistics.median(r for t, r in after if t >= after[-1][0] - window)
        slope = 0.0
        if len(after) > 2:
            tm = statistics.fmean(t for t, _ in after)
            rm = statistics.fmean(r for _, r in after)
            den = sum((t - tm) ** 2 for t, _ in after)
            slope = sum((t - tm) * (r - rm) for t, r in after) / den * 60 if den else 0.0
        per_process = {("master" if p == proc.pid else f"worker {p}"): round(rss_bytes([p]) / 2**20, 1)
                       for p in process_tree(proc.pid)}
        summary.update({
            "elapsed_s": round(elapsed, 2),
            "requests": len(predict_lat),
            "tasks": counts["tasks"],
            "empty_predictions": counts["empty_predictions"],
            "failures": len(failures),
            "failure_examples": failures[:5],
            "throughput_rps": round(len(predict_lat) / elapsed, 2) if elapsed else None,
            "predict_latency": latency_summary(predict_lat),
            "health_requests": len(health_lat),
            "health_failures": len(health_failures),
            "health_failure_examples": health_failures[:5],
            "health_latency": latency_summary(health_lat),
            "rss_window_s": round(window, 1),
            "rss_after_warmup_mb": round(rss_warm / 2**20, 1),
            "rss_end_mb": round(rss_end / 2**20, 1),
            "rss_max_after_warmup_mb": round(max(r for _, r in after) / 2**20, 1),
            "rss_growth_after_warmup_mb": round((rss_end - rss_warm) / 2**20, 1),
            "rss_slope_mb_per_min": round(slope / 2**20, 1),
            "rss_by_process_end_mb": per_process,
            "rss_samples_mb": [[round(t, 1), round(r / 2**20, 1)] for t, r in rss_samples[:: max(1, len(rss_samples) // 40)]],
        })
        server_alive = proc.poll() is None
        summary["server_alive_at_end"] = server_alive
    finally:
        stop_server(proc)
        images.close()
    try:
        text = Path(log_path).read_text(errors="replace")
        summary["server_log_tracebacks"] = text.count("Traceback (most recent call last)")
        summary["server_log_errors"] = sum(1 for line in text.splitlines() if " ERROR " in line or "[ERROR]" in line)
    except OSError:
        pass
    return summary


def check(summary: dict, args: argparse.Namespace) -> list[str]:
    problems = []
    if summary.get("failures", 1) or summary.get("health_failures", 1):
        problems.append(f"{summary.get('failures')} failed /predict, {summary.get('health_failures')} failed /health")
    if not summary.get("requests"):
        problems.append("no /predict request completed")
    p99 = (summary.get("health_latency") or {}).get("p99_s")
    if p99 is None or p99 >= args.max_health_p99:
        problems.append(f"/health p99 {p99} s >= {args.max_health_p99} s")
    growth = summary.get("rss_growth_after_warmup_mb")
    if growth is None or growth > args.max_rss_growth_mb:
        problems.append(f"RSS grew {growth} MB after the warm-up (limit {args.max_rss_growth_mb} MB)")
    if not summary.get("server_alive_at_end"):
        problems.append("the server was not running at the end")
    if summary.get("server_log_tracebacks"):
        problems.append(f"{summary['server_log_tracebacks']} traceback(s) in the server log")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=8, help="concurrent /predict streams (1..64, default 8)")
    p.add_argument("--duration", type=float, default=60.0, help=f"seconds of load (at most {MAX_DURATION:.0f})")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds not counted for RSS growth (default 15)")
    p.add_argument("--max-requests", type=int, default=20000, help="cap on /predict calls (default 20000)")
    p.add_argument("--health-interval", type=float, default=0.1, help="seconds between /health polls")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--input-size", type=int, default=224, help="GEM_INPUT_SIZE of the server (default 224)")
    p.add_argument("--workers", type=int, default=1, help="WORKERS of the server (default 1)")
    p.add_argument("--threads", type=int, default=8, help="THREADS of the server (default 8)")
    p.add_argument("--model", default=str(GOLDEN / "config.json"), help="GEM_MODEL (default: the golden small CLIP)")
    p.add_argument("--pretrained", default=str(GOLDEN / "weights.safetensors"), help="GEM_PRETRAINED")
    p.add_argument("--max-health-p99", type=float, default=1.0, help="limit of --check (s)")
    p.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="limit of --check (MB)")
    p.add_argument("--check", action="store_true", help="exit 1 when a limit is exceeded")
    p.add_argument("--out", help="write the JSON summary here too")
    args = p.parse_args(argv)
    if not 1 <= args.streams <= 64:
        p.error("--streams must be 1..64")
    if not 0 < args.duration <= MAX_DURATION:
        p.error(f"--duration must be in (0, {MAX_DURATION:.0f}]")
    if args.max_requests < 1:
        p.error("--max-requests must be >= 1")

    # whatever happens (a hung server, a stuck client), this process ends
    watchdog = threading.Timer(args.duration + 180 + args.request_timeout, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    summary = run(args)
    problems = check(summary, args)
    summary["problems"] = problems
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    watchdog.cancel()
    return 1 if (problems and (args.check or summary.get("failures"))) else 0


if __name__ == "__main__":
    sys.exit(main())
