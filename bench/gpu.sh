#!/usr/bin/env bash
# All benchmarks on one GPU in under 8 minutes, ending with ONE table (bench/README.md explains the rows).
#
#   bash bench/gpu.sh [OUT_DIR]          # results.jsonl, log.txt and summary.md land in OUT_DIR (default $OUT or
#                                        # /tmp/bench_gpu)
#
# Self-contained for a machine that has torch, lightning, transformers, safetensors but not diffusers: wheels in
# .whl/ (see bench/README.md) are installed into /tmp/site first. Without diffusers only the ldm rows are measured.
# Every run has its own time limit and the whole script a budget (BENCH_BUDGET_S, default 450 s); a run that does
# not fit in what is left is skipped and listed as such, the most expensive (compiled) runs come last.
#
# Overrides (used by the CPU smoke test, or to try other sizes): BENCH_DEVICE, BENCH_PRESET, BENCH_RES_LO,
# BENCH_RES_HI, BENCH_BATCH_LO, BENCH_BATCH_HI, BENCH_VAE, BENCH_TEXT, BENCH_CACHE_RES, BENCH_CACHE_BATCH,
# BENCH_QUICK=1 (one round of one step), BENCH_SKIP_COMPILE=1, BENCH_DATA=1 (also the CPU data bench).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/bench_gpu}}
mkdir -p "$OUT_DIR"
RESULTS=$OUT_DIR/results.jsonl
LOG=$OUT_DIR/log.txt
: >"$RESULTS"
: >"$LOG"
START=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-450}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
IMPLS=ldm,diffusers
if ! $PY -c "import diffusers" >>"$LOG" 2>&1; then
    echo "diffusers is not importable (no .whl/ folder?): measuring ldm only" | tee -a "$LOG"
    IMPLS=ldm
fi
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

DEVICE=${BENCH_DEVICE:-cuda}
PRESET=${BENCH_PRESET:-sd15}
RES_LO=${BENCH_RES_LO:-256}
RES_HI=${BENCH_RES_HI:-512}
B_LO=${BENCH_BATCH_LO:-32}
B_HI=${BENCH_BATCH_HI:-8}
VAE=${BENCH_VAE:-sd}
TEXT=${BENCH_TEXT:-sd15}
CACHE_RES=${BENCH_CACHE_RES:-256}
CACHE_B=${BENCH_CACHE_BATCH:-16}
if [ "${BENCH_QUICK:-0}" = 1 ]; then
    TIMING="--rounds 1 --steps 1 --warmup 1"
    SAMPLE_TIMING="--rounds 1 --steps 1 --warmup 1 --ddim-steps 3 --ddim-rounds 1"
    CACHE_TIMING="--rounds 1 --steps 1 --warmup 1 --samples 32"
else
    TIMING="--rounds 3 --steps 4 --warmup 2"
    SAMPLE_TIMING="--rounds 3 --steps 10 --warmup 2 --ddim-steps 50 --ddim-rounds 2"
    CACHE_TIMING="--rounds 3 --steps 4 --warmup 2 --samples 512"
fi

# run LABEL LIMIT_S SCRIPT ARGS...: run one benchmark if LIMIT_S fits in the budget left; its rows go to RESULTS
run() {
    local label=$1 limit=$2 script=$3
    shift 3
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$limit" ]; then
        echo "SKIP $label: needs up to ${limit}s, ${left}s of the budget left" | tee -a "$LOG"
        echo "{\"bench\": \"skipped\", \"label\": \"$label\", \"note\": \"skipped: needs ${limit}s, ${left}s left\"}" >>"$RESULTS"
        return
    fi
    echo "=== $label: $script $* (limit ${limit}s, ${left}s left)" | tee -a "$LOG"
    local t0=$(date +%s) one=$OUT_DIR/$label.log
    timeout -k 10 "$limit" $PY "bench/$script" --label "$label" --json "$RESULTS" "$@" >"$one" 2>&1
    local rc=$?
    cat "$one" >>"$LOG"
    echo "    rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
    grep -E "^ratio|max \||final latents|cache build" "$one" | sed 's/^/    /'
    if [ "$rc" != 0 ]; then
        grep -E "Error|error|Killed" "$one" | tail -n 3 | sed 's/^/    /'
        echo "{\"bench\": \"failed\", \"label\": \"$label\", \"note\": \"rc=$rc (see log.txt)\"}" >>"$RESULTS"
    fi
    rm -f "$one"
}

T="--device $DEVICE --preset $PRESET --impls $IMPLS"
run train-lo-eager 75 train_step.py $T --resolution "$RES_LO" --batch "$B_LO" $TIMING
run train-hi-eager 75 train_step.py $T --resolution "$RES_HI" --batch "$B_HI" $TIMING
run train-hi-chlast 75 train_step.py $T --resolution "$RES_HI" --batch "$B_HI" --channels-last $TIMING
run sample-eager 60 sample.py $T --resolution "$RES_HI" --batch 1 $SAMPLE_TIMING
run latent-cache 90 latent_cache.py --device "$DEVICE" --unet "$PRESET" --vae "$VAE" --text "$TEXT" \
    --resolution "$CACHE_RES" --batch "$CACHE_B" $CACHE_TIMING
if [ "${BENCH_SKIP_COMPILE:-0}" != 1 ]; then
    run sample-compile 150 sample.py $T --resolution "$RES_HI" --batch 1 --compile $SAMPLE_TIMING
    run train-hi-compile 240 train_step.py $T --resolution "$RES_HI" --batch "$B_HI" --compile $TIMING
fi
run train-lo-chlast 60 train_step.py $T --resolution "$RES_LO" --batch "$B_LO" --channels-last $TIMING
if [ "${BENCH_DATA:-0}" = 1 ]; then
    run data 120 data.py --images 128
fi

echo "total $(($(date +%s) - START))s of a ${BUDGET}s budget" | tee -a "$LOG"
$PY bench/common.py summarize "$RESULTS" | tee "$OUT_DIR/summary.md"
