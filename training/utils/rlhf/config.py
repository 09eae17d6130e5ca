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
from training.utils.losses import ADVANTAGE_ESTIMATORS, GROUP_BASELINE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES
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


CRITIC_FREE = tuple(e for e in ADVANTAGE_ESTIMATORS if e != "gae")
# What each estimator's paper (or its reference implementation) uses, for the flags left unset (None). GRPO:
# DeepSeekMath (KL as a k3 loss term, beta 0.04, each answer's token mean); Dr. GRPO: Liu et al. 2025 (no KL, no
# std and no length normalisation: a constant divisor); RLOO, REINFORCE++ and ReMax: KL in the reward, token mean
# (OpenRLHF's defaults). PPO (gae) keeps DeepSpeed-Chat's: KL in the reward, token mean.
ESTIMATOR_DEFAULTS = {
    "gae": {"use_kl_loss": False, "loss_agg_mode": "token_mean"},
    "grpo": {"use_kl_loss": True, "kl_estimator": "k3", "kl_loss_coef": 0.04, "loss_agg_mode": "seq_mean_token_mean"},
    "dr_grpo": {"use_kl_loss": True, "kl_estimator": "k3", "kl_loss_coef": 0.0,
                "loss_agg_mode": "seq_mean_token_sum_norm"},
    "rloo": {"use_kl_loss": False, "loss_agg_mode": "token_mean"},
    "reinforce_plus_plus": {"use_kl_loss": False, "loss_agg_mode": "token_mean"},
    "reinforce_plus_plus_baseline": {"use_kl_loss": False, "loss_agg_mode": "token_mean"},
    "remax": {"use_kl_loss": False, "loss_agg_mode": "token_mean"},
}
KL_LOSS_DEFAULTS = {"kl_estimator": "k3", "kl_loss_coef": 0.001}  # --use_kl_loss with an estimator whose paper has none


@dataclass
class AdvantageFlags:
    """advantage estimator and rewards ([new]: critic-free RL; see the README's critic-free section)"""
    advantage_estimator: str = option(
        "gae", "[new] How advantages are computed: gae = PPO with a critic (GAE); grpo (group mean and std), dr_grpo "
               "(group mean only), rloo (leave-one-out mean), reinforce_plus_plus (batch whitening), "
               "reinforce_plus_plus_baseline (group mean, then batch whitening), remax (a greedy answer's reward) "
               "train no critic. Formulas: training/utils/losses.py.", choices=ADVANTAGE_ESTIMATORS, resume=FIXED)
    n_samples_per_prompt: int = option(
        1, "[new] Answers sampled per prompt (a group), generated in one batch; grpo, dr_grpo, rloo and "
           "reinforce_plus_plus_baseline need at least 2. Rows per generation batch = "
           "--per_device_generation_batch_size x this.", check=at_least(1), resume=FIXED)
    reward_function: str | None = option(
        None, "[new] A rule reward: synthetic (the built-in tasks' checker), math (GSM8K-style: the reply's final "
              "number against the reference after '####') or path/to/file.py:function, fn(prompts, replies, "
              "references) -> list[float] (imports and runs that file: your code). None: the reward model alone.",
        resume=FIXED)
    reward_model_weight: float = option(
        1.0, "[new] Weight of the reward model's score when --reward_function is given too (score = this x reward "
             "model + --reward_function_weight x function); 0 uses no reward model (then a critic-free run must not "
             "name --critic_model_name_or_path).", check=at_least(0.0), resume=FIXED)
    reward_function_weight: float = option(1.0, "[new] Weight of --reward_function's reward (see "
                                                "--reward_model_weight).", check=at_least(0.0), resume=FIXED)
    use_kl_loss: bool | None = option(
        None, "[new] KL to the reference as a loss term (coefficient --kl_loss_coef, estimator --kl_estimator) "
              "instead of a penalty in the reward (--kl_ctl). None: the estimator's paper (on for grpo and "
              "dr_grpo, off otherwise).", resume=FIXED)
    kl_estimator: str | None = option(None, "[new] KL estimator of the KL loss: k1 (log-ratio), k2 (half its square), "
                                            "k3 (exp(-x) - 1 + x, GRPO's). None: k3.", choices=KL_ESTIMATORS,
                                      resume=FIXED)
    kl_loss_coef: float | None = option(None, "[new] Coefficient of the KL loss (the initial one with --target_kl). "
                                              "None: 0.04 for grpo (DeepSeekMath), 0 for dr_grpo, 0.001 otherwise.",
                                        check=at_least(0.0), resume=FIXED)
    loss_agg_mode: str | None = option(
        None, "[new] How per-token policy losses become one: token_mean (every token weighs the same), "
              "seq_mean_token_mean (every answer weighs the same), seq_mean_token_sum_norm (sum / (answers x "
              "--max_answer_seq_len), Dr. GRPO). None: seq_mean_token_mean for grpo, seq_mean_token_sum_norm for "
              "dr_grpo, token_mean otherwise (PPO's).", choices=LOSS_AGG_MODES, resume=FIXED)
    clip_ratio_low: float | None = option(None, "[new] Lower clip of the policy ratio, 1 - this. None: --cliprange.",
                                          check=positive, resume=FIXED)
    clip_ratio_high: float | None = option(None, "[new] Upper clip of the policy ratio, 1 + this (DAPO's "
                                                 "clip-higher: 0.28 with a low of 0.2). None: --cliprange.",
                                           check=positive, resume=FIXED)
    drop_equal_reward_groups: bool = option(
        False, "[new] DAPO's dynamic-sampling filter: answers of a prompt whose --n_samples_per_prompt rewards are all "
               "equal carry no signal and are left out of the loss (logged as groups/dropped_share). Critic-free "
               "estimators, --n_samples_per_prompt >= 2.", resume=FIXED)

    @property
    def critic_free(self) -> bool:
        return self.advantage_estimator != "gae"

    def resolve_defaults(self) -> None:
        """Fill the options left at None with the estimator's paper settings (ESTIMATOR_DEFAULTS), so
        training_args.json records what ran. The KL loss's estimator and coefficient stay None without a KL loss."""
        defaults = ESTIMATOR_DEFAULTS[self.advantage_estimator]
        for name in ("use_kl_loss", "loss_agg_mode"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if self.use_kl_loss:
            for name in ("kl_estimator", "kl_loss_coef"):
                if getattr(self, name) is None:
                    setattr(self, name, defaults.get(name, KL_LOSS_DEFAULTS[name]))


@dataclass
class CriticFlags(ModelFlags):
    """model"""
    model_name_or_path: str | None = option(None, "The reward model directory of step 2.", resume=FIXED)


@configuration(num_warmup_steps=100, tensorboard_path="step3_tensorboard")
class RLHFConfig(TrainingFlags, TokenizerFlags, DeepSpeedFlags, ReferenceOffloadFlags, LoggingFlags, PeriodicEvalFlags,
                 PaddingCompatFlags, CheckpointFlags):
    SAVES = RLHF_MODELS  # what --output_dir receives (see output_dir.check_output_dir)
    data: DataConfig = group(DataConfig)
    actor: ModelFlags = group(ModelFlags, prefix="actor_", title="actor", role="the actor", learning_rate=9.65e-6,
                              help={"model_name_or_path": "The SFT actor (step 1 output, or any causal LM directory / "
                                                          "hub id / tiny name); the reference model and the EMA start "
                                                          "from it too."})
    critic: CriticFlags = group(CriticFlags, prefix="critic_", title="critic", role="the critic",
                                learning_rate=5e-6,
                                help={"model_name_or_path": "The reward model directory of step 2: the frozen reward "
                                                            "model, and the critic's starting point. Needed by "
                                                            "--advantage_estimator gae; optional for a critic-free "
                                                            "estimator with --reward_function ([new])."})
    ppo: PPOFlags = group(PPOFlags)
    rl: AdvantageFlags = group(AdvantageFlags)
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
    separate_scoring_pass: bool = option(
        False, "[new] Compute the old log-probs and values in no-grad forwards of their own, as DeepSpeed-Chat does. "
               "By default, when a PPO step trains one mini-batch holding its whole generation batch "
               "(--generation_batches 1 and --per_device_training_batch_size at least the rows generated) and "
               "neither actor nor critic has dropout, the first update's forward gives them: the same numbers (PPO's "
               "ratio is exactly 1 there), one actor and one critic forward fewer per step, but both models' "
               "activations are held from scoring to the update (more memory).")
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
        paths = {"--actor_model_name_or_path": self.actor.model_name_or_path,
                 "--critic_model_name_or_path": self.critic.model_name_or_path}
        return {flag: path for flag, path in paths.items() if path is not None}

    @property
    def uses_reward_model(self) -> bool:
        """A reward model scores the answers: one is named and its weight is not 0."""
        return self.critic.model_name_or_path is not None and (self.rl.reward_function is None
                                                               or self.rl.reward_model_weight > 0)

    @property
    def builds_critic(self) -> bool:
        return not self.rl.critic_free

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high) clip of the policy ratio."""
        return (self.ppo.cliprange if self.rl.clip_ratio_low is None else self.rl.clip_ratio_low,
                self.ppo.cliprange if self.rl.clip_ratio_high is None else self.rl.clip_ratio_high)

    def validate(self) -> None:
        """Flag combinations rejected before any model is built."""
        if self.only_optimize_lora and self.actor.lora_dim <= 0 and self.critic.lora_dim <= 0:
            raise UserInputError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
        if self.enable_test_mode and self.test_stop_step < 1:
            raise UserInputError("--enable_test_mode needs --test_stop_step >= 1 (the step to stop after)")
        if self.inference_tp_size > 1 and self.actor.zero_stage != 3:
            raise UserInputError(f"--inference_tp_size {self.inference_tp_size} needs ZeRO stage 3 for the actor (got "
                                 f"{self.actor.zero_stage}): set --actor_zero_stage 3 or --inference_tp_size 1")
        self.validate_estimator()
        if self.offload and 0 in (self.actor.zero_stage, self.critic.zero_stage if self.builds_critic else 1):
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

    def validate_estimator(self) -> None:
        """The estimator, its group size, the reward sources and the critic agree; then the estimator's defaults."""
        rl, critic_path = self.rl, self.critic.model_name_or_path
        estimator = rl.advantage_estimator
        critic_free = ", ".join(CRITIC_FREE)
        if estimator in GROUP_BASELINE_ESTIMATORS and rl.n_samples_per_prompt < 2:
            raise UserInputError(f"--advantage_estimator {estimator} compares the answers of one prompt, so it needs "
                                 f"--n_samples_per_prompt >= 2 (got {rl.n_samples_per_prompt}): pass e.g. "
                                 "--n_samples_per_prompt 4, or use reinforce_plus_plus or remax")
        if not rl.critic_free and critic_path is None:
            raise UserInputError(f"--advantage_estimator {estimator} trains a critic, which starts from "
                                 "--critic_model_name_or_path: pass the step-2 reward model directory, or use a "
                                 f"critic-free estimator ({critic_free}) with --reward_function")
        if rl.reward_function is None and critic_path is None:
            raise UserInputError("no reward: pass --critic_model_name_or_path (a step-2 reward model) or "
                                 "--reward_function (synthetic, math or path/to/file.py:function)")
        if rl.reward_function is not None and critic_path is not None and rl.reward_model_weight == 0 and (
                rl.critic_free):
            raise UserInputError(f"--critic_model_name_or_path '{critic_path}' would be unused: "
                                 f"--advantage_estimator {estimator} trains no critic and --reward_model_weight 0 "
                                 "uses no reward model; drop --critic_model_name_or_path (or give the reward model "
                                 "a weight)")
        if rl.reward_function is None and self.rl.reward_model_weight == 0:
            raise UserInputError("--reward_model_weight 0 without --reward_function leaves no reward: give the "
                                 "reward model a weight or add --reward_function")
        if self.ppo.normalize_reward and not self.uses_reward_model:
            raise UserInputError("--normalize_reward standardises reward-model scores, and this run uses no reward "
                                 "model: drop --normalize_reward")
        if rl.drop_equal_reward_groups and (not rl.critic_free or rl.n_samples_per_prompt < 2):
            raise UserInputError(f"--drop_equal_reward_groups compares the rewards of a prompt's answers: it needs a "
                                 f"critic-free --advantage_estimator ({critic_free}) and --n_samples_per_prompt >= 2 "
                                 f"(got {estimator}, {rl.n_samples_per_prompt})")
        rl.resolve_defaults()
        given = [f"--{name} {getattr(rl, name)}" for name in ("kl_estimator", "kl_loss_coef")
                 if getattr(rl, name) is not None]
        if given and not rl.use_kl_loss:
            raise UserInputError(f"{' and '.join(given)} set the KL loss, and this run puts the KL in the reward "
                                 f"(--advantage_estimator {estimator} without --use_kl_loss; coefficient --kl_ctl): "
                                 "add --use_kl_loss or drop them")


def check_input_models(config: RLHFConfig) -> None:
    """Refuse, before any data or weights are loaded, an actor that is not a language model, damaged model
    files, and rollouts (prompt + answer) longer than the actor's or the critic/reward model's positions."""
    from training.utils.model.build import check_model_input

    length = config.max_prompt_seq_len + config.max_answer_seq_len
    what = (f"--max_prompt_seq_len {config.max_prompt_seq_len} + --max_answer_seq_len {config.max_answer_seq_len} "
            f"= {length}")
    fix = "lower them to at most {limit} together"
    for path, language_model in ((config.actor.model_name_or_path, True), (config.critic.model_name_or_path, False)):
        if path is None:  # a critic-free run scored by a function alone
            continue
        check_model_input(path, language_model=language_model, length=length, what=what, fix=fix,
                          trust_remote_code=config.trust_remote_code)
