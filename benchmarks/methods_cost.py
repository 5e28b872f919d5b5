"""Cost per image of each method, PAMR, windows, SAM 2 regions and the vote: JSON lines on stdout.

    .venv/bin/python benchmarks/methods_cost.py [--precision fp32|bf16|fp16] [--runs 3] [--labels 20]
        [--rows method,protocol,corrclip,sam2,vote,refine,windows] [--sam2 hiera_tiny,hiera_large]
        [--device cpu|cuda]

Random-init ViT-B-16 (the cost does not depend on the weight values), ``--threads`` torch
threads (2), CPU. Each row group runs in its own process, so its ``peak_rss_mb`` (the process's
maximum resident set, model included) is its own. Rows:

- ``method``: the image tower of each CLIP-only method at 448x448 (``encode_image``), median/min,
  and ``x_gem``: the median over GEM's in the same run;
- ``protocol``: one 336x448 image through each method's official per-image protocol
  (``harness.Segmenter.logits``: short side 336, windows 224/112 (6 windows), ``--labels`` queries;
  CorrCLIP: windows 336/112, padded to 56, 2 windows), and ``x_gem`` against GEM under the same;
- ``corrclip``: CorrCLIP's tower on one 336x336 window with DINO ViT-S/8 and ViT-B/8 (random
  weights of the real architectures, via timm), with and without regions (a 12-region map);
- ``sam2``: SAM 2.1 regions of a 640x480 photo (``RegionGenerator.instance_map``: CorrCLIP's 8x8
  points, thresholds 0.4): total, of which the image encoder (``SAM2ImagePredictor.set_image``),
  the rest being prompts, mask decoding and post-processing; per model of ``--sam2``;
- ``vote``: ``vote_regions`` on a 448x597 label map (serving's small map) and on 3000x4000
  (full size), 60 regions; ``sorted``: the same through ``np.unique`` (the path for widely spread ids);
- ``knn``: SC-CLIP's 31 nearest tokens of N = 1568 tokens of width 768 (a 448x896 image), one
  thread: the official float32 difference form against ``scclip.knn_sq_distances`` (float64 Gram);
- ``refine``: PAMR (10 iterations, dilations 8,16) on ``--labels`` + 6 prompts at 448x448;
- ``windows``: GEM through 448/224 windows on a 12-megapixel photo's working size at short
  sides 448, 896, 1344.

Every row names the CPU, its bf16 flags, the load average at its start and the torch threads
(and the GPU with ``--device cuda``, where the timings synchronise the device and the peak
row is ``peak_cuda_mb``). bf16 is timed on a CPU only where it has it natively.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROW_GROUPS = ("method", "protocol", "corrclip", "sam2", "vote", "knn", "refine", "windows")
CLIP_METHODS = ("gem", "clip", "sclip", "clearclip", "naclip", "scclip", "sfp")


def cpu() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return dict(cpu=model, avx512_bf16="avx512_bf16" in flags, amx_bf16="amx_bf16" in flags,
                load=os.getloadavg()[0], threads=torch.get_num_threads())


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, runs: int) -> dict:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return dict(median_s=round(statistics.median(times), 4), min_s=round(min(times), 4))


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def emit(row: dict) -> None:
    extra = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        extra["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(dict(row, peak_rss_mb=peak_rss_mb(), **extra)), flush=True)


def random_dino(name: str, precision: str, device: str = "cpu"):
    """DINO ``name`` with timm's random initialisation, through ``load_dino`` (a temporary file)."""
    import timm
    from safetensors.torch import save_file

    from gem_backend import load_dino

    arch = {"dino_vits8": "vit_small_patch8_224", "dino_vitb8": "vit_base_patch8_224"}[name]
    vit = timm.create_model(arch, pretrained=False, num_classes=0)
    path = os.path.join(tempfile.mkdtemp(), f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return load_dino(name, path, device=device, precision=precision)


def photo(height: int, width: int) -> np.ndarray:
    """A smooth synthetic picture (a few blobs), uint8."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([np.sin(7 * xx + 3 * yy), np.cos(5 * yy - 2 * xx), np.sin(9 * xx * yy)], axis=-1)
    return ((img + 1) * 127.5).clip(0, 255).astype(np.uint8)


def regions_map(height: int, width: int, n: int, seed: int = 0) -> np.ndarray:
    """An instance map of about ``n`` rectangles (ids 1..n) over part of the image, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width), np.int64)
    for i in range(1, n + 1):
        h, w = rng.integers(height // 8, height // 2), rng.integers(width // 8, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        out[y:y + h, x:x + w] = i
    return out


def run_group(group: str, args, info: dict) -> None:
    import open_clip

    from gem_backend import create_method, pamr, vote_regions

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    dev = torch.device(args.device)
    base = dict(info, precision=args.precision, device=args.device)
    if dev.type == "cuda":
        base["gpu"] = torch.cuda.get_device_name(dev)
    if group in ("method", "protocol", "corrclip", "windows"):
        clip = open_clip.create_model("ViT-B-16", pretrained=None).eval().to(device=dev, dtype=dtype)
    with torch.inference_mode():
        if group == "method":
            x = torch.randn(1, 3, 448, 448, device=dev)
            gem_median = None
            for name in CLIP_METHODS:
                method = create_method(name, clip)
                row = timed(lambda: method.encode_image(x), args.runs)
                gem_median = gem_median or row["median_s"]
                emit(dict(base, row="method", method=name, size=[448, 448], x_gem=round(row["median_s"] / gem_median, 2),
                          **row))
        elif group == "protocol":
            from gem_backend.algorithm.models import load_gem_model
            from gem_backend.evaluation.harness import Protocol, Segmenter

            loaded = load_gem_model("ViT-B-16", "none", device=args.device, precision=args.precision)
            image = photo(336, 448)
            names = [f"thing {i}" for i in range(args.labels)]
            gem_median = None
            variants = [(m, {}, Protocol("sclip", resize="short", size=336, crop=224, stride=112)) for m in CLIP_METHODS]
            for dino in args.dino.split(","):
                variants.append(("corrclip", {"dino": dino},
                                 Protocol("corrclip", resize="short", size=336, crop=336, stride=112)))
            for name, extra, protocol in variants:
                options = {}
                if name == "corrclip":
                    d = random_dino(extra["dino"], args.precision, args.device)
                    loaded.methods.clear()
                    loaded.methods[("corrclip", ())] = create_method("corrclip", loaded.gem.model, dino=d)
                seg = Segmenter(loaded, protocol, method=name, method_options=options)
                text = seg.encode(names)
                regions = regions_map(336, 448, 12) if name == "corrclip" else None
                row = timed(lambda: seg.logits(image, text, regions=regions), max(1, args.runs - 1))
                gem_median = gem_median or row["median_s"]
                emit(dict(base, row="protocol", method=name, **extra, image=[336, 448], crop=protocol.crop,
                          stride=protocol.stride, queries=args.labels, x_gem=round(row["median_s"] / gem_median, 2),
                          **row))
        elif group == "corrclip":
            gem = create_method("gem", clip)
            x = torch.randn(1, 3, 336, 336, device=dev)
            gem_row = timed(lambda: gem.encode_image(x), args.runs)
            emit(dict(base, row="corrclip", method="gem", size=[336, 336], **gem_row))
            regions = torch.from_numpy(regions_map(336, 336, 12))[None].to(dev)
            for dino in args.dino.split(","):
                method = create_method("corrclip", clip, dino=random_dino(dino, args.precision, args.device))
                for with_regions in (False, True):
                    r = regions if with_regions else None
                    row = timed(lambda: method.encode_image(x, regions=r), args.runs)
                    emit(dict(base, row="corrclip", method="corrclip", dino=dino, size=[336, 336],
                              regions=with_regions, x_gem=round(row["median_s"] / gem_row["median_s"], 2), **row))
        elif group == "sam2":
            from gem_backend.algorithm.sam import RegionGenerator, load_sam2

            image = photo(480, 640)
            for name in args.sam2.split(","):
                gen = RegionGenerator(load_sam2(name, "none", device=args.device))
                predictor = gen.generator.predictor
                spent = []
                original = predictor.set_image

                def set_image(*a, **kw):
                    t = time.perf_counter()
                    out = original(*a, **kw)
                    sync()
                    spent.append(time.perf_counter() - t)
                    return out

                predictor.set_image = set_image
                row = timed(lambda: gen.instance_map(image), max(1, args.runs - 1))
                encoder = statistics.median(spent[1:] or spent)
                emit(dict(base, row="sam2", model=name, image=[480, 640], points=8, encoder_s=round(encoder, 4),
                          prompts_and_post_s=round(row["median_s"] - encoder, 4), **row))
        elif group == "vote":
            from gem_backend.algorithm import regions as regions_module

            direct = regions_module.DIRECT_BINS
            for size in ((448, 597), (3000, 4000)):
                labels = np.random.default_rng(0).integers(0, 21, size=size).astype(np.uint16)
                inst = regions_map(*size, 60)
                for sorted_ids in (False, True):
                    regions_module.DIRECT_BINS = 0 if sorted_ids else direct
                    row = timed(lambda: vote_regions(labels, inst), args.runs)
                    emit(dict(base, row="vote", size=list(size), regions=60, sorted=sorted_ids, **row))
            regions_module.DIRECT_BINS = direct
        elif group == "knn":
            from gem_backend.algorithm.scclip import knn_sq_distances

            torch.set_num_threads(1)
            x = torch.randn(1568, 768, generator=torch.Generator().manual_seed(0))

            def difference_form():  # the official formula, in row chunks of ~128 MB
                for start in range(0, 1568, 27):
                    d = torch.norm(x[start:start + 27, None] - x[None], dim=2) ** 2
                    d.topk(31, dim=1, largest=False)

            for name, fn in (("official difference form", difference_form),
                             ("float64 Gram (ours)", lambda: knn_sq_distances(x, 30))):
                emit(dict(base, row="knn", tokens=1568, width=768, k=30, form=name, threads=1,
                          **timed(fn, args.runs)))
        elif group == "refine":
            maps = torch.randn(1, args.labels + 6, 448, 448, device=dev)
            guide = torch.randint(0, 256, (1, 3, 448, 448), device=dev).float()
            emit(dict(base, row="refine", refine="pamr", size=448, prompts=args.labels + 6, iterations=10,
                      dilations=[8, 16], **timed(lambda: pamr(guide, maps), args.runs)))
        elif group == "windows":
            from gem_backend.algorithm.segmentation import SegmentationSettings, model_input_size
            from gem_backend.algorithm.windows import sliding_windows, window_tokens

            gem = create_method("gem", clip)
            for short in (448, 896, 1344):
                seg = SegmentationSettings(windows_above=1, window=448, window_stride=224, window_short_side=short)
                h, w = model_input_size(3000, 4000, seg, (16, 16))
                big = torch.randn(3, h, w, device=dev, dtype=dtype)
                boxes = sliding_windows(h, w, 448, 224)
                row = timed(lambda: window_tokens(gem, big, boxes, batch_size=1), max(1, args.runs - 2))
                emit(dict(base, row="windows", method="gem", working_size=[h, w], windows=len(boxes),
                          per_window_s=round(row["median_s"] / len(boxes), 4), **row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp32", choices=("bf16", "fp32", "fp16"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROW_GROUPS), help="row groups, comma-separated")
    ap.add_argument("--sam2", default="hiera_tiny,hiera_large", help="SAM 2.1 models of the sam2 rows")
    ap.add_argument("--dino", default="dino_vits8,dino_vitb8", help="DINO models of the corrclip rows")
    ap.add_argument("--group", help=argparse.SUPPRESS)  # internal: run one group in this process
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = cpu()
    if args.device == "cpu" and args.precision != "fp32" and not (info["avx512_bf16"] or info["amx_bf16"]):
        print(json.dumps(dict(info, note="this CPU has no native bf16: bf16 would be emulated, not timed")))
        return
    if args.group:
        run_group(args.group, args, info)
        return
    for group in args.rows.split(","):
        if group not in ROW_GROUPS:
            raise SystemExit(f"unknown row group {group!r}; known: {', '.join(ROW_GROUPS)}")
        cmd = [sys.executable, __file__, "--group", group, "--precision", args.precision, "--runs", str(args.runs),
               "--labels", str(args.labels), "--threads", str(args.threads), "--sam2", args.sam2, "--dino", args.dino,
               "--device", args.device]
        done = subprocess.run(cmd, check=False)
        if done.returncode:
            print(json.dumps(dict(info, row=group, error=f"exit {done.returncode}")), flush=True)


if __name__ == "__main__":
    main()
