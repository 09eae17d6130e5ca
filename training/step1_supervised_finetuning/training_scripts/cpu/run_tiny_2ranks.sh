#!/usr/bin/env bash
# Step 1 (SFT) on CPU with two ranks (gloo), the tiny default, ZeRO-2 by default (ZeRO-3 works, slower).
# Usage: bash training_scripts/cpu/run_tiny_2ranks.sh [OUTPUT_DIR] [ZERO_STAGE]
set -euo pipefail
OUTPUT=${1:-./output_step1_tiny_2ranks}
ZERO_STAGE=${2:-2}
mkdir -p "$OUTPUT"
export OMP_NUM_THREADS=1   # two ranks on two cores: one thread each

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" main.py \
   --data_path synthetic/arithmetic \
   --model_name_or_path tiny/opt \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 16 \
   --max_seq_len 64 \
   --learning_rate 1e-3 \
   --num_train_epochs 2 \
   --dtype auto \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
