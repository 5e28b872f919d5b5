"""Sliding windows over large images: the official per-image protocol of SCLIP and its successors.

Serving and ``gem-backend eval`` share this code, so an image seen through windows gives the
same maps in both (``tests/test_protocol.py``).

The windows are SCLIP's / mmseg's (:func:`sliding_windows`): they start every ``stride``
pixels, the last one in each direction is moved back to end at the border, an image smaller
than ``crop`` is one window of its own size. Each window is encoded on its own
(:func:`window_tokens`: zero-padded around its centre to a multiple of the method's
``window_multiple``, by default the patch), its L2-normalised patch tokens are compared with
the text, the ``[Q, gh, gw]`` map is bilinearly upsampled to the (padded) window, the padding cut
off, and the maps of all windows are averaged per pixel (:func:`window_logits`). That is what
the official ``slide_inference`` / ``forward_slide`` compute; averaging the windows' tokens on the
image's token grid and upsampling once is not the same (it misses the official logits by
2e-2..1.5e-1 near every window border) and is not offered.

Hooks read from a method object, with defaults (CorrCLIP sets them):

- ``window_multiple`` (int, default the patch): windows are padded to a multiple of it;
- ``uses_regions`` (bool, default False): each window is encoded alone as
  ``encode_image(x [1, 3, h, w], regions=r [1, h, w])``, ``r`` the window's crop of an instance
  map, its padding :data:`REGION_PAD`;
- ``grid_for(h, w)``: the token grid of an ``h x w`` input (a method whose tokens live on another
  grid than the CLIP's, e.g. DINO's, says so there).

Tokens may come as ``[B, N, D]`` or ``[B, 1 + N, D]``: the last ``N = gh * gw`` rows are the patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["REGION_PAD", "Window", "sliding_windows", "centre_pad", "window_multiple", "window_tokens",
           "window_logits", "cell_tokens", "resize_regions", "torch_nearest_indices"]

# instance id of a window's zero padding (CorrCLIP: the padding is a region of its own)
REGION_PAD = 10000


@dataclass(frozen=True)
class Window:
    """One window as encoded.

    Attributes:
        box: ``(y1, y2, x1, x2)``: the image pixels it covers.
        grid: ``(gh, gw)``: its token grid (of the padded window).
        pad: ``(top, bottom, left, right)``: zeros added around it before encoding.
    """

    box: tuple[int, int, int, int]
    grid: tuple[int, int]
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(h, w)`` of the padded window: what its token map is upsampled to."""
        y1, y2, x1, x2 = self.box
        top, bottom, left, right = self.pad
        return y2 - y1 + top + bottom, x2 - x1 + left + right

    @property
    def tokens(self) -> int:
        """``gh * gw``."""
        return self.grid[0] * self.grid[1]


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


def centre_pad(height: int, width: int, multiple: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of an ``height x width`` window to the next
    multiple of ``multiple`` (int or ``(mh, mw)``): ``top = pad_h // 2``, ``left = pad_w // 2``
    (ClearCLIP's / CorrCLIP's centring)."""
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    ph, pw = (-height) % mh, (-width) % mw
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def window_multiple(method) -> tuple[int, int]:
    """``(mh, mw)`` a method's windows are padded to: its ``window_multiple`` if it has one,
    else its patch size."""
    m = getattr(method, "window_multiple", None)
    if m is None:
        return tuple(method.patch_size)
    return (m, m) if isinstance(m, int) else tuple(m)


def torch_nearest_indices(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """``[n_out]`` int64: the source index of each output index of ``F.interpolate(mode="nearest")``
    (``floor(i * n_in / n_out)`` with PyTorch's own float scale, so maps match it exactly)."""
    src = torch.arange(n_in, dtype=torch.float32, device=device).reshape(1, 1, n_in)
    return F.interpolate(src, size=n_out, mode="nearest").reshape(n_out).long()


def resize_regions(regions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` int64 instance map nearest-resized to ``size`` as ``F.interpolate(mode="nearest")``
    does (:func:`torch_nearest_indices`), by indexing: exact for any id (no float cast)."""
    h, w = regions.shape
    if (h, w) == tuple(size):
        return regions
    dev = regions.device
    return regions[torch_nearest_indices(h, size[0], dev)][:, torch_nearest_indices(w, size[1], dev)]


def _patches(out: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` token rows of ``[B, T, D]`` (``T = n`` or ``1 + n``), float32, L2-normalised."""
    if out.shape[1] < n:
        raise ValueError(f"the method returned {out.shape[1]} tokens for a grid of {n}")
    return F.normalize(out[:, out.shape[1] - n:].float(), dim=-1)


def window_tokens(method, x: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], batch_size: int = 8,
                  regions: torch.Tensor | None = None, pad: bool = True) -> tuple[list[torch.Tensor], list[Window]]:
    """Each window's L2-normalised patch tokens.

    Args:
        method: a dense method (``encode_image``, ``grid_for``, ``patch_size``; hooks in the
            module docstring).
        x: ``[3, H, W]`` normalised image.
        boxes: windows ``(y1, y2, x1, x2)`` (:func:`sliding_windows`).
        batch_size: windows of one size per forward pass (a method with ``uses_regions``: 1).
        regions: ``[H, W]`` int64 instance map, for a method with ``uses_regions`` (None: it gets
            ``regions=None``); ignored otherwise.
        pad: pad windows to :func:`window_multiple` (False: the patch convolution drops the
            remainder, as NACLIP's whole-image pass).
    Returns:
        ``(tokens, windows)``: per box ``[gh * gw, D]`` float32 on ``x``'s device, row-major, and
        its :class:`Window`.
    Cost: one forward per window.
    """
    uses_regions = bool(getattr(method, "uses_regions", False))
    multiple = window_multiple(method)
    tokens: list[torch.Tensor | None] = [None] * len(boxes)
    windows: list[Window | None] = [None] * len(boxes)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        by_shape.setdefault((y2 - y1, x2 - x1), []).append(i)
    step = 1 if uses_regions else max(1, int(batch_size))
    for (wh, ww), idx in by_shape.items():
        top, bottom, left, right = centre_pad(wh, ww, multiple) if pad else (0, 0, 0, 0)
        grid = tuple(method.grid_for(wh + top + bottom, ww + left + right))
        for start in range(0, len(idx), step):
            part = idx[start:start + step]
            crops = torch.stack([x[:, boxes[i][0]:boxes[i][1], boxes[i][2]:boxes[i][3]] for i in part])
            if any((top, bottom, left, right)):
                crops = F.pad(crops, (left, right, top, bottom))
            if uses_regions:
                r = None
                if regions is not None:
                    y1, y2, x1, x2 = boxes[part[0]]
                    r = F.pad(regions[y1:y2, x1:x2].to(device=crops.device, dtype=torch.long),
                              (left, right, top, bottom), value=REGION_PAD)[None]
                out = method.encode_image(crops, regions=r)
            else:
                out = method.encode_image(crops)
            feats = _patches(out, grid[0] * grid[1]).to(x.device)
            for j, i in enumerate(part):
                tokens[i] = feats[j]
                windows[i] = Window(tuple(int(v) for v in boxes[i]), grid, (top, bottom, left, right))
    return tokens, windows  # type: ignore[return-value]


def _split(tokens, windows: Sequence[Window]) -> list[torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        sizes = [w.tokens for w in windows]
        if tokens.shape[0] != sum(sizes):
            raise ValueError(f"{tokens.shape[0]} tokens for windows of {sum(sizes)}")
        return list(torch.split(tokens, sizes))
    if len(tokens) != len(windows):
        raise ValueError(f"{len(tokens)} token sets for {len(windows)} windows")
    return list(tokens)


def window_logits(tokens, windows: Sequence[Window], text: torch.Tensor, size: tuple[int, int],
                  chunk: int = 32) -> torch.Tensor:
    """Per-pixel average of the windows' upsampled cosine maps: the official slide inference.

    Per window: ``tokens @ text^T`` as ``[Q, gh, gw]``, bilinearly upsampled (align_corners=False)
    to the padded window, the padding cut off, added into a ``[Q, H, W]`` canvas; the canvas is
    divided by the number of windows covering each pixel.

    Args:
        tokens: per window ``[gh * gw, D]`` L2-normalised (a list, or one tensor
            ``[sum gh * gw, D]`` in window order, as :class:`ImageEmbedding` keeps them).
        windows: the :class:`Window` of each.
        text: ``[Q, D]`` L2-normalised; the maps are computed on its device.
        size: ``(H, W)`` of the image the windows tile.
        chunk: queries upsampled at once (bounds the temporaries at ``chunk`` window maps
            besides the output).
    Returns:
        ``[Q, H, W]`` float32; a pixel no window covers is NaN (never with :func:`sliding_windows`).
    """
    parts = _split(tokens, windows)
    text = text.float()
    device = text.device
    q = text.shape[0]
    height, width = int(size[0]), int(size[1])
    count = torch.zeros(1, height, width, dtype=torch.float32, device=device)
    for w in windows:
        y1, y2, x1, x2 = w.box
        count[:, y1:y2, x1:x2] += 1
    out = torch.zeros(q, height, width, dtype=torch.float32, device=device)
    step = max(1, int(chunk))
    for start in range(0, q, step):
        t = text[start:start + step]
        canvas = out[start:start + t.shape[0]]  # summed in place: no second [Q, H, W]
        for feat, w in zip(parts, windows):
            y1, y2, x1, x2 = w.box
            top, _, left, _ = w.pad
            sim = (feat.to(device=device, dtype=torch.float32) @ t.t()).t().reshape(1, t.shape[0], *w.grid)
            up = F.interpolate(sim, size=w.padded_size, mode="bilinear", align_corners=False)[0]
            canvas[:, y1:y2, x1:x2] += up[:, top:top + y2 - y1, left:left + x2 - x1]
        canvas.div_(count)
    return out


def cell_tokens(tokens, windows: Sequence[Window], grid: tuple[int, int], patch: int | tuple[int, int]) -> torch.Tensor:
    """One token per cell of the image's ``patch`` grid ``(h, w)``: the mean of the window tokens
    whose centre falls in the cell, not normalised again (0 where none does).

    For learning from annotations (a token per image cell), not for maps: its cosines are not
    the protocol's logits (:func:`window_logits`).

    Returns:
        ``[h * w, D]`` float32.
    """
    parts = _split(tokens, windows)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    h, w = int(grid[0]), int(grid[1])
    dim = parts[0].shape[-1] if parts else 0
    device = parts[0].device if parts else torch.device("cpu")
    total = torch.zeros(h * w, dim, dtype=torch.float32, device=device)
    count = torch.zeros(h * w, 1, dtype=torch.float32, device=device)
    for feat, win in zip(parts, windows):
        y1, _, x1, _ = win.box
        top, _, left, _ = win.pad
        sh, sw = win.padded_size
        gh, gw = win.grid
        # pixel centre of each token in image coordinates, then its image cell
        cy = y1 - top + (torch.arange(gh, device=device, dtype=torch.float64) + 0.5) * sh / gh
        cx = x1 - left + (torch.arange(gw, device=device, dtype=torch.float64) + 0.5) * sw / gw
        r = torch.floor(cy / ph).long()
        c = torch.floor(cx / pw).long()
        inside = ((r >= 0) & (r < h))[:, None] & ((c >= 0) & (c < w))[None, :]
        cell = (r[:, None] * w + c[None, :]).clamp(0, h * w - 1)
        sel = inside.flatten()
        idx = cell.flatten()[sel]
        total.index_add_(0, idx, feat.float()[sel])
        count.index_add_(0, idx, torch.ones(idx.shape[0], 1, device=device))
    return total / count.clamp_min(1)
