"""Task image URL in, oriented RGB ``PIL.Image.Image`` out.

Where an image URL from ``task["data"]`` is fetched from, and with which credentials:

==========================================  ============================================
URL                                         fetched from / credentials
==========================================  ============================================
``/data/upload/1/x.png``,                   ``LABEL_STUDIO_URL`` + URL, with the API key
``/data/local-files/?d=...`` (relative)
``http(s)://<LS origin>/...``               as is, with the API key
``http(s)://elsewhere/...``                 as is, no credentials
``s3://``, ``gs://``, ``azure-blob://``     ``{LS}/tasks/{task_id}/presign/?fileuri=<b64>``
                                            with the API key (same form as
                                            label-studio-sdk's ``get_local_path``); the
                                            redirect to the bucket gets no credentials
``data:image/...;base64,...``               decoded locally
anything else (``file:``, ``ftp:``, ...)    refused with :class:`ImageError`
==========================================  ============================================

"LS origin" is scheme + host + port of ``label_studio_url``. Redirects are followed by hand
(at most 10) so that every hop is checked against the same rule.

Private networks (SSRF): a task URL is user input, so the fetcher must not become a proxy
into the network it runs in. Every connection (every redirect hop included) resolves the
host itself and refuses loopback, link-local (169.254.0.0/16 with the cloud metadata
service, fe80::/10), private (10/8, 172.16/12, 192.168/16, fc00::/7), shared (100.64/10),
multicast, reserved and unspecified addresses, also when written as IPv4-mapped, 6to4 or
NAT64 IPv6 or as a bare number (``http://2130706433/``). Exempt: Label Studio's own origin
and ``allowed_hosts`` (``GEM_ALLOWED_HOSTS``: hostnames, ``*.suffix`` wildcards, IPs or
CIDRs; ``*`` turns the check off). The socket connects to the very address that was
checked (the hostname still goes in the Host header, TLS SNI and certificate check), so a
DNS answer that changes between check and connect (DNS rebinding) cannot get around it.
Behind an HTTP(S) proxy from the environment the proxy resolves the name: the fetcher then
checks its own resolution of the host before sending, and the proxy's answer is trusted.

API keys: a legacy token goes as ``Authorization: Token <key>``. A personal access token (a
JWT refresh token) is exchanged at ``POST {LS}/api/token/refresh/`` for an access token sent
as ``Authorization: Bearer <access>``; the access token is cached until 30 s before its
``exp`` and refreshed once on a 401. label-studio-sdk's ``TokensClientExt`` does the same
exchange but needs the SDK's httpx client wrapper (a second HTTP stack next to this
``requests.Session``, with its own proxy, TLS and timeout settings), builds the refresh URL
with ``urljoin`` (which drops a path prefix such as ``https://host/labelstudio``) and does
not retry on 401, so the few lines of the exchange live here instead.

Neither the API key nor the access token ever appears in an exception message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Iterable
from urllib.parse import unquote_to_bytes, urljoin, urlsplit, urlunsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

__all__ = [
    "AddressGuard",
    "BlockedAddressError",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_TIMEOUT",
    "ImageError",
    "ImageFetcher",
    "load_image_file",
    "original_size",
    "parse_allowed_hosts",
    "to_rgb",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = (5, 30)  # (connect, read) seconds
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000
MAX_REDIRECTS = 10
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
# refresh a bit early so a token does not expire between the check and the request
_TOKEN_EXPIRY_MARGIN_S = 30
_CHUNK = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ImageError(Exception):
    """The image could not be fetched or decoded; the message says why, without secrets."""


class BlockedAddressError(ImageError):
    """A URL's host resolves only to addresses the fetcher does not connect to (SSRF guard)."""


# --- address guard (SSRF) ---------------------------------------------------------------

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOSTNAME_RE = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped ::ffff:a.b.c.d, 6to4, NAT64), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_category(ip: IPAddress) -> str | None:
    """Why ``ip`` is not fetched from (``"loopback"``, ``"private"``, ...), None if public."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        inner = address_category(embedded)
        return f"{inner} IPv4 {embedded} inside IPv6" if inner else None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local, where cloud metadata services answer"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def parse_allowed_hosts(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``GEM_ALLOWED_HOSTS``: comma-separated hostnames, ``*.suffix`` wildcards, IPs, CIDRs or
    ``*`` -> normalised tuple; raises ``ValueError`` naming a malformed entry."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for raw in items:
        item = str(raw).strip().lower()
        if not item:
            continue
        if item != "*":
            try:
                item = str(ipaddress.ip_network(item.strip("[]"), strict=False)) if "/" in item else str(
                    ipaddress.ip_address(item.strip("[]")))
            except ValueError:
                if "/" in item or ":" in item or not _HOSTNAME_RE.match(item):
                    raise ValueError(f"{raw!r} is not a hostname, *.domain, IP address or CIDR network") from None
                item = item.rstrip(".")
        out.append(item)
    return tuple(dict.fromkeys(out))


class AddressGuard:
    """Which hosts and addresses the fetcher connects to (see the module docstring).

    Args:
        allowed: entries of :func:`parse_allowed_hosts`.
        exempt_origins: ``(scheme, host, port)`` origins never checked (Label Studio's).
    """

    def __init__(self, allowed: Iterable[str] = (), exempt_origins: Iterable[tuple[str, str, int]] = ()):
        entries = parse_allowed_hosts(list(allowed))
        self.allow_all = "*" in entries
        self._names: set[str] = set()
        self._suffixes: list[str] = []
        self._networks: list[IPNetwork] = []
        for entry in entries:
            if entry == "*":
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    self._suffixes.append(entry[1:])  # ".example.com"
                else:
                    self._names.add(entry)
        self._exempt = {(scheme, host.lower().strip("[]").rstrip("."), port) for scheme, host, port in exempt_origins}

    def __repr__(self) -> str:
        return (f"AddressGuard(allow_all={self.allow_all}, names={sorted(self._names)}, "
                f"suffixes={self._suffixes}, networks={[str(n) for n in self._networks]})")

    def host_exempt(self, scheme: str, host: str, port: int) -> bool:
        """True when ``host`` is not checked at all: Label Studio's origin, or allowed by name."""
        if self.allow_all:
            return True
        name = host.lower().strip("[]").rstrip(".")
        if (scheme, name, port) in self._exempt or name in self._names:
            return True
        return any(name.endswith(suffix) for suffix in self._suffixes)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why a connection to ``ip`` is refused, None when it is allowed."""
        if any(ip.version == net.version and ip in net for net in self._networks):
            return None
        embedded = _embedded_ipv4(ip)
        if embedded is not None and any(embedded in net for net in self._networks if net.version == 4):
            return None
        return address_category(ip)

    def addresses(self, scheme: str, host: str, port: int) -> list[str] | None:
        """The checked addresses to connect to, in resolver order; None when ``host`` is exempt
        (connect as usual). Raises :class:`BlockedAddressError` when every address is refused,
        ``socket.gaierror`` when the name does not resolve."""
        if self.host_exempt(scheme, host, port):
            return None
        from urllib3.util.connection import allowed_gai_family

        infos = socket.getaddrinfo(host.strip("[]"), port, allowed_gai_family(), socket.SOCK_STREAM)
        allowed: list[str] = []
        refused: list[tuple[str, str]] = []
        for info in infos:
            text = str(info[4][0])
            try:
                ip = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                refused.append((text, "not an IP address"))
                continue
            why = self.refusal(ip)
            if why is None:
                if text not in allowed:
                    allowed.append(text)
            else:
                refused.append((text, why))
        if not allowed:
            ip, why = refused[0] if refused else ("no address", "unresolvable")
            shown = host.strip("[]").rstrip(".")
            target = shown if shown == ip else f"{shown} resolves to {ip}"
            raise BlockedAddressError(
                f"{target} ({why}): only public addresses are fetched, besides Label Studio's "
                f"origin (LABEL_STUDIO_URL) and GEM_ALLOWED_HOSTS")
        if refused:
            logger.debug("%s: skipping refused addresses %s", host, refused)
        return allowed


def _guarded_connection(base: type, guard: AddressGuard, scheme: str) -> type:
    """``base`` (urllib3's HTTP(S)Connection) connecting only to addresses ``guard`` allows,
    to the very address it checked; Host header, SNI and certificate check keep the name."""

    class GuardedConnection(base):
        def _new_conn(self):
            dns_host = self._dns_host
            try:
                addresses = guard.addresses(scheme, dns_host, self.port)
            except socket.gaierror as exc:
                raise NameResolutionError(self.host, self, exc) from exc
            if addresses is None:
                return super()._new_conn()
            error: Exception | None = None
            for address in addresses:
                self._dns_host = address  # a numeric host: no second DNS lookup
                try:
                    return super()._new_conn()
                except (NewConnectionError, ConnectTimeoutError) as exc:
                    error = exc
                finally:
                    self._dns_host = dns_host
            assert error is not None
            raise error

    GuardedConnection.__name__ = f"Guarded{base.__name__}"
    return GuardedConnection


class _GuardedAdapter(HTTPAdapter):
    """requests adapter whose direct connections go through :class:`AddressGuard`."""

    def __init__(self, guard: AddressGuard, **kwargs: Any) -> None:
        self._guard = guard  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        http = _guarded_connection(HTTPConnection, self._guard, "http")
        https = _guarded_connection(HTTPSConnection, self._guard, "https")
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }


# --- decoding ---------------------------------------------------------------------------


def _sniff(data: bytes) -> str:
    """A few words on what non-image bytes look like; never echoes the bytes."""
    if not data:
        return "an empty body"
    head = data[:512].lstrip().lower()
    if head.startswith(b"\xff\xd8"):
        return "a truncated or corrupt JPEG"
    if head.startswith(b"\x89png"):
        return "a truncated or corrupt PNG"
    if b"<svg" in head or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "an SVG (vector images are not supported, convert it to PNG)"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<body" in head:
        return "an HTML page"
    if head.startswith(b"<"):
        return "XML/HTML text"
    if head.startswith((b"{", b"[")):
        return "JSON"
    try:
        data[:512].decode("utf-8")
        return "plain text"
    except UnicodeDecodeError:
        return "unrecognized binary data"


def _stretch_to_uint8(image: Image.Image) -> Image.Image:
    """I, I;16*, F -> L. Values already in 0..255 are kept, floats in [0, 1] are scaled by
    255, anything else is stretched from its own min..max (16-bit and float scans seldom use
    their full range, so dividing by 257 would give a near-black picture)."""
    arr = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("L", image.size, 0)
    arr = np.where(finite, arr, 0.0)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = arr
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB.

    Transparency (LA, RGBA, PA, P/L/RGB with a ``transparency`` entry) is composited on
    white, as Label Studio shows it on its white canvas; I/I;16/F are mapped to 8 bit (see
    ``_stretch_to_uint8``); CMYK, YCbCr, 1, L, ... use Pillow's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        "transparency" in image.info and mode in ("P", "L", "RGB", "1")
    ):
        return _on_white(image)
    if mode == "F" or mode.startswith("I"):
        return _stretch_to_uint8(image).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"cannot convert a {mode} image to RGB: {exc}") from None


ORIGINAL_SIZE_KEY = "gem_original_size"


def original_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the image as Label Studio shows it (EXIF-oriented, full
    resolution), also when it was decoded at a reduced JPEG scale (``min_size``)."""
    return tuple(image.info.get(ORIGINAL_SIZE_KEY, image.size))


def _pillow_limit_at_least(max_pixels: int) -> None:
    """Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` (179 MP) by itself: raise its
    limit to ours, so that ``max_pixels`` (``GEM_MAX_IMAGE_PIXELS``) is the one that decides."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb(source: str, exc: Exception, max_pixels: int) -> ImageError:
    claimed = re.search(r"\((\d+) pixels\)", str(exc))
    return ImageError(f"image too large: {source} claims {claimed.group(1) if claimed else 'too many'} pixels, "
                      f"the limit is {max_pixels} (a decompression bomb?)")


def decode_image(data: bytes, source: str, max_pixels: int, content_type: str | None = None,
            min_size: int | None = None) -> Image.Image:
    """Bytes -> oriented RGB image, refusing oversized images before their pixels decode.

    ``min_size``: the caller needs a short side of at least this many pixels only; a JPEG
    is then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still gives it, several
    times faster on large photos. :func:`original_size` still gives the full size.
    """
    ctype = f"content-type {content_type!r}" if content_type else "no content-type"
    if not data:
        raise ImageError(f"not an image: {source} gave an empty body ({ctype})")
    _pillow_limit_at_least(max_pixels)
    try:
        # Image.open only parses the header: the size is known, the pixels are not decoded
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _bomb(source, exc, max_pixels) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError(
            f"not an image: {source} gave {len(data)} bytes of {_sniff(data)} ({ctype})"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {source} is {width}x{height} = {width * height} pixels, "
            f"the limit is {max_pixels}"
        )
    full_size = (width, height)
    if min_size and image.format == "JPEG" and min(width, height) > 2 * min_size:
        scale = min_size / min(width, height)
        image.draft("RGB", (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise _bomb(source, exc, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(
            f"cannot decode {image.format or 'image'} from {source} ({len(data)} bytes, {ctype}): {exc}"
        ) from None
    try:
        # browsers (and so Label Studio) show photos EXIF-rotated; masks must match that
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block must not lose an otherwise good image
        logger.warning("ignoring unreadable EXIF orientation in %s: %s", source, exc)
        oriented = image
    if oriented is None:
        oriented = image
    if oriented.size != image.size:  # rotated by 90 or 270 degrees
        full_size = full_size[::-1]
    rgb = to_rgb(oriented)
    rgb.info[ORIGINAL_SIZE_KEY] = full_size
    return rgb


def load_image_file(
    path: str | os.PathLike,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
) -> Image.Image:
    """Local image file -> RGB ``PIL.Image.Image`` with EXIF orientation applied.

    Same mode handling, limits and ``min_size`` as :meth:`ImageFetcher.fetch`; raises
    :class:`ImageError`.
    """
    source = os.fspath(path)
    try:
        size = os.path.getsize(source)
        if size <= max_bytes:
            with open(source, "rb") as fh:
                data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read {source}: {exc.strerror or exc}") from None
    if size > max_bytes or len(data) > max_bytes:
        raise ImageError(f"image too large: {source} is {size} bytes, the limit is {max_bytes}")
    return decode_image(data, source, max_pixels, min_size=min_size)


# --- fetching ---------------------------------------------------------------------------


def _jwt_payload(token: str) -> dict | None:
    """The JSON payload of a JWT-shaped token (signature not checked), or None."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class ImageFetcher:
    """Fetches task images, from Label Studio with its credentials or from elsewhere without.

    - ``label_studio_url``: e.g. ``http://127.0.0.1:8080`` (a path prefix is kept); needed for
      relative URLs and cloud storage URIs.
    - ``api_key``: legacy token or personal access token; None sends no credentials.
    - ``timeout``: ``(connect, read)`` seconds for each request.
    - ``max_bytes``: download cap; the body is streamed and dropped past it.
    - ``max_pixels``: width*height cap, checked from the image header before decoding.
    - ``allowed_hosts``: hosts, IPs or networks fetched from although not public (see the
      module docstring, ``GEM_ALLOWED_HOSTS``); Label Studio's origin always is.

    One ``requests.Session`` per fetcher (environment proxies and CA settings apply); the
    token exchange is serialized by a lock. ``close()`` or ``with`` releases connections.
    """

    def __init__(
        self,
        label_studio_url: str | None,
        api_key: str | None,
        timeout: tuple[float, float] | float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allowed_hosts: str | Iterable[str] | None = None,
    ) -> None:
        self.label_studio_url = label_studio_url.strip().rstrip("/") if label_studio_url else None
        if self.label_studio_url and _origin(self.label_studio_url) is None:
            raise ValueError(
                f"LABEL_STUDIO_URL must start with http:// or https:// and name a host, "
                f"got {self.label_studio_url!r}"
            )
        self._ls_origin = _origin(self.label_studio_url) if self.label_studio_url else None
        self._api_key = api_key.strip() if api_key and api_key.strip() else None
        self.timeout = timeout
        self.max_bytes = int(max_bytes)
        self.max_pixels = int(max_pixels)

        self._pat_payload = _jwt_payload(self._api_key) if self._api_key else None
        if self._api_key is None:
            self.auth_mode = "none"
        elif self._pat_payload is not None and self._pat_payload.get("token_type") == "refresh":
            self.auth_mode = "pat"
        elif self._pat_payload is not None:
            self.auth_mode = "bearer"  # an access token given directly: sent as is
        else:
            self.auth_mode = "legacy"
        self._access_token: str | None = None
        self._access_exp: float | None = None
        self._token_lock = threading.Lock()

        from ..version import __version__

        self.guard = AddressGuard(parse_allowed_hosts(allowed_hosts),
                                  [self._ls_origin] if self._ls_origin else [])
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"gem-backend/{__version__} {requests.utils.default_user_agent()}"
        adapter = _GuardedAdapter(self.guard)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"ImageFetcher({self.label_studio_url!r}, auth={self.auth_mode})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "ImageFetcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- public -------------------------------------------------------------------------

    def fetch(self, url: str, task_id: int | str | None = None, min_size: int | None = None) -> Image.Image:
        """Image URL from a task -> RGB ``PIL.Image.Image``, EXIF orientation applied.

        ``task_id`` is needed for cloud storage URIs (``s3://``, ``gs://``,
        ``azure-blob://``). ``min_size``: see :func:`_decode` (the full, oriented size is
        :func:`original_size`). Raises :class:`ImageError` for anything that goes wrong.
        """
        data, content_type, source = self.fetch_raw(url, task_id)
        return decode_image(data, source, self.max_pixels, content_type, min_size=min_size)

    def fetch_bytes(self, url: str, task_id: int | str | None = None) -> bytes:
        """The raw bytes behind an image URL (same routing, credentials and byte cap as
        :meth:`fetch`, no decoding). Raises :class:`ImageError`."""
        return self.fetch_raw(url, task_id)[0]

    # -- secrets ------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` with this fetcher's API key and access token replaced by ``***`` (for
        messages and logs that may quote a reply)."""
        for secret in (self._api_key, self._access_token):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _error(self, message: str) -> ImageError:
        return ImageError(self.scrub(message))

    def _describe(self, url: str) -> str:
        """URL for messages: no userinfo; no query off Label Studio (presigned signatures)."""
        if url.startswith("data:"):
            return f"data: URI ({len(url)} chars)"
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port:
                host = f"{host}:{parts.port}"
        except ValueError:
            return "<unparsable URL>"
        query = parts.query if self._is_ls(url) else ("..." if parts.query else "")
        return self.scrub(urlunsplit((parts.scheme, host, parts.path, query, "")))

    # -- routing ------------------------------------------------------------------------

    def _is_ls(self, url: str) -> bool:
        return self._ls_origin is not None and _origin(url) == self._ls_origin

    def _resolve(self, url: str, task_id: int | str | None) -> str:
        """Task URL -> absolute http(s) URL to request."""
        try:
            parts = urlsplit(url)
        except ValueError:
            raise self._error("malformed image URL") from None
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if not parts.hostname:
                raise self._error(f"URL has no host: {self._describe(url)}")
            return url
        if scheme in CLOUD_SCHEMES:
            if not self.label_studio_url:
                raise self._error(
                    f"{scheme}:// URIs are resolved through Label Studio, but LABEL_STUDIO_URL is not set"
                )
            if task_id is None or str(task_id).strip() == "":
                raise self._error(f"{scheme}:// URIs need the task id to ask Label Studio for a presigned URL")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{self.label_studio_url}/tasks/{task_id}/presign/?fileuri={fileuri}"
        if not scheme and not parts.netloc and parts.path:
            if not self.label_studio_url:
                raise self._error(
                    f"relative URL {self._describe(url)} needs LABEL_STUDIO_URL to be set"
                )
            return f"{self.label_studio_url}/{url.lstrip('/')}"
        shown = f"{scheme}:" if scheme else ("a protocol-relative URL" if parts.netloc else "an empty URL")
        raise self._error(
            f"unsupported image URL scheme {shown} (expected http(s), a Label Studio relative "
            "path, s3://, gs://, azure-blob:// or a data: URI)"
        )

    # -- auth ---------------------------------------------------------------------------

    def auth_header(self, force_refresh: bool = False) -> dict[str, str]:
        """The ``Authorization`` header for Label Studio requests (``{}`` without a key); a
        personal access token is exchanged for an access token first, again when
        ``force_refresh``. Raises :class:`ImageError` when the exchange fails."""
        if self.auth_mode == "none":
            return {}
        if self.auth_mode == "legacy":
            return {"Authorization": f"Token {self._api_key}"}
        if self.auth_mode == "bearer":
            return {"Authorization": f"Bearer {self._api_key}"}
        return {"Authorization": f"Bearer {self._access(force_refresh)}"}

    def _access(self, force_refresh: bool) -> str:
        with self._token_lock:
            fresh = (
                self._access_token is not None
                and (self._access_exp is None or time.time() < self._access_exp - _TOKEN_EXPIRY_MARGIN_S)
            )
            if force_refresh or not fresh:
                self._refresh_access()
            assert self._access_token is not None
            return self._access_token

    def _refresh_access(self) -> None:
        exp = (self._pat_payload or {}).get("exp")
        if isinstance(exp, (int, float)) and exp < time.time():
            raise self._error(
                "the personal access token in LABEL_STUDIO_API_KEY has expired; "
                "create a new one in Label Studio (Account & Settings > Personal Access Token)"
            )
        url = f"{self.label_studio_url}/api/token/refresh/"
        try:
            resp = self.session.post(url, json={"refresh": self._api_key}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise self._error(
                f"cannot reach Label Studio to exchange the personal access token at "
                f"{self._describe(url)}: {type(exc).__name__}"
            ) from None
        with resp:
            if resp.status_code != 200:
                raise self._error(
                    f"Label Studio refused the personal access token: HTTP {resp.status_code} from "
                    f"{self._describe(url)} (is LABEL_STUDIO_API_KEY a current token of this instance?)"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access:
            raise self._error(f"no access token in the reply of {self._describe(url)}")
        payload = _jwt_payload(access) or {}
        exp = payload.get("exp")
        self._access_token = access
        self._access_exp = float(exp) if isinstance(exp, (int, float)) else None
        logger.debug("exchanged the personal access token for an access token (exp=%s)", exp)

    # -- transfer -----------------------------------------------------------------------

    def fetch_raw(self, url: str, task_id: int | str | None) -> tuple[bytes, str | None, str]:
        """A task image's bytes, undecoded: ``(body, content type or None, description of the
        URL for messages)``, with the routing, credentials, address guard and byte cap of
        :meth:`fetch`. Raises :class:`ImageError`."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError("empty image URL")
        url = url.strip()
        if url[:5].lower() == "data:":
            return self._data_uri(url)
        target = self._resolve(url, task_id)
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._request(target)
            if not resp.is_redirect:
                break
            location = resp.headers.get("Location", "")
            resp.close()
            next_url = urljoin(target, location)
            if urlsplit(next_url).scheme.lower() not in ("http", "https"):
                raise self._error(f"{self._describe(target)} redirected to an unsupported URL scheme")
            target = next_url
        else:
            raise self._error(f"too many redirects fetching {self._describe(url)}")
        with resp:
            return self._read(resp, target)

    def _request(self, target: str) -> requests.Response:
        with_credentials = self._is_ls(target) and self.auth_mode != "none"
        try:
            headers = self.auth_header() if with_credentials else {}
            resp = self._send(target, headers)
            if resp.status_code == 401 and with_credentials and self.auth_mode == "pat":
                # the access token may have been revoked or expired early: one fresh try
                resp.close()
                resp = self._send(target, self.auth_header(force_refresh=True))
        except BlockedAddressError as exc:
            raise self._error(f"refused to fetch {self._describe(target)}: {exc}") from None
        except ImageError:
            raise
        except requests.Timeout:
            raise self._error(f"timed out fetching {self._describe(target)} (timeout {self.timeout} s)") from None
        except requests.RequestException as exc:
            raise self._error(f"cannot fetch {self._describe(target)}: {type(exc).__name__}") from None
        if resp.status_code >= 400:
            status = resp.status_code
            resp.close()
            hint = ""
            if status in (401, 403):
                if with_credentials:
                    hint = " (check LABEL_STUDIO_API_KEY"
                    if self.auth_mode == "legacy":
                        hint += "; if legacy tokens are disabled, use a personal access token"
                    hint += ")"
                elif self._ls_origin is not None:
                    hint = " (no credentials sent: the URL is not on LABEL_STUDIO_URL's origin)"
                else:
                    hint = " (no credentials sent: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY not set)"
            raise self._error(f"HTTP {status} fetching {self._describe(target)}{hint}")
        return resp

    def _send(self, target: str, headers: dict[str, str]) -> requests.Response:
        logger.debug("GET %s%s", self._describe(target), " (with credentials)" if headers else "")
        self._check_proxied(target)
        return self.session.get(
            target, headers=headers, timeout=self.timeout, stream=True, allow_redirects=False
        )

    def _check_proxied(self, target: str) -> None:
        """Through a proxy the guarded sockets reach the proxy, not the host: check the host
        here, as this process resolves it (the proxy's own resolution is trusted)."""
        if self.guard.allow_all:
            return
        proxies = self.session.merge_environment_settings(target, {}, None, None, None)["proxies"]
        if not requests.utils.select_proxy(target, proxies):
            return
        origin = _origin(target)
        if origin is None:
            return
        try:
            self.guard.addresses(*origin)
        except socket.gaierror:
            pass  # the proxy may resolve names this process cannot

    def _read(self, resp: requests.Response, target: str) -> tuple[bytes, str | None, str]:
        source = self._describe(target)
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise self._error(
                f"image too large: {source} announces {length} bytes, the limit is {self.max_bytes}"
            )
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(_CHUNK):
                total += len(chunk)
                if total > self.max_bytes:
                    raise self._error(
                        f"image too large: {source} sent more than {self.max_bytes} bytes"
                    )
                chunks.append(chunk)
        except ImageError:
            raise
        except requests.RequestException as exc:
            kind = "timed out" if isinstance(exc, requests.Timeout) else type(exc).__name__
            raise self._error(f"download of {source} failed: {kind}") from None
        return b"".join(chunks), resp.headers.get("Content-Type"), source

    def _data_uri(self, url: str) -> tuple[bytes, str | None, str]:
        header, sep, payload = url[5:].partition(",")
        source = f"data: URI ({len(url)} chars)"
        if not sep:
            raise ImageError(f"malformed {source}: no comma")
        params = header.split(";")
        media_type = params[0] or None
        is_base64 = any(p.strip().lower() == "base64" for p in params[1:])
        # base64 grows 4:3; refuse before allocating the decoded copy
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageError(f"image too large: {source} holds more than {self.max_bytes} bytes")
        try:
            if is_base64:
                data = base64.b64decode("".join(unquote_to_bytes(payload).decode("ascii").split()), validate=True)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ImageError(f"malformed {source}: bad base64") from None
        return data, media_type, source
