#!/usr/bin/env bash
# Step 3 (PPO) sweep, one run: OPT-1.3B actor, OPT-350M critic and reward model, one node, with the given ZeRO stages
#   and Hybrid Engine, offload, LoRA (actor, rank 128) and mixed-precision-LoRA switches.
#   DeepSpeed-Chat's training_scripts/opt/single_node/sweep/run_single.sh: the same arguments, data and
#   hyperparameters. run_step3_sweep.sh calls it for every combination.
# Usage: bash training_scripts/opt/single_node/sweep/run_single.sh [ACTOR_PATH] [CRITIC_PATH] [ACTOR_ZERO_STAGE]
#          [CRITIC_ZERO_STAGE] [HYBRID_ENGINE] [OFFLOAD] [LORA] [MIXED_PRECISION_LORA] [OUTPUT_DIR] [TEST] [TEST_STOP_STEP]
#   (run from training/step3_rlhf_finetuning; the switches are true or false, default false; TEST true stops after
#   TEST_STOP_STEP steps; the model paths default to the outputs of the OPT-1.3B step-1 and OPT-350M step-2 scripts)
set -euo pipefail
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output_step1_run_1.3b}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_run_350m}
ACTOR_ZERO_STAGE=${3:-2}
CRITIC_ZERO_STAGE=${4:-2}
HYBRID_ENGINE=${5:-false}
OFFLOAD=${6:-false}
LORA=${7:-false}
MIXED_PRECISION_LORA=${8:-false}
OUTPUT=${9:-./output_step3_sweep_single}
TEST=${10:-false}
TEST_STOP_STEP=${11:-}
# is_true VALUE NAME: VALUE must be "true" or "false", as the sweep passes them; anything else is refused.
is_true() {
  case "$1" in true) return 0 ;; false) return 1 ;; *) echo "error: $2 must be true or false, got '$1'" >&2; exit 2 ;; esac
}
OPTIONAL_ARGS=()
if is_true "$HYBRID_ENGINE" HYBRID_ENGINE; then OPTIONAL_ARGS+=(--enable_hybrid_engine); fi
if is_true "$OFFLOAD" OFFLOAD; then OPTIONAL_ARGS+=(--offload); fi
if is_true "$MIXED_PRECISION_LORA" MIXED_PRECISION_LORA; then OPTIONAL_ARGS+=(--enable_mixed_precision_lora); fi
if is_true "$LORA" LORA; then
  OPTIONAL_ARGS+=(--actor_lora_dim 128 --actor_lora_module_name decoder.layers.)
else
  OPTIONAL_ARGS+=(--actor_lora_dim 0)
fi
if is_true "$TEST" TEST; then
  [ -n "$TEST_STOP_STEP" ] || { echo "error: TEST true needs TEST_STOP_STEP (the 11th argument), the step to stop after" >&2; exit 2; }
  OPTIONAL_ARGS+=(--enable_test_mode --test_stop_step "$TEST_STOP_STEP")
fi
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
   --actor_weight_decay 0 \
   --critic_weight_decay 0 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --actor_dropout 0.0 \
   --print_answers \
   "${OPTIONAL_ARGS[@]}" \
   --dtype fp16 \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
