"""The real Label Studio 1.23 round trip (../shared/label-studio): project, task, connect the
backend, "Retrieve predictions", stored brush prediction of the backend's model_version.

Needs the rig: ``bash ../shared/label-studio/setup_rig.sh`` with ``RIG`` as below
(``scripts/test.sh`` does it). The backend runs the fixed small CLIP of the golden
reference with threshold 0, so a random model still labels something.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import GOLDEN, VOC_MINI, shared_path

ROOT = Path(__file__).resolve().parents[1]
RIG = Path(os.environ.get("RIG", ROOT / ".label-studio-rig"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_e2e(tmp_path, *extra: str, env_extra: dict | None = None) -> str:
    e2e = shared_path("label-studio", "e2e.sh")
    if not (RIG / "venv" / "bin" / "label-studio").exists():
        pytest.fail(f"no Label Studio rig in {RIG}: run `RIG={RIG} bash ../shared/label-studio/setup_rig.sh` "
                    "(scripts/test.sh does it)")
    port = _free_port()
    backend_env = {
        "GEM_MODEL": str(GOLDEN / "config.json"), "GEM_PRETRAINED": str(GOLDEN / "weights.safetensors"),
        "GEM_THRESHOLD": "0", "GEM_MIN_AREA": "0", "GEM_DEVICE": "cpu", "HOST": "127.0.0.1",
        "PORT": str(port), "GEM_STATE_DIR": str(tmp_path / "state"), "WORKERS": "2", "THREADS": "4",
        **(env_extra or {}),
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in backend_env.items())
    cmd = f"cd {shlex.quote(str(ROOT))} && {exports} exec {shlex.quote(sys.executable)} -m gem_backend.cli serve"
    proc = subprocess.run(
        ["bash", str(e2e), "--port", str(_free_port()), *extra, "--backend-cmd", cmd, f"http://127.0.0.1:{port}"],
        cwd=tmp_path, env={**os.environ, "RIG": str(RIG)}, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert proc.returncode == 0 and lines and lines[-1] == "PASS", out[-4000:]
    return out


def _stored(out: str) -> str:
    line = next(ln for ln in out.splitlines() if "prediction_stored:" in ln)
    assert "types=['brushlabels']" in line, line
    assert "model_version=gem-" in line, line
    return line


def test_round_trip_legacy_token(tmp_path):
    out = _run_e2e(tmp_path)
    line = _stored(out)
    assert "mask_pixels=0" not in line
    assert "predictions_visible=1" in out


def test_round_trip_personal_access_token(tmp_path):
    """Legacy tokens off: the backend must exchange the PAT for access tokens to fetch images."""
    out = _run_e2e(tmp_path, "--auth", "pat")
    _stored(out)


def test_round_trip_real_photo_with_own_config(tmp_path):
    photo = shared_path("data", "voc-mini", "VOC2012", "JPEGImages", "dlv3_1.jpg")
    config = tmp_path / "config.xml"
    config.write_text(
        '<View>\n  <Image name="photo" value="$img"/>\n'
        '  <BrushLabels name="seg" toName="photo">\n'
        '    <Label value="cat" background="red"/>\n    <Label value="person" background="blue"/>\n'
        '    <Label value="car" background="green"/>\n  </BrushLabels>\n</View>\n')
    out = _run_e2e(tmp_path, "--config", str(config), "--image", str(photo))
    _stored(out)
    assert VOC_MINI.exists()


def test_round_trip_interactive_smart_tools_and_polygons(tmp_path):
    """BrushLabels + smart KeyPointLabels + PolygonLabels: "Retrieve predictions" stores brush
    masks and polygons, and the smart-tool call (/api/ml/{id}/interactive-annotating, a
    positive "cat" keypoint) gets one brush mask back."""
    config = tmp_path / "config.xml"
    config.write_text(
        '<View>\n  <Image name="image" value="$image"/>\n'
        '  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>\n'
        '  <KeyPointLabels name="kp" toName="image" smart="true">'
        '<Label value="cat" smart="true"/><Label value="dog" smart="true"/></KeyPointLabels>\n'
        '  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>\n'
        '</View>\n')
    out = _run_e2e(tmp_path, "--config", str(config), "--interactive", "--expect-type", "polygonlabels")
    stored = next(ln for ln in out.splitlines() if "prediction_stored:" in ln)
    assert "types=['brushlabels', 'polygonlabels']" in stored, stored
    interactive = next(ln for ln in out.splitlines() if "interactive_ok:" in ln)
    assert "types=['brushlabels']" in interactive, interactive
