"""The one place that turns a model name and a weights source into a ready GEM model.

``load_gem_model("ViT-B-16-quickgelu", "metaclip_400m")`` -> :class:`LoadedModel` holding
the :class:`~gem_backend.algorithm.gem.GEM` wrapper, the normalisation constants and a string that
identifies the weights (for cache keys and ``model_version``).

Model names: any open_clip built-in name (``open_clip.list_models()``) or the path of an
open_clip model config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``, or an
``open_clip_config.json`` with a ``model_cfg`` key). Weights sources: an open_clip
pretrained tag (downloaded once into the Hugging Face cache), a local file
(``.safetensors``, ``.bin``, ``.pt``/``.pth``, OpenAI's TorchScript archives), or
``None``/``""``/``"none"`` for random initialisation (tests, timing).

A tag's weights already in the Hugging Face cache are loaded from it without asking the hub
(a start-up needs no network once they are there). Weights not cached are downloaded, unless
the hub cannot be reached: then the error comes at once (``HF_HUB_OFFLINE``, or no connection
to ``HF_ENDPOINT`` or its proxy within :data:`HUB_PROBE_TIMEOUT_S`), not after the Hugging
Face client's own minute of retries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .gem import GEM

if TYPE_CHECKING:
    from .dense import DenseCLIP

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16-quickgelu"
DEFAULT_PRETRAINED = "metaclip_400m"

HUB_PROBE_TIMEOUT_S = 3.0

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or its weights could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A GEM model ready for inference.

    Attributes:
        gem: the GEM wrapper (eval mode, on ``device``, in ``dtype``).
        model_name: the open_clip name or config path it was built from.
        pretrained: the weights source as given (tag, file path, or ``"none"``).
        weights_id: short stable id of the weights (tag, or file name + content hash).
        mean, std: per-channel normalisation of ``[0, 1]`` RGB input, 3 floats each.
        image_size: ``(H, W)`` the model was trained at.
        device, dtype: where and in what precision it computes.
    """

    gem: GEM
    model_name: str
    pretrained: str
    weights_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    methods: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def random_weights(self) -> bool:
        return self.pretrained == "none"

    def method(self, name: str = "gem", options=()) -> "DenseCLIP":
        """The dense method ``name`` on this model's CLIP (built once per options, sharing
        the weights): ``gem`` with no options is :attr:`gem`'s own configuration.

        Args:
            options: a mapping or ``(name, value)`` pairs of the method's options.
        Raises:
            MethodError: unknown method or option, invalid value.
        """
        from .methods import create_method

        given = dict(options)
        if name == "gem":
            given = {"depth": self.gem.depth, "ss_attn_iter": self.gem.ss_attn_iter,
                     "ss_attn_temp": self.gem.ss_attn_temp, **given}
        key = (name, tuple(sorted(given.items())))
        found = self.methods.get(key)
        if found is None:
            found = create_method(name, self.gem.model, tokenizer=self.gem.tokenizer, **given)
            self.methods[key] = found
        return found


def resolve_device(device: str | None = None) -> torch.device:
    """``cuda`` if available, then ``mps``, then ``cpu``; an explicit name wins."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere
    bf16 matmuls are emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``fp32``/``bf16``/``fp16``, or ``auto``: fp16 on GPUs, bf16 on CPUs with native
    bf16, fp32 elsewhere."""
    precision = (precision or "auto").lower()
    if precision == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(_DTYPES)}; got {precision!r}")
    return _DTYPES[precision]


def _is_none(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).strip().lower() in ("", "none", "random")


def _is_torchscript(path: str) -> bool:
    # OpenAI's released .pt files are TorchScript zip archives with a code/ folder.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())


def _file_weights_id(path: str) -> str:
    st = os.stat(path)
    return _file_weights_id_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_weights_id_cached(path: str, size: int, mtime_ns: int) -> str:
    # size + head + tail: cheap on GB files, and the same on every machine the file is copied to
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
        h.update(f.read())  # the tail, or the rest of a file under 2 MiB
    return f"{Path(path).stem}-{h.hexdigest()[:8]}"


def weights_id(pretrained: str | None) -> str:
    """Short stable id of a weights source: the tag, ``random``, or file name + content hash.

    Cheap (no loading), so ``/setup`` can name the model version without a model.
    """
    if _is_none(pretrained):
        return "random"
    if os.path.isfile(str(pretrained)):
        return _file_weights_id(str(pretrained))
    return str(pretrained)


def _register_config(path: str) -> str:
    """Make a config JSON known to open_clip; returns the name it is registered under."""
    import open_clip

    with open(path) as f:
        cfg = json.load(f)
    if "model_cfg" in cfg:  # open_clip_config.json as saved on the HF hub
        cfg = cfg["model_cfg"]
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelLoadError(f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
    name = "gem-config-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        # open_clip registers configs from files named <model name>.json
        folder = Path(os.environ.get("GEM_CONFIG_REGISTRY", Path.home() / ".cache" / "gem-backend" / "configs"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return name


def _download_hint(model_name: str, tag: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not get the pretrained weights {tag!r} for {model_name!r}: {type(err).__name__}: {err}. "
        "They download once into the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) "
        "on a machine with internet access: run "
        f"`python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\"` there "
        "and copy the cache, or set GEM_PRETRAINED to a local weights file (.safetensors, .bin, .pt); "
        f"tags known for this model: {_known_tags(model_name)}")


def cached_weights_file(pretrained_cfg: dict, cache_dir: str | None = None) -> str | None:
    """The local file of a pretrained tag's hub weights if the Hugging Face cache holds it.

    ``pretrained_cfg``: ``open_clip.get_pretrained_cfg(name, tag)``. Looks for the files
    open_clip would download, in its order (the ``.safetensors`` form first). None: not cached,
    or the tag has no hub entry (a URL download, which open_clip caches itself).
    """
    hub = (pretrained_cfg or {}).get("hf_hub", "")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else (
        [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [])
    for candidate in names + [filename]:
        found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):  # else None or the "known missing" marker
            return found
    return None


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint (``HF_ENDPOINT``), or to the proxy
    the environment routes it through, opens within ``timeout`` seconds, name lookup included."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and host and not proxy_bypass(host):
        purl = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = purl.hostname, purl.port or (1080 if purl.scheme.startswith("socks") else 80)
    if not host:
        return False
    opened: list[bool] = []

    def attempt() -> None:  # in a thread: a name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    probe = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened and opened[0])


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now, or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return (f"the Hugging Face hub {constants.ENDPOINT} (HF_ENDPOINT) could not be reached "
                f"within {HUB_PROBE_TIMEOUT_S:g} s")
    return None


def _known_tags(model_name: str) -> str:
    import open_clip

    try:
        return ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    except Exception:  # unknown name: the tag list does not matter then
        return "none"


def load_gem_model(model_name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED,
                   device: str | None = None, precision: str = "auto", depth: int = 7,
                   ss_attn_iter: int = 1, ss_attn_temp: float | None = None,
                   cache_dir: str | None = None) -> LoadedModel:
    """Build an open_clip CLIP, load its weights and wrap it in GEM.

    Args:
        model_name: open_clip model name or path of a model config JSON.
        pretrained: open_clip pretrained tag, local weights file, or None for random init.
        device: ``cuda``/``mps``/``cpu``/``cuda:1``...; None or ``auto`` picks the best.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (weights converted).
        depth, ss_attn_iter, ss_attn_temp: GEM settings (see :class:`GEM`).
        cache_dir: where pretrained tags download to (default: the HF cache).
    Raises:
        ModelLoadError: unknown model, missing weights (offline), unsupported tower.
    """
    import open_clip

    from .gem import UnsupportedModelError, check_supported

    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    name = model_name
    preprocess = None
    if model_name.endswith(".json") or os.path.isfile(model_name):
        if not os.path.isfile(model_name):
            raise ModelLoadError(f"model config file not found: {model_name}")
        name = _register_config(model_name)
        # an open_clip_config.json says how images were normalised in training (mean/std)
        with open(model_name) as f:
            preprocess = json.load(f).get("preprocess_cfg") or None
    elif model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ModelLoadError(f"unknown open_clip model {model_name!r}; see open_clip.list_models(), "
                             "or give the path of a model config JSON")

    jit_file = None
    tag = None if _is_none(pretrained) else str(pretrained)
    source = tag  # what open_clip is given: a tag, a file, or None
    if tag and os.path.isfile(tag):
        if _is_torchscript(tag):
            jit_file, tag, source = tag, None, None
    elif tag:
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not tag_cfg:
            raise ModelLoadError(f"{tag!r} is neither a file nor a pretrained tag of {model_name!r}; "
                                 f"tags known for it: {_known_tags(name)}")
        local = cached_weights_file(tag_cfg, cache_dir)
        if local:  # the cached file, with the tag's preprocessing: what open_clip would load
            source, preprocess = local, {**tag_cfg, **(preprocess or {})}
            if bool(tag_cfg.get("quick_gelu", False)) != bool((open_clip.get_model_config(name) or {}).get(
                    "quick_gelu", False)):
                warnings.warn(f"QuickGELU mismatch between {model_name!r} and the weights {tag!r}: "
                              "use the model name the tag was trained with", UserWarning, stacklevel=2)
        elif tag_cfg.get("hf_hub"):
            why = hub_offline_reason()
            if why:
                raise _download_hint(model_name, tag, ConnectionError(f"not in the cache and {why}"))

    try:
        model = open_clip.create_model(name, pretrained=source, device="cpu", cache_dir=cache_dir,
                                       force_preprocess_cfg=preprocess)
    except Exception as err:  # hub/network errors come in many types
        if tag and not os.path.isfile(tag):
            raise _download_hint(model_name, tag, err) from err
        raise ModelLoadError(f"could not build {model_name!r} with weights {pretrained!r}: {err}") from err

    if jit_file:
        state = torch.jit.load(jit_file, map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelLoadError(f"{jit_file} does not fit {model_name!r}: {err}") from err

    model = model.to(device=dev, dtype=dtype).eval()
    model.requires_grad_(False)
    try:
        check_supported(model)  # before the tokenizer: some unsupported towers need extra packages
    except UnsupportedModelError as err:
        raise ModelLoadError(f"{model_name!r}: {err}") from err
    gem = GEM(model, depth=depth, ss_attn_iter=ss_attn_iter, ss_attn_temp=ss_attn_temp,
              tokenizer=open_clip.get_tokenizer(name))
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    wid = weights_id(pretrained)
    log.info("loaded %s (%s) on %s as %s", model_name, wid, dev, str(dtype).replace("torch.", ""))
    return LoadedModel(gem=gem, model_name=model_name, pretrained="none" if _is_none(pretrained) else str(pretrained),
                       weights_id=wid, mean=mean, std=std, image_size=size, device=dev, dtype=dtype)
