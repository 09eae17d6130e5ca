"""Step 3's flags: DeepSpeed-Chat's names and defaults, plus the PPO settings it hard-codes.

Each option is documented once here. Additions beyond DeepSpeed-Chat are marked [new]; the
reference's hard-coded PPO constants are flags with the same defaults.
"""
import argparse

from training.utils import args as shared_args
from training.utils.errors import UserInputError
from training.utils.optim import check_lr_scheduler_type

PROMPT_OVERFLOW = ("truncate", "drop")


def add_rlhf_args(parser: argparse.ArgumentParser) -> None:
    """Every step-3 flag group (the data flags come from training.utils.args.add_data_args)."""
    shared_args.add_data_args(parser, sft_only=False, max_seq_len=None)
    _add_prompt_args(parser)
    _add_model_args(parser)
    _add_optimization_args(parser)
    _add_ppo_args(parser)
    _add_generation_args(parser)
    _add_deepspeed_args(parser)
    _add_lora_args(parser)
    _add_logging_args(parser)


def _add_prompt_args(parser) -> None:
    group = parser.add_argument_group("prompts and pre-training data")
    group.add_argument("--unsupervised_dataset_name", type=str, default=None,
                       help="PPO-ptx: text to keep the language-model loss on (a hub dataset such as wikitext, a "
                            "local .txt/.json/.jsonl/.parquet file or a save_to_disk directory). None: plain PPO.")
    group.add_argument("--unsupervised_dataset_config_name", type=str, default=None,
                       help="Configuration of a hub --unsupervised_dataset_name (e.g. wikitext-2-raw-v1).")
    group.add_argument("--unsup_coef", type=float, default=27.8,
                       help="Weight of the PPO-ptx language-model loss (InstructGPT's gamma).")
    group.add_argument("--preprocessing_num_workers", type=int, default=None,
                       help="Accepted for DeepSpeed-Chat compatibility; tokenisation runs in the tokenizer's "
                            "own parallel (Rust) batch path instead.")
    group.add_argument("--max_prompt_seq_len", type=int, default=256,
                       help="Longest prompt in tokens; longer ones are cut or dropped (see --prompt_overflow).")
    group.add_argument("--max_answer_seq_len", type=int, default=256,
                       help="Most tokens generated per answer (its EOS included).")
    group.add_argument("--prompt_overflow", choices=PROMPT_OVERFLOW, default="truncate",
                       help="[new] Prompts over --max_prompt_seq_len: truncate keeps their last tokens (the "
                            "latest turns), drop removes them. Either way they are counted in the log.")


def _add_model_args(parser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--actor_model_name_or_path", type=str, required=True,
                       help="The SFT actor (step 1 output, or any causal LM directory / hub id / tiny name); the "
                            "reference model and the EMA start from it too.")
    group.add_argument("--critic_model_name_or_path", type=str, required=True,
                       help="The reward model directory of step 2: the frozen reward model, and the critic's "
                            "starting point.")
    group.add_argument("--num_padding_at_beginning", type=int, default=1,
                       help="Accepted for DeepSpeed-Chat compatibility and ignored: scores and values are read at "
                            "positions found from the attention mask.")
    group.add_argument("--actor_dropout", type=float, default=None,
                       help="Override every dropout probability of the actor (None keeps the config's).")
    group.add_argument("--critic_dropout", type=float, default=None,
                       help="Override every dropout probability of the critic (None keeps the config's).")
    shared_args.add_tokenizer_args(group)


def _add_optimization_args(parser) -> None:
    group = parser.add_argument_group("batches and optimization")
    group.add_argument("--per_device_generation_batch_size", type=int, default=16,
                       help="Prompts per rank per generation batch.")
    group.add_argument("--per_device_training_batch_size", type=int, default=16,
                       help="Experiences per rank per PPO mini-batch.")
    group.add_argument("--generation_batches", type=int, default=1,
                       help="Generation batches collected into the experience buffer before PPO trains on it.")
    group.add_argument("--ppo_epochs", type=int, default=1, help="Passes of PPO over each experience buffer.")
    group.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the prompts.")
    group.add_argument("--actor_learning_rate", type=float, default=9.65e-6)
    group.add_argument("--critic_learning_rate", type=float, default=5e-6)
    group.add_argument("--actor_weight_decay", type=float, default=0.0)
    group.add_argument("--critic_weight_decay", type=float, default=0.0)
    group.add_argument("--lr_scheduler_type", type=str, default="cosine",
                       help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--num_warmup_steps", type=int, default=100)
    group.add_argument("--output_dir", type=str, default=None,
                       help="Where actor/, critic/ (and actor_ema/) are saved.")
    group.add_argument("--seed", type=int, default=1234,
                       help="Training seed (sampling, data order). DeepSpeed-Chat's default is None; the phase "
                            "split uses --data_seed anyway.")
    group.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    group.add_argument("--enable_ema", action="store_true",
                       help="Keep an exponential moving average of the actor, saved as actor_ema/.")
    group.add_argument("--ema_beta", type=float, default=0.992,
                       help="[new] EMA decay: ema = beta * ema + (1 - beta) * actor after each PPO round.")
    group.add_argument("--compute_fp32_loss", action="store_true",
                       help="Compute log-probabilities and losses from fp32 logits when training in fp16/bf16.")


def _add_ppo_args(parser) -> None:
    group = parser.add_argument_group("PPO ([new]: DeepSpeed-Chat hard-codes these with the same defaults)")
    group.add_argument("--kl_ctl", type=float, default=0.1,
                       help="[new] KL penalty coefficient beta in r_t = -beta * (log pi - log pi_ref) (+ score "
                            "at the end); the initial value when --target_kl is set.")
    group.add_argument("--target_kl", type=float, default=None,
                       help="[new] Adaptive KL (Ziegler et al.): steer the coefficient towards this KL per answer. "
                            "None keeps it fixed at --kl_ctl.")
    group.add_argument("--kl_horizon", type=float, default=10000,
                       help="[new] Answers over which the adaptive coefficient may change by at most 20%%.")
    group.add_argument("--clip_reward_value", type=float, default=5.0,
                       help="[new] Reward-model scores are clipped to [-value, value].")
    group.add_argument("--cliprange", type=float, default=0.2, help="[new] PPO policy ratio clip epsilon.")
    group.add_argument("--cliprange_value", type=float, default=0.2,
                       help="[new] Value clip: new values stay within old value +- this.")
    group.add_argument("--gamma", type=float, default=1.0, help="[new] Discount of GAE.")
    group.add_argument("--lam", type=float, default=0.95, help="[new] Lambda of GAE.")
    group.add_argument("--no_whiten_advantages", action="store_true",
                       help="[new] Do not whiten advantages (masked mean 0, std 1 over the experience buffer).")
    group.add_argument("--normalize_reward", action="store_true",
                       help="[new] Standardise scores with the mean/std step 2 saved in reward_model.json "
                            "(warns loudly and uses raw scores when they are missing).")
    group.add_argument("--truncation_penalty", type=float, default=0.0,
                       help="[new] Added to the score of an answer cut at --max_answer_seq_len without EOS "
                            "(a number <= 0; 0 disables it).")


def _add_generation_args(parser) -> None:
    group = parser.add_argument_group("rollout generation (always stops at the tokenizer's EOS)")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="[new] Sampling temperature; log-probabilities use the same temperature. 0: greedy.")
    group.add_argument("--top_p", type=float, default=1.0, help="[new] Nucleus sampling (1.0: off).")
    group.add_argument("--top_k", type=int, default=0, help="[new] Top-k sampling (0: off).")
    group.add_argument("--repetition_penalty", type=float, default=1.0, help="[new] 1.0: off.")
    group.add_argument("--enable_hybrid_engine", action="store_true",
                       help="DeepSpeed Hybrid Engine for the actor's generation (CUDA and supported "
                            "architectures; elsewhere plain Hugging Face generate is used and this is logged).")
    group.add_argument("--unpin_actor_parameters", action="store_true",
                       help="Hybrid Engine under ZeRO-3: gather parameters layer by layer while generating "
                            "instead of keeping them all gathered.")
    group.add_argument("--release_inference_cache", action="store_true",
                       help="Hybrid Engine: free the inference workspace after each generation.")
    group.add_argument("--inference_tp_size", type=int, default=1,
                       help="Hybrid Engine: tensor-parallel degree for generation (needs actor ZeRO-3).")
    group.add_argument("--tp_gather_partition_size", type=int, default=8,
                       help="Hybrid Engine with tensor parallelism: layers gathered at once.")


def _add_deepspeed_args(parser) -> None:
    import deepspeed

    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--offload", action="store_true",
                       help="ZeRO-Offload the actor's and critic's optimizer state (and parameters at stage 3).")
    group.add_argument("--dtype", type=str, default=None, choices=["fp16", "bf16", "fp32"],
                       help="Precision of all models. Default: fp16 on CUDA (DeepSpeed-Chat's default), fp32 on CPU.")
    group.add_argument("--offload_reference_model", action="store_true",
                       help="Keep the reference (and EMA) parameters in CPU memory (effective under ZeRO-3).")
    group.add_argument("--offload_reward_model", action="store_true",
                       help="Keep the reward model's parameters in CPU memory (effective under ZeRO-3).")
    group.add_argument("--actor_zero_stage", type=int, default=0, choices=[0, 1, 2, 3],
                       help="Actor ZeRO stage; the reference and EMA use 3 when this is 3, else 0.")
    group.add_argument("--critic_zero_stage", type=int, default=0, choices=[0, 1, 2, 3],
                       help="Critic ZeRO stage; the reward model uses 3 when this is 3, else 0.")
    group.add_argument("--actor_gradient_checkpointing", action="store_true",
                       help="Activation checkpointing for the actor (on during its training pass only).")
    group.add_argument("--critic_gradient_checkpointing", action="store_true",
                       help="Activation checkpointing for the critic (on during its training pass only).")
    group.add_argument("--align_overflow", action="store_true",
                       help="fp16: when the actor's or the critic's gradients overflow, neither model updates "
                            "in that step (all ranks agree). Without fp16 nothing overflows: logged, no effect.")
    deepspeed.add_config_arguments(parser)


def _add_lora_args(parser) -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--actor_lora_dim", type=int, default=0, help="Actor LoRA rank; 0 disables LoRA.")
    group.add_argument("--actor_lora_module_name", type=str, default="decoder.layers.",
                       help="Convert the actor's nn.Linear layers whose name contains this (Llama: layers.).")
    group.add_argument("--critic_lora_dim", type=int, default=0, help="Critic LoRA rank; 0 disables LoRA.")
    group.add_argument("--critic_lora_module_name", type=str, default="decoder.layers.",
                       help="Convert the critic's nn.Linear layers whose name contains this (Llama: layers.).")
    group.add_argument("--only_optimize_lora", action="store_true",
                       help="Train only the LoRA factors (and the critic's value head).")
    group.add_argument("--actor_lora_learning_rate", type=float, default=5e-4)
    group.add_argument("--critic_lora_learning_rate", type=float, default=5e-4)
    group.add_argument("--enable_mixed_precision_lora", action="store_true",
                       help="Actor under ZeRO-3 on CUDA: keep the frozen base weights quantized (ZeRO++).")


def _add_logging_args(parser) -> None:
    group = parser.add_argument_group("logging and evaluation")
    group.add_argument("--enable_tensorboard", action="store_true")
    group.add_argument("--tensorboard_path", type=str, default="step3_tensorboard")
    group.add_argument("--print_answers", action="store_true",
                       help="Print one prompt and its generated answer (rank 0) every --print_answers_interval steps.")
    group.add_argument("--print_answers_interval", type=int, default=1)
    group.add_argument("--eval_interval", type=int, default=0,
                       help="[new] Held-out evaluation every N steps (0: before training and at the end only).")
    group.add_argument("--eval_prompts", type=int, default=64,
                       help="[new] Held-out prompts (from the phase-3 eval split) per evaluation; 0: no evaluation.")
    group.add_argument("--enable_test_mode", action="store_true", help="Stop after --test_stop_step steps.")
    group.add_argument("--test_stop_step", type=int, default=0)


def validate_rlhf_args(args) -> None:
    """Flag combinations rejected before any model is built."""
    if not args.output_dir:
        raise UserInputError("--output_dir is required: the directory actor/ and critic/ are saved to")
    for name in ("per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
                 "ppo_epochs", "num_train_epochs", "gradient_accumulation_steps", "max_prompt_seq_len",
                 "max_answer_seq_len", "print_answers_interval"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.only_optimize_lora and args.actor_lora_dim <= 0 and args.critic_lora_dim <= 0:
        raise UserInputError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
    if args.truncation_penalty > 0:
        raise UserInputError(f"--truncation_penalty {args.truncation_penalty} would reward cut-off answers: "
                             "pass a number <= 0")
    if args.temperature < 0:
        raise UserInputError(f"--temperature {args.temperature} must be >= 0 (0 decodes greedily)")
    if args.enable_test_mode and args.test_stop_step < 1:
        raise UserInputError("--enable_test_mode needs --test_stop_step >= 1 (the step to stop after)")
    if args.eval_interval < 0 or args.eval_prompts < 0:
        raise UserInputError("--eval_interval and --eval_prompts must be >= 0")
    check_lr_scheduler_type(args.lr_scheduler_type)
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        raise UserInputError(f"--inference_tp_size {args.inference_tp_size} needs ZeRO stage 3 for the actor (got "
                             f"{args.actor_zero_stage}): set --actor_zero_stage 3 or --inference_tp_size 1")
    if args.offload and 0 in (args.actor_zero_stage, args.critic_zero_stage):
        raise UserInputError(f"--offload moves the actor's and critic's partitioned optimizer state, so both need "
                             f"ZeRO stage 1-3 (got actor {args.actor_zero_stage}, critic {args.critic_zero_stage}): "
                             "raise --actor_zero_stage / --critic_zero_stage or drop --offload")
    if args.enable_mixed_precision_lora and args.actor_lora_dim <= 0:
        raise UserInputError("--enable_mixed_precision_lora needs --actor_lora_dim > 0 (it quantizes the frozen "
                             "base weights under LoRA)")
    shared_args.check_output_dir(args.output_dir, shared_args.RLHF_MODELS, {
        "--actor_model_name_or_path": [args.actor_model_name_or_path],
        "--critic_model_name_or_path": [args.critic_model_name_or_path], "--data_path": args.data_path,
        "--unsupervised_dataset_name": [args.unsupervised_dataset_name], "--deepspeed_config": [args.deepspeed_config]})
