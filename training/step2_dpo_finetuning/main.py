"""Step 2 alternative: direct preference optimisation (DPO, IPO, conservative DPO) of the actor.

    deepspeed main.py --model_name_or_path out/actor --data_path synthetic/copy --output_dir out/dpo

Recipe: parse flags -> tokenizer -> phase-2 pairs (with reply masks) -> policy (+LoRA) and DeepSpeed engine
-> frozen reference (the same starting weights; ZeRO-3 when the policy uses 3, else 0; optionally
offloaded) -> evaluation before training -> epochs of preference loss, evaluated every --eval_interval
steps and after each epoch -> save the policy as a Hugging Face directory (chat.py and step 3 load it
as an actor).

A reply's log-probability is summed over its tokens and the EOS that ends it (prompt + reply + EOS, the
convention of steps 1 and 3); prompt and padding tokens are masked out. Log-probabilities are always
computed in fp32, so --compute_fp32_loss changes nothing here.
"""
import argparse
import math
import time

import torch

from training.utils import args as shared_args
from training.utils import runtime
from training.utils.checkpoint import Checkpointer, Position, add_checkpoint_args, validate_checkpoint_args
from training.utils.data.collators import PairCollator
from training.utils.data.pipeline import PHASE_REWARD, DataConfig, build_phase_data, make_loaders
from training.utils.ds_config import get_eval_ds_config
from training.utils.engine import apply_lora, initialize_frozen_engine, initialize_train_engine, train_ds_config
from training.utils.errors import UserInputError, report_user_errors
from training.utils.losses import DPO_LOSS_TYPES, dpo_loss, sequence_log_probs
from training.utils.model.build import create_hf_model
from training.utils.model.save import save_hf_format
from training.utils.tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step 2 alternative: DPO of the actor on preference pairs.")
    shared_args.add_data_args(parser, sft_only=False)
    shared_args.add_model_args(parser)
    shared_args.add_training_args(parser, learning_rate=1e-3, tensorboard_path="step2_tensorboard")
    shared_args.add_lora_args(parser)
    shared_args.add_deepspeed_args(parser)
    add_checkpoint_args(parser)
    group = parser.add_argument_group("DPO")
    group.add_argument("--beta", type=float, default=0.1,
                       help="Strength of the pull towards the reference model (DPO's beta, typically 0.1-0.5); "
                            "the implicit reward of a reply is beta * (log p_policy - log p_reference).")
    group.add_argument("--label_smoothing", type=float, default=0.0,
                       help="Conservative DPO: the assumed probability that a preference label is flipped "
                            "(0 <= value < 0.5; sigmoid loss only).")
    group.add_argument("--loss_type", choices=DPO_LOSS_TYPES, default="sigmoid",
                       help="[new] sigmoid: DPO (conservative DPO with --label_smoothing); ipo: IPO's squared loss "
                            "(h - 1/(2 beta))^2 on the log-ratio difference h.")
    group.add_argument("--offload_reference_model", action="store_true",
                       help="Keep the frozen reference model's parameters in CPU memory (DeepSpeed offloads a "
                            "frozen model under ZeRO-3 only: with --zero_stage 0-2 this is logged and ignored).")
    group.add_argument("--eval_interval", type=int, default=0,
                       help="[new] Also evaluate every N optimizer steps (0: only before training and after each "
                            "epoch). Every evaluation covers the whole eval split.")
    args = parser.parse_args(argv)
    shared_args.validate_common(args)
    validate_checkpoint_args(args)
    if args.beta <= 0:
        raise UserInputError(f"--beta must be positive (got {args.beta}): try 0.1")
    if not 0.0 <= args.label_smoothing < 0.5:
        raise UserInputError(f"--label_smoothing must be in [0, 0.5) (got {args.label_smoothing}): it is the "
                             "probability that a preference label is wrong")
    if args.label_smoothing > 0 and args.loss_type != "sigmoid":
        raise UserInputError(f"--label_smoothing applies to --loss_type sigmoid only: drop it for {args.loss_type}")
    return args


def reply_log_probs(engine, batch) -> torch.Tensor:
    """[2B] summed log-probs of reply + EOS for the chosen rows then the rejected rows of a pair batch."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_log_probs(logits, batch["input_ids"], batch["reply_mask"])


def preference_loss(policy, reference, batch, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen and rejected implicit rewards, and the policy's chosen-minus-rejected log-prob."""
    policy_logps = reply_log_probs(policy, batch)
    with torch.no_grad():
        reference_logps = reply_log_probs(reference, batch)
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, *reference_logps.chunk(2),
                                                        beta=args.beta, label_smoothing=args.label_smoothing,
                                                        loss_type=args.loss_type)
    return losses, chosen_rewards, rejected_rewards, (policy_chosen - policy_rejected).detach()


def correct_pairs(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    # A tie counts half: before training policy == reference, every reward is 0, and accuracy reads 0.5 (chance).
    return (chosen_rewards > rejected_rewards).sum().item() + 0.5 * (chosen_rewards == rejected_rewards).sum().item()


def evaluate(policy, reference, loader, device, args) -> dict:
    """Means over every pair of the eval split, all batches and all ranks together."""
    policy.eval()
    totals = [0.0] * 6  # pairs, loss, chosen reward, rejected reward, correct, policy log-prob margin
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            losses, chosen, rejected, logp_margin = preference_loss(policy, reference, batch, args)
            totals = [t + v for t, v in zip(totals, (
                losses.numel(), losses.sum().item(), chosen.sum().item(), rejected.sum().item(),
                correct_pairs(chosen, rejected), logp_margin.sum().item()))]
    pairs, loss, chosen, rejected, correct, logp_margin = runtime.all_reduce_sum(totals, device)
    policy.train()
    pairs = max(pairs, 1)
    return {"loss": loss / pairs, "chosen_reward": chosen / pairs, "rejected_reward": rejected / pairs,
            "reward_accuracy": correct / pairs, "reward_margin": (chosen - rejected) / pairs,
            "logp_margin": logp_margin / pairs, "pairs": int(pairs)}


def log_eval(metrics, step: int, stats: dict) -> None:
    metrics.log(step, **{f"eval/{k}": v for k, v in stats.items() if k != "pairs"})


def describe(stats: dict) -> str:
    return (f"loss {stats['loss']:.4f}, reward accuracy {stats['reward_accuracy']:.4f}, chosen reward "
            f"{stats['chosen_reward']:.3f}, rejected reward {stats['rejected_reward']:.3f}, reward margin "
            f"{stats['reward_margin']:.3f}, policy log-prob margin {stats['logp_margin']:.3f} ({stats['pairs']} pairs)")


def reference_ds_config(args, ds_config: dict, device) -> dict:
    """DeepSpeed-Chat's rule: the reference uses ZeRO-3 when the policy does, else stage 0."""
    if args.offload_reference_model and args.zero_stage != 3:
        runtime.print_rank_0(f"--offload_reference_model: ignored with --zero_stage {args.zero_stage}; DeepSpeed "
                             "offloads a frozen model only under ZeRO-3, so the reference stays on "
                             f"{device.type} (use --zero_stage 3 to offload it)")
    elif args.offload_reference_model:
        runtime.print_rank_0("--offload_reference_model: the reference model's parameters live in CPU memory (ZeRO-3)")
    return get_eval_ds_config(offload=args.offload_reference_model,
                              dtype=shared_args.resolve_dtype(args.dtype, device.type), stage=args.zero_stage,
                              micro_batch_size=ds_config["train_micro_batch_size_per_gpu"],
                              train_batch_size=ds_config["train_batch_size"], device=device.type)


@report_user_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    device = runtime.init_distributed(args.local_rank)
    runtime.set_random_seed(args.seed)
    ds_config = train_ds_config(args, device, tb_name="step2_dpo_model")

    tokenizer = load_tokenizer(args.model_name_or_path, args.add_eot_token, args.eot_token, args.trust_remote_code)
    data = build_phase_data(DataConfig.from_args(args), tokenizer, PHASE_REWARD)
    train_loader, eval_loader = make_loaders(data, args, PairCollator(tokenizer.pad_token_id))
    runtime.print_rank_0(f"data: {len(data.train)} train / {len(data.eval)} eval pairs "
                         f"(cache {data.cache_dir}; train {data.stats['train']})")

    # Policy and reference are built right after the same seeding, so a random-initialised tiny config
    # gives both the same starting weights (a checkpoint does anyway). LoRA starts as a zero update.
    runtime.set_random_seed(args.seed)
    policy = create_hf_model(args.model_name_or_path, tokenizer, ds_config=ds_config, dropout=args.dropout,
                             trust_remote_code=args.trust_remote_code)
    apply_lora(policy, args)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    engine, lr_scheduler = initialize_train_engine(policy, args, ds_config, device, steps_per_epoch)
    ref_ds_config = reference_ds_config(args, ds_config, device)
    runtime.set_random_seed(args.seed)
    reference = initialize_frozen_engine(
        create_hf_model(args.model_name_or_path, tokenizer, ds_config=ref_ds_config, dropout=args.dropout,
                        trust_remote_code=args.trust_remote_code), ref_ds_config)

    metrics = runtime.MetricsLog(args.enable_tensorboard, f"{args.tensorboard_path}/step2_dpo_model")
    checkpoints = Checkpointer(args, {"policy": engine}, device)
    if args.resume is None:
        stats = evaluate(engine, reference, eval_loader, device, args)
        log_eval(metrics, 0, stats)
        runtime.print_rank_0(f"before training: {describe(stats)}")
    start, _ = checkpoints.resume(metrics, loaders=[train_loader])
    checkpoints.watch_signals()

    global_step = start.global_step
    for epoch in range(start.epoch, args.num_train_epochs):
        train_loader.sampler.set_epoch(epoch)
        batches_done = start.batches_done if epoch == start.epoch else 0
        epoch_start, epoch_loss, epoch_batches, epoch_pairs = time.time(), 0.0, 0, 0
        step_losses = []
        bar = runtime.progress(train_loader, desc=f"epoch {epoch + 1}/{args.num_train_epochs}")
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            losses, chosen_rewards, rejected_rewards, _ = preference_loss(engine, reference, batch, args)
            loss = losses.mean()
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            step_losses.append(loss.item())
            epoch_loss += step_losses[-1]
            epoch_batches += 1
            batches_done += 1
            epoch_pairs += losses.numel()
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
            if args.print_loss:
                print(f"[rank {runtime.rank()}] epoch {epoch + 1} step {global_step} loss {step_losses[-1]:.4f}",
                      flush=True)
            if not boundary:
                continue
            global_step += 1
            metrics.log(global_step, **{
                "train/loss": step_losses[-1], "train/lr": lr_scheduler.get_last_lr()[0],
                "train/reward_accuracy": correct_pairs(chosen_rewards, rejected_rewards) / losses.numel(),
                "train/reward_margin": (chosen_rewards - rejected_rewards).mean().item()})
            if args.eval_interval and global_step % args.eval_interval == 0:
                stats = evaluate(engine, reference, eval_loader, device, args)
                log_eval(metrics, global_step, stats)
                runtime.print_rank_0(f"step {global_step}: {describe(stats)}")
            checkpoints.step_boundary(Position(epoch, batches_done, global_step), step_losses, metrics)
            step_losses = []
        elapsed = time.time() - epoch_start
        stats = evaluate(engine, reference, eval_loader, device, args)
        log_eval(metrics, global_step, stats)
        runtime.print_rank_0(f"epoch {epoch + 1}/{args.num_train_epochs}: train loss "
                             f"{epoch_loss / max(epoch_batches, 1):.4f}, eval {describe(stats)}, "
                             f"{epoch_pairs * runtime.world_size() / elapsed:.1f} pairs/s")

    save_hf_format(engine.module, tokenizer, args.output_dir, metrics=metrics, metrics_title="step 2: DPO",
                   extra_json={"training_args.json": vars(args), "data_stats.json": data.stats})
    checkpoints.finish()
    metrics.close()
    runtime.print_rank_0(f"saved the DPO policy to {args.output_dir}")
    runtime.shutdown_distributed()


if __name__ == "__main__":
    main()
