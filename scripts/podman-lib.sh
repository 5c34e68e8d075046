# Sourced by container-check.sh and container-build.sh: podman as it runs on this machine
# kind, its tools, and the locally made Debian base image (no image registry is reachable).
# Needs `tmp` (a scratch directory) and a `skip` function (prints SKIPPED and why, exits 0).

# crun fails here ("cgroups in hybrid mode not supported") and the default rlimits cannot be
# set ("setrlimit … Operation not permitted"): runc, and limits it may set.
podman=(podman --runtime runc)
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
debian_base=localhost/debian:bookworm-slim

# podman, runc and debootstrap from apt when missing (root), else skip.
ensure_podman() {
  local missing=() t
  for t in podman runc debootstrap; do command -v "$t" >/dev/null || missing+=("$t"); done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || skip "${missing[*]} not installed, and not root to install them"
    echo "installing ${missing[*]} (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap; } \
      >"$tmp/apt.log" 2>&1 || skip "apt-get install podman runc debootstrap failed: $(tail -n 3 "$tmp/apt.log")"
  fi
  "${podman[@]}" info >"$tmp/info.log" 2>&1 || skip "podman cannot run here: $(tail -n 3 "$tmp/info.log")"
}

# localhost/debian:bookworm-slim, which the Dockerfile's `FROM debian:bookworm-slim` resolves to:
# debootstrapped (minbase) from the Debian mirror apt uses, once; later runs reuse it.
ensure_debian_base() {
  if ! "${podman[@]}" image exists "$debian_base"; then
    local mirror
    mirror=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
                grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | tr ' ' '\n' | grep '://'
              } | grep -v security | grep debian | head -n 1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "making $debian_base: debootstrap --variant=minbase bookworm from $mirror (~1 min)"
    debootstrap --variant=minbase bookworm "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
      || skip "debootstrap failed: $(tail -n 3 "$tmp/debootstrap.log")"
    tar -C "$tmp/rootfs" -c . | "${podman[@]}" import - "$debian_base" >/dev/null 2>>"$tmp/debootstrap.log"
    rm -rf "$tmp/rootfs"
  fi
  "${podman[@]}" run --rm "${limits[@]}" --network none "$debian_base" true >"$tmp/run.log" 2>&1 \
    || skip "podman cannot start a container here: $(tail -n 3 "$tmp/run.log")"
}
