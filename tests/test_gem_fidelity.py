"""GEM fidelity: the official package's outputs (golden files) and an independent port.

The golden files were made by gem-torch 1.0.1 on open_clip 2.23 (see ../shared/golden);
the contract is 1e-4 absolute in float32 on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gem_backend.algorithm.gem import GEM, UnsupportedModelError
from helpers import GOLDEN, golden_model, shared_path, tiny_clip

TOL = 1e-4
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _cases():
    return json.loads((GOLDEN / "cases.json").read_text())["cases"]


def _golden_input(name: str) -> torch.Tensor:
    pixels = np.asarray(Image.open(shared_path("golden", "gem-reference", name)).convert("RGB"), dtype=np.float64)
    x = ((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
    return torch.tensor(x, dtype=torch.float32)


@pytest.fixture(scope="module")
def model():
    shared_path("golden", "gem-reference", "weights.safetensors")
    return golden_model()


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["reference"])
def test_matches_reference_package(model, case):
    ref = np.load(shared_path("golden", "gem-reference", case["reference"]))
    x = _golden_input(case["image"])
    assert tuple(x.shape[-2:]) == (case["height"], case["width"])
    gem = GEM(model, depth=case["depth"], ss_attn_iter=case["ss_attn_iter"], ss_attn_temp=case["ss_attn_temp"])
    with torch.no_grad():
        feat_gem, feat_ori = gem.encode_image(x)
        text = gem.encode_text(case["labels"], [case["prompt_template"]])
        maps = gem.similarity_maps(x, text)
    ours = dict(feat_gem=feat_gem, feat_ori=feat_ori, text_embeddings=text, heatmaps_raw=maps)
    for key, value in ours.items():
        assert value.shape == ref[key].shape, key
        err = np.abs(value.numpy() - ref[key]).max()
        assert err < TOL, f"{key}: max abs error {err:.2e} >= {TOL}"


def test_batch_gives_each_image_its_own_result(model):
    """The official package leaks between images of a batch on open_clip >= 2.26; we must not."""
    a = _golden_input("image_0.png")
    b = torch.flip(a, dims=[-1]) * 0.7
    gem = GEM(model)
    text = gem.encode_text(["cat", "dog"])
    with torch.no_grad():
        both = gem.similarity_maps(torch.cat([a, b]), text)
        alone_a = gem.similarity_maps(a, text)
        alone_b = gem.similarity_maps(b, text)
    assert torch.allclose(both[0], alone_a[0], atol=1e-5)
    assert torch.allclose(both[1], alone_b[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)


# --------------------------------------------------------------------------------------
# An independent, deliberately plain port of the reference code: sequence-first tensors,
# the block's own nn.MultiheadAttention for the original path, one head at a time for GEM.
# It checks what the golden files cannot: other widths, heads, patch sizes, layer scale.

def _naive_gem(model, x, depth, ss_attn_iter, ss_attn_temp):
    visual = model.visual
    tokens = visual.conv1(x)
    bsz, width, gh, gw = tokens.shape
    tokens = tokens.reshape(bsz, width, -1).permute(0, 2, 1)
    tokens = torch.cat([visual.class_embedding.expand(bsz, 1, width), tokens], dim=1)
    pos = visual.positional_embedding
    old = visual.grid_size
    if (gh, gw) != tuple(old):
        grid = pos[1:].reshape(1, old[0], old[1], width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, width)])
    h = visual.ln_pre(tokens + pos)
    blocks = list(visual.transformer.resblocks)
    n_mod = min(depth - 1, len(blocks))
    for block in blocks[: len(blocks) - n_mod]:
        h = block(h)
    h_gem = h
    for block in blocks[len(blocks) - n_mod:]:
        mha = block.attn
        y = block.ln_1(h)
        out_ori = mha(y, y, y, need_weights=False)[0]
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        heads = mha.num_heads
        hd = width // heads
        per_image = []
        for i in range(bsz):
            yi = y[i]
            t = (yi.norm(dim=-1).mean() * hd ** -0.5) if ss_attn_temp is None else ss_attn_temp
            head_outs = []
            for head in range(heads):
                sl = slice(head * hd, (head + 1) * hd)
                q = yi @ w_q[sl].t() + b_q[sl]
                k = yi @ w_k[sl].t() + b_k[sl]
                v = yi @ w_v[sl].t() + b_v[sl]
                outs = []
                for s in (v, k, q):
                    for _ in range(ss_attn_iter):
                        s = F.normalize(s, dim=-1)
                        s = torch.softmax(s @ s.t() * t, dim=-1) @ s
                    s = F.normalize(s, dim=-1)
                    outs.append(torch.softmax(s @ s.t() * t, dim=-1) @ v)
                head_outs.append(sum(outs) / 3)
            per_image.append(mha.out_proj(torch.cat(head_outs, dim=-1)))
        h_gem = h_gem + block.ls_1(torch.stack(per_image))
        h = h + block.ls_1(out_ori)
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
    proj = lambda z: visual.ln_post(z) @ visual.proj  # noqa: E731
    return proj(h_gem), proj(h)


@pytest.mark.parametrize("cfg,size,settings", [
    (dict(width=96, heads=3, layers=5, patch=16, image_size=64), (64, 64), (7, 1, None)),
    (dict(width=64, heads=4, layers=6, patch=8, image_size=64, ls_init_value=0.5), (48, 80), (4, 2, None)),
    (dict(width=64, heads=2, layers=3, patch=14, image_size=56, quick_gelu=True), (84, 56), (3, 0, 0.3)),
    (dict(width=128, heads=4, layers=4, patch=16, image_size=64), (96, 128), (12, 3, 1.5)),
])
def test_matches_independent_port(cfg, size, settings):
    depth, iters, temp = settings
    model = tiny_clip(seed=sum(size), **cfg)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    gem = GEM(model, depth=depth, ss_attn_iter=iters, ss_attn_temp=temp)
    with torch.no_grad():
        ours = gem.encode_image(x)
        theirs = _naive_gem(model, x, depth, iters, temp)
    for a, b, name in zip(ours, theirs, ("gem", "ori")):
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"{name}: {err:.2e}"
    # the GEM path must differ from plain CLIP, or the test proves nothing
    assert (ours[0] - ours[1]).abs().max() > 1e-2


def test_original_path_is_plain_clip(model):
    x = _golden_input("image_0.png")
    with torch.no_grad():
        _, feat_ori = GEM(model).encode_image(x)
        pooled = model.encode_image(x)
    assert torch.allclose(feat_ori[:, 0], pooled, atol=1e-5)


def test_text_ensemble_is_normalised_mean(model):
    gem = GEM(model)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    with torch.no_grad():
        ens = gem.encode_text(["cat", "dog"], templates)
        per = torch.stack([gem.encode_text(["cat", "dog"], [t]) for t in templates])
    expected = F.normalize(per.mean(0), dim=-1)
    assert torch.allclose(ens, expected, atol=1e-6)
    assert torch.allclose(ens.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_unsupported_towers_fail_at_construction():
    from open_clip.model import CLIP

    resnet = CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    with pytest.raises(UnsupportedModelError, match="ViT image tower"):
        GEM(resnet)
    qknorm = CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=16, qk_norm=True),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    with pytest.raises(UnsupportedModelError, match="standard attention"):
        GEM(qknorm)
    pooled = CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=16, attentional_pool=True),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    with pytest.raises(UnsupportedModelError, match="attentional pooler"):
        GEM(pooled)


def test_computes_in_model_dtype():
    model = tiny_clip().to(torch.bfloat16)
    gem = GEM(model)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feat_gem, _ = gem.encode_image(x)
        maps = gem.similarity_maps(x, gem.encode_text(["a"]))
    assert feat_gem.dtype == torch.bfloat16
    assert maps.shape == (1, 1, 96, 64)


def test_bfloat16_features_match_float32(model):
    """bf16 weights (chosen automatically on CPUs with native bf16): GEM patch features
    keep a mean cosine similarity >= 0.999 to float32, at a resampled (non-native) size."""
    import copy

    x = _golden_input("image_2.png")  # 224x320: positional embeddings resampled (in float32)
    with torch.no_grad():
        f32, _ = GEM(model).encode_image(x)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        b16, _ = GEM(bf16_model).encode_image(x)
    assert b16.dtype == torch.bfloat16
    cos = F.cosine_similarity(f32[0, 1:], b16[0, 1:].float(), dim=-1)
    assert cos.mean().item() >= 0.999, cos.mean().item()
