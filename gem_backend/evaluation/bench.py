"""``gem-backend bench``: timings as JSON lines (or a table), side by side with the reference.

Random weights throughout: the cost of a forward pass does not depend on their values.
Every record carries ``machine``: CPU model, its bf16/AMX/AVX-512 flags, cores, threads,
torch, the load average when the record was taken. bf16 on a CPU without native bf16 is not
timed (the record says so). Sections:

- ``forward``: GEM image tower per image (model, size, batch, precision, device), and the
  same work as the reference's ``GEMWrapper.forward`` (text tower + maps) for the ratio;
- ``text``: text encoding of 20 labels x 80 templates, cold (batched) and cached;
- ``e2e``: one 12-megapixel JPEG task with 20 brush labels through the Flask app's
  ``/predict``: the forward (timed inside the request) and everything else (``other_s``);
- ``rle``: ``gem_backend.brush.mask2rle`` vs ``label_studio_sdk``'s on 12-megapixel masks;
- ``bitmask``: per 12-megapixel image, every label's BitmaskLabels PNG data URL
  (:func:`~gem_backend.labelstudio.bitmask.label_pngs`) vs its brush RLE
  (:func:`~gem_backend.labelstudio.brush.stretched_label_rles`), both from the label map at the
  model input size as the service does, with the bytes each puts in the reply (:func:`bench_bitmask`);
- ``click``: an annotator's smart-tool click on a 12-megapixel JPEG through
  :meth:`GEMService.predict_tasks` (``params.context``), first click (image features not
  cached: decode + image tower) vs repeated clicks on the same image (features from the
  cache: fetch + hash, label maps, the clicked part, RLE);
- ``limit``: per dtype, forward FLOPs counted with attention (:func:`count_forward_flops`)
  and by hand (:func:`analytic_forward_flops`), the GEMM peak (2048^3), the forward's share
  of it;
- ``oversubscribe``: two processes timing the forward at once, default threads vs all
  cores each (:func:`bench_oversubscribe`);
- ``throughput``: 60 mixed-size tasks through ``predict_tasks`` and the prelabel path with
  one and two workers (:func:`bench_throughput`);
- ``reference`` (with ``--reference VENV``): the official package timed in its own
  environment by ``../shared/bench/time_reference.py``, and the ratio ours / reference.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _median_time(fn: Callable[[], object], runs: int, warmup: int = 1, sync: bool = False) -> tuple[float, list]:
    times = []
    for i in range(warmup + runs):
        if sync:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times), times


def _wait_barrier(spec: str) -> None:
    """``DIR:I/N``: mark process I ready in DIR, wait until all N are."""
    folder, _, share = spec.rpartition(":")
    index, total = (int(v) for v in share.split("/"))
    Path(folder, f"ready-{index}").touch()
    deadline = time.monotonic() + 900
    while len(list(Path(folder).glob("ready-*"))) < total and time.monotonic() < deadline:
        time.sleep(0.02)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(model: str, precision: str, device: str):
    from ..algorithm.models import load_gem_model

    return load_gem_model(model, None, device=device, precision=precision)


def bench_forward(loaded, size: int, batch: int, labels: int, runs: int, warmup: int,
                  barrier: str | None = None) -> dict:
    gem = loaded.gem
    if _emulated(loaded.device, loaded.dtype):
        return dict(bench="forward", model=loaded.model_name, size=size, batch=batch, dtype="bfloat16",
                    device=str(loaded.device), image_tower_s=None,
                    note="not timed: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 would be emulated")
    x = torch.randn(batch, 3, size, size, device=loaded.device).to(loaded.dtype)
    names = [f"object number {i}" for i in range(labels)]
    sync = loaded.device.type == "cuda"
    with torch.inference_mode():
        if barrier:  # start with the other processes of an oversubscription run
            gem.encode_image(x)
            _wait_barrier(barrier)
        image_s, image_all = _median_time(lambda: gem.encode_image(x), runs, warmup, sync)
        full_s, full_all = _median_time(lambda: gem.similarity_maps(x, gem.encode_text(names)), runs, warmup, sync)
    # min as well as median: on a shared machine the fastest run is the least disturbed one
    return dict(bench="forward", model=loaded.model_name, size=size, batch=batch, labels=labels,
                dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device),
                threads=torch.get_num_threads(), image_tower_s=image_s / batch, image_tower_min_s=min(image_all) / batch,
                with_text_and_maps_s=full_s / batch, with_text_and_maps_min_s=min(full_all) / batch,
                images_per_s=batch / image_s)


def bench_text(loaded, labels: int = 20, templates: int = 80) -> dict:
    from ..settings import openai_templates
    from ..serving.text_cache import TextEmbeddingCache

    gem = loaded.gem
    tpl = openai_templates()[:templates]
    names = [f"label {i}" for i in range(labels)]
    cache = TextEmbeddingCache("bench")
    calls = []

    def encode(batch):
        calls.append(len(batch))
        with torch.inference_mode():
            return gem.encode_text(batch, tpl).float().cpu().numpy()

    started = time.perf_counter()
    cache.get_or_encode(names, encode)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    cache.get_or_encode(names, encode)
    warm = time.perf_counter() - started
    return dict(bench="text", labels=labels, templates=len(tpl), cold_s=cold, cached_s=warm,
                text_tower_calls_cold=len(calls[:1]), text_tower_calls_cached=len(calls) - 1)


def _synthetic_photo(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A 12-megapixel JPEG with smooth regions and texture (compresses like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 100, width // 100, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _twenty_label_config(labels: Sequence[str]) -> str:
    label_xml = "".join(f'<Label value="{n}"/>' for n in labels)
    return (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{label_xml}'
            f'</BrushLabels></View>')


class _TimedForward:
    """Wraps ``gem.encode_image`` on the instance: the model forward's own seconds, summed."""

    def __init__(self, gem):
        self.gem, self.seconds, self.calls = gem, 0.0, 0
        self.inner = gem.encode_image
        sync = next(gem.model.parameters()).device.type == "cuda"

        def timed(*args, **kwargs):
            if sync:
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = self.inner(*args, **kwargs)
            if sync:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - started
            self.calls += 1
            return out

        gem.encode_image = timed

    def restore(self) -> None:
        del self.gem.encode_image  # back to the class's method


def bench_e2e(loaded, labels: int = 20, runs: int = 3, profile: bool = False) -> dict:
    """One 12 MP JPEG task with ``labels`` brush labels through the Flask app's ``/predict``.

    Threshold 0 (every pixel gets a label: the most regions, the worst case for RLE), a warm
    text cache (the ``text`` section times text encoding). The forward is timed inside the
    request (a wrapper around ``encode_image``); everything else the request does (fetch and
    decode of the data URI, resize, the decision, masks, RLE, JSON) is ``other_s``. With
    ``profile``, the non-forward part of one request is profiled (cProfile, top functions).
    """
    import base64

    from ..serving.app import create_app
    from ..serving.service import GEMService
    from ..settings import Settings

    names = [f"label {i}" for i in range(labels)]
    settings = Settings(model=loaded.model_name, pretrained="none", device=str(loaded.device),
                        precision=str(loaded.dtype).replace("torch.", ""))
    service = GEMService(settings, loaded=loaded)
    client = create_app(settings, service=service).test_client()
    body = {"label_config": _twenty_label_config(names), "extra_params": {"threshold": 0, "min_area": 0},
            "tasks": [{"id": 1, "data": {"image": "data:image/jpeg;base64,"
                                         + base64.b64encode(_synthetic_photo()).decode()}}]}
    raw = json.dumps(body).encode()  # what Label Studio sends, encoded once
    forward = _TimedForward(loaded.gem)
    try:
        def request() -> tuple[float, float, dict]:
            service.image_cache.clear_local()  # a new image each time: no feature-cache hit
            before = forward.seconds
            started = time.perf_counter()
            reply = client.post("/predict", data=raw, content_type="application/json")
            data = reply.get_data()  # the reply's bytes are what the server produces
            total = time.perf_counter() - started
            if reply.status_code != 200:
                raise RuntimeError(f"/predict answered {reply.status_code}: {data[:300]!r}")
            return total, forward.seconds - before, json.loads(data)  # Label Studio's parsing: not ours

        request()  # warm: text embeddings cached, lazy imports done, allocator warm
        totals, forwards = [], []
        for _ in range(runs):
            total, fwd, out = request()
            totals.append(total)
            forwards.append(fwd)
        top = None
        if profile:
            top = _profile_outside_forward(request, forward)
    finally:
        forward.restore()
    other = [t - f for t, f in zip(totals, forwards)]
    result = out["results"][0]["result"]
    med_f, med_o = statistics.median(forwards), statistics.median(other)
    rec = dict(bench="e2e", route="/predict", image="4000x3000 JPEG", labels=labels, regions=len(result),
               dtype=str(loaded.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
               model_input="592x448", request_s=statistics.median(totals), forward_s=med_f, other_s=med_o,
               other_min_s=min(other), forward_min_s=min(forwards), non_forward_over_forward=med_o / med_f,
               runs=runs, rle_bytes=sum(len(r["value"]["rle"]) for r in result), peak_rss_mb=peak_rss_mb())
    if top is not None:
        rec["profile_outside_forward"] = top
    return rec


def _profile_outside_forward(request: Callable[[], tuple], forward: "_TimedForward", top: int = 12) -> list:
    """cProfile of one request; the functions with the most own time outside the forward."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    inner = forward.inner

    def unprofiled(*args, **kwargs):  # the forward is not what is being profiled
        prof.disable()
        try:
            return inner(*args, **kwargs)
        finally:
            prof.enable()

    forward.inner = unprofiled
    try:
        prof.enable()
        request()
        prof.disable()
    finally:
        forward.inner = inner
    stats = pstats.Stats(prof).stats
    rows = sorted(((v[2], v[3], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.items()), reverse=True)
    return [dict(function=name, own_s=round(own, 4), cumulative_s=round(cum, 4)) for own, cum, name in rows[:top]]


def bench_click(loaded, labels: int = 10, runs: int = 3, clicks: int = 5) -> dict:
    """First vs repeated interactive click on a 12 MP JPEG, as ``/predict`` answers it."""
    import base64

    from ..serving.service import GEMService
    from ..settings import Settings

    data = _synthetic_photo()
    names = [f"label {i}" for i in range(labels)]
    label_xml = "".join(f'<Label value="{n}"/>' for n in names)
    config = (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{label_xml}'
              f'</BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">{label_xml}'
              f'</KeyPointLabels></View>')
    settings = Settings(model=loaded.model_name, pretrained="none", device=str(loaded.device),
                        precision=str(loaded.dtype).replace("torch.", ""))
    service = GEMService(settings, loaded=loaded)
    spec = service.project(config)
    task = {"id": 1, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}
    rng = np.random.default_rng(0)

    def click() -> dict:
        x, y = rng.uniform(5, 95, size=2)
        ctx = {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                           "value": {"x": float(x), "y": float(y), "width": 1.0,
                                     "keypointlabels": [names[int(rng.integers(labels))]]}}]}
        return service.predict_tasks([task], None, spec=spec, context=ctx)[0]

    service.encode_text(names + list(spec.segmentation.background_prompts), spec.segmentation.templates)  # warm text
    # a server that has answered before: one forward of this size done (on another image)
    other = {"id": 0, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(_synthetic_photo(seed=1)).decode()}}
    service.predict_tasks([other], None, spec=spec)
    registry = service.metrics.registry
    forward_before = registry.get_sample_value("gem_model_forward_seconds_sum") or 0.0
    first = []
    for _ in range(runs):
        service.image_cache.clear_local()
        started = time.perf_counter()
        pred = click()
        first.append(time.perf_counter() - started)
    forward_s = ((registry.get_sample_value("gem_model_forward_seconds_sum") or 0.0) - forward_before) / runs
    repeat = []
    for _ in range(clicks):
        started = time.perf_counter()
        pred = click()
        repeat.append(time.perf_counter() - started)
    stats = service.image_cache.stats
    first_s, repeat_s = statistics.median(first), statistics.median(repeat)
    return dict(bench="click", image="4000x3000 JPEG", labels=labels, first_click_s=first_s,
                first_click_forward_s=forward_s, repeated_click_s=repeat_s, repeated_over_first=repeat_s / first_s,
                image_tower_calls=int(stats["misses"]), cache_hits=int(stats["local_hits"]),
                regions=len(pred["result"]), threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb())


def bench_rle(runs: int = 3) -> list[dict]:
    from label_studio_sdk.converter.brush import mask2rle as sdk_mask2rle

    from ..labelstudio.brush import mask2rle

    rng = np.random.default_rng(0)
    h, w = 3000, 4000
    clean = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for cy, cx, r in ((800, 900, 500), (2000, 2500, 700), (1500, 3500, 300)):
        clean[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 255
    speckle = np.where(rng.random((h, w)) < 0.5, 255, 0).astype(np.uint8)
    out = []
    for name, mask in (("clean", clean), ("speckle", speckle)):
        ours, _ = _median_time(lambda: mask2rle(mask), runs, 1)
        theirs, _ = _median_time(lambda: sdk_mask2rle(mask), 1, 0)
        same = mask2rle(mask) == list(sdk_mask2rle(mask))
        out.append(dict(bench="rle", mask=f"{name} {w}x{h}", ours_s=ours, sdk_s=theirs,
                        speedup=theirs / ours, identical=bool(same)))
    return out


def bench_bitmask(labels: int = 20, runs: int = 3, size: tuple[int, int] = (3000, 4000),
                  small: tuple[int, int] = (448, 597)) -> dict:
    """Seconds per 12-megapixel image: every label's bitmask PNG vs its brush RLE, from a
    ``small`` label map of blobs (as the model input decides) stretched to ``size``."""
    from ..algorithm.segmentation import nearest_indices
    from ..labelstudio.bitmask import label_pngs
    from ..labelstudio.brush import stretched_label_rles
    from ..labelstudio.results import dumps, png_data_url

    rng = np.random.default_rng(0)
    h, w = small
    # blobs of every label on a background, like a decided map (not noise, which no model gives)
    yy, xx = np.mgrid[0:h, 0:w]
    label_map = np.zeros((h, w), np.uint16)
    for value in range(1, labels + 1):
        for _ in range(3):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 60)
            label_map[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = value
    rows, cols = nearest_indices(h, size[0]), nearest_indices(w, size[1])
    values = [v for v in range(1, labels + 1) if (label_map == v).any()]

    def pngs() -> list[str]:
        return [png_data_url(png) for png in label_pngs(label_map, values, rows, cols)]

    def rles() -> list[list[int]]:
        return stretched_label_rles(label_map, values, rows, cols)

    png_s, _ = _median_time(pngs, runs, 1)
    rle_s, _ = _median_time(rles, runs, 1)
    png_bytes = sum(len(u) for u in pngs())
    rle_bytes = len(dumps([{"rle": r} for r in rles()]))
    return dict(bench="bitmask", image=f"{size[1]}x{size[0]}", input=f"{w}x{h}", labels=len(values),
                bitmask_png_s=png_s, brush_rle_s=rle_s, ratio=png_s / rle_s,
                bitmask_reply_bytes=png_bytes, brush_reply_bytes=rle_bytes)


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Fused attention ``[B, H, Lq, E] x [B, H, Lk, E] x [B, H, Lk, Ev]``: Q K^T and P V."""
    b, h, lq, e = query
    return 2 * b * h * lq * key[-2] * e + 2 * b * h * lq * key[-2] * value[-1]


def _native_mha_flops(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fused inference path (open_clip's plain blocks): the q/k/v
    and output projections and the attention itself."""
    b, lq, e = query
    lk = key[1]
    return 2 * b * lq * e * 3 * e + 4 * b * lq * lk * e + 2 * b * lq * e * e


def count_forward_flops(gem, x: torch.Tensor) -> int:
    """FLOPs of ``gem.encode_image(x)`` (a multiply-add is 2), attention included.

    ``torch.utils.flop_counter`` has formulas for the matmuls and for the CUDA fused
    attention kernels, but none for CPU's fused ``scaled_dot_product_attention`` kernel nor
    for ``nn.MultiheadAttention``'s fused inference op: without these it misses the attention
    (and, for the latter, the projections) of every block. They are added here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    # torch's own op names (underscored): looked up by name, and only where this torch has them
    for name, formula in (("_native_multi_head_attention", _native_mha_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
                          ("_scaled_dot_product_fused_attention_overrideable", _sdpa_flops)):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = formula
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=extra) as counter:
        gem.encode_image(x)
    return int(counter.get_total_flops())


def analytic_forward_flops(gem, height: int, width: int, batch: int = 1) -> dict:
    """The hand count of ``encode_image`` for a ViT (BENCHMARKS.md writes it out).

    T = 1 + (H/p)(W/p) tokens, width d, MLP width m, L blocks of which G are GEM blocks.
    Every block: q/k/v 6Td^2, attention 4T^2 d, output projection 2Td^2, MLP 4Tdm. A GEM
    block adds, per self-self iteration and once more for the final pass, attention of the 3
    paths (v, k, q): 3 x 4T^2 d each, and the GEM path's output projection 2Td^2. Plus the
    patch embedding 2 N (3 p^2) d and the projection of both outputs 2 x 2 T d D.
    """
    visual = gem.visual
    ph, pw = gem.patch_size
    d = visual.conv1.out_channels
    blocks = visual.transformer.resblocks
    m = blocks[0].mlp.c_fc.out_features
    n = (height // ph) * (width // pw)
    t = n + 1
    layers, g = len(blocks), len(blocks) - gem.first_gem_block
    out_dim = visual.proj.shape[1] if visual.proj is not None else 0
    block = 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * m
    gem_extra = (gem.ss_attn_iter + 1) * 3 * 4 * t * t * d + 2 * t * d * d
    patch = 2 * n * 3 * ph * pw * d
    proj = 2 * 2 * t * d * out_dim
    total = batch * (layers * block + g * gem_extra + patch + proj)
    return dict(tokens=t, width=d, mlp=m, layers=layers, gem_blocks=g, per_block=block, gem_extra_per_block=gem_extra,
                patch_embed=patch, projections=proj, total=total)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, runs: int = 5) -> dict:
    """GFLOP/s of an n x n x n GEMM in ``dtype``: the fastest of ``runs`` (the peak) and the median."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    med, times = _median_time(lambda: a @ b, runs, 1, device.type == "cuda")
    flops = 2 * n ** 3
    return dict(n=n, peak_gflops=flops / min(times) / 1e9, median_gflops=flops / med / 1e9)


def bench_limit(loaded, size: int, runs: int = 3) -> dict:
    """FLOPs of one forward (counted, and the hand count), the GEMM peak of this machine in the
    model's dtype, the measured forward and its share of that peak."""
    dtype = loaded.dtype
    name = str(dtype).replace("torch.", "")
    x = torch.randn(1, 3, size, size, device=loaded.device).to(dtype)
    flops = count_forward_flops(loaded.gem, x)
    hand = analytic_forward_flops(loaded.gem, size, size)
    rec = dict(bench="limit", size=size, dtype=name, forward_gflop=flops / 1e9, hand_count_gflop=hand["total"] / 1e9,
               counter_over_hand=flops / hand["total"], hand_count=hand)
    if _emulated(loaded.device, dtype):
        rec.update(matmul="not timed: this CPU has no native bf16 (avx512_bf16/amx_bf16), bf16 would be emulated")
        return rec
    peak = matmul_peak(loaded.device, dtype)
    with torch.inference_mode():
        forward_s, times = _median_time(lambda: loaded.gem.encode_image(x), runs, 1, loaded.device.type == "cuda")
    rec.update(matmul=peak, forward_s=forward_s, forward_min_s=min(times),
               floor_s=flops / (peak["peak_gflops"] * 1e9),
               achieved_gflops=flops / min(times) / 1e9,
               percent_of_matmul_peak=100.0 * flops / min(times) / (peak["peak_gflops"] * 1e9))
    return rec


def _emulated(device: torch.device, dtype: torch.dtype) -> bool:
    from ..algorithm.models import cpu_has_native_bf16

    return device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16()


def machine_info() -> dict:
    """The CPU (model, family/model numbers, bf16/AMX/AVX-512 flags), cores, torch, GPU."""
    from ..settings import available_cores

    info: dict = {"cores": available_cores(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first = text.split("\n\n", 1)[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["cpu"] = fields.get("model name", "unknown")
    info["cpu_family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
                                        "amx_tile", "amx_int8", "amx_fp16"})
    info["native_bf16"] = bool(flags & {"avx512_bf16", "amx_bf16"})
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def _bench_subprocess(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _json_lines(proc: subprocess.Popen, what: str, timeout: float = 1800) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{err[-2000:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def bench_oversubscribe(model: str, precision: str, size: int, runs: int) -> list[dict]:
    """Two processes at once, each timing the GEM forward: with the default threads
    (cores / 2 each: ``WORKERS=2``) and with all cores each (oversubscribed), and one process
    alone with all cores for reference. Forward seconds per image, per process."""
    import sys
    import tempfile

    from ..settings import available_cores

    cores = available_cores()
    base = [sys.executable, "-m", "gem_backend.cli", "bench", "--model", model, "--precision", precision,
            "--size", str(size), "--sections", "forward", "--runs", str(runs), "--json"]
    out = []
    for case, threads, n in (("alone, all cores", cores, 1), ("2 processes, default threads", 0, 2),
                             ("2 processes, all cores each", cores, 2)):
        with tempfile.TemporaryDirectory() as barrier:
            env = dict(os.environ, WORKERS=str(n), HF_HUB_OFFLINE="1")
            procs = [_bench_subprocess(base + ["--threads", str(threads), "--barrier", f"{barrier}:{i}/{n}"], env)
                     for i in range(n)]
            recs = [next(r for r in _json_lines(p, case) if r["bench"] == "forward") for p in procs]
        out.append(dict(bench="oversubscribe", case=case, processes=n, cores=cores,
                        threads_per_process=[r["threads"] for r in recs],
                        forward_s_per_process=[r["image_tower_s"] for r in recs],
                        forward_min_s_per_process=[r["image_tower_min_s"] for r in recs],
                        images_per_s_total=sum(1.0 / r["image_tower_s"] for r in recs)))
    return out


def bench_throughput(model: str, precision: str, labels: int = 10, device: str = "cpu") -> list[dict]:
    """60 tasks (20 each of 0.3, 2 and 12 megapixel JPEGs, interleaved) with ``labels`` brush
    labels, threshold 0, served over HTTP from this process (127.0.0.1, allowed by
    ``GEM_ALLOWED_HOSTS``): through ``predict_tasks`` in one call, and through the bulk
    prelabel path (``run_local`` against an in-memory Label Studio) with one and with two
    worker processes. One fresh process per run (model loaded and warm before the clock
    starts; the image-feature cache is cleared); images per second and peak RSS per process."""
    import functools
    import sys
    import tempfile
    import threading

    sizes = [(640, 480), (1632, 1224), (4000, 3000)]
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i in range(60):
            w, h = sizes[i % 3]
            name = f"img{i:02d}_{w}x{h}.jpg"
            Path(tmp, name).write_bytes(_synthetic_photo(w, h, seed=100 + i))
            names.append(name)
        handler = functools.partial(_QuietHandler, directory=tmp)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        urls = Path(tmp, "urls.txt")
        urls.write_text("\n".join(f"http://127.0.0.1:{server.server_port}/{n}" for n in names))
        env = dict(os.environ, GEM_MODEL=model, GEM_PRETRAINED="none", GEM_PRECISION=precision, GEM_DEVICE=device,
                   GEM_ALLOWED_HOSTS="127.0.0.1", GEM_IMAGE_CACHE_MB="0", HF_HUB_OFFLINE="1")
        env.pop("REDIS_URL", None)
        out = []
        try:
            for mode, workers in (("predict_tasks", 1), ("prelabel", 1), ("prelabel", 2)):
                with tempfile.TemporaryDirectory() as barrier:
                    run_env = dict(env, WORKERS=str(workers))
                    procs = [_bench_subprocess(
                        [sys.executable, "-m", "gem_backend.jobs.throughput", "--urls", str(urls), "--mode", mode,
                         "--share", f"{i}/{workers}", "--labels", str(labels), "--barrier", barrier], run_env)
                        for i in range(workers)]
                    recs = [_json_lines(p, f"throughput {mode}")[-1] for p in procs]
                wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
                out.append(dict(bench="throughput", path=mode, workers=workers, tasks=60, labels=labels,
                                images="20 x 0.3 MP + 20 x 2 MP + 20 x 12 MP JPEG", seconds=wall,
                                images_per_s=60 / wall, done=sum(r["done"] for r in recs),
                                threads_per_process=[r["threads"] for r in recs],
                                peak_rss_mb_per_process=[round(r["peak_rss_mb"], 1) for r in recs],
                                label_studio="in-memory stand-in (jobs.throughput.MemoryLabelStudio)"
                                if mode == "prelabel" else None))
        finally:
            server.shutdown()
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the bench's images without an access log."""

    def log_message(self, *args) -> None:
        pass


def bench_reference(venv: str, model: str, size: int, labels: int, runs: int, device: str) -> dict:
    script = Path(__file__).resolve().parents[2] / "shared" / "bench" / "time_reference.py"
    if not script.exists():
        script = Path("../shared/bench/time_reference.py").resolve()
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no python in {venv}: build it with bash ../shared/bench/setup_reference.sh {venv}")
    ref_model = {"ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14", "ViT-B-32": "ViT-B/32"}.get(model, model)
    proc = subprocess.run([str(python), str(script), "--model", ref_model, "--size", str(size), "--labels",
                           str(labels), "--runs", str(runs), "--device", device],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed:\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return dict(bench="reference", **json.loads(line))


def run(args) -> list[dict]:
    """Run the selected sections; returns their records (also printed)."""
    sections = set(args.sections.split(","))
    records: list[dict] = []

    machine = machine_info()

    def emit(rec: dict) -> None:
        rec = dict(rec)
        try:
            machine["load_average"] = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            pass
        rec["machine"] = dict(machine)  # every record says where it was measured
        records.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            items = ", ".join(f"{k}={_fmt(v)}" for k, v in rec.items() if k not in ("bench", "machine"))
            print(f"{rec['bench']:>10}: {items}", flush=True)

    precisions = args.precision.split(",")
    fp32_forward = None
    for precision in precisions:
        loaded = build_model(args.model, precision, args.device)
        if "forward" in sections:
            rec = bench_forward(loaded, args.size, args.batch, args.labels, args.runs, args.warmup, args.barrier)
            emit(rec)
            if rec["dtype"] == "float32":
                fp32_forward = rec
            elif fp32_forward and rec["image_tower_s"] is not None:
                emit(dict(bench="ratio", what=f"{rec['dtype']} / float32 image tower",
                          ratio=rec["image_tower_s"] / fp32_forward["image_tower_s"]))
        if "limit" in sections:
            emit(bench_limit(loaded, args.size, args.runs))
        if precision == precisions[0]:
            if "text" in sections:
                emit(bench_text(loaded))
            if "e2e" in sections:
                emit(bench_e2e(loaded, labels=20, runs=args.runs, profile=args.profile))
            if "click" in sections:
                emit(bench_click(loaded, runs=args.runs))
    if "rle" in sections:
        for rec in bench_rle():
            emit(rec)
    if "bitmask" in sections:
        emit(bench_bitmask(runs=args.runs))
    fastest = precisions[-1]
    if "oversubscribe" in sections:
        for rec in bench_oversubscribe(args.model, fastest, args.size, args.runs):
            emit(rec)
    if "throughput" in sections:
        for rec in bench_throughput(args.model, fastest, device=args.device):
            emit(rec)
    if args.reference:
        # same weights and input through both: outputs must agree, timings side by side
        emit(compare_reference(args.reference, args.model, args.size, args.labels, args.runs))
        ref = bench_reference(args.reference, args.model, args.size, args.labels, args.runs, args.device or "cpu")
        emit(ref)
        for rec in records:
            if rec["bench"] == "forward":
                emit(dict(bench="ratio", what=f"ours {rec['dtype']} / reference (same work, median)",
                          ratio=rec["with_text_and_maps_s"] / ref["median_s"]))
                emit(dict(bench="ratio", what=f"ours {rec['dtype']} / reference (same work, fastest run)",
                          ratio=rec["with_text_and_maps_min_s"] / min(ref["runs_s"])))
    emit(dict(bench="rss", peak_rss_mb=peak_rss_mb()))
    return records


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time GEM and the request path (JSON lines with --json)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    p.add_argument("--size", type=int, default=448, help="square input size (default 448)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--labels", type=int, default=5, help="labels of the forward section (default 5)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: the serving default, cores / WORKERS, or GEM_TORCH_THREADS)")
    p.add_argument("--sections", default="forward,text,e2e,rle,limit,click",
                   help="comma-separated; also bitmask (BitmaskLabels PNG vs brush RLE per 12 MP image), "
                        "oversubscribe, throughput (several processes; they use the last --precision)")
    p.add_argument("--barrier", help=argparse.SUPPRESS)  # DIR:I/N, oversubscribe's child processes
    p.add_argument("--reference", metavar="VENV", help="also time the official package in this venv")
    p.add_argument("--json", action="store_true", help="JSON lines instead of the table")
    p.add_argument("--profile", action="store_true", help="e2e: also profile the time outside the forward")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from ..settings import Settings, configure_torch_threads

    settings = Settings.from_env()
    if args.threads:
        settings = settings.replace(torch_threads=args.threads)
    configure_torch_threads(settings, what="bench")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args)
    return 0



_REFERENCE_SNIPPET = r"""
import json, sys, time, numpy as np, torch, gem
a = json.loads(sys.argv[1])
torch.set_num_threads(torch.get_num_threads())
model = gem.create_gem_model(a["model"], pretrained=a["weights"], device="cpu",
                             gem_depth=a["depth"], ss_attn_iter=a["iter"]).eval()
x = torch.from_numpy(np.load(a["input"]))
with torch.no_grad():
    out = model(x, a["labels"], normalize=False)
    times = []
    for _ in range(a["runs"]):
        t = time.perf_counter(); model(x, a["labels"], normalize=False); times.append(time.perf_counter() - t)
np.save(a["output"], out.numpy())
print(json.dumps(dict(median_s=sorted(times)[len(times) // 2])))
"""


def compare_reference(venv: str, model: str = "ViT-B-16", size: int = 448, labels: int = 5,
                      runs: int = 3, depth: int = 7, ss_attn_iter: int = 1) -> dict:
    """Same random weights and input through the official package (in ``venv``) and ours.

    Returns the largest absolute difference of the raw heat maps and both timings
    (the same work: text tower, image tower, maps), float32 on CPU.
    """
    import tempfile

    from ..algorithm.gem import GEM
    from ..algorithm.models import load_gem_model

    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no python in {venv}: build it with bash ../shared/bench/setup_reference.sh {venv}")
    torch.manual_seed(0)
    loaded = load_gem_model(model, None, device="cpu", precision="fp32", depth=depth, ss_attn_iter=ss_attn_iter)
    names = [f"object number {i}" for i in range(labels)]
    x = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")
        torch.save(loaded.gem.model.state_dict(), weights)
        np.save(os.path.join(tmp, "x.npy"), x.numpy())
        # gem.create_gem_model accepts open_clip names as they are
        args = dict(model=model, weights=weights, depth=depth, iter=ss_attn_iter, input=os.path.join(tmp, "x.npy"),
                    labels=names, runs=runs, output=os.path.join(tmp, "ref.npy"))
        proc = subprocess.run([str(python), "-c", _REFERENCE_SNIPPET, json.dumps(args)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed:\n{proc.stderr[-3000:]}")
        ref_time = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])["median_s"]
        ref = np.load(os.path.join(tmp, "ref.npy"))
    gem = GEM(loaded.gem.model, depth=depth, ss_attn_iter=ss_attn_iter)
    with torch.inference_mode():
        ours = gem.similarity_maps(x, gem.encode_text(names)).numpy()
        our_time, _ = _median_time(lambda: gem.similarity_maps(x, gem.encode_text(names)), runs, 1)
    return dict(bench="compare", model=model, size=size, labels=labels, max_abs_diff=float(np.abs(ours - ref).max()),
                ours_median_s=our_time, reference_median_s=ref_time, threads=torch.get_num_threads())
