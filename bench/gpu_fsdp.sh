#!/usr/bin/env bash
# trainer=fsdp on the lent GPU: what CPU ranks cannot run, because Lightning 2.6's FSDPStrategy refuses a CPU
# accelerator ("requires a GPU accelerator"). The sharding itself (torch FSDP2 on the U-Net's blocks, full and
# sharded state dicts, exact resume, a sharded checkpoint joined into one file) is tested on 2 CPU ranks by
# tests/training/test_fsdp_cpu.py (a LoRA on the sharded U-Net: test_fsdp_lora_cpu.py; Lightning's FSDP2
# ModelParallelStrategy, which runs on CPU: test_fsdp_lightning_cpu.py); this script runs the Lightning FSDPStrategy
# path of train.py end to end on one GPU (1 rank: FSDP's code
# paths, not its memory saving) and prints PASS/FAIL per check. NOT RUN YET (written without a GPU; issue 33).
#
#   bash bench/gpu_fsdp.sh [OUT_DIR]       # bench/gpu.sh may call it as its own block; ~2-3 min
#
# Checks: (1) train.py trainer=fsdp (FULL_SHARD, state_dict_type=full) trains the tiny model 6 steps and writes a
# plain last.ckpt; (2) the same run stopped at step 3 and resumed with ckpt_path=last logs the same losses and ends
# with the same weights as (1); (3) state_dict_type=sharded writes a checkpoint folder, which Lightning's
# consolidate_checkpoint joins into one file, which `python -m ldm.export` exports; (4) adapter=lora under FSDP;
# (5) the same for trainer=fsdp2 (FSDP2 through ModelParallelStrategy, which also runs on CPU ranks: tested there by
# tests/training/test_fsdp2_train.py): 6 steps to a sharded checkpoint folder, stop at 3 + resume exact, export
# straight from the folder, adapter=lora.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/bench_fsdp}}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/fsdp_log.txt
: >"$LOG"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TINY=(model.unet.model_channels=64 'model.unet.channel_mult=[1,1]' 'model.unet.attention_levels=[1]'
      model.unet.num_head_channels=32 model.autoencoder.preset=tiny model.autoencoder.weights=null data.batch_size=4
      data.train.resolution=16 data.val.resolution=16 data.train.size=48 trainer.val_check_interval=null
      trainer.limit_val_batches=0 trainer.enable_progress_bar=false trainer.log_every_n_steps=1 callbacks=none
      lr_scheduler.warmup_steps=1 trainer=fsdp trainer.devices=1 trainer.precision=32 trainer.deterministic=false
      +callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint
      '+callbacks.checkpoint.dirpath=${paths.run_dir}/checkpoints' +callbacks.checkpoint.save_last=true
      +callbacks.checkpoint.every_n_train_steps=3 +logger.csv.flush_logs_every_n_steps=1
      "paths.cache_dir=$OUT_DIR/cache")
check() {  # name, then the command; PASS/FAIL lines are the result
    local name=$1; shift
    if timeout 600 "$@" >>"$LOG" 2>&1; then echo "PASS $name" | tee -a "$LOG"; else echo "FAIL $name (see $LOG)" | tee -a "$LOG"; fi
}
check "fsdp full state dict: 6 steps" $PY train.py "${TINY[@]}" trainer.max_steps=6 "paths.run_dir=$OUT_DIR/full"
check "fsdp stop at step 3" $PY train.py "${TINY[@]}" trainer.max_steps=3 "paths.run_dir=$OUT_DIR/resumed"
check "fsdp resume to step 6" $PY train.py "${TINY[@]}" trainer.max_steps=6 "paths.run_dir=$OUT_DIR/resumed" ckpt_path=last
check "fsdp resume is exact" $PY - "$OUT_DIR" <<'PYEOF'
import sys, torch
from pathlib import Path
out = Path(sys.argv[1])
a = torch.load(out / "full/checkpoints/last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
b = torch.load(out / "resumed/checkpoints/last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
print(f"max |uninterrupted - resumed| = {diff:.3e} over {len(a)} tensors")
assert a.keys() == b.keys() and diff == 0.0
PYEOF
check "fsdp sharded state dict: 3 steps" $PY train.py "${TINY[@]}" trainer.max_steps=3 \
    trainer.strategy.state_dict_type=sharded "paths.run_dir=$OUT_DIR/sharded"
check "join the sharded checkpoint" $PY -m lightning.pytorch.utilities.consolidate_checkpoint \
    "$OUT_DIR/sharded/checkpoints/last.ckpt"
check "export from the joined sharded checkpoint" $PY -m ldm.export \
    "$OUT_DIR/sharded/checkpoints/last.ckpt.consolidated" --format ldm --out "$OUT_DIR/exported"
check "fsdp with a LoRA adapter: 3 steps" $PY train.py "${TINY[@]}" trainer.max_steps=3 adapter=lora \
    "paths.run_dir=$OUT_DIR/lora"
FSDP2=("${TINY[@]/#trainer=fsdp/trainer=fsdp2}")  # the same tiny run under trainer=fsdp2 (sharded checkpoints)
check "fsdp2: 6 steps" $PY train.py "${FSDP2[@]}" trainer.max_steps=6 "paths.run_dir=$OUT_DIR/fsdp2"
check "fsdp2 stop at step 3" $PY train.py "${FSDP2[@]}" trainer.max_steps=3 "paths.run_dir=$OUT_DIR/fsdp2_resumed"
check "fsdp2 resume to step 6" $PY train.py "${FSDP2[@]}" trainer.max_steps=6 "paths.run_dir=$OUT_DIR/fsdp2_resumed" \
    ckpt_path=last
check "fsdp2 resume is exact" $PY - "$OUT_DIR" <<'PYEOF'
import sys
from pathlib import Path
from ldm.formats.training_checkpoint import read_checkpoint  # reads the sharded folder
out = Path(sys.argv[1])
a = read_checkpoint(out / "fsdp2/checkpoints/last.ckpt")["state_dict"]
b = read_checkpoint(out / "fsdp2_resumed/checkpoints/last.ckpt")["state_dict"]
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
print(f"fsdp2: max |uninterrupted - resumed| = {diff:.3e} over {len(a)} tensors")
assert a.keys() == b.keys() and diff == 0.0
PYEOF
check "fsdp2 export from the sharded folder" $PY -m ldm.export "$OUT_DIR/fsdp2/checkpoints/last.ckpt" --format ldm \
    --out "$OUT_DIR/fsdp2_exported"
check "fsdp2 with a LoRA adapter: 3 steps" $PY train.py "${FSDP2[@]}" trainer.max_steps=3 adapter=lora \
    "paths.run_dir=$OUT_DIR/fsdp2_lora"
grep -E "^(PASS|FAIL)" "$LOG"
