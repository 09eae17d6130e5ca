#!/usr/bin/env bash
# Step 1 (SFT) in Chinese on CPU: other_language/run_chinese.sh in small. The tiny model (byte-level BPE, so it reads
#   any UTF-8 text) trains on the Chinese SFT files of the shared data directory: Alpaca-style instructions and
#   medical questions with their answers (../shared/data/README.md). As there, --data_split 10,0,0 keeps every row
#   for step 1; --dtype auto (fp32 on most CPUs), one rank.
# Usage: bash training_scripts/cpu/run_chinese_tiny.sh [OUTPUT_DIR] [ZERO_STAGE] [MODEL]
#   (run from training/step1_supervised_finetuning; MODEL defaults to tiny/opt). SHARED_DATA: the shared data
#   directory, default ../shared/data beside the repository; DATA_PATH: other files or datasets (space-separated);
#   EXTRA_ARGS: more main.py flags, appended last so they override the ones below.
set -euo pipefail
OUTPUT=${1:-./output_step1_chinese_tiny}
ZERO_STAGE=${2:-0}
MODEL=${3:-tiny/opt}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)
SHARED_DATA=${SHARED_DATA:-$REPO/../shared/data}
DATA_PATH=${DATA_PATH:-$SHARED_DATA/llamafactory_alpaca_zh_train.sft.jsonl $SHARED_DATA/medicalgpt_medical_zh_train.sft.jsonl}
read -r -a DATA_FILES <<< "$DATA_PATH"
EXTRA_ARGS=${EXTRA_ARGS:-}  # appended last, so its flags override the ones above
mkdir -p "$OUTPUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}" main.py \
   --data_path "${DATA_FILES[@]}" \
   --data_split 10,0,0 \
   --model_name_or_path "$MODEL" \
   --lora_module_name layers. \
   --per_device_train_batch_size 16 \
   --per_device_eval_batch_size 32 \
   --max_seq_len 256 \
   --learning_rate 1e-3 \
   --weight_decay 0. \
   --num_train_epochs 1 \
   --num_warmup_steps 20 \
   --seed 1234 \
   --dtype auto \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   $EXTRA_ARGS \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
