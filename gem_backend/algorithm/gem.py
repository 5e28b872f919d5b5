"""GEM, the Grounding Everything Module (Bousselham et al., CVPR 2024), on an open_clip CLIP.

The algorithm alone: tensors in, tensors out; no file, network or Label Studio code.

GEM keeps the CLIP image tower as it is (the *original* path) and adds, in its last
``depth - 1`` transformer blocks, a second *self-self attention* path. For each head and
each of ``s`` in (v, k, q), with ``t`` an inverse temperature::

    repeat ss_attn_iter times:  s = l2norm(s);  s = softmax(s @ s.T * t) @ s
    s = l2norm(s);  out_s = softmax(s @ s.T * t) @ v            # v: the raw values
    gem_out = out_proj(mean(out_v, out_k, out_q))

Both paths read ``ln_1`` of the original residual stream. The GEM stream starts as the
residual stream entering the first modified block and adds ``ls_1(gem_out)`` per modified
block, without MLP. ``t`` defaults to ``mean_tokens(||ln_1(x)||_2) * head_dim**-0.5`` per
image. Both streams end with ``ln_post`` and the projection. The patch tokens of the GEM
stream align with the text embeddings, so their cosine similarity is a localisation map.

Shapes: ``B`` images, ``H x W`` input pixels, patch ``P``, grid ``h x w = H/P x W/P``,
``N = h * w`` patches, ``D`` the joint embedding size, ``C`` labels.

This reproduces the official ``gem-torch`` 1.0.1 on its own open_clip (2.23) to float32
precision (``tests/test_gem_fidelity.py`` checks it against ``shared/golden/gem-reference``),
but runs on current open_clip 3.x with batch-first blocks and without leaking between
images of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DEFAULT_TEMPLATES, DenseCLIP, UnsupportedModelError, check_supported, resample_pos_embed

__all__ = ["GEM", "GEMMethod", "UnsupportedModelError", "check_supported", "DEFAULT_TEMPLATES", "resample_pos_embed"]


class GEM(DenseCLIP):
    """GEM around an open_clip CLIP model with a ViT image tower.

    The wrapped model is used as it is, not modified: GEM runs its own pass over the
    tower's modules. Computation happens in the dtype and on the device of the model.

    Args:
        clip_model: an ``open_clip.CLIP`` (or ``CustomTextCLIP``) in eval mode, with a
            ``VisionTransformer`` image tower of standard ``ResidualAttentionBlock``s.
        depth: GEM modifies the last ``depth - 1`` blocks (all of them if fewer).
        ss_attn_iter: iterations of self-self attention before the assignment to v.
        ss_attn_temp: fixed inverse temperature ``t``; ``None`` for the adaptive one.
        tokenizer: callable ``list[str] -> LongTensor [C, L]``; default open_clip's
            tokenizer with the model's context length.
    Raises:
        UnsupportedModelError: for towers GEM is not defined on.

    The text tower, :meth:`patch_similarity`, :meth:`grid_for` and :meth:`similarity_maps`
    (on the GEM tokens) come from :class:`~gem_backend.algorithm.dense.DenseCLIP`.
    """

    def __init__(self, clip_model: nn.Module, depth: int = 7, ss_attn_iter: int = 1,
                 ss_attn_temp: float | None = None, tokenizer=None):
        super().__init__(clip_model, tokenizer, method="GEM")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if ss_attn_iter < 0:
            raise ValueError(f"ss_attn_iter must be >= 0, got {ss_attn_iter}")
        self.depth = int(depth)
        self.ss_attn_iter = int(ss_attn_iter)
        self.ss_attn_temp = None if ss_attn_temp is None else float(ss_attn_temp)
        self.first_gem_block = max(len(self._blocks) - (self.depth - 1), 0)

    # ------------------------------------------------------------------ image tower
    def _gem_block(self, block: nn.Module, x_ori: torch.Tensor, x_gem: torch.Tensor):
        """One modified block. ``x_ori``, ``x_gem``: ``[B, T, width]``, T = 1 + N."""
        attn: nn.MultiheadAttention = block.attn
        heads = attn.num_heads
        bsz, tokens, width = x_ori.shape
        head_dim = width // heads
        scale = head_dim ** -0.5

        x = block.ln_1(x_ori)
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        # [3, B, heads, T, head_dim]: q, k, v
        qkv = qkv.reshape(bsz, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        # Original path: ordinary CLIP attention, sharing the projection with GEM's path.
        out = F.scaled_dot_product_attention(q, k, v)
        out = F.linear(out.transpose(1, 2).reshape(bsz, tokens, width),
                       attn.out_proj.weight, attn.out_proj.bias)
        x_ori = x_ori + block.ls_1(out)
        x_ori = x_ori + block.ls_2(block.mlp(block.ln_2(x_ori)))

        # GEM path: v, k and q each go through self-self attention together, as a batch of
        # 3*B: [3*B, heads, T, head_dim]. softmax(s s^T t) @ s is attention with query s*t, so
        # it runs as fused scaled-dot-product attention (no T x T matrix in memory).
        if self.ss_attn_temp is None:
            # per-image adaptive inverse temperature, [3*B, 1, 1, 1]
            inv_temp = (x.norm(dim=-1).mean(dim=-1) * scale).repeat(3).reshape(3 * bsz, 1, 1, 1)
        else:
            inv_temp = self.ss_attn_temp
        s = torch.stack((v, k, q)).reshape(3 * bsz, heads, tokens, head_dim)
        for _ in range(self.ss_attn_iter):
            s = F.normalize(s, dim=-1)
            s = F.scaled_dot_product_attention(s * inv_temp, s, s, scale=1.0)
        s = F.normalize(s, dim=-1)
        values = v.unsqueeze(0).expand(3, -1, -1, -1, -1).reshape(3 * bsz, heads, tokens, head_dim)
        gem = F.scaled_dot_product_attention(s * inv_temp, s, values, scale=1.0)
        gem = gem.reshape(3, bsz, heads, tokens, head_dim).mean(dim=0)
        gem = gem.transpose(1, 2).reshape(bsz, tokens, width)
        gem = F.linear(gem, attn.out_proj.weight, attn.out_proj.bias)
        x_gem = x_gem + block.ls_1(gem)
        return x_ori, x_gem

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(feat_gem, feat_ori)``, each ``[B, 1+N, D]``; see :meth:`encode_image`."""
        x = self._embed(images)  # [B, 1+N, width]
        blocks = self._blocks
        x = self._run_blocks(blocks[: self.first_gem_block], x)
        x_gem = x
        for block in blocks[self.first_gem_block:]:
            x, x_gem = self._gem_block(block, x, x_gem)
        return self._project(x_gem), self._project(x)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tower with GEM.

        Args:
            images: ``[B, 3, H, W]``, normalised with the model's mean/std; H and W
                multiples of the patch size (extra pixels are ignored by the patch conv).
        Returns:
            ``(feat_gem, feat_ori)``, each ``[B, 1+N, D]`` after ``ln_post`` and the
            projection, CLS first then patches row-major; not L2-normalised.
        """
        return self._encode(images)

    def _dense_tokens(self, images: torch.Tensor) -> torch.Tensor:
        # the maps are GEM's: the patch tokens of the GEM stream
        return self._encode(images)[0]


class GEMMethod(GEM):
    """GEM as a method: :meth:`encode_image` returns the GEM tokens only, ``[B, 1+N, D]``.

    Its :meth:`similarity_maps` are :class:`~gem_backend.algorithm.gem.GEM`'s.
    """

    name = "gem"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, tokenizer=tokenizer, **options)
        self.options = dict(options)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``feat_gem`` ``[B, 1+N, D]``, not normalised."""
        return self._encode(images)[0]
