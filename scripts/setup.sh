#!/usr/bin/env bash
# Creates .venv with gem-backend and its pinned dependencies (idempotent).
#   bash scripts/setup.sh            # runtime
#   bash scripts/setup.sh --test     # + test tools
# Both install the optional SAM 2 extra (requirements-sam2.txt, pure Python, seconds) after torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
REQ=requirements.txt
[ "${1:-}" = "--test" ] && REQ=requirements-test.txt
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat "$REQ" requirements.txt requirements-sam2.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ" 2>&1 | grep -v "^WARNING: Location" || true
  # SAM 2's sdist would build against a second torch in an isolated env: use ours, no CUDA extension
  SAM2_BUILD_CUDA=0 "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps \
    --require-hashes -r requirements-sam2.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import gem_backend.serving.app, open_clip, torch, sam2.build_sam" # fails loudly if the install is broken
  touch "$stamp"
fi
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch, open_clip; print("torch", torch.__version__, "open_clip", open_clip.__version__)'))"
