"""``gem-backend``: the command line.

    gem-backend predict IMAGE... --labels cat dog [--out DIR]   masks, overlay, Label Studio JSON
    gem-backend serve [--port 9090]                              the ML backend (gunicorn)
    gem-backend eval --dataset voc21 --root DIR [--protocol gem]  mIoU on a benchmark (EVALUATION.md)
    gem-backend eval --project ID --out DIR [--sweep ...] [--apply]  on a project's own annotations
    gem-backend prelabel --project ID [--queue [--wait]]         pre-annotate a whole project via the API
    gem-backend worker                                           run queued pre-labeling jobs (REDIS_URL)
    gem-backend refine-proxy --root DIR                          PAMR on ground-truth patch maps (EVALUATION.md)

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

from .options import add_model_flags, add_weights_flags, settings_from_args

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

    from .labelstudio.images import ImageError, load_image_file
    from .labelstudio.spec import BrushTarget
    from .labelstudio.results import brush_region, prediction
    from .serving.service import GEMService, ModelUnavailable

    settings = settings_from_args(args)
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
        result = prediction(regions, version, score=seg.task_score(settings.segmentation.score))
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

    settings = settings_from_args(args)

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
            from .serving.app import create_app
            from .settings import configure_torch_threads

            # cores / WORKERS torch threads per worker (GEM_TORCH_THREADS overrides)
            configure_torch_threads(settings, settings.workers, "gunicorn worker", log)
            return create_app(settings)

    log.info("serving on %s:%s with %s worker(s) x %s thread(s); settings: %s", settings.host, settings.port,
             settings.workers, settings.threads, json.dumps(settings.redacted(), default=str))
    _Server().run()
    return 0


# ---------------------------------------------------------------------------------- eval
def _float_or_none(value: str) -> float | None:
    return None if value.strip().lower() in ("none", "off", "") else float(value)


def _add_eval_parser(sub) -> None:
    from .evaluation.datasets import dataset_names
    from .evaluation.harness import METHODS, OI_SCORES, PROTOCOLS, REFINES, RESIZE_MODES

    p = sub.add_parser("eval", help="mIoU on a public segmentation benchmark or on a Label Studio project's "
                                    "annotations (see EVALUATION.md)",
                       description="Evaluate GEM (or vanilla CLIP) on a segmentation benchmark: mIoU, per-class "
                                   "IoU and pixel accuracy as JSON and markdown; resumable; see EVALUATION.md. "
                                   "With --project ID instead: the pre-annotations against the project's own "
                                   "annotations, variants and sweeps of the settings, --apply the best.")
    p.add_argument("--dataset", choices=dataset_names(), help="the benchmark (required unless --project)")
    p.add_argument("--root", help="dataset folder, in the layout of its public download (required with --dataset)")
    p.add_argument("--protocol", default="gem", choices=PROTOCOLS,
                   help="gem: 448x448 one pass, one template (the paper); sclip: short side 336/448/560, "
                        "slide 224/112, 80 templates, per-dataset logit scale and threshold; clearclip: "
                        "ClearCLIP's settings (its re-run of GEM)")
    p.add_argument("--method", default="gem", choices=METHODS,
                   help="the dense method: gem, sclip, clearclip, naclip, scclip, sfp, corrclip (DINO v1 + "
                        "region masks; without regions its DINO-only mode), or clip (vanilla CLIP patch tokens)")
    p.add_argument("--method-options", help="JSON object of the method's options, e.g. '{\"gaussian_std\": 3}'")
    p.add_argument("--refine", default="none", choices=REFINES, help="refinement of the logits: none or pamr")
    p.add_argument("--refine-iterations", type=int, default=10, help="PAMR iterations (default 10)")
    p.add_argument("--refine-dilations", default="8,16", help="PAMR dilations (default 8,16)")
    p.add_argument("--regions", choices=("none", "sam2"),
                   help="vote the label map in SAM 2's regions after the decision (GEM_REGIONS, default none; "
                        "needs the sam2 extra)")
    p.add_argument("--regions-model", help="SAM 2.1 model: hiera_tiny, hiera_small, hiera_base_plus, hiera_large "
                                           "(GEM_REGIONS_MODEL, default hiera_large)")
    p.add_argument("--regions-pretrained", help="SAM 2 weights: hub (Hugging Face cache), a checkpoint file, or none "
                                                "(GEM_REGIONS_PRETRAINED)")
    p.add_argument("--regions-points", type=int, help="SAM 2 points per side (GEM_REGIONS_POINTS, default 8)")
    p.add_argument("--regions-iou", type=float, help="SAM 2 predicted-IoU threshold (GEM_REGIONS_IOU, default 0.4)")
    p.add_argument("--regions-stability", type=float,
                   help="SAM 2 stability-score threshold (GEM_REGIONS_STABILITY, default 0.4)")
    p.add_argument("--compare", metavar="METHOD[+REFINE],...",
                   help="run several variants on the dataset and write one table, e.g. gem,naclip,naclip+pamr")
    p.add_argument("--out", help="results and per-image cache (default out/eval/DATASET-PROTOCOL-METHOD)")
    p.add_argument("--save-predictions", metavar="DIR", help="write predicted label maps as palette PNGs")
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument("--overwrite", action="store_true", help="discard a cached run with other settings in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=8, help="sliding windows per forward pass (default 8)")
    g = p.add_argument_group("model (default: GEM_* environment variables)")
    add_weights_flags(g)
    g.add_argument("--depth", type=int, help="GEM depth (GEM_DEPTH, default 7)")
    g.add_argument("--ss-attn-iter", type=int, help="self-self attention iterations (GEM_SS_ATTN_ITER, default 1)")
    g.add_argument("--ss-attn-temp", type=_float_or_none, default=argparse.SUPPRESS,
                   help="fixed inverse temperature; 'none' = adaptive (GEM_SS_ATTN_TEMP)")
    k = p.add_argument_group("protocol knobs (override the preset)")
    k.add_argument("--resize", choices=RESIZE_MODES, help="square SxS, short side S, fit in SxS, or none")
    k.add_argument("--input-size", type=int, help="S of --resize")
    k.add_argument("--max-long-side", type=int, help="cap of the long side with --resize short (default 2048)")
    k.add_argument("--crop", type=int, help="sliding window size in pixels; 0 = one pass")
    k.add_argument("--stride", type=int, help="sliding window stride in pixels")
    k.add_argument("--templates", help="'openai' (80) or '|'-separated format strings")
    k.add_argument("--logit-scale", type=float, help="multiplier of cosines before the softmax")
    k.add_argument("--prob-thd", type=float, help="best-class probability under which a pixel is background")
    k.add_argument("--area-thd", type=_float_or_none, default=argparse.SUPPRESS,
                   help="SCLIP's area filter fraction, or 'none'")
    k.add_argument("--class-names", metavar="FILE", help="one line per class, synonyms separated by commas")
    k.add_argument("--oi-score", choices=OI_SCORES, help="OpenImages point score (default minmax)")
    k.add_argument("--oi-threshold", type=float, help="OpenImages: positive above this score (default 0.5)")
    from .evaluation.project import add_project_flags

    add_project_flags(p)
    a = p.add_argument_group("active-learning loop (instead of the plain evaluation; see EVALUATION.md)")
    a.add_argument("--active-learning", nargs="?", const="1,2,4,8", metavar="K,K,...",
                   help="for each k: accept the ground truth of the first k images as annotations, learn the "
                        "class prototypes from them, and report mIoU on the other images with text only and "
                        "with prototypes (default k: 1,2,4,8)")
    a.add_argument("--prototype-strength", type=float,
                   help="blend strength s in a = s * n / (n + n_min) (GEM_PROTOTYPE_STRENGTH, default 0.5)")
    a.add_argument("--prototype-min-annotations", type=int,
                   help="n_min: images holding a class before its prototype is used "
                        "(GEM_PROTOTYPE_MIN_ANNOTATIONS, default 2)")
    # agreement over time: figures the backend recorded from annotation webhooks
    p.add_argument("--agreement", action="store_true",
                   help="with --project: print the project's running agreement figures (IoU between annotations "
                        "and this backend's predictions) from the backend's store (REDIS_URL, else GEM_STATE_DIR)")
    p.set_defaults(func=cmd_eval)


def cmd_agreement(args) -> int:
    """``eval --project ID --agreement``: the store's summary of the project as JSON."""
    from .serving.agreement import open_agreement_store
    from .settings import Settings, SettingsError

    if not args.project:
        print("gem-backend eval: --agreement needs --project ID", file=sys.stderr)
        return 2
    try:
        summary = open_agreement_store(Settings.from_env()).summary(args.project, last=10)
    except (ValueError, SettingsError) as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - Redis away: one line, not a traceback
        print(f"gem-backend eval: agreement store unavailable: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    import dataclasses

    if args.agreement:
        return cmd_agreement(args)
    if args.project is not None:
        from .evaluation.project import cmd_eval_project

        # a project is predicted with its own settings: benchmark flags would be ignored silently
        ignored = [flag for flag, used in (("--dataset", args.dataset), ("--root", args.root),
                                           ("--method", args.method != "gem"), ("--method-options", args.method_options),
                                           ("--refine", args.refine != "none"), ("--regions", args.regions is not None),
                                           ("--protocol", args.protocol != "gem")) if used]
        if ignored:
            print(f"gem-backend eval: {', '.join(ignored)} do not apply with --project (it predicts with the "
                  "project's settings): compare variants with --compare, e.g. --compare gem,scclip+pamr,"
                  "gem+regions=sam2", file=sys.stderr)
            return 2
        return cmd_eval_project(args)
    if not args.dataset or not args.root:
        print("gem-backend eval: give --dataset and --root (a benchmark), or --project ID (a Label Studio project)",
              file=sys.stderr)
        return 2

    from .evaluation.datasets import DatasetError, read_class_names
    from .evaluation.harness import (EvalConfig, EvalError, parse_variants, protocol_for, run_active_learning,
                                     run_comparison, run_evaluation, variant_name)
    from .algorithm.models import ModelLoadError, load_gem_model
    from .settings import Settings, SettingsError, parse_templates

    try:
        env = Settings.from_env()
        protocol = protocol_for(args.protocol, args.dataset)
        knobs = dict(resize=args.resize, size=args.input_size, max_long_side=args.max_long_side, crop=args.crop,
                     stride=args.stride, logit_scale=args.logit_scale, prob_thd=args.prob_thd,
                     oi_score=args.oi_score, oi_threshold=args.oi_threshold)
        changes = {k: v for k, v in knobs.items() if v is not None}
        if args.templates is not None:
            changes["templates"] = parse_templates(args.templates)
        if hasattr(args, "area_thd"):
            changes["area_thd"] = args.area_thd
        if args.class_names:
            changes["prompts"] = read_class_names(args.class_names)
        if changes.get("crop") and "stride" not in changes and not protocol.stride:
            changes["stride"] = changes["crop"] // 2
        protocol = dataclasses.replace(protocol, **changes)
        ks = None
        if args.active_learning is not None:
            ks = [int(k) for k in args.active_learning.replace(" ", "").split(",") if k]
            strength = (args.prototype_strength if args.prototype_strength is not None
                        else env.segmentation.prototype_strength)
            min_annotations = (args.prototype_min_annotations if args.prototype_min_annotations is not None
                               else env.segmentation.prototype_min_annotations)
            if not 0.0 <= strength <= 1.0 or min_annotations < 1:
                raise ValueError("--prototype-strength must be in [0, 1] and --prototype-min-annotations >= 1")
    except (ValueError, SettingsError, OSError) as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
    try:
        loaded = load_gem_model(args.model or env.model, args.pretrained or env.pretrained,
                                device=args.device or env.device, precision=args.precision or env.precision,
                                depth=args.depth if args.depth is not None else env.depth,
                                ss_attn_iter=args.ss_attn_iter if args.ss_attn_iter is not None else env.ss_attn_iter,
                                ss_attn_temp=args.ss_attn_temp if hasattr(args, "ss_attn_temp") else env.ss_attn_temp,
                                cache_dir=env.model_dir)
    except ModelLoadError as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
    try:
        options = json.loads(args.method_options) if args.method_options else {}
        dilations = tuple(int(v) for v in args.refine_dilations.replace(",", " ").split())
        if not isinstance(options, dict):
            raise ValueError("--method-options must be a JSON object")
    except ValueError as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
    variant = "compare" if args.compare else variant_name(args.method, args.refine)
    seg = env.segmentation
    regions = dict(regions=args.regions or seg.regions, regions_model=args.regions_model or seg.regions_model,
                   regions_pretrained=args.regions_pretrained or env.regions_pretrained,
                   regions_points=seg.regions_points if args.regions_points is None else args.regions_points,
                   regions_iou=seg.regions_iou if args.regions_iou is None else args.regions_iou,
                   regions_stability=seg.regions_stability if args.regions_stability is None else args.regions_stability,
                   regions_cache_dir=env.model_dir)
    if regions["regions"] != "none":
        variant += "+regions"
    out = args.out or os.path.join("out", "eval", f"{args.dataset}-{args.protocol}-{variant}")
    try:
        cfg = EvalConfig(dataset=args.dataset, root=args.root, protocol=protocol, method=args.method,
                         method_options=options, refine=args.refine, refine_iterations=args.refine_iterations,
                         refine_dilations=dilations, out_dir=out,
                         save_predictions=args.save_predictions, limit=args.limit, overwrite=args.overwrite,
                         progress=not args.no_progress, batch_size=args.batch_size, **regions)
    except EvalError as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
    try:
        if args.compare:
            run_comparison(cfg, loaded, parse_variants(args.compare))
        elif ks is not None:
            run_active_learning(cfg, loaded, ks, strength=strength, min_annotations=min_annotations)
        else:
            run_evaluation(cfg, loaded)
    except (EvalError, DatasetError) as err:
        print(f"gem-backend eval: {err}", file=sys.stderr)
        return 2
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
    add_model_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="run the Label Studio ML backend with gunicorn")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int)
    add_model_flags(p)
    p.set_defaults(func=cmd_serve)

    _add_eval_parser(sub)

    from .jobs.commands import add_parsers as add_prelabel

    add_prelabel(sub)  # prelabel, worker

    from .jobs.learn import add_parser as add_learn

    add_learn(sub)

    from .evaluation.bench import add_parser as add_bench

    add_bench(sub)

    from .evaluation.proxy import add_parser as add_refine_proxy

    add_refine_proxy(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
