"""Cost per image of each method, PAMR on/off, and sliding windows: JSON lines on stdout.

    .venv/bin/python benchmarks/methods_cost.py [--precision bf16|fp32] [--runs 3] [--labels 20]

Random-init ViT-B-16 (the cost does not depend on the weight values), 2 torch threads, CPU.
Rows:
- ``method``: the image tower of each method at 448x448 (``encode_image``), median/min;
- ``refine``: PAMR (10 iterations, dilations 8,16) on the logits of ``--labels`` labels plus
  the 6 background prompts at 448x448, the way the predictor runs it;
- ``windows``: a 12-megapixel photo's working size through windows of 448, stride 224, at
  short sides 448, 896 and 1344: number of windows and seconds (GEM), to show the cost grows
  with the number of windows.
Every row names the CPU, its bf16 flags and the load average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


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


def timed(fn, runs: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return dict(median_s=round(statistics.median(times), 4), min_s=round(min(times), 4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip

    from gem_backend import create_method, method_names, pamr
    from gem_backend.algorithm.segmentation import SegmentationSettings, model_input_size
    from gem_backend.algorithm.windows import sliding_windows, window_tokens

    info = cpu()
    if args.precision == "bf16" and not (info["avx512_bf16"] or info["amx_bf16"]):
        print(json.dumps(dict(info, note="this CPU has no native bf16: bf16 would be emulated, not timed")))
        return
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval().to(dtype)
    x = torch.randn(1, 3, 448, 448)
    with torch.inference_mode():
        for name in method_names():
            method = create_method(name, clip)
            print(json.dumps(dict(info, row="method", method=name, size=448, precision=args.precision,
                                  **timed(lambda: method.encode_image(x), args.runs))), flush=True)
        maps = torch.randn(1, args.labels + 6, 448, 448)
        guide = torch.randint(0, 256, (1, 3, 448, 448)).float()
        print(json.dumps(dict(info, row="refine", refine="pamr", size=448, prompts=args.labels + 6,
                              iterations=10, dilations=[8, 16], **timed(lambda: pamr(guide, maps), args.runs))),
              flush=True)
        gem = create_method("gem", clip)
        for short in (448, 896, 1344):
            seg = SegmentationSettings(windows_above=1, window=448, window_stride=224, window_short_side=short)
            h, w = model_input_size(3000, 4000, seg, (16, 16))
            big = torch.randn(3, h, w)
            n = len(sliding_windows(h, w, 448, 224))
            boxes = sliding_windows(h, w, 448, 224)
            row = timed(lambda: window_tokens(gem, big, boxes, batch_size=1), max(1, args.runs - 2))
            print(json.dumps(dict(info, row="windows", method="gem", working_size=[h, w], windows=n,
                                  precision=args.precision, per_window_s=round(row["median_s"] / n, 4), **row)),
                  flush=True)


if __name__ == "__main__":
    main()
