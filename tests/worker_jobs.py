"""A job for the worker-stop tests, imported by the ``gem-backend worker`` subprocesses
(PYTHONPATH=tests): its first run blocks (to be interrupted), a later run finishes."""

from __future__ import annotations

import time
from pathlib import Path


def first_run_blocks(folder: str) -> str:
    """First call: marks ``started`` and sleeps 120 s. Later calls: mark ``finished``, return."""
    root = Path(folder)
    started = root / "started"
    if not started.exists():
        started.write_text("1")
        time.sleep(120)
        return "first run was not interrupted"
    (root / "finished").write_text("1")
    return "finished"
