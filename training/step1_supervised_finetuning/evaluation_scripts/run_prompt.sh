#!/usr/bin/env bash
# Baseline vs fine-tuned generations. Usage (from training/step1_supervised_finetuning):
#   bash evaluation_scripts/run_prompt.sh BASELINE_DIR FINETUNED_DIR [extra prompt_eval.py flags]
# e.g. bash evaluation_scripts/run_prompt.sh tiny-init ./output_step1_tiny --synthetic_task synthetic/arithmetic
set -euo pipefail
BASELINE=${1:?baseline model directory}
FINETUNED=${2:?fine-tuned model directory}
shift 2
python prompt_eval.py \
    --model_name_or_path_baseline "$BASELINE" \
    --model_name_or_path_finetune "$FINETUNED" \
    "$@"
