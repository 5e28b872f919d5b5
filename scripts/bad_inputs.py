#!/usr/bin/env python
"""Feed bad inputs of its own to a running gem-backend and check that it stays honest.

    .venv/bin/python scripts/bad_inputs.py http://127.0.0.1:9090 [--user U --password P]
        [--secret S ...] [--json OUT]

For each case (malformed or hostile requests, task URLs into the private network, images
that are no images, decompression bombs, XML bombs, oversized bodies, wrong methods and
routes) it checks that:

- the server is up afterwards (``/health`` answers 200 within ``--health-timeout`` s),
- a bad request gets the 4xx it deserves, as JSON with an ``error`` message that names the
  problem (never a 5xx, never a 200 for a malformed request),
- a task that cannot be used gets an empty prediction in a 200 (one per task, in order),
  and no URL of a hostile task is fetched back from the server itself,
- nothing leaks: no traceback, source path or ``--secret`` string (API keys, passwords,
  tokens; also read from ``BAD_INPUTS_SECRETS``, comma-separated) in any body or header,
  ``/metrics`` included.

Needs nothing but ``requests``; sends at most a few hundred requests, one at a time; a
watchdog ends it after ``--max-seconds``. Prints a JSON report; exit status 1 when a check
failed, 2 when the server could not be reached at all.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import zlib
from urllib.parse import urlsplit

import requests

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')
LEAK_PATTERNS = [
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "[^"]+\.py", line \d+'),
    re.compile(r"(site|dist)-packages/"),
    re.compile(r"<title>500 Internal Server Error</title>", re.I),
]


def _png(width: int, height: int, raw: bytes | None = None, color: int = 128) -> bytes:
    """An 8-bit gray PNG claiming ``width x height``; ``raw`` (filtered scanlines) defaults to
    a flat image of that size, so a huge claim with a short ``raw`` stays a tiny file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if raw is None:
        raw = (b"\0" + bytes([color]) * width) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


LOLZ = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 2 else "")) * 10}">' for i in range(2, 10))
        + ']><View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="&lol9;"/></BrushLabels></View>')
XXE = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><View>'
       '<Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="&x;"/>'
       '</BrushLabels></View>')


class Checker:
    def __init__(self, base: str, auth, secrets: list[str], timeout: float, health_timeout: float):
        self.base = base.rstrip("/")
        self.auth = auth
        self.secrets = [s for s in secrets if s]
        self.timeout = timeout
        self.health_timeout = health_timeout
        self.session = requests.Session()
        self.session.trust_env = False  # straight to the server, no proxy from the environment
        self.cases: list[dict] = []
        self.failures: list[str] = []
        self.responses = 0

    # -------------------------------------------------------------- plumbing
    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _fail(self, case: str, why: str) -> None:
        self.failures.append(self.scrub(f"{case}: {why}"))

    def _leaks(self, case: str, text: str) -> None:
        for secret in self.secrets:
            if secret in text:
                self._fail(case, "a secret appears in the response")
        for pattern in LEAK_PATTERNS:
            if pattern.search(text):
                self._fail(case, f"the response shows internals ({pattern.pattern!r})")

    def request(self, case: str, method: str, path: str, auth=True, **kwargs) -> requests.Response | None:
        try:
            r = self.session.request(method, self.base + path, auth=self.auth if auth else None,
                                     timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.RequestException as err:
            self._fail(case, f"no answer: {type(err).__name__}")
            return None
        self.responses += 1
        self._leaks(case, r.text)
        self._leaks(case, "\n".join(f"{k}: {v}" for k, v in r.headers.items()))
        return r

    def health(self, case: str) -> None:
        started = time.perf_counter()
        r = self.request(f"{case} (health after)", "GET", "/health", timeout=max(self.health_timeout, 5))
        elapsed = time.perf_counter() - started
        if r is None:
            return
        if r.status_code != 200:
            self._fail(case, f"/health answered {r.status_code} afterwards")
        elif elapsed > self.health_timeout:
            self._fail(case, f"/health took {elapsed:.2f} s afterwards")

    def expect_error(self, case: str, method: str, path: str, statuses: tuple[int, ...], words: tuple[str, ...],
                     **kwargs) -> None:
        """A 4xx in ``statuses`` with a JSON ``error`` containing one of ``words``."""
        r = self.request(case, method, path, **kwargs)
        record = {"case": case, "status": getattr(r, "status_code", None)}
        if r is not None:
            try:
                message = r.json().get("error")
            except (ValueError, AttributeError):
                message = None
            record["error"] = self.scrub(message if isinstance(message, str) else "")[:160]
            if r.status_code not in statuses:
                self._fail(case, f"expected HTTP {'/'.join(map(str, statuses))}, got {r.status_code}: {r.text[:160]!r}")
            elif not isinstance(message, str) or not message.strip():
                self._fail(case, f"HTTP {r.status_code} without a JSON 'error' message: {r.text[:160]!r}")
            elif words and not any(w.lower() in message.lower() for w in words):
                self._fail(case, f"the message does not say what is wrong (expected one of {words}): {message[:160]!r}")
            elif len(message) > 2000:
                self._fail(case, f"the message is {len(message)} characters long")
        self.cases.append(record)
        self.health(case)

    def predict_json(self, case: str, body, statuses=(400,), words=()) -> None:
        self.expect_error(case, "POST", "/predict", statuses, words, json=body)

    def predict_isolated(self, case: str, good: dict, bad: dict) -> None:
        """``[good, bad]`` -> 200 with two predictions, the bad task's empty."""
        r = self.request(case, "POST", "/predict", json={"tasks": [good, bad], "label_config": CONFIG})
        self.cases.append({"case": case, "status": getattr(r, "status_code", None)})
        if r is not None:
            results = (r.json() or {}).get("results") if r.status_code == 200 else None
            if not isinstance(results, list) or len(results) != 2:
                self._fail(case, f"expected HTTP 200 with 2 predictions, got {r.status_code}: {r.text[:160]!r}")
            elif results[1].get("result") != []:
                self._fail(case, "the task without an image got regions")
        self.health(case)

    def predict_raw(self, case: str, data: bytes | str, content_type="application/json", statuses=(400,), words=()):
        self.expect_error(case, "POST", "/predict", statuses, words, data=data, headers={"Content-Type": content_type})

    # -------------------------------------------------------------- cases
    def run(self) -> dict:
        r = self.request("start", "GET", "/health")
        if r is None:
            return {"ok": False, "unreachable": True, "failures": self.failures}
        if r.status_code == 401:
            self._fail("start", "the server wants basic auth: pass --user and --password")
            return self.report()
        self.start_health = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        task = {"id": 1, "data": {"image": _data_uri(_png(8, 8))}}

        # request bodies
        self.predict_raw("not JSON", "hello", "text/plain", words=("JSON",))
        self.predict_raw("truncated JSON", '{"tasks": [', words=("JSON",))
        self.predict_raw("invalid UTF-8", b'{"tasks": "\xff\xfe"}', words=("JSON",))
        self.predict_raw("JSON nested 100000 deep", "[" * 100000 + "]" * 100000, words=("nested", "JSON"))
        self.predict_raw("huge integer", '{"tasks": [], "label_config": ' + "9" * 5000 + "}", words=("JSON",))
        self.predict_json("JSON array body", [task], words=("JSON object",))
        self.predict_json("JSON string body", "tasks", words=("JSON object",))
        self.predict_json("missing tasks", {"label_config": CONFIG}, words=("tasks",))
        self.predict_json("tasks is an object", {"tasks": task, "label_config": CONFIG}, words=("tasks",))
        self.predict_json("tasks is null", {"tasks": None, "label_config": CONFIG}, words=("tasks",))
        self.predict_json("task is a string", {"tasks": [task, "task 2"], "label_config": CONFIG}, words=("tasks[1]",))
        # one task without a usable image gets its own empty prediction; the others are predicted
        for case, bad in (("task without data", {"id": 4}), ("data is a list", {"id": 4, "data": [1]}),
                          ("task without the image key", {"id": 5, "data": {"img": "x.png"}}),
                          ("image is a number", {"id": 6, "data": {"image": 7}}),
                          ("image is empty", {"id": 6, "data": {"image": " "}})):
            self.predict_isolated(case, task, bad)
        self.predict_json("no label config", {"tasks": [task]}, words=("label config",))
        self.predict_json("label config is a dict", {"tasks": [task], "label_config": {"View": 1}}, words=("label config",))
        self.predict_json("label config is not XML", {"tasks": [task], "label_config": "<View><Image"},
                          words=("XML",))
        self.predict_json("label config with nothing to predict", {"tasks": [task], "label_config":
                          '<View><Image name="i" value="$image"/><Header value="look"/></View>'}, words=("BrushLabels",))
        self.predict_json("label config: billion laughs", {"tasks": [task], "label_config": LOLZ},
                          words=("XML", "entity", "label"))
        self.predict_json("label config: external entity", {"tasks": [task], "label_config": XXE},
                          words=("XML", "entity", "label"))
        self.predict_json("label config nested 5000 deep", {"tasks": [task], "label_config": "<View>" * 5000
                          + "</View>" * 5000}, words=("XML", "depth", "label"))
        self.predict_json("extra_params: unknown key", {"tasks": [task], "label_config": CONFIG,
                                                       "extra_params": {"bogus": 1}}, words=("bogus",))
        self.predict_json("extra_params: bad value", {"tasks": [task], "label_config": CONFIG,
                                                     "extra_params": {"threshold": "high"}}, words=("threshold",))
        self.predict_json("extra_params: out of range", {"tasks": [task], "label_config": CONFIG,
                                                        "extra_params": {"threshold": 7}}, words=("threshold",))
        self.predict_json("extra_params: not JSON", {"tasks": [task], "label_config": CONFIG,
                                                    "extra_params": "{threshold"}, words=("extra_params",))
        self.predict_json("extra_params: a list", {"tasks": [task], "label_config": CONFIG,
                                                  "extra_params": [1, 2]}, words=("extra_params",))
        self.oversized()

        # /setup and friends
        self.expect_error("setup: not JSON", "POST", "/setup", (400,), ("JSON",), data="x",
                          headers={"Content-Type": "text/plain"})
        self.expect_error("setup: bad schema", "POST", "/setup", (400,), ("XML",), json={"schema": "<View"})
        self.expect_error("setup: no schema", "POST", "/setup", (400,), ("label config",), json={"project": "1.1"})
        self.expect_error("setup: bad extra_params", "POST", "/setup", (400,), ("extra_params",),
                          json={"schema": CONFIG, "extra_params": "{"})
        self.expect_error("GET /predict", "GET", "/predict", (405,), ("method",))
        self.expect_error("unknown route", "GET", "/no-such-route", (404,), ("not found",))
        self.expect_error("PUT /health", "PUT", "/health", (405,), ("method",))
        if self.auth is not None:
            for what, auth in (("no", None), ("wrong", (self.auth[0], self.auth[1] + "x"))):
                r = self.request(f"{what} credentials", "POST", "/predict", auth=False, json={"tasks": []},
                                 **({"headers": {"Authorization": "Basic " + base64.b64encode(
                                     f"{auth[0]}:{auth[1]}".encode()).decode()}} if auth else {}))
                if r is not None and r.status_code != 401:
                    self._fail(f"{what} credentials", f"expected 401, got {r.status_code}")
                self.cases.append({"case": f"{what} credentials", "status": getattr(r, "status_code", None)})

        self.hostile_tasks()
        self.metrics()
        return self.report()

    def oversized(self) -> None:
        """A body announcing 10 GB: refused from its headers, before it is read."""
        case = "body announcing 10 GB"
        parts = urlsplit(self.base)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        record = {"case": case, "status": None}
        if parts.scheme != "http":
            record["skipped"] = "https"
            self.cases.append(record)
            return
        auth = ""
        if self.auth is not None:
            auth = "Authorization: Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode() + "\r\n"
        head = (f"POST {parts.path.rstrip('/')}/predict HTTP/1.1\r\nHost: {parts.netloc}\r\n{auth}"
                f"Content-Type: application/json\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n")
        try:
            with socket.create_connection((host, port), timeout=self.timeout) as sock:
                sock.sendall(head.encode() + b'{"tasks": [')
                data = b""
                while b"\r\n\r\n" not in data or len(data) < 12:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
        except (OSError, ValueError, IndexError) as err:
            self._fail(case, f"no answer: {type(err).__name__}")
            status = None
        record["status"] = status
        if status is not None and status != 413:
            self._fail(case, f"expected HTTP 413, got {status}")
        self.cases.append(record)
        self.health(case)

    def hostile_tasks(self) -> None:
        """Tasks no image can come from: one empty prediction each, nothing fetched from here."""
        parts = urlsplit(self.base)
        me = f"{parts.hostname}:{parts.port or 80}"
        probe = f"/ssrf-probe-{random.randrange(10**9)}"
        rnd = random.Random(0)
        urls = {
            "file:": "file:///etc/passwd",
            "gopher:": "gopher://127.0.0.1:6379/_INFO",
            "ftp:": "ftp://127.0.0.1/x.png",
            "javascript:": "javascript:alert(1)",
            "dict:": "dict://127.0.0.1:11211/stat",
            "cloud metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "cloud metadata (IPv4-mapped)": "http://[::ffff:169.254.169.254]/latest/meta-data/",
            "this server, by address": f"http://{me}{probe}",
            "this server, as localhost": f"http://localhost:{parts.port or 80}{probe}",
            "this server, as one number": f"http://2130706433:{parts.port or 80}{probe}",
            "loopback IPv6": f"http://[::1]:{parts.port or 80}{probe}",
            "private 10/8": "http://10.0.0.1/x.png",
            "private 192.168/16": "http://192.168.0.1/x.png",
            "protocol-relative": f"//{me}{probe}",
            "not a URL": "::::",
            "zero bytes": "data:image/png;base64,",
            "random bytes": _data_uri(rnd.randbytes(2048), "application/octet-stream"),
            "an HTML page": _data_uri(b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html"),
            "an SVG": _data_uri(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image/svg+xml"),
            "truncated PNG": _data_uri(_png(64, 64)[:60]),
            "decompression bomb 50000x50000": _data_uri(_png(50000, 50000, b"\0" * 64)),
            "bad base64": "data:image/png;base64,@@@@",
        }
        tasks = [{"id": 1000 + i, "data": {"image": url}} for i, url in enumerate(urls.values())]
        usable = {"1x1 pixel": _data_uri(_png(1, 1)), "100000x10 pixels": _data_uri(_png(100000, 10))}
        tasks += [{"id": 2000 + i, "data": {"image": url}} for i, url in enumerate(usable.values())]
        before = self._metric_total('gem_requests_total{route="other"')
        case = "hostile and broken task images"
        started = time.perf_counter()
        r = self.request(case, "POST", "/predict", json={"tasks": tasks, "label_config": CONFIG},
                         timeout=max(self.timeout, 120))
        record = {"case": case, "status": getattr(r, "status_code", None), "tasks": len(tasks),
                  "seconds": round(time.perf_counter() - started, 2)}
        self.cases.append(record)
        if r is not None:
            if r.status_code != 200:
                self._fail(case, f"expected HTTP 200 with empty predictions, got {r.status_code}: {r.text[:160]!r}")
            else:
                results = r.json().get("results", [])
                if len(results) != len(tasks):
                    self._fail(case, f"{len(results)} predictions for {len(tasks)} tasks")
                for name, pred in zip(list(urls) + list(usable), results):
                    if name in usable:
                        continue  # a tiny or thin image may get masks or none, but must not break the batch
                    if pred.get("result") != [] or pred.get("score") not in (0, 0.0):
                        self._fail(case, f"task {name!r} got a prediction: {str(pred)[:120]}")
        self.health(case)
        after = self._metric_total('gem_requests_total{route="other"')
        if before is not None and after is not None and after > before:
            self._fail(case, f"the server fetched {after - before:.0f} URL(s) from itself (SSRF)")

        # many tasks at once, each unusable: one empty prediction each, quickly
        case = "500 tasks with unusable URLs"
        many = [{"id": 5000 + i, "data": {"image": rnd.choice(["file:///etc/shadow", "http://169.254.169.254/",
                                                                 "data:image/png;base64,AAAA"])}} for i in range(500)]
        r = self.request(case, "POST", "/predict", json={"tasks": many, "label_config": CONFIG},
                         timeout=max(self.timeout, 120))
        self.cases.append({"case": case, "status": getattr(r, "status_code", None)})
        if r is not None and (r.status_code != 200 or len(r.json().get("results", [])) != 500
                              or any(p["result"] for p in r.json()["results"])):
            self._fail(case, f"expected 500 empty predictions, got HTTP {r.status_code}: {r.text[:120]!r}")
        self.health(case)

    def _metric_total(self, prefix: str) -> float | None:
        r = self.request("metrics", "GET", "/metrics")
        if r is None or r.status_code != 200:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line.startswith(prefix))

    def metrics(self) -> None:
        for path in ("/metrics", "/health", "/versions", "/"):
            r = self.request(f"GET {path}", "GET", path)
            if r is not None and r.status_code not in (200, 503):
                self._fail(f"GET {path}", f"HTTP {r.status_code}")

    def report(self) -> dict:
        return {"url": self.base, "ok": not self.failures, "cases": len(self.cases), "responses": self.responses,
                "failures": self.failures, "results": self.cases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the running backend, e.g. http://127.0.0.1:9090")
    p.add_argument("--user", default=os.environ.get("BASIC_AUTH_USER"), help="basic auth user (BASIC_AUTH_USER)")
    p.add_argument("--password", default=os.environ.get("BASIC_AUTH_PASS"), help="basic auth password (BASIC_AUTH_PASS)")
    p.add_argument("--secret", action="append", default=[], help="a string that must never appear (repeatable)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument("--health-timeout", type=float, default=1.0, help="/health must answer within this (default 1 s)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="watchdog: give up after this long")
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)
    secrets = list(args.secret) + [s for s in os.environ.get("BAD_INPUTS_SECRETS", "").split(",") if s]
    if args.password:
        secrets.append(args.password)
    watchdog = threading.Timer(args.max_seconds, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    auth = (args.user, args.password) if args.user else None
    report = Checker(args.url, auth, secrets, args.timeout, args.health_timeout).run()
    watchdog.cancel()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    if report.get("unreachable"):
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
