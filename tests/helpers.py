"""Shared test helpers: tiny random open_clip models and the golden reference paths."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden" / "gem-reference"
VOC_MINI = SHARED / "data" / "voc-mini"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; fails the test (not skips) when the folder is missing."""
    import pytest

    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need the shared folder beside the checkout")
    return path


def tiny_clip(seed: int = 0, *, width: int = 64, layers: int = 4, heads: int = 2, patch: int = 16,
              image_size: int = 64, embed_dim: int = 32, ls_init_value: float | None = None,
              quick_gelu: bool = False):
    """A randomly initialised open_clip CLIP small enough for unit tests (eval, float32)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    vision_cfg = dict(image_size=image_size, layers=layers, width=width, head_width=width // heads,
                      patch_size=patch, ls_init_value=ls_init_value)
    text_cfg = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
    # random init gives near-zero layer-scale/proj in places; perturb so every path matters
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def golden_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


def golden_model():
    """The fixed small CLIP of the golden reference, weights loaded strictly."""
    from open_clip.model import CLIP
    from safetensors.torch import load_file

    cfg = golden_config()
    model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    model.load_state_dict(load_file(str(GOLDEN / "weights.safetensors")), strict=True)
    return model.eval()
