#!/usr/bin/env bash
# The device check (README, "GPU"), carried in device-bundle/ (`make device-bundle`) and run on
# a GPU machine whose torch 2.11.0+cu130 is in /opt/torch/.venv:
#
#   bash device-bundle/gpu-check.sh OUTDIR
#
# Prints a markdown report and writes it to OUTDIR/gpu-check.md as it goes (the servers' logs
# to OUTDIR/logs/); large files (model, pools, stores) go to a temp dir, removed at the end:
#   1. libtorch sees CUDA (else it stops at once, loudly, exit 3)
#   2. a random-weight model of the default model's shape (MiniLM: 6 layers, d = 384, 12
#      heads, vocab 30522; m = 64; two encoders), written from model-template/
#   3. parity, CUDA vs CPU fp32: context codes, candidate vectors, scores (max abs diff) and
#      top-10 rankings, in float32 and float16 / bfloat16 compute
#   4. `serve --device cuda` answering /rank and /encode
#   5. /rank latency (p50 / p95 / p99, one client, closed loop) at 100k and 1M candidates
#      (random unit vectors written straight into the pool cache, as the bench does; a fresh
#      store per run, seeded from that cache), with --dtype float32 / float16 / bfloat16
# Exit status: 0 all passed, 1 a check failed, 2 bad usage or bundle, 3 no CUDA.
#
# Options:
#   --dry-run        on CPU, no GPU needed: device cpu, 10k candidates, a smaller parity set
#   --device D       cuda (default), cuda:N or cpu
#   --sizes LIST     pool sizes of step 5 (default 100000,1000000; 10000 with --dry-run)
#   --seconds S      load per latency row (default 5)
#   --parity-n N     candidates in the parity check (default 1000; 200 with --dry-run)
#   --torch-lib DIR  libtorch 2.11's lib dir (default $POLYRANK_TORCH_LIB or
#                    /opt/torch/.venv/lib/python3.12/site-packages/torch/lib); the nvidia-*
#                    wheels' lib dirs beside it (site-packages/nvidia/*/lib) are added too
#   --extra-lib DIR  put first on LD_LIBRARY_PATH (the dry run's CUDA stubs)
#   --bundle DIR     where polyrank and gpu_check are (default: beside this script, or
#                    ../device-bundle from scripts/)
#   --budget S       stop starting new measurements after S seconds (default 420: the GPU
#                    machine's run allows 8 minutes)
set -uo pipefail

# die MESSAGE [STATUS]
die() { echo "gpu-check: FAILED: $1" >&2; [ -n "${MD:-}" ] && echo "**FAILED: $1**" >> "$MD"; exit "${2:-2}"; }
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

OUTDIR="" DRY=0 DEVICE="" SIZES="" LOAD_S=5 PARITY_N="" EXTRA_LIB="" BUNDLE="" BUDGET=420
TORCH_LIB=${POLYRANK_TORCH_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/torch/lib}
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --device) DEVICE=$2; shift ;;
        --sizes) SIZES=$2; shift ;;
        --seconds) LOAD_S=$2; shift ;;
        --parity-n) PARITY_N=$2; shift ;;
        --torch-lib) TORCH_LIB=$2; shift ;;
        --extra-lib) EXTRA_LIB=$2; shift ;;
        --bundle) BUNDLE=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) [ -z "$OUTDIR" ] || die "one OUTDIR only"; OUTDIR=$1 ;;
    esac
    shift
done
[ -n "$OUTDIR" ] || { usage >&2; die "OUTDIR is required"; }
if [ $DRY = 1 ]; then
    DEVICE=${DEVICE:-cpu} SIZES=${SIZES:-10000} PARITY_N=${PARITY_N:-200}
else
    DEVICE=${DEVICE:-cuda} SIZES=${SIZES:-100000,1000000} PARITY_N=${PARITY_N:-1000}
fi
DEADLINE=$((SECONDS + BUDGET))

here=$(cd "$(dirname "$0")" && pwd)
if [ -z "$BUNDLE" ]; then
    if [ -x "$here/polyrank" ]; then BUNDLE=$here
    elif [ -x "$here/../device-bundle/polyrank" ]; then BUNDLE=$(cd "$here/../device-bundle" && pwd)
    else die "no bundle beside $0 or in ../device-bundle: run make device-bundle, or pass --bundle DIR"; fi
fi
BIN=$BUNDLE/polyrank TOOL=$BUNDLE/gpu_check
for f in "$BIN" "$TOOL" "$BUNDLE/config.toml" "$BUNDLE/pool.jsonl" "$BUNDLE/model-template/config.json"; do
    [ -e "$f" ] || die "the bundle lacks $f"
done

mkdir -p "$OUTDIR/logs" || die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd) LOGS=$OUTDIR/logs MD=$OUTDIR/gpu-check.md
: > "$MD"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || die "no temp dir"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Only the flags below configure the servers.
for v in $(compgen -e | grep '^POLYRANK_'); do unset "$v"; done
FAILED=0

emit() { printf '%s\n' "$*" | tee -a "$MD"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
left() { echo $((DEADLINE - SECONDS)); }
fail() { FAILED=1; echo "gpu-check: $*" >&2; }

# --- libraries -------------------------------------------------------------------------------
[ -f "$TORCH_LIB/libtorch_cpu.so" ] || die "libtorch not found in $TORCH_LIB: pass --torch-lib DIR (the torch 2.11 wheel's torch/lib)"
TORCH_LIB=$(cd "$TORCH_LIB" && pwd)
nv=""
for d in "$TORCH_LIB"/../../nvidia/*/lib; do
    [ -d "$d" ] && nv="$nv:$(cd "$d" && pwd)"
done
export LD_LIBRARY_PATH="${EXTRA_LIB:+$(cd "$EXTRA_LIB" && pwd):}$TORCH_LIB$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if command -v ldd >/dev/null; then
    missing=$(ldd "$BIN" 2>&1 | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
    [ -z "$missing" ] || die "libraries not found: $missing(LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
fi

gpu=""
if command -v nvidia-smi >/dev/null; then
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4 | tr '\n' ';')
fi
emit "## GPU check ($(date -u +%Y-%m-%d\ %H:%M\ UTC))"
emit ""
[ $DRY = 1 ] && emit "**Dry run on CPU** (--dry-run): no GPU involved; sizes $SIZES."
emit "Host: $(nproc) cores; GPU: ${gpu:-none (nvidia-smi: not found)}; device \`$DEVICE\`."
emit "Bundle: $(sed -n 2p "$BUNDLE/BUILD-INFO" 2>/dev/null); $(sed -n 3p "$BUNDLE/BUILD-INFO" 2>/dev/null)."
emit "libtorch at run time: $TORCH_LIB ($(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$TORCH_LIB/../version.py" 2>/dev/null || echo '?'))."
emit ""

# --- 1. CUDA visible -------------------------------------------------------------------------
info=$("$TOOL" cuda-info 2>"$LOGS/cuda-info.err"); rc=$?
echo "$info" > "$LOGS/cuda-info.txt"
count=$(sed -n 's/^cuda_device_count=//p' <<<"$info")
cudnn=$(sed -n 's/^cudnn_available=//p' <<<"$info")
if [ "$DEVICE" != cpu ] && [ $rc != 0 ]; then
    emit "**FAILED: CUDA is not visible to libtorch** (device count ${count:-?}, exit $rc: $(head -c 300 "$LOGS/cuda-info.err" | tr '\n' ' '))."
    emit "nvidia-smi: ${gpu:-not found}. LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    emit "Run it on a machine with an NVIDIA GPU and driver, or use --dry-run for the CPU path."
    exit 3
fi

emit "| check | result |"
emit "|---|---|"
if [ "$DEVICE" = cpu ]; then
    emit "| CUDA visible to libtorch | not needed (device cpu); device count ${count:-?} |"
else
    emit "| CUDA visible to libtorch | yes: $count device(s), cuDNN $cudnn, a tensor made and summed on cuda:0 |"
fi

# --- 2. the model ----------------------------------------------------------------------------
t=$(now)
if "$TOOL" write-model --template "$BUNDLE/model-template" --out "$WORK/model" 2>"$LOGS/write-model.log"; then
    cfg() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" "$WORK/model/$2" | head -1; }
    D=$(cfg hidden_size config.json)
    emit "| random-weight model, default's shape | written in $(since "$t") s: $(cfg num_hidden_layers config.json) layers, d = $D, $(cfg num_attention_heads config.json) heads, intermediate $(cfg intermediate_size config.json), vocab $(cfg vocab_size config.json), m = $(cfg n_codes polyrank.json), $([ -d "$WORK/model/candidate_encoder" ] && echo "two encoders" || echo "one encoder") |"
else
    emit "| random-weight model | FAILED: $(tail -2 "$LOGS/write-model.log" | tr '\n' ' ') |"
    die "no model, nothing else to check" 1
fi

if "$BIN" serve --help 2>/dev/null | grep -q -- '--dtype'; then
    DTYPES="float32 float16 bfloat16"
else
    DTYPES="float32"
fi
dtype_skipped() { [ "$1" != float32 ] && [ "$DTYPES" = float32 ]; }

# --- servers ---------------------------------------------------------------------------------
# http METHOD URL [JSON]: sets CODE and BODY (curl, or gpu_check's client where curl is missing).
http() {
    local out
    if command -v curl >/dev/null && [ -z "${GPU_CHECK_NO_CURL:-}" ]; then
        local a=(-s -m 120 -w '\n%{http_code}' -X "$1")
        [ $# -ge 3 ] && a+=(-H 'content-type: application/json' --data-binary "$3")
        out=$(curl "${a[@]}" "$2")
        CODE=${out##*$'\n'} BODY=${out%$'\n'*}
    else
        out=$("$TOOL" http "$@")
        CODE=${out%%$'\n'*} BODY=${out#*$'\n'}
    fi
}
json_num() { sed -n "s/.*\"$1\":\([-0-9.eE+]*\).*/\1/p" <<<"$2" | head -1; }
ms() { awk -v x="$(json_num "$1" "$2")" 'BEGIN { printf "%.2f", x }'; }

# start_server NAME LIMIT_S ARGS...: serve on a free loopback port; waits for /health/ready.
# Sets ADDR, READY_S; on failure WHY and returns 1.
start_server() {
    local name=$1 limit=$((SECONDS + $2)) t log=$LOGS/$1.log
    shift 2
    t=$(now)
    : > "$log"
    RUST_LOG=info "$BIN" serve --config "$BUNDLE/config.toml" --host 127.0.0.1 --port 0 --device "$DEVICE" "$@" >"$log" 2>&1 &
    SERVER_PID=$! ADDR=""
    while :; do
        [ -n "$ADDR" ] || ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log" | head -1)
        if [ -n "$ADDR" ]; then
            http GET "http://$ADDR/health/ready"
            [ "$CODE" = 200 ] && break
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID"
            WHY="exited ($?): $(grep -v '^\s*$' "$log" | tail -2 | cut -c1-300 | tr '\n' ' ')" SERVER_PID=""
            return 1
        fi
        if [ $SECONDS -ge $limit ]; then
            WHY="not ready after $(since "$t") s ($(http GET "http://$ADDR/health/ready"; echo "$BODY"))"
            stop_server
            return 1
        fi
        sleep 0.2
    done
    READY_S=$(since "$t")
}
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
}

# --- 3. serve: /rank and /encode -------------------------------------------------------------
limit=$(( $(left) > 200 ? 180 : $(left) - 20 ))
if start_server serve-small "$limit" --model-dir "$WORK/model" --candidates "$BUNDLE/pool.jsonl" \
        --cache-dir "$WORK/cache-small" --store-dir "$WORK/store-small"; then
    n=$(wc -l < "$BUNDLE/pool.jsonl")
    emit "| \`serve --device $DEVICE\` ready | in $READY_S s ($n candidates encoded at start) |"
    http GET "http://$ADDR/info"
    echo "$BODY" > "$LOGS/info.json"
    grep -q "\"device\":\"$DEVICE\"" <<<"$BODY" && emit "| /info | 200, device \"$DEVICE\", dtype $(sed -n 's/.*"dtype":"\([a-z0-9]*\)".*/\1/p' <<<"$BODY") |" \
        || { emit "| /info | FAILED: $CODE $(head -c 200 <<<"$BODY") |"; fail "/info"; }
    http POST "http://$ADDR/rank" '{"context": ["hello there", "what is your favourite food?"], "top_k": 5}'
    echo "$BODY" > "$LOGS/rank.json"
    hits=$(grep -o '"id":' <<<"$BODY" | wc -l)
    if [ "$CODE" = 200 ] && [ "$hits" = 5 ]; then
        emit "| POST /rank (top_k 5 of $n) | 200, 5 results, took_ms $(ms took_ms "$BODY") |"
    else
        emit "| POST /rank | FAILED: $CODE $(head -c 200 <<<"$BODY") |"; fail "/rank"
    fi
    for kind in context candidate; do
        http POST "http://$ADDR/encode" "{\"texts\": [\"what is your favourite food?\", \"i love pizza\"], \"kind\": \"$kind\"}"
        echo "$BODY" > "$LOGS/encode-$kind.json"
        dim=$(json_num dim "$BODY") m=$(json_num m "$BODY")
        if [ "$CODE" = 200 ] && [ "$dim" = "$D" ]; then
            emit "| POST /encode ($kind, 2 texts) | 200, dim $dim${m:+, m $m}, took_ms $(ms took_ms "$BODY") |"
        else
            emit "| POST /encode ($kind) | FAILED: $CODE $(head -c 200 <<<"$BODY") |"; fail "/encode $kind"
        fi
    done
    stop_server
else
    emit "| \`serve --device $DEVICE\` | FAILED: $WHY |"
    fail "serve"
fi
emit ""

# --- 4. parity -------------------------------------------------------------------------------
emit "### Parity: $DEVICE vs CPU float32, same weights"
emit ""
pd=$(tr ' ' , <<<"$DTYPES")
if "$TOOL" parity --model "$WORK/model" --pool "$BUNDLE/pool.jsonl" --device "$DEVICE" --n "$PARITY_N" \
        --contexts 32 --dtypes "$pd" > "$LOGS/parity.md" 2>"$LOGS/parity.err"; then
    tee -a "$MD" < "$LOGS/parity.md"
    grep -q FAILED "$LOGS/parity.md" && fail "parity row failed"
else
    emit "FAILED: $(tail -3 "$LOGS/parity.err" | tr '\n' ' ')"; fail "parity"
fi
for d in float16 bfloat16; do
    dtype_skipped $d && emit "$DEVICE $d: skipped: --dtype not supported by this binary"
done
emit ""

# --- 5. /rank latency ------------------------------------------------------------------------
emit "### /rank latency: one client, closed loop, ${LOAD_S} s per row, top_k 10"
emit ""
emit "| candidates | dtype | ready after start (s) | p50 ms | p95 ms | p99 ms | req/s | errors |"
emit "|---|---|---|---|---|---|---|---|"
for n in ${SIZES//,/ }; do
    if [ "$(left)" -lt 30 ]; then
        emit "| $n | all | skipped: time budget (--budget $BUDGET) | | | | | |"; continue
    fi
    t=$(now)
    if ! pool=$("$TOOL" synthetic-pool --model "$WORK/model" --dir "$WORK/pool-$n" --n "$n" 2>"$LOGS/pool-$n.err"); then
        emit "| $n | all | FAILED: synthetic pool: $(tail -2 "$LOGS/pool-$n.err" | tr '\n' ' ') | | | | | |"; fail "pool $n"; continue
    fi
    echo "gpu-check: $n-candidate pool cache written in $(since "$t") s" >&2
    for dtype in float32 float16 bfloat16; do
        if dtype_skipped $dtype; then
            emit "| $n | $dtype | skipped: --dtype not supported by this binary | | | | | |"; continue
        fi
        if [ "$(left)" -lt 30 ]; then
            emit "| $n | $dtype | skipped: time budget (--budget $BUDGET) | | | | | |"; continue
        fi
        args=(--model-dir "$WORK/model" --candidates "$pool" --cache-dir "$WORK/pool-$n/cache" --store-dir "$WORK/store-$n-$dtype")
        [ "$DTYPES" = float32 ] || args+=(--dtype "$dtype")
        if ! start_server "rank-$n-$dtype" $(( $(left) - 10 )) "${args[@]}"; then
            emit "| $n | $dtype | FAILED: $WHY | | | | | |"; fail "serve $n $dtype"; rm -rf "$WORK/store-$n-$dtype"; continue
        fi
        # The store must have been seeded from the synthetic cache, not by encoding the texts.
        reused=$(grep -c 'pool cache reused' "$LOGS/rank-$n-$dtype.log")
        r=$("$TOOL" load --url "http://$ADDR/rank" --seconds "$LOAD_S" 2>>"$LOGS/rank-$n-$dtype.log")
        stop_server
        rm -rf "$WORK/store-$n-$dtype"
        errors=$(json_num errors "$r") reqs=$(json_num requests "$r")
        note=""
        [ "$reused" != 0 ] || { note=" FAILED: the pool cache was not used (logs/rank-$n-$dtype.log)"; fail "cache $n $dtype"; }
        emit "| $n | $dtype | $READY_S$note | $(ms p50_ms "$r") | $(ms p95_ms "$r") | $(ms p99_ms "$r") | $(ms rps "$r") | ${errors:-?} of $((${reqs:-0} + ${errors:-0})) |"
        { [ -n "$reqs" ] && [ "$reqs" -gt 0 ] && [ "$errors" = 0 ]; } || fail "load $n $dtype"
    done
    rm -rf "$WORK/pool-$n"
done
emit ""
if [ $FAILED = 0 ]; then
    emit "All checks passed ($SECONDS s)."
else
    emit "**Some checks FAILED** ($SECONDS s): see the rows above and $LOGS."
fi
exit $FAILED
