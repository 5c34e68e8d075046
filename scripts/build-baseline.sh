#!/usr/bin/env bash
# Builds polyrank as of git revision REV into target/baseline/release/polyrank, with that
# revision's settings file beside it (target/baseline/default.toml), for benchmarks that run an
# older build beside this one in the same run (`make bench BASELINE_REV=REV`).
# The checkout is a `git archive` of REV in target/baseline/src; this build's compiled
# dependencies are copied in first when there are none, so only polyrank itself compiles.
set -euo pipefail
rev=${1:?usage: build-baseline.sh REV}
cd "$(dirname "$0")/.."
root=$PWD
out=$root/target/baseline
rm -rf "$out/src"
mkdir -p "$out/src"
git archive "$rev" | tar -x -C "$out/src"
git show "$rev:config/default.toml" > "$out/default.toml"
if [ ! -d "$out/release/deps" ] && [ -d "$root/target/release/deps" ]; then
  mkdir -p "$out/release"
  cp -r "$root/target/release/deps" "$root/target/release/build" "$root/target/release/.fingerprint" "$out/release/"
fi
# The same venv (libtorch) as this build.
export PATH="$root/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
(cd "$out/src" && CARGO_TARGET_DIR="$out" cargo build --release --bin polyrank)
echo "baseline $(git rev-parse --short "$rev"): $out/release/polyrank"
