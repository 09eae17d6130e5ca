#!/usr/bin/env bash
# Step 2 alternative (DPO): the step-1 OPT-1.3B actor on one GPU with LoRA.
#   The policy starts from step 1's output of the same script (opt/single_gpu/run_1.3b.sh); edit
#   --model_name_or_path to start elsewhere (a hub id such as facebook/opt-1.3b also works).
# Usage: bash training_scripts/opt/single_gpu/run_1.3b.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step2_dpo_finetuning)
set -euo pipefail
OUTPUT=${1:-./output_step2_dpo_run_1.3b}
ZERO_STAGE=${2:-0}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed --num_gpus 1 main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path ../step1_supervised_finetuning/output_step1_run_1.3b \
   --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --learning_rate 5e-5 --weight_decay 0. --dropout 0.0 --lora_dim 128 --only_optimize_lora --lora_learning_rate 5e-5 --beta 0.1 --eval_interval 200 \
   --max_seq_len 512 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage $ZERO_STAGE \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
