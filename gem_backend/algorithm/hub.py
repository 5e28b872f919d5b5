"""What every weights loader shares: its error type and the fast hub-reachability check.

:func:`~gem_backend.algorithm.models.load_gem_model` (CLIP) and
:func:`~gem_backend.algorithm.dino.load_dino` (DINO) load weights from a local file or the
Hugging Face cache; when weights are not cached and the hub cannot be reached they fail at
once with what to download (``HF_HUB_OFFLINE``, or no connection to ``HF_ENDPOINT`` or its
proxy within :data:`HUB_PROBE_TIMEOUT_S`), not after the Hugging Face client's own minute
of retries.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["ModelLoadError", "HUB_PROBE_TIMEOUT_S", "hub_reachable", "hub_offline_reason"]

HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(RuntimeError):
    """The model or its weights could not be loaded; the message says what to do."""


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (``HF_ENDPOINT``), or to the proxy
    the environment routes it through, opens within ``timeout`` seconds, name lookup included."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and host and not proxy_bypass(host):
        purl = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = purl.hostname, purl.port or (1080 if purl.scheme.startswith("socks") else 80)
    if not host:
        return False
    opened: list[bool] = []

    def attempt() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    probe = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened and opened[0])


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE``, or no connection), or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return (f"the Hugging Face hub {constants.ENDPOINT} (HF_ENDPOINT) could not be reached "
                f"within {HUB_PROBE_TIMEOUT_S:g} s")
    return None
