#!/usr/bin/env bash
# Step 1 (SFT): OPT-13B with LoRA (rank 128) on one node.
#   DeepSpeed-Chat's training_scripts/opt/single_node/run_13b.sh: the same model, data and hyperparameters.
# Usage: bash training_scripts/opt/single_node/run_13b.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step1_supervised_finetuning)
set -euo pipefail
OUTPUT=${1:-./output_step1_run_13b}
ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-13b \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 1e-4 \
   --weight_decay 0. \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --lora_dim 128 \
   --lora_module_name decoder.layers. \
   --dtype fp16 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
