"""CorrCLIP and DINO against the official code (``../shared/golden/corrclip-reference``, README there).

Every window of every case: the tokens within 1e-4 (float32, CPU), the intermediates (DINO
features, ``S`` and ``A`` on the stored rows, the branch outputs) within 1e-4, the region maps
and DBSCAN labels exactly. Plus the DINO-only mode, DINO loading (file, hub cache, offline)
and deliberately wrong variants that must miss.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gem_backend
from gem_backend.algorithm import dino as dino_module
from gem_backend.algorithm.corrclip import CorrCLIP, merge_regions
from gem_backend.algorithm.dense import interpolate_pos_encoding
from gem_backend.algorithm.hub import ModelLoadError
from gem_backend.algorithm.methods import MethodError, check_method_options, create_method
from helpers import SHARED, shared_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
GOLDEN = SHARED / "golden" / "corrclip-reference"
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _cases() -> list[dict]:
    return json.loads(shared_path("golden", "corrclip-reference", "cases.json").read_text())["cases"]


CASES = {case["id"]: case for case in _cases()}
WINDOWS = [(case_id, w["index"]) for case_id, case in CASES.items() for w in case["windows"]]


def _image(case: dict) -> torch.Tensor:
    """``[3, H, W]`` CLIP-normalised, as the references saw it (no resize)."""
    pixels = np.asarray(Image.open(GOLDEN / case["image"]).convert("RGB"), dtype=np.float64)
    return torch.tensor(((pixels / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1), dtype=torch.float32)


def _window(case_id: str, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(x [1, 3, h, w], regions [1, h, w], reference arrays of the window)``."""
    case = CASES[case_id]
    window = case["windows"][index]
    data = np.load(GOLDEN / case["reference"])
    y1, y2, x1, x2 = window["box"]
    left, right, top, bottom = window["pad_lrtb"]
    x = F.pad(_image(case)[:, y1:y2, x1:x2], (left, right, top, bottom))[None]
    regions = F.pad(torch.from_numpy(data["instance_map"][y1:y2, x1:x2].copy()), (left, right, top, bottom),
                    value=10000)[None]
    prefix = f"w{index}_"
    ref = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
    assert x.shape[-2:] == tuple(window["padded_hw"]) and x.shape[-1] % 56 == 0 and x.shape[-2] % 56 == 0
    return x, regions, ref


@pytest.fixture(scope="module")
def dino():
    return gem_backend.load_dino(str(GOLDEN / "dino_config.json"), str(GOLDEN / "dino_weights.safetensors"),
                                 device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def clip():
    loaded = gem_backend.load_gem_model(str(GOLDEN / "config.json"), str(GOLDEN / "weights.safetensors"),
                                        device="cpu", precision="fp32")
    return loaded.gem.model


@pytest.fixture(scope="module")
def method(clip, dino):
    return gem_backend.create_method("corrclip", clip, dino=dino)


def _max_diff(got: torch.Tensor, want: np.ndarray) -> float:
    return float((got.detach().float() - torch.from_numpy(np.asarray(want, dtype=np.float32))).abs().max())


# ---------------------------------------------------------------------- the golden windows
def test_every_case_and_window_is_found():
    assert sorted(CASES) == ["i0", "i1", "i2", "i3"]
    assert WINDOWS == [("i0", 0), ("i0", 1), ("i1", 0), ("i2", 0), ("i3", 0)]


@pytest.mark.parametrize("case_id,index", WINDOWS)
def test_window_matches_the_official_code(method, case_id, index):
    x, regions, ref = _window(case_id, index)
    tokens, inter = method.encode_image(x, regions, return_intermediates=True)
    n_d = ref["tokens"].shape[0]
    assert tokens.shape == (1, 1 + n_d, ref["tokens"].shape[1])
    assert _max_diff(tokens[0, 1:], ref["tokens"]) < TOL
    for key in ("dino_qk", "x_main", "x_spatial", "x_semantic"):
        assert inter[key].shape == (1, *ref[key].shape), key
        assert _max_diff(inter[key][0], ref[key]) < TOL, key
    rows = torch.from_numpy(ref["rows"])
    assert inter["S"].shape == inter["attn"].shape == (1, n_d, n_d)
    assert _max_diff(inter["S"][0][rows], ref["S_rows"]) < TOL
    assert _max_diff(inter["attn"][0][rows], ref["attn_rows"]) < TOL
    for key in ("regions_dino", "regions_clip"):
        np.testing.assert_array_equal(inter[key][0].numpy(), ref[key])
    if "dbscan_labels" in ref:
        np.testing.assert_array_equal(inter["dbscan_labels"][0].numpy(), ref["dbscan_labels"])
        assert not np.array_equal(ref["regions_dino"], ref["regions_dino_in"])  # the merge mattered
    else:
        assert "dbscan_labels" not in inter
    assert method.grid_for(*x.shape[-2:]) == ref["regions_dino"].shape


def test_fused_path_equals_the_explicit_one(method):
    # without intermediates the affinity goes through SDPA with a boolean mask: same tokens
    x, regions, ref = _window("i2", 0)  # padded, non-square, merged
    tokens = method.encode_image(x, regions)
    assert _max_diff(tokens[0, 1:], ref["tokens"]) < TOL
    assert torch.allclose(tokens, method.encode_image(x, regions, return_intermediates=True)[0], atol=1e-5)


def test_without_regions_is_the_all_zero_map(method):
    x, regions, ref = _window("i3", 0)
    assert not regions.any()  # DINO-only case
    none = method.encode_image(x)
    assert torch.equal(none, method.encode_image(x, torch.zeros_like(regions)))
    assert _max_diff(none[0, 1:], ref["tokens"]) < TOL


def test_batch_elements_are_computed_one_by_one(method):
    x0, r0, ref0 = _window("i0", 0)
    x1, r1, ref1 = _window("i0", 1)
    tokens = method.encode_image(torch.cat([x0, x1]), torch.cat([r0, r1]))
    assert _max_diff(tokens[0, 1:], ref0["tokens"]) < TOL and _max_diff(tokens[1, 1:], ref1["tokens"]) < TOL


def test_protocol_attributes(method, dino):
    assert method.name == "corrclip" and method.uses_regions is True and method.window_multiple == 56
    assert method.grid_for(280, 336) == (35, 42)  # the DINO grid (patch 8), not the CLIP one
    assert dino.patch_size == 8 and dino.embed_dim == 48
    assert method.options == {"dino_model": "dino_vitb8", "dino_pretrained": None}
    x, _, ref = _window("i3", 0)  # DenseCLIP's maps work on the DINO grid (DINO-only without regions)
    text = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    maps = method.similarity_maps(x, text)
    assert maps.shape == (1, 3, 224, 224)
    tokens = F.normalize(torch.from_numpy(ref["tokens"]), dim=-1)
    coarse = (tokens @ text.t()).t().reshape(1, 3, 28, 28)
    assert (maps - F.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False)).abs().max() < TOL


# ---------------------------------------------------------------------- pieces
def test_merge_is_connected_components_in_order_of_the_lowest_member():
    # ids 0 (kept), 5, 6, 7, 9: 5~7 and 6~9 close, so labels [0, 1, 0, 1]
    feats = F.normalize(torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0.05, 0], [0.05, 1, 0]]), dim=-1)
    regions = torch.tensor([0, 5, 6, 7, 9])
    merged, labels = merge_regions(regions, feats)
    assert labels.tolist() == [0, 1, 0, 1]
    assert merged.tolist() == [0, 10000, 10001, 10000, 10001]
    two = torch.tensor([0, 10000, 10000, 0, 0])  # two ids: nothing merged
    assert merge_regions(two, feats)[1] is None and torch.equal(merge_regions(two, feats)[0], two)


def test_dino_position_rule_resizes_non_square_inputs_at_the_native_count(dino):
    stored = dino.vit.pos_embed[0]
    assert torch.equal(dino.pos_embed(224, 224), stored)  # native count and square: as stored
    moved = dino.pos_embed(224, 231)  # grid 28 x 28, not square: resized by (28.1 / 28)
    assert moved.shape == stored.shape and torch.equal(moved[0], stored[0])
    assert (moved - stored).abs().max() > 1e-4
    assert torch.equal(moved, interpolate_pos_encoding(stored, (28, 28), (28, 28), always=True))


# ---------------------------------------------------------------------- wrong variants miss
def test_timm_style_dino_position_resize_fails_the_goldens(method, monkeypatch):
    from timm.layers import resample_abs_pos_embed

    def timm_style(pos_embed, old_grid, new_grid, always=False):
        return resample_abs_pos_embed(pos_embed[None], list(new_grid), list(old_grid), num_prefix_tokens=1,
                                      antialias=True)[0]

    monkeypatch.setattr(dino_module, "interpolate_pos_encoding", timm_style)
    x, regions, ref = _window("i0", 0)
    assert _max_diff(method.encode_image(x, regions)[0, 1:], ref["tokens"]) > 1e-3


def test_q_instead_of_q_plus_k_fails_the_goldens(method, dino, monkeypatch):
    x, regions, ref = _window("i3", 0)
    qkv = dino.vit.blocks[-1].attn.qkv
    with torch.no_grad():
        saved = qkv.weight[48:96].clone(), qkv.bias[48:96].clone()
        qkv.weight[48:96] = 0  # k = 0: f = q
        qkv.bias[48:96] = 0
        try:
            wrong = method.encode_image(x, regions)
        finally:
            qkv.weight[48:96], qkv.bias[48:96] = saved
    assert _max_diff(wrong[0, 1:], ref["tokens"]) > 1e-2
    assert _max_diff(method.encode_image(x, regions)[0, 1:], ref["tokens"]) < TOL  # restored


# ---------------------------------------------------------------------- factory and loading
def test_factory_options_and_default_dino(clip, dino):
    assert "corrclip" in gem_backend.method_names()
    assert check_method_options("corrclip", {"dino_pretrained": ""}) == {"dino_model": "dino_vitb8",
                                                                         "dino_pretrained": None}
    for bad, allowed in (({"dino_model": ""}, "a non-empty string"), ({"dino_pretrained": 3}, "None | a string")):
        with pytest.raises(MethodError, match=allowed.replace("|", r"\|")):
            check_method_options("corrclip", bad)
    with pytest.raises(MethodError, match="takes no DINO"):
        create_method("sclip", clip, dino=dino)
    # without dino=: loaded from the options, shared with the fixture's (same file, device, dtype)
    made = create_method("corrclip", clip, dino_model=str(GOLDEN / "dino_config.json"),
                         dino_pretrained=str(GOLDEN / "dino_weights.safetensors"))
    assert isinstance(made, CorrCLIP) and made.dino is dino


def test_load_dino_from_the_golden_files(dino):
    assert dino is gem_backend.load_dino(str(GOLDEN / "dino_config.json"), str(GOLDEN / "dino_weights.safetensors"))
    assert not dino.training and dino.dtype == torch.float32
    x, _, ref = _window("i2", 0)
    pixels = x * torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1) + torch.tensor(
        CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    norm = (pixels - torch.tensor(dino_module.DINO_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        dino_module.DINO_STD).view(1, 3, 1, 1)
    assert _max_diff(dino.qk_features(norm)[0], ref["dino_qk"]) < 1e-5
    with pytest.raises(ModelLoadError, match="needs a weights file"):
        gem_backend.load_dino(str(GOLDEN / "dino_config.json"))
    with pytest.raises(ModelLoadError, match="does not fit"):
        gem_backend.load_dino("dino_vits8", str(GOLDEN / "dino_weights.safetensors"))
    with pytest.raises(ModelLoadError, match="unknown DINO model"):
        gem_backend.load_dino("dinov2_vits14", str(GOLDEN / "dino_weights.safetensors"))


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_without_cached_weights_fails_fast_naming_the_download(empty_hf_cache, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        gem_backend.load_dino("dino_vits16")
    assert time.monotonic() - start < 8
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "timm/vit_small_patch16_224.dino" in message
    assert "dino_deitsmall16_pretrain.pth" in message and "dino_pretrained" in message


def test_unreachable_hub_fails_fast_and_cached_weights_load_without_it(empty_hf_cache, monkeypatch):
    import shutil
    import socket

    import huggingface_hub.constants as hf_constants

    with socket.socket() as s:  # a closed loopback port as the hub
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setitem(dino_module.DINO_MODELS, "dino_tiny",
                        ("test-org/tiny-dino", dict(patch_size=8, embed_dim=48, depth=3, num_heads=4)))
    monkeypatch.setitem(dino_module.DINO_URLS, "dino_tiny", "https://example.invalid/tiny.pth")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not be reached"):
        gem_backend.load_dino("dino_tiny")
    assert time.monotonic() - start < 8
    snapshot = empty_hf_cache / "models--test-org--tiny-dino" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (empty_hf_cache / "models--test-org--tiny-dino" / "refs").mkdir()
    (empty_hf_cache / "models--test-org--tiny-dino" / "refs" / "main").write_text("0" * 40)
    shutil.copy(GOLDEN / "dino_weights.safetensors", snapshot / "model.safetensors")
    start = time.monotonic()
    cached = gem_backend.load_dino("dino_tiny")
    assert time.monotonic() - start < 8
    golden = gem_backend.load_dino(str(GOLDEN / "dino_config.json"), str(GOLDEN / "dino_weights.safetensors"))
    assert cached is not golden
    for (name, a), (_, b) in zip(cached.vit.state_dict().items(), golden.vit.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------- image level (harness.Segmenter)
def _pixel_margins(logits: np.ndarray, query_class: list[int], num_classes: int, scale: float,
                   prob_thd: float) -> np.ndarray:
    """The README's decision margin of each pixel, in raw-logit units, from the golden logits:
    the argmax gap between classes / 2 and, with a threshold, ``|log p_max - log prob_thd| / (2 scale)``."""
    qc = np.asarray(query_class)
    per_class = np.stack([logits[qc == c].max(axis=0) for c in range(num_classes)])
    top2 = np.sort(per_class, axis=0)[-2:]
    margin = (top2[1] - top2[0]) / 2
    if prob_thd > 0:
        z = logits.astype(np.float64) * scale
        log_p_max = -np.log(np.exp(z - z.max(axis=0)).sum(axis=0))
        margin = np.minimum(margin, np.abs(log_p_max - np.log(prob_thd)) / (2 * scale))
    return margin


@pytest.fixture(scope="module")
def segmenters():
    from gem_backend.evaluation import harness

    loaded = gem_backend.load_gem_model(str(GOLDEN / "config.json"), str(GOLDEN / "weights.safetensors"),
                                        device="cpu", precision="fp32")
    made = {}
    for case_id, case in CASES.items():
        p = case["protocol"]
        protocol = harness.Protocol("corrclip", resize=p["resize"], size=p["size"], max_long_side=p["max_long_side"],
                                    crop=p["crop"], stride=p["stride"], templates=tuple(p["templates"]),
                                    logit_scale=p["logit_scale"], prob_thd=p["prob_thd"])
        made[case_id] = harness.Segmenter(loaded, protocol, method="corrclip", method_options={
            "dino_model": str(GOLDEN / "dino_config.json"), "dino_pretrained": str(GOLDEN / "dino_weights.safetensors")})
    return made


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_image_matches_the_official_protocol(segmenters, case_id):
    from gem_backend.evaluation import harness

    case = CASES[case_id]
    data = np.load(GOLDEN / case["reference"])
    seg = segmenters[case_id]
    p = case["protocol"]
    assert _max_diff(seg.encode(case["queries"]), data["text_embeddings"]) < 1e-5
    image = np.array(Image.open(GOLDEN / case["image"]).convert("RGB"))
    inst = data["instance_map"]
    text = torch.from_numpy(data["text_embeddings"])
    logits = seg.logits(image, text, regions=inst)
    error = _max_diff(logits, data["seg_logits_raw"])
    assert logits.shape == data["seg_logits_raw"].shape and error < TOL
    query_class = torch.tensor(case["query_class"])
    args = (query_class, case["num_classes"], p["logit_scale"])
    decide = lambda lg: harness.decide(lg, *args, prob_thd=p["prob_thd"], background=0).cpu().numpy()  # noqa: E731
    # the decision and the vote on the golden arrays: exact
    np.testing.assert_array_equal(decide(torch.from_numpy(data["seg_logits_raw"])), data["seg_pred_pre_vote"])
    np.testing.assert_array_equal(gem_backend.vote_regions(data["seg_pred_pre_vote"], inst), data["seg_pred"])
    # on our logits: equal wherever the golden margin exceeds our error
    robust = _pixel_margins(data["seg_logits_raw"], case["query_class"], case["num_classes"], p["logit_scale"],
                            p["prob_thd"]) > error
    pred = decide(logits)
    assert robust.mean() > 0.95
    np.testing.assert_array_equal(pred[robust], data["seg_pred_pre_vote"][robust])
    voted = gem_backend.vote_regions(pred, inst)
    in_voted = inst != inst.min()  # every voted region's lead survives errors up to 1e-3 (README)
    keep = robust | in_voted
    np.testing.assert_array_equal(voted[keep], data["seg_pred"][keep])


def test_image_without_regions_is_the_all_zero_map(segmenters):
    case = CASES["i3"]
    data = np.load(GOLDEN / case["reference"])
    image = np.array(Image.open(GOLDEN / case["image"]).convert("RGB"))
    text = torch.from_numpy(data["text_embeddings"])
    seg = segmenters["i3"]
    none = seg.logits(image, text, regions=None)
    assert torch.equal(none, seg.logits(image, text, regions=np.zeros(image.shape[:2], dtype=np.int64)))
    assert _max_diff(none, data["seg_logits_raw"]) < TOL


def test_windows_padded_to_the_clip_patch_fail_the_goldens(segmenters, monkeypatch):
    # the official pads to 56, not to the patch: i2's 264 x 304 window becomes 272 x 304, not 280 x 336
    case = CASES["i2"]
    data = np.load(GOLDEN / case["reference"])
    seg = segmenters["i2"]
    image = np.array(Image.open(GOLDEN / case["image"]).convert("RGB"))
    text = torch.from_numpy(data["text_embeddings"])
    monkeypatch.setattr(CorrCLIP, "window_multiple", 16)
    assert _max_diff(seg.logits(image, text, regions=data["instance_map"]), data["seg_logits_raw"]) > 1e-2


def test_serving_predictor_runs_corrclip_on_the_dino_grid(clip):
    # serving has no regions: CorrCLIP's DINO-only mode, tokens on the DINO grid (patch 8)
    from gem_backend.algorithm.segmentation import GEMPredictor, SegmentationSettings

    loaded = gem_backend.load_gem_model(str(GOLDEN / "config.json"), str(GOLDEN / "weights.safetensors"),
                                        device="cpu", precision="fp32")
    options = check_method_options("corrclip", {"dino_model": str(GOLDEN / "dino_config.json"),
                                                "dino_pretrained": str(GOLDEN / "dino_weights.safetensors")})
    predictor = GEMPredictor(loaded, SegmentationSettings(method="corrclip", method_options=tuple(sorted(options.items()))))
    image = np.array(Image.open(GOLDEN / "image_3.png").convert("RGB"))
    seg = predictor.segment(image, ["cat", "boat"])
    h_in, w_in = predictor.embedding.input_size
    assert predictor.embedding.grid == (h_in // 8, w_in // 8)
    assert seg.label_map.shape == image.shape[:2]
