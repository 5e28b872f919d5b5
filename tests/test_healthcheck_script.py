"""docker/healthcheck.py (the image's HEALTHCHECK) against a tiny local HTTP server."""

import base64
import importlib.util
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docker" / "healthcheck.py"


def _load():
    spec = importlib.util.spec_from_file_location("gem_docker_healthcheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hc = _load()


@pytest.fixture
def server():
    """A /health server; set ``srv.reply = (code, body bytes)`` and ``srv.auth`` (user, pass)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            srv = self.server
            srv.seen.append((self.path, self.headers.get("Authorization")))
            if srv.auth is not None:
                want = "Basic " + base64.b64encode(":".join(srv.auth).encode()).decode()
                if self.headers.get("Authorization") != want:
                    self._send(401, b'{"error": "authentication required"}')
                    return
            if self.path != "/health":
                self._send(404, b"{}")
                return
            self._send(*srv.reply)

        def _send(self, code, body):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.reply = (200, json.dumps({"status": "UP", "model": "loaded"}).encode())
    srv.auth = None
    srv.seen = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def env_for(srv, **extra):
    return {"PORT": str(srv.server_address[1]), **extra}


def test_up_without_auth(server, capsys):
    assert hc.main([], env_for(server)) == 0
    assert server.seen == [("/health", None)]
    assert capsys.readouterr().out.startswith("healthy:")


def test_model_loading_is_healthy(server):
    server.reply = (200, json.dumps({"status": "UP", "model": "loading"}).encode())
    assert hc.main([], env_for(server)) == 0


def test_basic_auth_sent_when_set(server):
    server.auth = ("check", "s3cr:et")
    assert hc.main([], env_for(server, BASIC_AUTH_USER="check", BASIC_AUTH_PASS="s3cr:et")) == 0
    assert server.seen[-1][1] == "Basic " + base64.b64encode(b"check:s3cr:et").decode()


def test_missing_or_wrong_credentials_fail(server, capsys):
    server.auth = ("check", "secret")
    assert hc.main([], env_for(server)) == 1
    assert hc.main([], env_for(server, BASIC_AUTH_USER="check", BASIC_AUTH_PASS="nope")) == 1
    out = capsys.readouterr().out
    assert "HTTP 401" in out
    assert "nope" not in out  # the password never reaches the output


def test_empty_user_means_no_auth(server):
    assert hc.main([], env_for(server, BASIC_AUTH_USER="", BASIC_AUTH_PASS="")) == 0
    assert server.seen[-1][1] is None


@pytest.mark.parametrize("reply", [
    (503, json.dumps({"status": "ERROR", "model": "error"}).encode()),  # model failed to load
    (200, json.dumps({"status": "DOWN"}).encode()),
    (200, b"not json"),
    (200, b"[]"),
    (500, b"{}"),
])
def test_unhealthy_replies(server, reply):
    server.reply = reply
    assert hc.main([], env_for(server)) == 1


def test_nothing_listening():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert hc.main(["--timeout", "1"], {"PORT": str(port)}) == 1


def test_proxy_environment_is_ignored(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # would refuse every request
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert hc.main([], env_for(server)) == 0


def test_url_from_environment():
    assert hc.health_url({}) == "http://127.0.0.1:9090/health"
    assert hc.health_url({"PORT": "8000", "HOST": "0.0.0.0"}) == "http://127.0.0.1:8000/health"
    assert hc.health_url({"HOST": "10.0.0.5"}) == "http://10.0.0.5:9090/health"
    assert hc.health_url({"HOST": "::1", "PORT": ""}) == "http://[::1]:9090/health"
