"""Command-line options shared by the subcommands, so a subcommand module registers its parser
without importing the CLI back: the model/segmentation flags, the Label Studio connection flags,
and the settings they make.
"""

from __future__ import annotations

import argparse
import os

from .settings import Settings, SettingsError

__all__ = ["settings_from_args", "add_weights_flags", "add_model_flags", "add_label_studio_flags",
           "with_label_studio"]


def settings_from_args(args, *, exit_on_error: bool = True):
    """Settings from the environment with the command's flags on top; exits with the message
    on a bad value (raises :class:`SettingsError` if not ``exit_on_error``)."""
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
        if not exit_on_error:
            raise
        raise SystemExit(f"gem-backend: {err}") from None


def add_weights_flags(g) -> None:
    """Which model, which weights, where and in what precision: the same flags everywhere."""
    g.add_argument("--model", help="open_clip model name or config JSON path (GEM_MODEL)")
    g.add_argument("--pretrained", help="pretrained tag, weights file, or 'none' (GEM_PRETRAINED)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (GEM_DEVICE)")
    g.add_argument("--precision", help="auto, fp32, bf16, fp16 (GEM_PRECISION)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model and segmentation flags of every command that predicts."""
    g = p.add_argument_group("model and segmentation (default: GEM_* environment variables)")
    add_weights_flags(g)
    g.add_argument("--threshold", type=float, help="background probability threshold; 0 = off (GEM_THRESHOLD)")
    g.add_argument("--min-area", type=float, help="drop labels under this image fraction (GEM_MIN_AREA)")
    g.add_argument("--background-prompts", help="comma-separated; '' for none (GEM_BACKGROUND_PROMPTS)")
    g.add_argument("--templates", help="'openai' or '|'-separated format strings (GEM_TEMPLATES)")
    g.add_argument("--input-size", type=int, help="short side of the model input (GEM_INPUT_SIZE)")
    g.add_argument("--logit-scale", type=float, help="softmax temperature multiplier (GEM_LOGIT_SCALE)")
    g.add_argument("--square", action="store_true", help="square input like the reference (GEM_SQUARE)")


def add_label_studio_flags(p: argparse.ArgumentParser) -> None:
    """``--ls-url`` and ``--api-key``: the Label Studio instance a job talks to."""
    p.add_argument("--ls-url", help="Label Studio URL (default LABEL_STUDIO_URL)")
    p.add_argument("--api-key", help="Label Studio legacy token or personal access token (default LABEL_STUDIO_API_KEY)")


def with_label_studio(args, *, exit_on_error: bool = True) -> Settings:
    """:func:`settings_from_args` with ``--ls-url``/``--api-key`` applied."""
    settings = settings_from_args(args, exit_on_error=exit_on_error)
    return settings.replace(label_studio_url=args.ls_url or settings.label_studio_url,
                            label_studio_api_key=args.api_key or settings.label_studio_api_key)
