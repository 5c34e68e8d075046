#!/usr/bin/env bash
# Stages what the runtime image holds into OUT: the binary, the libtorch libraries it loads
# (resolved by ldd from the venv), the default model with links resolved, the default pool
# and config. The Dockerfile runs this; so does tests/reliability.rs, which then runs the
# staged tree without the build tree, so the image's contents are checked without a daemon.
set -euo pipefail
out=${1:?usage: stage-runtime.sh OUT}
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/polyrank"
mkdir -p "$out/lib" "$out/models" "$out/data" "$out/config"
cp "$bin" "$out/polyrank"
# Every shared library the binary resolves from the venv (torch, c10, gomp, CUDA runtime…).
ldd "$bin" | awk '/=> \// {print $3}' | grep -F "$root/.venv/" | while read -r lib; do
  cp -L "$lib" "$out/lib/"
done
rm -rf "$out/models/default"
cp -rL "$root/models/default" "$out/models/default"
cp "$root/data/chitchat-pool.jsonl" "$out/data/"
cp "$root/config/default.toml" "$out/config/default.toml"
echo "staged $(find "$out" -type f | wc -l) files, $(du -sh "$out" | cut -f1)"
