"""GPU throughput: images/s at batch 1, 8 and 32, fp32 and fp16, ViT-B/16 and ViT-L/14.

Ours (this repo on open_clip 3.x) or the reference (gem-torch 1.0.1 on open_clip 2.23),
random weights, 448x448, 5 labels; one JSON line per measurement.

    python benchmarks/gpu_bench.py --impl ours
    python benchmarks/gpu_bench.py --impl reference     # in an env with gem-torch + open_clip 2.23

For the reference, a batch goes through GEMWrapper.forward as one [B, 3, H, W] tensor
(it is silently wrong for B > 1 on open_clip >= 2.26 but not on 2.23; timing is what counts).
"""

import argparse
import json
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--impl", choices=["ours", "reference"], required=True)
ap.add_argument("--models", default="ViT-B-16,ViT-L-14")
ap.add_argument("--batches", default="1,8,32")
ap.add_argument("--dtypes", default="fp32,fp16")
ap.add_argument("--size", type=int, default=448)
ap.add_argument("--labels", type=int, default=5)
ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per measurement")
a = ap.parse_args()

dev = torch.device("cuda")
names = [f"object number {i}" for i in range(a.labels)]
for model_name in a.models.split(","):
    for dt in a.dtypes.split(","):
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[dt]
        if a.impl == "ours":
            from gem_backend.algorithm.models import load_gem_model

            gem = load_gem_model(model_name, None, device="cuda", precision=dt).gem
            text = gem.encode_text(names)
            step = lambda x: gem.similarity_maps(x, text)  # noqa: E731  labels cached, as when serving
        else:
            import gem as gem_ref

            model = gem_ref.create_gem_model(model_name, pretrained=None, device="cuda", precision=dt).eval()
            step = lambda x: model(x, names)  # noqa: E731
        for b in map(int, a.batches.split(",")):
            x = torch.randn(b, 3, a.size, a.size, device=dev, dtype=dtype)
            with torch.inference_mode():
                for _ in range(3):
                    step(x)
                torch.cuda.synchronize()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < a.seconds:
                    step(x)
                    n += 1
                torch.cuda.synchronize()
                dt_s = time.perf_counter() - t0
            print(json.dumps(dict(impl=a.impl, model=model_name, dtype=dt, batch=b, size=a.size,
                                  images_per_s=n * b / dt_s, gpu=torch.cuda.get_device_name())), flush=True)
