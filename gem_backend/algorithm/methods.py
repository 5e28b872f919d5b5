"""Dense CLIP methods by name: GEM, its training-free successors SCLIP, ClearCLIP, NACLIP, plain CLIP.

``create_method(name, clip_model, **options)`` is to methods what open_clip's
``create_model`` is to models. :func:`check_method_options` validates and completes an
options dict without a model (for rejecting bad settings before anything is loaded).

SCLIP, ClearCLIP and NACLIP change only the last block of the CLIP ViT; they reproduce the
official code (``shared/golden/peers-reference``, 1e-4 in float32 on CPU; checked by
``tests/test_methods.py``). With ``x`` the last block's input ``[B, 1+N, width]``,
``y = ln_1(x)``, ``q, k, v`` its per-head projections (head width ``d``, ``s = d**-0.5``),
``O`` the output projection:

- ``sclip``: ``A = softmax(s q q^T) + softmax(s k k^T)``; ``z = x + O(A v)``, ``z += MLP(ln_2(z))``.
- ``clearclip``: ``A = softmax(s q q^T)``; ``z = O(A v)`` (no residual, no FFN).
- ``naclip``: ``A = softmax(s k k^T + G)`` with ``G`` a Gaussian of the patches' grid distance
  (0 in the CLS row and column); ``z = O(A v)``.

The tokens are ``ln_post(z) @ proj``. These three resize the positional embeddings as their
repositories do (:func:`interpolate_pos_encoding`), not as GEM does.

Shapes: ``B`` images, grid ``h x w``, ``N = h * w`` patches, ``T = 1 + N`` tokens, ``heads``
attention heads of width ``d``, ``D`` the joint embedding size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dense import DenseCLIP
from .gem import GEM

__all__ = [
    "MethodError", "create_method", "create", "method_names", "method_defaults", "method_options",
    "check_method_options", "DenseCLIP", "GEMMethod", "CLIPMethod", "SCLIP", "ClearCLIP", "NACLIP",
    "interpolate_pos_encoding", "gaussian_bias",
]


class MethodError(ValueError):
    """Unknown method, unknown option or invalid option value; the message lists the valid ones."""


# ---------------------------------------------------------------------- pieces of the last block
def interpolate_pos_encoding(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                             new_grid: tuple[int, int]) -> torch.Tensor:
    """The positional-embedding resize of the SCLIP, ClearCLIP and NACLIP repositories.

    Bicubic (A = -0.75, no antialias) with ``scale_factor = (g + 0.1) / g0`` used as given,
    so the source coordinate of output index ``i`` is ``(i + 0.5) * g0 / (g + 0.1) - 0.5``:
    not the same sampling as a resize to ``size=g`` (GEM's, open_clip's).

    Args:
        pos_embed: ``[1 + h0*w0, width]``, CLS first, patches row-major.
        old_grid: ``(h0, w0)`` of ``pos_embed``.
        new_grid: ``(h, w)`` wanted.
    Returns:
        ``[1 + h*w, width]`` in the dtype of ``pos_embed`` (computed in float32: bicubic is
        not implemented for half types everywhere); ``pos_embed`` itself at the native grid.
        (The repositories test the token count only, so a non-square grid with the native
        count would not be resized there; here it is, since its layout differs.)
    """
    (h0, w0), (h, w) = tuple(old_grid), tuple(new_grid)
    if (h, w) == (h0, w0):
        return pos_embed
    width = pos_embed.shape[-1]
    grid = pos_embed[1:].float().reshape(1, h0, w0, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic",
                         align_corners=False)
    if tuple(grid.shape[-2:]) != (h, w):  # floor(g0 * (g + 0.1) / g0) == g; guard the rounding
        raise AssertionError(f"positional grid resized to {tuple(grid.shape[-2:])}, wanted {(h, w)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, width).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patch_pos], dim=0)


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


def _attend(strategy: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


# ---------------------------------------------------------------------- the methods
class _LastBlockMethod(DenseCLIP):
    """A method that runs ``blocks[:-1]`` unchanged and its own last block.

    Subclasses set ``name``, ``_strategy`` (the attention), ``_keep_residual`` and may
    override :meth:`_bias`. Every image of a batch is computed independently.
    """

    name: str = ""
    _strategy: str = "vanilla"
    _keep_residual: bool = True

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, tokenizer, method=self.name)
        self.options = dict(options)

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
        out = _attend(self._strategy, q, k, v, self._bias(grid, x))  # [B, heads, T, d]
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


class SCLIP(_LastBlockMethod):
    """SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block.

    Options: ``attn_strategy`` ``"csa"`` (default) or ``"vanilla"`` (plain CLIP). The
    released code keeps the last block's residual and FFN.
    """

    name = "sclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        self._strategy = options["attn_strategy"]


class ClearCLIP(_LastBlockMethod):
    """ClearCLIP (Lan et al., ECCV 2024): q-q attention, last block without residual and FFN.

    Options: ``attn_strategy`` ``"qq"`` (default), ``"csa"``, ``"vanilla"``, ``"maskclip"``;
    ``ignore_residual`` (default True) drops the residual and the FFN of the last block.
    """

    name = "clearclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        self._strategy = options["attn_strategy"]
        self._keep_residual = not options["ignore_residual"]


class NACLIP(_LastBlockMethod):
    """NACLIP (Hajimiri et al., WACV 2025): k-k attention plus a Gaussian neighbourhood bias.

    Options: ``arch`` ``"reduced"`` (default: no residual, no FFN in the last block) or
    ``"vanilla"``; ``attn_strategy`` ``"naclip"`` (default), ``"kk"``, ``"csa"`` (with
    ``arch="vanilla"`` only, as the official code), ``"vanilla"``; ``gaussian_std`` the
    Gaussian's standard deviation in patches (default 5).
    """

    name = "naclip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, options, tokenizer)
        self._strategy = options["attn_strategy"]
        self._keep_residual = options["arch"] == "vanilla"

    def _bias(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor | None:
        if self._strategy != "naclip":
            return None
        return gaussian_bias(tuple(grid), self.options["gaussian_std"], x.device, x.dtype)


class CLIPMethod(DenseCLIP):
    """Plain CLIP patch tokens: the unmodified tower, GEM's positional resize.

    Its tokens are GEM's ``feat_ori``; a baseline (CLIP's patch tokens localise poorly).
    """

    name = "clip"

    def __init__(self, clip_model: nn.Module, options: dict, tokenizer=None):
        super().__init__(clip_model, tokenizer, method=self.name)
        self.options = dict(options)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1+N, D]`` after ``ln_post`` and the projection, not normalised."""
        return self._project(self._run_blocks(self._blocks, self._embed(images)))


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


# ---------------------------------------------------------------------- options and the factory
_INVALID = object()  # what a normaliser returns for a value it rejects


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Option:
    """One option: its default, the allowed values in words, a normaliser (``_INVALID`` if rejected)."""

    default: Any
    allowed: str
    normalise: Callable[[Any], Any]


def _choice(default: str, *values: str) -> _Option:
    return _Option(default, " | ".join(map(repr, values)),
                   lambda v: v if isinstance(v, str) and v in values else _INVALID)


def _flag(default: bool) -> _Option:
    return _Option(default, "True | False", lambda v: v if isinstance(v, bool) else _INVALID)


def _int_at_least(default: int, low: int) -> _Option:
    return _Option(default, f"an integer >= {low}", lambda v: int(v) if _is_int(v) and v >= low else _INVALID)


def _positive(default: float | None, optional: bool = False) -> _Option:
    def normalise(v):
        if v is None and optional:
            return None
        return float(v) if _is_real(v) and v > 0 else _INVALID
    return _Option(default, ("None | " if optional else "") + "a finite number > 0", normalise)


@dataclass(frozen=True)
class _Spec:
    cls: type
    summary: str
    options: dict[str, _Option] = field(default_factory=dict)
    check: Callable[[dict], str | None] = lambda options: None  # cross-option rule: error text or None


def _naclip_rule(options: dict) -> str | None:
    if options["attn_strategy"] == "csa" and options["arch"] != "vanilla":
        return "attn_strategy='csa' needs arch='vanilla' (as in the official NACLIP code)"
    return None


_METHODS: dict[str, _Spec] = {
    "gem": _Spec(GEMMethod, "GEM, the Grounding Everything Module (self-self attention in the last depth-1 blocks)", {
        "depth": _int_at_least(7, 1),
        "ss_attn_iter": _int_at_least(1, 0),
        "ss_attn_temp": _positive(None, optional=True),  # None: GEM's adaptive temperature
    }),
    "sclip": _Spec(SCLIP, "SCLIP (correlative self-attention in the last block)", {
        "attn_strategy": _choice("csa", "csa", "vanilla"),
    }),
    "clearclip": _Spec(ClearCLIP, "ClearCLIP (q-q attention, last block without residual and FFN)", {
        "attn_strategy": _choice("qq", "qq", "csa", "vanilla", "maskclip"),
        "ignore_residual": _flag(True),
    }),
    "naclip": _Spec(NACLIP, "NACLIP (k-k attention with a Gaussian neighbourhood, reduced last block)", {
        "arch": _choice("reduced", "reduced", "vanilla"),
        "attn_strategy": _choice("naclip", "naclip", "kk", "csa", "vanilla"),
        "gaussian_std": _positive(5.0),
    }, _naclip_rule),
    "clip": _Spec(CLIPMethod, "plain CLIP patch tokens (baseline)"),
}


def method_names() -> tuple[str, ...]:
    """The valid method names, ``("gem", "sclip", "clearclip", "naclip", "clip")``."""
    return tuple(_METHODS)


def _spec(name) -> _Spec:
    spec = _METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(map(repr, _METHODS))}")
    return spec


def _describe(name: str, spec: _Spec) -> str:
    if not spec.options:
        return f"method {name!r} takes no options"
    return f"valid options of method {name!r}: " + "; ".join(
        f"{key} ({opt.allowed}; default {opt.default!r})" for key, opt in spec.options.items())


def method_defaults(name: str) -> dict:
    """``{option: default}`` of a method (a fresh dict)."""
    return {key: opt.default for key, opt in _spec(name).options.items()}


def method_options(name: str) -> dict[str, str]:
    """``{option: description of the allowed values}`` of a method."""
    return {key: opt.allowed for key, opt in _spec(name).options.items()}


def check_method_options(name: str, options: Mapping | None = None) -> dict:
    """Validate and complete a method's options without a model.

    Args:
        name: a method name (:func:`method_names`).
        options: ``{option: value}``, any subset of the method's options (None: none).
    Returns:
        The full options, defaults filled in, values normalised (e.g. ``gaussian_std``
        a float); JSON-serialisable.
    Raises:
        MethodError: unknown method, unknown option, invalid value; the message lists
            what is valid.
    """
    spec = _spec(name)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise MethodError(f"options of method {name!r} must be a mapping, got {type(options).__name__}")
    unknown = [key for key in options if key not in spec.options]
    if unknown:
        raise MethodError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} for method {name!r}; {_describe(name, spec)}")
    full = method_defaults(name)
    for key, value in options.items():
        opt = spec.options[key]
        normalised = opt.normalise(value)
        if normalised is _INVALID:
            raise MethodError(f"invalid value {value!r} for option {key!r} of method {name!r}: "
                              f"allowed {opt.allowed}")
        full[key] = normalised
    problem = spec.check(full)
    if problem:
        raise MethodError(f"invalid options for method {name!r}: {problem}")
    return full


def create_method(name: str, clip_model: nn.Module, *, tokenizer=None, **options) -> DenseCLIP:
    """A dense method by name around an open_clip CLIP model (used as it is, not modified).

    Args:
        name: ``"gem"``, ``"sclip"``, ``"clearclip"``, ``"naclip"`` or ``"clip"``.
        clip_model: an ``open_clip.CLIP`` in eval mode with a ViT image tower.
        tokenizer: callable ``list[str] -> LongTensor [C, L]``; default open_clip's.
        **options: the method's options (:func:`method_defaults`); the rest default.
    Returns:
        An ``nn.Module`` with ``.name``, ``.options`` (all of them), ``encode_image(images)``
        -> ``[B, 1+N, D]``, ``encode_text``, ``encode_prompts``, ``patch_similarity``,
        ``grid_for``, ``similarity_maps(images, text)`` -> ``[B, C, H, W]``.
    Raises:
        MethodError: unknown method or option, invalid value.
        UnsupportedModelError: an image tower the methods are not defined on.
    """
    full = check_method_options(name, options)
    return _METHODS[name].cls(clip_model, full, tokenizer=tokenizer)


create = create_method  # the name open_clip-style callers (and the golden checker) may use
