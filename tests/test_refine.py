"""PAMR (NACLIP's mask refinement) against the official module's outputs and a plain port of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gem_backend.algorithm.refine import pamr, pamr_affinity
from helpers import SHARED, shared_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
PEERS = SHARED / "golden" / "peers-reference"
ROOT = Path(__file__).resolve().parents[1]


def _cases():
    return json.loads((PEERS / "cases.json").read_text())["pamr_cases"]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["reference"])
def test_matches_official_pamr(case):
    ref = np.load(shared_path("golden", "peers-reference", case["reference"]))
    image, masks = torch.from_numpy(ref["image"]), torch.from_numpy(ref["masks_in"])
    out = pamr(image, masks, **case["options"])
    assert isinstance(out, torch.Tensor) and out.shape == ref["masks_out"].shape and out.dtype == torch.float32
    err = np.abs(out.numpy() - ref["masks_out"]).max()
    assert err < TOL, f"max abs error {err:.2e} >= {TOL}"
    assert np.abs(ref["masks_in"] - ref["masks_out"]).max() > 1e-2  # refinement does change the masks
    assert torch.equal(masks, torch.from_numpy(ref["masks_in"]))  # input left as it was


def test_numpy_in_numpy_out():
    ref = np.load(shared_path("golden", "peers-reference", _cases()[0]["reference"]))
    out = pamr(ref["image"], ref["masks_in"])  # the defaults: 10 iterations, dilations (8, 16)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.abs(out - ref["masks_out"]).max() < TOL
    out64 = pamr(ref["image"].astype(np.float64), ref["masks_in"].astype(np.float64))
    assert out64.dtype == np.float64 and np.abs(out64 - ref["masks_out"]).max() < TOL


# A plain port of the official module (visinf/1-stage-wseg as vendored by NACLIP): shift
# kernels as convolutions, every dilation padded on its own, all values stacked.
def _kernel(with_centre: bool, centre_sign: float, neighbour_sign: float) -> torch.Tensor:
    rows = []
    if with_centre:
        k = torch.zeros(3, 3)
        k[1, 1] = 1
        rows.append(k)
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) == (1, 1):
                continue
            k = torch.zeros(3, 3)
            k[1, 1] += centre_sign
            k[dy, dx] += neighbour_sign
            rows.append(k)
    return torch.stack(rows)[:, None]


def _shifts(x, kernel, dilations):
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(out, 1).reshape(b, k, -1, h, w)


def _naive_pamr(image, masks, iterations, dilations):
    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    std = _shifts(image, _kernel(True, 0.0, 1.0), dilations).std(2, keepdim=True)
    aff = -_shifts(image, _kernel(False, 1.0, -1.0), dilations).abs() / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    for _ in range(iterations):
        masks = (_shifts(masks, _kernel(False, 0.0, 1.0), dilations) * aff).sum(2)
    return masks


@pytest.mark.parametrize("image_size,mask_size,labels,iterations,dilations", [
    ((37, 23), (37, 23), 3, 4, (1, 2)),
    ((30, 41), (8, 11), 5, 3, (3,)),          # masks upsampled first (align_corners=True)
    ((9, 6), (9, 6), 2, 2, (1, 4, 12)),       # dilations beyond the image: replicate all the way
    ((20, 20), (5, 5), 1, 0, (8, 16)),        # no iteration: the resized masks
])
def test_matches_plain_port(image_size, mask_size, labels, iterations, dilations):
    g = torch.Generator().manual_seed(sum(image_size) + labels)
    image = torch.randn(2, 3, *image_size, generator=g)
    masks = torch.randn(2, labels, *mask_size, generator=g)
    ours = pamr(image, masks, iterations=iterations, dilations=dilations)
    theirs = _naive_pamr(image, masks, iterations, dilations)
    assert ours.shape == (2, labels, *image_size)
    assert (ours - theirs).abs().max() < 1e-5
    if iterations:
        assert (ours - F.interpolate(masks, size=image_size, mode="bilinear", align_corners=True)).abs().max() > 1e-2


def test_no_labels_give_no_masks():
    out = pamr(torch.randn(1, 3, 8, 8), torch.zeros(1, 0, 4, 4), iterations=2, dilations=(1,))
    assert out.shape == (1, 0, 8, 8)


def test_affinity_is_a_distribution_over_neighbours():
    image = torch.randn(1, 3, 16, 12)
    aff = pamr_affinity(image, (1, 3, 5))
    assert aff.shape == (1, 24, 16, 12)
    assert torch.allclose(aff.sum(1), torch.ones(1, 16, 12), atol=1e-6)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(3)
    image, masks = torch.randn(1, 3, 40, 50, generator=g), torch.randn(1, 37, 40, 50, generator=g)
    whole = pamr(image, masks, iterations=3, labels_per_chunk=64)
    for chunk in (1, 5, 16):
        assert torch.allclose(pamr(image, masks, iterations=3, labels_per_chunk=chunk), whole, atol=1e-6, rtol=0)
    # every image of a batch on its own
    two = pamr(torch.cat([image, image.flip(-1)]), torch.cat([masks, masks.flip(-1)]), iterations=3)
    assert torch.allclose(two[:1], whole, atol=1e-6, rtol=0)


def test_returns_the_masks_dtype_computes_in_float32():
    g = torch.Generator().manual_seed(4)
    image, masks = torch.randn(1, 3, 24, 24, generator=g), torch.randn(1, 2, 24, 24, generator=g)
    f32 = pamr(image, masks, iterations=2)
    bf16 = pamr(image.to(torch.bfloat16), masks.to(torch.bfloat16), iterations=2)
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - f32).abs().max() < 0.05
    f64 = pamr(image.double(), masks.double(), iterations=2)
    assert f64.dtype == torch.float64 and (f64 - f32.double()).abs().max() < 1e-6
    # a uint8 image is a real image too
    assert pamr((image * 40 + 128).clamp(0, 255).to(torch.uint8), masks, iterations=1).shape == (1, 2, 24, 24)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=torch.zeros(3, 8, 8)), r"image must be \[B, K, H, W\]"),
    (dict(masks=torch.zeros(2, 8, 8)), r"masks \[B, C, h, w\]"),
    (dict(masks=torch.zeros(2, 2, 8, 8)), "different batch sizes"),
    (dict(masks=torch.zeros(1, 2, 0, 8)), "empty"),
    (dict(image=torch.zeros(1, 3, 8, 0)), "empty"),
    (dict(masks=torch.zeros(1, 2, 8, 8, dtype=torch.int64)), "masks must be floating point"),
    (dict(image=torch.zeros(1, 3, 8, 8, dtype=torch.complex64)), "image must be real-valued"),
    (dict(masks=[[0.0]]), "tensors or numpy arrays"),
    (dict(iterations=-1), "iterations must be an integer >= 0"),
    (dict(iterations=2.0), "iterations must be an integer >= 0"),
    (dict(iterations=True), "iterations must be an integer >= 0"),
    (dict(dilations=()), "non-empty sequence"),
    (dict(dilations=8), "non-empty sequence"),
    (dict(dilations=(8, 0)), "positive integers"),
    (dict(dilations=(8, -2)), "positive integers"),
    (dict(dilations=(1.5,)), "positive integers"),
    (dict(dilations=(True,)), "positive integers"),
    (dict(labels_per_chunk=0), "labels_per_chunk must be a positive integer"),
])
def test_invalid_inputs(kwargs, match):
    args = dict(image=torch.zeros(1, 3, 8, 8), masks=torch.zeros(1, 2, 8, 8), iterations=1, dilations=(1,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pamr(**args)


def test_memory_stays_bounded_for_100_labels_at_a_megapixel():
    """The affinity once, the labels in chunks: the peak RSS grows by < 1 GB, output (381 MB) included.

    Two iterations instead of the default ten keep the test at a few seconds: the memory of
    a step is freed before the next, so more iterations need no more memory.
    """
    script = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        from gem_backend.algorithm.refine import pamr
        image = torch.empty(1, 3, 1000, 1000).normal_()
        masks = torch.empty(1, 100, 1000, 1000).normal_()  # 381 MB, made in place (no temporary) before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = pamr(image, masks, iterations=2)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.shape == (1, 100, 1000, 1000) and bool(torch.isfinite(out).all())
        # control: 1 GiB more, touched while out is held, must show in the peak (the measure works here)
        control = torch.ones(2 ** 28)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - after) * 1024)
        print((after - before) * 1024)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    control, growth = (int(v) for v in run.stdout.strip().splitlines()[-2:])
    assert growth < 2 ** 30, f"peak RSS grew by {growth / 2 ** 20:.0f} MB"
    # the measurement measures something: a fresh 1 GiB shows (freed refinement buffers may be reused)
    assert control > 600 * 2 ** 20, f"a 1 GiB allocation raised the peak RSS by {control / 2 ** 20:.0f} MB only"
