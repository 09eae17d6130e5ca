#!/usr/bin/env bash
# Step 2 (reward model): OPT-350M on one GPU.
#   DeepSpeed-Chat's training_scripts/opt/single_gpu/run_350m.sh, which sets the model, weight decay, dropout and
#   4 steps of gradient accumulation and leaves the rest to main.py's defaults: written out here.
# Usage: bash training_scripts/opt/single_gpu/run_350m.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step2_reward_model_finetuning)
set -euo pipefail
OUTPUT=${1:-./output_step2_run_350m}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed --num_gpus 1 main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-350m \
   --num_padding_at_beginning 1 \
   --per_device_train_batch_size 16 \
   --per_device_eval_batch_size 16 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 4 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --dtype fp16 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
