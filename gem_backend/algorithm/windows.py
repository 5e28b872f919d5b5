"""Sliding windows over large images: the window arithmetic, and features stitched on one grid.

Serving and ``gem-backend eval`` share this code, so an image seen through windows gives the
same maps in both (``tests/test_windows.py``).

The windows are SCLIP's / mmseg's: they start every ``stride`` pixels, the last one in each
direction is moved back to end at the border, an image smaller than ``crop`` is one window of
its own size. When the image, ``crop`` and ``stride`` are multiples of the patch, every window
sits on the image's token grid, so the windows' patch tokens can be stitched into one
``[h*w, D]`` grid: each cell gets the mean of the L2-normalised tokens of the windows that cover
it. The mean is not normalised again, so a text embedding's dot product with a stitched cell is
exactly the mean of the windows' cosine similarities there: what mmseg's slide inference
averages, on the token grid.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["sliding_windows", "stitched_tokens", "windows_aligned"]


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` over an ``height x width`` image, row-major.

    Args:
        crop: window side in pixels (> 0).
        stride: step between window starts in pixels (> 0).
    """
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be > 0, got {crop} and {stride}")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def windows_aligned(height: int, width: int, crop: int, stride: int, patch: int) -> bool:
    """True when every window of :func:`sliding_windows` starts and ends on the token grid."""
    return all(v % patch == 0 for v in (height, width, crop, stride))


def stitched_tokens(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, crop: int, stride: int,
                    patch: int, batch_size: int = 8) -> torch.Tensor:
    """Patch tokens of a large image through sliding windows, stitched on its token grid.

    Args:
        encode: a method's ``encode_image``: ``[B, 3, c, c] -> [B, 1 + (c/P)^2, D]`` (CLS first).
        x: ``[3, H, W]`` normalised image; ``H``, ``W``, ``crop`` and ``stride`` multiples of
            ``patch`` (:func:`windows_aligned`).
        batch_size: windows per forward pass (windows of one size are batched together).
    Returns:
        ``[h * w, D]`` float32 on ``x``'s device, ``h, w = H/P, W/P``: per cell the mean of the
        L2-normalised tokens of the windows covering it (not normalised again).
    Cost: one forward per window (``len(sliding_windows(H, W, crop, stride))``).
    """
    _, height, width = x.shape
    if not windows_aligned(height, width, crop, stride, patch):
        raise ValueError(f"image {width}x{height}, window {crop} and stride {stride} must be multiples of the "
                         f"{patch} px patch")
    gh, gw = height // patch, width // patch
    boxes = sliding_windows(height, width, crop, stride)
    by_shape: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for box in boxes:
        by_shape.setdefault((box[1] - box[0], box[3] - box[2]), []).append(box)
    total = count = None
    for (wh, ww), group in by_shape.items():
        for start in range(0, len(group), max(1, int(batch_size))):
            part = group[start:start + max(1, int(batch_size))]
            crops = torch.stack([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in part])
            tokens = F.normalize(encode(crops)[:, 1:].float(), dim=-1)  # [b, n, D]
            if total is None:
                total = torch.zeros(gh, gw, tokens.shape[-1], dtype=torch.float32, device=tokens.device)
                count = torch.zeros(gh, gw, 1, dtype=torch.float32, device=tokens.device)
            tokens = tokens.reshape(len(part), wh // patch, ww // patch, -1)
            for (y1, _, x1, _), t in zip(part, tokens):
                r, c = y1 // patch, x1 // patch
                total[r:r + t.shape[0], c:c + t.shape[1]] += t
                count[r:r + t.shape[0], c:c + t.shape[1]] += 1
    return (total / count).reshape(gh * gw, -1)
