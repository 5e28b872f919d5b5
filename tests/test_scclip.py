"""SC-CLIP and SFP (``scclip``, ``sfp``) against the official code, and their pieces.

The golden files (../shared/golden/scclip-reference, README there) were made by the
official SC-CLIP and SFP code on a tiny random CLIP; the contract is 1e-4 absolute on the
tokens in float32 on CPU, and the same outlier sets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gem_backend
from gem_backend.algorithm import scclip
from gem_backend.algorithm.methods import MethodError, check_method_options, method_defaults, method_names
from helpers import SHARED, shared_path, tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
BRANCH_RTOL = 1e-5  # main/multi branches are residual-stream sized (~50): relative to their largest entry
REF = SHARED / "golden" / "scclip-reference"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # OPENAI_DATASET_MEAN / STD
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _cases_json() -> dict:
    return json.loads(shared_path("golden", "scclip-reference", "cases.json").read_text())


# read at collection; a missing folder leaves the list empty and test_golden_cases_are_there fails
WINDOW_CASES = ([c for c in json.loads((REF / "cases.json").read_text())["cases"] if c["kind"] == "window"]
                if (REF / "cases.json").exists() else [])


def _image(name: str) -> torch.Tensor:
    """``[1, 3, H, W]``: the tensor the references saw (no resize)."""
    from PIL import Image

    pixels = np.asarray(Image.open(shared_path("golden", "scclip-reference", name)).convert("RGB"), dtype=np.float64)
    return torch.tensor(((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None], dtype=torch.float32)


@pytest.fixture(scope="module")
def model():
    """The golden tiny CLIP (12 blocks), loaded as serving loads it."""
    loaded = gem_backend.load_gem_model(str(shared_path("golden", "scclip-reference", "config.json")),
                                        str(REF / "weights.safetensors"), device="cpu", precision="fp32")
    return loaded.gem.model


def _tokens(model, case, **kwargs):
    method = gem_backend.create_method(case["method"], model, **case["options"])
    with torch.no_grad():
        return method.encode_image(_image(case["image"]), **kwargs)


def _token_error(model, case) -> float:
    ref = np.load(REF / case["reference"])
    return float(np.abs(_tokens(model, case)[0, 1:].numpy() - ref["tokens"]).max())


# ---------------------------------------------------------------------- golden
def test_golden_cases_are_there():
    assert len(WINDOW_CASES) == 9, "the window cases of shared/golden/scclip-reference/cases.json"
    assert len(IMAGE_CASES) == 5
    assert {c["method"] for c in WINDOW_CASES} == {"scclip", "sfp"}


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: c["reference"])
def test_matches_official_code(model, case):
    ref = np.load(REF / case["reference"])
    x = _image(case["image"])
    assert tuple(x.shape[-2:]) == (case["height"], case["width"])
    method = gem_backend.create_method(case["method"], model, **case["options"])
    assert method.name == case["method"] and method.options == case["options"]
    assert method.grid_for(*x.shape[-2:]) == tuple(case["grid"])
    with torch.no_grad():
        tokens, (trace,) = method.encode_image(x, return_intermediates=True)
        text = method.encode_text(case["labels"], templates=(case["prompt_template"],))
    n = case["grid"][0] * case["grid"][1]
    assert tokens.shape == (1, 1 + n, 32) and tokens.dtype == torch.float32
    assert np.array_equal(trace["outlier_idx"].numpy(), ref["outlier_idx"])
    for key, value in dict(tokens=tokens[0, 1:], text_embeddings=text, S_pre=trace["S_pre"],
                           S_post=trace["S_post"], outlier_tokens_fixed=trace["outlier_tokens_fixed"]).items():
        assert value.shape == ref[key].shape, key
        err = np.abs(value.numpy() - ref[key]).max()
        assert err < TOL, f"{key}: max abs error {err:.2e} >= {TOL}"
    for key in ("main_branch", "multi_branch"):
        err = np.abs(trace[key].numpy() - ref[key]).max() / np.abs(ref[key]).max()
        assert err < BRANCH_RTOL, f"{key}: max relative error {err:.2e}"
    # the detectors' scores (LOF scores of rows with near-tied neighbours are not defined to float precision)
    if "lof_scores" in ref.files:
        sure = ~ref["lof_knn_ambiguous"]
        assert np.allclose(trace["lof_scores"].numpy()[sure], ref["lof_scores"][sure], rtol=1e-4, atol=0)
        assert trace["lof_threshold"].item() == pytest.approx(ref["lof_threshold"][0], rel=1e-4)
    for key, ours in (("som_cls_to_patch", "som_cls_to_patch"), ("som_self", "som_self"), ("l2_norms", "l2_norms")):
        if key in ref.files:
            assert np.allclose(trace[ours].numpy(), ref[key], rtol=1e-4, atol=1e-7), key


IMAGE_CASES = ([c for c in json.loads((REF / "cases.json").read_text())["cases"]
                if c["kind"] == "image" and c["method"] in ("scclip", "sfp")] if (REF / "cases.json").exists() else [])


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c["reference"])
def test_image_cases_window_tokens_in_one_batch(model, case):
    """Every window of the official per-image protocol (edge windows off the 16 px grid
    included), all windows of an image as one batch."""
    ref = np.load(REF / case["reference"])
    x = _image(case["image"])
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in ref["window_boxes"].tolist()])
    with torch.no_grad():
        tokens = gem_backend.create_method(case["method"], model, **case["options"]).encode_image(crops)
    err = np.abs(tokens[:, 1:].numpy() - ref["window_tokens"]).max()
    assert err < TOL, f"max abs error {err:.2e}"


def test_defaults_are_the_official_ones():
    defaults = _cases_json()["option_defaults"]
    for name in ("scclip", "sfp"):
        assert name in method_names()
        assert method_defaults(name) == defaults[name]
        assert check_method_options(name) == defaults[name]
    assert method_names()[0] == "gem"  # GEM stays the default


# ---------------------------------------------------------------------- deliberately wrong variants
def _textbook_lof(x, k=scclip.LOF_NEIGHBOURS):
    dist, idx = scclip.knn_sq_distances(x, k)
    kdist = dist.max(dim=1).values
    lrd = 1.0 / torch.maximum(dist, kdist[idx]).mean(dim=1)  # the neighbour's k-distance
    return lrd[idx].mean(dim=1) / lrd


def _posmix_row_mean(s, temperature=scclip.POSMIX_TEMPERATURE):
    m = temperature * (s - s.mean(dim=-1, keepdim=True))
    return torch.softmax(m.masked_fill(m < 0, -torch.inf), dim=-1)


def _mean_counting_outliers(x, grid, idx, isolated="keep"):
    h, w = grid
    padded = torch.nn.functional.pad(x.t().reshape(1, -1, h, w), (1, 1, 1, 1))
    count = torch.nn.functional.pad(torch.ones(1, 1, h, w), (1, 1, 1, 1))
    kernel = torch.ones(1, 1, 3, 3)
    kernel[0, 0, 1, 1] = 0
    total = torch.nn.functional.conv2d(padded, kernel.expand(x.shape[1], 1, 3, 3).contiguous(), groups=x.shape[1])
    mean = (total / torch.nn.functional.conv2d(count, kernel)).reshape(x.shape[1], -1).t()
    out = x.clone()
    out[idx] = mean[idx]
    return out


@pytest.mark.parametrize("name,wrong", [
    ("lof_scores", _textbook_lof),
    ("posmix", _posmix_row_mean),
    ("mean_interpolation", _mean_counting_outliers),
])
def test_wrong_variants_fail_the_goldens(model, monkeypatch, name, wrong):
    cases = [c for c in WINDOW_CASES if c["method"] == "scclip"]
    assert max(_token_error(model, c) for c in cases) < TOL
    monkeypatch.setattr(scclip, name, wrong)
    worst = max(_token_error(model, c) for c in cases)
    assert worst > 1e-3, f"{name} replaced by a wrong variant still matches ({worst:.1e})"


def test_sfp_without_the_som_scale_fails_the_goldens(model, monkeypatch):
    """res_cls enters SOM's outlier set (CLS row x 5 res_cls): without it, the res_cls 0.1 case changes."""
    case = next(c for c in WINDOW_CASES if c["options"] == {"pm": "SOM", "res_cls": 0.1})
    ref = np.load(REF / case["reference"])
    assert _token_error(model, case) < TOL
    right = scclip.som_scores
    monkeypatch.setattr(scclip, "som_scores", lambda q, k, cls_scale: right(q, k, 1.0))
    _, (trace,) = _tokens(model, case, return_intermediates=True)
    assert not np.array_equal(trace["outlier_idx"].numpy(), ref["outlier_idx"])
    assert _token_error(model, case) > 1e-3


# ---------------------------------------------------------------------- batches
@pytest.mark.parametrize("name,options", [("scclip", {}), ("sfp", {}), ("sfp", {"pm": "L2"}), ("sfp", {"pm": "LOF"})])
@pytest.mark.parametrize("image", ["image_0.png", "image_3.png"])  # 224x224; 336x448: non-square, resized positions
def test_batch_gives_each_image_its_own_tokens(model, name, options, image):
    a = _image(image)
    b = torch.flip(a, dims=[-1])
    method = gem_backend.create_method(name, model, **options)
    with torch.no_grad():
        both = method.encode_image(torch.cat([a, b]))
        alone_a = method.encode_image(a)
        alone_b = method.encode_image(b)
    gh, gw = method.grid_for(*a.shape[-2:])
    assert both.shape == (2, 1 + gh * gw, 32)
    assert (both[0] - alone_a[0]).abs().max() < 1e-5
    assert (both[1] - alone_b[0]).abs().max() < 1e-5
    assert (both[0] - both[1]).abs().max() > 1e-3
    assert torch.isfinite(both).all()


def test_row_zero_is_the_projected_cls_of_the_last_block_input(model):
    x = _image("image_0.png")  # the native grid: no positional resize
    visual = model.visual
    with torch.no_grad():
        tokens = gem_backend.create_method("scclip", model).encode_image(x)
        stream = visual.conv1(x).flatten(2).transpose(1, 2)
        stream = torch.cat([visual.class_embedding.reshape(1, 1, -1), stream], dim=1) + visual.positional_embedding
        stream = visual.ln_pre(stream)
        for block in visual.transformer.resblocks[:-1]:  # F_{L-1}
            stream = block(stream)
        cls = visual.ln_post(stream[:, 0]) @ visual.proj
    assert (tokens[:, 0] - cls).abs().max() < 1e-5


# ---------------------------------------------------------------------- options
def test_unknown_option_and_bad_values_name_the_valid_ones(model):
    with pytest.raises(MethodError, match="unknown option 'pm' for method 'scclip'") as err:
        gem_backend.create_method("scclip", model, pm="SOM")
    for expected in ("pre_adjust_idx (an integer >= 0; default 8)", "post_adjust_idx (an integer >= 0; default 3)",
                     "multi_start_idx (an integer >= 0; default 3)", "multi_end_idx (an integer >= 1; default 10)",
                     "res_cls (a finite number >= 0; default 0.3)"):
        assert expected in str(err.value)
    with pytest.raises(MethodError, match="unknown option 'pre_adjust_idx' for method 'sfp'") as err:
        gem_backend.create_method("sfp", model, pre_adjust_idx=8)
    assert "pm ('SOM' | 'L2' | 'LOF'; default 'SOM')" in str(err.value)
    for name, options, allowed in [
        ("sfp", {"pm": "som"}, "'SOM' | 'L2' | 'LOF'"),
        ("sfp", {"res_cls": -0.1}, "a finite number >= 0"),
        ("scclip", {"res_cls": float("nan")}, "a finite number >= 0"),
        ("scclip", {"pre_adjust_idx": -1}, "an integer >= 0"),
        ("scclip", {"post_adjust_idx": 2.5}, "an integer >= 0"),
        ("scclip", {"multi_end_idx": True}, "an integer >= 1"),
    ]:
        (key, value), = options.items()
        with pytest.raises(MethodError) as err:
            gem_backend.create_method(name, model, **options)
        assert f"invalid value {value!r} for option {key!r} of method {name!r}" in str(err.value)
        assert allowed in str(err.value)
    with pytest.raises(MethodError, match="multi_start_idx must be < multi_end_idx"):
        check_method_options("scclip", {"multi_start_idx": 5, "multi_end_idx": 5})
    assert check_method_options("scclip", {"res_cls": 0})["res_cls"] == 0.0


@pytest.mark.parametrize("options,bad", [
    ({"pre_adjust_idx": 11}, "pre_adjust_idx=11"),
    ({"post_adjust_idx": 20}, "post_adjust_idx=20"),
    ({"multi_end_idx": 12}, "multi_end_idx=12"),
])
def test_index_beyond_depth_is_refused_at_creation(model, options, bad):
    with pytest.raises(MethodError) as err:
        gem_backend.create_method("scclip", model, **options)
    message = str(err.value)
    assert bad in message and "12 blocks" in message
    assert "pre_adjust_idx and post_adjust_idx 0..10" in message and "multi_end_idx <= 11" in message


def test_deepest_valid_indices_run(model):
    method = gem_backend.create_method("scclip", model, pre_adjust_idx=10, post_adjust_idx=0,
                                       multi_start_idx=10, multi_end_idx=11)
    with torch.no_grad():
        tokens = method.encode_image(_image("image_0.png"))
    assert torch.isfinite(tokens).all()


def test_sfp_needs_eleven_blocks():
    shallow = tiny_clip(layers=10)
    with pytest.raises(MethodError, match="at least 11 blocks .* this one has 10"):
        gem_backend.create_method("sfp", shallow)
    with pytest.raises(MethodError, match="on an image tower of 10 blocks"):
        gem_backend.create_method("scclip", shallow)  # multi_end_idx 10 reads F_10, after the last block here
    assert gem_backend.create_method("scclip", shallow, multi_end_idx=9).num_blocks == 10


# ---------------------------------------------------------------------- pieces
def test_knn_distances_are_the_differences_form_in_any_chunking():
    x = torch.randn(70, 9, generator=torch.Generator().manual_seed(0)) * 3
    full = torch.norm(x[:, None] - x[None], dim=2) ** 2
    dist, idx = scclip.knn_sq_distances(x, 5)
    one_row, one_idx = scclip.knn_sq_distances(x, 5, chunk_bytes=1)  # one row at a time
    assert torch.equal(dist, one_row) and torch.equal(idx, one_idx)
    expected = full.topk(6, dim=1, largest=False)
    assert torch.equal(dist, expected.values[:, 1:]) and torch.equal(idx, expected.indices[:, 1:])
    assert not (idx == torch.arange(70)[:, None]).any()  # self dropped


def test_lof_is_the_official_closed_form():
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(1))
    x[7] += 6  # a far token
    dist, idx = scclip.knn_sq_distances(x, 30)
    kdist = dist[:, -1]
    closed = kdist * (1 / kdist[idx]).mean(dim=1)  # README: kdist_i * mean_j 1 / kdist_j
    scores = scclip.lof_scores(x)
    assert torch.allclose(scores, closed, rtol=1e-5)
    out, _, threshold = scclip.lof_outliers(x)
    assert 7 in out.tolist() and len(out) == 4  # 80 scores above their 0.95 quantile: the top 4
    assert threshold == torch.quantile(scores, 0.95)
    assert torch.equal(out, out.sort().values)


def test_lof_on_small_grids():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(scclip.lof_scores(x)).all()  # 11 neighbours instead of 30
    assert scclip.lof_scores(x[:1]).tolist() == [1.0]
    assert scclip.lof_outliers(x[:1])[0].numel() == 0


def test_mean_interpolation_on_a_non_square_grid():
    h, w = 3, 5
    x = torch.arange(h * w, dtype=torch.float32)[:, None].repeat(1, 2)  # value = row-major index
    out = scclip.mean_interpolation(x, (h, w), torch.tensor([6, 7]))
    # 6 is (1, 1): neighbours 0 1 2 5 10 11 12 (7 is an outlier); 7 is (1, 2): 1 2 3 8 11 12 13 (not 6)
    assert out[6].tolist() == pytest.approx([41 / 7] * 2) and out[7].tolist() == pytest.approx([50 / 7] * 2)
    others = [i for i in range(h * w) if i not in (6, 7)]
    assert torch.equal(out[others], x[others])
    corner = scclip.mean_interpolation(x, (h, w), torch.tensor([4]))  # (0, 4): neighbours 3 8 9
    assert corner[4].tolist() == pytest.approx([20 / 3] * 2)
    lonely = torch.tensor([0, 1, 5, 6])  # 0's neighbours 1, 5, 6 are all outliers
    assert scclip.mean_interpolation(x, (h, w), lonely)[0].tolist() == [0.0, 0.0]  # kept: its own 0
    x1 = x + 1
    assert scclip.mean_interpolation(x1, (h, w), lonely)[0].tolist() == [1.0, 1.0]
    assert scclip.mean_interpolation(x1, (h, w), lonely, isolated="zero")[0].tolist() == [0.0, 0.0]
    assert torch.equal(scclip.mean_interpolation(x, (h, w), torch.tensor([], dtype=torch.long)), x)


def test_similarity_pieces():
    s = torch.tensor([[1.0, 0.5, 0.4, 0.39], [0.5, 1.0, -0.2, 0.1], [0.4, -0.2, 1.0, 0.0], [0.39, 0.1, 0.0, 1.0]])
    cut = scclip.cut(s)
    assert torch.equal(cut[0], torch.tensor([1.0, 0.5, 0.4, 0.0]))  # 0.4 itself is kept
    assert torch.equal(cut[1], torch.tensor([0.5, 1.0, 0.0, 0.0]))
    mix = scclip.posmix(s)
    mean = s.mean()
    assert torch.allclose(mix.sum(dim=-1), torch.ones(4))
    assert torch.equal(mix > 0, s >= mean)  # entries below the mean of all 16 are masked
    assert mean.item() == pytest.approx(0.39875) and mix[0, 3] == 0  # 0.39 < mean, 0.4 > mean
    assert torch.allclose(mix[0, :3], torch.softmax(3 * (s[0, :3] - mean), dim=0))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    agg = scclip.aggregate(x, cut)
    assert torch.allclose(agg[3], x[3] / (1 + 1e-6))
    assert torch.allclose(agg[0], (cut[0] @ x) / (cut[0].sum() + 1e-6))
    cosines = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
    assert torch.allclose(scclip.cosine_matrix(x * 5), cosines, atol=1e-6)


def test_mixed_attention_is_the_mean_of_its_terms():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 6, 4, generator=g) for _ in range(3))
    mix = torch.softmax(torch.randn(6, 6, generator=g), dim=-1)
    soft = lambda a: torch.softmax(a @ a.transpose(-1, -2) / 2, dim=-1)  # d = 4: s = 1/2
    for kk, qq, attn in [(True, False, (mix + soft(k)) / 2), (True, True, (soft(k) + soft(q) + mix) / 3),
                         (False, False, mix.expand(2, 6, 6))]:
        out = scclip.mixed_attention(q, k, v, mix, kk=kk, qq=qq)
        assert torch.allclose(out, (attn @ v).transpose(0, 1).reshape(6, 8), atol=1e-6)


def test_som_scores_and_outliers():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(3, 9, 4, generator=g), torch.randn(3, 9, 4, generator=g)
    c2p, own = scclip.som_scores(q, k, 1.5)
    a = torch.softmax(q @ k.transpose(1, 2) / 2, dim=-1)
    assert torch.allclose(c2p, (a[:, 0, 1:] * 1.5).mean(dim=0))
    assert torch.allclose(own, a.diagonal(dim1=1, dim2=2)[:, 1:].mean(dim=0))
    c2p = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.8])
    own = torch.tensor([0.1, 0.2, 1.0, 0.1, 0.1])
    assert scclip.som_outliers(c2p, own, top=2).tolist() == [0, 4]  # 2 is not salient
    assert scclip.som_outliers(c2p, own).tolist() == [0, 3, 4]  # fewer than 10 salient
    assert scclip.som_outliers(c2p * 0, own).numel() == 0
    idx, norms = scclip.l2_outliers(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 6.0]]), top=2)
    assert idx.tolist() == [0, 2] and norms.tolist() == [5.0, 1.0, 6.0]


@pytest.mark.parametrize("name,options", [("scclip", {}), ("sfp", {}), ("sfp", {"pm": "LOF"})])
def test_half_precision_model_and_small_grids(name, options):
    """bf16 weights: tokens in bf16 (the float32 parts inside); grids below LOF's 31 tokens."""
    model = tiny_clip(layers=12, heads=4).to(torch.bfloat16)
    method = gem_backend.create_method(name, model, **options)
    assert method.dtype == torch.bfloat16
    for size in ((96, 64), (16, 16), (32, 80)):  # 24 tokens, 1 token, a 2 x 5 grid
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            tokens, traces = method.encode_image(x, return_intermediates=True)
        n = (size[0] // 16) * (size[1] // 16)
        assert tokens.shape == (2, 1 + n, 32) and tokens.dtype == torch.bfloat16
        assert torch.isfinite(tokens.float()).all()
        assert traces[0]["S_pre"].dtype == torch.float32 and traces[0]["S_pre"].shape == (n, n)
