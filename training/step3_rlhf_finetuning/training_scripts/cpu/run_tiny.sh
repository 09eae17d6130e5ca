#!/usr/bin/env bash
# Step 3 (PPO) on CPU: the tiny default actor and reward model of the CPU scripts of steps 1 and 2, fp32, one rank.
# Usage: bash training_scripts/cpu/run_tiny.sh [ACTOR_PATH] [CRITIC_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT_DIR]
#   (run from training/step3_rlhf_finetuning). DATA_PATH must be the --data_path steps 1 and 2 used, so the
#   prompts come from their third share of the data (default: synthetic/copy, as their CPU scripts).
#   CRITIC_PATH "none": a critic-free run rewarded by a function alone, e.g.
#   EXTRA_ARGS="--advantage_estimator grpo --n_samples_per_prompt 4 --reward_function synthetic
#   --per_device_generation_batch_size 8" bash training_scripts/cpu/run_tiny.sh ACTOR_PATH none
set -euo pipefail
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output_step1_tiny}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_tiny}
CRITIC_ARGS=(--critic_model_name_or_path "$CRITIC_MODEL_PATH")
if [ "$CRITIC_MODEL_PATH" = none ]; then CRITIC_ARGS=(); fi
ACTOR_ZERO_STAGE=${3:-0}
CRITIC_ZERO_STAGE=${4:-0}
OUTPUT=${5:-./output_step3_tiny}
DATA_PATH=${DATA_PATH:-synthetic/copy}
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended last, so its flags override the ones above
mkdir -p "$OUTPUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}" main.py \
   --data_path "$DATA_PATH" \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   ${CRITIC_ARGS[@]+"${CRITIC_ARGS[@]}"} \
   --per_device_generation_batch_size 32 \
   --per_device_training_batch_size 32 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_prompt_seq_len 64 \
   --max_answer_seq_len 24 \
   --actor_learning_rate 1e-4 \
   --critic_learning_rate 1e-4 \
   --num_warmup_steps 10 \
   --actor_dropout 0.0 \
   --critic_dropout 0.0 \
   --dtype auto \
   --eval_interval 20 \
   --eval_prompts 128 \
   --print_answers \
   --print_answers_interval 20 \
   --enable_test_mode \
   --test_stop_step 100 \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   $EXTRA_ARGS \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
