#!/usr/bin/env bash
# Score a preference file with a trained reward model. Usage (from training/step2_reward_model_finetuning):
#   bash evaluation_scripts/run_eval.sh REWARD_MODEL_DIR PAIRS_FILE [extra rw_eval.py flags]
set -euo pipefail
MODEL=${1:?reward model directory (step-2 output)}
PAIRS=${2:?a .jsonl file with prompt, chosen, rejected}
shift 2
python rw_eval.py --model_name_or_path "$MODEL" --pairs "$PAIRS" "$@"
