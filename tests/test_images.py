"""ImageFetcher against real HTTP servers on 127.0.0.1 (two ports = two origins)."""

import base64
import io
import json
import logging
import random
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile

from gem_backend.labelstudio.images import ImageError, ImageFetcher, load_image_file, to_rgb

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
NO_LENGTH = "X-Test-No-Content-Length"
# the `other` server plays a public host, but it listens on 127.0.0.1: allow-listed where used
PUBLIC = ("127.0.0.1",)


# --- test servers -------------------------------------------------------------------


@dataclass
class Req:
    method: str
    raw_path: str
    path: str
    query: dict
    auth: str | None
    body: bytes


@dataclass
class Server:
    httpd: ThreadingHTTPServer
    routes: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _handle(self):
        owner: Server = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        req = Req(self.command, self.path, parts.path, parse_qs(parts.query), self.headers.get("Authorization"), body)
        owner.requests.append(req)
        fn = owner.routes.get(parts.path)
        if fn is None:
            status, headers, payload = 404, {"Content-Type": "text/html"}, b"<html><body>Not Found</body></html>"
        else:
            status, headers, payload = fn(req)
        self.send_response(status)
        headers = dict(headers)
        no_length = headers.pop(NO_LENGTH, None)
        for key, value in headers.items():
            self.send_header(key, value)
        if not no_length and "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the client hanging up mid-body is expected in the byte-cap tests


def _start() -> Server:
    httpd = _Quiet(("127.0.0.1", 0), _Handler)
    server = Server(httpd)
    httpd.owner = server
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    ls, other = _start(), _start()
    yield ls, other
    for s in (ls, other):
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.fixture
def ls(servers):
    server = servers[0]
    server.routes.clear()
    server.requests.clear()
    return server


@pytest.fixture
def other(servers):
    server = servers[1]
    server.routes.clear()
    server.requests.clear()
    return server


@pytest.fixture(autouse=True)
def _no_proxy_no_netrc(monkeypatch, tmp_path):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


# --- images -------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_png(w=8, h=6, color=(10, 200, 30)) -> bytes:
    return encode(Image.new("RGB", (w, h), color))


def crafted_png(width: int, height: int, raw: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height (8-bit gray) with `raw` as the whole image data,
    so a huge claimed size stays a tiny file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def serve(body: bytes, content_type="image/png", status=200, need_auth: str | None = None, extra=None):
    def handler(req: Req):
        if need_auth is not None and req.auth != need_auth:
            return 401, {"Content-Type": "application/json"}, b'{"detail": "Authentication credentials were not provided."}'
        return status, {"Content-Type": content_type, **(extra or {})}, body

    return handler


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload: dict) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}.{b64url(b'not-a-real-signature')}"


def make_pat(exp_in: float = 3600) -> str:
    return make_jwt({"token_type": "refresh", "exp": int(time.time() + exp_in), "jti": "pat1", "user_id": 1})


def make_access(exp_in: float = 300, jti: str = "a1") -> str:
    return make_jwt({"token_type": "access", "exp": int(time.time() + exp_in), "jti": jti, "user_id": 1})


def refresh_route(pat: str, tokens: list[str], calls: list):
    def handler(req: Req):
        calls.append(req)
        if req.method != "POST" or json.loads(req.body or b"{}") != {"refresh": pat}:
            return 401, {"Content-Type": "application/json"}, b'{"detail": "Token is invalid or expired"}'
        token = tokens[min(len(calls), len(tokens)) - 1]
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": token}).encode()

    return handler


# --- routing and credentials --------------------------------------------------------


def test_relative_url_gets_legacy_token(ls):
    ls.routes["/data/upload/1/cat.png"] = serve(rgb_png(8, 6), need_auth=f"Token {LEGACY_KEY}")
    image = ImageFetcher(ls.url, LEGACY_KEY).fetch("/data/upload/1/cat.png")
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((0, 0)) == (10, 200, 30)
    assert [r.auth for r in ls.requests] == [f"Token {LEGACY_KEY}"]


def test_local_files_url_keeps_its_query(ls):
    ls.routes["/data/local-files/"] = serve(rgb_png(), need_auth=f"Token {LEGACY_KEY}")
    ImageFetcher(ls.url + "/", LEGACY_KEY).fetch("/data/local-files/?d=images/a%20b.png")
    assert ls.requests[0].raw_path == "/data/local-files/?d=images/a%20b.png"


def test_label_studio_url_with_path_prefix(ls):
    ls.routes["/labelstudio/data/upload/1/x.png"] = serve(rgb_png(), need_auth=f"Token {LEGACY_KEY}")
    ImageFetcher(ls.url + "/labelstudio", LEGACY_KEY).fetch("/data/upload/1/x.png")
    assert ls.requests[0].path == "/labelstudio/data/upload/1/x.png"


def test_absolute_url_on_label_studio_origin_gets_credentials(ls):
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth=f"Token {LEGACY_KEY}")
    ImageFetcher(ls.url, LEGACY_KEY).fetch(f"{ls.url}/data/upload/1/x.png")
    assert ls.requests[0].auth == f"Token {LEGACY_KEY}"


def test_other_origin_gets_no_credentials(ls, other):
    other.routes["/pics/x.png"] = serve(rgb_png(5, 4))
    image = ImageFetcher(ls.url, LEGACY_KEY, allowed_hosts=PUBLIC).fetch(f"{other.url}/pics/x.png")
    assert image.size == (5, 4)
    assert other.requests[0].auth is None
    assert ls.requests == []


def test_same_host_other_name_is_another_origin(ls):
    # "localhost" reaches the same server, but it is not LABEL_STUDIO_URL's origin
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth=f"Token {LEGACY_KEY}")
    fetcher = ImageFetcher(ls.url, LEGACY_KEY, allowed_hosts=PUBLIC)
    with pytest.raises(ImageError, match="HTTP 401.*not on LABEL_STUDIO_URL's origin"):
        fetcher.fetch(f"http://localhost:{ls.port}/data/upload/1/x.png")
    assert ls.requests[0].auth is None


def test_redirect_to_other_origin_drops_credentials(ls, other):
    ls.routes["/data/upload/1/r.png"] = lambda req: (302, {"Location": f"{other.url}/bucket/r.png?sig=abc"}, b"")
    other.routes["/bucket/r.png"] = serve(rgb_png(3, 2))
    image = ImageFetcher(ls.url, LEGACY_KEY, allowed_hosts=PUBLIC).fetch("/data/upload/1/r.png")
    assert image.size == (3, 2)
    assert ls.requests[0].auth == f"Token {LEGACY_KEY}"
    assert other.requests[0].auth is None


def test_redirect_to_file_scheme_is_refused(ls):
    ls.routes["/data/upload/1/r.png"] = lambda req: (302, {"Location": "file:///etc/passwd"}, b"")
    with pytest.raises(ImageError, match="unsupported URL scheme"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("/data/upload/1/r.png")


def test_redirect_loop_is_cut(ls):
    ls.routes["/loop"] = lambda req: (302, {"Location": "/loop"}, b"")
    with pytest.raises(ImageError, match="too many redirects"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("/loop")
    assert len(ls.requests) == 11


@pytest.mark.parametrize("uri", ["s3://bucket/dir/cat 1.png", "gs://b/x.jpg", "azure-blob://container/a/b.png"])
def test_cloud_uri_goes_through_presign(ls, other, uri):
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

    ls.routes["/tasks/42/presign/"] = lambda req: (
        (303, {"Location": f"{other.url}/signed/x.png?X-Amz-Signature=s3cr3t"}, b"")
        if req.auth == f"Token {LEGACY_KEY}"
        else (401, {}, b"")
    )
    other.routes["/signed/x.png"] = serve(rgb_png(4, 4))
    image = ImageFetcher(ls.url, LEGACY_KEY, allowed_hosts=PUBLIC).fetch(uri, task_id=42)
    assert image.size == (4, 4)
    (presign,) = ls.requests
    # same URL form as label-studio-sdk's get_local_path
    assert presign.raw_path == f"/tasks/42/presign/?fileuri={encode_presign_fileuri(uri)}"
    assert base64.urlsafe_b64decode(presign.query["fileuri"][0]).decode() == uri
    assert other.requests[0].auth is None


def test_cloud_uri_needs_task_id_and_ls_url(ls):
    with pytest.raises(ImageError, match="task id"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("s3://bucket/x.png")
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        ImageFetcher(None, None).fetch("s3://bucket/x.png", task_id=1)
    assert ls.requests == []


def test_data_uri_is_decoded_locally(ls):
    png = rgb_png(6, 2)
    image = ImageFetcher(ls.url, LEGACY_KEY).fetch("data:image/png;base64," + base64.b64encode(png).decode())
    assert image.size == (6, 2)
    assert ImageFetcher(None, None).fetch_bytes("data:image/png;base64," + base64.b64encode(png).decode()) == png
    assert ls.requests == []


@pytest.mark.parametrize("uri", ["data:image/png;base64,@@@@", "data:image/png;base64", "data:text/plain,hello"])
def test_bad_data_uri(uri):
    with pytest.raises(ImageError):
        ImageFetcher(None, None).fetch(uri)


@pytest.mark.parametrize(
    "url, message",
    [
        ("file:///etc/passwd", "scheme file:"),
        ("gopher://127.0.0.1:70/x", "scheme gopher:"),
        ("ftp://127.0.0.1/x.png", "scheme ftp:"),
        ("javascript:alert(1)", "scheme javascript:"),
        ("//127.0.0.1/x.png", "protocol-relative"),
        ("", "empty image URL"),
    ],
)
def test_unsupported_urls(ls, url, message):
    with pytest.raises(ImageError, match=message):
        ImageFetcher(ls.url, LEGACY_KEY).fetch(url)
    assert ls.requests == []


def test_relative_url_without_label_studio_url():
    with pytest.raises(ImageError, match="needs LABEL_STUDIO_URL"):
        ImageFetcher(None, None).fetch("/data/upload/1/x.png")


def test_bad_label_studio_url():
    with pytest.raises(ValueError, match="http"):
        ImageFetcher("localhost:8080", LEGACY_KEY)


def test_no_key_sends_no_credentials(ls):
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png())
    ImageFetcher(ls.url, None).fetch("/data/upload/1/x.png")
    assert ls.requests[0].auth is None


# --- personal access tokens ---------------------------------------------------------


def test_pat_is_exchanged_and_access_token_cached(ls):
    pat, access, calls = make_pat(), make_access(300), []
    ls.routes["/api/token/refresh/"] = refresh_route(pat, [access], calls)
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth=f"Bearer {access}")
    fetcher = ImageFetcher(ls.url, pat)
    assert fetcher.auth_mode == "pat"
    fetcher.fetch("/data/upload/1/x.png")
    fetcher.fetch("/data/upload/1/x.png")
    assert len(calls) == 1
    assert [r.auth for r in ls.requests if r.path.startswith("/data")] == [f"Bearer {access}"] * 2
    assert all(pat not in (r.auth or "") for r in ls.requests)


def test_access_token_near_expiry_is_refreshed(ls):
    pat, calls = make_pat(), []
    first, second = make_access(10, "a1"), make_access(10, "a2")  # inside the 30 s margin
    ls.routes["/api/token/refresh/"] = refresh_route(pat, [first, second], calls)
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png())
    fetcher = ImageFetcher(ls.url, pat)
    fetcher.fetch("/data/upload/1/x.png")
    fetcher.fetch("/data/upload/1/x.png")
    assert len(calls) == 2
    assert [r.auth for r in ls.requests if r.path.startswith("/data")] == [f"Bearer {first}", f"Bearer {second}"]


def test_401_refreshes_once_and_retries(ls):
    pat, calls = make_pat(), []
    revoked, good = make_access(3600, "revoked"), make_access(3600, "good")
    ls.routes["/api/token/refresh/"] = refresh_route(pat, [revoked, good], calls)
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth=f"Bearer {good}")
    image = ImageFetcher(ls.url, pat).fetch("/data/upload/1/x.png")
    assert image.size == (8, 6)
    assert len(calls) == 2
    assert [r.auth for r in ls.requests if r.path.startswith("/data")] == [f"Bearer {revoked}", f"Bearer {good}"]


def test_401_after_retry_gives_up(ls):
    pat, calls = make_pat(), []
    ls.routes["/api/token/refresh/"] = refresh_route(pat, [make_access()], calls)
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth="Bearer never")
    with pytest.raises(ImageError, match="HTTP 401"):
        ImageFetcher(ls.url, pat).fetch("/data/upload/1/x.png")
    assert len(calls) == 2 and len([r for r in ls.requests if r.path.startswith("/data")]) == 2


def test_refused_pat(ls):
    pat = make_pat()
    ls.routes["/api/token/refresh/"] = lambda req: (401, {"Content-Type": "application/json"}, b'{"detail": "Token is invalid"}')
    with pytest.raises(ImageError, match="refused the personal access token: HTTP 401") as err:
        ImageFetcher(ls.url, pat).fetch("/data/upload/1/x.png")
    assert pat not in str(err.value)


def test_expired_pat_fails_without_asking(ls):
    with pytest.raises(ImageError, match="expired"):
        ImageFetcher(ls.url, make_pat(-60)).fetch("/data/upload/1/x.png")
    assert ls.requests == []


def test_pat_is_not_exchanged_for_other_origins(ls, other):
    calls = []
    ls.routes["/api/token/refresh/"] = refresh_route("x", ["y"], calls)
    other.routes["/x.png"] = serve(rgb_png())
    ImageFetcher(ls.url, make_pat(), allowed_hosts=PUBLIC).fetch(f"{other.url}/x.png")
    assert calls == [] and other.requests[0].auth is None


def test_access_token_given_directly_is_sent_as_bearer(ls):
    access = make_access()
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth=f"Bearer {access}")
    fetcher = ImageFetcher(ls.url, access)
    assert fetcher.auth_mode == "bearer"
    fetcher.fetch("/data/upload/1/x.png")


# --- HTTP failures and limits -------------------------------------------------------


def test_404(ls):
    with pytest.raises(ImageError, match="HTTP 404"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("/data/upload/1/missing.png")


def test_legacy_key_rejected_hints_at_pat(ls):
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(), need_auth="Token other")
    with pytest.raises(ImageError, match="HTTP 401.*personal access token"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("/data/upload/1/x.png")


def test_connection_refused():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="cannot fetch"):
        ImageFetcher(f"http://127.0.0.1:{port}", LEGACY_KEY, timeout=(1, 1)).fetch("/x.png")


def test_read_timeout(ls):
    def slow(req):
        time.sleep(1.0)
        return 200, {"Content-Type": "image/png"}, rgb_png()

    ls.routes["/slow.png"] = slow
    started = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        ImageFetcher(ls.url, LEGACY_KEY, timeout=(1, 0.2)).fetch("/slow.png")
    assert time.monotonic() - started < 0.9


def test_byte_cap_with_content_length(ls):
    ls.routes["/big.png"] = serve(b"\0" * 300_000)
    with pytest.raises(ImageError, match="announces 300000 bytes"):
        ImageFetcher(ls.url, None, max_bytes=100_000).fetch("/big.png")


def test_byte_cap_while_streaming(ls):
    ls.routes["/big.png"] = serve(b"\0" * 2_000_000, extra={NO_LENGTH: "1"})
    with pytest.raises(ImageError, match="sent more than 100000 bytes"):
        ImageFetcher(ls.url, None, max_bytes=100_000).fetch("/big.png")


def test_under_byte_cap_passes(ls):
    body = rgb_png()
    ls.routes["/ok.png"] = serve(body, extra={NO_LENGTH: "1"})
    assert ImageFetcher(ls.url, None, max_bytes=len(body)).fetch_bytes("/ok.png") == body


def test_data_uri_byte_cap():
    uri = "data:image/png;base64," + base64.b64encode(b"\0" * 5000).decode()
    with pytest.raises(ImageError, match="too large"):
        ImageFetcher(None, None, max_bytes=1000).fetch(uri)


@pytest.fixture
def load_calls(monkeypatch):
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_crafted_png_decodes_under_the_cap(ls, load_calls):
    ls.routes["/c.png"] = serve(crafted_png(100, 100, (b"\0" + b"\x80" * 100) * 100))
    image = ImageFetcher(ls.url, None).fetch("/c.png")
    assert image.size == (100, 100)
    assert load_calls  # the spy sees decoding, so the refusals below are meaningful


def test_pixel_cap_refuses_before_decoding(ls, load_calls):
    ls.routes["/c.png"] = serve(crafted_png(100, 100, (b"\0" + b"\x80" * 100) * 100))
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, the limit is 5000"):
        ImageFetcher(ls.url, None, max_pixels=5000).fetch("/c.png")
    assert load_calls == []


def test_huge_claimed_png_is_refused_before_decoding(ls, load_calls):
    body = crafted_png(50000, 50000, b"\0" * 64)
    assert len(body) < 200
    ls.routes["/bomb.png"] = serve(body)
    with pytest.raises(ImageError, match="too large"):
        ImageFetcher(ls.url, None).fetch("/bomb.png")
    assert load_calls == []


def test_pixel_cap_for_local_files(tmp_path, load_calls):
    path = tmp_path / "big.png"
    path.write_bytes(crafted_png(100, 100, (b"\0" + b"\x80" * 100) * 100))
    with pytest.raises(ImageError, match="100x100 = 10000 pixels"):
        load_image_file(path, max_pixels=9999)
    path.write_bytes(crafted_png(50000, 50000, b"\0"))
    with pytest.raises(ImageError, match="too large"):
        load_image_file(path)
    assert load_calls == []


# --- non-image bodies ---------------------------------------------------------------


def _jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)


@pytest.mark.parametrize(
    "body, ctype, expected",
    [
        (b"<!DOCTYPE html><html><body>Please log in. BODY-MARKER</body></html>", "text/html; charset=utf-8", "HTML page"),
        (random.Random(0).randbytes(4096), "application/octet-stream", "unrecognized binary data"),
        (b"", "image/png", "empty body"),
        (_jpeg()[:1500], "image/jpeg", "JPEG"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", "SVG"),
        (b'{"detail": "BODY-MARKER"}', "application/json", "JSON"),
    ],
    ids=["html", "random", "empty", "truncated-jpeg", "svg", "json"],
)
def test_non_image_bodies(ls, body, ctype, expected):
    ls.routes["/x"] = serve(body, content_type=ctype)
    with pytest.raises(ImageError) as err:
        ImageFetcher(ls.url, LEGACY_KEY).fetch("/x")
    message = str(err.value)
    assert expected in message
    assert "BODY-MARKER" not in message
    if body:
        assert ctype in message


# --- modes and orientation ----------------------------------------------------------


def _mode_1():
    image = Image.new("1", (7, 5), 0)
    image.putpixel((1, 1), 1)
    return encode(image), {(0, 0): (0, 0, 0), (1, 1): (255, 255, 255)}


def _mode_l():
    image = Image.new("L", (7, 5), 40)
    return encode(image), {(0, 0): (40, 40, 40)}


def _mode_la():
    image = Image.new("LA", (7, 5), (10, 255))
    image.putpixel((0, 0), (0, 0))
    return encode(image), {(0, 0): (255, 255, 255), (1, 0): (10, 10, 10)}


def _mode_p_transparency():
    image = Image.new("P", (7, 5), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 1), 1)
    return encode(image, transparency=0), {(0, 0): (255, 255, 255), (1, 1): (0, 0, 255)}


def _mode_rgba():
    image = Image.new("RGBA", (7, 5), (200, 10, 10, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((2, 0), (0, 0, 0, 128))
    return encode(image), {(0, 0): (255, 255, 255), (1, 0): (200, 10, 10), (2, 0): (127, 127, 127)}


def _mode_cmyk():
    return encode(Image.new("CMYK", (7, 5), (0, 255, 255, 0)), "JPEG", quality=95), {}


def _mode_i16():
    arr = np.linspace(0, 65535, 35).astype(np.uint16).reshape(5, 7)
    return encode(Image.fromarray(arr)), {(0, 0): (0, 0, 0), (6, 4): (255, 255, 255)}


def _mode_i16_narrow():
    arr = np.linspace(1000, 4000, 35).astype(np.uint16).reshape(5, 7)  # a 12-bit scan
    return encode(Image.fromarray(arr)), {(0, 0): (0, 0, 0), (6, 4): (255, 255, 255)}


def _mode_f():
    arr = np.linspace(0.0, 1.0, 35, dtype=np.float32).reshape(5, 7)
    return encode(Image.fromarray(arr), "TIFF"), {(0, 0): (0, 0, 0), (6, 4): (255, 255, 255)}


@pytest.mark.parametrize(
    "make",
    [_mode_1, _mode_l, _mode_la, _mode_p_transparency, _mode_rgba, _mode_cmyk, _mode_i16, _mode_i16_narrow, _mode_f],
    ids=["1", "L", "LA", "P+transparency", "RGBA", "CMYK-jpeg", "I;16", "I;16-12bit", "F-tiff"],
)
def test_every_mode_becomes_rgb(ls, make):
    body, expected_pixels = make()
    ls.routes["/m"] = serve(body)
    image = ImageFetcher(ls.url, None).fetch("/m")
    assert image.mode == "RGB"
    assert image.size == (7, 5)
    for xy, rgb in expected_pixels.items():
        assert image.getpixel(xy) == pytest.approx(rgb, abs=1), xy


def test_cmyk_colors_survive():
    image = to_rgb(Image.open(io.BytesIO(_mode_cmyk()[0])))
    r, g, b = image.getpixel((3, 2))
    assert r > 220 and g < 40 and b < 40


def test_float_outside_unit_range_is_stretched():
    arr = np.array([[-5.0, 0.0, 15.0, np.nan]], dtype=np.float32)
    image = to_rgb(Image.fromarray(arr))
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 255, 64]


def test_exif_orientation_is_applied(ls):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    ls.routes["/rot.jpg"] = serve(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), "image/jpeg")
    image = ImageFetcher(ls.url, None).fetch("/rot.jpg")
    assert image.size == (20, 40)
    red, blue = image.getpixel((15, 5)), image.getpixel((5, 5))
    assert red[0] > 200 and red[2] < 60  # now top-right
    assert blue[2] > 200 and blue[0] < 60


def test_load_image_file(tmp_path):
    path = tmp_path / "a.png"
    Image.new("LA", (9, 4), (0, 0)).save(path)
    image = load_image_file(path)
    assert image.mode == "RGB" and image.size == (9, 4) and image.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="cannot read"):
        load_image_file(tmp_path / "missing.png")
    (tmp_path / "page.html").write_bytes(b"<html></html>")
    with pytest.raises(ImageError, match="HTML"):
        load_image_file(tmp_path / "page.html")
    with pytest.raises(ImageError, match="too large"):
        load_image_file(path, max_bytes=10)


# --- secrets ------------------------------------------------------------------------


def test_api_keys_never_appear_in_errors_or_logs(ls, other, caplog):
    caplog.set_level(logging.DEBUG)
    pat, access = make_pat(), make_access(3600)
    secrets = [LEGACY_KEY, pat, access]

    def echo_auth(req):  # a server that echoes the credentials it got
        return 401, {"Content-Type": "text/html"}, f"<html>bad token {req.auth}</html>".encode()

    ls.routes["/echo"] = echo_auth
    ls.routes["/big"] = serve(b"\0" * 5000)
    ls.routes["/page"] = serve(b"<html>" + LEGACY_KEY.encode() + b"</html>", "text/html")
    ls.routes["/api/token/refresh/"] = refresh_route(pat, [access], [])
    messages = []
    for key in (LEGACY_KEY, pat):
        fetcher = ImageFetcher(ls.url, key, max_bytes=1000, timeout=(1, 1), allowed_hosts=PUBLIC)
        assert key not in repr(fetcher)
        for url, task_id in [
            ("/echo", None),
            ("/missing", None),
            ("/big", None),
            ("/page", None),
            (f"{ls.url}/echo?token={key}", None),
            (f"{other.url}/missing?token={key}", None),
            ("s3://bucket/x.png", None),
            ("ftp://x/y", None),
        ]:
            with pytest.raises(ImageError) as err:
                fetcher.fetch(url, task_id=task_id)
            messages.append(str(err.value))
    ls.routes["/api/token/refresh/"] = lambda req: (400, {}, json.dumps({"refresh": pat}).encode())
    with pytest.raises(ImageError) as err:
        ImageFetcher(ls.url, pat).fetch("/echo")
    messages.append(str(err.value))

    assert len(messages) == 17
    # only our own log lines: urllib3 logs request lines verbatim, so a key that a task URL
    # itself carries would show there
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gem_backend"))
    assert "GET" in logged
    for secret in secrets:
        for message in messages:
            assert secret not in message
        assert secret not in logged
    # the echo route did see the credentials: the test exercises a real leak path
    assert any(r.auth == f"Token {LEGACY_KEY}" for r in ls.requests)


# --- private networks (SSRF) ----------------------------------------------------------


@pytest.mark.parametrize(
    "host, category",
    [
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("[fe80::1]", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("[fd00::1]", "private"),
        ("100.64.0.1", "not globally routable"),
        ("127.0.0.1", "loopback"),  # LS's host, another port: not LS's origin
        ("127.1.2.3", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:169.254.169.254]", "link-local"),  # IPv4-mapped
        ("[::ffff:7f00:1]", "loopback"),
        ("[2002:a00:1::]", "private"),  # 6to4 of 10.0.0.1
        ("[64:ff9b::a9fe:a9fe]", "link-local"),  # NAT64 of 169.254.169.254
        ("2130706433", "loopback"),  # 127.0.0.1 as one number
        ("0x7f.1", "loopback"),
        ("0", "unspecified"),
        ("[::]", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_non_public_addresses_are_refused(ls, host, category):
    fetcher = ImageFetcher(ls.url, LEGACY_KEY, timeout=(1, 1))
    started = time.monotonic()
    with pytest.raises(ImageError, match=f"refused to fetch .*\\({category}") as err:
        fetcher.fetch(f"http://{host}:{ls.port + 1 if host.startswith('127.0.0.1') else 80}/latest/meta-data/")
    assert time.monotonic() - started < 1.0
    assert "GEM_ALLOWED_HOSTS" in str(err.value) and LEGACY_KEY not in str(err.value)
    assert ls.requests == []


def test_name_resolving_to_loopback_is_refused_unless_allow_listed(ls):
    url = f"http://localhost:{ls.port}/data/upload/1/x.png"
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png(4, 3))
    with pytest.raises(ImageError, match=r"localhost resolves to (127\.0\.0\.1|::1) \(loopback\)"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch(url)
    assert ls.requests == []
    # Label Studio's own origin is always fetched from, with its credentials
    assert ImageFetcher(ls.url, LEGACY_KEY).fetch(f"{ls.url}/data/upload/1/x.png").size == (4, 3)
    assert ls.requests[-1].auth == f"Token {LEGACY_KEY}"
    # allowed by name, by address or by network; never with LS's credentials
    for allowed in (["localhost"], "127.0.0.1,::1", ["10.0.0.0/8", "127.0.0.0/8", "::1/128"], "*"):
        ls.requests.clear()
        assert ImageFetcher(ls.url, LEGACY_KEY, allowed_hosts=allowed).fetch(url).size == (4, 3)
        assert [r.auth for r in ls.requests] == [None]
    with pytest.raises(ImageError, match="loopback"):
        ImageFetcher(None, None, allowed_hosts=["*.localhost.example", "10.0.0.0/8"]).fetch(url)


@pytest.mark.parametrize("location", [
    "http://127.0.0.1:{other}/x.png",
    "http://localhost:{ls}/data/upload/1/x.png",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[::ffff:10.0.0.1]/x.png",
    "gopher://127.0.0.1:6379/_INFO",
])
def test_redirect_into_the_private_network_is_refused(ls, other, location):
    location = location.format(other=other.port, ls=ls.port)
    ls.routes["/data/upload/1/r.png"] = lambda req: (302, {"Location": location}, b"")
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png())
    other.routes["/x.png"] = serve(rgb_png())
    with pytest.raises(ImageError, match="refused to fetch|unsupported URL scheme"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("/data/upload/1/r.png")
    assert [r.path for r in ls.requests] == ["/data/upload/1/r.png"]
    assert other.requests == []


def test_redirect_from_an_allowed_host_to_loopback_is_refused(ls, other):
    # "images.internal" is allow-listed (it stands for a MinIO next to Label Studio); it
    # redirects to 127.0.0.1, which is not
    other.routes["/bucket/x.png"] = lambda req: (302, {"Location": f"http://127.0.0.1:{ls.port}/data/upload/1/x.png"}, b"")
    ls.routes["/data/upload/1/x.png"] = serve(rgb_png())
    fetcher = ImageFetcher(None, None, allowed_hosts=["localhost"])
    with pytest.raises(ImageError, match=r"refused to fetch http://127\.0\.0\.1:\d+/data/upload/1/x.png: 127\.0\.0\.1 \(loopback\)"):
        fetcher.fetch(f"http://localhost:{other.port}/bucket/x.png")
    assert [r.path for r in other.requests] == ["/bucket/x.png"] and ls.requests == []


def test_presigned_redirect_to_a_private_bucket_needs_the_allow_list(ls, other):
    ls.routes["/tasks/7/presign/"] = lambda req: (303, {"Location": f"{other.url}/bucket/x.png?X-Amz-Signature=s"}, b"")
    other.routes["/bucket/x.png"] = serve(rgb_png(2, 2))
    with pytest.raises(ImageError, match="loopback"):
        ImageFetcher(ls.url, LEGACY_KEY).fetch("s3://bucket/x.png", task_id=7)
    assert other.requests == []
    assert ImageFetcher(ls.url, LEGACY_KEY, allowed_hosts="127.0.0.1").fetch("s3://bucket/x.png", task_id=7).size == (2, 2)
    assert other.requests[0].auth is None


def _fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """socket.getaddrinfo answering ``answers[name]`` one after the other (the last repeats)."""
    real, asked = socket.getaddrinfo, []

    def getaddrinfo(host, port, family=0, type=0, *args, **kwargs):
        if isinstance(host, bytes):
            host = host.decode()
        if host in answers:
            asked.append(host)
            queue = answers[host]
            ip = queue.pop(0) if len(queue) > 1 else queue[0]
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            return [(fam, socket.SOCK_STREAM, 6, "", (ip, port) if fam == socket.AF_INET else (ip, port, 0, 0))]
        return real(host, port, family, type, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_name_resolving_to_a_private_address_is_refused(ls, monkeypatch):
    _fake_dns(monkeypatch, {"images.example.com": ["10.20.30.40"], "meta.example.com": ["169.254.169.254"]})
    fetcher = ImageFetcher(ls.url, LEGACY_KEY)
    with pytest.raises(ImageError, match=r"images.example.com resolves to 10.20.30.40 \(private\)"):
        fetcher.fetch("https://images.example.com/x.png")
    with pytest.raises(ImageError, match=r"meta.example.com resolves to 169.254.169.254 \(link-local"):
        fetcher.fetch("http://meta.example.com/latest/meta-data/")


def test_connection_goes_to_the_checked_address_dns_rebinding(ls, monkeypatch):
    # first answer 127.0.0.1 (allowed by address), any later one 10.9.9.9 (refused, and not
    # even routable here): the fetch works only if the socket uses the checked answer
    asked = _fake_dns(monkeypatch, {"rebind.test": ["127.0.0.1", "10.9.9.9"]})
    seen_hosts = []

    def route(req):
        return 200, {"Content-Type": "image/png"}, rgb_png(3, 3)

    ls.routes["/x.png"] = route
    original = _Handler._handle

    def recording(self):
        seen_hosts.append(self.headers.get("Host"))
        return original(self)

    monkeypatch.setattr(_Handler, "_handle", recording)
    monkeypatch.setattr(_Handler, "do_GET", recording)
    fetcher = ImageFetcher(None, None, allowed_hosts=["127.0.0.1"], timeout=(1, 2))
    assert fetcher.fetch(f"http://rebind.test:{ls.port}/x.png").size == (3, 3)
    assert asked == ["rebind.test"], "resolved once, then connected to that address"
    assert seen_hosts == [f"rebind.test:{ls.port}"], "the Host header keeps the name"
    # a new connection resolves again, and refuses the new answer
    fetcher.close()
    with pytest.raises(ImageError, match=r"rebind.test resolves to 10.9.9.9 \(private\)"):
        ImageFetcher(None, None, allowed_hosts=["127.0.0.1"]).fetch(f"http://rebind.test:{ls.port}/x.png")


def test_through_a_proxy_the_host_is_checked_before_sending(ls, other, monkeypatch):
    _fake_dns(monkeypatch, {"public.test": ["93.184.216.34"], "inside.test": ["10.1.1.1"]})
    monkeypatch.setenv("HTTP_PROXY", other.url)  # the proxy itself is on loopback: trusted
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    other.routes["/x.png"] = serve(rgb_png(2, 5))  # the proxy gets "GET http://public.test/x.png"
    fetcher = ImageFetcher(None, None)
    assert fetcher.fetch("http://public.test/x.png").size == (2, 5)
    assert other.requests[0].raw_path == "http://public.test/x.png"
    for url in ("http://inside.test/x.png", "http://169.254.169.254/x.png", "http://localhost/x.png"):
        with pytest.raises(ImageError, match="refused to fetch"):
            fetcher.fetch(url)
    assert len(other.requests) == 1


def test_allowed_hosts_are_validated():
    from gem_backend.labelstudio.images import parse_allowed_hosts

    assert parse_allowed_hosts(" MinIO , 10.0.0.0/8,*.corp.example, ::1,[fd00::1],,") == (
        "minio", "10.0.0.0/8", "*.corp.example", "::1", "fd00::1")
    for bad in ("10.0.0.0/33", "http://minio:9000", "minio:9000", "a b", "**.x"):
        with pytest.raises(ValueError, match="not a hostname"):
            parse_allowed_hosts(bad)
