"""The RLHF engine: the DeepSpeed engines PPO needs, built from the step-3 flags.

    actor      trainable causal LM from --actor_model_name_or_path (+LoRA); the Hybrid Engine wraps it
               when --enable_hybrid_engine and DeepSpeed has inference kernels for it
    reference  frozen copy of the starting actor (the KL anchor)
    actor_ema  optional frozen exponential moving average of the actor (--enable_ema)
    critic     trainable value model, started from the step-2 reward model directory (+LoRA)
    reward     frozen reward model from the same directory

ZeRO stages follow DeepSpeed-Chat's rules: the reference and EMA are partitioned (stage 3) exactly
when the actor is, otherwise whole (stage 0); the reward model likewise follows the critic. Frozen
models have no optimizer state, so stages 1-2 mean nothing for them, and offloading a frozen model
(`--offload_reference_model`, `--offload_reward_model`) moves partitioned parameters, so it takes
effect under stage 3 only (logged otherwise). Every model is built under its own ZeRO-3
registration (model/build.py), so mixing stages in one process is safe.
"""
from dataclasses import dataclass
from types import SimpleNamespace

from training.utils import args as shared_args
from training.utils import runtime
from training.utils.ds_config import get_eval_ds_config, get_train_ds_config, global_batch_size
from training.utils.engine import apply_lora, initialize_frozen_engine, initialize_train_engine
from training.utils.errors import UserInputError
from training.utils.model.build import create_hf_model
from training.utils.model.reward_model import create_reward_model, read_reward_model_meta
from training.utils.tokenizer import load_tokenizer, tokenizer_fingerprint

VALUE_HEAD = "v_head"


@dataclass
class RLHFEngine:
    actor: object  # DeepSpeedEngine or DeepSpeedHybridEngine
    ref: object
    actor_ema: object | None
    critic: object
    reward: object
    tokenizer: object
    reward_meta: dict  # the reward model's reward_model.json
    hybrid_generation: bool  # True when DeepSpeed's inference kernels generate (engine.generate)


def frozen_stage(trained_stage: int) -> int:
    """The ZeRO stage of a frozen model that sits next to a trained one (DeepSpeed-Chat's rule)."""
    return 3 if trained_stage == 3 else 0


def build_rlhf_engine(args, tokenizer, device, actor_steps_per_epoch: int, critic_steps_per_epoch: int
                      ) -> RLHFEngine:
    """All engines for `args` (the step-3 flags). `*_steps_per_epoch` are optimizer steps, for the LR
    schedules."""
    dtype = shared_args.resolve_dtype(args.dtype, device.type)
    reward_meta = read_reward_model_meta(args.critic_model_name_or_path)
    check_same_tokenizer(tokenizer, args)
    hybrid = args.enable_hybrid_engine and hybrid_engine_usable(device)
    if args.enable_hybrid_engine and not hybrid:
        runtime.print_rank_0(f"Hybrid Engine: DeepSpeed has no inference kernels on {device.type}; "
                             "--enable_hybrid_engine is ignored and generation uses Hugging Face generate")

    actor = _build_actor(args, tokenizer, device, dtype, actor_steps_per_epoch)
    hybrid_generation = hybrid and has_inference_kernels(actor)
    if hybrid and not hybrid_generation:
        runtime.print_rank_0(f"Hybrid Engine: DeepSpeed has no inference policy for "
                             f"{type(actor.module).__name__}; generating with Hugging Face generate")
    ref = _build_frozen_actor(args, tokenizer, device, dtype, actor_lora_layout=False)
    actor_ema = _build_frozen_actor(args, tokenizer, device, dtype, actor_lora_layout=True) if args.enable_ema else None
    critic = _build_critic(args, tokenizer, device, dtype, critic_steps_per_epoch)
    reward = _build_reward(args, tokenizer, device, dtype)
    runtime.print_rank_0(
        f"engines: actor ZeRO-{args.actor_zero_stage}"
        f"{' (Hybrid Engine generation)' if hybrid_generation else ''}, reference ZeRO-"
        f"{frozen_stage(args.actor_zero_stage)}{', EMA' if args.enable_ema else ''}, critic ZeRO-"
        f"{args.critic_zero_stage}, reward ZeRO-{frozen_stage(args.critic_zero_stage)}, {dtype}")
    return RLHFEngine(actor, ref, actor_ema, critic, reward, tokenizer, reward_meta, hybrid_generation)


def check_same_tokenizer(tokenizer, args) -> None:
    """The reward model must read the actor's token ids exactly as step 2 trained it to."""
    reward_tokenizer = load_tokenizer(args.critic_model_name_or_path, args.add_eot_token, args.eot_token,
                                      args.trust_remote_code)
    if tokenizer_fingerprint(reward_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise UserInputError(f"the actor '{args.actor_model_name_or_path}' and the reward model "
                             f"'{args.critic_model_name_or_path}' use different tokenizers: train the reward model "
                             "from the same base model and tokenizer as the actor")


def hybrid_engine_usable(device) -> bool:
    """DeepSpeed's inference kernels are CUDA only (on CPU, initialize even fails for Llama)."""
    return device.type == "cuda"


def has_inference_kernels(engine) -> bool:
    """Whether a Hybrid Engine found an inference policy for the model's layers. DeepSpeed only binds
    its `_generate` (what `engine.generate` calls) when it did; otherwise the model's own generate runs."""
    return hasattr(engine, "_generate")


def _model_flags(args, role: str) -> SimpleNamespace:
    """The actor's or critic's flags under the names the shared builders read (training.utils.engine).
    Gradient checkpointing stays off here: the trainer turns it on around each training pass only."""
    return SimpleNamespace(
        lora_dim=getattr(args, f"{role}_lora_dim"), lora_module_name=getattr(args, f"{role}_lora_module_name"),
        only_optimize_lora=args.only_optimize_lora, lora_learning_rate=getattr(args, f"{role}_lora_learning_rate"),
        learning_rate=getattr(args, f"{role}_learning_rate"), weight_decay=getattr(args, f"{role}_weight_decay"),
        offload=args.offload, lr_scheduler_type=args.lr_scheduler_type, num_warmup_steps=args.num_warmup_steps,
        num_train_epochs=args.num_train_epochs, gradient_checkpointing=False)


def _train_config(args, device, dtype: str, stage: int, actor: bool) -> dict:
    """The actor's config carries the Hybrid Engine and mixed-precision-LoRA entries; the critic's does not."""
    config = get_train_ds_config(
        offload=args.offload, dtype=dtype, stage=stage,
        train_batch_size=global_batch_size(args.per_device_training_batch_size, args.gradient_accumulation_steps,
                                           runtime.world_size()),
        micro_batch_size=args.per_device_training_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        enable_hybrid_engine=actor and args.enable_hybrid_engine and hybrid_engine_usable(device),
        inference_tp_size=args.inference_tp_size if actor else 1,
        release_inference_cache=args.release_inference_cache, pin_parameters=not args.unpin_actor_parameters,
        tp_gather_partition_size=args.tp_gather_partition_size,
        max_out_tokens=args.max_prompt_seq_len + args.max_answer_seq_len,
        enable_mixed_precision_lora=actor and args.enable_mixed_precision_lora, device=device.type)
    return shared_args.merge_user_ds_config(config, args.deepspeed_config)


def _eval_config(args, device, dtype: str, stage: int, offload: bool, name: str) -> dict:
    if offload and stage != 3:
        runtime.print_rank_0(f"--offload_{name}_model has no effect at ZeRO stage {stage} (DeepSpeed offloads "
                             "frozen parameters under stage 3 only)")
    return get_eval_ds_config(
        offload=offload, dtype=dtype, stage=stage, micro_batch_size=args.per_device_training_batch_size,
        train_batch_size=global_batch_size(args.per_device_training_batch_size, args.gradient_accumulation_steps,
                                           runtime.world_size()),
        device=device.type)


def _build_actor(args, tokenizer, device, dtype: str, steps_per_epoch: int):
    config = _train_config(args, device, dtype, args.actor_zero_stage, actor=True)
    model = create_hf_model(args.actor_model_name_or_path, tokenizer, ds_config=config, dropout=args.actor_dropout,
                            trust_remote_code=args.trust_remote_code)
    flags = _model_flags(args, "actor")
    runtime.set_random_seed(args.seed)  # the EMA's LoRA factors start from the same draw
    apply_lora(model, flags)
    engine, _ = initialize_train_engine(model, flags, config, device, steps_per_epoch)
    return engine


def _build_frozen_actor(args, tokenizer, device, dtype: str, actor_lora_layout: bool):
    """The reference model, or (`actor_lora_layout`) the EMA, which has the actor's LoRA layers so it can
    average them parameter by parameter."""
    config = _eval_config(args, device, dtype, frozen_stage(args.actor_zero_stage), args.offload_reference_model,
                          "reference")
    model = create_hf_model(args.actor_model_name_or_path, tokenizer, ds_config=config, dropout=args.actor_dropout,
                            trust_remote_code=args.trust_remote_code)
    if actor_lora_layout:
        runtime.set_random_seed(args.seed)
        apply_lora(model, SimpleNamespace(lora_dim=args.actor_lora_dim, lora_module_name=args.actor_lora_module_name,
                                          only_optimize_lora=False))
    return initialize_frozen_engine(model, config)


def _build_critic(args, tokenizer, device, dtype: str, steps_per_epoch: int):
    config = _train_config(args, device, dtype, args.critic_zero_stage, actor=False)
    model = create_reward_model(args.critic_model_name_or_path, tokenizer, ds_config=config,
                                dropout=args.critic_dropout, trust_remote_code=args.trust_remote_code)
    flags = _model_flags(args, "critic")
    apply_lora(model, flags, force_optimize_params=(VALUE_HEAD,))
    engine, _ = initialize_train_engine(model, flags, config, device, steps_per_epoch)
    return engine


def _build_reward(args, tokenizer, device, dtype: str):
    config = _eval_config(args, device, dtype, frozen_stage(args.critic_zero_stage), args.offload_reward_model,
                          "reward")
    model = create_reward_model(args.critic_model_name_or_path, tokenizer, ds_config=config,
                                trust_remote_code=args.trust_remote_code)
    return initialize_frozen_engine(model, config)
