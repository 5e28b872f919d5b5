"""DINO v1 (Caron et al., ICCV 2021) as CorrCLIP uses it: the q + k features of its last block.

The model is timm's ``VisionTransformer`` with DINO's hyper-parameters (LayerNorm eps 1e-6,
biased qkv, exact GELU, no head); the official checkpoints' key names are timm's. Only the
position-embedding rule is DINO's own (resample with the ``(g + 0.1) / g0`` bicubic scale
unless the token count is the native one *and* the input is square), so the forward pass is
written here over timm's modules.

``load_dino(model, pretrained)``: ``model`` a name (:data:`DINO_MODELS`) or a config JSON
with the official ``VisionTransformer`` keyword arguments (``patch_size``, ``embed_dim``,
``depth``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``img_size``, ``layer_norm_eps``);
``pretrained`` a local ``.pth``/``.safetensors`` file with the official key names, or
None/"" for a name's weights from the Hugging Face cache (timm's hub copies of the official
ones, e.g. ``timm/vit_base_patch8_224.dino``), downloaded once when the hub is reachable.
One DINO per (model, weights, device, dtype) per process, shared.

Shapes: ``B`` images, ``H x W`` pixels, patch ``p``, grid ``h x w = H/p x W/p``,
``N_d = h * w`` patch tokens, ``C`` the DINO width.
"""

from __future__ import annotations

import json
import os
import threading
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .dense import interpolate_pos_encoding
from .hub import ModelLoadError, hub_offline_reason

__all__ = ["DINO", "load_dino", "DINO_MODELS", "DINO_URLS", "DINO_MEAN", "DINO_STD"]

# name -> (timm hub id of the official weights, architecture)
DINO_MODELS: dict[str, tuple[str, dict]] = {
    "dino_vits8": ("timm/vit_small_patch8_224.dino", dict(patch_size=8, embed_dim=384, depth=12, num_heads=6)),
    "dino_vits16": ("timm/vit_small_patch16_224.dino", dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "dino_vitb8": ("timm/vit_base_patch8_224.dino", dict(patch_size=8, embed_dim=768, depth=12, num_heads=12)),
    "dino_vitb16": ("timm/vit_base_patch16_224.dino", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
}
# the official checkpoints (the same weights), named in the download hint
DINO_URLS = {
    "dino_vits8": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vits16": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vitb8": "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_vitb16": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")

DINO_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, what DINO was trained on
DINO_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_KEYS = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "qkv_bias", "qk_scale", "layer_norm_eps", "drop_rate", "attn_drop_rate",
                "drop_path_rate", "arch"}


class DINO(nn.Module):
    """A DINO v1 ViT (timm modules) giving CorrCLIP's features.

    Args:
        vit: a ``timm.models.vision_transformer.VisionTransformer`` with DINO's weights.
        name: what it was loaded from (for messages).
    """

    def __init__(self, vit: nn.Module, name: str = "dino"):
        super().__init__()
        self.vit = vit
        self.name = name
        p = vit.patch_embed.patch_size
        self.patch_size: int = p[0] if isinstance(p, (tuple, list)) else int(p)
        self.embed_dim: int = vit.embed_dim
        n0 = vit.pos_embed.shape[1] - 1
        g0 = int(round(n0 ** 0.5))
        if g0 * g0 != n0:
            raise ModelLoadError(f"{name}: DINO's position embeddings must form a square grid, got {n0} positions")
        self.pos_grid = (g0, g0)

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.vit.pos_embed.device

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an ``H x W`` input (the patch conv floors)."""
        return height // self.patch_size, width // self.patch_size

    def pos_embed(self, height: int, width: int) -> torch.Tensor:
        """``[1 + N_d, C]`` position embeddings of an ``H x W`` input, DINO's rule: stored when
        the token count is the native one and ``H == W``, else the ``(g + 0.1) / g0`` resize."""
        return interpolate_pos_encoding(self.vit.pos_embed[0], self.pos_grid, self.grid_for(height, width),
                                        always=height != width)

    @torch.no_grad()
    def qk_features(self, images: torch.Tensor) -> torch.Tensor:
        """CorrCLIP's DINO features.

        Args:
            images: ``[B, 3, H, W]`` normalised with :data:`DINO_MEAN` / :data:`DINO_STD`.
        Returns:
            ``[B, N_d, C]`` float32: ``q + k`` of the last block's qkv projection (all heads
            side by side), CLS dropped, each row L2-normalised. The last block's attention
            and the final norm are not computed (the features do not use them).
        """
        vit = self.vit
        x = vit.patch_embed.proj(images.to(device=self.device, dtype=self.dtype))  # [B, C, h, w]
        bsz, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed(images.shape[-2], images.shape[-1]).to(x.dtype)
        x = torch.cat([vit.cls_token.expand(bsz, -1, -1).to(x.dtype), x], dim=1) + pos
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x[:, 1:]))  # row-wise: the CLS row is not needed
        return F.normalize((qkv[..., :width] + qkv[..., width:2 * width]).float(), dim=-1, eps=1e-12)


def _architecture(model: str) -> tuple[dict, str | None]:
    """``(timm VisionTransformer kwargs, hub id or None)`` of a name or a config JSON."""
    if model in DINO_MODELS:
        hub_id, arch = DINO_MODELS[model]
        cfg = dict(arch, img_size=224, mlp_ratio=4.0, qkv_bias=True, eps=1e-6)
    elif str(model).endswith(".json") or os.path.isfile(str(model)):
        if not os.path.isfile(model):
            raise ModelLoadError(f"DINO config file not found: {model}")
        with open(model) as f:
            raw = json.load(f)
        unknown = sorted(k for k in raw if k not in _CONFIG_KEYS and not k.startswith("_"))
        if unknown or not all(k in raw for k in ("patch_size", "embed_dim", "depth", "num_heads")):
            raise ModelLoadError(f"{model} is not a DINO v1 config: it needs patch_size, embed_dim, depth and "
                                 f"num_heads{'; unknown keys ' + ', '.join(unknown) if unknown else ''}")
        if raw.get("qk_scale") not in (None, (raw["embed_dim"] // raw["num_heads"]) ** -0.5):
            raise ModelLoadError(f"{model}: qk_scale other than head_dim ** -0.5 is not supported")
        size = raw.get("img_size", 224)
        hub_id, cfg = None, dict(
            patch_size=int(raw["patch_size"]), embed_dim=int(raw["embed_dim"]), depth=int(raw["depth"]),
            num_heads=int(raw["num_heads"]), mlp_ratio=float(raw.get("mlp_ratio", 4.0)),
            qkv_bias=bool(raw.get("qkv_bias", False)), img_size=int(size[0] if isinstance(size, list) else size),
            eps=float(raw.get("layer_norm_eps", 1e-6)), in_chans=int(raw.get("in_chans", 3)))
    else:
        raise ModelLoadError(f"unknown DINO model {model!r}; valid names: {', '.join(DINO_MODELS)}, "
                             "or the path of a DINO config JSON")
    return cfg, hub_id


def _build(cfg: dict) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(cfg)
    eps = cfg.pop("eps")
    return VisionTransformer(num_classes=0, global_pool="token", class_token=True,
                             norm_layer=partial(nn.LayerNorm, eps=eps), act_layer=nn.GELU,
                             weight_init="skip", **cfg)


def _read_state(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's backbone state dict with the official (= timm) key names."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "state_dict", "model"):  # full training checkpoints nest the weights
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if not key.startswith("head."):  # DINO's projection head (training only)
            out[key] = value
    return out


def _hub_weights(model: str, hub_id: str) -> str:
    """The local file of a name's hub weights: from the cache, else downloaded if the hub is up."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in _HUB_FILES:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    why = hub_offline_reason()
    if why is None:
        try:
            return hf_hub_download(hub_id, _HUB_FILES[0])
        except Exception as err:  # hub/network errors come in many types
            why = f"{type(err).__name__}: {err}"
    raise ModelLoadError(
        f"could not get the DINO weights of {model!r}: not in the Hugging Face cache and {why}. "
        f"They download once into the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) on a "
        f"machine with internet access: run `huggingface-cli download {hub_id} {_HUB_FILES[0]}` there and "
        f"copy the cache, or download the official checkpoint {DINO_URLS[model]} and pass it as the "
        "DINO weights file (method option dino_pretrained)")


def _source_key(path: str | None):
    if not path:
        return None
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


_LOADED: dict[tuple, DINO] = {}
_LOCK = threading.Lock()


def load_dino(model: str = "dino_vitb8", pretrained: str | None = None,
              device: str | torch.device = "cpu", precision: str | torch.dtype = "fp32") -> DINO:
    """A DINO v1 ViT in eval mode, shared per (model, weights, device, dtype) in this process.

    Args:
        model: ``dino_vits8``, ``dino_vits16``, ``dino_vitb8``, ``dino_vitb16``, or the path of a
            config JSON (the official ``VisionTransformer`` keyword arguments and ``layer_norm_eps``).
        pretrained: a ``.pth``/``.pt``/``.bin``/``.safetensors`` file with the official key names
            (a full training checkpoint's ``teacher`` is taken); None/"" for a name's hub weights.
        device: where it computes.
        precision: ``fp32``, ``bf16``, ``fp16`` or a ``torch.dtype``.
    Raises:
        ModelLoadError: unknown model, a config without weights, weights that do not fit, hub
            weights neither cached nor downloadable (within seconds offline, saying what to get).
    """
    dtype = precision if isinstance(precision, torch.dtype) else _PRECISIONS.get(str(precision).lower())
    if dtype is None:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}; got {precision!r}")
    device = torch.device(device)
    pretrained = None if pretrained is None or str(pretrained).strip().lower() in ("", "none") else str(pretrained)
    if pretrained and not os.path.isfile(pretrained):
        raise ModelLoadError(f"DINO weights file not found: {pretrained}")
    cfg, hub_id = _architecture(model)
    if pretrained is None and hub_id is None:
        raise ModelLoadError(f"the DINO config {model} needs a weights file (dino_pretrained)")
    model_key = _source_key(model) if hub_id is None else model
    key = (model_key, _source_key(pretrained), str(device), dtype)
    with _LOCK:
        found = _LOADED.get(key)
        if found is not None:
            return found
        path = pretrained or _hub_weights(model, hub_id)
        vit = _build(cfg)
        try:
            vit.load_state_dict(_read_state(path), strict=True)
        except RuntimeError as err:
            raise ModelLoadError(f"{path} does not fit the DINO {model!r}: {err}") from err
        vit = vit.to(device=device, dtype=dtype).eval().requires_grad_(False)
        dino = DINO(vit, name=os.path.basename(str(model))).eval()
        _LOADED[key] = dino
        return dino
