"""What every dense (per-patch) CLIP method shares: the text tower, the maps, the checks.

A dense method turns an image into per-patch tokens that live in CLIP's joint image/text
space, so that the cosine similarity of a patch token with a text embedding says where a
label is. GEM (``gem``) and its training-free successors (``methods``) differ only in how
they run the image tower; the text tower, the similarity maps and the model checks are
the same, and live here once, in :class:`DenseCLIP`.

Shapes: ``B`` images, ``H x W`` input pixels, patch ``P``, grid ``h x w = H/P x W/P``,
``N = h * w`` patches, ``width`` the image tower's width, ``D`` the joint embedding size,
``C`` labels or prompts, ``L`` the text context length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseCLIP", "CLIPMethod", "UnsupportedModelError", "MethodError", "check_supported", "DEFAULT_TEMPLATES",
           "resample_pos_embed", "interpolate_pos_encoding"]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


class UnsupportedModelError(TypeError):
    """The CLIP model's image tower is not a ViT with standard attention that the method can wrap."""


class MethodError(ValueError):
    """Unknown method, unknown option or invalid option value; the message lists the valid ones.

    Defined here, below the factory (:mod:`.methods`), so that a method can raise it for
    options that depend on the model (e.g. a block index beyond the tower's depth).
    """


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                       new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample learnt positional embeddings to another token grid (CLS kept as is).

    This is GEM's resize (and plain CLIP's here); SCLIP, ClearCLIP and NACLIP use their
    own (:func:`interpolate_pos_encoding`).

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


def interpolate_pos_encoding(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                             new_grid: tuple[int, int], always: bool = False) -> torch.Tensor:
    """The positional-embedding resize of the SCLIP, ClearCLIP and NACLIP repositories.

    Bicubic (A = -0.75, no antialias) with ``scale_factor = (g + 0.1) / g0`` used as given,
    so the source coordinate of output index ``i`` is ``(i + 0.5) * g0 / (g + 0.1) - 0.5``:
    not the same sampling as a resize to ``size=g`` (GEM's, open_clip's).

    Args:
        pos_embed: ``[1 + h0*w0, width]``, CLS first, patches row-major.
        old_grid: ``(h0, w0)`` of ``pos_embed``.
        new_grid: ``(h, w)`` wanted.
        always: resample even at the native grid (DINO v1 does for a non-square input with
            the native token count; the ``+ 0.1`` scale then moves the values slightly).
    Returns:
        ``[1 + h*w, width]`` in the dtype of ``pos_embed`` (computed in float32: bicubic is
        not implemented for half types everywhere); ``pos_embed`` itself at the native grid.
        (The repositories test the token count only, so a non-square grid with the native
        count would not be resized there; here it is, since its layout differs.)
    """
    (h0, w0), (h, w) = tuple(old_grid), tuple(new_grid)
    if (h, w) == (h0, w0) and not always:
        return pos_embed
    width = pos_embed.shape[-1]
    grid = pos_embed[1:].float().reshape(1, h0, w0, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic",
                         align_corners=False)
    if tuple(grid.shape[-2:]) != (h, w):  # floor(g0 * (g + 0.1) / g0) == g; guard the rounding
        raise AssertionError(f"positional grid resized to {tuple(grid.shape[-2:])}, wanted {(h, w)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, width).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patch_pos], dim=0)


def check_supported(clip_model: nn.Module, method: str = "GEM") -> None:
    """Raise :class:`UnsupportedModelError` unless ``method`` can wrap ``clip_model``'s image tower.

    All the methods here read the packed q/k/v projection of standard attention blocks
    and take the CLS token as the image embedding, so they support the same towers.
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(clip_model, "visual", None)
    name = type(visual).__name__ if visual is not None else "none"
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"{method} needs an open_clip ViT image tower (open_clip.transformer.VisionTransformer); "
            f"this model's image tower is {name} (ResNet, timm and SigLIP towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"{method} needs a ViT whose image embedding is its CLS token; this tower pools with an "
            f"attentional pooler (CoCa/SigLIP-style), which {method} was not defined for")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(
            f"{method} needs a ViT with CLS-token pooling; this tower uses pool_type={visual.pool_type!r}")
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise UnsupportedModelError(
                f"{method} needs standard attention blocks; block {i} is {type(block).__name__} "
                "(custom blocks with qk-norm, scaled-cosine or scaled heads are not supported)")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            raise UnsupportedModelError(f"block {i} has no packed, biased q/k/v projection")


class DenseCLIP(nn.Module):
    """Base of the dense methods around an open_clip CLIP with a ViT image tower.

    The wrapped model is used as it is, not modified: a method runs its own pass over the
    tower's modules (:meth:`encode_image`, defined by each subclass). Computation happens
    in the dtype and on the device of the model.

    Args:
        clip_model: an ``open_clip.CLIP`` (or ``CustomTextCLIP``) in eval mode, with a
            ``VisionTransformer`` image tower of standard ``ResidualAttentionBlock``s.
        tokenizer: callable ``list[str] -> LongTensor [C, L]``; default open_clip's
            tokenizer with the model's context length.
        method: the method's name, for error messages.
    Raises:
        UnsupportedModelError: for towers the methods are not defined on.
    """

    def __init__(self, clip_model: nn.Module, tokenizer=None, method: str = "GEM", options: dict | None = None):
        super().__init__()
        check_supported(clip_model, method)
        self.options = dict(options or {})  # the method's full options (the factory completes them)
        self.model = clip_model
        self.visual = clip_model.visual
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

    # ------------------------------------------------------------------ image tower pieces
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1 + h*w, width]`` positional embeddings for a token grid (GEM's resize here)."""
        visual = self.visual
        return resample_pos_embed(visual.positional_embedding, tuple(visual.grid_size), grid)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS, positional embeddings, ``ln_pre``.

        Args:
            images: ``[B, 3, H, W]``, normalised with the model's mean/std; H and W
                multiples of the patch size (extra pixels are ignored by the patch conv).
        Returns:
            ``[B, 1+N, width]``, the input of the first block.
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
        return visual.ln_pre(x)

    @property
    def _blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def _run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        """Unmodified open_clip blocks on ``x [B, T, width]`` (batch-first or not)."""
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        for block in blocks:
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        return x

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` and the projection of every token: ``[B, T, width] -> [B, T, D]``."""
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def encode_image(self, images: torch.Tensor):
        """The method's image tower; see the subclasses."""
        raise NotImplementedError

    def _dense_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1+N, D]``: the tokens :meth:`similarity_maps` compares with the text."""
        return self.encode_image(images)

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
        """``model.encode_text`` on ``[C, L]`` tokens, over the used context only: ``[C, D]``.

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
        """Raw localisation maps.

        Args:
            images: ``[B, 3, H, W]``, normalised.
            text_embeddings: ``[C, D]``, L2-normalised (from ``encode_text``).
        Returns:
            ``[B, C, H, W]``: cosine similarity of each dense patch token with each text
            embedding, bilinearly upsampled (align_corners=False) to the input size.
            No per-label min-max normalisation (that would hide absent labels).
        """
        tokens = self._dense_tokens(images)
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        maps = self.patch_similarity(tokens, text_embeddings, grid)
        return F.interpolate(maps, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`similarity_maps`."""
        return self.similarity_maps(images, text_embeddings)


class CLIPMethod(DenseCLIP):
    """Plain CLIP patch tokens: the unmodified tower, GEM's positional resize.

    Its tokens are GEM's ``feat_ori``; a baseline (CLIP's patch tokens localise poorly).
    """

    name = "clip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, tokenizer, method=self.name, options=options)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1+N, D]`` after ``ln_post`` and the projection, not normalised."""
        return self._project(self._run_blocks(self._blocks, self._embed(images)))
