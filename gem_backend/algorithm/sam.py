"""Class-agnostic regions from Meta's SAM 2 (the optional ``gem-backend[sam2]`` extra).

``load_sam2("hiera_tiny")`` builds a SAM 2.1 model from the ``sam2`` package's own configs and
loads its weights like the CLIP's: from the Hugging Face cache (the files sam2's
``build_sam2_hf`` names, ``facebook/sam2.1-hiera-tiny`` ...), a local checkpoint file, or
``"none"`` for random weights (tests). Offline without cached weights it fails at once with
a message saying what to do.

:class:`RegionGenerator` follows segment-anything's ``SamPredictor``: ``instance_map(image)``
runs ``SAM2AutomaticMaskGenerator`` with CorrCLIP's settings (8 x 8 points, IoU and stability
thresholds 0.4, one mask per point) and paints the masks into one instance map
(:func:`~gem_backend.algorithm.regions.paint_regions`). :func:`encode_regions` /
:func:`decode_regions` make an instance map a few compact bytes for caches.

CPU: sam2's builders default to ``device="cuda"``; the device is always passed. Its CUDA
extension (``sam2._C``, connected components) is not built (``SAM2_BUILD_CUDA=0``) and only
needed for hole/sprinkle filling (``min_mask_region_area > 0``), which CorrCLIP leaves off,
so it is never called. The model runs in float32 (no autocast) on CPU and CUDA.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .hub import ModelLoadError, hub_offline_reason
from .models import resolve_device, weights_id
from .regions import paint_regions

log = logging.getLogger(__name__)

# our name -> (sam2 package config, Hugging Face repo, checkpoint file): sam2's HF_MODEL_ID_TO_FILENAMES
SAM2_MODELS: dict[str, tuple[str, str, str]] = {
    "hiera_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
    "hiera_small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt"),
    "hiera_base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "facebook/sam2.1-hiera-base-plus",
                        "sam2.1_hiera_base_plus.pt"),
    "hiera_large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
}
DEFAULT_SAM2_MODEL = "hiera_large"  # CorrCLIP's (sam2_hiera_l); hiera_tiny is ~6x cheaper on a CPU
HUB_WEIGHTS = "hub"  # pretrained value: the model's weights from the Hugging Face cache (or downloaded)
# SAM 2 sees every image at 1024 x 1024; masks are made at most this long side (memory: K masks of it)
MAX_WORKING_SIDE = 1024

INSTALL_HINT = ("SAM 2 regions need the optional extra: SAM2_BUILD_CUDA=0 pip install --no-build-isolation "
                "--no-deps --require-hashes -r requirements-sam2.txt (after torch; see README, 'SAM 2 regions')")


class RegionsUnavailable(ModelLoadError):
    """SAM 2 cannot be used: the package is missing or its weights cannot be loaded."""


def sam2_available() -> bool:
    """Whether the ``sam2`` package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("sam2") is not None


def check_sam2_model(name: str) -> str:
    """``name`` if it is one of :data:`SAM2_MODELS`, else ``ValueError`` naming them."""
    if name not in SAM2_MODELS:
        raise ValueError(f"unknown SAM 2 model {name!r}; known: {', '.join(SAM2_MODELS)}")
    return name


@dataclass
class LoadedSam2:
    """A SAM 2 model ready for :class:`RegionGenerator`.

    Attributes:
        model: the ``sam2.modeling.sam2_base.SAM2Base``, in eval mode on ``device``.
        name: one of :data:`SAM2_MODELS`.
        weights_id: ``random``, the Hugging Face repo, or file name + content hash.
    """

    model: torch.nn.Module
    name: str
    weights_id: str
    device: torch.device


def sam2_weights_id(name: str, pretrained: str | None = HUB_WEIGHTS) -> str:
    """Short stable id of SAM 2 weights (no loading): ``random``, the hub repo, or a file's id."""
    if pretrained is None or str(pretrained).strip().lower() in ("", HUB_WEIGHTS):
        return SAM2_MODELS[check_sam2_model(name)][1]
    return weights_id(pretrained)


def sam2_checkpoint(name: str, pretrained: str | None = HUB_WEIGHTS, cache_dir: str | None = None) -> str | None:
    """The checkpoint file to load: None for random weights, the local file, or the Hugging Face
    cache's (downloaded when missing and the hub is reachable). Raises :class:`RegionsUnavailable`
    within seconds when it is not cached and the hub cannot be used."""
    config, repo, filename = SAM2_MODELS[check_sam2_model(name)]
    source = HUB_WEIGHTS if pretrained is None else str(pretrained).strip()
    if source.lower() in ("none", "random"):
        return None
    if source.lower() not in ("", HUB_WEIGHTS):
        if not os.path.isfile(source):
            raise RegionsUnavailable(f"SAM 2 weights file not found: {source!r} (GEM_REGIONS_PRETRAINED: a "
                                     f"checkpoint file, '{HUB_WEIGHTS}' or 'none')")
        return source
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    if isinstance(found, str) and os.path.isfile(found):
        return found
    hint = (f"the SAM 2 weights {repo}/{filename} are not in the Hugging Face cache (HF_HOME, default "
            "~/.cache/huggingface); download them once on a machine with internet access: "
            f"`python -c \"from huggingface_hub import hf_hub_download; hf_hub_download('{repo}', '{filename}')\"` "
            "and copy the cache, or set GEM_REGIONS_PRETRAINED to the checkpoint file")
    why = hub_offline_reason()
    if why:
        raise RegionsUnavailable(f"{hint} ({why})")
    try:
        return hf_hub_download(repo, filename, cache_dir=cache_dir)
    except Exception as err:  # hub/network errors come in many types
        raise RegionsUnavailable(f"{hint}: {type(err).__name__}: {err}") from err


def load_sam2(name: str = DEFAULT_SAM2_MODEL, pretrained: str | None = HUB_WEIGHTS, device: str | None = None,
              cache_dir: str | None = None) -> LoadedSam2:
    """Build SAM 2.1 ``name`` from the ``sam2`` package's config and load its weights.

    Args:
        name: ``hiera_tiny``, ``hiera_small``, ``hiera_base_plus`` or ``hiera_large``.
        pretrained: ``hub`` (the Hugging Face cache, downloaded once), a checkpoint file
            (``{"model": state_dict}`` as Meta publishes them), or ``none`` (random weights).
        device: ``cpu``/``cuda``/``cuda:1``...; None or ``auto`` picks the best.
    Raises:
        RegionsUnavailable: the package is missing, the name is unknown, or the weights
            cannot be had (offline: at once).
    """
    try:
        config = SAM2_MODELS[check_sam2_model(name)][0]
    except ValueError as err:
        raise RegionsUnavailable(str(err)) from None
    if not sam2_available():
        raise RegionsUnavailable(INSTALL_HINT)
    checkpoint = sam2_checkpoint(name, pretrained, cache_dir)  # before the import: offline fails fast
    dev = resolve_device(device)
    from sam2.build_sam import build_sam2  # importing sam2 registers its configs with hydra

    try:
        # build_sam2 defaults to device="cuda": always pass ours
        model = build_sam2(config, checkpoint, device=str(dev), mode="eval")
    except Exception as err:  # hydra, state-dict and torch.load errors
        raise RegionsUnavailable(f"could not build SAM 2 {name!r} with weights {pretrained!r}: "
                                 f"{type(err).__name__}: {err}") from err
    model.requires_grad_(False)
    wid = "random" if checkpoint is None else sam2_weights_id(name, pretrained)
    log.info("loaded SAM 2 %s (%s) on %s", name, wid, dev)
    return LoadedSam2(model=model, name=name, weights_id=wid, device=dev)


class RegionGenerator:
    """Instance maps of images from SAM 2's automatic masks.

    Args:
        loaded: a :class:`LoadedSam2`.
        points_per_side: the point grid is ``points_per_side x points_per_side``.
        pred_iou_thresh, stability_score_thresh: the generator's mask filters.
        max_side: the long side masks are generated at (larger images are shrunk first).
        points_per_batch: points decoded at once (memory only).
    """

    def __init__(self, loaded: LoadedSam2, points_per_side: int = 8, pred_iou_thresh: float = 0.4,
                 stability_score_thresh: float = 0.4, max_side: int = MAX_WORKING_SIDE, points_per_batch: int = 64):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        check_generator_options(points_per_side, pred_iou_thresh, stability_score_thresh)
        self.loaded = loaded
        self.max_side = int(max_side)
        # min_mask_region_area 0: no hole filling, so neither sam2._C nor OpenCV is needed
        self.generator = SAM2AutomaticMaskGenerator(
            loaded.model, points_per_side=int(points_per_side), points_per_batch=int(points_per_batch),
            pred_iou_thresh=float(pred_iou_thresh), stability_score_thresh=float(stability_score_thresh),
            multimask_output=False, min_mask_region_area=0, output_mode="binary_mask")

    def working_image(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> the same, shrunk (bilinear) so its long side is at most ``max_side``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        scale = self.max_side / max(h, w)
        if scale >= 1.0:
            return image
        from PIL import Image

        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))

    def masks(self, image: np.ndarray) -> np.ndarray:
        """``[K, h, w]`` bool automatic masks of ``image`` at its working size, in the generator's order."""
        work = self.working_image(image)
        if not work.flags.writeable:  # a PIL-backed array: torchvision warns on read-only input
            work = work.copy()
        with torch.inference_mode():
            anns = self.generator.generate(work)
        if not anns:
            return np.zeros((0, *work.shape[:2]), dtype=bool)
        return np.stack([np.asarray(a["segmentation"], dtype=bool) for a in anns])

    def instance_map(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[h, w]`` int64 instance map at the working size (ids 1..K, 0
        under no mask): the masks painted by :func:`paint_regions`. Users resize it (nearest)
        to the map they vote (:meth:`gem_backend.algorithm.segmentation.GEMPredictor.vote`)."""
        return paint_regions(self.masks(image))


def check_generator_options(points_per_side: int, pred_iou_thresh: float, stability_score_thresh: float) -> None:
    """``ValueError`` naming the bad option and its valid range."""
    if isinstance(points_per_side, bool) or int(points_per_side) != points_per_side or not 1 <= points_per_side <= 64:
        raise ValueError(f"regions_points must be an integer in [1, 64], got {points_per_side!r}")
    for name, value in (("regions_iou", pred_iou_thresh), ("regions_stability", stability_score_thresh)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


_MAGIC = b"GRM1"
_HEAD = struct.Struct("<4sIIB")  # magic, height, width, bytes per id
_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def encode_regions(instance_map: np.ndarray) -> bytes:
    """``[H, W]`` non-negative integer ids -> compact bytes: the smallest unsigned dtype
    holding them, zlib-compressed (a painted SAM 2 map is a few KB)."""
    arr = np.asarray(instance_map)
    if arr.ndim != 2:
        raise ValueError(f"instance_map must be [H, W], got shape {arr.shape}")
    top = int(arr.max()) if arr.size else 0
    if arr.size and int(arr.min()) < 0:
        raise ValueError("region ids must be non-negative")
    width = next(n for n, t in _UINTS.items() if top <= np.iinfo(t).max)
    body = zlib.compress(np.ascontiguousarray(arr, dtype=_UINTS[width]).astype(f"<u{width}").tobytes(), 6)
    return _HEAD.pack(_MAGIC, arr.shape[0], arr.shape[1], width) + body


def decode_regions(raw: object) -> np.ndarray | None:
    """Inverse of :func:`encode_regions`: ``[H, W]`` int64, or None if ``raw`` is malformed."""
    try:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) < _HEAD.size:
            return None
        magic, h, w, width = _HEAD.unpack_from(raw)
        if magic != _MAGIC or width not in _UINTS:
            return None
        body = zlib.decompress(bytes(raw[_HEAD.size:]))
        if len(body) != h * w * width:
            return None
        return np.frombuffer(body, dtype=f"<u{width}").reshape(h, w).astype(np.int64)
    except (zlib.error, struct.error, ValueError):
        return None


__all__ = ["SAM2_MODELS", "DEFAULT_SAM2_MODEL", "HUB_WEIGHTS", "MAX_WORKING_SIDE", "RegionsUnavailable",
           "LoadedSam2", "RegionGenerator", "load_sam2", "sam2_available", "sam2_weights_id", "sam2_checkpoint",
           "check_sam2_model", "check_generator_options", "encode_regions", "decode_regions"]
