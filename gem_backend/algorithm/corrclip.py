"""CorrCLIP v1 (Zhang et al., CVPR 2025): CLIP's last block with DINO's affinity, scoped by regions.

It reproduces the official code (``shared/golden/corrclip-reference``, 1e-4 in float32 on CPU,
region maps exactly; checked by ``tests/test_corrclip.py``). For one window ``x`` and its
region ids ``M`` (e.g. SAM 2 masks painted by :func:`~gem_backend.algorithm.regions.paint_regions`):

1. DINO (:mod:`.dino`) on ``x`` re-normalised to ImageNet statistics: ``f`` = q + k of its last
   block, L2-normalised; ``S = f f^T`` on the DINO grid.
2. Regions on the DINO grid; with more than two ids, regions whose mean DINO features are
   close (DBSCAN, eps 0.2, min_samples 1 = connected components) are merged.
3. The smallest id ``U`` is "unsegmented" (0, or the smallest real id of a fully covered
   window: an official quirk, kept). ``A = softmax(4 S)`` over the pairs in one region other
   than ``U``, or touching ``U`` with ``S > mean(S)``.
4. CLIP with one extra CLS copy per region (each attending to the CLS and its region's
   patches, in every block). Main branch: the last block's input; spatial branch: the mean
   of the outputs of blocks ``L-1-NS .. L-2``. Each gives ``out_proj(A v)`` with ``v`` the
   last block's values resized (bilinear) to the DINO grid. Semantic branch: the region
   tokens after the whole last block, painted back on the DINO grid.
5. Tokens ``= (ln_post(main) + ln_post(spatial) + 0.5 ln_post(semantic)) @ proj``.

Without regions (``regions=None``, the same as an all-zero map) the scope is ``S > mean(S)``.

Shapes: ``B`` images, ``H x W`` pixels (multiples of 56 in the official protocol), DINO grid
``h_d x w_d`` (patch 8: ``H/8 x W/8``), ``N_d = h_d w_d``, CLIP grid ``h_c x w_c``, ``C`` the
DINO width, ``width`` the CLIP width, ``D`` the joint embedding size, ``R`` regions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseCLIP, UnsupportedModelError, interpolate_pos_encoding
from .dino import DINO, DINO_MEAN, DINO_STD, load_dino
from .windows import REGION_PAD, torch_nearest_indices

__all__ = ["CorrCLIP", "merge_regions", "corrclip_scope", "ALPHA", "BETA", "TAU",
           "DBSCAN_EPS"]

ALPHA = 1.0  # weight of the spatial branch
BETA = 0.5  # weight of the semantic branch
TAU = 4.0  # the affinity's temperature: softmax(TAU * S)
DBSCAN_EPS = 0.2
_NUM_SPATIAL = {12: 5, 24: 12, 32: 28}  # official; other depths: L - 4

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def merge_regions(regions: torch.Tensor, features: torch.Tensor,
                  eps: float = DBSCAN_EPS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CorrCLIP's mask merging on the DINO grid.

    Args:
        regions: ``[N_d]`` int64 region ids of the DINO cells.
        features: ``[N_d, C]`` L2-normalised DINO features.
        eps: DBSCAN's radius on the distance ``max(G) - G``, ``G`` the cosines of the regions'
            mean features.
    Returns:
        ``(merged [N_d], labels [K] or None)``: with more than two ids, every id but the
        smallest becomes ``10000 + label``, labels the connected components of
        ``distance <= eps`` (DBSCAN with ``min_samples=1``) numbered in order of their
        lowest id; the smallest id keeps its value. Two ids or fewer: unchanged, None.
    """
    ids, inverse = torch.unique(regions, sorted=True, return_inverse=True)
    if ids.numel() <= 2:
        return regions, None
    sums = torch.zeros(ids.numel(), features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, inverse, features)
    means = F.normalize(sums / torch.bincount(inverse, minlength=ids.numel())[:, None].to(sums.dtype), dim=-1)
    cos = means[1:] @ means[1:].t()  # [K, K]
    near = ((cos.max() - cos) <= eps).cpu().numpy()
    labels = np.full(near.shape[0], -1, dtype=np.int64)
    for start in range(near.shape[0]):  # components, numbered by their lowest member
        if labels[start] >= 0:
            continue
        label, todo = labels.max() + 1, [start]
        labels[start] = label
        while todo:
            for other in np.flatnonzero(near[todo.pop()] & (labels < 0)):
                labels[other] = label
                todo.append(other)
    labels_t = torch.from_numpy(labels).to(regions.device)
    new_ids = torch.cat([ids[:1], REGION_PAD + labels_t])  # the official code's 10000, as the padding's id
    return new_ids[inverse], labels_t


def corrclip_scope(regions: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``[N_d, N_d]`` bool: which DINO cells each cell attends to.

    ``i -> j`` when both lie in one region other than the smallest id ``U`` ("unsegmented"),
    or when either lies in ``U`` and ``sim[i, j] > mean(sim)`` (over all entries).

    Args:
        regions: ``[N_d]`` int64, the merged region ids.
        sim: ``[N_d, N_d]`` cosine similarities of the DINO features.
    """
    unsegmented = regions == regions.min()
    allowed = (regions[:, None] == regions[None, :]) & ~unsegmented[:, None]
    allowed |= (unsegmented[:, None] | unsegmented[None, :]) & (sim > sim.mean())
    return allowed


class CorrCLIP(DenseCLIP):
    """CorrCLIP v1 on an open_clip ViT CLIP and a DINO v1 (see the module docstring).

    Options: ``dino_model`` (a DINO name or config JSON, default ``dino_vitb8``) and
    ``dino_pretrained`` (a weights file; None: the name's hub weights); used when no
    ``dino`` is given.

    Attributes read by the per-image protocol: ``uses_regions`` (``encode_image`` takes a
    region map), ``window_multiple`` (windows are zero-padded to a multiple of 56 and their
    regions with id 10000), :meth:`grid_for` (the DINO grid, the grid of the tokens).
    """

    name = "corrclip"
    uses_regions = True
    window_multiple = 56

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None, dino: DINO | None = None):
        super().__init__(clip_model, tokenizer, method=self.name, options=options)
        depth = len(self._blocks)
        self.num_spatial = _NUM_SPATIAL.get(depth, depth - 4)
        if self.num_spatial < 1:
            raise UnsupportedModelError(f"CorrCLIP's spatial branch needs at least 5 blocks; this tower has {depth}")
        if dino is None:
            dino = load_dino(options.get("dino_model") or "dino_vitb8", options.get("dino_pretrained") or None,
                             device=self.device, precision=self.dtype)
        self.dino = dino
        cfg = getattr(self.visual, "preprocess_cfg", None) or {}
        # CLIP-normalised -> pixels -> ImageNet-normalised, float32 (the padding stays the exact CLIP mean)
        clip_mean = torch.tensor(cfg.get("mean", _OPENAI_MEAN), dtype=torch.float32,
                              device=self.device).reshape(1, 3, 1, 1)
        clip_std = torch.tensor(cfg.get("std", _OPENAI_STD), dtype=torch.float32,
                              device=self.device).reshape(1, 3, 1, 1)
        self.register_buffer("clip_mean", clip_mean, persistent=False)
        self.register_buffer("clip_std", clip_std, persistent=False)
        # on the CLIP's device: the factory does not move a method (it shares the loaded model)
        self.register_buffer("dino_mean", torch.tensor(DINO_MEAN, device=self.device).reshape(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("dino_std", torch.tensor(DINO_STD, device=self.device).reshape(1, 3, 1, 1),
                             persistent=False)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        # the official (vendored open_clip) rule: stored embeddings whenever the count is native
        visual = self.visual
        native = tuple(visual.grid_size)
        if grid[0] * grid[1] == native[0] * native[1]:
            return visual.positional_embedding
        return interpolate_pos_encoding(visual.positional_embedding, native, grid)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The DINO grid ``(h_d, w_d)`` of an ``H x W`` window: the token grid of the output."""
        return self.dino.grid_for(height, width)

    # ------------------------------------------------------------------ one window
    def _blocks_with_mask(self, blocks, x: torch.Tensor, mask: torch.Tensor, keep: range) -> tuple:
        """Run ``blocks`` on ``x [1, T, width]`` with the additive ``mask [T, T]``; returns the
        output and the sum of the outputs of the blocks whose index is in ``keep``."""
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        kept = None
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
            if i in keep:
                kept = x if kept is None else kept + x
        return x, kept

    def _window(self, x: torch.Tensor, regions: torch.Tensor, keep: bool) -> tuple[torch.Tensor, dict]:
        """One window: ``x [1, 3, H, W]``, ``regions [H, W]`` -> ``([1+N_d, D], intermediates)``."""
        height, width = x.shape[-2:]
        dev = self.device
        # 1. DINO features and their similarities, float32
        pixels = x.to(device=dev, dtype=torch.float32) * self.clip_std + self.clip_mean
        feat = self.dino.qk_features((pixels - self.dino_mean) / self.dino_std)[0].to(dev)  # [N_d, C]
        hd, wd = self.dino.grid_for(height, width)
        regions = regions.to(dev)
        cells = regions[torch_nearest_indices(height, hd, dev)][:, torch_nearest_indices(width, wd, dev)]
        # 2. merge, 3. scope and affinity
        merged, labels = merge_regions(cells.reshape(-1), feat)
        sim = feat @ feat.t()  # [N_d, N_d]
        allowed = corrclip_scope(merged, sim)
        attn = None
        if keep:
            attn = torch.softmax((TAU * sim).masked_fill_(~allowed, float("-inf")), dim=-1)
        inter = {"dino_qk": feat, "S": sim, "regions_dino": merged.reshape(hd, wd), "attn": attn} if keep else {}
        del sim
        if labels is not None and keep:
            inter["dbscan_labels"] = labels

        # 4. CLIP with one CLS copy per region
        tokens = self._embed(x)  # [1, 1+N_c, width]
        hc, wc = height // self.patch_size[0], width // self.patch_size[1]  # conv1 floors
        grid_d = merged.reshape(hd, wd)
        clip_regions = grid_d[torch_nearest_indices(hd, hc, dev)][:, torch_nearest_indices(wd, wc, dev)]
        region_ids, clip_inverse = torch.unique(clip_regions.reshape(-1), sorted=True, return_inverse=True)
        n_regions, n_clip = region_ids.numel(), hc * wc
        seq = torch.cat([tokens[:, :1].expand(-1, n_regions, -1), tokens], dim=1)  # [1, R+1+N_c, width]
        size = n_regions + 1 + n_clip
        allow = torch.zeros(size, size, dtype=torch.bool, device=dev)
        allow[n_regions:, n_regions:] = True  # CLS and patches: among themselves
        allow[:n_regions, n_regions] = True  # region tokens: the CLS ...
        allow[:n_regions, n_regions + 1:] = clip_inverse[None, :] == torch.arange(n_regions, device=dev)[:, None]
        mask = torch.zeros(size, size, dtype=self.dtype, device=dev).masked_fill_(~allow, float("-inf"))

        blocks = self._blocks
        depth = len(blocks)
        spatial_blocks = range(depth - 2 - self.num_spatial, depth - 2)  # 1-based L-1-NS .. L-2
        z_main, z_spatial = self._blocks_with_mask(blocks[:-1], seq, mask, spatial_blocks)
        z_spatial = z_spatial / len(spatial_blocks)
        last = blocks[-1]
        w_v = last.attn.in_proj_weight[2 * tokens.shape[-1]:]
        b_v = last.attn.in_proj_bias[2 * tokens.shape[-1]:]

        def branch(z: torch.Tensor) -> torch.Tensor:  # out_proj(A v), v on the DINO grid: [N_d, width]
            v = F.linear(last.ln_1(z[0, n_regions + 1:]), w_v, b_v)  # [N_c, width]
            v = v.t().reshape(1, -1, hc, wc).float()
            v = F.interpolate(v, size=(hd, wd), mode="bilinear", align_corners=False).reshape(-1, hd * wd).t()
            return v

        values = torch.cat([branch(z_main), branch(z_spatial)], dim=-1)  # [N_d, 2 width]
        if attn is not None:
            mixed = attn @ values
        else:  # fused: softmax(TAU f f^T) over the allowed pairs without building A (S is freed)
            mixed = F.scaled_dot_product_attention(feat[None], feat[None], values[None], attn_mask=allowed,
                                                   scale=TAU)[0]
        del allowed
        out_proj = last.attn.out_proj
        o_main, o_spatial = (F.linear(part.to(self.dtype), out_proj.weight, out_proj.bias)
                             for part in mixed.chunk(2, dim=-1))
        # semantic: the region tokens after the whole last block, on the DINO grid
        z_last = self._blocks_with_mask(blocks[-1:], z_main, mask, range(0))[0][0]  # [R+1+N_c, width]
        clip_to_dino = clip_inverse.reshape(hc, wc)[torch_nearest_indices(hc, hd, dev)][
            :, torch_nearest_indices(wc, wd, dev)].reshape(-1)
        o_semantic = z_last[clip_to_dino]  # [N_d, width]
        ln_post = self.visual.ln_post
        x_main, x_spatial, x_semantic = ln_post(o_main), ln_post(o_spatial), ln_post(o_semantic)
        dense = torch.cat([ln_post(z_last[n_regions:n_regions + 1]),  # CLIP's own CLS: plain CLIP's image token
                           x_main + ALPHA * x_spatial + BETA * x_semantic])
        out = dense @ self.visual.proj if self.visual.proj is not None else dense
        if keep:
            inter.update(regions_clip=clip_regions, x_main=x_main, x_spatial=x_spatial, x_semantic=x_semantic)
        return out, inter

    def encode_image(self, images: torch.Tensor, regions: torch.Tensor | None = None,
                     return_intermediates: bool = False):
        """CorrCLIP's dense tokens, one window at a time (the official code defines batches of one).

        Args:
            images: ``[B, 3, H, W]`` windows, normalised with the CLIP's mean/std, H and W
                multiples of the DINO patch (the protocol pads to 56, with 0).
            regions: ``[B, H, W]`` int64 region ids (padding 10000), or None: no regions
                (the same as all zeros: DINO-only scope).
            return_intermediates: also return the official intermediates.
        Returns:
            ``[B, 1+N_d, D]`` after ``ln_post`` and the projection, not normalised: row 0 is
            plain CLIP's image token (the CLS, which never sees the region tokens), rows
            ``1..`` the DINO-grid tokens, row-major. With ``return_intermediates``,
            ``(tokens, dict)``: ``dino_qk`` ``[B, N_d, C]``, ``S`` and ``attn`` ``[B, N_d, N_d]``
            (float32), ``regions_dino`` ``[B, h_d, w_d]`` (merged), ``regions_clip``
            ``[B, h_c, w_c]``, ``x_main``/``x_spatial``/``x_semantic`` ``[B, N_d, width]``
            (after ``ln_post``), ``dbscan_labels`` ``[B, K]`` (only when every window merged,
            with equal K; else a list per window, None where nothing was merged).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        bsz, _, height, width = images.shape
        if regions is None:
            regions = torch.zeros(bsz, height, width, dtype=torch.long)
        regions = torch.as_tensor(regions)
        if regions.shape != (bsz, height, width):
            raise ValueError(f"regions must be [B, H, W] = {(bsz, height, width)}, got {tuple(regions.shape)}")
        regions = regions.long()
        outs, inters = [], []
        with torch.no_grad():
            for b in range(bsz):
                out, inter = self._window(images[b:b + 1], regions[b], return_intermediates)
                outs.append(out)
                inters.append(inter)
        tokens = torch.stack(outs)
        if not return_intermediates:
            return tokens
        merged = {}
        for key in ("dino_qk", "S", "regions_dino", "attn", "regions_clip", "x_main", "x_spatial", "x_semantic"):
            merged[key] = torch.stack([inter[key] for inter in inters])
        labels = [inter.get("dbscan_labels") for inter in inters]
        if all(lab is not None for lab in labels) and len({lab.numel() for lab in labels}) == 1:
            merged["dbscan_labels"] = torch.stack(labels)
        elif any(lab is not None for lab in labels):
            merged["dbscan_labels"] = labels
        return tokens, merged
