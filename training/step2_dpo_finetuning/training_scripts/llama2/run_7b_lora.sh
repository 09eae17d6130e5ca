#!/usr/bin/env bash
# Step 2 alternative (DPO): Llama-2-7B (meta-llama/Llama-2-7b-hf) with LoRA on one node.
#   The same run as DeepSpeed-Chat's name for it, training_scripts/llama2/run_llama2_7b_lora.sh:
#   this script runs it with the same arguments.
# Usage: bash training_scripts/llama2/run_7b_lora.sh [OUTPUT_DIR] [ZERO_STAGE]   (run from training/step2_dpo_finetuning)
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_llama2_7b_lora.sh" "$@"
