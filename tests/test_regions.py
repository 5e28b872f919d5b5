"""gem_backend.paint_regions and vote_regions against the official CorrCLIP code's cases
(``../shared/golden/corrclip-reference``: ``vote_cases.npz``, ``paint_cases.npz``), exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gem_backend
from helpers import SHARED

GOLDEN = SHARED / "golden" / "corrclip-reference"
VOTE = np.load(GOLDEN / "vote_cases.npz")
PAINT = np.load(GOLDEN / "paint_cases.npz")
VOTE_IDS = sorted({k.rsplit("_", 2)[0] if k.endswith("instance_map") else k.rsplit("_", 1)[0] for k in VOTE.files})
PAINT_IDS = sorted({k.rsplit("_", 1)[0] if k.endswith("_masks") else k.rsplit("_", 2)[0] for k in PAINT.files})


def test_the_golden_cases_are_all_found():
    assert VOTE_IDS == ["background", "fully_covered", "large_ids", "uncovered"]
    assert PAINT_IDS == ["blobs", "empty", "equal_areas", "nested"]


@pytest.mark.parametrize("case", VOTE_IDS)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_vote_matches_the_official_vote(case, kind):
    pred, inst, want = VOTE[f"{case}_pred"], VOTE[f"{case}_instance_map"], VOTE[f"{case}_voted"]
    if kind == "torch":
        got = gem_backend.vote_regions(torch.from_numpy(pred), torch.from_numpy(inst))
        assert isinstance(got, torch.Tensor)
        got = got.numpy()
    else:
        got = gem_backend.vote_regions(pred, inst)
    assert got.dtype == pred.dtype
    np.testing.assert_array_equal(got, want)
    assert (got != pred).any()  # the vote changed something in every case


@pytest.mark.parametrize("case", VOTE_IDS)
def test_voting_the_smallest_id_too_would_differ(case):
    """The deliberately wrong variant (the smallest id voted as well) misses the goldens where
    the smallest id holds more than one label."""
    pred, inst, want = VOTE[f"{case}_pred"], VOTE[f"{case}_instance_map"], VOTE[f"{case}_voted"]
    shifted = inst + 1  # a new, empty smallest id: every real region is voted
    wrong = gem_backend.vote_regions(np.pad(pred, 1), np.pad(shifted, 1))[1:-1, 1:-1]
    smallest = inst == inst.min()
    if len(np.unique(pred[smallest])) > 1:
        assert (wrong != want).any()
    else:
        np.testing.assert_array_equal(wrong, want)


def test_vote_ties_take_the_smallest_label_and_shapes_are_checked():
    pred = np.array([[0, 1, 2, 2], [3, 3, 1, 1]], dtype=np.uint16)
    inst = np.array([[0, 5, 5, 5], [5, 5, 5, 9]])
    # region 5: labels 1, 2, 2, 3, 3, 1 -> 1, 2, 3 tie at 2: the smallest, 1, wins
    np.testing.assert_array_equal(gem_backend.vote_regions(pred, inst), [[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="same"):
        gem_backend.vote_regions(pred, inst[:, :3])
    with pytest.raises(TypeError):
        gem_backend.vote_regions(pred.tolist(), inst)


@pytest.mark.parametrize("case", PAINT_IDS)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_paint_matches_the_official_painting(case, kind):
    masks, want = PAINT[f"{case}_masks"], PAINT[f"{case}_instance_map"]
    got = gem_backend.paint_regions(torch.from_numpy(masks) if kind == "torch" else masks)
    got = got.numpy() if kind == "torch" else got
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_painting_larger_masks_first_would_differ():
    """The deliberately wrong order (largest first) misses most painting cases."""
    differ = 0
    for case in PAINT_IDS:
        masks, want = PAINT[f"{case}_masks"], PAINT[f"{case}_instance_map"]
        order = np.argsort(-masks.sum(axis=(1, 2)), kind="stable")
        wrong = np.zeros(want.shape, np.int64)
        for i, k in enumerate(order, start=1):
            wrong[masks[k]] = i
        differ += int(not np.array_equal(wrong, want))
        np.testing.assert_array_equal(gem_backend.paint_regions(masks), want)
    assert differ >= 3


@pytest.mark.parametrize("case", VOTE_IDS)
def test_the_sorted_path_for_widely_spread_ids_gives_the_same_vote(case, monkeypatch):
    from gem_backend.algorithm import regions

    pred, inst, want = VOTE[f"{case}_pred"], VOTE[f"{case}_instance_map"], VOTE[f"{case}_voted"]
    monkeypatch.setattr(regions, "DIRECT_BINS", 0)  # always through np.unique
    np.testing.assert_array_equal(gem_backend.vote_regions(pred, inst), want)
