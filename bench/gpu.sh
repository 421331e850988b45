#!/usr/bin/env bash
# All benchmarks on one GPU in under 8 minutes, ending with ONE table (bench/README.md explains the rows).
#
#   bash bench/gpu.sh [OUT_DIR]          # results.jsonl, log.txt and summary.md land in OUT_DIR (default $OUT or
#                                        # /tmp/bench_gpu)
#
# Self-contained for a machine that has torch, lightning, transformers, safetensors but not diffusers: wheels in
# .whl/ (see bench/README.md) are installed into /tmp/site first. Without diffusers only the ldm rows are measured.
# Every run has its own time limit and the whole script a budget (BENCH_BUDGET_S, default 470 s); a run that does
# not fit in what is left is skipped and listed as such, the most expensive (compiled) runs come last.
#
# Issue 28 on the GPU, in the same run: the host-sync and compile tests (pytest; they need hydra-core, omegaconf
# and antlr4-python3-runtime wheels in .whl/, else they are skipped and listed), the memory table of one training
# step (bench/memory.py, bf16 autocast: sd15 at 512 px and sdxl at 1024 px, every row), the cold-cache first epoch
# (bench/first_epoch.py where this checkout has it; BENCH_FIRST_EPOCH_ARGS, and DIFFUSERS_T2I=<diffusers'
# train_text_to_image.py> for the comparison), and the step throughput rows above.
#
# Overrides (used by the CPU smoke test, or to try other sizes): BENCH_DEVICE, BENCH_PRESET, BENCH_RES_LO,
# BENCH_RES_HI, BENCH_BATCH_LO, BENCH_BATCH_HI, BENCH_VAE, BENCH_TEXT, BENCH_CACHE_RES, BENCH_CACHE_BATCH,
# BENCH_QUICK=1 (one round of one step), BENCH_SKIP_COMPILE=1, BENCH_DATA=1 (also the CPU data bench),
# BENCH_MEM_PRESETS (default "sd15:512 sdxl:1024"), BENCH_MEM_ROWS, BENCH_SKIP_TESTS=1, BENCH_SKIP_FIRST_EPOCH=1.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/bench_gpu}}
mkdir -p "$OUT_DIR"
RESULTS=$OUT_DIR/results.jsonl
LOG=$OUT_DIR/log.txt
: >"$RESULTS"
: >"$LOG"
START=$(date +%s)
BUDGET=${BENCH_BUDGET_S:-470}
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

# starts LABEL LIMIT_S WHAT: say the run starts if LIMIT_S fits in the budget left, else record it as skipped (1)
starts() {
    local label=$1 limit=$2 what=$3
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$limit" ]; then
        echo "SKIP $label: needs up to ${limit}s, ${left}s of the budget left" | tee -a "$LOG"
        echo "{\"bench\": \"skipped\", \"label\": \"$label\", \"note\": \"skipped: needs ${limit}s, ${left}s left\"}" >>"$RESULTS"
        return 1
    fi
    echo "=== $label: $what (limit ${limit}s, ${left}s left)" | tee -a "$LOG"
}

# run LABEL LIMIT_S SCRIPT ARGS...: run one benchmark if LIMIT_S fits in the budget left; its rows go to RESULTS
run() {
    local label=$1 limit=$2 script=$3
    shift 3
    starts "$label" "$limit" "$script $*" || return 0
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

# run_cmd LABEL LIMIT CMD...: like run, for a command that is not a bench script taking --label / --json
run_cmd() {
    local label=$1 limit=$2
    shift 2
    starts "$label" "$limit" "$*" || return 0
    local t0=$(date +%s) one=$OUT_DIR/$label.log
    timeout -k 10 "$limit" "$@" >"$one" 2>&1
    local rc=$?
    cat "$one" >>"$LOG"
    echo "    rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
    tail -n 3 "$one" | sed 's/^/    /'
    local status=passed
    [ "$rc" = 0 ] || status="failed rc=$rc (see log.txt)"
    echo "{\"bench\": \"$label\", \"label\": \"$label\", \"note\": \"$status: $(tail -n 1 "$one" | tr -d '\"\\' | cut -c1-120)\"}" >>"$RESULTS"
    rm -f "$one"
}

# issue 28, items 1-2: the host-sync and compile tests (they build runs through Hydra)
if [ "${BENCH_SKIP_TESTS:-0}" != 1 ]; then
    if $PY -c "import hydra, omegaconf, pytest" >>"$LOG" 2>&1; then
        run_cmd host-sync-compile-tests 120 $PY -m pytest -q -x -p no:cacheprovider tests/training/test_host_syncs.py \
            tests/training/test_unet_compile.py
    else
        echo "SKIP host-sync-compile-tests: hydra-core / omegaconf / pytest not importable (carry their wheels in .whl/)" \
            | tee -a "$LOG"
        echo '{"bench": "skipped", "label": "host-sync-compile-tests", "note": "skipped: no hydra/omegaconf wheels"}' >>"$RESULTS"
    fi
fi

# issue 28, item 3: peak memory of one training step per way of training, bf16 autocast, at the native resolutions
for spec in ${BENCH_MEM_PRESETS:-sd15:512 sdxl:1024}; do
    run "memory-${spec%%:*}-${spec##*:}" 100 memory.py --device "$DEVICE" --precision bf16 --presets "${spec%%:*}" \
        --resolution "${spec##*:}" --native "${spec##*:}" --fit-resolutions "" ${BENCH_MEM_ROWS:+--rows $BENCH_MEM_ROWS}
done

# issue 28, item 4: the first epoch with a cold latent cache (bench/first_epoch.py): train.py trainer=gpu end to end
# in bf16-mixed (the cache built on the GPU in bfloat16) against diffusers' script with --mixed_precision=bf16.
if [ "${BENCH_SKIP_FIRST_EPOCH:-0}" != 1 ]; then
    if [ -f bench/first_epoch.py ] && $PY -c "import hydra, omegaconf" >>"$LOG" 2>&1; then
        run_cmd first-epoch 150 $PY bench/first_epoch.py ${BENCH_FIRST_EPOCH_ARGS:---size encoders --pairs 3 \
            --precision bf16 --device $([ "$DEVICE" = cpu ] && echo cpu || echo cuda)} \
            --json "$RESULTS" ${DIFFUSERS_T2I:+--diffusers-script "$DIFFUSERS_T2I"}
    else
        echo "SKIP first-epoch (HOOK): bench/first_epoch.py or hydra/omegaconf missing in this checkout" | tee -a "$LOG"
        echo '{"bench": "skipped", "label": "first-epoch", "note": "skipped: HOOK, bench/first_epoch.py or hydra missing"}' >>"$RESULTS"
    fi
fi

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
