"""Cache of GEM image features (:class:`~gem_backend.segmentation.ImageEmbedding`).

The image tower is the expensive part of a prediction (seconds on a CPU); everything after
it (text similarities, the decision, the regions) is cheap. An annotator clicking on the
same image again and again, or a task predicted in bulk and then opened for interactive
labeling, should pay for it once. Two tiers, like the text cache:

1. an in-process LRU bounded in bytes (always on unless its budget is 0), thread-safe;
2. Redis (optional, ``REDIS_URL``), shared by workers and replicas, with a TTL.

Key: ``sha256(image bytes)`` plus a namespace naming everything that changes the features
(model, weights, GEM depth/iterations/temperature, the model's dtype and the input sizing
``input_size``/``max_long_side``/``square``). The image bytes must still be fetched (they
are the key), but decoding and the forward pass are skipped on a hit; the decoded image's
full oriented size travels with the features.

Redis values are compact: an 8-byte magic + a JSON header (grid, input size, original size,
dtype, and for an image seen through windows each window's box, token grid and padding) + the
patch tokens as raw little-endian float32 (about 2 MB for a 448 x 597 input of ViT-B/16; through
windows every window's tokens, e.g. 35 x 784 for 1344 x 1792 through 448/224 windows), bit-exact, so every worker and replica gives the same prediction whether the
features were computed or fetched (float16, half the size, is read too). Redis failures
never fail a request: one warning, then the LRU only, with a new try every ``retry_after``
seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections import OrderedDict

import numpy as np
import torch

from ..algorithm.methods import method_takes_regions
from ..algorithm.segmentation import ImageEmbedding, SegmentationSettings
from ..algorithm.windows import Window
from .redis_gate import RedisGate

logger = logging.getLogger(__name__)

_MAGIC = b"GIE2"  # GIE1: no windows in the header (still read: one-pass entries did not change)
_OLD_MAGIC = b"GIE1"
_HEAD = struct.Struct("<4sI")  # magic, JSON header length
_DTYPES = {"<f4": 4, "<f2": 2}  # patch token encodings: bytes per value


def image_namespace(settings, segmentation: SegmentationSettings, dtype: str | None = None) -> str:
    """Everything besides the image bytes that changes the cached features: the model and
    GEM settings, the dtype the model runs in (default: ``settings.precision``) and the
    input sizing of ``segmentation``."""
    parts = [settings.model, settings.weights_id, settings.depth, settings.ss_attn_iter,
             settings.ss_attn_temp, dtype or settings.precision,
             segmentation.input_size, segmentation.max_long_side, bool(segmentation.square)]
    # added later: only when not the default, so existing cache entries stay valid
    if segmentation.method != "gem" or segmentation.method_options:
        parts.append(["method", segmentation.method, [list(kv) for kv in segmentation.method_options]])
    if segmentation.windows_above:
        # "v2": each window's tokens, not the v1 tokens stitched on the image grid
        parts.append(["windows", segmentation.windows_above, segmentation.window, segmentation.window_stride,
                      segmentation.window_short_side, "v2"])
    if segmentation.regions != "none" and method_takes_regions(segmentation.method):
        # CorrCLIP's tokens depend on the regions themselves
        parts.append(json.loads(regions_namespace(settings, segmentation)))
    return json.dumps(parts)


def embedding_key(data: bytes, namespace: str) -> str:
    """Cache key of one image's features: sha256 of the namespace and of the bytes."""
    ns = hashlib.sha256(namespace.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{ns}:{hashlib.sha256(data).hexdigest()}"


def embedding_nbytes(emb: ImageEmbedding) -> int:
    guide = 0 if emb.guide is None else int(emb.guide.numel())
    return int(emb.patches.numel() * emb.patches.element_size()) + guide + 256


def encode_embedding(emb: ImageEmbedding, dtype: str = "<f4") -> bytes:
    """ImageEmbedding -> bytes; ``dtype`` of the patch tokens: ``"<f4"`` (exact) or ``"<f2"``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    patches = emb.patches.detach().to(torch.float32).cpu().numpy()
    guide = b"" if emb.guide is None else emb.guide.detach().cpu().numpy().astype(np.uint8).tobytes()
    head = dict(grid=list(emb.grid), input_size=list(emb.input_size), original_size=list(emb.original_size),
                shape=list(patches.shape), dtype=dtype, guide=bool(guide))
    if emb.windows is not None:
        head["windows"] = [[list(w.box), list(w.grid), list(w.pad)] for w in emb.windows]
    header = json.dumps(head).encode()
    return _HEAD.pack(_MAGIC, len(header)) + header + patches.astype(dtype).tobytes() + guide


def decode_embedding(raw: object) -> ImageEmbedding | None:
    """Inverse of :func:`encode_embedding` (tokens in float32); None if malformed."""
    try:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) <= _HEAD.size:
            return None
        magic, hlen = _HEAD.unpack_from(raw)
        if magic not in (_MAGIC, _OLD_MAGIC):
            return None
        header = json.loads(bytes(raw[_HEAD.size:_HEAD.size + hlen]))
        n, dim = (int(v) for v in header["shape"])
        grid = tuple(int(v) for v in header["grid"])
        body = bytes(raw[_HEAD.size + hlen:])
        dtype = header.get("dtype")
        input_size = tuple(int(v) for v in header["input_size"])
        n_patch = _DTYPES[dtype] * n * dim if dtype in _DTYPES else -1
        n_guide = 3 * input_size[0] * input_size[1] if header.get("guide") else 0
        windows = None
        if magic == _MAGIC and header.get("windows") is not None:
            windows = tuple(Window(tuple(int(v) for v in box), tuple(int(v) for v in g), tuple(int(v) for v in pad))
                            for box, g, pad in header["windows"])
            if any(len(w.box) != 4 or len(w.grid) != 2 or len(w.pad) != 4 for w in windows):
                return None
        expected = sum(w.tokens for w in windows) if windows is not None else grid[0] * grid[1]
        if n_patch < 0 or len(body) != n_patch + n_guide or expected != n:
            return None
        patches = np.frombuffer(body[:n_patch], dtype=dtype).astype(np.float32).reshape(n, dim)
        if not np.isfinite(patches).all():
            return None
        guide = None
        if n_guide:
            guide = torch.from_numpy(np.frombuffer(body[n_patch:], np.uint8).reshape(*input_size, 3).copy())
        return ImageEmbedding(patches=torch.from_numpy(patches), grid=grid, input_size=input_size,
                              original_size=tuple(int(v) for v in header["original_size"]), guide=guide,
                              windows=windows)
    except (ValueError, KeyError, TypeError, struct.error):
        return None


class TwoLevelCache:
    """Values by key in two tiers: an in-process LRU bounded in bytes (thread-safe) and Redis
    (``key_prefix`` + key, with a TTL) when a URL is given. Redis failures never fail a request:
    one warning, then the LRU only, with a new try every ``retry_after`` seconds.

    A subclass says how a value becomes Redis bytes and back (:meth:`encode`, :meth:`decode`;
    None: malformed) and what the LRU keeps: the value itself, sized by :meth:`nbytes`, or,
    with ``keep_encoded``, its encoding (smaller, decoded again on each hit).

    Args:
        redis_url: ``redis://...``; None = in-process only. A malformed URL raises here.
        max_bytes: LRU budget; 0 disables the LRU.
        ttl: seconds an entry lives in Redis (0: no expiry).
        key_prefix: prefix of every Redis key.
        retry_after: seconds between Redis retries after a failure.
        redis_timeout: socket timeouts, i.e. the most a dead Redis costs one request.
        what: the cache's name in the Redis warnings.
    """

    keep_encoded = False

    def __init__(self, redis_url: str | None, max_bytes: int, ttl: int, key_prefix: str, retry_after: float,
                 redis_timeout: float, what: str):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.ttl = int(ttl)
        self.retry_after = float(retry_after)
        self._prefix = key_prefix
        self._lru: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._counts = dict(local_hits=0, redis_hits=0, misses=0, redis_invalid=0)
        # no ping at construction (startup stays fast): the first use tells
        self._gate = RedisGate(redis_url, what, logger, self.retry_after, redis_timeout) if redis_url else None

    # ------------------------------------------------------------------ hooks
    def encode(self, value) -> bytes:
        """A value -> its Redis bytes."""
        raise NotImplementedError

    def decode(self, raw: bytes):
        """Redis bytes -> the value; None when malformed."""
        raise NotImplementedError

    def nbytes(self, value) -> int:
        """What a value kept decoded costs the LRU."""
        raise NotImplementedError

    # ------------------------------------------------------------------ API
    def get(self, key: str) -> tuple[object | None, str]:
        """``(value, where)``: where is ``"local"``, ``"redis"`` or ``"miss"``."""
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                self._counts["local_hits"] += 1
        if hit is not None:
            return (self.decode(hit[0]) if self.keep_encoded else hit[0]), "local"
        raw = self._redis_get(key)
        value = self.decode(raw) if raw is not None else None
        if raw is not None and value is None:
            with self._lock:
                self._counts["redis_invalid"] += 1
        if value is not None:
            self._lru_put(key, bytes(raw) if self.keep_encoded else value)
            with self._lock:
                self._counts["redis_hits"] += 1
            return value, "redis"
        with self._lock:
            self._counts["misses"] += 1
        return None, "miss"

    def put(self, key: str, value) -> None:
        raw = self.encode(value) if self.keep_encoded else None
        self._lru_put(key, raw if self.keep_encoded else value)
        client = self._gate.client() if self._gate else None
        if client is None:
            return
        try:
            # a decoded value is encoded only when Redis is there to take it
            client.set(self._prefix + key, raw if raw is not None else self.encode(value),
                       ex=self.ttl if self.ttl > 0 else None)
        except self._gate.errors_types as exc:
            self._gate.down(exc)
            return
        self._gate.up()

    @property
    def stats(self) -> dict:
        with self._lock:
            out: dict = dict(self._counts)
            out.update(entries=len(self._lru), bytes=self._bytes)
        out.update(redis_errors=self._gate.errors if self._gate else 0, redis_ok=bool(self._gate and self._gate.ok))
        return out

    def clear_local(self) -> None:
        with self._lock:
            self._lru.clear()
            self._bytes = 0

    # ------------------------------------------------------------------ tiers
    def _lru_put(self, key: str, entry) -> None:
        size = len(entry) if self.keep_encoded else self.nbytes(entry)
        if self.max_bytes == 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._lru[key] = (entry, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._lru:
                _, (_, freed) = self._lru.popitem(last=False)
                self._bytes -= freed

    def _redis_get(self, key: str) -> bytes | None:
        client = self._gate.client() if self._gate else None
        if client is None:
            return None
        try:
            raw = client.get(self._prefix + key)
        except self._gate.errors_types as exc:
            self._gate.down(exc)
            return None
        self._gate.up()
        return raw


class EmbeddingCache(TwoLevelCache):
    """Image features (:class:`ImageEmbedding`) by key: the LRU keeps them decoded (patch
    tokens as stored), Redis their :func:`encode_embedding` bytes. Arguments as
    :class:`TwoLevelCache`."""

    def __init__(self, redis_url: str | None = None, max_bytes: int = 512 << 20, ttl: int = 86400,
                 key_prefix: str = "gem:image:", retry_after: float = 30.0, redis_timeout: float = 0.5):
        super().__init__(redis_url, max_bytes, ttl, key_prefix, retry_after, redis_timeout, "image feature cache")

    def encode(self, value: ImageEmbedding) -> bytes:
        return encode_embedding(value)

    def decode(self, raw: bytes) -> ImageEmbedding | None:
        return decode_embedding(raw)

    def nbytes(self, value: ImageEmbedding) -> int:
        return embedding_nbytes(value)


# ---------------------------------------------------------------------- regions
def regions_namespace(settings, segmentation: SegmentationSettings) -> str:
    """Everything besides the image bytes that changes an image's SAM 2 regions: the SAM 2
    model, its weights and the mask generator's options (not the GEM model or sizing)."""
    s = segmentation
    return json.dumps(["regions", s.regions, s.regions_model, settings.regions_weights_id(s), s.regions_points,
                       s.regions_iou, s.regions_stability])


class RegionCache(TwoLevelCache):
    """Instance maps (SAM 2 regions, ``[h, w]`` int64) by key, beside the image features: the
    LRU keeps their compact encodings (:func:`~gem_backend.algorithm.sam.encode_regions`, a few
    KB each, against megabytes decoded) and decodes on a hit; Redis the same bytes. Arguments
    as :class:`TwoLevelCache`.
    """

    keep_encoded = True

    def __init__(self, redis_url: str | None = None, max_bytes: int = 64 << 20, ttl: int = 86400,
                 key_prefix: str = "gem:regions:", retry_after: float = 30.0, redis_timeout: float = 0.5):
        super().__init__(redis_url, max_bytes, ttl, key_prefix, retry_after, redis_timeout, "regions cache")

    def encode(self, value: np.ndarray) -> bytes:
        from ..algorithm.sam import encode_regions

        return encode_regions(value)

    def decode(self, raw: bytes) -> np.ndarray | None:
        from ..algorithm.sam import decode_regions

        return decode_regions(raw)
