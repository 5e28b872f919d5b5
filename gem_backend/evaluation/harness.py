"""Benchmark harness: mIoU of GEM (or vanilla CLIP) on the public segmentation datasets.

    gem-backend eval --dataset voc21 --root data/VOCdevkit --protocol gem

Pipeline of one image (``[H, W, 3]`` uint8 RGB):

1. **resize** per the protocol: ``square`` (S x S, bicubic, as GEM's reference transform),
   ``short`` (short side S, long side at most ``max_long_side``, bilinear: mmseg's
   ``Resize(scale=(2048, S), keep_ratio=True)``), ``fit`` (long side S: mmseg's
   ``Resize(scale=(S, S), keep_ratio=True)``) or ``none``; then CLIP normalisation.
2. **maps** (the official ``slide_inference``, :mod:`gem_backend.algorithm.windows`, the code
   serving uses too): cosine similarity of every patch token with every text query. With
   ``crop``, SCLIP's sliding windows (``crop`` x ``crop`` every ``stride`` pixels, the last one
   flush with the border), each encoded on its own, zero-padded around its centre to a multiple
   of the patch (or of the method's ``window_multiple``), its ``[Q, gh, gw]`` map bilinearly
   upsampled to the padded window, the padding cut off, and the windows averaged per pixel at
   the resized size. Without ``crop`` the whole resized image is one pass, unpadded (a
   remainder under the patch is dropped, the token grid stretched over the image: NACLIP).
3. **logits**: the maps bilinearly resized to ``H x W`` (``align_corners=False``; without
   windows in one step from the token map); then PAMR with ``refine`` (guided by the
   normalised input resized to ``H x W``, as NACLIP; with the ``square`` resize by the image
   itself). This is the official ``seg_logits_raw``
   (``shared/golden/scclip-reference``, ``tests/test_protocol.py``).
4. **decision** (:func:`decide`): ``softmax(logit_scale * logits)`` over the ``Q`` queries,
   the max over each class's names gives the class probability, optional SCLIP area
   filter, argmax, and pixels whose best probability is under ``prob_thd`` go to the
   dataset's background class.
5. **metric**: a ``C x C`` confusion matrix per image (rows ground truth, columns
   prediction, ignore pixels left out), summed over the dataset; IoU = TP / (TP + FP + FN)
   per class; a class with neither ground truth nor prediction has IoU NaN and is left out
   of the mean, as mmseg's ``nanmean``. A class predicted but absent from the ground truth
   counts with IoU 0.

OpenImages V7 is point-labelled: per image the names of the classes checked there are the
queries; each class map is scored at its points (:func:`point_scores`) and a point is
predicted positive above ``oi_threshold``; per class TP/FP/FN over all its yes/no points
give the point-wise IoU (Benenson and Ferrari 2022).

Runs are resumable: each image's result is cached in ``OUT/cache/<name>.npz`` and a rerun
with the same settings skips it. ``OUT/run.json`` fingerprints the settings; a different
fingerprint refuses to mix results (``overwrite`` starts afresh).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..algorithm.methods import MethodError, method_names
from ..algorithm.refine import pamr
from ..algorithm.regions import vote_regions
from ..algorithm.sam import DEFAULT_SAM2_MODEL, HUB_WEIGHTS
from ..algorithm.segmentation import REFINE_KINDS, REGION_KINDS, resize_nearest
from ..algorithm.windows import Window, centre_pad, resize_regions, sliding_windows, window_logits, window_tokens
from .datasets import (IGNORE, CLEARCLIP_VOC21_PROMPTS, DatasetSpec, OpenImagesV7, Sample, get_dataset,
                       load_image, voc_palette)

log = logging.getLogger(__name__)

__all__ = ["Protocol", "PROTOCOLS", "protocol_for", "EvalError", "confusion_matrix", "segmentation_metrics",
           "point_metrics", "sliding_windows", "run_comparison", "parse_variants", "variant_name",
           "comparison_markdown", "segmenter_for", "METHODS", "REFINES", "resized_size", "decide", "point_scores", "Segmenter",
           "EvalConfig", "run_evaluation", "results_markdown", "is_untrained", "GEM_TEMPLATE", "run_active_learning",
           "active_learning_markdown", "AL_KS", "region_generator_for", "save_label_png"]

GEM_TEMPLATE = "a photo of a {}."
PROTOCOLS = ("gem", "sclip", "clearclip")
METHODS = method_names()  # gem, sclip, clearclip, naclip, clip
REFINES = REFINE_KINDS      # none, pamr
RESIZE_MODES = ("square", "short", "fit", "none")
OI_SCORES = ("minmax", "softmax", "cosine")


class EvalError(RuntimeError):
    """The evaluation cannot run as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """Everything between an image and its predicted label map.

    Attributes:
        name: the preset it started from (``gem``, ``sclip``, ``clearclip``).
        resize: ``square``, ``short``, ``fit`` or ``none`` (see the module docstring).
        size: S of the resize.
        max_long_side: cap on the long side for ``short``.
        crop, stride: sliding window in pixels of the resized image; ``crop = 0``: one pass.
        templates: prompt templates (several: mean of normalised embeddings, renormalised).
        logit_scale: multiplier of cosine similarities before the softmax over queries.
        prob_thd: best class probability under which a pixel becomes background.
        area_thd: SCLIP's area filter: foreground classes predicted on at most this
            fraction of the foreground pixels lose their probability (None: off).
        prompts: per-class query names; None: the dataset's.
        oi_score, oi_threshold: OpenImages decision: per-class ``minmax``-normalised map,
            ``softmax`` over the image's classes, or raw ``cosine``; positive above threshold.
    """

    name: str
    resize: str = "square"
    size: int = 448
    max_long_side: int = 2048
    crop: int = 0
    stride: int = 0
    templates: tuple[str, ...] = (GEM_TEMPLATE,)
    logit_scale: float = 100.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    prompts: tuple[tuple[str, ...], ...] | None = None
    oi_score: str = "minmax"
    oi_threshold: float = 0.5

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.size < 1 or self.max_long_side < 1:
            raise ValueError("size and max_long_side must be positive")
        if self.crop < 0 or (self.crop > 0 and not 0 < self.stride):
            raise ValueError("crop must be >= 0, and a sliding window needs stride > 0")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("templates must be non-empty format strings with '{}'")
        if self.logit_scale <= 0:
            raise ValueError("logit_scale must be > 0")
        if not 0.0 <= self.prob_thd < 1.0:
            raise ValueError("prob_thd must be in [0, 1)")
        if self.area_thd is not None and not 0.0 <= self.area_thd < 1.0:
            raise ValueError("area_thd must be in [0, 1)")
        if self.oi_score not in OI_SCORES:
            raise ValueError(f"oi_score must be one of {', '.join(OI_SCORES)}")

    def describe(self) -> dict:
        """JSON-able settings."""
        d = dataclasses.asdict(self)
        d["templates"] = list(self.templates)
        d["prompts"] = None if self.prompts is None else [list(p) for p in self.prompts]
        return d


# SCLIP's configs (wangf3014/SCLIP configs/cfg_*.py; defaults logit_scale 40, prob_thd 0,
# slide 224/112) and SegEarth-OV's for the remote-sensing sets (likyoo/SegEarth-OV: Resize
# (448, 448) keep_ratio, logit_scale 50, slide 224/112).
_SCLIP = {
    "voc21": dict(size=336, logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "voc20": dict(size=336),
    "context60": dict(size=336, logit_scale=50.0, prob_thd=0.1),
    "context59": dict(size=336),
    "coco-object": dict(size=336, logit_scale=50.0, prob_thd=0.1),
    "coco-stuff": dict(size=448),
    "cityscapes": dict(size=560),
    "ade20k": dict(size=336),
    "loveda": dict(resize="fit", size=448, logit_scale=50.0, prob_thd=0.3),
    "potsdam": dict(resize="fit", size=448, logit_scale=50.0, prob_thd=0.1),
    "vaihingen": dict(resize="fit", size=448, logit_scale=50.0, prob_thd=0.1),
    "isaid": dict(resize="fit", size=448, logit_scale=50.0, prob_thd=0.4),
    "openimages-v7": dict(size=336),
}
# ClearCLIP's configs (mc-lan/ClearCLIP): short side 448, slide 448/224, logit_scale 50;
# the protocol of its re-run of GEM. Remote-sensing sets keep SegEarth-OV's settings.
_CLEARCLIP = {
    "voc21": dict(prob_thd=0.5, prompts=CLEARCLIP_VOC21_PROMPTS),
    "context60": dict(prob_thd=0.15),
    "coco-object": dict(prob_thd=0.4),
    "cityscapes": dict(crop=224, stride=224),
}
_REMOTE = ("loveda", "potsdam", "vaihingen", "isaid")


def protocol_for(name: str, dataset: str) -> Protocol:
    """The preset ``name`` (``gem``, ``sclip``, ``clearclip``) for ``dataset``."""
    from ..settings import openai_templates

    name = name.lower()
    if name == "gem":
        # the paper: one pass at 448 x 448, one template, argmax (no threshold)
        return Protocol("gem")
    if name == "sclip" or (name == "clearclip" and dataset in _REMOTE):
        base = dict(resize="short", size=336, crop=224, stride=112, templates=openai_templates(),
                    logit_scale=40.0, prob_thd=0.0)
        base.update(_SCLIP.get(dataset, {}))
        return Protocol(name, **base)
    if name == "clearclip":
        base = dict(resize="short", size=448, crop=448, stride=224, templates=openai_templates(),
                    logit_scale=50.0, prob_thd=0.0)
        base.update(_CLEARCLIP.get(dataset, {}))
        return Protocol(name, **base)
    raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")


# ---------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """``[C, C]`` int64 counts, row = ground-truth class, column = predicted class.

    Args:
        pred: ``[H, W]`` predicted classes in ``0..C-1``.
        gt: ``[H, W]`` ground truth in ``0..C-1``, ``ignore_index`` for unscored pixels.
    Raises:
        ValueError: on a shape mismatch or a value outside ``0..C-1`` where scored.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = gt != ignore_index
    p = pred[valid].astype(np.int64)
    g = gt[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes or g.min() < 0 or g.max() >= num_classes):
        raise ValueError(f"class values must lie in 0..{num_classes - 1} (or {ignore_index} in the ground truth)")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm: np.ndarray) -> dict:
    """Scores of a summed confusion matrix (rows ground truth, columns prediction).

    Returns:
        ``iou`` and ``acc``: ``[C]`` float, NaN where undefined (IoU: no ground truth and
        no prediction; Acc: no ground truth); ``mIoU``, ``mAcc``: NaN-means, ``aAcc``:
        correct / scored pixels; all fractions in [0, 1].
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()
    return dict(iou=iou, acc=acc,
                mIoU=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                mAcc=float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
                aAcc=float(tp.sum() / total) if total > 0 else float("nan"),
                gt_pixels=gt.astype(np.int64), pred_pixels=pred.astype(np.int64))


def point_metrics(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict:
    """Point-wise scores per class (Benenson and Ferrari 2022): IoU = TP / (TP + FP + FN)
    over the class's yes/no points; NaN (left out of the mean) where that is 0/0.
    ``aAcc`` is the fraction of all scored points classified right."""
    tp, fp, fn, tn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, tn))
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
        acc = np.where(tp + fn > 0, tp / (tp + fn), np.nan)  # recall of the yes points
    total = (tp + fp + fn + tn).sum()
    return dict(iou=iou, acc=acc,
                mIoU=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                mAcc=float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
                aAcc=float((tp.sum() + tn.sum()) / total) if total > 0 else float("nan"))


# ---------------------------------------------------------------------------------- geometry
def resized_size(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    """``(h, w)`` of the model's view of an ``height x width`` image (mmcv's rounding)."""
    if protocol.resize == "square":
        return protocol.size, protocol.size
    if protocol.resize == "none":
        return height, width
    long_side, short_side = max(height, width), min(height, width)
    if protocol.resize == "short":
        scale = min(protocol.max_long_side / long_side, protocol.size / short_side)
    else:  # fit: the image inside S x S
        scale = protocol.size / long_side
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


# ---------------------------------------------------------------------------------- decision
def decide(logits: torch.Tensor, query_class: torch.Tensor, num_classes: int, logit_scale: float,
           prob_thd: float = 0.0, area_thd: float | None = None, background: int | None = None) -> torch.Tensor:
    """Label map from per-query logits (SCLIP's post-processing).

    Args:
        logits: ``[Q, H, W]`` cosine similarities.
        query_class: ``[Q]`` long, the class of each query (every class has >= 1 query).
        num_classes: ``C``.
        logit_scale: multiplier before the softmax over the ``Q`` queries.
        prob_thd: pixels whose best class probability is under it become ``background``.
        area_thd: foreground classes whose argmax area is not above this fraction of all
            foreground argmax pixels get probability 0 (SCLIP's ``area_thd``).
        background: the background class (needed by either threshold).
    Returns:
        ``[H, W]`` long in ``0..C-1``.
    """
    q, h, w = logits.shape
    probs = torch.softmax(logits.float() * logit_scale, dim=0)
    if q == num_classes and torch.equal(query_class.cpu(), torch.arange(num_classes)):
        cls = probs
    else:  # the best of each class's names
        cls = torch.zeros(num_classes, h * w, dtype=probs.dtype, device=probs.device)
        index = query_class.to(probs.device).view(q, 1).expand(q, h * w)
        cls = cls.scatter_reduce(0, index, probs.reshape(q, h * w), reduce="amax", include_self=False)
        cls = cls.view(num_classes, h, w)
    if (prob_thd > 0 or area_thd is not None) and background is None:
        raise ValueError("a probability or area threshold needs a background class")
    if area_thd is not None:
        counts = torch.bincount(cls.argmax(0).flatten(), minlength=num_classes).to(cls.dtype)
        fg = torch.ones(num_classes, dtype=torch.bool, device=cls.device)
        fg[background] = False
        keep = counts > area_thd * counts[fg].sum()
        cls = cls * torch.where(fg & ~keep, 0.0, 1.0).to(cls.dtype).view(num_classes, 1, 1)
    best, pred = cls.max(dim=0)
    if prob_thd > 0:
        pred[best < prob_thd] = background
    return pred


def point_scores(maps: torch.Tensor, x: torch.Tensor, y: torch.Tensor, local_class: torch.Tensor,
                 mode: str = "minmax", logit_scale: float = 100.0) -> torch.Tensor:
    """Scores of point labels from low-resolution class maps.

    Args:
        maps: ``[K, h, w]`` cosine maps covering the whole image.
        x, y: ``[P]`` relative point positions in ``[0, 1]``.
        local_class: ``[P]`` long, the map (``0..K-1``) each point asks about.
        mode: ``minmax`` (each map stretched to [0, 1] over the image), ``softmax`` (over
            the ``K`` maps with ``logit_scale``), ``cosine`` (raw).
    Returns:
        ``[P]`` float scores, bilinearly sampled where the maps, upsampled to the image
        with ``align_corners=False``, would have them.
    """
    maps = maps.float()
    k = maps.shape[0]
    if mode == "minmax":
        flat = maps.reshape(k, -1)
        lo, hi = flat.min(1).values.view(k, 1, 1), flat.max(1).values.view(k, 1, 1)
        maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    elif mode == "softmax":
        maps = torch.softmax(maps * logit_scale, dim=0)
    elif mode != "cosine":
        raise ValueError(f"unknown point score mode {mode!r}")
    grid = torch.stack([x * 2 - 1, y * 2 - 1], dim=-1).to(maps).view(1, 1, -1, 2)
    sampled = F.grid_sample(maps[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled[0, :, 0, :]  # [K, P]
    return sampled.gather(0, local_class.to(sampled.device).view(1, -1))[0]


# ---------------------------------------------------------------------------------- model side
class Segmenter:
    """Per-query similarity maps of images under a protocol: the official per-image path.

    ``Segmenter(loaded, Protocol("sclip", resize="short", size=S, crop=C, stride=T,
    templates=(t,), logit_scale=L, prob_thd=P, area_thd=A), method=NAME,
    method_options=OPTIONS, refine="pamr" | "none", refine_iterations=..., refine_dilations=...)``;
    :meth:`encode` the queries, :meth:`logits` of an image (the official ``seg_logits_raw``),
    then :func:`decide`.

    Args:
        loaded: a :class:`gem_backend.models.LoadedModel`.
        protocol: the :class:`Protocol`.
        method: a method name (:data:`METHODS`): ``gem``, ``sclip``, ``naclip``, ``clip``...
        batch_size: sliding windows of one size per forward pass (a method with
            ``uses_regions``: one).
        method_options: the method's options.
        refine: ``none`` or ``pamr`` (``refine_iterations``, ``refine_dilations``).
    """

    def __init__(self, loaded, protocol: Protocol, method: str = "gem", batch_size: int = 8,
                 method_options: Mapping | None = None, refine: str = "none", refine_iterations: int = 10,
                 refine_dilations: Sequence[int] = (8, 16)):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if refine not in REFINES:
            raise ValueError(f"refine must be one of {', '.join(REFINES)}, got {refine!r}")
        self.gem = loaded.gem
        self.tower = loaded.method(method, method_options or {})
        self.device = loaded.device
        self.protocol = protocol
        self.method = method
        self.refine = refine
        self.refine_iterations = int(refine_iterations)
        self.refine_dilations = tuple(refine_dilations)
        self.batch_size = max(1, int(batch_size))
        self.mean = torch.tensor(loaded.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(loaded.std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.patch = self.gem.patch_size[0]

    # ------------------------------------------------------------------ text
    def encode(self, names: Sequence[str], chunk: int = 32) -> torch.Tensor:
        """``[Q, D]`` float32 L2-normalised query embeddings (templates ensembled)."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(names), chunk):  # bounded text-tower batches: T * chunk prompts
                out.append(self.gem.encode_text(list(names[i:i + chunk]), self.protocol.templates).float())
        return torch.cat(out) if out else torch.empty(0, self.gem.embed_dim, device=self.device)

    # ------------------------------------------------------------------ image
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``[H, W, 3]`` uint8 -> ``[3, h, w]`` normalised float32 on the device."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        h, w = resized_size(height, width, self.protocol)
        if self.protocol.resize == "square" and (h, w) != (height, width):
            # GEM's reference transform: PIL bicubic on the PIL image
            image = np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1).float()
        if self.protocol.resize != "square" and (h, w) != (height, width):
            # mmcv/cv2 INTER_LINEAR: bilinear without antialiasing, back to 8-bit values
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            x = x.round().clamp(0, 255)
        return (x / 255.0 - self.mean) / self.std

    def _regions(self, regions, size: tuple[int, int]) -> torch.Tensor | None:
        """The instance map ``[H, W]`` of the original image as an int64 tensor at the model's
        view ``size`` (nearest, like the image when the protocol resizes)."""
        if regions is None:
            return None
        r = torch.as_tensor(np.asarray(regions) if not isinstance(regions, torch.Tensor) else regions)
        if r.ndim != 2:
            raise ValueError(f"regions must be an [H, W] instance map, got shape {tuple(r.shape)}")
        return resize_regions(r.to(device=self.device, dtype=torch.long), size)

    def windows(self, image: np.ndarray, regions=None) -> tuple[torch.Tensor, list[torch.Tensor], list[Window]]:
        """The protocol's windows of one image, encoded.

        Args:
            image: ``[H, W, 3]`` uint8.
            regions: optional ``[H, W]`` int64 instance map of ``image`` (for a method with
                ``uses_regions``; see :mod:`gem_backend.algorithm.windows`).
        Returns:
            ``(x, tokens, windows)``: the normalised model input ``[3, h, w]``, each window's
            L2-normalised tokens and its :class:`~gem_backend.algorithm.windows.Window`. Without
            ``crop`` the whole input is one window, unpadded unless the method asks for a
            ``window_multiple`` (NACLIP's whole-image pass: the patch convolution drops a remainder).
        """
        x = self.prepare(image)
        h, w = x.shape[-2:]
        p = self.protocol
        if p.crop > 0:
            boxes, pad = sliding_windows(h, w, p.crop, p.stride), True
        else:
            boxes, pad = [(0, h, 0, w)], getattr(self.tower, "window_multiple", None) is not None
        tokens, wins = window_tokens(self.tower, x, boxes, self.batch_size, self._regions(regions, (h, w)), pad)
        return x, tokens, wins

    def maps(self, image: np.ndarray, text, regions=None) -> torch.Tensor:
        """``[Q, h', w']`` float32 cosine maps whose extent is the whole image: the token map of
        a one-pass protocol (``crop`` 0, no padding), else the per-pixel window average at the
        model input size (:func:`~gem_backend.algorithm.windows.window_logits`)."""
        return self._maps(image, text, regions)[1]

    def _maps(self, image: np.ndarray, text, regions) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, maps)``: the model input and :meth:`maps`."""
        with torch.inference_mode():
            text = torch.as_tensor(text, dtype=torch.float32).to(self.device)
            x, tokens, wins = self.windows(image, regions)
            if len(wins) == 1 and wins[0].pad == (0, 0, 0, 0) and self.protocol.crop <= 0:
                return x, (tokens[0] @ text.t()).t().reshape(text.shape[0], *wins[0].grid)
            return x, window_logits(tokens, wins, text, tuple(x.shape[-2:]))

    def features(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """``([h*w, D] float32 L2-normalised patch tokens on the CPU, (h, w))`` of one pass over
        the whole resized image: what :meth:`maps` multiplies with the text for a protocol
        without sliding windows. Raises :class:`EvalError` for a sliding window or an input
        that is not a multiple of the patch."""
        if self.protocol.crop > 0:
            raise EvalError("this needs one pass per image: use a protocol without sliding windows (--crop 0)")
        with torch.inference_mode():
            x = self.prepare(image)
            h, w = x.shape[-2:]
            if any(centre_pad(h, w, self.patch)):
                raise EvalError(f"the resized image {w}x{h} is not a multiple of the {self.patch} px patch: "
                                "use --resize square (the gem protocol)")
            tokens, wins = window_tokens(self.tower, x, [(0, h, 0, w)], pad=False)
            return tokens[0].cpu(), wins[0].grid

    def logits(self, image: np.ndarray, text, regions=None) -> torch.Tensor:
        """``[Q, H, W]`` float32 cosine logits at the image's own size (the official
        ``seg_logits_raw``): :meth:`maps` bilinearly resized to ``H x W`` (one step from the
        token map without windows, as NACLIP's and GEM's whole-image pass), then PAMR when
        ``refine`` is ``pamr``, guided by the normalised model input resized to ``H x W``
        (NACLIP's evaluation; the ``square`` resize of GEM's protocol: by the image itself).

        Args:
            image: ``[H, W, 3]`` uint8.
            text: ``[Q, D]`` L2-normalised query embeddings (tensor or array).
            regions: optional ``[H, W]`` int64 instance map of ``image``, for a method with
                ``uses_regions`` (nearest-resized like the image); None gives such a method None.
        """
        x, m = self._maps(image, text, regions)
        size = tuple(image.shape[:2])
        with torch.inference_mode():
            out = m if tuple(m.shape[-2:]) == size else F.interpolate(
                m[None], size=size, mode="bilinear", align_corners=False)[0]
            if self.refine == "pamr":
                if self.protocol.resize == "square":
                    # GEM's protocol has no official PAMR: the image itself guides, as before
                    guide = torch.from_numpy(np.array(image)).to(out.device).permute(2, 0, 1)[None].float()
                else:
                    guide = x[None]
                    if tuple(guide.shape[-2:]) != size:
                        guide = F.interpolate(guide, size=size, mode="bilinear", align_corners=False)
                out = pamr(guide, out[None], self.refine_iterations, self.refine_dilations)[0]
            return out


def segmenter_for(cfg, loaded) -> Segmenter:
    """The :class:`Segmenter` of an :class:`EvalConfig`; bad method options raise :class:`EvalError`."""
    try:
        return Segmenter(loaded, cfg.protocol, cfg.method, cfg.batch_size, method_options=cfg.method_options,
                         refine=cfg.refine, refine_iterations=cfg.refine_iterations,
                         refine_dilations=cfg.refine_dilations)
    except MethodError as err:
        raise EvalError(str(err)) from None


def is_untrained(loaded) -> bool:
    """True for random weights: ``pretrained`` none, or a CLIP whose learnt temperature is
    still near its initial value 1/0.07 (exp(logit_scale) < 20; trained CLIPs sit near 100)."""
    if loaded.random_weights:
        return True
    scale = getattr(loaded.gem.model, "logit_scale", None)
    try:
        return bool(scale is not None and float(scale.detach().float().exp()) < 20.0)
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------- the run
@dataclass
class EvalConfig:
    """One evaluation run.

    Attributes:
        dataset: a name of :data:`gem_backend.datasets.DATASETS`.
        root: the dataset folder.
        protocol: the :class:`Protocol` (presets from :func:`protocol_for`, then overrides).
        method: a method name (:data:`METHODS`); ``method_options`` its options.
        refine: ``none`` or ``pamr`` (``refine_iterations``, ``refine_dilations``).
        out_dir: results, the per-image cache and ``run.json``.
        save_predictions: folder for the predicted label maps (palette PNGs), or None.
        limit: evaluate the first N images only.
        overwrite: discard results of a run with other settings in ``out_dir``.
        progress: show a progress bar (tqdm, with ETA).
        batch_size: sliding windows per forward pass.
        regions: ``none`` or ``sam2``: after the decision, the label map is voted in SAM 2's
            regions of the image (CorrCLIP's map correction, at the original size):
            ``regions_model``, ``regions_pretrained`` (``hub``, a file, ``none``),
            ``regions_points``, ``regions_iou``, ``regions_stability`` as in serving;
            ``regions_cache_dir``: where hub weights download to (``MODEL_DIR``; default the HF cache).
    """

    dataset: str
    root: str
    protocol: Protocol
    method: str = "gem"
    method_options: dict = dataclasses.field(default_factory=dict)
    refine: str = "none"
    refine_iterations: int = 10
    refine_dilations: tuple[int, ...] = (8, 16)
    out_dir: str = "out/eval"
    save_predictions: str | None = None
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True
    batch_size: int = 8
    regions: str = "none"
    regions_model: str = DEFAULT_SAM2_MODEL
    regions_pretrained: str = HUB_WEIGHTS
    regions_points: int = 8
    regions_iou: float = 0.4
    regions_stability: float = 0.4
    regions_cache_dir: str | None = None

    def __post_init__(self):
        from ..algorithm.sam import check_generator_options, check_sam2_model

        if self.regions not in REGION_KINDS:
            raise EvalError(f"regions must be one of {', '.join(REGION_KINDS)}, got {self.regions!r}")
        try:
            check_sam2_model(self.regions_model)
            check_generator_options(self.regions_points, self.regions_iou, self.regions_stability)
        except ValueError as err:
            raise EvalError(str(err)) from None


def region_generator_for(cfg: EvalConfig, loaded):
    """The SAM 2 :class:`~gem_backend.algorithm.sam.RegionGenerator` of ``cfg``, on the model's
    device. Raises :class:`EvalError` when SAM 2 cannot be loaded (missing extra, offline)."""
    from ..algorithm.sam import RegionGenerator, RegionsUnavailable, load_sam2

    try:
        sam = load_sam2(cfg.regions_model, cfg.regions_pretrained, device=str(loaded.device),
                        cache_dir=cfg.regions_cache_dir)
    except RegionsUnavailable as err:
        raise EvalError(str(err)) from None
    return RegionGenerator(sam, points_per_side=cfg.regions_points, pred_iou_thresh=cfg.regions_iou,
                           stability_score_thresh=cfg.regions_stability)


_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _safe(name: str) -> str:
    return "".join(ch if ch in _SAFE else "_" for ch in name)


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _fingerprint(cfg: EvalConfig, loaded, classes: Sequence[str], prompts) -> dict:
    gem = loaded.gem
    return dict(dataset=cfg.dataset, root=str(Path(cfg.root).resolve()), method=cfg.method,
                protocol=cfg.protocol.describe(), model=loaded.model_name, weights=loaded.weights_id,
                dtype=str(loaded.dtype).replace("torch.", ""), depth=gem.depth, ss_attn_iter=gem.ss_attn_iter,
                ss_attn_temp=gem.ss_attn_temp, classes=list(classes),
                prompts=None if prompts is None else [list(p) for p in prompts],
                **_variant(cfg))


def _variant(cfg: EvalConfig) -> dict:
    """The method options and refinement of a run, where not the defaults (so runs made before
    they existed keep their fingerprint)."""
    out = {}
    if cfg.method_options:
        out["method_options"] = dict(cfg.method_options)
    if cfg.refine != "none":
        out["refine"] = dict(kind=cfg.refine, iterations=cfg.refine_iterations, dilations=list(cfg.refine_dilations))
    if cfg.regions != "none":
        from ..algorithm.sam import sam2_weights_id

        out["regions"] = dict(kind=cfg.regions, model=cfg.regions_model,
                              weights=sam2_weights_id(cfg.regions_model, cfg.regions_pretrained),
                              points=cfg.regions_points, iou=cfg.regions_iou, stability=cfg.regions_stability)
    return out


def _open_run(cfg: EvalConfig, fingerprint: dict) -> Path:
    """Create or reopen ``out_dir``; refuse to mix results of other settings."""
    out = Path(cfg.out_dir)
    cache = out / "cache"
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    run_file = out / "run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old.get("digest") != digest:
            if not cfg.overwrite:
                changed = sorted(k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k])
                raise EvalError(f"{out} holds a run with other settings (differs in: {', '.join(changed) or '?'}); "
                                "pass --overwrite to discard it, or another --out")
            shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(dict(digest=digest, fingerprint=fingerprint), indent=1))
    return cache


def save_label_png(path: Path, label_map: np.ndarray, palette: np.ndarray) -> None:
    """A label map as a palette PNG (pixel values = class indices), written atomically."""
    img = Image.fromarray(label_map.astype(np.uint8))
    img.putpalette(palette.ravel().tolist())  # 'L' -> 'P': the pixel values stay the class indices
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def run_evaluation(cfg: EvalConfig, loaded, echo: Callable[[str], None] = print) -> dict:
    """Evaluate ``loaded`` on ``cfg.dataset``; write ``results.json`` and ``results.md``.

    Returns:
        the results dict (also in ``OUT/results.json``): mIoU, mAcc, aAcc in percent,
        per-class IoU/Acc, the settings, the number of images, and ``random_weights``.
    """
    spec = get_dataset(cfg.dataset)
    untrained = is_untrained(loaded)
    if untrained:
        echo("note: the model has random (untrained) weights: these numbers mean nothing; "
             "they only show that the harness runs")
    segmenter = segmenter_for(cfg, loaded)
    if spec.kind == "points":
        if cfg.regions != "none":
            raise EvalError(f"{spec.name} is scored at points: the region vote needs label maps (use --regions none)")
        return _run_points(cfg, spec, loaded, segmenter, untrained, echo)

    prompts = cfg.protocol.prompts or spec.prompts
    if len(prompts) != len(spec.classes):
        raise EvalError(f"{len(prompts)} prompt sets given for the {len(spec.classes)} classes of {spec.name}")
    p = cfg.protocol
    if (p.prob_thd > 0 or p.area_thd is not None) and spec.background is None:
        raise EvalError(f"{spec.name} has no background class: prob_thd and area_thd must be off")
    samples = spec.samples(cfg.root)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    names = [n for group in prompts for n in group]
    query_class = torch.tensor([c for c, group in enumerate(prompts) for _ in group], dtype=torch.long)
    num_classes = len(spec.classes)
    cache = _open_run(cfg, _fingerprint(cfg, loaded, spec.classes, prompts))
    pred_dir = Path(cfg.save_predictions) if cfg.save_predictions else None
    if pred_dir:
        pred_dir.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()

    def done(s: Sample) -> bool:
        return (cache / f"{_safe(s.name)}.npz").is_file() and (
            pred_dir is None or (pred_dir / f"{_safe(s.name)}.png").is_file())

    todo = [s for s in samples if not done(s)]
    text = segmenter.encode(names) if todo else None
    regions = region_generator_for(cfg, loaded) if todo and cfg.regions != "none" else None
    started = time.monotonic()
    for s in _progress(todo, len(samples), cfg, spec):
        image = load_image(s.image_path)
        gt = s.load_label()
        if gt.shape != image.shape[:2]:
            raise EvalError(f"{s.name}: image {image.shape[:2]} and label {gt.shape} differ in size")
        instances = None if regions is None else resize_nearest(regions.instance_map(image), image.shape[:2])
        logits = segmenter.logits(image, text, regions=instances)  # CorrCLIP takes them; the others ignore them
        pred = decide(logits, query_class, num_classes, p.logit_scale, p.prob_thd, p.area_thd,
                      spec.background).cpu().numpy().astype(np.uint8)
        if instances is not None:  # CorrCLIP's map correction, at the image's size (pred's)
            pred = vote_regions(pred, instances)
        cm = confusion_matrix(pred, gt, num_classes)
        flat = np.flatnonzero(cm)
        _atomic_savez(cache / f"{_safe(s.name)}.npz", index=flat.astype(np.int32), count=cm.ravel()[flat])
        if pred_dir is not None:
            save_label_png(pred_dir / f"{_safe(s.name)}.png", pred, palette)
    elapsed = time.monotonic() - started

    total = np.zeros(num_classes * num_classes, dtype=np.int64)
    for s in samples:
        with np.load(cache / f"{_safe(s.name)}.npz") as z:
            np.add.at(total, z["index"], z["count"])
    cm = total.reshape(num_classes, num_classes)
    np.save(Path(cfg.out_dir) / "confusion.npy", cm)
    m = segmentation_metrics(cm)
    per_class = [dict(name=name, iou=_pct(m["iou"][c]), acc=_pct(m["acc"][c]),
                      gt_pixels=int(m["gt_pixels"][c]), pred_pixels=int(m["pred_pixels"][c]))
                 for c, name in enumerate(spec.classes)]
    return _report(cfg, spec, loaded, untrained, len(samples), len(samples) - len(todo), elapsed, m, per_class, echo,
                   metric=("confusion matrix summed over the images; IoU = TP/(TP+FP+FN) per class; "
                               "classes with no ground truth and no prediction are NaN and left out of the "
                               "mean (mmseg's nanmean); 255 = ignored"))


def _run_points(cfg: EvalConfig, spec: DatasetSpec, loaded, segmenter: Segmenter, untrained: bool, echo) -> dict:
    p = cfg.protocol
    oi = OpenImagesV7(Path(cfg.root))
    samples = oi.samples()
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    cache = _open_run(cfg, _fingerprint(cfg, loaded, [], None))
    pred_dir = Path(cfg.save_predictions) if cfg.save_predictions else None
    if pred_dir:
        pred_dir.mkdir(parents=True, exist_ok=True)

    def done(s: Sample) -> bool:
        return (cache / f"{_safe(s.name)}.npz").is_file() and (
            pred_dir is None or (pred_dir / f"{_safe(s.name)}.json").is_file())

    todo = [s for s in samples if not done(s)]
    text_cache: dict[int, torch.Tensor] = {}
    started = time.monotonic()
    for s in _progress(todo, len(samples), cfg, spec):
        pts = s.points
        classes = np.unique(pts.cls)
        missing = [int(c) for c in classes if int(c) not in text_cache]
        if missing:
            for c, emb in zip(missing, segmenter.encode([oi.names[c] for c in missing])):
                text_cache[c] = emb
        text = torch.stack([text_cache[int(c)] for c in classes])
        image = load_image(s.image_path)
        maps = segmenter.maps(image, text)
        local = torch.from_numpy(np.searchsorted(classes, pts.cls))
        scores = point_scores(maps, torch.from_numpy(pts.x), torch.from_numpy(pts.y), local, p.oi_score,
                              p.logit_scale).cpu().numpy()
        positive_pred = scores > p.oi_threshold
        tp = np.bincount(local.numpy(), weights=pts.positive & positive_pred, minlength=len(classes))
        fn = np.bincount(local.numpy(), weights=pts.positive & ~positive_pred, minlength=len(classes))
        fp = np.bincount(local.numpy(), weights=~pts.positive & positive_pred, minlength=len(classes))
        tn = np.bincount(local.numpy(), weights=~pts.positive & ~positive_pred, minlength=len(classes))
        _atomic_savez(cache / f"{_safe(s.name)}.npz", cls=classes.astype(np.int64), tp=tp.astype(np.int64),
                      fp=fp.astype(np.int64), fn=fn.astype(np.int64), tn=tn.astype(np.int64))
        if pred_dir is not None:
            rows = [dict(x=float(pts.x[i]), y=float(pts.y[i]), label=oi.mids[int(pts.cls[i])],
                         name=oi.names[int(pts.cls[i])], yes=bool(pts.positive[i]), score=float(scores[i]),
                         predicted=bool(positive_pred[i])) for i in range(len(scores))]
            (pred_dir / f"{_safe(s.name)}.json").write_text(json.dumps(dict(image=s.name, points=rows)))
    elapsed = time.monotonic() - started

    n = len(oi.names)
    tp, fp, fn, tn = (np.zeros(n, dtype=np.int64) for _ in range(4))
    for s in samples:
        with np.load(cache / f"{_safe(s.name)}.npz") as z:
            for arr, key in ((tp, "tp"), (fp, "fp"), (fn, "fn"), (tn, "tn")):
                np.add.at(arr, z["cls"], z[key])
    m = point_metrics(tp, fp, fn, tn)
    scored = np.flatnonzero(tp + fp + fn + tn)
    per_class = [dict(name=oi.names[c], label=oi.mids[c], iou=_pct(m["iou"][c]), acc=_pct(m["acc"][c]),
                      yes_points=int(tp[c] + fn[c]), no_points=int(fp[c] + tn[c])) for c in scored]
    return _report(cfg, spec, loaded, untrained, len(samples), len(samples) - len(todo), elapsed, m, per_class, echo,
                   metric=("point-wise IoU per class over its yes/no points (unsure dropped), TP/(TP+FP+FN); "
                               "classes with TP+FP+FN = 0 left out of the mean; aAcc = points classified "
                               "right; Acc = recall of yes points"))


def _progress(todo: list, total: int, cfg: EvalConfig, spec: DatasetSpec):
    from tqdm import tqdm

    bar = tqdm(todo, total=total, initial=total - len(todo), unit="img", dynamic_ncols=True,
               desc=f"{spec.name} [{cfg.protocol.name}/{cfg.method}]", disable=not cfg.progress)
    yield from bar
    bar.close()


def _pct(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v) * 100.0


def _results(cfg, spec, loaded, untrained, n_images, n_cached, elapsed, m, per_class, metric) -> dict:
    out = dict(
        dataset=spec.name, title=spec.title, root=str(cfg.root), protocol=cfg.protocol.name, method=cfg.method,
        model=loaded.model_name, pretrained=loaded.pretrained, weights_id=loaded.weights_id,
        dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device),
        gem=dict(depth=loaded.gem.depth, ss_attn_iter=loaded.gem.ss_attn_iter, ss_attn_temp=loaded.gem.ss_attn_temp),
        random_weights=untrained,
        images=n_images, images_from_cache=n_cached, limit=cfg.limit, seconds=round(elapsed, 2),
        mIoU=_pct(m["mIoU"]), mAcc=_pct(m["mAcc"]), aAcc=_pct(m["aAcc"]),
        classes_in_mean=int(np.isfinite(m["iou"]).sum()),
        metric=metric, settings=cfg.protocol.describe(), per_class=per_class,
        predictions=str(cfg.save_predictions) if cfg.save_predictions else None,
        variant=variant_name(cfg.method, cfg.refine), refine=dict(kind="none"),
    )
    out.update(_variant(cfg))  # the method options and refinement settings, where not the defaults
    if untrained:
        out["warning"] = "random (untrained) weights: these numbers mean nothing"
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# ---------------------------------------------------------------------------------- comparison
def variant_name(method: str, refine: str = "none") -> str:
    """``naclip`` or ``naclip+pamr``: how a comparison names a method with its refinement."""
    return method if refine == "none" else f"{method}+{refine}"


def parse_variants(text: str) -> list[tuple[str, str]]:
    """``"gem,naclip,naclip+pamr"`` -> ``[("gem", "none"), ("naclip", "none"), ("naclip", "pamr")]``;
    :class:`EvalError` naming the valid methods and refinements."""
    out = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        method, _, refine = item.partition("+")
        refine = refine or "none"
        if method not in METHODS or refine not in REFINES:
            raise EvalError(f"--compare {item!r}: METHOD[+REFINE] with METHOD one of {', '.join(METHODS)} and "
                            f"REFINE one of {', '.join(r for r in REFINES if r != 'none')}")
        if (method, refine) not in out:
            out.append((method, refine))
    if not out:
        raise EvalError("--compare needs at least one METHOD[+REFINE]")
    return out


def run_comparison(cfg: EvalConfig, loaded, variants: Sequence[tuple[str, str]],
                   echo: Callable[[str], None] = print) -> dict:
    """Run :func:`run_evaluation` for each ``(method, refine)`` on one dataset, each in its own
    resumable folder ``OUT/<variant>``, with one text-embedding cache for all (the text tower
    is the model's whatever the method), and write ``OUT/comparison.json`` and ``.md``:
    one row per variant (mIoU, mAcc, aAcc, seconds per image)."""
    out = Path(cfg.out_dir)
    rows = []
    for method, refine in variants:
        name = variant_name(method, refine)
        sub = dataclasses.replace(cfg, method=method, refine=refine, out_dir=str(out / name),
                                  method_options=cfg.method_options if method == cfg.method else {},
                                  save_predictions=(str(Path(cfg.save_predictions) / name)
                                                    if cfg.save_predictions else None))
        echo(f"== {name}")
        r = run_evaluation(sub, loaded, echo)
        computed = r["images"] - r["images_from_cache"]
        rows.append(dict(variant=name, method=method, refine=refine, mIoU=r["mIoU"], mAcc=r["mAcc"], aAcc=r["aAcc"],
                         images=r["images"], seconds_per_image=(round(r["seconds"] / computed, 3) if computed else None),
                         random_weights=r["random_weights"]))
    result = dict(dataset=cfg.dataset, protocol=cfg.protocol.name, model=loaded.model_name,
                  weights_id=loaded.weights_id, dtype=str(loaded.dtype).replace("torch.", ""), variants=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    (out / "comparison.md").write_text(comparison_markdown(result))
    echo(comparison_markdown(result))
    return result


def comparison_markdown(result: dict) -> str:
    """One table: a row per variant."""
    lines = [f"# {result['dataset']}, `{result['protocol']}` protocol: methods compared", "",
             f"Model `{result['model']}`, weights `{result['weights_id']}` ({result['dtype']}).", ""]
    if any(r["random_weights"] for r in result["variants"]):
        lines += ["> **Random weights**: these numbers mean nothing; they only show that the harness runs.", ""]
    lines += ["| variant | mIoU | mAcc | aAcc | images | s / image |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["variants"]:
        spi = "cached" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3f}"
        lines.append(f"| {r['variant']} | {_fmt(r['mIoU'])} | {_fmt(r['mAcc'])} | {_fmt(r['aAcc'])} | "
                     f"{r['images']} | {spi} |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    """The results as a markdown report: headline metrics, then a per-class table."""
    r = results
    lines = [f"# {r['title']}: {r['method']} with the `{r['protocol']}` protocol", ""]
    if r.get("random_weights"):
        lines += ["> **Random weights**: the model is untrained, so these numbers mean nothing; "
                  "they only show that the harness runs.", ""]
    lines += [f"Model `{r['model']}`, weights `{r['weights_id']}` ({r['dtype']}), {r['images']} images"
              + (f" (limit {r['limit']})" if r.get("limit") else "") + ".", "",
              "| metric | value |", "|---|---:|",
              f"| mIoU | {_fmt(r['mIoU'])} |", f"| mAcc | {_fmt(r['mAcc'])} |", f"| aAcc | {_fmt(r['aAcc'])} |",
              f"| classes in the mean | {r['classes_in_mean']} |", "",
              "| class | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {c['name']} | {_fmt(c['iou'])} | {_fmt(c['acc'])} |" for c in r["per_class"]]
    lines += ["", f"Metric: {r['metric']}.", ""]
    return "\n".join(lines)


def _report(cfg, spec, loaded, untrained, n_images, n_cached, elapsed, m, per_class, echo, metric: str) -> dict:
    """The run's results, written (JSON + markdown) and returned."""
    results = _results(cfg, spec, loaded, untrained, n_images, n_cached, elapsed, m, per_class, metric)
    _write_results(cfg, results, echo)
    return results


def _write_results(cfg: EvalConfig, results: dict, echo) -> None:
    out = Path(cfg.out_dir)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = results_markdown(results)
    (out / "results.md").write_text(md)
    echo(md)
    echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


# ---------------------------------------------------------------------------------- active learning
AL_KS = (1, 2, 4, 8)


def run_active_learning(cfg: EvalConfig, loaded, ks: Sequence[int] = AL_KS, strength: float = 0.5,
                        min_annotations: int = 3, echo: Callable[[str], None] = print) -> dict:
    """Simulate the active-learning loop of the backend on a dataset (see EVALUATION.md).

    For each ``k`` of ``ks``: the ground truth of the first ``k`` images (the reader's order,
    after ``cfg.limit``) is "accepted" as annotations: per class, the sum of the GEM patch tokens
    inside its mask (:func:`gem_backend.prototypes.contribution_from_masks`, the code the
    webhook uses) goes into a prototype store; then the remaining images are predicted twice
    with the protocol's decision: from the text embeddings alone ("before") and with every
    class name's embedding blended with its class prototype, ``normalise((1 - a) * t + a * p)``,
    ``a = strength * n / (n + min_annotations)`` for classes in at least ``min_annotations`` of
    the accepted images ("after"). mIoU of both over the same remaining images.

    Needs a one-pass protocol (``crop`` 0, sides multiple of the patch: ``--resize square``).
    Writes ``active_learning.json`` and ``active_learning.md`` to ``cfg.out_dir``.
    """
    from ..serving.prototypes import MemoryPrototypeStore, active_prototypes, contribution_from_masks
    from ..algorithm.segmentation import ImageEmbedding, SegmentationSettings, blend_prototypes

    spec = get_dataset(cfg.dataset)
    if spec.kind == "points":
        raise EvalError("the active-learning loop needs dense ground truth, not point labels")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise EvalError("--active-learning takes k >= 1 (images accepted before predicting the rest)")
    seg = SegmentationSettings(prototypes=True, prototype_strength=strength, prototype_min_annotations=min_annotations)
    p = cfg.protocol
    prompts = p.prompts or spec.prompts
    if len(prompts) != len(spec.classes):
        raise EvalError(f"{len(prompts)} prompt sets given for the {len(spec.classes)} classes of {spec.name}")
    samples = spec.samples(cfg.root)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    if len(samples) <= ks[-1]:
        raise EvalError(f"{len(samples)} images: the loop needs more than k = {ks[-1]} (some to accept, "
                        f"some to predict)")
    untrained = is_untrained(loaded)
    if untrained:
        echo("note: the model has random (untrained) weights: these numbers only show what the loop does")
    segmenter = segmenter_for(cfg, loaded)
    names = [n for group in prompts for n in group]
    query_class = torch.tensor([c for c, group in enumerate(prompts) for _ in group], dtype=torch.long)
    num_classes = len(spec.classes)
    text = segmenter.encode(names).float().cpu()
    started = time.monotonic()
    items = []  # (tokens, grid, gt)
    for s in _progress(samples, len(samples), cfg, spec):
        image = load_image(s.image_path)
        gt = s.load_label()
        if gt.shape != image.shape[:2]:
            raise EvalError(f"{s.name}: image {image.shape[:2]} and label {gt.shape} differ in size")
        tokens, grid = segmenter.features(image)
        items.append((tokens, grid, gt))

    def predict(i: int, emb: torch.Tensor) -> np.ndarray:
        tokens, grid, gt = items[i]
        sim = (tokens @ emb.t()).t().reshape(1, emb.shape[0], *grid)
        logits = F.interpolate(sim, size=gt.shape, mode="bilinear", align_corners=False)[0]
        pred = decide(logits, query_class, num_classes, p.logit_scale, p.prob_thd, p.area_thd, spec.background)
        return confusion_matrix(pred.numpy().astype(np.uint8), gt, num_classes)

    before = [predict(i, text) for i in range(len(items))]
    rows = []
    for k in ks:
        store = MemoryPrototypeStore()
        for i in range(k):
            tokens, grid, gt = items[i]
            emb = ImageEmbedding(patches=tokens, grid=grid, input_size=(0, 0), original_size=gt.shape)
            masks = {str(c): gt == c for c in np.unique(gt) if c != IGNORE}
            store.put("eval", i, contribution_from_masks(emb, masks, background=False))
        totals = store.totals("eval")
        active = active_prototypes(totals, seg)
        by_query = {str(q): active[str(c)] for q, c in enumerate(query_class.tolist()) if str(c) in active}
        blended = torch.from_numpy(blend_prototypes(text.numpy(), [str(q) for q in range(len(names))], by_query))
        cm_before = sum(before[k:])
        cm_after = sum(predict(i, blended) for i in range(k, len(items)))
        m_before, m_after = segmentation_metrics(cm_before), segmentation_metrics(cm_after)
        rows.append(dict(k=k, predicted=len(items) - k, mIoU_before=_pct(m_before["mIoU"]),
                         mIoU_after=_pct(m_after["mIoU"]), aAcc_before=_pct(m_before["aAcc"]),
                         aAcc_after=_pct(m_after["aAcc"]),
                         classes_with_prototypes=sorted(spec.classes[int(c)] for c in active),
                         annotations_per_class={spec.classes[int(c)]: t.annotations for c, t in sorted(
                             totals.items(), key=lambda kv: int(kv[0]))}))
        r = rows[-1]
        echo(f"k={k}: mIoU {_fmt(r['mIoU_before'])} -> {_fmt(r['mIoU_after'])} on the other {r['predicted']} images "
             f"({len(active)} classes with prototypes)")
    results = dict(
        dataset=spec.name, title=spec.title, root=str(cfg.root), protocol=p.name, method=cfg.method,
        model=loaded.model_name, pretrained=loaded.pretrained, weights_id=loaded.weights_id,
        dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device), random_weights=untrained,
        images=len(items), limit=cfg.limit, seconds=round(time.monotonic() - started, 2),
        prototype_strength=strength, prototype_min_annotations=min_annotations, settings=p.describe(),
        blend="class embedding = normalise((1 - a) * text + a * prototype), a = strength * n / (n + n_min) "
              "for n >= n_min accepted images holding the class, else 0",
        rows=rows)
    if untrained:
        results["warning"] = "random (untrained) weights: only the difference before/after is of interest"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "active_learning.json").write_text(json.dumps(results, indent=1))
    md = active_learning_markdown(results)
    (out / "active_learning.md").write_text(md)
    echo(md)
    echo(f"wrote {out / 'active_learning.json'} and {out / 'active_learning.md'}")
    return results


def active_learning_markdown(results: dict) -> str:
    """The loop's results as a markdown table."""
    r = results
    lines = [f"# Active-learning loop on {r['title']}: {r['method']}, `{r['protocol']}` protocol", ""]
    if r.get("random_weights"):
        lines += ["> **Random weights**: absolute numbers mean nothing; the loop's effect is the difference.", ""]
    lines += [f"Model `{r['model']}`, weights `{r['weights_id']}` ({r['dtype']}), {r['images']} images; "
              f"prototype strength {r['prototype_strength']}, min annotations {r['prototype_min_annotations']}.", "",
              "| k accepted | images predicted | mIoU text only | mIoU with prototypes | change "
              "| classes with prototypes |",
              "|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        before, after = row["mIoU_before"], row["mIoU_after"]
        delta = None if before is None or after is None else after - before
        lines.append(f"| {row['k']} | {row['predicted']} | {_fmt(row['mIoU_before'])} | {_fmt(row['mIoU_after'])} | "
                     f"{'n/a' if delta is None else f'{delta:+.2f}'} | {len(row['classes_with_prototypes'])} |")
    lines += ["", f"Blend: {r['blend']}.", ""]
    return "\n".join(lines)
