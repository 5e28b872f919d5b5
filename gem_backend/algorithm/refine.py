"""Image-guided refinement of dense score maps: PAMR, as NACLIP runs it after its logits.

PAMR (pixel-adaptive mask refinement; Araslanov & Roth, CVPR 2020, ``visinf/1-stage-wseg``)
repeatedly replaces each pixel's scores by an affinity-weighted mean of its neighbours',
where the affinity is high for neighbours of similar colour. It reproduces NACLIP's
``pamr.py`` (``shared/golden/peers-reference``, ``tests/test_refine.py``).

Shapes: ``B`` images, ``K`` image channels, ``C`` labels, ``H x W`` pixels,
``P = 8 * len(dilations)`` neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["pamr", "pamr_affinity"]

# the 8 neighbours of a 3x3 window, (dy, dx); the centre is not one
_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _check_dilations(dilations) -> tuple[int, ...]:
    if isinstance(dilations, (int, np.integer)) or not isinstance(dilations, Sequence) or not len(dilations):
        raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {dilations!r}")
    for d in dilations:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(f"dilations must be positive integers, got {list(dilations)!r}")
    return tuple(int(d) for d in dilations)


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """View of ``padded [..., h + 2 pad, w + 2 pad]`` at offset ``(dy, dx)``: ``[..., h, w]``."""
    return padded[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w]


@torch.no_grad()  # a post-processing step: no autograd graph over H x W x P values
def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """PAMR's neighbour weights of an image.

    For each dilation ``t`` the neighbours are the 8 pixels at ``t * (dy, dx)``, the border
    replicated. Per pixel and channel ``sd`` is the unbiased standard deviation of the
    ``9 * len(dilations)`` values of all those 3x3 windows (the centre once per dilation);
    ``a_n = -|I_c - I_n| / (1e-8 + 0.1 sd)``, averaged over the channels, then a softmax
    over the neighbours.

    Args:
        image: ``[B, K, H, W]``, float32.
        dilations: positive integers.
    Returns:
        ``[B, P, H, W]`` float32, summing to 1 over ``P``; neighbours dilation-major, each
        dilation's 8 offsets row-major (``pamr`` propagates in the same order).
    """
    dilations = _check_dilations(dilations)
    if image.ndim != 4:
        raise ValueError(f"image must be [B, K, H, W], got {tuple(image.shape)}")
    _, _, h, w = image.shape
    pad = max(dilations)
    # replicate padding once by the largest dilation: the same clamped values as per dilation
    padded = F.pad(image, [pad] * 4, mode="replicate")
    neighbours = [(d * dy, d * dx) for d in dilations for dy, dx in _OFFSETS]
    n_values = 9 * len(dilations)

    # two-pass unbiased std over the window values, without stacking them (memory)
    total = image * len(dilations)
    for dy, dx in neighbours:
        total = total + _shifted(padded, pad, dy, dx, h, w)
    mean = total / n_values
    sq = (image - mean).square_() * len(dilations)
    for dy, dx in neighbours:
        sq.add_((_shifted(padded, pad, dy, dx, h, w) - mean).square_())
    denom = (sq / (n_values - 1)).sqrt_().mul_(0.1).add_(1e-8)  # [B, K, H, W]
    del total, mean, sq

    channels = image.shape[1]
    aff = torch.zeros(image.shape[0], len(neighbours), h, w, dtype=image.dtype, device=image.device)
    for i, (dy, dx) in enumerate(neighbours):
        dist = (image - _shifted(padded, pad, dy, dx, h, w)).abs_().div_(denom)  # [B, K, H, W]
        for k in range(channels):  # the channel mean as plain adds: a strided mean(dim=1) is slower
            aff[:, i].sub_(dist[:, k])
    return torch.softmax(aff.div_(channels), dim=1)


@torch.no_grad()
def pamr(image, masks, iterations: int = 10, dilations: Sequence[int] = (8, 16), *,
         labels_per_chunk: int = 16):
    """Refine score maps along the image's edges (NACLIP's PAMR).

    The masks are first resized to the image size (bilinear, align_corners=True; nothing
    changes at the same size), then ``iterations`` times ``m <- sum_n a_n m_n`` over the
    neighbours ``n`` (the border replicated, the pixel itself not included), ``a`` from
    :func:`pamr_affinity`.

    Args:
        image: ``[B, K, H, W]``, the (normalised) image, tensor or numpy array.
        masks: ``[B, C, h, w]`` score maps (NACLIP: the raw cosine logits), tensor or numpy.
        iterations: propagation steps, >= 0.
        dilations: neighbour distances in pixels, positive integers.
        labels_per_chunk: labels propagated at once; bounds the memory (the affinity is
            computed once for all): ~``4 * labels_per_chunk`` masks of ``H x W`` float32
            besides input and output.
    Returns:
        ``[B, C, H, W]``, of the kind of ``masks`` (tensor on its device, or numpy) and in
        its dtype; computed in float32.
    Raises:
        ValueError: for inputs of the wrong shape or invalid parameters.
    """
    as_numpy = isinstance(masks, np.ndarray)
    image_t = torch.from_numpy(np.asarray(image)) if isinstance(image, np.ndarray) else image
    masks_t = torch.from_numpy(masks) if as_numpy else masks
    if not isinstance(image_t, torch.Tensor) or not isinstance(masks_t, torch.Tensor):
        raise ValueError("image and masks must be torch tensors or numpy arrays")
    if image_t.ndim != 4 or masks_t.ndim != 4:
        raise ValueError(f"image must be [B, K, H, W] and masks [B, C, h, w]; got {tuple(image_t.shape)} "
                         f"and {tuple(masks_t.shape)}")
    if image_t.shape[0] != masks_t.shape[0]:
        raise ValueError(f"image and masks have different batch sizes ({image_t.shape[0]} and {masks_t.shape[0]})")
    if min(image_t.shape[1:]) < 1 or min(masks_t.shape[2:]) < 1:
        raise ValueError(f"empty image or masks: {tuple(image_t.shape)}, {tuple(masks_t.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    if isinstance(labels_per_chunk, bool) or not isinstance(labels_per_chunk, int) or labels_per_chunk < 1:
        raise ValueError(f"labels_per_chunk must be a positive integer, got {labels_per_chunk!r}")
    dilations = _check_dilations(dilations)
    if image_t.is_complex() or image_t.dtype == torch.bool:
        raise ValueError(f"image must be real-valued, got {image_t.dtype}")
    if not masks_t.is_floating_point():
        raise ValueError(f"masks must be floating point, got {masks_t.dtype}")

    out_dtype = masks_t.dtype
    device = masks_t.device
    bsz, n_labels = masks_t.shape[:2]
    h, w = image_t.shape[-2:]
    aff = pamr_affinity(image_t.to(device=device, dtype=torch.float32), dilations)  # [B, P, H, W]
    pad = max(dilations)
    neighbours = [(d * dy, d * dx) for d in dilations for dy, dx in _OFFSETS]
    out = torch.empty(bsz, n_labels, h, w, dtype=out_dtype, device=device)
    for start in range(0, n_labels, labels_per_chunk):
        m = masks_t[:, start:start + labels_per_chunk].to(torch.float32)
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)
        for _ in range(iterations):
            padded = F.pad(m, [pad] * 4, mode="replicate")
            m = torch.zeros_like(m)
            for i, (dy, dx) in enumerate(neighbours):  # in place: no [B, c, P, H, W] stack
                m.addcmul_(aff[:, i:i + 1], _shifted(padded, pad, dy, dx, h, w))
            del padded
        out[:, start:start + labels_per_chunk] = m
    return out.numpy() if as_numpy else out
