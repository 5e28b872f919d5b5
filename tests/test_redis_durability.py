"""A Redis that evicts caches, never durable state: against real redis-servers with a small
``maxmemory`` (queued jobs, prelabel runs, project parameters and prototypes survive a flood
of image-feature cache entries under volatile-lru), and the start-up warning under allkeys-*.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import redis
import torch

from gem_backend.algorithm.segmentation import ImageEmbedding
from gem_backend.jobs.prelabel import Selection, Target
from gem_backend.jobs.worker import DEFAULT_QUEUE, RunKeys, enqueue_run, record_outcome
from gem_backend.jobs.prelabel import Outcome
from gem_backend.serving.feature_cache import EmbeddingCache
from gem_backend.serving.prototypes import Contribution, LabelSum, RedisPrototypeStore
from test_app import make_app, make_settings, setup_body

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="needs Debian's redis-server (scripts/test.sh installs it)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_redis(tmp_path, request):
    """A redis-server with 4 MB of memory and the policy of the test's parameter."""
    procs = []

    def start(policy: str) -> str:
        port = _port()
        proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--maxmemory", "4mb", "--maxmemory-policy", policy, "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


def _embedding(seed: int) -> ImageEmbedding:
    g = torch.Generator().manual_seed(seed)
    return ImageEmbedding(torch.randn(28 * 28, 64, generator=g), (28, 28), (448, 448), (448, 448))


def test_caches_are_evicted_and_durable_state_survives_volatile_lru(small_redis, tmp_path):
    url = small_redis("volatile-lru")
    client = redis.Redis.from_url(url)
    # project parameters through /setup
    app, _ = make_app(make_settings(tmp_path / "state", REDIS_URL=url))
    r = app.test_client().post("/setup", json=setup_body(project="7.1700000000", extra_params={"threshold": 0.4}))
    assert r.status_code == 200
    # a queued pre-labeling run (RQ job + the run's records)
    target = Target(7, "<View/>", {}, "gem-test")
    tasks = [{"id": i, "data": {"image": f"/data/{i}.jpg"}} for i in range(4)]
    run = enqueue_run(client, DEFAULT_QUEUE, target, Selection(4, tasks, 0), batch_size=2)
    record_outcome(client, run.id, Outcome(0, "done", ""))  # a run in progress
    # learnt prototypes
    store = RedisPrototypeStore(url, "ns")
    assert store.put("7", "101", Contribution({"cat": LabelSum(3, np.arange(64, dtype=np.int64))}, 1, "t1"))
    durable = sorted(k.decode() for k in client.keys("*"))
    assert all(client.ttl(k) == -1 for k in durable), {k: client.ttl(k) for k in durable}  # no TTL at all

    cache = EmbeddingCache(url, max_bytes=0, ttl=3600)
    for i in range(40):  # ~200 KB each: 8 MB into a 4 MB server
        cache.put(f"image-{i}", _embedding(i))
    cached = client.keys("gem:image:*")
    assert 0 < len(cached) < 40  # the caches were evicted ...
    assert all(client.ttl(k) > 0 for k in cached)
    for key in durable:  # ... and nothing durable was
        assert client.exists(key), key
    assert client.llen(f"rq:queue:{DEFAULT_QUEUE}") == 2
    assert client.get("gem:project:7:params") is not None
    assert store.totals("7")["cat"].annotations == 1
    assert client.hget(RunKeys(run.id).tasks, "0").startswith(b"done")


def test_a_finished_run_expires_after_its_retention(small_redis):
    client = redis.Redis.from_url(small_redis("volatile-lru"))
    tasks = [{"id": i, "data": {"image": "x"}} for i in range(2)]
    run = enqueue_run(client, DEFAULT_QUEUE, Target(1, "<View/>", {}, "v"), Selection(2, tasks, 0), batch_size=2)
    keys = RunKeys(run.id)
    record_outcome(client, run.id, Outcome(0, "done", ""))
    assert client.ttl(keys.meta) == -1  # live: durable
    record_outcome(client, run.id, Outcome(1, "failed", "bad image"))
    assert all(client.ttl(k) > 0 for k in (keys.meta, keys.jobs, keys.tasks, keys.counts))  # complete: retention


@pytest.mark.parametrize("policy, warned", [("allkeys-lru", True), ("allkeys-lfu", True), ("volatile-lru", False),
                                            ("noeviction", False)])
def test_start_up_warns_once_when_the_policy_could_evict_durable_state(small_redis, tmp_path, caplog, policy,
                                                                     warned):
    url = small_redis(policy)
    caplog.set_level(logging.WARNING)
    for i in range(2):
        make_app(make_settings(tmp_path / f"s{i}", REDIS_URL=url))
    lines = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert policy in lines[0] and "volatile-lru" in lines[0] and "GEM_CACHE_REDIS_URL" in lines[0]


def test_caches_can_live_on_their_own_redis(small_redis, tmp_path):
    durable, caches = small_redis("noeviction"), small_redis("allkeys-lru")
    settings = make_settings(tmp_path, REDIS_URL=durable, GEM_CACHE_REDIS_URL=caches)
    assert settings.caches_redis_url == caches
    _, service = make_app(settings)
    service.image_cache.put("k", _embedding(0))
    assert redis.Redis.from_url(caches).keys("gem:image:*") and not redis.Redis.from_url(durable).keys("gem:image:*")
    secret = make_settings(tmp_path, GEM_CACHE_REDIS_URL="redis://:hunter2@127.0.0.1:1/0").redacted()
    assert "hunter2" not in str(secret) and "***" in secret["cache_redis_url"]


def test_cache_ttls_must_be_positive():
    from gem_backend.settings import Settings, SettingsError

    for name in ("GEM_IMAGE_CACHE_TTL", "GEM_TEXT_CACHE_TTL"):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: "0"})
