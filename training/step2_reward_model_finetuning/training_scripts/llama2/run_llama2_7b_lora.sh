#!/usr/bin/env bash
# Step 2 (reward model): Llama-2-7B with LoRA (rank 128) on one node, ZeRO-3 with offload.
#   DeepSpeed-Chat's training_scripts/llama2/run_llama2_7b_lora.sh: the same model, data and hyperparameters.
# Usage: bash training_scripts/llama2/run_llama2_7b_lora.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step2_reward_model_finetuning)
set -euo pipefail
OUTPUT=${1:-./output_step2_run_llama2_7b_lora}
ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path meta-llama/Llama-2-7b-hf \
   --num_padding_at_beginning 0 \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --offload \
   --lora_dim 128 \
   --lora_module_name layers. \
   --dtype fp16 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
