"""Cache of text embeddings for label prompts.

Encoding label prompts through the CLIP text tower is cheap per label but adds
up across requests, replicas and restarts, so embeddings are cached in two
tiers:

1. an in-process LRU (always on, thread-safe), and
2. Redis (optional, shared between processes and machines).

Redis is strictly an optimisation: when it is unreachable the cache logs one
warning, keeps working from the LRU and the encoder, and probes Redis again at
most every ``retry_after`` seconds.

Redis layout
------------
key:   ``key_prefix + sha256(namespace)[:16 hex] + ":" + sha256(label)[64 hex]``
       (bounded length, no raw user text, identical on every machine).
value: 8-byte header ``b"GTE1"`` + ``uint32 little-endian D``, followed by
       ``D`` little-endian float32 values (``8 + 4*D`` bytes in total).
A value whose header, length or contents do not check out is treated as a miss
and overwritten with a freshly encoded vector.  Keys carry a TTL (``GEM_TEXT_CACHE_TTL``,
30 days), so under ``maxmemory-policy volatile-lru`` Redis may evict them, and never the
durable state that shares the server (RELIABILITY.md, Redis keys).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from .redis_gate import RedisGate

logger = logging.getLogger(__name__)

_MAGIC = b"GTE1"
_HEADER = struct.Struct("<4sI")  # magic, dimension D


def _encode_value(vec: np.ndarray) -> bytes:
    """float32 vector ``[D]`` -> header + little-endian float32 bytes."""
    return _HEADER.pack(_MAGIC, vec.shape[0]) + vec.astype("<f4", copy=False).tobytes()


def _decode_value(raw: object) -> np.ndarray | None:
    """Inverse of :func:`_encode_value`; ``None`` for anything malformed."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) <= _HEADER.size:
        return None
    magic, dim = _HEADER.unpack_from(raw)
    if magic != _MAGIC or dim == 0 or len(raw) != _HEADER.size + 4 * dim:
        return None
    vec = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).astype(np.float32)
    if not np.isfinite(vec).all():
        return None
    vec.setflags(write=False)
    return vec


class TextEmbeddingCache:
    """Text embeddings of label prompts: an in-process LRU, and Redis when a URL is given.

    Args:
        namespace: identifies the embedding space, built by the caller from
            (model name, pretrained source, prompt template set).  Entries of
            different namespaces never mix.
        redis_url: e.g. ``redis://:password@host:6379/0``; ``None`` = LRU only.
            A malformed URL raises ``ValueError`` here (configuration error);
            an unreachable server does not.
        maxsize: LRU capacity in labels (``0`` disables the LRU).
        key_prefix: prefix of every Redis key.
        retry_after: seconds between reconnection attempts after a Redis failure.
        redis_timeout: socket connect/read timeout in seconds, i.e. the most a
            dead or hung Redis costs one request (once per ``retry_after``).

    Thread-safe: one instance may be shared by all worker threads.  Two threads
    missing the same label at the same time may both encode it (harmless).
    """

    def __init__(
        self,
        namespace: str,
        redis_url: str | None = None,
        maxsize: int = 4096,
        key_prefix: str = "gem:text:",
        retry_after: float = 30.0,
        redis_timeout: float = 0.5,
        ttl: int = 30 * 86400,
    ):
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        if ttl < 1:
            raise ValueError("ttl must be >= 1 s: a Redis cache entry without one is never evicted")
        self.ttl = int(ttl)
        self.namespace = namespace
        self.maxsize = int(maxsize)
        self.retry_after = float(retry_after)
        ns_hash = hashlib.sha256(namespace.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        self._key_base = f"{key_prefix}{ns_hash}:"

        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_lock = threading.Lock()
        self._dim: int | None = None  # embedding width, learnt from the first vector seen

        self._state_lock = threading.Lock()  # guards counters and Redis health state
        self._counts = dict(local_hits=0, redis_hits=0, misses=0, encoded=0, redis_invalid=0)
        self._redis = None
        self._redis_errors: tuple = (OSError,)
        self._gate: RedisGate | None = None

        if redis_url:
            self._gate = RedisGate(redis_url, "text embedding cache", logger, self.retry_after, redis_timeout)
            self._redis = self._gate.client_
            self._redis_errors = self._gate.errors_types
            try:
                self._redis.ping()
            except self._redis_errors as exc:
                self._gate.down(exc)
            else:
                logger.info("text embedding cache: using Redis at %s", self._gate.url)

    # ------------------------------------------------------------------ API

    def get_or_encode(
        self,
        labels: Sequence[str],
        encode_fn: Callable[[list[str]], np.ndarray],
        batch_size: int = 256,
    ) -> np.ndarray:
        """Embeddings of ``labels``, from the cache where possible.

        Args:
            labels: ``C`` label strings; duplicates allowed (encoded once).
            encode_fn: ``list[str]`` of ``n <= batch_size`` labels -> array
                ``[n, D]`` (any float dtype; converted to float32).  Called
                only for labels found in neither the LRU nor Redis.
            batch_size: most labels passed to one ``encode_fn`` call.

        Returns:
            float32 array ``[C, D]``, row ``i`` for ``labels[i]``; a fresh copy
            the caller may modify.  ``[0, D]`` (``[0, 0]`` before any vector
            has been seen) for an empty ``labels``.

        Raises only what ``encode_fn`` raises, or ``ValueError`` when its
        output has the wrong shape; cache/Redis failures are never raised.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        labels = list(labels)
        for label in labels:
            if not isinstance(label, str):
                raise TypeError(f"labels must be str, got {type(label).__name__}")
        if not labels:
            return np.zeros((0, self._dim or 0), dtype=np.float32)

        unique = list(dict.fromkeys(labels))
        found = self._lru_get_many(unique)
        n_local = len(found)

        missing = [label for label in unique if label not in found]
        from_redis = self._redis_get_many(missing) if missing else {}
        found.update(from_redis)

        to_encode = [label for label in missing if label not in from_redis]
        encoded = self._encode(to_encode, encode_fn, batch_size)

        if encoded:
            dim = next(iter(encoded.values())).shape[0]
            stale = [label for label, vec in found.items() if vec.shape[0] != dim]
            if stale or (self._dim is not None and self._dim != dim):
                # The encoder is the authority on D: cached vectors of another
                # width (e.g. a namespace reused for another model) are wrong.
                logger.warning(
                    "text embedding cache: encoder returned D=%d but cached vectors have D=%s; "
                    "clearing the local cache and re-encoding %d label(s)", dim, self._dim, len(stale))
                self.clear_local()
                if stale:
                    encoded.update(self._encode(stale, encode_fn, batch_size))
            self._dim = dim
            self._lru_put_many(encoded)
            self._redis_put_many(encoded)
        self._lru_put_many(from_redis)
        with self._state_lock:
            self._counts["local_hits"] += n_local
            self._counts["redis_hits"] += len(from_redis)
            self._counts["misses"] += len(to_encode)

        vecs = {**found, **encoded}
        return np.stack([vecs[label] for label in labels]).astype(np.float32, copy=False)

    @property
    def stats(self) -> dict:
        """Counters since construction (in unique labels per call) and Redis health.

        Keys: ``local_hits``, ``redis_hits``, ``misses`` (found in neither tier),
        ``encoded`` (labels passed to ``encode_fn``), ``redis_errors`` (failed
        Redis operations), ``redis_invalid`` (malformed values ignored),
        ``lru_size``, and ``redis_ok`` (bool: Redis configured and last seen up).
        """
        with self._state_lock:
            out: dict = dict(self._counts)
        out["redis_errors"] = self._gate.errors if self._gate else 0
        out["redis_ok"] = bool(self._gate and self._gate.ok)
        with self._lru_lock:
            out["lru_size"] = len(self._lru)
        return out

    def clear_local(self) -> None:
        """Empty the in-process LRU (Redis is left untouched)."""
        with self._lru_lock:
            self._lru.clear()

    # ------------------------------------------------------------------ LRU

    def _lru_get_many(self, labels: list[str]) -> dict[str, np.ndarray]:
        out = {}
        with self._lru_lock:
            for label in labels:
                vec = self._lru.get(label)
                if vec is not None:
                    self._lru.move_to_end(label)
                    out[label] = vec
        return out

    def _lru_put_many(self, items: dict[str, np.ndarray]) -> None:
        if self.maxsize == 0:
            return
        with self._lru_lock:
            for label, vec in items.items():
                self._lru[label] = vec
                self._lru.move_to_end(label)
            while len(self._lru) > self.maxsize:
                self._lru.popitem(last=False)

    # -------------------------------------------------------------- encoder

    def _encode(self, labels: list[str], encode_fn, batch_size: int) -> dict[str, np.ndarray]:
        """Run ``encode_fn`` in chunks of ``batch_size``; read-only float32 rows."""
        out: dict[str, np.ndarray] = {}
        dim = None
        for start in range(0, len(labels), batch_size):
            batch = labels[start:start + batch_size]
            arr = np.array(encode_fn(batch), dtype=np.float32)  # always a private copy
            if arr.ndim != 2 or arr.shape[0] != len(batch) or arr.shape[1] == 0:
                raise ValueError(
                    f"encode_fn returned shape {arr.shape} for {len(batch)} labels; expected [n, D]")
            if dim is not None and arr.shape[1] != dim:
                raise ValueError(f"encode_fn returned D={arr.shape[1]} after D={dim} in the same call")
            dim = arr.shape[1]
            arr.setflags(write=False)  # rows are shared by the LRU and results
            out.update(zip(batch, arr))
        with self._state_lock:
            self._counts["encoded"] += len(labels)
        return out

    # ---------------------------------------------------------------- Redis

    def _key(self, label: str) -> str:
        return self._key_base + hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()

    def _redis_client(self):
        """The client if Redis should be tried now, else ``None``."""
        return self._gate.client() if self._gate else None

    def _mark_ok(self) -> None:
        self._gate.up()

    def _mark_down(self, exc: BaseException) -> None:
        self._gate.down(exc)

    def _redis_get_many(self, labels: list[str]) -> dict[str, np.ndarray]:
        """One MGET for ``labels``; valid values only (``{}`` when Redis is down)."""
        client = self._redis_client()
        if client is None:
            return {}
        try:
            raws = client.mget([self._key(label) for label in labels])
        except self._redis_errors as exc:
            self._mark_down(exc)
            return {}
        self._mark_ok()

        out: dict[str, np.ndarray] = {}
        invalid = 0
        dim = self._dim
        for label, raw in zip(labels, raws):
            if raw is None:
                continue
            vec = _decode_value(raw)
            if vec is not None and dim is None:
                dim = vec.shape[0]  # nothing seen yet: first valid value sets D
            if vec is None or vec.shape[0] != dim:
                invalid += 1
                continue
            out[label] = vec
        if self._dim is None and out:
            self._dim = dim
        if invalid:
            with self._state_lock:
                self._counts["redis_invalid"] += invalid
            logger.debug("text embedding cache: ignored %d malformed Redis value(s)", invalid)
        return out

    def _redis_put_many(self, items: dict[str, np.ndarray]) -> None:
        """Write ``items`` in one pipelined round trip (silently skipped when down)."""
        if not items:
            return
        client = self._redis_client()
        if client is None:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for label, vec in items.items():
                # a TTL makes the entry a cache for Redis too: volatile-* eviction may take it
                pipe.set(self._key(label), _encode_value(vec), ex=self.ttl)
            pipe.execute()
        except self._redis_errors as exc:
            self._mark_down(exc)
            return
        self._mark_ok()
