#!/usr/bin/env bash
# Step 2 alternative (DPO) sweep, one run: OPT-350M on one node with the given ZeRO stage and offload switch.
#   DeepSpeed-Chat's training_scripts/opt/single_node/sweep/run_single.sh (a copy of step 2's): the same arguments,
#   model, data and hyperparameters, without the --num_padding_at_beginning 1 it passes, a flag DPO does not
#   define (KNOWN_DEFECTS 12). run_step2_sweep.sh calls it for every combination.
# Usage: bash training_scripts/opt/single_node/sweep/run_single.sh [ZERO_STAGE] [OFFLOAD] [OUTPUT_DIR]
#   (run from training/step2_dpo_finetuning; OFFLOAD: true or false, default false)
set -euo pipefail
ZERO_STAGE=${1:-0}
OFFLOAD=${2:-false}
OUTPUT=${3:-./output_step2_dpo_sweep_single}
# is_true VALUE NAME: VALUE must be "true" or "false", as the sweep passes them; anything else is refused.
is_true() {
  case "$1" in true) return 0 ;; false) return 1 ;; *) echo "error: $2 must be true or false, got '$1'" >&2; exit 2 ;; esac
}
OFFLOAD_ARGS=()
if is_true "$OFFLOAD" OFFLOAD; then OFFLOAD_ARGS+=(--offload); fi
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-350m \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 5e-5 \
   --weight_decay 0.1 \
   --num_train_epochs 1 \
   --dropout 0.0 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   ${OFFLOAD_ARGS[@]+"${OFFLOAD_ARGS[@]}"} \
   --dtype fp16 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
