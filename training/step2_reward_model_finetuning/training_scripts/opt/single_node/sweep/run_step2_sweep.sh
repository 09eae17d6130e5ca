#!/usr/bin/env bash
# Step 2 (reward model) sweep: run_single.sh for ZeRO stage 2 and 3 x offload on and off, 4 runs one after the other.
#   DeepSpeed-Chat's training_scripts/opt/single_node/sweep/run_step2_sweep.sh: the same runs. Each run writes its
#   model and training.log to SWEEP_DIR/z<stage>_offload_<true|false>. A failed run is reported and the sweep goes on
#   (exit status 1 at the end); Ctrl-C stops the sweep after the running step has saved its checkpoint.
# Usage: bash training_scripts/opt/single_node/sweep/run_step2_sweep.sh [SWEEP_DIR]
#   (run from training/step2_reward_model_finetuning; SWEEP_DIR defaults to ./output_step2_sweep)
set -uo pipefail
SWEEP_DIR=${1:-./output_step2_sweep}
HERE=$(dirname "${BASH_SOURCE[0]}")
failed=()
for zero in 2 3; do
  for offload in true false; do
    name=z${zero}_offload_${offload}
    echo "=== sweep run $name: bash $HERE/run_single.sh $zero $offload $SWEEP_DIR/$name"
    bash "$HERE/run_single.sh" "$zero" "$offload" "$SWEEP_DIR/$name"
    status=$?
    if [ "$status" -ge 128 ]; then echo "sweep stopped during $name (exit $status)" >&2; exit "$status"; fi
    if [ "$status" -ne 0 ]; then failed+=("$name"); fi
  done
done
if [ "${#failed[@]}" -gt 0 ]; then echo "error: sweep runs that failed: ${failed[*]}" >&2; exit 1; fi
echo "sweep done: 4 runs in $SWEEP_DIR"
