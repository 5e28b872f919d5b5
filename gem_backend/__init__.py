"""gem-backend: zero-shot segmentation with GEM on open_clip, served as a Label Studio ML backend.

The data path, by folder:

    request -> labeling spec (labelstudio.spec) -> image (labelstudio.images)
    -> (regions: SAM 2, algorithm.sam) -> method (algorithm.methods: gem, lastblock, scclip, corrclip)
    -> maps, windows (algorithm.windows) -> refinement (algorithm.refine) -> decision (algorithm.segmentation)
    -> (vote: algorithm.regions) -> shapes (algorithm.geometry)
    -> Label Studio JSON (labelstudio.results, labelstudio.brush, labelstudio.bitmask)

``serving`` puts that path behind Label Studio's ML-backend protocol, ``jobs`` runs it over
whole projects, ``evaluation`` measures it; ``settings`` and ``cli`` sit on top.

The library API, stable from now on (imported lazily: ``import gem_backend`` loads no torch):

    from gem_backend import GEM, GEMPredictor, SegmentationSettings, load_gem_model, mask2rle, rle2mask
    from gem_backend import create_method, method_names, pamr     # GEM's successors, PAMR refinement
    from gem_backend import paint_regions, vote_regions           # SAM 2 regions: instance map, region vote
    from gem_backend import load_dino, CorrCLIP                   # CorrCLIP: DINO v1 + regions
    from gem_backend import load_sam2, RegionGenerator            # SAM 2's automatic masks (the sam2 extra)
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> module that defines it
_API = {
    "GEM": "gem_backend.algorithm.gem",
    "GEMPredictor": "gem_backend.algorithm.segmentation",
    "ImageEmbedding": "gem_backend.algorithm.segmentation",
    "Segmentation": "gem_backend.algorithm.segmentation",
    "SegmentationSettings": "gem_backend.algorithm.segmentation",
    "load_gem_model": "gem_backend.algorithm.models",
    "LoadedModel": "gem_backend.algorithm.models",
    "create_method": "gem_backend.algorithm.methods",
    "method_names": "gem_backend.algorithm.methods",
    "check_method_options": "gem_backend.algorithm.methods",
    "MethodError": "gem_backend.algorithm.methods",
    "DenseCLIP": "gem_backend.algorithm.dense",
    "pamr": "gem_backend.algorithm.refine",
    "paint_regions": "gem_backend.algorithm.regions",
    "vote_regions": "gem_backend.algorithm.regions",
    "load_dino": "gem_backend.algorithm.dino",
    "CorrCLIP": "gem_backend.algorithm.corrclip",
    "load_sam2": "gem_backend.algorithm.sam",
    "RegionGenerator": "gem_backend.algorithm.sam",
    "mask2rle": "gem_backend.labelstudio.brush",
    "rle2mask": "gem_backend.labelstudio.brush",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'gem_backend' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
