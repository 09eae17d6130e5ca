#!/usr/bin/env bash
# Step 3 (PPO) sweep: run_single.sh one run after the other, DeepSpeed-Chat's
#   training_scripts/opt/single_node/sweep/run_step3_sweep.sh: the same runs.
#   - generic sweep (RUN_GENERIC_SWEEP, default true): ZeRO stage 2 and 3 (actor and critic alike) x Hybrid Engine
#     on and off x offload on and off x LoRA on and off, 16 runs, named z<stage>_he_<he>_offload_<offload>_lora_<lora>;
#   - mixed-precision ZeRO++ sweep (RUN_MPL_SWEEP, default true): ZeRO-3, LoRA, no offload, Hybrid Engine on and off,
#     2 runs, named ..._mpl_true.
#   The models: ACTOR_MODEL_PATH and CRITIC_MODEL_PATH (default: the outputs of step 1's opt/single_node/run_1.3b.sh
#   and step 2's opt/single_node/run_350m.sh). DeepSpeed-Chat's sweep names its published OPT-1.3B/350M checkpoints
#   on the hub instead; those are pickle files: convert them first (applications/convert_dschat.py) and pass the
#   converted folders. Each run writes to SWEEP_DIR/<name>. A failed run is reported and the sweep goes on (exit
#   status 1 at the end); Ctrl-C stops the sweep after the running step has saved its checkpoint.
# Usage: bash training_scripts/opt/single_node/sweep/run_step3_sweep.sh [SWEEP_DIR]
#   (run from training/step3_rlhf_finetuning; SWEEP_DIR defaults to ./output_step3_sweep)
set -uo pipefail
SWEEP_DIR=${1:-./output_step3_sweep}
ACTOR_MODEL_PATH=${ACTOR_MODEL_PATH:-../step1_supervised_finetuning/output_step1_run_1.3b}
CRITIC_MODEL_PATH=${CRITIC_MODEL_PATH:-../step2_reward_model_finetuning/output_step2_run_350m}
RUN_GENERIC_SWEEP=${RUN_GENERIC_SWEEP:-true}
RUN_MPL_SWEEP=${RUN_MPL_SWEEP:-true}
HERE=$(dirname "${BASH_SOURCE[0]}")
failed=()
runs=0

run() {  # run NAME ZERO HYBRID_ENGINE OFFLOAD LORA MIXED_PRECISION_LORA
  local name=$1 zero=$2 status
  echo "=== sweep run $name"
  bash "$HERE/run_single.sh" "$ACTOR_MODEL_PATH" "$CRITIC_MODEL_PATH" "$zero" "$zero" "$3" "$4" "$5" "$6" \
    "$SWEEP_DIR/$name"
  status=$?
  runs=$((runs + 1))
  if [ "$status" -ge 128 ]; then echo "sweep stopped during $name (exit $status)" >&2; exit "$status"; fi
  if [ "$status" -ne 0 ]; then failed+=("$name"); fi
}

if [ "$RUN_GENERIC_SWEEP" = true ]; then
  for zero in 2 3; do
    for he in true false; do
      for offload in true false; do
        for lora in true false; do
          run "z${zero}_he_${he}_offload_${offload}_lora_${lora}" "$zero" "$he" "$offload" "$lora" false
        done
      done
    done
  done
fi
if [ "$RUN_MPL_SWEEP" = true ]; then
  for he in true false; do
    run "z3_he_${he}_offload_false_lora_true_mpl_true" 3 "$he" false true true
  done
fi
if [ "${#failed[@]}" -gt 0 ]; then echo "error: sweep runs that failed: ${failed[*]}" >&2; exit 1; fi
echo "sweep done: $runs runs in $SWEEP_DIR"
