"""gem_backend.algorithm.models: building GEM models from names/configs and weights sources."""

from __future__ import annotations

import json
import shutil
import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gem_backend.algorithm import models
from gem_backend.algorithm.gem import GEM
from gem_backend.algorithm.models import (
    LoadedModel,
    ModelLoadError,
    _is_torchscript,
    load_gem_model,
    resolve_device,
    resolve_dtype,
    weights_id,
)
from helpers import golden_config, golden_model, shared_path, tiny_clip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _config_registry(tmp_path_factory, monkeypatch):
    """Registered configs go to a temporary folder, not ~/.cache."""
    monkeypatch.setenv("GEM_CONFIG_REGISTRY", str(tmp_path_factory.mktemp("configs")))


@pytest.fixture(scope="module")
def golden_paths():
    return (str(shared_path("golden", "gem-reference", "config.json")),
            str(shared_path("golden", "gem-reference", "weights.safetensors")))


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 224, 320, generator=g), ["a photo of a cat.", "dog", "a red car"]


@pytest.fixture(scope="module")
def reference(inputs):
    """Outputs of helpers.golden_model() wrapped in GEM: what every loading path must give."""
    gem = GEM(golden_model())
    images, prompts = inputs
    with torch.inference_mode():
        return gem.encode_image(images), gem.encode_prompts(prompts)


def _outputs(loaded: LoadedModel, inputs):
    images, prompts = inputs
    with torch.inference_mode():
        return loaded.gem.encode_image(images), loaded.gem.encode_prompts(prompts)


def _assert_same(got, want):
    (gem_g, ori_g), text_g = got
    (gem_w, ori_w), text_w = want
    torch.testing.assert_close(gem_g, gem_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(ori_g, ori_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(text_g, text_w, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- loading
def test_golden_config_and_safetensors(golden_paths, inputs, reference):
    config, weights = golden_paths
    loaded = load_gem_model(config, weights, device="cpu", precision="fp32")
    _assert_same(_outputs(loaded, inputs), reference)
    assert loaded.model_name == config and loaded.pretrained == weights
    assert loaded.random_weights is False
    assert loaded.weights_id == weights_id(weights) and loaded.weights_id.startswith("weights-")
    assert loaded.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert loaded.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert loaded.image_size == (224, 224)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.gem.dtype == torch.float32 and loaded.gem.patch_size == (16, 16)
    assert not any(m.training for m in loaded.gem.model.modules())  # eval: no dropout
    assert not any(p.requires_grad for p in loaded.gem.parameters())
    # the tokenizer follows the config's context length
    assert loaded.gem.tokenize(["cat"]).shape == (1, 77)


def test_open_clip_config_json_form(golden_paths, inputs, reference, tmp_path):
    _, weights = golden_paths
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": golden_config(),
                                "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    loaded = load_gem_model(str(path), weights, device="cpu", precision="fp32")
    _assert_same(_outputs(loaded, inputs), reference)
    # the normalisation the model was trained with comes from the config's preprocess_cfg
    assert loaded.mean == pytest.approx((0.5, 0.5, 0.5))
    assert loaded.std == pytest.approx((0.25, 0.25, 0.25))


def test_pretrained_none_gives_random_weights(golden_paths, inputs, reference):
    config, _ = golden_paths
    loaded = load_gem_model(config, None, device="cpu", precision="fp32", depth=3, ss_attn_iter=2,
                            ss_attn_temp=0.5)
    assert loaded.random_weights is True
    assert loaded.pretrained == "none" and loaded.weights_id == "random"
    (gem_feat, _), _ = _outputs(loaded, inputs)
    (ref_feat, _), _ = reference
    assert gem_feat.shape == ref_feat.shape
    assert not torch.allclose(gem_feat, ref_feat, atol=1e-3)
    # the GEM settings are passed on
    assert (loaded.gem.depth, loaded.gem.ss_attn_iter, loaded.gem.ss_attn_temp) == (3, 2, 0.5)
    assert loaded.gem.first_gem_block == 8 - 2
    for none in ("none", "", "None", "random"):
        assert models._is_none(none) and weights_id(none) == "random"


def test_torch_save_state_dict(golden_paths, inputs, reference, tmp_path):
    config, _ = golden_paths
    path = tmp_path / "golden.pt"
    torch.save(golden_model().state_dict(), path)
    assert not _is_torchscript(str(path))
    loaded = load_gem_model(config, str(path), device="cpu", precision="fp32")
    _assert_same(_outputs(loaded, inputs), reference)
    assert loaded.weights_id.startswith("golden-")


def _scripted_archive(state: dict[str, torch.Tensor], path, openai_extras: bool = True):
    """A TorchScript archive holding ``state`` under the same names, like OpenAI's released
    .pt files (which also carry input_resolution, context_length and vocab_size)."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_buffer(leaf, value.detach().clone())
    if openai_extras:
        for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
            root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, the archives are not
        torch.jit.save(torch.jit.script(root), str(path))


def test_openai_style_torchscript_archive(golden_paths, inputs, reference, tmp_path):
    config, _ = golden_paths
    path = tmp_path / "ViT-golden.pt"
    _scripted_archive(golden_model().state_dict(), path)
    assert _is_torchscript(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = load_gem_model(config, str(path), device="cpu", precision="fp32")
    _assert_same(_outputs(loaded, inputs), reference)
    assert loaded.weights_id.startswith("ViT-golden-") and not loaded.random_weights


def test_torchscript_archive_that_does_not_fit(golden_paths, tmp_path):
    config, _ = golden_paths
    path = tmp_path / "other.pt"
    _scripted_archive({"visual.conv1.weight": torch.zeros(8, 3, 16, 16)}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ModelLoadError, match="does not fit"):
            load_gem_model(config, str(path), device="cpu", precision="fp32")


def test_is_torchscript(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"not a zip at all")
    assert not _is_torchscript(str(plain))
    saved = tmp_path / "saved.pt"
    torch.save({"w": torch.ones(2)}, saved)
    assert not _is_torchscript(str(saved))


def test_weights_that_do_not_fit_the_config(golden_paths, tmp_path):
    config, _ = golden_paths
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_clip().state_dict(), str(path))
    with pytest.raises(ModelLoadError) as info:
        load_gem_model(config, str(path), device="cpu", precision="fp32")
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------- errors
def test_unknown_model_name():
    with pytest.raises(ModelLoadError) as info:
        load_gem_model("ViT-Nope-99", "none", device="cpu")
    assert "unknown open_clip model" in str(info.value) and "ViT-Nope-99" in str(info.value)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ModelLoadError) as info:
        load_gem_model(str(missing), "none", device="cpu")
    assert "not found" in str(info.value) and str(missing) in str(info.value)


def test_config_that_is_not_an_open_clip_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(ModelLoadError, match="not an open_clip model config"):
        load_gem_model(str(path), "none", device="cpu")


def test_unknown_pretrained_tag(golden_paths):
    with pytest.raises(ModelLoadError) as info:
        load_gem_model("ViT-B-32", "no_such_tag", device="cpu")
    message = str(info.value)
    assert "no_such_tag" in message and "neither a file nor a pretrained tag" in message
    assert "laion2b_s34b_b79k" in message  # the tags it does know
    # a weights file that does not exist reads the same (not a silent random init)
    config, _ = golden_paths
    with pytest.raises(ModelLoadError, match="neither a file nor a pretrained tag"):
        load_gem_model(config, "/no/such/weights.safetensors", device="cpu")


def test_offline_without_cached_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import; set it for this test
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    with pytest.raises(ModelLoadError) as info:
        load_gem_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu", cache_dir=str(cache))
    message = str(info.value)
    assert "laion2b_s34b_b79k" in message and "ViT-B-32" in message
    assert "GEM_PRETRAINED" in message
    assert "Hugging Face cache" in message and "HF_HOME" in message


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused
    return port


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub's endpoint is a closed loopback port; offline mode is off, no proxy."""
    import huggingface_hub.constants as hf_constants

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    return endpoint


def test_unreachable_hub_without_cached_weights_fails_fast(unreachable_hub, tmp_path):
    # the Hugging Face client alone retries for about 50 s before it gives up (measured here)
    import time

    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_gem_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 8
    message = str(info.value)
    assert "could not be reached" in message and unreachable_hub in message
    assert "GEM_PRETRAINED" in message and "HF_HOME" in message


def _hf_cache_with(cache, repo: str, filename: str, source: str) -> None:
    """The Hugging Face cache layout holding ``source`` as ``repo``'s ``filename``."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(source, folder / "snapshots" / ("0" * 40) / filename)


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "weights.safetensors"])
def test_cached_tag_weights_load_without_the_hub(golden_paths, inputs, reference, unreachable_hub, tmp_path,
                                                 monkeypatch, filename):
    config, weights = golden_paths
    name = models._register_config(config)  # the open_clip name the config is known by
    hub = "test-org/golden-clip/" + ("" if filename.startswith("open_clip") else filename.replace(
        ".safetensors", ".bin"))
    tag = {"hf_hub": hub, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"golden": tag})
    cache = tmp_path / "hub"
    _hf_cache_with(cache, "test-org/golden-clip", filename, weights)
    assert models.cached_weights_file(tag, str(cache)).endswith(filename)

    import time

    start = time.monotonic()
    loaded = load_gem_model(config, "golden", device="cpu", precision="fp32", cache_dir=str(cache))
    assert time.monotonic() - start < 8  # no retries against the unreachable hub
    _assert_same(_outputs(loaded, inputs), reference)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)  # the tag's preprocessing
    assert loaded.weights_id == "golden"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert models.cached_weights_file(tag, str(empty)) is None
    with pytest.raises(ModelLoadError, match="could not be reached"):
        load_gem_model(config, "golden", device="cpu", cache_dir=str(empty))


def test_hub_reachable_follows_the_endpoint_and_the_proxy(unreachable_hub, monkeypatch):
    import socket

    assert not models.hub_reachable(unreachable_hub)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        listening = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert models.hub_reachable(listening)
        # through a proxy: the proxy is what must answer
        monkeypatch.setenv("HTTPS_PROXY", listening)
        monkeypatch.setenv("NO_PROXY", "")
        assert models.hub_reachable("https://hub.invalid")
        monkeypatch.setenv("NO_PROXY", "hub.invalid")
        assert not models.hub_reachable("https://hub.invalid", timeout=1)


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_cli_says_so_fast_when_the_hub_is_unreachable(tmp_path, command):
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GEM_")) and "PROXY" not in k.upper()}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
               MODEL_DIR=str(tmp_path / "models"))
    voc = shared_path("data", "voc-mini")
    args = {"predict": ["predict", str(voc / "VOC2012" / "JPEGImages" / "dlv3_0.jpg"), "--labels", "person",
                        "--out", str(tmp_path / "out")],
            "eval": ["eval", "--dataset", "voc21", "--root", str(voc), "--limit", "1", "--no-progress"]}[command]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gem_backend.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "could not be reached" in proc.stderr and "GEM_PRETRAINED" in proc.stderr, proc.stderr[-2000:]
    assert took < 20, f"took {took:.1f} s"  # interpreter and torch start-up included


def test_serving_reports_the_unreachable_hub_fast(unreachable_hub, tmp_path):
    # what `serve` (each gunicorn worker) and the workers do: GEMService.load, /health reports it
    import time

    from gem_backend.serving.service import GEMService, ModelUnavailable
    from gem_backend.settings import Settings

    service = GEMService(Settings.from_env({"GEM_MODEL": "ViT-B-32", "GEM_PRETRAINED": "laion2b_s34b_b79k",
                                            "GEM_DEVICE": "cpu", "MODEL_DIR": str(tmp_path)}))
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match="could not be reached"):
        service.load()
    assert time.monotonic() - start < 8
    assert "could not be reached" in service.load_error


def test_resnet_tower_is_not_supported(tmp_path):
    """A ResNet CLIP (like RN50, at a size that builds in a blink) is refused with the reason."""
    path = tmp_path / "RN-tiny.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    with pytest.raises(ModelLoadError) as info:
        load_gem_model(str(path), "none", device="cpu", precision="fp32")
    message = str(info.value)
    assert str(path) in message and "not supported" in message and "ResNet" in message


# ---------------------------------------------------------------------------------- device, dtype
def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # explicit names are taken as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for auto in (None, "", "auto"):
        assert resolve_device(auto) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_resolve_dtype(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_dtype("fp32", cuda) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("FP16", cpu) == torch.float16
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.float16
    assert resolve_dtype("auto", mps) == torch.float16
    if hasattr(models, "cpu_has_native_bf16"):  # auto picks bf16 only where the CPU does it natively
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
        assert resolve_dtype("auto", cpu) == torch.float32
        assert resolve_dtype(None, cpu) == torch.float32
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
        assert resolve_dtype("auto", cpu) == torch.bfloat16
    else:
        assert resolve_dtype("auto", cpu) == torch.float32
    for bad in ("fp64", "half", "int8"):
        with pytest.raises(ValueError, match="precision"):
            resolve_dtype(bad, cpu)


# ---------------------------------------------------------------------------------- weights_id
def test_weights_id_of_tags_and_none():
    assert weights_id("metaclip_400m") == "metaclip_400m"
    for none in (None, "", "none", "NONE", "random"):
        assert weights_id(none) == "random"


@pytest.mark.parametrize("size", [100, (1 << 20) + 4096, (3 << 20) + 7])
def test_weights_id_follows_content_not_folder(tmp_path, size):
    a, b, c = (tmp_path / d / "model.safetensors" for d in ("a", "b", "c"))
    for path in (a, b, c):
        path.parent.mkdir()
    data = bytes(range(256)) * (size // 256) + b"\0" * (size % 256)
    a.write_bytes(data)
    shutil.copyfile(a, b)
    assert weights_id(str(a)) == weights_id(str(b))
    assert weights_id(str(a)).startswith("model-")
    # same name and size, one byte changed: near the head, and near the tail
    for offset in (10, size - 10):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        c.write_bytes(bytes(changed))
        assert weights_id(str(c)) != weights_id(str(a)), offset
        c.unlink()
    # a different size is different weights too
    c.write_bytes(data + b"\0")
    assert weights_id(str(c)) != weights_id(str(a))


def test_weights_id_of_the_golden_file_is_stable(golden_paths, tmp_path):
    _, weights = golden_paths
    copy = tmp_path / "weights.safetensors"
    shutil.copyfile(weights, copy)
    assert weights_id(weights) == weights_id(str(copy))
