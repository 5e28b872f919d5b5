"""Redis as an optional tier: a cache must never fail a request because Redis is away.

:class:`RedisGate` holds one client and decides when to use it: always while it answers;
after a failure, at most once every ``retry_after`` seconds. It logs one warning per outage
and one info line on recovery, with the URL's password redacted.
"""

from __future__ import annotations

import logging
import threading
import time

from ..redaction import redact_url


class RedisGate:
    """One Redis client with outage handling, shared by the text and image caches.

    Args:
        url: ``redis://...``; a malformed URL raises here (a configuration error).
        what: what the cache is, for log lines ("text embedding cache").
        logger: where the warning and recovery lines go.
        retry_after: seconds between probes while Redis is down.
        timeout: socket connect/read timeout; no retries, so a dead server costs one timeout.
    """

    def __init__(self, url: str, what: str, logger: logging.Logger, retry_after: float = 30.0,
                 timeout: float = 0.5):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.errors_types: tuple = (redis.RedisError, OSError)
        self.client_ = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            # redis-py retries with backoff by default; one attempt keeps a dead server's
            # cost at ~timeout per probe
            retry=Retry(NoBackoff(), 0), decode_responses=False, health_check_interval=0)
        self.what = what
        self.url = redact_url(url)
        self.retry_after = float(retry_after)
        self.log = logger
        self.ok = True
        self.errors = 0
        self._warned = False  # covers "down since start", where ok was never seen True
        self._next_retry = 0.0
        self._lock = threading.Lock()

    def client(self):
        """The client if Redis should be tried now, else ``None``."""
        with self._lock:
            if self.ok:
                return self.client_
            now = time.monotonic()
            if now < self._next_retry:
                return None
            # push the deadline first so concurrent requests do not all probe
            self._next_retry = now + self.retry_after
            return self.client_

    def down(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self._next_retry = time.monotonic() + self.retry_after
            first = self.ok or not self._warned
            self.ok = False
            self._warned = True
        if first:  # one warning per outage; failed re-probes only at debug
            self.log.warning("%s: Redis at %s unavailable (%s: %s); in-process cache only, retrying every %.0f s",
                             self.what, self.url, type(exc).__name__, exc, self.retry_after)
        else:
            self.log.debug("%s: Redis still unavailable (%s)", self.what, exc)

    def up(self) -> None:
        with self._lock:
            if self.ok:
                return
            self.ok = True
        self.log.info("%s: Redis at %s is reachable again", self.what, self.url)


# what lives on REDIS_URL without a TTL: an allkeys-* policy may evict it when memory is full
DURABLE_KEYS = ("rq:* (the pre-labeling queue and its jobs)", "gem:prelabel:run:* (runs in progress)",
                "gem:project:*:params (project settings)", "gem:proto:* (label prototypes)",
                "gem:agreement:* (agreement figures)")
_policy_warned: set[str] = set()
_policy_lock = threading.Lock()


def check_eviction_policy(client, url: str, log: logging.Logger, caches_elsewhere: bool = False) -> str | None:
    """Read the server's ``maxmemory-policy`` and warn once per URL and process when an
    ``allkeys-*`` policy could evict durable state. Returns the policy, or None where it
    cannot be read (``CONFIG`` disabled, as on many managed Redis services: logged at debug).

    Args:
        client: a redis-py client of the durable Redis (``REDIS_URL``).
        url: its URL, for the message (redacted).
        caches_elsewhere: the caches have a Redis of their own (``GEM_CACHE_REDIS_URL``): the
            durable Redis then fills only with durable state, still at risk under allkeys-*.
    """
    try:
        raw = client.config_get("maxmemory-policy")
    except Exception as err:  # noqa: BLE001 - CONFIG refused or Redis away: nothing to say yet
        log.debug("cannot read maxmemory-policy of %s: %s: %s", redact_url(url), type(err).__name__, err)
        return None
    policy = raw.get("maxmemory-policy") if isinstance(raw, dict) else None
    if isinstance(policy, bytes):
        policy = policy.decode()
    if isinstance(policy, str) and policy.startswith("allkeys-"):
        with _policy_lock:
            if url in _policy_warned:
                return policy
            _policy_warned.add(url)
        where = "" if caches_elsewhere else " (the caches share it)"
        log.warning("Redis at %s has maxmemory-policy %s%s: when memory is full it may evict durable state "
                    "that has no TTL: %s. Run Redis with --maxmemory-policy volatile-lru (only keys with a TTL, "
                    "the caches, are evicted) or noeviction, or put the caches on their own Redis with "
                    "GEM_CACHE_REDIS_URL.", redact_url(url), policy, where, ", ".join(DURABLE_KEYS))
    return policy
