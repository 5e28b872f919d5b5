"""The PAMR refinement proxy (gem_backend.evaluation.proxy): boundary F-score, coarse maps, a
small end-to-end run on voc-mini."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gem_backend.algorithm.refine import pamr
from gem_backend.evaluation.proxy import (VARIANTS, boundary_counts, boundary_f, boundary_map, coarse_logits,
                                          fill_thin_ignore, patch_fractions, prepare, upsample)

VOC_MINI = Path("/work/shared/data/voc-mini")


def square(shift: int = 0) -> np.ndarray:
    lab = np.zeros((40, 40), np.uint8)
    lab[10:20, 10 + shift:20 + shift] = 1
    return lab


# ---------------------------------------------------------------------------------- boundary F
def test_identical_maps_score_one():
    lab = square()
    pm, pn, gm, gn = boundary_counts(lab, lab)
    assert pn == gn == 39 and pm == pn and gm == gn
    assert boundary_f((pm, pn, gm, gn)) == dict(precision=1.0, recall=1.0, f=1.0)


def test_square_boundary_is_thin_and_one_sided():
    # left column c=9, right column c=19, top row r=9, bottom row r=19 ((19, 19) shared): 39 px
    b = boundary_map(square())
    assert b.sum() == 39
    assert b[10:20, 9].all() and b[10:20, 19].all() and b[9, 10:20].all() and b[19, 10:20].all()


def test_shifted_square_counts_by_hand():
    # prediction 3 px right of the ground truth, tolerance 2 (Chebyshev):
    # predicted left column c=12: rows 10, 11 (near the GT top row) and 17-19 (bottom row) -> 5;
    # right column c=22: 3 px from everything -> 0; top row c=13..22: 13..21 -> 9; bottom row
    # c=13..21 (c=22 belongs to the right column) -> 9: 23 of 39.
    # GT left column c=9 -> 0; right column c=19: rows 10, 11, 17-19 -> 5; top row c=10..19: all
    # (c=10 is 2 px from (10, 12)) -> 10; bottom row c=10..18 -> 9: 24 of 39.
    counts = boundary_counts(square(3), square(), tolerance=2)
    assert counts == (23, 39, 24, 39)
    f = boundary_f(counts)["f"]
    assert f == pytest.approx(2 * 23 * 24 / (39 * 47))
    assert boundary_counts(square(3), square(), tolerance=3) == (39, 39, 39, 39)
    # exact hits: the row segments c=13..19 of top and bottom, and (19, 12) of the left column
    assert boundary_counts(square(3), square(), tolerance=0)[0] == 7 + 7 + 1


def test_empty_boundaries():
    flat = np.zeros((40, 40), np.uint8)
    assert boundary_counts(flat, flat) == (0, 0, 0, 0)
    assert boundary_f((0, 0, 0, 0))["f"] == 1.0
    pred = square()
    assert boundary_f(boundary_counts(pred, flat)) == dict(precision=0.0, recall=0.0, f=0.0)
    assert boundary_f(boundary_counts(flat, pred))["f"] == 0.0


def test_ignore_band_is_filled_and_wide_void_left_out():
    gt = square()
    band = np.zeros_like(gt, bool)
    band[8:22, 8:22] = True
    band[12:18, 12:18] = False
    gt[band] = 255  # a 4 px void band around where the square's edge is
    filled = fill_thin_ignore(gt)
    assert (filled != 255).all()
    pm, pn, gm, gn = boundary_counts(square(), gt)
    assert pn == 39 and pm == pn and gm == gn > 0
    void = np.full((40, 40), 255, np.uint8)  # nothing scored: nothing counted
    assert boundary_counts(square(), void) == (0, 0, 0, 0)


# ---------------------------------------------------------------------------------- coarse maps
def test_one_class_gives_fraction_one():
    gt = np.full((32, 48), 7, np.uint8)
    gt[0, 0] = 255  # ignored, not counted
    f = patch_fractions(gt, 21)
    assert f.shape == (21, 2, 3)
    assert np.all(f[7] == 1.0) and np.all(np.delete(f, 7, axis=0) == 0.0)


def test_half_half_patch():
    gt = np.zeros((16, 32), np.uint8)
    gt[:, 8:16] = 3      # first patch: half 0, half 3
    gt[:, 16:] = 255     # second patch: nothing scored
    f = patch_fractions(gt, 21)
    assert f[0, 0, 0] == 0.5 and f[3, 0, 0] == 0.5
    assert np.all(f[:, 0, 1] == 0.0)
    with pytest.raises(ValueError):
        patch_fractions(np.zeros((15, 16), np.uint8), 21)


def test_affine_logits_do_not_change_the_label_map():
    rng = np.random.default_rng(0)
    gt = np.zeros((64, 64), np.uint8)
    gt[20:50, 10:40] = 2
    image = rng.integers(0, 255, (1, 3, 64, 64)).astype(np.float32)
    image[:, :, 20:50, 10:40] += 60
    frac = patch_fractions(gt, 3)
    noisy = coarse_logits(frac, 0.2, np.random.default_rng(1))
    raw = (noisy - 0.2) / 0.1  # the fractions plus noise on their own scale
    for maps in (noisy, raw):
        up = upsample(maps, (64, 64))
        assert up.shape == (1, 3, 64, 64)
    a = pamr(torch.from_numpy(image), upsample(noisy, (64, 64)), 10, (1, 2))[0].argmax(0)
    b = pamr(torch.from_numpy(image), upsample(raw, (64, 64)), 10, (1, 2))[0].argmax(0)
    assert (a == b).float().mean() > 0.999
    # PAMR's affinity: invariant to a per-channel affine map of the image
    c = pamr(torch.from_numpy(image * 0.017 - 2.0), upsample(raw, (64, 64)), 10, (1, 2))[0].argmax(0)
    assert (b == c).float().mean() > 0.999


def test_prepare_sizes_like_serving():
    image = np.zeros((300, 500, 3), np.uint8)
    label = np.zeros((300, 500), np.uint8)
    img, lab = prepare(image, label)
    assert img.shape == (448, 752, 3) and lab.shape == (448, 752)  # 500 * 448 / 300 = 746.7 -> 752
    img, lab = prepare(np.zeros((100, 1000, 3), np.uint8), np.zeros((100, 1000), np.uint8))
    assert lab.shape == (96, 896)  # the long side capped at 896


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.skipif(not VOC_MINI.is_dir(), reason="voc-mini not available")
def test_end_to_end_two_images(tmp_path):
    from gem_backend.cli import main

    torch.set_num_threads(1)
    rc = main(["refine-proxy", "--root", str(VOC_MINI), "--limit", "2", "--out", str(tmp_path),
               "--sigmas", "0,0.3", "--no-cost"])
    assert rc == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["config"]["images"] == 2
    got = {(r["variant"], r["sigma"]) for r in out["results"]}
    assert got == {(v.name, s) for v in VARIANTS for s in (0.0, 0.3)}
    for r in out["results"]:
        for k in ("mIoU", "mIoU_gt", "aAcc", "boundary_precision", "boundary_recall", "boundary_f"):
            assert 0.0 <= r[k] <= 1.0, (r, k)
    base = next(r for r in out["results"] if r["variant"] == "baseline" and r["sigma"] == 0.0)
    assert base["mIoU"] > 0.8
    assert "| baseline | 0 |" in (tmp_path / "results.md").read_text()
