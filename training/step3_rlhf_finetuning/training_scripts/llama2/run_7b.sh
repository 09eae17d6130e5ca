#!/usr/bin/env bash
# Step 3 (PPO): Llama-2-7B actor, reward model and critic, one node.
#   The same run as DeepSpeed-Chat's name for it, training_scripts/llama2/run_llama2_7b.sh:
#   this script runs it with the same arguments.
# Usage: bash training_scripts/llama2/run_7b.sh [ACTOR_PATH] [CRITIC_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT_DIR]   (run from training/step3_rlhf_finetuning)
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_llama2_7b.sh" "$@"
