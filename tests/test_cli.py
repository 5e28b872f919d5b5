"""``gem-backend predict``: files written for real photos with the golden model, failures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from gem_backend.cli import main
from helpers import shared_path

PHOTOS = ("labelme_2011_000003.jpg", "dlv3_0.jpg")  # 500x338 and 513x513
LABELS = ["person", "cat", "dog", "car"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path_factory):
    """Settings come from flags only; nothing of the caller's environment leaks in."""
    for name in list(os.environ):
        if name.startswith("GEM_") or name in ("REDIS_URL", "MODEL_DIR", "LABEL_STUDIO_URL",
                                               "LABEL_STUDIO_API_KEY", "LOG_LEVEL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GEM_CONFIG_REGISTRY", str(tmp_path_factory.mktemp("configs")))
    monkeypatch.setenv("GEM_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def _golden_flags() -> list[str]:
    return ["--model", str(shared_path("golden", "gem-reference", "config.json")),
            "--pretrained", str(shared_path("golden", "gem-reference", "weights.safetensors")),
            "--device", "cpu", "--precision", "fp32"]


def _photo(name: str) -> Path:
    return shared_path("data", "voc-mini", "VOC2012", "JPEGImages", name)


def _written(stdout: str) -> list[Path]:
    return [Path(line.split("wrote ", 1)[1].strip()) for line in stdout.splitlines() if "wrote " in line]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """One ``predict`` run on two photos (input size 224 keeps the image tower quick)."""
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEM_CONFIG_REGISTRY", str(tmp_path_factory.mktemp("configs")))
        for name in [n for n in os.environ if n.startswith("GEM_") and n != "GEM_CONFIG_REGISTRY"]:
            mp.delenv(name)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["predict", *(str(_photo(p)) for p in PHOTOS), "--labels", *LABELS,
                         *_golden_flags(), "--threshold", "0", "--input-size", "224", "--out", str(out)])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_predict_writes_label_maps_masks_overlays_and_json(predicted):
    code, stdout, stderr, out = predicted
    assert code == 0, stderr
    written = _written(stdout)
    # it prints every path it wrote, and wrote nothing else
    assert sorted(written) == sorted(out.iterdir())
    assert all(p.is_file() for p in written)

    for name in PHOTOS:
        stem = Path(name).stem
        with Image.open(_photo(name)) as im:
            photo_size = im.size  # (W, H)
        assert f"{_photo(name)}:" in stdout  # a summary line per image

        # label map: palette PNG at the photo's size, values 0..C; threshold 0 labels every pixel
        with Image.open(out / f"{stem}_labels.png") as im:
            assert im.mode == "P" and im.size == photo_size
            palette = im.getpalette()
            label_map = np.array(im)
        assert label_map.shape == photo_size[::-1]
        assert label_map.min() >= 1 and label_map.max() <= len(LABELS)
        assert palette[:3] == [0, 0, 0]  # background black
        present_ids = sorted(int(v) for v in np.unique(label_map))
        # distinct colours for the labels present
        colours = {tuple(palette[3 * i:3 * i + 3]) for i in present_ids}
        assert len(colours) == len(present_ids)

        # one 0/255 mask PNG per present label, equal to the label map
        masks = {}
        for i, label in enumerate(LABELS, start=1):
            path = out / f"{stem}_mask_{label}.png"
            assert path.exists() == (i in present_ids), label
            if path.exists():
                with Image.open(path) as im:
                    assert im.mode == "L" and im.size == photo_size
                    mask = np.array(im)
                assert set(np.unique(mask)) <= {0, 255}
                np.testing.assert_array_equal(mask == 255, label_map == i)
                masks[label] = mask
        assert len(masks) >= 2
        # the masks partition the image (threshold 0: no background)
        assert (sum((m == 255).astype(int) for m in masks.values()) == 1).all()

        # overlay: RGB at the photo's size
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert im.mode == "RGB" and im.size == photo_size

        # Label Studio prediction: one brushlabels region per mask, RLE decoding to that mask
        pred = json.loads((out / f"{stem}_prediction.json").read_text())
        assert set(pred) >= {"result", "score", "model_version"}
        assert pred["model_version"].startswith("gem-config-weights-")
        assert 0.0 <= pred["score"] <= 1.0
        assert len(pred["result"]) == len(masks)
        assert len({r["id"] for r in pred["result"]}) == len(masks)
        for region in pred["result"]:
            assert region["type"] == "brushlabels"
            assert (region["from_name"], region["to_name"]) == ("tag", "image")
            assert (region["original_width"], region["original_height"]) == photo_size
            assert 0.0 <= region["score"] <= 1.0
            value = region["value"]
            assert value["format"] == "rle" and len(value["brushlabels"]) == 1
            label = value["brushlabels"][0]
            decoded = decode_rle(value["rle"]).reshape(photo_size[1], photo_size[0], 4)[:, :, 3]
            np.testing.assert_array_equal(decoded, masks[label])


def test_predict_skips_unreadable_files(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    code = main(["predict", str(broken), str(_photo(PHOTOS[0])), str(missing), "--labels", "person", "cat",
                 *_golden_flags(), "--threshold", "0", "--input-size", "64", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0  # one image made it
    assert f"{broken}: skipped" in captured.err
    assert f"{missing}: skipped" in captured.err
    assert "Traceback" not in captured.err
    stem = Path(PHOTOS[0]).stem
    assert (out / f"{stem}_labels.png").exists() and (out / f"{stem}_prediction.json").exists()
    assert not any(p.name.startswith(("broken", "missing")) for p in out.iterdir())
    assert sorted(_written(captured.out)) == sorted(out.iterdir())

    # nothing readable: a failing exit status
    code = main(["predict", str(broken), "--labels", "cat", *_golden_flags(), "--out", str(tmp_path / "none")])
    assert code == 1
    assert f"{broken}: skipped" in capsys.readouterr().err


def test_bad_setting_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", str(_photo(PHOTOS[0])), "--labels", "cat", *_golden_flags(), "--threshold", "2"])
    message = str(info.value.code)
    assert message.startswith("gem-backend: ") and "GEM_THRESHOLD" in message and "[0, 1)" in message


def test_model_that_cannot_load_exits_with_a_message(tmp_path, capsys):
    code = main(["predict", str(_photo(PHOTOS[0])), "--labels", "cat", "--model", "ViT-Nope-99",
                 "--pretrained", "none", "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "gem-backend:" in err and "ViT-Nope-99" in err and "unknown open_clip model" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_entry_point_bad_setting_is_not_a_traceback(tmp_path):
    exe = Path(sys.executable).with_name("gem-backend")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gem_backend.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEM_")}
    env.update(HF_HUB_OFFLINE="1", GEM_CONFIG_REGISTRY=str(tmp_path / "configs"))
    proc = subprocess.run([*cmd, "predict", str(_photo(PHOTOS[0])), "--labels", "cat", "--threshold", "2",
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "GEM_THRESHOLD" in proc.stderr and "threshold must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "out").exists()  # failed before doing anything
