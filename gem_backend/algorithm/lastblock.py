"""The last-block family: SCLIP, ClearCLIP and NACLIP change only the last block of the CLIP ViT.

They reproduce the official code (``shared/golden/peers-reference``, 1e-4 in float32 on CPU;
checked by ``tests/test_methods.py``). With ``x`` the last block's input ``[B, 1+N, width]``,
``y = ln_1(x)``, ``q, k, v`` its per-head projections (head width ``d``, ``s = d**-0.5``),
``O`` the output projection:

- ``sclip``: ``A = softmax(s q q^T) + softmax(s k k^T)``; ``z = x + O(A v)``, ``z += MLP(ln_2(z))``.
- ``clearclip``: ``A = softmax(s q q^T)``; ``z = O(A v)`` (no residual, no FFN).
- ``naclip``: ``A = softmax(s k k^T + G)`` with ``G`` a Gaussian of the patches' grid distance
  (0 in the CLS row and column); ``z = O(A v)``.

The tokens are ``ln_post(z) @ proj``. These three resize the positional embeddings as their
repositories do (:func:`~gem_backend.algorithm.dense.interpolate_pos_encoding`), not as GEM does.

Shapes: ``B`` images, grid ``h x w``, ``N = h * w`` patches, ``T = 1 + N`` tokens, ``heads``
attention heads of width ``d``, ``D`` the joint embedding size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseCLIP, interpolate_pos_encoding

__all__ = ["SCLIP", "ClearCLIP", "NACLIP", "LastBlockMethod", "gaussian_bias", "attend"]


@functools.lru_cache(maxsize=4)
def gaussian_bias(grid: tuple[int, int], std: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """NACLIP's neighbourhood bias ``G``: ``[T, T]``, ``T = 1 + h*w``, cached per grid.

    ``G[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 std^2))`` for patches ``i, j`` at
    grid row/column ``(r, c)``; 0 in the CLS row and column. Built in float64 once per
    (grid, std, device, dtype) and shared (read only): the few most recent are kept,
    since one is ``T^2`` values (67 MB in float32 at a 64 x 64 grid).
    """
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)  # row-major, as the patch tokens
    dist2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2  # [N, N]
    bias = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    bias[1:, 1:] = torch.exp(-dist2 / (2.0 * std * std))
    return bias.to(device=device, dtype=dtype)


def attend(strategy: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``A v`` for one of the attentions of the methods.

    Args:
        q, k, v: ``[B, heads, T, d]``; each image's rows attend within the image only.
        bias: ``[T, T]`` for ``"naclip"``, added after the ``d**-0.5`` scaling.
    Returns:
        ``[B, heads, T, d]``.
    """
    sdpa = F.scaled_dot_product_attention  # fused: no [T, T] matrix per head in memory
    if strategy == "vanilla":
        return sdpa(q, k, v)
    if strategy == "csa":  # softmax(s q q^T) + softmax(s k k^T), rows sum to 2: two attentions summed
        return sdpa(q, q, v) + sdpa(k, k, v)
    if strategy == "qq":
        return sdpa(q, q, v)
    if strategy == "kk":
        return sdpa(k, k, v)
    if strategy == "naclip":  # softmax(s k k^T + G): SDPA adds a float mask after scaling
        return sdpa(k, k, v, attn_mask=bias)
    if strategy == "maskclip":  # identity attention
        return v
    raise AssertionError(f"unknown attention {strategy!r}")  # options are checked before


class LastBlockMethod(DenseCLIP):
    """A method that runs ``blocks[:-1]`` unchanged and its own last block.

    Subclasses set ``name``, ``_strategy`` (the attention), ``_keep_residual`` and may
    override :meth:`_bias`. Every image of a batch is computed independently.
    """

    name: str = ""
    _strategy: str = "vanilla"
    _keep_residual: bool = True

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, tokenizer, method=self.name, options=options)
        self._strategy = options.get("attn_strategy", self._strategy)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        visual = self.visual
        return interpolate_pos_encoding(visual.positional_embedding, tuple(visual.grid_size), grid)

    def _bias(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor | None:
        return None

    def _last_block(self, block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, T, width] -> [B, T, width]``: the custom last block."""
        attn: nn.MultiheadAttention = block.attn
        bsz, tokens, width = x.shape
        heads = attn.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(bsz, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(self._strategy, q, k, v, self._bias(grid, x))  # [B, heads, T, d]
        out = F.linear(out.transpose(1, 2).reshape(bsz, tokens, width), attn.out_proj.weight, attn.out_proj.bias)
        # ls_1/ls_2 (layer scale) are identities on OpenAI-style CLIPs, the only ones the
        # official code runs; elsewhere the attention branch is taken as the block has it.
        out = block.ls_1(out)
        if not self._keep_residual:  # ClearCLIP/NACLIP "reduced": the attention branch alone
            return out
        x = x + out
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Dense tokens.

        Args:
            images: ``[B, 3, H, W]``, normalised with the model's mean/std.
        Returns:
            ``[B, 1+N, D]`` after ``ln_post`` and the projection, CLS first then patches
            row-major; not L2-normalised.
        """
        x = self._embed(images)  # [B, 1+N, width]
        grid = self.grid_for(images.shape[-2], images.shape[-1])
        blocks = self._blocks
        x = self._run_blocks(blocks[:-1], x)
        return self._project(self._last_block(blocks[-1], x, grid))


class SCLIP(LastBlockMethod):
    """SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block.

    Options: ``attn_strategy`` ``"csa"`` (default) or ``"vanilla"`` (plain CLIP). The
    released code keeps the last block's residual and FFN.
    """

    name = "sclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)


class ClearCLIP(LastBlockMethod):
    """ClearCLIP (Lan et al., ECCV 2024): q-q attention, last block without residual and FFN.

    Options: ``attn_strategy`` ``"qq"`` (default), ``"csa"``, ``"vanilla"``, ``"maskclip"``;
    ``ignore_residual`` (default True) drops the residual and the FFN of the last block.
    """

    name = "clearclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        self._keep_residual = not options["ignore_residual"]


class NACLIP(LastBlockMethod):
    """NACLIP (Hajimiri et al., WACV 2025): k-k attention plus a Gaussian neighbourhood bias.

    Options: ``arch`` ``"reduced"`` (default: no residual, no FFN in the last block) or
    ``"vanilla"``; ``attn_strategy`` ``"naclip"`` (default), ``"kk"``, ``"csa"`` (with
    ``arch="vanilla"`` only, as the official code), ``"vanilla"``; ``gaussian_std`` the
    Gaussian's standard deviation in patches (default 5).
    """

    name = "naclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        self._keep_residual = options["arch"] == "vanilla"

    def _bias(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor | None:
        if self._strategy != "naclip":
            return None
        return gaussian_bias(tuple(grid), self.options["gaussian_std"], x.device, x.dtype)
