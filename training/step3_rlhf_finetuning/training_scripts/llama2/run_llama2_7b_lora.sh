#!/usr/bin/env bash
# Step 3 (PPO): Llama-2-7B actor and critic with LoRA (rank 64), one node, ZeRO-3, the reference model offloaded.
#   DeepSpeed-Chat's training_scripts/llama2/run_llama2_7b_lora.sh: the same data and hyperparameters.
#   One difference: DeepSpeed-Chat turns the Hybrid Engine on; here it is off unless HYBRID_ENGINE=1, because its
#   Llama kernels have given wrong or empty generations under ZeRO-3 (KNOWN_DEFECTS 13). Check greedy parity on
#   your GPUs first: pytest tests/test_hybrid_engine_gpu.py.
# Usage: bash training_scripts/llama2/run_llama2_7b_lora.sh [ACTOR_PATH] [CRITIC_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT_DIR]
#   (run from training/step3_rlhf_finetuning; the defaults are the outputs of the matching step-1 and step-2 scripts)
set -euo pipefail
ACTOR_MODEL_PATH=${1:-../step1_supervised_finetuning/output_step1_run_llama2_7b_lora}
CRITIC_MODEL_PATH=${2:-../step2_reward_model_finetuning/output_step2_run_llama2_7b_lora}
ACTOR_ZERO_STAGE=${3:-3}
CRITIC_ZERO_STAGE=${4:-3}
OUTPUT=${5:-./output_step3_llama2_7b_lora}
# The Hybrid Engine stays off unless HYBRID_ENGINE=1 (see above).
HYBRID_ENGINE_FLAG=()
if [ "${HYBRID_ENGINE:-0}" = 1 ]; then HYBRID_ENGINE_FLAG=(--enable_hybrid_engine); fi
mkdir -p "$OUTPUT"

# Ctrl-C: the launcher and the ranks get it (they save a checkpoint and exit); the shell and the deepspeed CLI
# ignore it, so the CLI prints no traceback and the log is written to the end.
trap "" INT
deepspeed main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 1 \
   --per_device_generation_batch_size 1 \
   --per_device_training_batch_size 1 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --num_warmup_steps 100 \
   --seed 1234 \
   --actor_dropout 0.0 \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --offload_reference_model \
   --actor_lora_dim 64 \
   --actor_lora_module_name layers. \
   --critic_lora_dim 64 \
   --critic_lora_module_name layers. \
   ${HYBRID_ENGINE_FLAG[@]+"${HYBRID_ENGINE_FLAG[@]}"} \
   --dtype fp16 \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   2>&1 | tee -i -a "$OUTPUT/training.log"  # -i: survives Ctrl-C, so the checkpoint message is logged; -a: --resume appends
