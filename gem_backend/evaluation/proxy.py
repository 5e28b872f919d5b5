"""``gem-backend refine-proxy``: what PAMR refinement does to a perfect patch classifier's maps.

No pretrained weights are needed: the coarse maps come from the ground truth. For each image of
a VOC-layout dataset

1. the model input as serving sizes it (:func:`gem_backend.algorithm.segmentation.model_input_size`:
   short side 448, long side capped at 896, both multiples of the 16 px patch); the image is
   resized bicubic (PIL), the ground truth nearest; the patch grid is ``h x w = H_in/16 x W_in/16``;
2. coarse maps on the grid (:func:`patch_fractions`): per class (all ``C`` classes are channels)
   the fraction of the patch's scored pixels labelled with it (255 not counted; a patch with no
   scored pixel is 0 everywhere). They become cosine-like logits ``s = 0.1 * f + 0.2`` (scores
   between 0.2 and 0.3, a CLIP-like spread; :data:`LOGIT_A`, :data:`LOGIT_B`), plus Gaussian
   noise of std ``0.1 * sigma`` (sigma relative to the fraction scale), one fixed seed per
   image and sigma, the same draw for every variant;
3. ``baseline``: the logits upsampled bilinearly (align_corners=False) to ``H_in x W_in``;
   the PAMR variants run :func:`gem_backend.algorithm.refine.pamr` on that with the resized
   image (uint8 RGB as float32, 0..255). Label map = argmax over classes.

Why the constants do not matter: bilinear upsampling and every PAMR step are convex
combinations (weights summing to 1), so both commute with ``s -> a s + b`` applied to all
channels, and the argmax is invariant for ``a > 0``: the label maps are those of the raw
fractions (to float32 rounding). ``a`` and ``b`` would matter only for a softmax or threshold
afterwards, which this proxy does not apply. PAMR's affinity ``|I_c - I_n| / (1e-8 + 0.1 sd)``
is invariant to a per-channel affine map of the image (the offset cancels in both, the scale
divides out) up to the 1e-8 epsilon, so the 0..255 image gives NACLIP's affinities on its
normalised image.

Scores at the input size, pooled over the dataset: mIoU from the summed confusion matrix
(:func:`gem_backend.evaluation.harness.segmentation_metrics`: classes with ground truth or a
prediction; also over the classes with ground truth only) and the boundary F-score of :func:`boundary_counts` (tolerance 2 px by default).

    gem-backend refine-proxy --root /work/shared/data/voc-mini --out out/refine-proxy

writes ``results.json`` and ``results.md`` in ``--out`` and prints the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..algorithm.refine import pamr
from ..algorithm.segmentation import SegmentationSettings, model_input_size
from .datasets import IGNORE, get_dataset, load_image
from .harness import confusion_matrix, segmentation_metrics

__all__ = ["PATCH", "LOGIT_A", "LOGIT_B", "SIGMAS", "Variant", "VARIANTS", "prepare", "patch_fractions",
           "coarse_logits", "upsample", "boundary_map", "dilate", "fill_thin_ignore", "boundary_counts", "boundary_f",
           "run_proxy", "proxy_markdown", "pamr_cost_ms", "add_parser", "cmd_refine_proxy"]

PATCH = 16
LOGIT_A = 0.1
LOGIT_B = 0.2
SIGMAS = (0.0, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Variant:
    """A refinement: ``iterations`` 0 means none (the bilinear baseline)."""

    name: str
    iterations: int = 0
    dilations: tuple[int, ...] = (8, 16)


VARIANTS = (Variant("baseline"), Variant("pamr", 10, (8, 16)), Variant("pamr-d1-2", 10, (1, 2)),
            Variant("pamr-it20", 20, (8, 16)))


# ---------------------------------------------------------------------------------- maps
def prepare(image: np.ndarray, label: np.ndarray, settings: SegmentationSettings | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """The model input as serving sizes it: ``([H_in, W_in, 3] uint8, [H_in, W_in] uint8)``,
    the image bicubic, the label nearest."""
    settings = settings or SegmentationSettings()
    h_in, w_in = model_input_size(image.shape[0], image.shape[1], settings, (PATCH, PATCH))
    img, lab = Image.fromarray(image), Image.fromarray(label)
    if img.size != (w_in, h_in):
        img = img.resize((w_in, h_in), Image.Resampling.BICUBIC)
        lab = lab.resize((w_in, h_in), Image.Resampling.NEAREST)
    return np.array(img), np.array(lab)


def patch_fractions(label: np.ndarray, num_classes: int, patch: int = PATCH,
                    ignore_index: int = IGNORE) -> np.ndarray:
    """``[C, h, w]`` float32: per patch the fraction of its scored pixels labelled ``c``.

    ``label`` is ``[H, W]`` with ``H, W`` multiples of ``patch``; ``ignore_index`` pixels are
    not counted; a patch with no scored pixel is 0 for every class.
    """
    hh, ww = label.shape
    if hh % patch or ww % patch:
        raise ValueError(f"label size {label.shape} is not a multiple of the patch {patch}")
    h, w = hh // patch, ww // patch
    blocks = label.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h, w, patch * patch)
    counts = np.stack([(blocks == c).sum(-1) for c in range(num_classes)]).astype(np.float32)
    valid = counts.sum(0, keepdims=True)
    return np.divide(counts, valid, out=np.zeros_like(counts), where=valid > 0)


def coarse_logits(fractions: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Cosine-like grid logits ``LOGIT_A * (f + N(0, sigma^2)) + LOGIT_B``, float32."""
    noisy = fractions + (rng.standard_normal(fractions.shape).astype(np.float32) * sigma if sigma else 0.0)
    return (LOGIT_A * noisy + LOGIT_B).astype(np.float32)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``[C, h, w]`` -> ``[1, C, H, W]`` bilinear, align_corners=False."""
    return F.interpolate(torch.from_numpy(grid)[None], size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------- boundaries
def boundary_map(label: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool, 1 px thin: the pixel's label differs from its right or lower neighbour's."""
    b = np.zeros(label.shape, dtype=bool)
    b[:, :-1] |= label[:, :-1] != label[:, 1:]
    b[:-1, :] |= label[:-1, :] != label[1:, :]
    return b


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a ``(2 radius + 1)`` square (Chebyshev distance <= radius)."""
    if radius <= 0:
        return mask.copy()
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


def fill_thin_ignore(gt: np.ndarray, steps: int = 3, ignore_index: int = IGNORE) -> np.ndarray:
    """Ground truth with ignore pixels within ``steps`` px (Chebyshev) of a scored pixel given a
    neighbour's label, step by step (the nearest label, ties to the first of the 8 offsets).

    VOC draws a ~5 px void band along every object outline; filled from both sides the fronts
    meet in the band's middle, near the true edge. Wider void regions keep their inner part.
    """
    out = gt.copy()
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for _ in range(steps):
        void = out == ignore_index
        if not void.any():
            break
        padded = np.pad(out, 1, mode="constant", constant_values=ignore_index)
        new = out.copy()
        todo = void.copy()
        for dy, dx in offsets:
            nb = padded[1 + dy: 1 + dy + out.shape[0], 1 + dx: 1 + dx + out.shape[1]]
            take = todo & (nb != ignore_index)
            new[take] = nb[take]
            todo &= ~take
        out = new
    return out


def boundary_counts(pred: np.ndarray, gt: np.ndarray, tolerance: int = 2, ignore_index: int = IGNORE,
                    fill: int = 3) -> tuple[int, int, int, int]:
    """Boundary matches of a predicted label map against the ground truth.

    Boundaries are :func:`boundary_map` of the prediction and of the ground truth with its thin
    void bands filled (:func:`fill_thin_ignore`, ``fill`` steps). A boundary pixel is matched
    if the other map has a boundary pixel within ``tolerance`` px (Chebyshev). Boundary pixels
    within ``tolerance`` of the remaining (wide) ignore region, or on its edge, are left out of
    both counts.

    Returns:
        ``(pred matched, pred boundary pixels, gt matched, gt boundary pixels)``: precision is
        ``pred matched / pred``, recall ``gt matched / gt``; sum them over images to pool.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    filled = fill_thin_ignore(gt, fill, ignore_index)
    void = filled == ignore_index
    keep = ~dilate(void, max(tolerance, 1))
    bp = boundary_map(pred) & keep
    bg = boundary_map(filled) & keep
    pm = int((bp & dilate(bg, tolerance)).sum())
    gm = int((bg & dilate(bp, tolerance)).sum())
    return pm, int(bp.sum()), gm, int(bg.sum())


def boundary_f(counts: Sequence[int]) -> dict:
    """Precision, recall and F from (pooled) :func:`boundary_counts`; no boundary in either
    map counts as a perfect 1.0, a boundary in only one of them as 0."""
    pm, pn, gm, gn = counts
    if pn == 0 and gn == 0:
        return dict(precision=1.0, recall=1.0, f=1.0)
    p = pm / pn if pn else 0.0
    r = gm / gn if gn else 0.0
    return dict(precision=p, recall=r, f=2 * p * r / (p + r) if p + r > 0 else 0.0)


# ---------------------------------------------------------------------------------- the run
def pamr_cost_ms(size: tuple[int, int] = (448, 448), num_classes: int = 21, variant: Variant = VARIANTS[1],
                 runs: int = 3) -> float:
    """Median ms of one :func:`pamr` call on a random image and maps of ``size`` (torch threads as set)."""
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, *size, generator=gen) * 255
    masks = torch.rand(1, num_classes, *size, generator=gen)
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        pamr(img, masks, variant.iterations, variant.dilations)
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]) * 1000)


def run_proxy(root: str | Path, dataset: str = "voc21", sigmas: Sequence[float] = SIGMAS,
              variants: Sequence[Variant] = VARIANTS, tolerance: int = 2, seed: int = 0,
              limit: int | None = None, echo: Callable[[str], None] = print) -> dict:
    """The proxy on a dataset: per (variant, sigma) mIoU, boundary F and seconds per image.

    Returns:
        ``{"config": ..., "results": [{variant, sigma, iterations, dilations, mIoU, mIoU_gt, aAcc,
        boundary_precision, boundary_recall, boundary_f, seconds_per_image}], ...}``; fractions
        in [0, 1]; ``mIoU`` as the harness (classes with ground truth or a prediction: a class
        the noise makes up somewhere scores 0), ``mIoU_gt`` over the classes with ground truth
        only; the time covers upsampling, PAMR and the argmax.
    """
    spec = get_dataset(dataset)
    samples = spec.samples(root)[:limit] if limit else spec.samples(root)
    n_cls = len(spec.classes)
    cms = {(v.name, s): np.zeros((n_cls, n_cls), np.int64) for v in variants for s in sigmas}
    bcs = {k: np.zeros(4, np.int64) for k in cms}
    secs = {k: 0.0 for k in cms}
    sizes = []
    for i, sample in enumerate(samples):
        image, gt = prepare(load_image(sample.image_path), sample.load_label())
        sizes.append(list(gt.shape))
        img_t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        fractions = patch_fractions(gt, n_cls)
        for j, sigma in enumerate(sigmas):
            grid = coarse_logits(fractions, sigma, np.random.default_rng([seed, i, j]))
            for v in variants:
                started = time.perf_counter()
                maps = upsample(grid, gt.shape)
                if v.iterations:
                    maps = pamr(img_t, maps, v.iterations, v.dilations)
                pred = maps[0].argmax(0).numpy().astype(np.uint8)
                secs[v.name, sigma] += time.perf_counter() - started
                cms[v.name, sigma] += confusion_matrix(pred, gt, n_cls)
                bcs[v.name, sigma] += boundary_counts(pred, gt, tolerance)
        echo(f"{i + 1}/{len(samples)} {sample.name} {gt.shape[0]}x{gt.shape[1]}")
    results = []
    for v in variants:
        for sigma in sigmas:
            m = segmentation_metrics(cms[v.name, sigma])
            b = boundary_f(bcs[v.name, sigma])
            results.append(dict(variant=v.name, sigma=sigma, iterations=v.iterations, dilations=list(v.dilations),
                                mIoU=m["mIoU"], mIoU_gt=float(np.mean(m["iou"][m["gt_pixels"] > 0])),
                                aAcc=m["aAcc"], boundary_precision=b["precision"],
                                boundary_recall=b["recall"], boundary_f=b["f"],
                                seconds_per_image=secs[v.name, sigma] / max(len(samples), 1)))
    return dict(config=dict(dataset=dataset, root=str(root), images=len(samples), input_sizes=sizes,
                            sigmas=list(sigmas), tolerance_px=tolerance, seed=seed, logit_a=LOGIT_A,
                            logit_b=LOGIT_B, torch_threads=torch.get_num_threads(), patch=PATCH),
                results=results)


def proxy_markdown(out: dict) -> str:
    lines = ["| variant | noise sigma | mIoU | mIoU (GT classes) | boundary F (P / R) | s / image |",
             "|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['variant']} | {r['sigma']:g} | {100 * r['mIoU']:.1f} | {100 * r['mIoU_gt']:.1f} | "
                     f"{100 * r['boundary_f']:.1f} "
                     f"({100 * r['boundary_precision']:.1f} / {100 * r['boundary_recall']:.1f}) | "
                     f"{r['seconds_per_image']:.2f} |")
    cost = out.get("pamr_cost_ms")
    if cost:
        lines.append("")
        lines.append("PAMR alone, 448x448, 21 classes: " + ", ".join(f"{k} {v:.0f} ms" for k, v in cost.items())
                     + f" ({out['config']['torch_threads']} torch thread(s))")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser("refine-proxy", help="PAMR on ground-truth-derived patch maps: mIoU and boundary F",
                       description="Coarse maps of a perfect patch classifier (ground-truth fractions per "
                                   "16 px patch, optional noise), upsampled, with and without PAMR; mIoU and "
                                   "boundary F-score per variant (EVALUATION.md, refinement proxy).")
    p.add_argument("--root", required=True, help="VOC-layout dataset folder")
    p.add_argument("--dataset", default="voc21", help="dataset reader (default voc21)")
    p.add_argument("--out", default="out/refine-proxy", help="folder for results.json and results.md")
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS), help="noise stds, comma-separated")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                   help=f"subset of {', '.join(v.name for v in VARIANTS)}")
    p.add_argument("--tolerance", type=int, default=2, help="boundary match tolerance in px (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    p.add_argument("--no-cost", action="store_true", help="skip timing PAMR alone at 448x448")
    p.set_defaults(func=cmd_refine_proxy)


def cmd_refine_proxy(args) -> int:
    import sys

    from .datasets import DatasetError

    if args.threads:
        torch.set_num_threads(args.threads)
    known = {v.name: v for v in VARIANTS}
    try:
        names = [n for n in args.variants.split(",") if n]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise ValueError(f"unknown variants {bad}; known: {', '.join(known)}")
        sigmas = [float(s) for s in args.sigmas.split(",") if s]
        out = run_proxy(args.root, args.dataset, sigmas, [known[n] for n in names], args.tolerance, args.seed,
                        args.limit)
    except (ValueError, DatasetError) as err:
        print(f"gem-backend refine-proxy: {err}", file=sys.stderr)
        return 2
    if not args.no_cost:
        out["pamr_cost_ms"] = {v.name: pamr_cost_ms(variant=v) for v in VARIANTS if v.iterations}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1))
    table = proxy_markdown(out)
    (folder / "results.md").write_text(table + "\n")
    print(table)
    return 0
