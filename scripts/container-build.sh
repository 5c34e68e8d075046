#!/usr/bin/env bash
# The whole Dockerfile (builder + runtime) with podman on this machine kind, where no image
# registry is reachable: the builder's `FROM rust:1.95-bookworm` is made locally as
# localhost/rust:1.95-bookworm from the debootstrapped Debian base (podman-lib.sh) plus this
# machine's Rust toolchain (~/.rustup, ~/.cargo/bin), compilers from apt, and this machine's
# extra CA certificates (its registry traffic is TLS-inspected, which pip and cargo inside the
# build must trust). Both base images are kept for later runs.
#   scripts/container-build.sh [TAG] [podman build args…]   (default TAG localhost/polyrank)
# e.g. --build-arg TORCH_INDEX_URL=… for the CPU-only wheel. Prints the build time and size.
# The image stays (remove it with `podman rmi TAG`); run it as README, "Docker", says.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/podman-lib.sh"
tag=${1:-localhost/polyrank}
shift || true
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
skip() { echo "container-build: SKIPPED: $*"; exit 0; }
ensure_podman
ensure_debian_base

rust_version=$(sed -n 's/^ARG RUST_VERSION=//p' "$root/Dockerfile")
rust_base=localhost/rust:${rust_version}-bookworm
if ! "${podman[@]}" image exists "$rust_base"; then
  toolchain=$(rustup show active-toolchain | cut -d' ' -f1)
  toolchain_dir=$(rustup run "$toolchain" rustc --print sysroot)
  echo "making $rust_base from $toolchain ($(rustc --version))"
  mkdir -p "$tmp/ctx/rustup/toolchains" "$tmp/ctx/cargo" "$tmp/ctx/certs"
  cp -a "$toolchain_dir" "$tmp/ctx/rustup/toolchains/$toolchain"
  rm -rf "$tmp/ctx/rustup/toolchains/$toolchain/share/doc"
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$toolchain" >"$tmp/ctx/rustup/settings.toml"
  cp -a "${CARGO_HOME:-$HOME/.cargo}/bin" "$tmp/ctx/cargo/bin"
  cp /usr/local/share/ca-certificates/*.crt "$tmp/ctx/certs/" 2>/dev/null || true
  "${podman[@]}" build "${limits[@]}" --network host --pull=never -t "$rust_base" -f - "$tmp/ctx" <<EOF
FROM $debian_base
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl git gcc g++ libc6-dev make pkg-config libssl-dev xz-utils \
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:\$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN cargo --version && rustc --version
EOF
  rm -rf "$tmp/ctx"
fi

t0=$(date +%s)
"${podman[@]}" build "${limits[@]}" --network host --format docker --pull=never -t "$tag" "$@" "$root"
echo "container-build: built $tag in $(( $(date +%s) - t0 )) s, $(( $("${podman[@]}" image inspect --format '{{.Size}}' "$tag") / 1000000 )) MB"
