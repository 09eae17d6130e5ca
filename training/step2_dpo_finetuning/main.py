"""Step 2 alternative: direct preference optimisation (DPO, IPO, conservative DPO) of the actor.

    deepspeed main.py --model_name_or_path out/actor --data_path synthetic/copy --output_dir out/dpo

Recipe: parse flags -> tokenizer -> phase-2 pairs (with reply masks) -> policy (+LoRA) and DeepSpeed engine
-> frozen reference (the same starting weights; ZeRO-3 when the policy uses 3, else 0; optionally
offloaded) -> its log-probs of every train and eval pair cached, the reference released (unless
--no_precompute_ref_log_probs) -> evaluation before training -> epochs of preference loss, evaluated every
--eval_interval steps and after each epoch -> save the policy as a Hugging Face directory (chat.py and step 3
load it as an actor).

A reply's log-probability is summed over its tokens and the EOS that ends it (prompt + reply + EOS, the
convention of steps 1 and 3); prompt and padding tokens are masked out. Log-probabilities are always
computed in fp32, so --compute_fp32_loss changes nothing here.

The reference is frozen and in eval mode, so its log-probs of a pair never change: by default one no-grad pass
before training scores every pair of both splits (reference_cache.py), batches carry their dataset index, and
each step and evaluation looks the reference's rows up instead of running it. The cache is recomputed, not
saved, on --resume (the same deterministic pass).
"""
import gc
import time

import torch

from training.utils import distributed, seeding
from training.utils.checkpoint import Checkpointer
from training.utils.config import FIXED, configuration, flag_values, group, in_range, option, parse_config, positive
from training.utils.data.chat_format import PROMPT_FORMAT_FILE
from training.utils.data.collators import PairCollator
from training.utils.data.pair_packing import packed_model_inputs, share_prompts
from training.utils.data.pipeline import PHASE_REWARD, SequenceDataConfig, load_supervised_data, make_loader
from training.utils.engine import (
    apply_lora,
    frozen_ds_config,
    frozen_stage,
    initialize_frozen_engine,
    initialize_train_engine,
    supervised_steps_per_epoch,
    train_ds_config,
    training_dtype,
)
from training.utils.errors import UserInputError, report_user_errors
from training.utils.flags import (
    ModelFlags,
    PeriodicEvalFlags,
    ReferenceOffloadFlags,
    SharedPromptFlags,
    SupervisedConfig,
)
from training.utils.loop import TrainLoop, finish_run, start_run
from training.utils.losses import (
    DPO_LOSS_TYPES,
    dpo_loss,
    packed_reply_positions,
    packed_sequence_log_probs,
    reply_positions,
    sequence_log_probs,
)
from training.utils.metrics_log import NO_EVAL_DATA, MetricsLog
from training.utils.model.build import create_hf_model
from training.utils.model.logits import logits_at
from training.utils.model.packed_linear import packed_linears
from training.utils.model.save import save_hf_format
from training.utils.precision import TORCH_DTYPES
from training.utils.reference_cache import IndexedCollator, IndexedDataset, ReferenceLogProbs, with_sample_index


@configuration(tensorboard_path="step2_tensorboard")
class DPOConfig(SupervisedConfig, SharedPromptFlags, ReferenceOffloadFlags, PeriodicEvalFlags):
    data: SequenceDataConfig = group(SequenceDataConfig)
    model: ModelFlags = group(ModelFlags, learning_rate=1e-3)
    beta: float = option(0.1, "Strength of the pull towards the reference model (DPO's beta, typically 0.1-0.5); the "
                              "implicit reward of a reply is beta * (log p_policy - log p_reference).", check=positive,
                         resume=FIXED)
    label_smoothing: float = option(0.0, "Conservative DPO: the assumed probability that a preference label is "
                                         "flipped (sigmoid loss only).", check=in_range(0.0, 0.5, high_open=True),
                                    resume=FIXED)
    loss_type: str = option("sigmoid", "[new] sigmoid: DPO (conservative DPO with --label_smoothing); ipo: IPO's "
                                       "squared loss (h - 1/(2 beta))^2 on the log-ratio difference h.",
                            choices=DPO_LOSS_TYPES, resume=FIXED)
    precompute_ref_log_probs: bool = option(True, "[new] Score every train and eval pair with the frozen reference "
                                                  "once before training (one no-grad pass; fp32 log-probs kept in "
                                                  "memory, 8 bytes a pair), then release the reference: no "
                                                  "reference forward per step. --no_precompute_ref_log_probs keeps "
                                                  "the reference and runs it on every batch.", resume=FIXED)

    def validate(self) -> None:
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise UserInputError(f"--label_smoothing applies to --loss_type sigmoid only: drop it for {self.loss_type}")
        super().validate()


def parse_args(argv=None) -> DPOConfig:
    return parse_config(DPOConfig, argv, "Step 2 alternative: DPO of the actor on preference pairs.")


def reply_log_probs(engine, batch) -> torch.Tensor:
    """[2B] summed log-probs of reply + EOS for the chosen rows then the rejected rows of a pair batch (run on its
    packed rows when it has them: --share_prompt), the LM head applied at the positions that predict them only."""
    if "packed_input_ids" in batch:
        keep = packed_reply_positions(batch["packed_source"], batch["reply_mask"], batch["packed_input_ids"].shape)
        logits = logits_at(engine, keep, **packed_model_inputs(batch), use_cache=False)
        return packed_sequence_log_probs(logits, batch["packed_source"], batch["input_ids"], batch["reply_mask"], keep)
    logits = logits_at(engine, reply_positions(batch["reply_mask"]), input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_log_probs(logits, batch["input_ids"], batch["reply_mask"])


def preference_loss(policy, reference, batch, config: DPOConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen and rejected implicit rewards, and the policy's chosen-minus-rejected log-prob.
    `reference`: the frozen reference model, or its cached log-probs of the batch's split (ReferenceLogProbs)."""
    policy_logps = reply_log_probs(policy, batch)
    with torch.no_grad():
        if isinstance(reference, ReferenceLogProbs):
            reference_logps = reference(batch)
        else:
            reference_logps = reply_log_probs(reference, batch)
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, *reference_logps.chunk(2),
                                                        beta=config.beta, label_smoothing=config.label_smoothing,
                                                        loss_type=config.loss_type)
    return losses, chosen_rewards, rejected_rewards, (policy_chosen - policy_rejected).detach()


def correct_pairs(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    # A tie counts half: before training policy == reference, every reward is 0, and accuracy reads 0.5 (chance).
    return (chosen_rewards > rejected_rewards).sum().item() + 0.5 * (chosen_rewards == rejected_rewards).sum().item()


def evaluate(policy, reference, loader, device, config: DPOConfig) -> dict | None:
    """Means over every pair of the eval split, all batches and all ranks together; None for an empty split."""
    policy.eval()
    totals = [0.0] * 6  # pairs, loss, chosen reward, rejected reward, correct, policy log-prob margin
    with torch.no_grad(), packed_linears(policy), packed_linears(reference):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            losses, chosen, rejected, logp_margin = preference_loss(policy, reference, batch, config)
            totals = [t + v for t, v in zip(totals, (
                losses.numel(), losses.sum().item(), chosen.sum().item(), rejected.sum().item(),
                correct_pairs(chosen, rejected), logp_margin.sum().item()))]
    pairs, loss, chosen, rejected, correct, logp_margin = distributed.all_reduce_sum(totals, device)
    policy.train()
    if pairs == 0:
        return None
    return {"loss": loss / pairs, "chosen_reward": chosen / pairs, "rejected_reward": rejected / pairs,
            "reward_accuracy": correct / pairs, "reward_margin": (chosen - rejected) / pairs,
            "logp_margin": logp_margin / pairs, "pairs": int(pairs)}


def describe(stats: dict | None) -> str:
    if stats is None:
        return NO_EVAL_DATA
    return (f"loss {stats['loss']:.4f}, reward accuracy {stats['reward_accuracy']:.4f}, chosen reward "
            f"{stats['chosen_reward']:.3f}, rejected reward {stats['rejected_reward']:.3f}, reward margin "
            f"{stats['reward_margin']:.3f}, policy log-prob margin {stats['logp_margin']:.3f} ({stats['pairs']} pairs)")


def build_reference(config: DPOConfig, tokenizer, ds_config: dict, device):
    """The frozen reference: the policy's starting weights, ZeRO-3 when the policy is (else 0), optionally offloaded."""
    if config.offload_reference_model and config.model.zero_stage != 3:
        distributed.print_rank_0(f"--offload_reference_model: ignored with --zero_stage {config.model.zero_stage}; "
                                 "DeepSpeed offloads a frozen model only under ZeRO-3, so the reference stays on "
                                 f"{device.type} (use --zero_stage 3 to offload it)")
    elif config.offload_reference_model:
        distributed.print_rank_0("--offload_reference_model: the reference model's parameters live in CPU memory "
                                 "(ZeRO-3)")
    ref_ds_config = frozen_ds_config(config, frozen_stage(config.model.zero_stage), config.offload_reference_model,
                                     ds_config["train_micro_batch_size_per_gpu"], device)
    seeding.set_random_seed(config.seed)
    return initialize_frozen_engine(
        create_hf_model(config.model.model_name_or_path, tokenizer, ds_config=ref_ds_config,
                        dropout=config.model.dropout, trust_remote_code=config.trust_remote_code), ref_ds_config)


def cache_reference_log_probs(reference, data, eval_loader, collator, config: DPOConfig, device
                              ) -> tuple[ReferenceLogProbs, ReferenceLogProbs]:
    """The reference's log-probs of every train and of every eval pair. The train split is scored in
    length-grouped batches of --per_device_eval_batch_size (little padding), the eval split in the eval loader's
    own batches (`eval_loader` yields "index"), so evaluation reads exactly what a per-batch forward gives."""
    def score(batch):
        return reply_log_probs(reference, batch)

    train_pass = make_loader(IndexedDataset(data.train), config.per_device_eval_batch_size,
                             IndexedCollator(collator), config.seed, shuffle=False,
                             length_grouped=True)
    with packed_linears(reference):
        train = ReferenceLogProbs.compute(score, train_pass, len(data.train), device, "reference log-probs (train)")
        evaluation = ReferenceLogProbs.compute(score, eval_loader, len(data.eval), device,
                                               "reference log-probs (eval)")
    return train, evaluation


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    device = start_run(config)
    ds_config = train_ds_config(config, config.model, config.per_device_train_batch_size, device, "step2_dpo_model")

    tokenizer, prompt_format, data, train_loader, eval_loader = load_supervised_data(config, PHASE_REWARD,
                                                                                     PairCollator, "pairs")

    # Policy and reference are built right after the same seeding, so a random-initialised tiny config
    # gives both the same starting weights (a checkpoint does anyway). LoRA starts as a zero update.
    seeding.set_random_seed(config.seed)
    policy = create_hf_model(config.model.model_name_or_path, tokenizer, ds_config=ds_config,
                             dropout=config.model.dropout, trust_remote_code=config.trust_remote_code)
    apply_lora(policy, config.model, config.only_optimize_lora)
    if config.share_prompt:
        share_prompts([train_loader, eval_loader], policy, tokenizer.pad_token_id,
                      TORCH_DTYPES[training_dtype(config, device)])
    pair_collator = train_loader.collate_fn
    steps_per_epoch = supervised_steps_per_epoch(config, len(train_loader), "pairs")
    engine, lr_scheduler = initialize_train_engine(policy, config, config.model, ds_config, device, steps_per_epoch)
    reference = build_reference(config, tokenizer, ds_config, device)
    if config.precompute_ref_log_probs:
        start_time = time.time()
        train_loader, eval_loader = with_sample_index(train_loader), with_sample_index(eval_loader)
        train_reference, eval_reference = cache_reference_log_probs(reference, data, eval_loader, pair_collator,
                                                                    config, device)
        reference.destroy()  # DeepSpeed's release of the engine's own state; then drop the last reference to it
        del reference
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        distributed.print_rank_0(
            f"reference log-probs cached in {time.time() - start_time:.1f} s: {len(data.train)} train + "
            f"{len(data.eval)} eval pairs, {(train_reference.nbytes + eval_reference.nbytes) / 1024:.1f} KiB (fp32); "
            "the reference model is released")
    else:
        train_reference = eval_reference = reference

    metrics = MetricsLog(config.enable_tensorboard, f"{config.tensorboard_path}/step2_dpo_model")
    checkpoints = Checkpointer(config, {"policy": engine}, device, data=data)
    if config.resume is None:
        stats = evaluate(engine, eval_reference, eval_loader, device, config)
        metrics.log_eval(0, stats)
        distributed.print_rank_0(f"before training: {describe(stats)}")
    start, _ = checkpoints.resume(metrics, loaders=[train_loader])
    checkpoints.watch_signals()

    loop = TrainLoop(start, config.num_train_epochs, config.print_loss)
    for epoch in loop.epochs(train_loader):
        for batch in loop.batches(train_loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            losses, chosen_rewards, rejected_rewards, _ = preference_loss(engine, train_reference, batch, config)
            loss = losses.mean()
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loop.record(loss.item(), samples=losses.numel())
            if not boundary:
                continue
            step_losses = loop.optimizer_step()
            metrics.log(loop.global_step, **{
                "train/loss": step_losses[-1], "train/lr": lr_scheduler.get_last_lr()[0],
                "train/reward_accuracy": correct_pairs(chosen_rewards, rejected_rewards) / losses.numel(),
                "train/reward_margin": (chosen_rewards - rejected_rewards).mean().item()})
            if config.eval_interval and loop.global_step % config.eval_interval == 0:
                stats = evaluate(engine, eval_reference, eval_loader, device, config)
                metrics.log_eval(loop.global_step, stats)
                distributed.print_rank_0(f"step {loop.global_step}: {describe(stats)}")
            checkpoints.step_boundary(loop.position, step_losses, metrics)
        summary = loop.epoch_summary()
        stats = evaluate(engine, eval_reference, eval_loader, device, config)
        metrics.log_eval(loop.global_step, stats)
        distributed.print_rank_0(f"epoch {epoch + 1}/{config.num_train_epochs}: train loss {summary.mean_loss:.4f}, "
                                 f"{'' if stats is None else 'eval '}{describe(stats)}, "
                                 f"{summary.samples_per_s:.1f} pairs/s")

    save_hf_format(engine.module, tokenizer, config.output_dir, metrics=metrics, metrics_title="step 2: DPO",
                   extra_json={"training_args.json": flag_values(config), "data_stats.json": data.stats,
                               PROMPT_FORMAT_FILE: prompt_format.record()})
    finish_run(checkpoints, metrics, f"saved the DPO policy to {config.output_dir}")


if __name__ == "__main__":
    main()
