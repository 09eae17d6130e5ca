"""The RLHF engine: the DeepSpeed engines PPO needs, built from the step-3 flags.

    actor      trainable causal LM from --actor_model_name_or_path (+LoRA); the Hybrid Engine wraps it
               when --enable_hybrid_engine and DeepSpeed has inference kernels for it
    reference  frozen copy of the starting actor (the KL anchor)
    actor_ema  optional frozen exponential moving average of the actor (--enable_ema)
    critic     trainable value model, started from the step-2 reward model directory (+LoRA); None for a
               critic-free --advantage_estimator
    reward     frozen reward model from the same directory; None when a --reward_function alone gives the
               rewards (no --critic_model_name_or_path, or --reward_model_weight 0)

ZeRO stages follow DeepSpeed-Chat's rules: the reference and EMA are partitioned (stage 3) exactly
when the actor is, otherwise whole (stage 0); the reward model likewise follows the critic. Frozen
models have no optimizer state, so stages 1-2 mean nothing for them, and offloading a frozen model
(`--offload_reference_model`, `--offload_reward_model`) moves partitioned parameters, so it takes
effect under stage 3 only (logged otherwise). Every model is built under its own ZeRO-3
registration (model/build.py), so mixing stages in one process is safe.
"""
import math
from dataclasses import dataclass

from training.utils import distributed, seeding
from training.utils.engine import (
    apply_lora,
    frozen_ds_config,
    frozen_stage,
    initialize_frozen_engine,
    initialize_train_engine,
    train_ds_config,
    training_dtype,
    warn_long_warmup,
)
from training.utils.errors import UserInputError
from training.utils.model.build import create_hf_model
from training.utils.model.reward_model import create_reward_model, read_reward_model_meta
from training.utils.rlhf.config import RLHFConfig
from training.utils.tokenizer import load_tokenizer, tokenizer_fingerprint

VALUE_HEAD = "v_head"


@dataclass
class RLHFEngine:
    actor: object  # DeepSpeedEngine or DeepSpeedHybridEngine
    ref: object
    actor_ema: object | None
    critic: object | None
    reward: object | None
    tokenizer: object
    reward_meta: dict  # the reward model's reward_model.json
    hybrid_generation: bool  # True when DeepSpeed's inference kernels generate (engine.generate)


def optimizer_steps_per_epoch(config: RLHFConfig, prompt_batches: int) -> tuple[int, int]:
    """(actor, critic) optimizer steps per epoch, for the LR schedules. Each PPO mini-batch steps both
    models once; PPO-ptx steps the actor once more.

    Refuses, before any model is built, a run that would make no PPO step (fewer prompt batches in the whole
    run than --generation_batches: the experience buffer never fills) or no optimizer step (fewer PPO
    mini-batches than --gradient_accumulation_steps): either would save the starting actor as if trained.
    Warns when the warmup outlasts the run (--enable_test_mode's --test_stop_step included)."""
    generation, epochs = config.generation_batches, config.num_train_epochs
    ppo_steps = prompt_batches * epochs // generation  # the experience buffer carries over an epoch's end
    if ppo_steps == 0:
        raise UserInputError(
            f"--generation_batches {generation} is more than the {prompt_batches * epochs} prompt batches of the whole "
            f"run ({prompt_batches} per epoch of --per_device_generation_batch_size "
            f"{config.per_device_generation_batch_size} prompts per rank x {epochs} epochs), so the experience buffer "
            f"never fills, PPO never trains and the actor would be saved unchanged: lower --generation_batches to at "
            f"most {max(prompt_batches * epochs, 1)}, raise --num_train_epochs, lower "
            "--per_device_generation_batch_size or add prompts")
    rows_per_step = generation * config.per_device_generation_batch_size * config.rl.n_samples_per_prompt
    minibatches_per_step = config.ppo_epochs * math.ceil(rows_per_step / config.per_device_training_batch_size)
    run_ppo_steps = min(ppo_steps, config.test_stop_step) if config.enable_test_mode else ppo_steps
    run_minibatches = run_ppo_steps * minibatches_per_step
    accumulation = config.gradient_accumulation_steps
    if run_minibatches < accumulation:
        raise UserInputError(
            f"--gradient_accumulation_steps {accumulation} is more than the {run_minibatches} PPO mini-batches of the "
            f"whole run ({run_ppo_steps} PPO steps x {minibatches_per_step} mini-batches of "
            f"--per_device_training_batch_size {config.per_device_training_batch_size} x --ppo_epochs "
            f"{config.ppo_epochs}), so the actor and critic optimizers would never step: lower "
            f"--gradient_accumulation_steps to at most {run_minibatches} or train for more steps")
    warn_long_warmup(config, run_minibatches // accumulation, f"optimizer steps ({'critic; ' * config.builds_critic}"
                     f"PPO steps {run_ppo_steps})")
    minibatches = (prompt_batches // generation) * minibatches_per_step
    critic_steps = max(1, math.ceil(minibatches / accumulation))
    return critic_steps * (2 if config.unsupervised_dataset_name else 1), critic_steps


def build_rlhf_engine(config: RLHFConfig, tokenizer, device, actor_steps_per_epoch: int,
                      critic_steps_per_epoch: int) -> RLHFEngine:
    """All engines of step 3. `*_steps_per_epoch` are optimizer steps, for the LR schedules."""
    dtype = training_dtype(config, device)
    critic_path = config.critic.model_name_or_path
    reward_meta = read_reward_model_meta(critic_path) if critic_path is not None else {}
    if critic_path is not None:
        check_same_tokenizer(tokenizer, config)
    hybrid = config.enable_hybrid_engine and hybrid_engine_usable(device)
    if config.enable_hybrid_engine and not hybrid:
        distributed.print_rank_0(f"Hybrid Engine: DeepSpeed has no inference kernels on {device.type}; "
                                 "--enable_hybrid_engine is ignored and generation uses Hugging Face generate")

    actor = _build_actor(config, tokenizer, device, actor_steps_per_epoch)
    hybrid_generation = hybrid and has_inference_kernels(actor)
    if hybrid and not hybrid_generation:
        distributed.print_rank_0(f"Hybrid Engine: DeepSpeed has no inference policy for "
                                 f"{type(actor.module).__name__}; generating with Hugging Face generate")
    ref = _build_frozen_actor(config, tokenizer, device, actor_lora_layout=False)
    actor_ema = _build_frozen_actor(config, tokenizer, device, actor_lora_layout=True) if config.enable_ema else None
    critic = _build_critic(config, tokenizer, device, critic_steps_per_epoch) if config.builds_critic else None
    reward = _build_reward(config, tokenizer, device) if config.uses_reward_model else None
    critic_text = (f"critic ZeRO-{config.critic.zero_stage}" if critic is not None else
                   f"no critic ({config.rl.advantage_estimator} is critic-free)")
    reward_text = (f"reward model ZeRO-{frozen_stage(config.critic.zero_stage)}" if reward is not None else
                   f"no reward model (rewards from --reward_function {config.rl.reward_function})")
    distributed.print_rank_0(
        f"engines: actor ZeRO-{config.actor.zero_stage}"
        f"{' (Hybrid Engine generation)' if hybrid_generation else ''}, reference ZeRO-"
        f"{frozen_stage(config.actor.zero_stage)}{', EMA' if config.enable_ema else ''}, {critic_text}, "
        f"{reward_text}, {dtype}")
    return RLHFEngine(actor, ref, actor_ema, critic, reward, tokenizer, reward_meta, hybrid_generation)


def check_same_tokenizer(tokenizer, config: RLHFConfig) -> None:
    """The reward model must read the actor's token ids exactly as step 2 trained it to."""
    reward_tokenizer = load_tokenizer(config.critic.model_name_or_path, config.add_eot_token, config.eot_token,
                                      config.trust_remote_code)
    if tokenizer_fingerprint(reward_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise UserInputError(f"the actor '{config.actor.model_name_or_path}' and the reward model "
                             f"'{config.critic.model_name_or_path}' use different tokenizers: train the reward model "
                             "from the same base model and tokenizer as the actor")


def hybrid_engine_usable(device) -> bool:
    """DeepSpeed's inference kernels are CUDA only (on CPU, initialize even fails for Llama)."""
    return device.type == "cuda"


def has_inference_kernels(engine) -> bool:
    """Whether a Hybrid Engine found an inference policy for the model's layers. DeepSpeed only binds
    its `_generate` (what `engine.generate` calls) when it did; otherwise the model's own generate runs."""
    return hasattr(engine, "_generate")


def _actor_ds_config(config: RLHFConfig, device) -> dict:
    """The actor's config carries the Hybrid Engine and mixed-precision-LoRA entries; the critic's does not."""
    return train_ds_config(
        config, config.actor, config.per_device_training_batch_size, device,
        enable_hybrid_engine=config.enable_hybrid_engine and hybrid_engine_usable(device),
        inference_tp_size=config.inference_tp_size, release_inference_cache=config.release_inference_cache,
        pin_parameters=not config.unpin_actor_parameters, tp_gather_partition_size=config.tp_gather_partition_size,
        max_out_tokens=config.max_prompt_seq_len + config.max_answer_seq_len,
        enable_mixed_precision_lora=config.enable_mixed_precision_lora)


def _frozen_config(config: RLHFConfig, device, trained_stage: int, offload: bool, name: str) -> dict:
    stage = frozen_stage(trained_stage)
    if offload and stage != 3:
        distributed.print_rank_0(f"--offload_{name}_model has no effect at ZeRO stage {stage} (DeepSpeed offloads "
                                 "frozen parameters under stage 3 only)")
    return frozen_ds_config(config, stage, offload, config.per_device_training_batch_size, device)


def _build_actor(config: RLHFConfig, tokenizer, device, steps_per_epoch: int):
    ds_config = _actor_ds_config(config, device)
    model = create_hf_model(config.actor.model_name_or_path, tokenizer, ds_config=ds_config,
                            dropout=config.actor.dropout, trust_remote_code=config.trust_remote_code)
    seeding.set_random_seed(config.seed)  # the EMA's LoRA factors start from the same draw
    apply_lora(model, config.actor, config.only_optimize_lora)
    # Gradient checkpointing stays off here: the trainer turns it on around each training pass only.
    engine, _ = initialize_train_engine(model, config, config.actor, ds_config, device, steps_per_epoch,
                                        gradient_checkpointing=False)
    return engine


def _build_frozen_actor(config: RLHFConfig, tokenizer, device, actor_lora_layout: bool):
    """The reference model, or (`actor_lora_layout`) the EMA, which has the actor's LoRA layers so it can
    average them parameter by parameter."""
    ds_config = _frozen_config(config, device, config.actor.zero_stage, config.offload_reference_model, "reference")
    model = create_hf_model(config.actor.model_name_or_path, tokenizer, ds_config=ds_config,
                            dropout=config.actor.dropout, trust_remote_code=config.trust_remote_code)
    if actor_lora_layout:
        seeding.set_random_seed(config.seed)
        apply_lora(model, config.actor)
    return initialize_frozen_engine(model, ds_config)


def _build_critic(config: RLHFConfig, tokenizer, device, steps_per_epoch: int):
    ds_config = train_ds_config(config, config.critic, config.per_device_training_batch_size, device)
    model = create_reward_model(config.critic.model_name_or_path, tokenizer, ds_config=ds_config,
                                dropout=config.critic.dropout, trust_remote_code=config.trust_remote_code)
    apply_lora(model, config.critic, config.only_optimize_lora, force_optimize_params=(VALUE_HEAD,))
    engine, _ = initialize_train_engine(model, config, config.critic, ds_config, device, steps_per_epoch,
                                        gradient_checkpointing=False)
    return engine


def _build_reward(config: RLHFConfig, tokenizer, device):
    ds_config = _frozen_config(config, device, config.critic.zero_stage, config.offload_reward_model, "reward")
    model = create_reward_model(config.critic.model_name_or_path, tokenizer, ds_config=ds_config,
                                trust_remote_code=config.trust_remote_code)
    return initialize_frozen_engine(model, ds_config)
