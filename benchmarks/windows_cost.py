"""Decision cost of the official window averaging against the old token-grid stitching: JSON lines.

    .venv/bin/python benchmarks/windows_cost.py [--height 1500 --width 2000] [--prompts 20] [--runs 3]
        [--model CONFIG.json --weights FILE.safetensors] [--device cpu|cuda] [--threads 2]

An image of ``--height x --width`` is seen as serving sees a large image
(``SegmentationSettings(windows_above=1, window=448, window_stride=224, window_short_side=1344)``:
2000 x 1500 -> a 1344 x 1792 working size, 35 windows). Per image, from the windows' tokens (the
image tower is not timed: it is the same for both):

- ``new``: :func:`gem_backend.algorithm.windows.window_logits` (each window's map upsampled to the
  window, averaged per pixel: the official protocol, what serving and eval run now);
- ``old``: the former path, kept here only: the windows' normalised tokens averaged on the image's
  token grid, one map upsampled to the working size.

Both rows time the maps alone and the maps plus the decision (softmax of ``50 x`` the logits over
the prompts, best and winner), medians of ``--runs``. An ``error`` row gives the max abs difference
of the old logits from the new. Tokens: random unit vectors (the cost does not depend on them), or
with ``--model``/``--weights`` (an open_clip config and its weights, e.g. the tiny golden model of
``shared/golden/scclip-reference``) the GEM tokens of a smooth synthetic image, so that the error
row means something. Every row names the CPU, its bf16 flags, the load average and torch threads.
Not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods_cost import cpu, timed  # noqa: E402


def stitched_logits(tokens, windows, text, size, patch: int) -> torch.Tensor:
    """The old arithmetic (removed from the package): per token-grid cell the mean of the windows'
    normalised tokens covering it, ``cells @ text^T``, one bilinear upsampling. Windows on the
    patch grid only."""
    h, w = size[0] // patch, size[1] // patch
    total = torch.zeros(h, w, tokens[0].shape[-1], device=text.device)
    count = torch.zeros(h, w, 1, device=text.device)
    for t, win in zip(tokens, windows):
        y1, _, x1, _ = win.box
        r, c = y1 // patch, x1 // patch
        total[r:r + win.grid[0], c:c + win.grid[1]] += t.to(text.device).reshape(*win.grid, -1)
        count[r:r + win.grid[0], c:c + win.grid[1]] += 1
    sim = ((total / count).reshape(h * w, -1) @ text.t()).t().reshape(1, text.shape[0], h, w)
    return F.interpolate(sim, size=tuple(size), mode="bilinear", align_corners=False)[0]


def decision(logits: torch.Tensor, scale: float = 50.0):
    p = torch.softmax(logits * scale, dim=0)
    return p.max(dim=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--window", type=int, default=448)
    ap.add_argument("--stride", type=int, default=224)
    ap.add_argument("--short-side", type=int, default=1344)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="open_clip config JSON (tokens from GEM on a synthetic image)")
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gem_backend.algorithm.segmentation import SegmentationSettings, model_input_size
    from gem_backend.algorithm.windows import Window, sliding_windows, window_logits, window_tokens

    patch = 16
    seg = SegmentationSettings(windows_above=1, window=args.window, window_stride=args.stride,
                               window_short_side=args.short_side)
    size = model_input_size(args.height, args.width, seg, (patch, patch))
    boxes = sliding_windows(*size, args.window, args.stride)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if args.model:
            from gem_backend import load_gem_model

            loaded = load_gem_model(args.model, args.weights, device=args.device, precision="fp32")
            method = loaded.method("gem")
            patch = method.patch_size[0]
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
            x = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy]).to(device)
            tokens, windows = window_tokens(method, x, boxes)
            dim, source = tokens[0].shape[-1], f"gem on a synthetic image ({args.model})"
        else:
            grid = (args.window // patch, args.window // patch)
            windows = [Window(b, grid) for b in boxes]
            tokens = [F.normalize(torch.randn(grid[0] * grid[1], args.dim, generator=g), dim=-1).to(device)
                      for _ in boxes]
            dim, source = args.dim, "random unit vectors"
        text = F.normalize(torch.randn(args.prompts, dim, generator=g), dim=-1).to(device)
        base = dict(cpu(), device=str(device), image=[args.height, args.width], working_size=list(size),
                    windows=len(boxes), window=args.window, stride=args.stride, prompts=args.prompts, tokens=source)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        rows = {
            "new": lambda: window_logits(tokens, windows, text, size),
            "old": lambda: stitched_logits(tokens, windows, text, size, patch),
        }
        for name, fn in rows.items():
            maps = timed(lambda: (fn(), sync()), args.runs)
            full = timed(lambda: (decision(fn()), sync()), args.runs)
            print(json.dumps(dict(base, row=name, maps=maps, maps_and_decision=full)), flush=True)
        new, old = rows["new"](), rows["old"]()
        err = (new - old).abs()
        print(json.dumps(dict(base, row="error", max_abs=float(err.max()), mean_abs=float(err.mean()),
                              argmax_pixels_changed=int((new.argmax(0) != old.argmax(0)).sum()),
                              pixels=size[0] * size[1])), flush=True)


if __name__ == "__main__":
    main()
