#!/usr/bin/env bash
# Sets up everything the tests need and runs them: the venv, Debian's redis-server,
# and the real Label Studio 1.23 rig of ../shared/label-studio for the end-to-end tests.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server) >/dev/null
  else
    echo "redis-server is missing: sudo apt-get install redis-server"; exit 1
  fi
fi
bash scripts/setup.sh --test
export RIG=${RIG:-$PWD/.label-studio-rig}
bash ../shared/label-studio/setup_rig.sh 2>&1 | grep -v "^WARNING: Location" | tail -2
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # tests never download weights
exec .venv/bin/python -m pytest "$@"
