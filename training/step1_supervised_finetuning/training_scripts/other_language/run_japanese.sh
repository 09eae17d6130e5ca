#!/usr/bin/env bash
# Step 1 (SFT) in Japanese: mGPT (1.3B, multilingual) on four Japanese datasets, on one node; --data_split 10,0,0
#   keeps every row for step 1 (the data holds one reply per prompt).
#   DeepSpeed-Chat's training_scripts/other_language/run_japanese.sh: the same model, data and hyperparameters,
#   without its --deepspeed_config ./ds_config.json (a file DeepSpeed-Chat does not ship).
#   On CPU with the shared Japanese files and the tiny model: training_scripts/cpu/run_japanese_tiny.sh.
# Usage: bash training_scripts/other_language/run_japanese.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step1_supervised_finetuning)
set -euo pipefail
OUTPUT=${1:-./output_step1_run_japanese}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path mkqa-Japanese Cohere/miracl-ja-queries-22-12 lmqg/qg_jaquad lmqg/qag_jaquad \
   --data_split 10,0,0 \
   --model_name_or_path sberbank-ai/mGPT \
   --per_device_train_batch_size 2 \
   --per_device_eval_batch_size 2 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0. \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
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
