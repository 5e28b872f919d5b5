"""Class-agnostic regions of an image (SAM 2's automatic masks) and the region vote.

Regions are an *instance map*: ``[H, W]`` integer ids, one per region, 0 where no region
lies. Two pure functions, as CorrCLIP's official code computes them
(``shared/golden/corrclip-reference``, checked exactly by ``tests/test_regions.py``):

- :func:`paint_regions`: masks -> instance map. The masks are painted smallest first with ids
  1, 2, ... (a stable sort by area, so equal areas keep their order); a later (larger) mask
  overwrites an earlier one, so a mask inside a larger one disappears.
- :func:`vote_regions`: label map + instance map -> label map in which every pixel of a region
  takes the region's most frequent label (CorrCLIP's "map correction"). The smallest id of the
  map is "unsegmented" and keeps its labels: 0 where something is uncovered, otherwise the
  smallest real id (an official quirk, kept). Background (label 0) can win a vote.

Cost: one ``bincount`` over the pixels, O(pixels) for any number of regions (not O(pixels x
regions)); ids spread too widely for a direct table (e.g. 65537 next to 0 with many labels) go
through one ``np.unique`` first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["paint_regions", "vote_regions", "DIRECT_BINS"]

# (region, label) count table size up to which ids index it directly instead of through a sort
DIRECT_BINS = 1 << 24


def _as_numpy(value, name: str) -> tuple[np.ndarray, bool]:
    """``(array, was_torch)``; torch is imported only when a tensor is given."""
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy(), True
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    return value, False


def _like(array: np.ndarray, was_torch: bool):
    if was_torch:
        import torch

        return torch.from_numpy(np.ascontiguousarray(array))
    return array


def paint_regions(masks):
    """One instance map from possibly overlapping binary masks.

    Args:
        masks: ``[K, H, W]`` bool (numpy or torch), e.g. SAM 2's automatic masks; ``K`` may be 0.
    Returns:
        ``[H, W]`` int64 (the input's kind): mask ``k`` gets id ``1 + `` its rank in a stable
        ascending sort by area (``mask.sum()``), painted in that order; 0 under no mask.
    """
    arr, was_torch = _as_numpy(masks, "masks")
    if arr.ndim != 3:
        raise ValueError(f"masks must be [K, H, W], got shape {arr.shape}")
    arr = arr.astype(bool, copy=False)
    out = np.zeros(arr.shape[1:], dtype=np.int64)
    areas = arr.sum(axis=(1, 2))
    for new_id, k in enumerate(np.argsort(areas, kind="stable"), start=1):  # Python's sorted() is stable too
        out[arr[k]] = new_id
    return _like(out, was_torch)


def vote_regions(label_map, instance_map):
    """The region vote: inside every region but the smallest id, the most frequent label wins.

    Args:
        label_map: ``[H, W]`` non-negative integer labels (numpy or torch; 0 is background).
        instance_map: ``[H, W]`` integer region ids (:func:`paint_regions`), the same size.
    Returns:
        ``[H, W]`` labels of ``label_map``'s dtype and kind. On a tie inside a region the
        smallest label wins (the official ``torch.mode`` leaves ties unspecified).
    """
    labels, was_torch = _as_numpy(label_map, "label_map")
    regions, _ = _as_numpy(instance_map, "instance_map")
    if labels.shape != regions.shape or labels.ndim != 2:
        raise ValueError(f"label_map {labels.shape} and instance_map {regions.shape} must be the same [H, W]")
    if labels.size == 0:
        return _like(labels.copy(), was_torch)
    flat = labels.ravel()
    if flat.min() < 0:
        raise ValueError("labels must be non-negative")
    n_labels = int(flat.max()) + 1
    ids = regions.ravel()
    low, high = int(ids.min()), int(ids.max())
    if (high - low + 1) * n_labels <= DIRECT_BINS:
        # painted ids are small integers: index by them directly, no sort
        inverse, n_ids = ids - low, high - low + 1
    else:
        uniq, inverse = np.unique(ids, return_inverse=True)
        n_ids = len(uniq)
    inverse = inverse.astype(np.int64, copy=False)
    counts = np.bincount(inverse * n_labels + flat.astype(np.int64), minlength=n_ids * n_labels)
    winner = counts.reshape(n_ids, n_labels).argmax(axis=1).astype(labels.dtype)
    # index 0 is the smallest id either way: "unsegmented", left as predicted
    out = np.where(inverse == 0, flat, winner[inverse]).reshape(labels.shape).astype(labels.dtype, copy=False)
    return _like(out, was_torch)
