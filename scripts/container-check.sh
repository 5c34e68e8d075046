#!/usr/bin/env bash
# Builds the runtime image with podman from the staged tree (scripts/stage-runtime.sh, with
# the baked pool cache) and runs it: ready at start, /rank, uid 10001, the HEALTHCHECK,
# env-only settings, a mounted model and pool, an empty cache volume, a clean stop.
#
# No image registry is reachable here, so the base image is made locally once
# (debootstrap of Debian bookworm, imported as localhost/debian:bookworm-slim, kept for the
# next run). podman, runc and debootstrap are installed from apt when missing (as root).
# Where podman cannot run containers, it prints SKIPPED and why, and exits 0.
# Everything else it creates (image, containers, temp files) is removed at exit.
# Needs target/release/polyrank (or POLYRANK_BIN) and `make model`. The staged default pool
# is encoded once into WARM_CACHE_DIR (default data/pool-cache, reused by later runs) unless
# it is there already: ~1 min on 2 cores for the 10k pool. CHECK_POOL_LINES=N stages only
# the pool's first N candidates (the test does, so that a fresh clone's check stays short).
# READY_LIMIT_S: the most seconds from the process's start to ready that pass (default 2);
# the time from `podman run` is printed beside it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/podman-lib.sh"
image=localhost/polyrank-check:$$
tmp="$(mktemp -d)"
started=$(date +%s)
passed=0 failed=0
containers=()

skip() { echo "container-check: SKIPPED: $*"; exit 0; }
log() { echo "container-check: $*"; }
check() { # check NAME CONDITION-RESULT DETAIL
  if [ "$2" = 0 ]; then passed=$((passed + 1)); printf '  PASS  %-46s %s\n' "$1" "$3"
  else failed=$((failed + 1)); printf '  FAIL  %-46s %s\n' "$1" "$3"; fi
}
cleanup() {
  for c in "${containers[@]}"; do "${podman[@]}" rm -f -v -t 0 "$c" >/dev/null 2>&1 || true; done
  "${podman[@]}" rmi -f "$image" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

ensure_podman
ensure_debian_base

# --- stage and build the runtime stage ----------------------------------------------------
t0=$(date +%s)
if [ -n "${CHECK_POOL_LINES:-}" ]; then
  head -n "$CHECK_POOL_LINES" "$root/data/chitchat-pool.jsonl" >"$tmp/pool.jsonl"
  export STAGE_POOL="$tmp/pool.jsonl"
fi
WARM_CACHE_DIR="${WARM_CACHE_DIR:-$root/data/pool-cache}" bash "$root/scripts/stage-runtime.sh" "$tmp/stage" --warm-cache \
  >"$tmp/stage.log" 2>&1 || { cat "$tmp/stage.log"; exit 1; }
log "staged in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$tmp/stage.log")"
t0=$(date +%s)
mkdir -p "$tmp/context"
"${podman[@]}" build "${limits[@]}" --network host --format docker --layers=false --pull=never \
  --target runtime --build-context staged="$tmp/stage" -f "$root/Dockerfile" -t "$image" "$tmp/context" \
  >"$tmp/build.log" 2>&1 || { tail -n 30 "$tmp/build.log"; exit 1; }
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
log "built $image in $(( $(date +%s) - t0 )) s, $((size / 1000000)) MB"

# --- helpers ----------------------------------------------------------------------------------
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# run NAME [podman run args...]: starts a container, records it for cleanup.
run() {
  local name="polyrank-check-$$-$1"; shift
  containers+=("$name")
  # Without systemd, podman says it cannot add the healthcheck timer: its noise goes to a log.
  "${podman[@]}" run -d --name "$name" "${limits[@]}" "$@" >/dev/null 2>>"$tmp/podman.log" \
    || { cat "$tmp/podman.log"; return 1; }
}
# url NAME PORT: the host address of the container's PORT.
url() { echo "http://$("${podman[@]}" port "polyrank-check-$$-$1" "$2/tcp" | head -n 1)"; }
# wait_ready NAME URL START_MS: seconds from START_MS until /health/ready answers 200 (within
# ~2 min), or "timeout" (also as soon as the container stops).
wait_ready() {
  local t=$3
  for _ in $(seq 1 2400); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$2/health/ready")" = 200 ]; then
      awk -v ms=$(( $(now_ms) - t )) 'BEGIN {printf "%.2f", ms / 1000}'; return
    fi
    [ "$("${podman[@]}" inspect --format '{{.State.Running}}' "polyrank-check-$$-$1" 2>/dev/null)" = true ] || break
    sleep 0.05
  done
  echo timeout
}
# proc_ready NAME: seconds from the process's first log line (its settings) to "ready".
proc_ready() {
  "${podman[@]}" logs "polyrank-check-$$-$1" 2>&1 | python3 -c '
import sys, datetime
t = lambda l: datetime.datetime.fromisoformat(l.split()[0][:26])
lines = [l for l in sys.stdin if l[:2] == "20"]
print("%.2f" % (t([l for l in lines if ": ready " in l][0]) - t(lines[0])).total_seconds())' 2>/dev/null || echo timeout
}
under() { [ "$1" != timeout ] && awk -v a="$1" -v b="$2" 'BEGIN {exit !(a <= b)}'; }
rank() { curl -s -X POST "$1/rank" -H 'content-type: application/json' "${@:3}" -d "$2"; }

# --- 1. the image as is: ready at start from the baked cache ----------------------------
echo "container-check: $image"
t=$(now_ms)
run default -p 127.0.0.1::8080 "$image"
u=$(url default 8080)
ready=$(wait_ready default "$u" "$t")
# The limit applies to the process (start -> ready); `podman run` adds the container's setup.
limit=${READY_LIMIT_S:-2}
proc=$(proc_ready default)
under "$ready" 60 && under "$proc" "$limit" && r=0 || r=1
check "ready in <= $limit s with the default model" $r "process start -> ready ${proc} s; podman run -> /health/ready 200 ${ready} s"
reused=$(curl -s "$u/info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cache_reused"])' 2>/dev/null || echo "?")
[ "$reused" = True ] && r=0 || r=1
check "pool read from the baked cache" $r "/info cache_reused: $reused"
body=$(rank "$u" '{"context": "what food do you like?", "top_k": 3}')
n=$(echo "$body" | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"]; print(sum(h["id"].startswith("chitchat-") for h in r))' 2>/dev/null || echo 0)
[ "$n" = 3 ] && r=0 || r=1
check "/rank answers from the default pool" $r "$(echo "$body" | head -c 120)"
uid=$("${podman[@]}" exec "polyrank-check-$$-default" awk '/^Uid:/ {print $2}' /proc/1/status 2>/dev/null || echo "?")
[ "$uid" = 10001 ] && r=0 || r=1
check "process runs as uid 10001" $r "uid $uid"
hc=$("${podman[@]}" inspect --format '{{.Config.Healthcheck.Test}}' "$image" 2>/dev/null || true)
"${podman[@]}" healthcheck run "polyrank-check-$$-default" >"$tmp/hc.log" 2>&1 && r=0 || r=1
check "HEALTHCHECK passes (podman healthcheck run)" $r "$hc $(tr '\n' ' ' <"$tmp/hc.log")"
key=$(ls "$tmp/stage/share/polyrank/pool-cache")
"${podman[@]}" exec "polyrank-check-$$-default" test -s "/data/pool-cache/$key" && r=0 || r=1
check "baked cache copied into the cache volume" $r "/data/pool-cache/${key:0:12}…"
"${podman[@]}" stop -t 20 "polyrank-check-$$-default" >/dev/null 2>>"$tmp/podman.log"
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "polyrank-check-$$-default")
[ "$code" = 0 ] && r=0 || r=1
check "SIGTERM: drains and exits 0" $r "exit code $code"

# --- 2. empty bind-mounted volumes: the cache does not hide the baked one; the store is written
mkdir -p "$tmp/cache" "$tmp/store" && chmod 777 "$tmp/cache" "$tmp/store"
t=$(now_ms)
run volume -p 127.0.0.1::8080 -v "$tmp/cache:/data/pool-cache" -v "$tmp/store:/data/pool-store" "$image"
ready=$(wait_ready volume "$(url volume 8080)" "$t")
proc=$(proc_ready volume)
under "$ready" 60 && under "$proc" "$limit" && [ -s "$tmp/cache/$key" ] && r=0 || r=1
check "empty mounted cache volume: ready <= $limit s" $r "process ${proc} s, podman run ${ready} s; $(ls "$tmp/cache" | tr '\n' ' ')"
[ -n "$(ls -A "$tmp/store")" ] && r=0 || r=1
check "the store is written to its mounted volume" $r "$(ls "$tmp/store" | tr '\n' ' ')"
"${podman[@]}" rm -f -v -t 0 "polyrank-check-$$-volume" >/dev/null 2>>"$tmp/podman.log"

# --- 3. env-only settings, a mounted model and pool -------------------------------------
cp -rL "$root/models/minilm-bi" "$tmp/model" && chmod -R a+rX "$tmp/model"
printf '%s\n' '{"id": "tiny-pizza", "text": "I love pizza."}' '{"id": "tiny-train", "text": "The train is late."}' \
  '{"id": "tiny-cats", "text": "I have two cats."}' >"$tmp/tiny.jsonl" && chmod a+r "$tmp/tiny.jsonl"
t=$(now_ms)
run custom -p 127.0.0.1::9090 -e POLYRANK_PORT=9090 -e POLYRANK_API_KEY=check-key \
  -e POLYRANK_MODEL_DIR=/models/mine -e POLYRANK_CANDIDATES=/data/tiny.jsonl \
  -v "$tmp/model:/models/mine:ro" -v "$tmp/tiny.jsonl:/data/tiny.jsonl:ro" "$image"
u=$(url custom 9090)
ready=$(wait_ready custom "$u" "$t")
[ "$ready" != timeout ] && r=0 || r=1
check "env-only settings: ready on POLYRANK_PORT 9090" $r "ready ${ready} s"
no_key=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$u/rank" -H 'content-type: application/json' -d '{"context": "hi"}')
body=$(rank "$u" '{"context": "what food do you like?", "top_k": 3}' -H 'authorization: Bearer check-key')
ids=$(echo "$body" | python3 -c 'import json,sys; print(" ".join(h["id"] for h in json.load(sys.stdin)["results"]))' 2>/dev/null || echo "?")
[ "$no_key" = 401 ] && [[ "$ids" == tiny-pizza* ]] && [ "$(echo "$ids" | wc -w)" = 3 ] && r=0 || r=1
check "POLYRANK_API_KEY; the mounted pool is ranked" $r "no key: $no_key; with key: $ids"
info=$(curl -s "$u/info")
mode=$(echo "$info" | python3 -c 'import json,sys; i=json.load(sys.stdin); print(i["model_dir"], i["mode"])' 2>/dev/null || echo "?")
# /info names the model directory by its last component (no host paths to clients).
[ "$mode" = "mine bi" ] && r=0 || r=1
check "the mounted model is used (/info)" $r "$mode"
"${podman[@]}" healthcheck run "polyrank-check-$$-custom" >/dev/null 2>&1 && r=0 || r=1
check "HEALTHCHECK follows POLYRANK_PORT" $r ""
# A write through /candidates outlives a restart (the store is in the container's volume).
write=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$u/candidates" -H 'content-type: application/json' \
  -H 'authorization: Bearer check-key' -d '{"candidates": [{"id": "tiny-pasta", "text": "Pasta is my favourite food."}]}')
"${podman[@]}" restart -t 20 "polyrank-check-$$-custom" >/dev/null 2>>"$tmp/podman.log"
u=$(url custom 9090)
ready=$(wait_ready custom "$u" "$(now_ms)")
kept=$(curl -s -o /dev/null -w '%{http_code}' "$u/candidates/tiny-pasta" -H 'authorization: Bearer check-key')
[ "$write" = 200 ] && [ "$kept" = 200 ] && r=0 || r=1
check "a /candidates write outlives a restart" $r "POST $write; after restart (ready ${ready} s) GET $kept"

# Two replicas of the image sharing a live pool through a PostgreSQL on the host (a throwaway
# cluster of Debian's server, as the tests start; host networking so 127.0.0.1 is the host).
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -n 1)
if [ -n "$pgbin" ]; then
  pgdir=$(mktemp -d) && chown postgres "$pgdir"
  pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  pgrun() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  pgrun "$pgbin/initdb" -D "$pgdir/data" -A trust -U polyrank --no-sync >/dev/null
  pgrun "$pgbin/pg_ctl" -D "$pgdir/data" -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1" -l "$pgdir/log" -w start >/dev/null
  pgrun "$pgbin/createdb" -h 127.0.0.1 -p "$pgport" -U polyrank polyrank
  store="postgres://polyrank@127.0.0.1:$pgport/polyrank"
  for i in 1 2; do
    run "shared$i" --network host -e POLYRANK_PORT=919$i -e POLYRANK_HOST=127.0.0.1 -e POLYRANK_STORE_URL="$store" \
      -e POLYRANK_MODEL_DIR=/models/mine -e POLYRANK_CANDIDATES=/data/tiny.jsonl \
      -v "$tmp/model:/models/mine:ro" -v "$tmp/tiny.jsonl:/data/tiny.jsonl:ro" "$image"
  done
  r1=$(wait_ready shared1 http://127.0.0.1:9191 "$(now_ms)"); r2=$(wait_ready shared2 http://127.0.0.1:9192 "$(now_ms)")
  seq=$(curl -s -X POST http://127.0.0.1:9191/candidates -H 'content-type: application/json' \
    -d '{"candidates": [{"id": "tiny-soup", "text": "Soup is my favourite food."}]}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["seq"])' 2>/dev/null || echo "?")
  seen=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:9192/candidates/tiny-soup?min_seq=$seq")
  [ "$r1" != timeout ] && [ "$r2" != timeout ] && [ "$seen" = 200 ] && r=0 || r=1
  check "two replicas share a live pool through PostgreSQL on the host" $r "ready ${r1} s / ${r2} s; write seq $seq on one, read on the other: $seen"
  pgrun "$pgbin/pg_ctl" -D "$pgdir/data" -m immediate -w stop >/dev/null; rm -rf "$pgdir"
else
  log "no PostgreSQL server binaries on the host (make tools installs them): shared-store check not run"
fi

if [ "$failed" != 0 ]; then
  for c in "${containers[@]}"; do
    "${podman[@]}" container exists "$c" && { echo "--- $c log:"; "${podman[@]}" logs "$c" 2>&1 | tail -n 15; }
  done
fi
echo "container-check: image $((size / 1000000)) MB, $(( $(date +%s) - started )) s in all"
echo "container-check: $passed passed, $failed failed"
[ "$failed" = 0 ]
