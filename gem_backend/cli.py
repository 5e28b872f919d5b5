"""``gem-backend``: the command line.

    gem-backend predict IMAGE... --labels cat dog [--out DIR]   masks, overlay, Label Studio JSON
    gem-backend serve [--port 9090]                              the ML backend (gunicorn)

Every setting comes from the environment (``GEM_*``, see README); flags override them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("gem_backend")

# distinct colours for label maps and overlays (index 0 = background, black)
_PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128)], dtype=np.uint8)


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` uint8 colours; index 0 is background."""
    if n <= len(_PALETTE):
        return _PALETTE[:n]
    rng = np.random.default_rng(0)
    return np.concatenate([_PALETTE, rng.integers(40, 256, size=(n - len(_PALETTE), 3), dtype=np.uint8)])


def _settings_from_args(args):
    from .settings import Settings, SettingsError

    env = dict(os.environ)
    for flag, name in (("model", "GEM_MODEL"), ("pretrained", "GEM_PRETRAINED"), ("device", "GEM_DEVICE"),
                       ("precision", "GEM_PRECISION"), ("threshold", "GEM_THRESHOLD"),
                       ("min_area", "GEM_MIN_AREA"), ("background_prompts", "GEM_BACKGROUND_PROMPTS"),
                       ("templates", "GEM_TEMPLATES"), ("input_size", "GEM_INPUT_SIZE"),
                       ("logit_scale", "GEM_LOGIT_SCALE"), ("port", "PORT"), ("host", "HOST"),
                       ("workers", "WORKERS"), ("threads", "THREADS")):
        value = getattr(args, flag, None)
        if value is not None:
            env[name] = str(value)
    if getattr(args, "square", False):
        env["GEM_SQUARE"] = "1"
    try:
        return Settings.from_env(env)
    except SettingsError as err:
        raise SystemExit(f"gem-backend: {err}")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and segmentation (default: GEM_* environment variables)")
    g.add_argument("--model", help="open_clip model name or config JSON path (GEM_MODEL)")
    g.add_argument("--pretrained", help="pretrained tag, weights file, or 'none' (GEM_PRETRAINED)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (GEM_DEVICE)")
    g.add_argument("--precision", help="auto, fp32, bf16, fp16 (GEM_PRECISION)")
    g.add_argument("--threshold", type=float, help="background probability threshold; 0 = off (GEM_THRESHOLD)")
    g.add_argument("--min-area", type=float, help="drop labels under this image fraction (GEM_MIN_AREA)")
    g.add_argument("--background-prompts", help="comma-separated; '' for none (GEM_BACKGROUND_PROMPTS)")
    g.add_argument("--templates", help="'openai' or '|'-separated format strings (GEM_TEMPLATES)")
    g.add_argument("--input-size", type=int, help="short side of the model input (GEM_INPUT_SIZE)")
    g.add_argument("--logit-scale", type=float, help="softmax temperature multiplier (GEM_LOGIT_SCALE)")
    g.add_argument("--square", action="store_true", help="square input like the reference (GEM_SQUARE)")


# ---------------------------------------------------------------------------------- predict
def overlay(image: np.ndarray, label_map: np.ndarray, labels: list[str], present: list[str]):
    """Image with coloured masks (alpha 0.5) and a legend of the present labels -> PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    colours = palette(len(labels) + 1)
    blended = image.astype(np.float32)
    mask = label_map > 0
    blended[mask] = 0.5 * blended[mask] + 0.5 * colours[label_map[mask]]
    out = Image.fromarray(blended.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    size = max(12, min(out.size) // 30)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    y = 4
    for label in present or ["(nothing found)"]:
        colour = tuple(int(c) for c in colours[labels.index(label) + 1]) if label in labels else (255, 255, 255)
        box = draw.textbbox((size + 10, y), label, font=font)
        draw.rectangle((2, y - 2, box[2] + 4, box[3] + 2), fill=(0, 0, 0))
        draw.rectangle((6, y, 6 + size, y + size), fill=colour)
        draw.text((size + 10, y), label, fill=(255, 255, 255), font=font)
        y = box[3] + 6
    return out


def cmd_predict(args) -> int:
    from PIL import Image

    from .images import ImageError, load_image_file
    from .labelstudio import BrushTarget, brush_region, prediction
    from .service import GEMService, ModelUnavailable

    settings = _settings_from_args(args)
    service = GEMService(settings)
    try:
        service.load()
    except ModelUnavailable as err:
        print(f"gem-backend: {err}", file=sys.stderr)
        return 2
    labels = list(dict.fromkeys(args.labels))
    target = BrushTarget(from_name=args.from_name, to_name=args.to_name, value_key="image",
                         labels=tuple(labels), prompts=tuple(labels))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if service.load().random_weights:
        print("note: random weights (GEM_PRETRAINED=none): the masks mean nothing", file=sys.stderr)
    version = settings.model_version()
    failures = 0
    for path in args.images:
        try:
            image = np.asarray(load_image_file(path))
        except ImageError as err:
            print(f"{path}: skipped: {err}", file=sys.stderr)
            failures += 1
            continue
        seg = service.segment(image, labels, settings.segmentation)
        stem = out_dir / Path(path).stem
        written = []
        colours = palette(len(labels) + 1)
        label_png = Image.fromarray(seg.label_map.astype(np.uint8), mode="P")
        label_png.putpalette(colours.ravel().tolist())
        label_png.save(f"{stem}_labels.png")
        written.append(f"{stem}_labels.png")
        regions = []
        for label in seg.present:
            mask = seg.mask(label)
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)
            Image.fromarray(mask.astype(np.uint8) * 255).save(f"{stem}_mask_{safe}.png")
            written.append(f"{stem}_mask_{safe}.png")
            regions.append(brush_region(mask, label, target, seg.scores[label]))
        overlay(image, seg.label_map, labels, seg.present).save(f"{stem}_overlay.png")
        written.append(f"{stem}_overlay.png")
        result = prediction(regions, version, score=seg.score)
        Path(f"{stem}_prediction.json").write_text(json.dumps(result))
        written.append(f"{stem}_prediction.json")
        found = ", ".join(f"{k} {seg.areas[k]:.0%} ({seg.scores[k]:.2f})" for k in seg.present) or "nothing"
        print(f"{path}: {found}")
        for w in written:
            print(f"  wrote {w}")
    return 1 if failures and failures == len(args.images) else 0


# ---------------------------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    from gunicorn.app.base import BaseApplication

    settings = _settings_from_args(args)

    class _Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{settings.host}:{settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 0)  # predictions may take minutes on CPU
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("accesslog", "-" if settings.log_level == "DEBUG" else None)

        def load(self):
            # built in each worker after the fork: no CUDA context is created before it
            from .app import create_app

            return create_app(settings)

    log.info("serving on %s:%s with %s worker(s) x %s thread(s); settings: %s", settings.host, settings.port,
             settings.workers, settings.threads, json.dumps(settings.redacted(), default=str))
    _Server().run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gem-backend", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment image files by label names and write masks")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", nargs="+", required=True, help="label names (text prompts)")
    p.add_argument("--out", default="out", help="output folder (default ./out)")
    p.add_argument("--from-name", default="tag", help="BrushLabels name in the JSON (default tag)")
    p.add_argument("--to-name", default="image", help="Image name in the JSON (default image)")
    _add_model_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="run the Label Studio ML backend with gunicorn")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int)
    _add_model_flags(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
