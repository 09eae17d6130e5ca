"""Step 3's configuration: DeepSpeed-Chat's flags and defaults, plus the PPO settings it hard-codes.

Additions beyond DeepSpeed-Chat are marked [new]; the reference's hard-coded PPO constants are flags
with the same defaults. The actor's and critic's own flags (`--actor_learning_rate`,
`--critic_zero_stage`, ...) are the shared ModelFlags under the prefixes `actor_` and `critic_`.
"""
from dataclasses import dataclass

from training.utils.checkpoint import CheckpointFlags
from training.utils.config import FIXED, at_least, configuration, group, in_range, option, positive
from training.utils.data.chat_format import chosen_format
from training.utils.data.pipeline import DataConfig
from training.utils.errors import UserInputError
from training.utils.flags import (
    DeepSpeedFlags,
    LoggingFlags,
    ModelFlags,
    PaddingCompatFlags,
    PeriodicEvalFlags,
    ReferenceOffloadFlags,
    SamplingFlags,
    TokenizerFlags,
    TrainingFlags,
)
from training.utils.output_dir import RLHF_MODELS, check_output_dir

PROMPT_OVERFLOW = ("truncate", "drop")


@dataclass
class PPOFlags:
    """PPO ([new]: DeepSpeed-Chat hard-codes these with the same defaults)"""
    kl_ctl: float = option(0.1, "[new] KL penalty coefficient beta in r_t = -beta * (log pi - log pi_ref) (+ score at "
                                "the end); the initial value when --target_kl is set.", check=at_least(0.0),
                           resume=FIXED)
    target_kl: float | None = option(None, "[new] Adaptive KL (Ziegler et al.): steer the coefficient towards this KL "
                                           "per answer. None keeps it fixed at --kl_ctl.", check=positive,
                                     resume=FIXED)
    kl_horizon: float = option(10000, "[new] Answers over which the adaptive coefficient may change by at most 20%%.",
                               check=positive, resume=FIXED)
    clip_reward_value: float = option(5.0, "[new] Reward-model scores are clipped to [-value, value].",
                                      check=positive, resume=FIXED)
    cliprange: float = option(0.2, "[new] PPO policy ratio clip epsilon.", check=positive, resume=FIXED)
    cliprange_value: float = option(0.2, "[new] Value clip: new values stay within old value +- this.",
                                    check=positive, resume=FIXED)
    gamma: float = option(1.0, "[new] Discount of GAE.", check=in_range(0.0, 1.0), resume=FIXED)
    lam: float = option(0.95, "[new] Lambda of GAE.", check=in_range(0.0, 1.0), resume=FIXED)
    no_whiten_advantages: bool = option(False, "[new] Do not whiten advantages (masked mean 0, std 1 over the "
                                               "experience buffer).", resume=FIXED)
    normalize_reward: bool = option(False, "[new] Standardise scores with the mean/std step 2 saved in "
                                           "reward_model.json (warns loudly and uses raw scores when they are "
                                           "missing).", resume=FIXED)
    truncation_penalty: float = option(0.0, "[new] Added to the score of an answer cut at --max_answer_seq_len "
                                             "without EOS (a number <= 0; 0 disables it).",
                                       check=lambda v: None if v <= 0 else "would reward cut-off answers: pass a "
                                                                           "number <= 0", resume=FIXED)


@configuration(num_warmup_steps=100, tensorboard_path="step3_tensorboard")
class RLHFConfig(TrainingFlags, TokenizerFlags, DeepSpeedFlags, ReferenceOffloadFlags, LoggingFlags, PeriodicEvalFlags,
                 PaddingCompatFlags, CheckpointFlags):
    SAVES = RLHF_MODELS  # what --output_dir receives (see output_dir.check_output_dir)
    data: DataConfig = group(DataConfig)
    actor: ModelFlags = group(ModelFlags, prefix="actor_", title="actor", role="the actor", learning_rate=9.65e-6,
                              help={"model_name_or_path": "The SFT actor (step 1 output, or any causal LM directory / "
                                                          "hub id / tiny name); the reference model and the EMA start "
                                                          "from it too."})
    critic: ModelFlags = group(ModelFlags, prefix="critic_", title="critic", role="the critic", learning_rate=5e-6,
                               help={"model_name_or_path": "The reward model directory of step 2: the frozen reward "
                                                           "model, and the critic's starting point."})
    ppo: PPOFlags = group(PPOFlags)
    sampling: SamplingFlags = group(SamplingFlags, title="rollout generation (always stops at the tokenizer's EOS)")

    # prompts and pre-training data
    unsupervised_dataset_name: str | None = option(
        None, "PPO-ptx: text to keep the language-model loss on (a hub dataset such as wikitext, a local "
              ".txt/.json/.jsonl/.parquet file or a save_to_disk directory). None: plain PPO.", resume=FIXED)
    unsupervised_dataset_config_name: str | None = option(
        None, "Configuration of a hub --unsupervised_dataset_name (e.g. wikitext-2-raw-v1).", resume=FIXED)
    unsup_coef: float = option(27.8, "Weight of the PPO-ptx language-model loss (InstructGPT's gamma).",
                               check=at_least(0.0))
    preprocessing_num_workers: int | None = option(
        None, "Accepted for DeepSpeed-Chat compatibility; tokenisation runs in the tokenizer's own parallel (Rust) "
              "batch path instead.")
    max_prompt_seq_len: int = option(256, "Longest prompt in tokens; longer ones are cut or dropped (see "
                                          "--prompt_overflow).", check=at_least(1), resume=FIXED)
    max_answer_seq_len: int = option(256, "Most tokens generated per answer (its EOS included).", check=at_least(1),
                                     resume=FIXED)
    prompt_overflow: str = option("truncate", "[new] Prompts over --max_prompt_seq_len: truncate keeps their last "
                                              "tokens (the latest turns), drop removes them. Either way they are "
                                              "counted in the log.", choices=PROMPT_OVERFLOW, resume=FIXED)

    # batches
    per_device_generation_batch_size: int = option(16, "Prompts per rank per generation batch.", check=at_least(1),
                                                   resume=FIXED)
    per_device_training_batch_size: int = option(16, "Experiences per rank per PPO mini-batch.", check=at_least(1),
                                                 resume=FIXED)
    generation_batches: int = option(1, "Generation batches collected into the experience buffer before PPO trains "
                                        "on it.", check=at_least(1), resume=FIXED)
    ppo_epochs: int = option(1, "Passes of PPO over each experience buffer.", check=at_least(1), resume=FIXED)
    enable_ema: bool = option(False, "Keep an exponential moving average of the actor, saved as actor_ema/.",
                              resume=FIXED)
    ema_beta: float = option(0.992, "[new] EMA decay: ema = beta * ema + (1 - beta) * actor after each PPO round.",
                             check=in_range(0.0, 1.0))

    # Hybrid Engine and DeepSpeed
    enable_hybrid_engine: bool = option(False, "DeepSpeed Hybrid Engine for the actor's generation (CUDA and "
                                               "supported architectures; elsewhere plain Hugging Face generate is "
                                               "used and this is logged).")
    unpin_actor_parameters: bool = option(False, "Hybrid Engine under ZeRO-3: gather parameters layer by layer while "
                                                 "generating instead of keeping them all gathered.")
    release_inference_cache: bool = option(False, "Hybrid Engine: free the inference workspace after each "
                                                  "generation.")
    inference_tp_size: int = option(1, "Hybrid Engine: tensor-parallel degree for generation (needs actor ZeRO-3).",
                                    check=at_least(1))
    tp_gather_partition_size: int = option(8, "Hybrid Engine with tensor parallelism: layers gathered at once.",
                                           check=at_least(1))
    offload_reward_model: bool = option(False, "Keep the reward model's parameters in CPU memory (effective under "
                                               "ZeRO-3).")
    align_overflow: bool = option(False, "fp16: when the actor's or the critic's gradients overflow, neither model "
                                         "updates in that step (all ranks agree). Without fp16 nothing overflows: "
                                         "logged, no effect.")
    enable_mixed_precision_lora: bool = option(False, "Actor under ZeRO-3 on CUDA: keep the frozen base weights "
                                                      "quantized (ZeRO++).")

    # logging and evaluation
    print_answers: bool = option(False, "Print one prompt and its generated answer (rank 0) every "
                                        "--print_answers_interval steps.")
    print_answers_interval: int = option(1, "See --print_answers.", check=at_least(1))
    eval_prompts: int = option(64, "[new] Held-out prompts (from the phase-3 eval split) per evaluation; 0: no "
                                   "evaluation.", check=at_least(0))
    enable_test_mode: bool = option(False, "Stop after --test_stop_step steps.")
    test_stop_step: int = option(0, "See --enable_test_mode.", check=at_least(0))

    def model_paths(self) -> dict[str, str]:
        """The models whose saved prompt format the run must share (chat_format.chosen_format)."""
        return {"--actor_model_name_or_path": self.actor.model_name_or_path,
                "--critic_model_name_or_path": self.critic.model_name_or_path}

    def validate(self) -> None:
        """Flag combinations rejected before any model is built."""
        if self.only_optimize_lora and self.actor.lora_dim <= 0 and self.critic.lora_dim <= 0:
            raise UserInputError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
        if self.enable_test_mode and self.test_stop_step < 1:
            raise UserInputError("--enable_test_mode needs --test_stop_step >= 1 (the step to stop after)")
        if self.inference_tp_size > 1 and self.actor.zero_stage != 3:
            raise UserInputError(f"--inference_tp_size {self.inference_tp_size} needs ZeRO stage 3 for the actor (got "
                                 f"{self.actor.zero_stage}): set --actor_zero_stage 3 or --inference_tp_size 1")
        if self.offload and 0 in (self.actor.zero_stage, self.critic.zero_stage):
            raise UserInputError(f"--offload moves the actor's and critic's partitioned optimizer state, so both need "
                                 f"ZeRO stage 1-3 (got actor {self.actor.zero_stage}, critic "
                                 f"{self.critic.zero_stage}): raise --actor_zero_stage / --critic_zero_stage or drop "
                                 "--offload")
        if self.enable_mixed_precision_lora and self.actor.lora_dim <= 0:
            raise UserInputError("--enable_mixed_precision_lora needs --actor_lora_dim > 0 (it quantizes the frozen "
                                 "base weights under LoRA)")
        chosen_format(self, self.model_paths())
        self.data.validate(self.output_dir)
        self.validate_checkpoints(self.output_dir)
        check_output_dir(self.output_dir, RLHF_MODELS, {
            "--actor_model_name_or_path": [self.actor.model_name_or_path],
            "--critic_model_name_or_path": [self.critic.model_name_or_path], "--data_path": self.data.data_path,
            "--unsupervised_dataset_name": [self.unsupervised_dataset_name],
            "--deepspeed_config": [self.deepspeed_config]})


def check_input_models(config: RLHFConfig) -> None:
    """Refuse, before any data or weights are loaded, an actor that is not a language model, damaged model
    files, and rollouts (prompt + answer) longer than the actor's or the critic/reward model's positions."""
    from training.utils.model.build import check_model_input

    length = config.max_prompt_seq_len + config.max_answer_seq_len
    what = (f"--max_prompt_seq_len {config.max_prompt_seq_len} + --max_answer_seq_len {config.max_answer_seq_len} "
            f"= {length}")
    fix = "lower them to at most {limit} together"
    for path, language_model in ((config.actor.model_name_or_path, True), (config.critic.model_name_or_path, False)):
        check_model_input(path, language_model=language_model, length=length, what=what, fix=fix,
                          trust_remote_code=config.trust_remote_code)
