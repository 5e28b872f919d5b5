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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEM", "UnsupportedModelError", "check_supported", "DEFAULT_TEMPLATES", "resample_pos_embed"]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


class UnsupportedModelError(TypeError):
    """The CLIP model's image tower is not a ViT with standard attention that GEM can wrap."""


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                       new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample learnt positional embeddings to another token grid (CLS kept as is).

    Args:
        pos_embed: ``[1 + h0*w0, width]``, CLS first, patches row-major.
        old_grid: ``(h0, w0)`` of ``pos_embed``.
        new_grid: ``(h, w)`` wanted.
    Returns:
        ``[1 + h*w, width]`` in the dtype of ``pos_embed``. Bicubic with antialias, as the
        reference (timm's ``resample_abs_pos_embed``); computed in float32 because bicubic
        interpolation is not implemented for bfloat16/float16 on every device.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    width = pos_embed.shape[-1]
    grid = patch_pos.float().reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(-1, width).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def check_supported(clip_model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless GEM can wrap ``clip_model``'s image tower."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(clip_model, "visual", None)
    name = type(visual).__name__ if visual is not None else "none"
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"GEM needs an open_clip ViT image tower (open_clip.transformer.VisionTransformer); "
            f"this model's image tower is {name} (ResNet, timm and SigLIP towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            "GEM needs a ViT whose image embedding is its CLS token; this tower pools with an "
            "attentional pooler (CoCa/SigLIP-style), which GEM was not defined for")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(
            f"GEM needs a ViT with CLS-token pooling; this tower uses pool_type={visual.pool_type!r}")
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise UnsupportedModelError(
                f"GEM needs standard attention blocks; block {i} is {type(block).__name__} "
                "(custom blocks with qk-norm, scaled-cosine or scaled heads are not supported)")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            raise UnsupportedModelError(f"block {i} has no packed, biased q/k/v projection")


class GEM(nn.Module):
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
    """

    def __init__(self, clip_model: nn.Module, depth: int = 7, ss_attn_iter: int = 1,
                 ss_attn_temp: float | None = None, tokenizer=None):
        super().__init__()
        check_supported(clip_model)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if ss_attn_iter < 0:
            raise ValueError(f"ss_attn_iter must be >= 0, got {ss_attn_iter}")
        self.model = clip_model
        self.visual = clip_model.visual
        self.depth = int(depth)
        self.ss_attn_iter = int(ss_attn_iter)
        self.ss_attn_temp = None if ss_attn_temp is None else float(ss_attn_temp)
        blocks = self.visual.transformer.resblocks
        self.first_gem_block = max(len(blocks) - (self.depth - 1), 0)
        if tokenizer is None:
            import open_clip

            tokenizer = open_clip.SimpleTokenizer(context_length=getattr(clip_model, "context_length", 77))
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ properties
    @property
    def patch_size(self) -> tuple[int, int]:
        """``(P_h, P_w)`` of the image tower."""
        p = self.visual.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def embed_dim(self) -> int:
        """``D``, the size of image and text embeddings."""
        proj = self.visual.proj
        return proj.shape[1] if proj is not None else self.visual.conv1.out_channels

    # ------------------------------------------------------------------ image tower
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        visual = self.visual
        return resample_pos_embed(visual.positional_embedding, tuple(visual.grid_size), grid)

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

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tower with GEM.

        Args:
            images: ``[B, 3, H, W]``, normalised with the model's mean/std; H and W
                multiples of the patch size (extra pixels are ignored by the patch conv).
        Returns:
            ``(feat_gem, feat_ori)``, each ``[B, 1+N, D]`` after ``ln_post`` and the
            projection, CLS first then patches row-major; not L2-normalised.
        """
        visual = self.visual
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = visual.conv1(images.to(device=self.device, dtype=self.dtype))  # [B, width, h, w]
        bsz, width, gh, gw = x.shape
        x = x.reshape(bsz, width, gh * gw).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, width).expand(bsz, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed((gh, gw)).to(x.dtype)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(x)

        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        for block in blocks[: self.first_gem_block]:
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        x_gem = x
        for block in blocks[self.first_gem_block:]:
            x, x_gem = self._gem_block(block, x, x_gem)
        return self._project(x_gem), self._project(x)

    # ------------------------------------------------------------------ text tower
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[C, L]`` token ids on the model's device."""
        return self.tokenizer(list(prompts)).to(self.device)

    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Text tower on literal prompts: ``[C, D]``, L2-normalised, model dtype.

        At most ``batch_size`` prompts go through the tower at once, so 1000 labels x 80
        templates stay within memory.
        """
        prompts = list(prompts)
        out = [F.normalize(self._text_tower(self.tokenize(prompts[i:i + batch_size])), dim=-1)
               for i in range(0, len(prompts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device, dtype=self.dtype)

    def _text_tower(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text`` on ``[C, L]`` tokens, over the used context only.

        CLIP's text tower is causal and pools the end-of-text token (the largest id), so
        the padding after the longest prompt's end never reaches a pooled token: cutting
        the context there gives the same embeddings at a fraction of the cost (prompts
        are ~10 of 77 tokens). Other text towers go through ``encode_text`` unchanged.
        """
        m = self.model
        if (getattr(m, "text_pool_type", None) != "argmax" or getattr(m, "attn_mask", None) is None
                or not hasattr(m, "token_embedding") or not hasattr(m, "ln_final")):
            return m.encode_text(tokens)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens[:, :length]).to(cast_dtype)
        x = x + m.positional_embedding[:length].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, labels: Sequence[str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """Text embeddings of labels through prompt templates.

        Args:
            labels: ``C`` class names.
            templates: format strings with one ``{}``. With several, the usual CLIP
                ensemble: mean of the per-template normalised embeddings, normalised again.
        Returns:
            ``[C, D]``, L2-normalised.
        """
        labels = list(labels)
        templates = list(templates)
        if not labels:
            return torch.empty(0, self.embed_dim, device=self.device, dtype=self.dtype)
        if not templates:
            raise ValueError("at least one prompt template is needed")
        # all (template, label) pairs through the tower in batches: [T*C, D] -> [T, C, D]
        prompts = [t.format(label) for t in templates for label in labels]
        emb = self.encode_prompts(prompts).reshape(len(templates), len(labels), -1)
        if len(templates) == 1:
            return emb[0]
        return F.normalize(emb.mean(dim=0), dim=-1)

    # ------------------------------------------------------------------ maps
    def patch_similarity(self, feat: torch.Tensor, text_embeddings: torch.Tensor,
                         grid: tuple[int, int]) -> torch.Tensor:
        """Cosine similarity of patch tokens with text embeddings on the token grid.

        Args:
            feat: ``[B, 1+N, D]`` image tokens (CLS first), not necessarily normalised.
            text_embeddings: ``[C, D]``, L2-normalised.
            grid: ``(h, w)`` with ``h * w = N``.
        Returns:
            ``[B, C, h, w]``.
        """
        patches = F.normalize(feat[:, 1:], dim=-1)
        sim = patches @ text_embeddings.to(patches.dtype).t()  # [B, N, C]
        bsz, n, c = sim.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"{n} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        return sim.permute(0, 2, 1).reshape(bsz, c, grid[0], grid[1])

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an ``H x W`` input."""
        ph, pw = self.patch_size
        return height // ph, width // pw

    def similarity_maps(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Raw GEM localisation maps.

        Args:
            images: ``[B, 3, H, W]``, normalised.
            text_embeddings: ``[C, D]``, L2-normalised (from ``encode_text``).
        Returns:
            ``[B, C, H, W]``: cosine similarity of each GEM patch token with each text
            embedding, bilinearly upsampled (align_corners=False) to the input size.
            No per-label min-max normalisation (that would hide absent labels).
        """
        feat_gem, _ = self.encode_image(images)
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        maps = self.patch_similarity(feat_gem, text_embeddings, grid)
        return F.interpolate(maps, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`similarity_maps`."""
        return self.similarity_maps(images, text_embeddings)

