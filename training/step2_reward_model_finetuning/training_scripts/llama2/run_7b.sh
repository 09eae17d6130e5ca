#!/usr/bin/env bash
# Step 2 (reward model): Llama-2-7B (meta-llama/Llama-2-7b-hf) on one node, ZeRO-3 with offload.
#   The same run as DeepSpeed-Chat's name for it, training_scripts/llama2/run_llama2_7b.sh:
#   this script runs it with the same arguments.
# Usage: bash training_scripts/llama2/run_7b.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step2_reward_model_finetuning)
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_llama2_7b.sh" "$@"
