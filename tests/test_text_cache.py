"""Tests of gem_backend.serving.text_cache (LRU alone, and with a local redis-server)."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time

import numpy as np
import pytest
import redis

from gem_backend.redaction import redact_url
from gem_backend.serving.text_cache import TextEmbeddingCache

D = 8
NS = "ViT-B-16|openai|templates-v1"
LOGGER = "gem_backend.serving.text_cache"


def vec_for(label: str) -> np.ndarray:
    """Deterministic stand-in for the text tower: [D] float32 per label."""
    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def expected(labels) -> np.ndarray:
    return np.stack([vec_for(label) for label in labels])


class Encoder:
    """encode_fn that records every batch it was given."""

    def __init__(self, dtype=np.float32):
        self.calls: list[list[str]] = []
        self.dtype = dtype
        self.lock = threading.Lock()

    def __call__(self, batch: list[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(list(batch))
        return expected(batch).astype(self.dtype)

    @property
    def labels(self) -> list[str]:
        return [label for call in self.calls for label in call]


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ---------------------------------------------------------------- LRU only


def test_second_call_encodes_nothing():
    cache, enc = TextEmbeddingCache(NS), Encoder()
    labels = ["cat", "dog", "traffic light"]
    first = cache.get_or_encode(labels, enc)
    assert first.dtype == np.float32 and first.shape == (3, D)
    np.testing.assert_array_equal(first, expected(labels))
    second = cache.get_or_encode(labels, enc)
    np.testing.assert_array_equal(second, first)
    assert enc.calls == [labels]
    s = cache.stats
    assert (s["local_hits"], s["misses"], s["encoded"], s["redis_hits"]) == (3, 3, 3, 0)
    assert s["redis_ok"] is False


def test_eviction_at_maxsize():
    cache, enc = TextEmbeddingCache(NS, maxsize=3), Encoder()
    cache.get_or_encode(["a", "b", "c"], enc)
    cache.get_or_encode(["a"], enc)  # a becomes most recently used
    cache.get_or_encode(["d"], enc)  # evicts b, the least recently used
    assert cache.stats["lru_size"] == 3
    enc.calls.clear()
    cache.get_or_encode(["a", "c", "d"], enc)
    assert enc.calls == []
    cache.get_or_encode(["b"], enc)
    assert enc.calls == [["b"]]


def test_call_larger_than_maxsize_still_returns_all_rows():
    cache, enc = TextEmbeddingCache(NS, maxsize=2), Encoder()
    labels = [f"l{i}" for i in range(10)]
    np.testing.assert_array_equal(cache.get_or_encode(labels, enc), expected(labels))
    assert cache.stats["lru_size"] == 2


def test_maxsize_zero_disables_lru():
    cache, enc = TextEmbeddingCache(NS, maxsize=0), Encoder()
    cache.get_or_encode(["a"], enc)
    cache.get_or_encode(["a"], enc)
    assert enc.calls == [["a"], ["a"]]


def test_duplicates_encoded_once():
    cache, enc = TextEmbeddingCache(NS), Encoder()
    labels = ["a", "b", "a", "a", "b", "c"]
    out = cache.get_or_encode(labels, enc)
    assert enc.calls == [["a", "b", "c"]]
    np.testing.assert_array_equal(out, expected(labels))
    assert cache.stats["misses"] == 3


def test_batching():
    cache, enc = TextEmbeddingCache(NS), Encoder()
    labels = [f"label {i}" for i in range(1000)]
    out = cache.get_or_encode(labels, enc, batch_size=256)
    assert [len(c) for c in enc.calls] == [256, 256, 256, 232]
    assert enc.labels == labels
    np.testing.assert_array_equal(out, expected(labels))
    with pytest.raises(ValueError):
        cache.get_or_encode(["x"], enc, batch_size=0)


def test_order_preserved_with_mixed_hits_and_misses():
    cache, enc = TextEmbeddingCache(NS), Encoder()
    cache.get_or_encode(["d", "b"], enc)
    enc.calls.clear()
    labels = ["a", "b", "c", "d", "e", "b"]
    out = cache.get_or_encode(labels, enc, batch_size=2)
    assert enc.calls == [["a", "c"], ["e"]]
    np.testing.assert_array_equal(out, expected(labels))


def test_returned_arrays_are_copies():
    cache = TextEmbeddingCache(NS)
    kept = []

    def leaky_encoder(batch):
        arr = expected(batch)
        kept.append(arr)  # the encoder keeps (and later scribbles on) its own output
        return arr

    out = cache.get_or_encode(["a", "b"], leaky_encoder)
    out[:] = 0
    kept[0][:] = 0
    again = cache.get_or_encode(["a", "b"], leaky_encoder)
    np.testing.assert_array_equal(again, expected(["a", "b"]))
    assert again.flags.writeable
    again[0, 0] = 42.0
    np.testing.assert_array_equal(cache.get_or_encode(["a"], leaky_encoder), expected(["a"]))


def test_float64_encoder_output_is_converted():
    cache, enc = TextEmbeddingCache(NS), Encoder(dtype=np.float64)
    out = cache.get_or_encode(["a", "b"], enc)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected(["a", "b"]))


def test_bad_encoder_shape_raises():
    cache = TextEmbeddingCache(NS)
    with pytest.raises(ValueError, match="shape"):
        cache.get_or_encode(["a", "b"], lambda batch: np.zeros((1, D), np.float32))


def test_empty_labels():
    cache, enc = TextEmbeddingCache(NS), Encoder()
    assert cache.get_or_encode([], enc).shape == (0, 0)
    cache.get_or_encode(["a"], enc)
    empty = cache.get_or_encode([], enc)
    assert empty.shape == (0, D) and empty.dtype == np.float32
    assert enc.calls == [["a"]]


def test_concurrent_callers():
    cache, enc = TextEmbeddingCache(NS, maxsize=64), Encoder()
    pool = [f"c{i}" for i in range(100)]
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(50):
                labels = list(rng.choice(pool, size=12))
                np.testing.assert_array_equal(cache.get_or_encode(labels, enc, batch_size=5), expected(labels))
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.stats["lru_size"] <= 64


def test_redact_url():
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("rediss://:s3cret@host/1") == "rediss://:***@host/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert "s3cret" not in redact_url("redis://host/0?password=s3cret&db=2")
    assert "s3cret" not in redact_url("unix:///run/redis.sock?password=s3cret")


# ------------------------------------------------------------------- Redis


def test_two_instances_share_via_redis(redis_url):
    labels = ["cat", "dog", "person", "cat"]
    a, enc_a = TextEmbeddingCache(NS, redis_url), Encoder()
    assert a.stats["redis_ok"] is True
    np.testing.assert_array_equal(a.get_or_encode(labels, enc_a), expected(labels))
    assert enc_a.calls == [["cat", "dog", "person"]]

    # A second replica: nothing in its LRU, everything in Redis.
    b, enc_b = TextEmbeddingCache(NS, redis_url), Encoder()
    np.testing.assert_array_equal(b.get_or_encode(labels, enc_b), expected(labels))
    assert enc_b.calls == []
    s = b.stats
    assert (s["redis_hits"], s["misses"], s["encoded"], s["redis_errors"]) == (3, 0, 0, 0)
    # ...and Redis hits were copied into its LRU.
    b.get_or_encode(labels, enc_b)
    assert b.stats["local_hits"] == 3

    # Another namespace (e.g. another model) never sees these entries.
    c, enc_c = TextEmbeddingCache("ViT-L-14|openai|templates-v1", redis_url), Encoder()
    c.get_or_encode(labels, enc_c)
    assert enc_c.labels == ["cat", "dog", "person"]


def test_redis_keys_are_bounded_and_hashed(redis_url):
    cache = TextEmbeddingCache(NS, redis_url, key_prefix="t:")
    long_label = "a very long label " * 100
    cache.get_or_encode([long_label, "cat"], Encoder())
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert len(keys) == 2
    for key in keys:
        assert key.startswith(b"t:") and len(key) <= 100 and b"cat" not in key and b"long" not in key


def test_corrupt_redis_values_are_misses_and_get_overwritten(redis_url):
    labels = ["a", "b", "c", "d", "e"]
    TextEmbeddingCache(NS, redis_url).get_or_encode(labels, Encoder())
    r = redis.Redis.from_url(redis_url)
    probe = TextEmbeddingCache(NS)  # only to compute keys
    good = r.get(probe._key("e"))
    r.set(probe._key("a"), b"garbage")                                 # no header
    r.set(probe._key("b"), good[:-4])                                  # truncated
    r.set(probe._key("c"), b"XXXX" + good[4:])                         # wrong magic
    r.set(probe._key("d"), good[:8] + np.full(D, np.nan, "<f4").tobytes())  # NaNs

    cache, enc = TextEmbeddingCache(NS, redis_url), Encoder()
    np.testing.assert_array_equal(cache.get_or_encode(labels, enc), expected(labels))
    assert enc.labels == ["a", "b", "c", "d"]
    s = cache.stats
    assert (s["redis_hits"], s["redis_invalid"], s["redis_ok"]) == (1, 4, True)

    # The bad values were replaced with good ones.
    fresh, enc2 = TextEmbeddingCache(NS, redis_url), Encoder()
    np.testing.assert_array_equal(fresh.get_or_encode(labels, enc2), expected(labels))
    assert enc2.calls == []


def test_wrong_dimension_in_redis_is_a_miss(redis_url):
    cache, enc = TextEmbeddingCache(NS, redis_url), Encoder()
    cache.get_or_encode(["a"], enc)  # D is now known
    r = redis.Redis.from_url(redis_url)
    wrong = np.ones(D + 4, "<f4")
    r.set(cache._key("b"), b"GTE1" + (D + 4).to_bytes(4, "little") + wrong.tobytes())
    out = cache.get_or_encode(["a", "b"], enc)
    np.testing.assert_array_equal(out, expected(["a", "b"]))
    assert enc.labels == ["a", "b"] and cache.stats["redis_invalid"] == 1


def test_redis_outage_mid_run(restartable_redis, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = restartable_redis
    cache, enc = TextEmbeddingCache(NS, server.url, retry_after=0.2), Encoder()
    cache.get_or_encode(["a", "b"], enc)
    assert cache.stats["redis_ok"] is True

    server.stop()
    deadline = time.monotonic() + 0.7  # spans several retry intervals
    i = 0
    while time.monotonic() < deadline:
        cache.clear_local()  # force every call to consult Redis
        labels = ["a", f"new{i}", "b"]
        np.testing.assert_array_equal(cache.get_or_encode(labels, enc), expected(labels))
        i += 1
        time.sleep(0.01)
    assert i > 10
    s = cache.stats
    assert s["redis_ok"] is False and s["redis_errors"] >= 2  # it did re-probe
    assert len(warnings_of(caplog)) == 1

    server.start()  # empty DB: no persistence
    time.sleep(0.25)
    enc.calls.clear()
    cache.get_or_encode(["back1", "back2"], enc)
    assert cache.stats["redis_ok"] is True
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len(warnings_of(caplog)) == 1

    # The write after recovery reached Redis: another replica gets hits.
    other, enc_other = TextEmbeddingCache(NS, server.url), Encoder()
    other.get_or_encode(["back1", "back2"], enc_other)
    assert enc_other.calls == [] and other.stats["redis_hits"] == 2


def test_redis_down_at_construction_and_password_redacted(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    dead_port = _unused_port()
    url = f"redis://gem:s3cret-pw@127.0.0.1:{dead_port}/0"
    t0 = time.monotonic()
    cache, enc = TextEmbeddingCache(NS, url, retry_after=0.05, redis_timeout=0.2), Encoder()
    for i in range(20):
        labels = ["a", f"x{i}"]
        np.testing.assert_array_equal(cache.get_or_encode(labels, enc), expected(labels))
        time.sleep(0.01)
    assert time.monotonic() - t0 < 3
    s = cache.stats
    assert s["redis_ok"] is False and s["redis_errors"] >= 2 and s["local_hits"] == 19
    warns = warnings_of(caplog)
    assert len(warns) == 1
    assert "gem:***@127.0.0.1" in warns[0].getMessage()
    assert "s3cret-pw" not in caplog.text
    assert all("s3cret-pw" not in r.getMessage() for r in caplog.records)


def test_hung_redis_costs_at_most_timeout_per_retry(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # A socket that accepts connections (kernel backlog) but never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        t0 = time.monotonic()
        cache, enc = TextEmbeddingCache(NS, url, retry_after=60, redis_timeout=0.2), Encoder()
        t_init = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(20):
            cache.get_or_encode([f"y{i}"], enc)
        t_calls = time.monotonic() - t0
    assert 0.15 <= t_init < 1.0, t_init  # one timeout, no retries/backoff
    assert t_calls < 0.2, t_calls  # within retry_after: Redis not touched at all
    assert len(warnings_of(caplog)) == 1


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
