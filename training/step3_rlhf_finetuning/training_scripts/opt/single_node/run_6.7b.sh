#!/usr/bin/env bash
# Step 3 (PPO): OPT-6.7B actor, OPT-350M reward model and critic, one node, Hybrid Engine.
#   DeepSpeed-Chat's training_scripts/opt/single_node/run_6.7b.sh: the same data and hyperparameters.
# Usage: bash training_scripts/opt/single_node/run_6.7b.sh [ACTOR_PATH] [CRITIC_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT_DIR]
#   (run from training/step3_rlhf_finetuning; the defaults are the outputs of the matching step-1 and step-2 scripts)
set -euo pipefail
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output_step1_run_6.7b}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_run_350m}
ACTOR_ZERO_STAGE=${3:-3}
CRITIC_ZERO_STAGE=${4:-3}
OUTPUT=${5:-./output_step3_6.7b}
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 1 \
   --per_device_generation_batch_size 4 \
   --per_device_training_batch_size 4 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --actor_dropout 0.0 \
   --enable_hybrid_engine \
   --actor_gradient_checkpointing \
   --dtype fp16 \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
