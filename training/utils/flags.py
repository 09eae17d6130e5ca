"""The flag groups the step configurations are built from, each flag documented once.

DeepSpeed-Chat's names and defaults are kept; additions beyond DeepSpeed-Chat are marked [new].
A step composes them (`training/step*/main.py`, step 3 in `training/utils/rlhf/config.py`):
plain mixins for flags every step reads the same way, `group(ModelFlags, prefix=...)` for a trained
model (step 3 has two: `--actor_*` and `--critic_*`).
"""
from dataclasses import dataclass

from training.utils.checkpoint import CheckpointFlags
from training.utils.config import FIXED, at_least, in_range, option, positive
from training.utils.data.chat_format import PromptFormatFlags, chosen_format
from training.utils.errors import UserInputError
from training.utils.output_dir import LANGUAGE_MODEL, check_output_dir

DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
# DeepSpeed-Chat's --lr_scheduler_type choices (all understood by transformers.get_scheduler).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MAX_SEED = 2**32 - 1


@dataclass
class ModelPathFlags:
    """model"""
    model_name_or_path: str = option(
        help="Local HF model directory, hub id (needs network), or tiny/opt | tiny/llama | tiny/opt-20m | "
             "tiny/llama-20m (random-initialised configs shipped in the repo).", required=True, resume=FIXED)


@dataclass
class ModelFlags(ModelPathFlags):
    """model"""
    dropout: float | None = option(None, "Override every dropout probability of {role} (None keeps the config's).",
                                   check=in_range(0.0, 1.0, high_open=True))
    learning_rate: float = option(1e-3, "Peak learning rate of {role}.", check=positive)
    weight_decay: float = option(0.0, "AdamW weight decay of {role} (matrices only; biases and norms never decay).",
                                 check=at_least(0.0))
    zero_stage: int = option(0, "ZeRO stage of {role}.", choices=ZERO_STAGES, resume=FIXED)
    gradient_checkpointing: bool = option(False, "Activation checkpointing for {role} (recompute activations in "
                                                 "the backward pass: less memory, ~30%% more compute).")
    lora_dim: int = option(0, "LoRA rank of {role}; 0 disables LoRA.", check=at_least(0), resume=FIXED)
    lora_module_name: str = option("decoder.layers.", "LoRA replaces the nn.Linear layers of {role} whose name "
                                                      "contains this text (OPT: decoder.layers., Llama: layers.).",
                                   resume=FIXED)
    lora_learning_rate: float = option(5e-4, "Learning rate of the LoRA factors of {role}.", check=positive)


@dataclass
class EotTokenFlags:
    """model"""
    add_eot_token: bool = option(False, "Add --eot_token as a special token and use it as the end-of-turn (EOS) "
                                        "token (step 3: give it exactly as steps 1 and 2 did).", resume=FIXED)
    eot_token: str = option("<|endoftext|>", "See --add_eot_token.", resume=FIXED)


@dataclass
class TokenizerFlags(PromptFormatFlags, EotTokenFlags):
    """model"""
    trust_remote_code: bool = option(False, "[new] Allow model code from the model directory / hub (off by "
                                            "default: it runs code you downloaded).")


@dataclass
class SeedFlags:
    """training"""
    seed: int = option(1234, "Random seed (training: initialisation, dropout, data order; generation: sampling).",
                       check=in_range(0, MAX_SEED), resume=FIXED)


@dataclass
class PaddingCompatFlags:
    """model"""
    num_padding_at_beginning: int = option(1, "Accepted for DeepSpeed-Chat compatibility and ignored: scores and "
                                              "values are read at positions found from the attention mask.")


@dataclass
class TrainingFlags(SeedFlags):
    """training"""
    output_dir: str = option(help="Where the trained model is saved.", required=True)
    num_train_epochs: int = option(1, "Passes over the training data (step 3: over the prompts).", check=at_least(1),
                                   resume=FIXED)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", check=at_least(1),
                                              resume=FIXED)
    lr_scheduler_type: str = option("cosine", "Learning-rate schedule after the warmup.", choices=LR_SCHEDULERS,
                                    resume=FIXED)
    num_warmup_steps: int = option(0, "Optimizer steps of linear warmup from 0.", check=at_least(0), resume=FIXED)
    local_rank: int = option(-1, "Set by the launcher.")
    compute_fp32_loss: bool = option(False, "Compute log-probabilities and losses from fp32 logits when training "
                                            "in fp16/bf16.")
    only_optimize_lora: bool = option(False, "Train only the LoRA factors (and a reward/critic model's value head).",
                                      resume=FIXED)


@dataclass
class SupervisedBatchFlags:
    """training"""
    per_device_train_batch_size: int = option(16, "Training samples (pairs in step 2) per rank per micro-batch.",
                                              check=at_least(1), resume=FIXED)
    per_device_eval_batch_size: int = option(16, "Evaluation samples (pairs) per rank per batch.", check=at_least(1))
    print_loss: bool = option(False, "Print the loss of every micro-batch, on every rank.")


@dataclass
class SharedPromptFlags:
    """training"""
    share_prompt: bool = option(True, "[new] Run each preference pair as one row, [prompt | chosen | rejected], so "
                                      "the prompt the two replies share is computed once (exact: a 4-D mask keeps "
                                      "the replies apart and their positions continue from the prompt). Models it "
                                      "cannot pack exactly fall back to two padded rows per pair (logged).",
                                resume=FIXED)


@dataclass
class DeepSpeedFlags:
    """DeepSpeed"""
    dtype: str = option("auto", "Training precision. auto: bf16 where the hardware runs it natively (CPUs with "
                                "AVX-512 BF16 or AMX, CUDA GPUs with bf16), fp16 on older GPUs (DeepSpeed-Chat's "
                                "default), fp32 elsewhere; the choice and its reason are logged. Master weights and "
                                "optimizer state stay fp32; log-probabilities and reward scores are always computed "
                                "in fp32.", choices=DTYPE_CHOICES, resume=FIXED)
    offload: bool = option(False, "ZeRO-Offload the optimizer state (and the parameters at stage 3) to CPU memory.")
    deepspeed: bool = option(False, "Accepted for DeepSpeed's launcher convention; the DeepSpeed config is built "
                                    "from these flags.")
    deepspeed_config: str | None = option(None, "A JSON file of DeepSpeed config entries that override the built "
                                                "config (nested entries merge key by key).", resume=FIXED)


@dataclass
class ReferenceOffloadFlags:
    """DeepSpeed"""
    offload_reference_model: bool = option(False, "Keep the frozen reference model's parameters in CPU memory "
                                                  "(DeepSpeed offloads a frozen model under ZeRO-3 only; logged "
                                                  "and ignored at lower stages).")


@dataclass
class LoggingFlags:
    """logging"""
    enable_tensorboard: bool = option(False, "Write TensorBoard scalars under --tensorboard_path.")
    tensorboard_path: str = option("step1_tensorboard", "Directory of the TensorBoard event files.")


@dataclass
class PeriodicEvalFlags:
    """logging"""
    eval_interval: int = option(0, "[new in steps 2-3] Also evaluate every N steps (optimizer steps; step 3: PPO "
                                   "steps); 0: only before training and after each epoch (step 3: at start and end).",
                                check=at_least(0))


@dataclass
class SamplingFlags:
    """sampling"""
    temperature: float = option(1.0, "[new] Sampling temperature (log-probabilities use the same one); 0: greedy.",
                                check=at_least(0.0))
    top_p: float = option(1.0, "[new] Nucleus sampling: sample from the likeliest tokens holding this much "
                               "probability (1.0: off).",
                          check=in_range(0.0, 1.0, low_open=True))
    top_k: int = option(0, "[new] Sample from the k likeliest tokens (0: off).", check=at_least(0))
    repetition_penalty: float = option(1.0, "[new] Divide the logits of tokens already present by this (1.0: off; "
                                            ">1 discourages repeats).", check=positive)


@dataclass
class SupervisedConfig(TrainingFlags, SupervisedBatchFlags, TokenizerFlags, DeepSpeedFlags, LoggingFlags,
                       CheckpointFlags):
    """What steps 1, 2 and DPO share; each adds its `data` and `model` groups and its own flags.
    `SAVES` names what the step writes to --output_dir (checked before any work)."""
    SAVES = LANGUAGE_MODEL

    def validate(self) -> None:
        if self.only_optimize_lora and self.model.lora_dim <= 0:
            raise UserInputError("--only_optimize_lora needs --lora_dim > 0 (otherwise nothing would train)")
        chosen_format(self, {"--model_name_or_path": self.model.model_name_or_path})
        self.data.validate(self.output_dir)
        self.validate_checkpoints(self.output_dir)
        check_output_dir(self.output_dir, self.SAVES, {
            "--model_name_or_path": [self.model.model_name_or_path], "--data_path": self.data.data_path,
            "--sft_only_data_path": self.data.sft_only_data_path, "--deepspeed_config": [self.deepspeed_config]})


@dataclass
class ReplyLengthFlags:
    """generation"""
    max_new_tokens: int = option(128, "Most tokens per reply.", check=at_least(1))


@dataclass
class EvalBatchFlags:
    """evaluation"""
    batch_size: int = option(16, "Prompts (or rows) per forward pass.", check=at_least(1))
