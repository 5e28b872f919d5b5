"""The image's HEALTHCHECK: is the backend on this container up?

    python /app/docker/healthcheck.py            # exit 0: healthy, 1: not

GET ``http://127.0.0.1:$PORT/health`` (stdlib only, no proxy, 4 s timeout) with basic auth
when ``BASIC_AUTH_USER`` is set (``BASIC_AUTH_PASS`` may be empty), as the app requires it
on every route then. Healthy only on HTTP 200 with a JSON body whose ``status`` is ``UP``:
the model may still be loading (``"model": "loading"``, the start period covers that); a
model that failed to load answers 503 with ``status: ERROR``. One line on stdout says why,
which ``docker inspect`` shows under ``State.Health``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Mapping, Sequence

DEFAULT_PORT = 9090
TIMEOUT_S = 4.0


def health_url(environ: Mapping[str, str]) -> str:
    """``http://HOST:PORT/health`` of this container's server: 127.0.0.1 unless ``HOST`` names
    one address (the server then listens there only)."""
    port = (environ.get("PORT") or "").strip() or str(DEFAULT_PORT)
    host = (environ.get("HOST") or "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"http://{host}:{port}/health"


def auth_header(environ: Mapping[str, str]) -> str | None:
    """``Basic ...`` for ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``; None when no user is set
    (an empty value counts as unset, as for the app)."""
    user = environ.get("BASIC_AUTH_USER") or ""
    if not user:
        return None
    password = environ.get("BASIC_AUTH_PASS") or ""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def check(url: str, authorization: str | None = None, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, one-line reason)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if authorization:
        request.add_header("Authorization", authorization)
    # no proxy: HTTP(S)_PROXY in the container's environment must not catch 127.0.0.1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            code, raw = response.status, response.read(65536)
    except urllib.error.HTTPError as err:
        hint = " (BASIC_AUTH_USER/BASIC_AUTH_PASS do not match the server's)" if err.code == 401 else ""
        return False, f"{url}: HTTP {err.code}{hint}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return False, f"{url}: {reason}"
    if code != 200:
        return False, f"{url}: HTTP {code}"
    try:
        body = json.loads(raw)
    except ValueError:
        return False, f"{url}: HTTP 200 but not JSON: {raw[:80]!r}"
    status = body.get("status") if isinstance(body, dict) else None
    if status != "UP":
        return False, f"{url}: status {status!r}"
    return True, f"{url}: UP (model {body.get('model', '?')})"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(description="exit 0 when this container's gem-backend /health is UP")
    p.add_argument("--url", help="health URL (default http://127.0.0.1:$PORT/health)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds (default %(default)s)")
    args = p.parse_args(argv)
    ok, reason = check(args.url or health_url(env), auth_header(env), args.timeout)
    print(("healthy: " if ok else "unhealthy: ") + reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
