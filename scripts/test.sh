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
# the rig's prebuilt Label Studio database is made by its first e2e run: do that once with the
# rig's own dummy backend, so every test that starts Label Studio finds it (and the rig is checked)
if [ ! -f "$RIG/lsdata-template/label_studio.sqlite3" ]; then
  read -r LS_PORT BE_PORT < <(.venv/bin/python -c "
import socket
s = [socket.socket() for _ in range(2)]
[x.bind(('127.0.0.1', 0)) for x in s]
print(*[x.getsockname()[1] for x in s])")
  (cd "$(mktemp -d)" && bash "$OLDPWD/../shared/label-studio/e2e.sh" --dummy --port "$LS_PORT" "http://127.0.0.1:$BE_PORT") | tail -2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # tests never download weights
exec .venv/bin/python -m pytest "$@"
