#!/usr/bin/env bash
# Step 1 (SFT) sweep, one run: OPT-1.3B on one node with the given ZeRO stage, offload and LoRA switches.
#   DeepSpeed-Chat's training_scripts/opt/single_node/sweep/run_single.sh: the same arguments, model, data and
#   hyperparameters (LoRA on: rank 128, only the LoRA factors trained, learning rate 1e-3, weight decay 0.1;
#   LoRA off: 9.65e-6 and 0). run_step1_sweep.sh calls it for every combination.
# Usage: bash training_scripts/opt/single_node/sweep/run_single.sh [ZERO_STAGE] [OFFLOAD] [LORA] [OUTPUT_DIR]
#   (run from training/step1_supervised_finetuning; OFFLOAD and LORA: true or false, default false)
set -euo pipefail
ZERO_STAGE=${1:-2}
OFFLOAD=${2:-false}
LORA=${3:-false}
OUTPUT=${4:-./output_step1_sweep_single}
# is_true VALUE NAME: VALUE must be "true" or "false", as the sweep passes them; anything else is refused.
is_true() {
  case "$1" in true) return 0 ;; false) return 1 ;; *) echo "error: $2 must be true or false, got '$1'" >&2; exit 2 ;; esac
}
OPTIONAL_ARGS=()
if is_true "$OFFLOAD" OFFLOAD; then OPTIONAL_ARGS+=(--offload); fi
if is_true "$LORA" LORA; then
  OPTIONAL_ARGS+=(--lora_dim 128 --lora_module_name decoder.layers. --only_optimize_lora)
  LEARNING_RATE=1e-3
  WEIGHT_DECAY=0.1
else
  OPTIONAL_ARGS+=(--lora_dim 0)
  LEARNING_RATE=9.65e-6
  WEIGHT_DECAY=0.
fi
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-1.3b \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate "$LEARNING_RATE" \
   --weight_decay "$WEIGHT_DECAY" \
   --num_train_epochs 16 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   ${OPTIONAL_ARGS[@]+"${OPTIONAL_ARGS[@]}"} \
   --dtype fp16 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
