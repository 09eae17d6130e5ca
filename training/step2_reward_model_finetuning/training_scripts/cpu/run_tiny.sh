#!/usr/bin/env bash
# Step 2 (reward model) on CPU: the tiny default on the built-in synthetic copy pairs (DATA_PATH overrides), fp32, one rank.
# Usage: bash training_scripts/cpu/run_tiny.sh [OUTPUT_DIR] [ZERO_STAGE] [MODEL]
#   (run from training/step2_reward_model_finetuning; MODEL: tiny/opt (default), tiny/llama, or a step-1 output)
set -euo pipefail
OUTPUT=${1:-./output_step2_tiny}
ZERO_STAGE=${2:-0}
MODEL=${3:-tiny/opt}
mkdir -p "$OUTPUT"
DATA_PATH=${DATA_PATH:-synthetic/copy}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended last, so its flags override the ones above
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}" main.py \
   --data_path "$DATA_PATH" \
   --data_split 2,4,4 \
   --model_name_or_path "$MODEL" \
   --per_device_train_batch_size 16 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 96 \
   --learning_rate 5e-4 \
   --weight_decay 0.01 \
   --num_train_epochs 1 \
   --num_warmup_steps 20 \
   --eval_interval 100 \
   --eval_iters 20 \
   --dtype auto \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   $EXTRA_ARGS \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
