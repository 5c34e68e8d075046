#!/usr/bin/env bash
# Stages what the runtime image holds into OUT: the binary, the libtorch libraries it loads
# (resolved by ldd from the venv), the default model with links resolved, the default pool
# and config. The Dockerfile runs this; so does tests/reliability.rs, which then runs the
# staged tree without the build tree, so the image's contents are checked without a daemon.
#
# --warm-cache: also the default pool's encoded cache, made by the staged binary
# (`polyrank warm-cache`), in share/polyrank/pool-cache: the image's
# /usr/local/share/polyrank/pool-cache, which `serve` reads when it seeds a store (and copies into cache_dir), so the
# image starts ready. Encoding 10k candidates takes ~1 min on 2 cores; WARM_CACHE_DIR (default:
# a fresh temp dir) is where warm-cache looks first and writes, e.g. data/pool-cache to reuse.
# POLYRANK_BIN: the binary to stage (default target/release/polyrank); STAGE_POOL: the pool
# file staged as the default pool (default data/chitchat-pool.jsonl; a check may stage less).
set -euo pipefail
out=${1:?usage: stage-runtime.sh OUT [--warm-cache]}
warm=${2:-}
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${POLYRANK_BIN:-$root/target/release/polyrank}"
mkdir -p "$out/lib" "$out/models" "$out/data" "$out/config" "$out/share/polyrank/pool-cache"
cp "$bin" "$out/polyrank"
# Every shared library the binary resolves from the venv (torch, c10, gomp, CUDA runtime…),
# whether the rpath names the venv through a link or not.
venv="$root/.venv/" real_venv="$(cd "$root/.venv" && pwd -P)/"
ldd "$bin" | awk '/=> \// {print $3}' | grep -F -e "$venv" -e "$real_venv" | while read -r lib; do
  cp -L "$lib" "$out/lib/"
done
rm -rf "$out/models/default"
cp -rL "$root/models/default" "$out/models/default"
cp "${STAGE_POOL:-$root/data/chitchat-pool.jsonl}" "$out/data/chitchat-pool.jsonl"
cp "$root/config/default.toml" "$out/config/default.toml"
# The image runs as uid 10001: everything staged is world-readable (a file written with a
# private mode, such as an exported model, would otherwise fail to load there).
chmod -R a+rX "$out"
if [ "$warm" = --warm-cache ]; then
  cache="${WARM_CACHE_DIR:-}"
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  # Absolute paths and a scratch working directory: nothing but the cache file lands in OUT.
  file="$(cd "$scratch" && LD_LIBRARY_PATH="$out/lib" "$out/polyrank" warm-cache --config "$out/config/default.toml" \
    --model-dir "$out/models/default" --candidates "$out/data/chitchat-pool.jsonl" --cache-dir "${cache:-$scratch/cache}" | tail -n 1)"
  install -m 644 "$file" "$out/share/polyrank/pool-cache/"
  echo "baked pool cache $(basename "$file")"
elif [ -n "$warm" ]; then
  echo "unknown option $warm" >&2
  exit 2
fi
echo "staged $(find "$out" -type f | wc -l) files, $(du -sh "$out" | cut -f1)"
