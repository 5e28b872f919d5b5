"""The official per-image protocol (sliding windows averaged per pixel, PAMR, the decision) against
the official segmentors' outputs (../shared/golden/scclip-reference, README "The per-image protocol"
and "The contract"), the hooks a region method (CorrCLIP) uses, and the window features serving keeps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gem_backend import load_gem_model, method_names, pamr
from gem_backend.algorithm.segmentation import GEMPredictor, ImageEmbedding, SegmentationSettings
from gem_backend.algorithm.windows import (REGION_PAD, Window, cell_tokens, resize_regions, sliding_windows,
                                           window_logits)
from gem_backend.evaluation.harness import Protocol, Segmenter, decide
from gem_backend.serving.feature_cache import decode_embedding, encode_embedding
from helpers import shared_path

TOL = 1e-4
CASES = json.loads(shared_path("golden", "scclip-reference", "cases.json").read_text())
IMAGE_CASES = [c for c in CASES["cases"] if c["kind"] == "image"]


def golden(name: str):
    return shared_path("golden", "scclip-reference", name)


@pytest.fixture(scope="module")
def loaded():
    return load_gem_model(str(golden("config.json")), str(golden("weights.safetensors")), device="cpu",
                          precision="fp32")


def png(name: str) -> np.ndarray:
    with Image.open(golden(name)) as im:
        return np.array(im.convert("RGB"))


def segmenter_for(loaded, case, method=None) -> Segmenter:
    p = case["protocol"]
    protocol = Protocol("sclip", resize="short", size=p["size"], crop=p["crop"], stride=p["stride"],
                        templates=(CASES["prompt_template"],), logit_scale=p["logit_scale"], prob_thd=p["prob_thd"],
                        area_thd=p["area_thd"])
    return Segmenter(loaded, protocol, method=method or case["method"], method_options=case["options"],
                     refine="pamr" if p["pamr_steps"] else "none", refine_iterations=p["pamr_steps"],
                     refine_dilations=p["pamr_stride"])


def background(case) -> int | None:
    p = case["protocol"]
    return 0 if p["prob_thd"] > 0 or p["area_thd"] is not None else None


def decision(logits, case) -> np.ndarray:
    p = case["protocol"]
    return decide(torch.as_tensor(logits), torch.tensor(case["query_class"]), len(case["labels"]),
                  p["logit_scale"], p["prob_thd"], p["area_thd"], background(case)).numpy()


def robust(logits: np.ndarray, case, tau: float) -> np.ndarray:
    """README "Hard switches and margins": pixels whose official decision no logit error <= tau
    can change (the class logit gap over the classes area_thd keeps, and the prob_thd margin)."""
    p = case["protocol"]
    scale, prob_thd, area_thd = p["logit_scale"], p["prob_thd"], p["area_thd"]
    n = len(case["labels"])
    lg = torch.from_numpy(logits).double()
    q, h, w = lg.shape
    index = torch.tensor(case["query_class"]).view(q, 1).expand(q, h * w)
    probs = torch.softmax(lg * scale, dim=0).reshape(q, -1)
    cls_p = torch.zeros(n, h * w, dtype=torch.float64).scatter_reduce(0, index, probs, "amax", include_self=False)
    cls_l = torch.zeros(n, h * w, dtype=torch.float64).scatter_reduce(0, index, lg.reshape(q, -1), "amax",
                                                                      include_self=False)
    if area_thd is not None:
        counts = torch.bincount(cls_p.argmax(0), minlength=n).double()
        keep = counts > area_thd * counts[1:].sum()
        keep[0] = True  # the background is never filtered
        cls_p = cls_p * keep[:, None]
        cls_l = cls_l.masked_fill(~keep[:, None], float("-inf"))
    top = cls_l.topk(2, dim=0).values
    ok = top[0] - top[1] > 2 * tau
    if prob_thd > 0:
        best = cls_p.max(0).values
        ok = (best * np.exp(2 * scale * tau) < prob_thd) | (ok & (best * np.exp(-2 * scale * tau) >= prob_thd))
    return ok.view(h, w).numpy()


def needs(method: str) -> None:
    if method not in method_names():
        pytest.skip(f"method {method!r} is not in this build (it comes with the scclip branch)")


def case_id(case) -> str:
    return case["reference"].removesuffix(".npz")


# --------------------------------------------------------------------------- the golden image cases
@pytest.mark.parametrize("case", IMAGE_CASES, ids=case_id)
def test_image_case_matches_the_official_segmentor(loaded, case):
    needs(case["method"])
    ref = np.load(golden(case["reference"]))
    image = png(case["image"])
    assert image.shape[:2] == (case["height"], case["width"])
    seg = segmenter_for(loaded, case)
    text = seg.encode(case["queries"])
    np.testing.assert_allclose(text.numpy(), ref["text_embeddings"], rtol=0, atol=TOL)

    # the windows, edge windows included, and each window's tokens
    _, tokens, wins = seg.windows(image)
    assert [list(w.box) for w in wins] == ref["window_boxes"].tolist()
    for t, official in zip(tokens, ref["window_tokens"]):
        np.testing.assert_allclose(t.numpy(), F.normalize(torch.from_numpy(official), dim=-1).numpy(), rtol=0,
                                   atol=TOL)

    logits = seg.logits(image, text).numpy()
    err = float(np.abs(logits - ref["seg_logits_raw"]).max())
    assert err <= TOL, f"seg_logits_raw off by {err:.2e}"

    decided = case["decision"]
    robust4, robust6 = robust(ref["seg_logits_raw"], case, TOL), robust(ref["seg_logits_raw"], case, 1e-6)
    # the robustness rule reproduces the README's counts, so the masks below are the README's
    assert int((~robust4).sum()) == decided["not_robust_at_1e-4"]
    assert int((~robust6).sum()) == decided["near_tie_at_1e-6"]
    # the rule alone on the official logits: every pixel not within 1e-6 of a tie
    rule = decision(ref["seg_logits_raw"], case)
    np.testing.assert_array_equal(rule[robust6], ref["seg_pred"][robust6].astype(np.int64))
    # our logits: every robust pixel
    own = decision(logits, case)
    np.testing.assert_array_equal(own[robust4], ref["seg_pred"][robust4].astype(np.int64))
    assert sorted(np.unique(own).tolist()) == decided["classes_predicted"]


def stitched_logits(seg: Segmenter, image: np.ndarray, text: torch.Tensor) -> torch.Tensor:
    """The old, wrong arithmetic: normalised window tokens averaged on the image's token grid,
    then one upsampling (windows on the patch grid only)."""
    x, tokens, wins = seg.windows(image)
    h, w = x.shape[-2:]
    p = seg.patch
    total = torch.zeros(h // p, w // p, tokens[0].shape[-1])
    count = torch.zeros(h // p, w // p, 1)
    for t, win in zip(tokens, wins):
        y1, _, x1, _ = win.box
        assert y1 % p == 0 and x1 % p == 0
        total[y1 // p:y1 // p + win.grid[0], x1 // p:x1 // p + win.grid[1]] += t.reshape(*win.grid, -1)
        count[y1 // p:y1 // p + win.grid[0], x1 // p:x1 // p + win.grid[1]] += 1
    sim = ((total / count) @ text.t()).permute(2, 0, 1)[None]
    return F.interpolate(sim, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("case", [c for c in IMAGE_CASES if c["method"] in ("sclip", "naclip")
                                  and c["protocol"]["crop"] > 0 and c["protocol"]["pamr_steps"] == 0
                                  and c["width"] % 112 == 0], ids=case_id)
def test_windows_averaged_on_the_token_grid_miss_the_official_logits(loaded, case):
    ref = np.load(golden(case["reference"]))
    seg = segmenter_for(loaded, case)
    image = png(case["image"])
    text = seg.encode(case["queries"])
    err = float((stitched_logits(seg, image, text) - torch.from_numpy(ref["seg_logits_raw"])).abs().max())
    assert err > 1e-3, f"the token-grid average should miss by far more than the tolerance, got {err:.2e}"
    assert float((seg.logits(image, text) - torch.from_numpy(ref["seg_logits_raw"])).abs().max()) <= TOL


# --------------------------------------------------------------------------- window arithmetic
def test_window_logits_average_the_upsampled_window_maps_per_pixel():
    # two windows that overlap in columns 4..7, constant maps 1 and 3 for query 0, -1 and 0 for query 1
    wins = [Window((0, 4, 0, 8), (2, 4)), Window((0, 4, 4, 12), (2, 4))]
    text = torch.eye(2)
    tokens = [torch.tensor([[1.0, -1.0]]).expand(8, 2), torch.tensor([[3.0, 0.0]]).expand(8, 2)]
    out = window_logits(tokens, wins, text, (4, 12), chunk=1)
    expected = torch.zeros(2, 4, 12)
    expected[0, :, :4], expected[0, :, 4:8], expected[0, :, 8:] = 1, 2, 3
    expected[1, :, :4], expected[1, :, 4:8] = -1, -0.5
    torch.testing.assert_close(out, expected)
    # one concatenated tensor is the same as the list
    torch.testing.assert_close(window_logits(torch.cat(tokens), wins, text, (4, 12)), out)


def test_padded_window_map_is_upsampled_to_the_padded_window_then_cut():
    tokens = torch.randn(6, 5)
    win = Window((0, 10, 0, 14), (2, 3), pad=(1, 1, 2, 0))  # 12 x 16 padded
    text = F.normalize(torch.randn(4, 5), dim=-1)
    sim = (tokens @ text.t()).t().reshape(1, 4, 2, 3)
    expected = F.interpolate(sim, size=(12, 16), mode="bilinear", align_corners=False)[0, :, 1:11, 2:16]
    torch.testing.assert_close(window_logits([tokens], [win], text, (10, 14)), expected)


def test_cell_tokens_average_the_tokens_centred_in_each_cell():
    wins = [Window((0, 32, 0, 32), (2, 2)), Window((0, 32, 16, 48), (2, 2))]
    tokens = [torch.ones(4, 3), 3 * torch.ones(4, 3)]
    cells = cell_tokens(tokens, wins, (2, 3), 16).reshape(2, 3, 3)
    torch.testing.assert_close(cells[:, :, 0], torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))


def test_regions_are_resized_by_nearest_exactly():
    r = torch.arange(6 * 8).reshape(6, 8) + 123456789  # ids past float32 precision stay exact
    out = resize_regions(r, (3, 4))
    expected = F.interpolate((r - 123456789).double()[None, None], size=(3, 4), mode="nearest")[0, 0].long()
    assert torch.equal(out, expected + 123456789)
    assert resize_regions(r, (6, 8)) is r


# --------------------------------------------------------------------------- hooks for region methods
class RegionStandIn:
    """A region method as CorrCLIP is seen by the protocol: windows padded to 56, each encoded
    alone with its regions, tokens on an 8 px grid, no CLS (``cls=True``: with a CLS row).
    Token k of a window = (cos a, sin a) with a the mean of channel 0 over its 8 x 8 cell."""

    window_multiple = 56
    uses_regions = True
    patch_size = (16, 16)
    device = torch.device("cpu")

    def __init__(self, cls: bool = False):
        self.cls = cls
        self.calls = []

    def grid_for(self, h, w):
        return h // 8, w // 8

    def encode_image(self, x, regions=None):
        self.calls.append((x.clone(), None if regions is None else regions.clone()))
        a = F.avg_pool2d(x[:, :1], 8).flatten(1)  # [1, N]
        out = torch.stack([a.cos(), a.sin()], dim=-1)  # [1, N, 2]
        return torch.cat([torch.zeros(1, 1, 2), out], dim=1) if self.cls else out


def stand_in_segmenter(loaded, crop=336, stride=112, resize="none", size=224) -> Segmenter:
    seg = Segmenter(loaded, Protocol("corrclip", resize=resize, size=size, crop=crop, stride=stride), method="clip")
    return seg


@pytest.mark.parametrize("cls", [False, True])
def test_region_method_gets_each_padded_window_alone_with_its_regions(loaded, cls):
    seg = stand_in_segmenter(loaded)
    seg.tower = tower = RegionStandIn(cls)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)  # smaller than the crop: one window
    regions = rng.integers(0, 5, (100, 150)).astype(np.int64)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = seg.logits(image, text, regions=regions)

    [(x, r)] = tower.calls
    top, left = (112 - 100) // 2, (168 - 150) // 2  # to multiples of 56, centred
    assert tuple(x.shape) == (1, 3, 112, 168) and r.dtype == torch.long and tuple(r.shape) == (1, 112, 168)
    inner = (slice(top, top + 100), slice(left, left + 150))
    assert torch.equal(r[0][inner], torch.from_numpy(regions))
    pad = torch.ones(112, 168, dtype=torch.bool)
    pad[inner] = False
    assert (r[0][pad] == REGION_PAD).all() and (x[0][:, pad] == 0).all()
    torch.testing.assert_close(x[0][:, inner[0], inner[1]], seg.prepare(image))

    a = F.avg_pool2d(x[:, :1], 8)[0]  # [1, 14, 21]: the 8 px grid of the padded window
    sim = torch.cat([a.cos(), a.sin()])[None]
    expected = F.interpolate(sim, size=(112, 168), mode="bilinear", align_corners=False)[0][:, inner[0], inner[1]]
    torch.testing.assert_close(logits, expected)

    tower.calls.clear()
    seg.logits(image, text)  # without regions a region method gets None
    assert tower.calls[0][1] is None


def test_region_method_windows_one_by_one_and_regions_resized_like_the_image(loaded):
    seg = stand_in_segmenter(loaded, crop=112, stride=100, resize="short", size=112)
    seg.tower = tower = RegionStandIn()
    image = np.random.default_rng(1).integers(0, 256, (224, 460, 3), dtype=np.uint8)
    regions = np.arange(224 * 460, dtype=np.int64).reshape(224, 460)
    seg.logits(image, torch.eye(2), regions=regions)
    boxes = sliding_windows(112, 230, 112, 100)
    assert len(tower.calls) == len(boxes) and all(x.shape[0] == 1 for x, _ in tower.calls)
    small = resize_regions(torch.from_numpy(regions), (112, 230))
    for (y1, y2, x1, x2), (x, r) in zip(boxes, tower.calls):
        assert tuple(x.shape[-2:]) == (112, 112) and torch.equal(r[0], small[y1:y2, x1:x2])


def test_whole_image_pass_drops_the_remainder_without_padding(loaded):
    # NACLIP's slide_crop=0: one pass, grid floor(H/p) x floor(W/p) stretched over H x W
    seg = Segmenter(loaded, Protocol("sclip", resize="none", crop=0), method="naclip")
    image = np.random.default_rng(2).integers(0, 256, (230, 460, 3), dtype=np.uint8)
    x, tokens, wins = seg.windows(image)
    assert tuple(x.shape[-2:]) == (230, 460) and wins[0].grid == (14, 28) and wins[0].pad == (0, 0, 0, 0)
    text = F.normalize(torch.randn(3, loaded.gem.embed_dim), dim=-1)
    sim = (tokens[0] @ text.t()).t().reshape(1, 3, 14, 28)
    expected = F.interpolate(sim, size=(230, 460), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(seg.logits(image, text), expected)


# --------------------------------------------------------------------------- serving
def test_window_embedding_survives_the_feature_cache_exactly(loaded):
    seg = SegmentationSettings(input_size=64, windows_above=64, window=64, window_stride=48, window_short_side=96,
                               method="naclip")
    pred = GEMPredictor(loaded, seg)
    emb = pred.set_image(np.random.default_rng(3).integers(0, 256, (96, 160, 3), dtype=np.uint8))
    assert emb.windows is not None and emb.patches.shape[0] == sum(w.tokens for w in emb.windows)
    back = decode_embedding(encode_embedding(emb))
    assert back.windows == emb.windows and torch.equal(back.patches, emb.patches)
    text = F.normalize(torch.randn(3, loaded.gem.embed_dim), dim=-1)
    assert torch.equal(back.logits(text), emb.logits(text))
    assert decode_embedding(encode_embedding(emb)[:-4]) is None
    # prototypes learn from one token per grid cell
    assert tuple(emb.grid_tokens().shape) == (emb.grid[0] * emb.grid[1], loaded.gem.embed_dim)


def test_one_pass_entries_of_the_old_format_are_still_read():
    emb = ImageEmbedding(torch.randn(12, 8), (3, 4), (48, 64), (300, 400))
    old = b"GIE1" + encode_embedding(emb)[4:]
    back = decode_embedding(old)
    assert back is not None and back.windows is None and torch.equal(back.patches, emb.patches)


@pytest.mark.parametrize("method", ["scclip", "sfp"])
def test_serving_and_eval_agree_through_windows_for_the_successors(loaded, method):
    needs(method)
    image = png("image_3.png")  # 336 x 448
    case = next(c for c in IMAGE_CASES if c["method"] == method)
    seg = SegmentationSettings(input_size=224, threshold=0, min_area=0, background_prompts=(),
                               templates=(CASES["prompt_template"],), method=method,
                               method_options=tuple(case["options"].items()), windows_above=224, window=224,
                               window_stride=112, window_short_side=336)
    pred = GEMPredictor(loaded, seg)
    emb = pred.set_image(image)
    assert emb.input_size == (336, 448)
    labels = ["grass", "bench", "bus"]
    protocol = Protocol("sclip", resize="none", crop=224, stride=112, templates=(CASES["prompt_template"],))
    segmenter = Segmenter(loaded, protocol, method, method_options=case["options"])
    text = segmenter.encode(labels)
    logits = segmenter.logits(image, text)
    torch.testing.assert_close(emb.logits(text), logits, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pred.predict(labels, emb).label_map.astype(np.int64) - 1,
                                  logits.argmax(0).numpy())


def test_serving_sees_a_region_method_through_its_padded_window(loaded, monkeypatch):
    settings = SegmentationSettings(input_size=100, max_long_side=150, threshold=0, min_area=0, method="clip")
    tower = RegionStandIn()
    monkeypatch.setitem(loaded.methods, ("clip", ()), tower)
    pred = GEMPredictor(loaded, settings)
    image = np.random.default_rng(4).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    emb = pred.set_image(image)
    [(x, r)] = tower.calls
    assert r is None and tuple(x.shape) == (1, 3, 112, 168)  # 96 x 144 input padded to multiples of 56
    [win] = emb.windows
    assert emb.input_size == (96, 144) and win.grid == (14, 21) and win.pad == (8, 8, 12, 12)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = F.avg_pool2d(x[:, :1], 8)[0]
    expected = F.interpolate(torch.cat([a.cos(), a.sin()])[None], size=(112, 168), mode="bilinear",
                             align_corners=False)[0, :, 8:104, 12:156]
    torch.testing.assert_close(emb.logits(text), expected)


def test_chunked_decision_through_windows_equals_all_at_once(loaded, monkeypatch):
    from gem_backend.algorithm import segmentation

    labels = [f"thing {i}" for i in range(7)]
    pred = GEMPredictor(loaded, SegmentationSettings(input_size=64, threshold=0, min_area=0, method="sclip",
                                                     windows_above=64, window=64, window_stride=48,
                                                     window_short_side=96))
    emb = pred.set_image(np.random.default_rng(5).integers(0, 256, (96, 160, 3), dtype=np.uint8))
    assert emb.windows is not None
    whole = pred.predict(labels, emb)
    monkeypatch.setattr(segmentation, "DECISION_CHUNK", 3)  # the running-softmax path, 3 prompts a chunk
    chunked = pred.predict(labels, emb)
    np.testing.assert_array_equal(whole.label_map, chunked.label_map)
    assert len(np.unique(whole.label_map)) > 1


def test_pamr_is_guided_by_the_model_input_resized_to_the_image(loaded):
    # NACLIP's evaluation: logits and the normalised input both bilinearly resized to the image
    seg = Segmenter(loaded, Protocol("sclip", resize="short", size=112, crop=0), method="naclip", refine="pamr",
                    refine_iterations=2, refine_dilations=(1, 2))
    image = np.random.default_rng(6).integers(0, 256, (160, 240, 3), dtype=np.uint8)
    text = F.normalize(torch.randn(3, loaded.gem.embed_dim), dim=-1)
    size = (160, 240)
    guide = F.interpolate(seg.prepare(image)[None], size=size, mode="bilinear", align_corners=False)
    maps = F.interpolate(seg.maps(image, text)[None], size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(seg.logits(image, text), pamr(guide, maps, 2, (1, 2))[0])
