#!/usr/bin/env bash
# Step 1 (SFT) in Chinese: BLOOM-1.1B on four Chinese datasets, on one node. These datasets mostly hold one reply
#   per prompt (no rejected one), so only step 1 trains on them: --data_split 10,0,0 keeps every row for step 1.
#   DeepSpeed-Chat's training_scripts/other_language/run_chinese.sh: the same model, data and hyperparameters.
#   On CPU with the shared Chinese files and the tiny model: training_scripts/cpu/run_chinese_tiny.sh.
# Usage: bash training_scripts/other_language/run_chinese.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step1_supervised_finetuning)
set -euo pipefail
OUTPUT=${1:-./output_step1_run_chinese}
ZERO_STAGE=${2:-2}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path wangrui6/Zhihu-KOL Cohere/miracl-zh-queries-22-12 Hello-SimpleAI/HC3-Chinese mkqa-Chinese \
   --data_split 10,0,0 \
   --model_name_or_path bigscience/bloom-1b1 \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
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
