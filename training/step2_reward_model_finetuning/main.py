"""Step 2: reward model training on chosen/rejected pairs.

    deepspeed main.py --model_name_or_path out/actor --data_path synthetic/arithmetic --output_dir out/reward

Recipe: parse flags -> tokenizer -> phase-2 pairs -> reward model (decoder backbone + value head, +LoRA)
-> DeepSpeed engine -> evaluation before training -> epochs of pairwise loss, evaluated every
--eval_interval steps and after each epoch -> final evaluation over the whole eval split -> save the
reward model with its score statistics (step 3 loads it as critic and reward model).

The reward is read at the last real token of prompt + reply + EOS (the same end convention as steps 1
and 3), found from the attention mask, so padding side and pad == EOS do not matter.
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
from training.utils.engine import apply_lora, initialize_train_engine, train_ds_config
from training.utils.errors import report_user_errors
from training.utils.losses import pairwise_loss, span_pairwise_loss
from training.utils.model.reward_model import create_reward_model, save_reward_model
from training.utils.tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step 2: reward model training on preference pairs.")
    shared_args.add_data_args(parser, sft_only=False)
    shared_args.add_model_args(parser)
    shared_args.add_training_args(parser, learning_rate=5e-5, tensorboard_path="step2_tensorboard")
    shared_args.add_lora_args(parser)
    shared_args.add_deepspeed_args(parser)
    add_checkpoint_args(parser)
    parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                        help="Accepted for DeepSpeed-Chat compatibility and ignored: the score position comes "
                             "from the attention mask, so no model-specific padding count is needed.")
    parser.add_argument("--eval_interval", type=int, default=0,
                        help="Evaluate every N optimizer steps (0: only before training and after each epoch).")
    parser.add_argument("--eval_iters", type=int, default=100,
                        help="Batches per periodic evaluation (0: the whole eval split). The final evaluation, "
                             "whose statistics are saved with the model, always uses the whole split.")
    parser.add_argument("--loss_type", choices=["bt", "span"], default="bt",
                        help="[new] bt: Bradley-Terry on the last-token scores; span: DeepSpeed-Chat's mean over "
                             "the tokens where chosen and rejected differ.")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="[new] Margin m in -log sigmoid(r_chosen - r_rejected - m) (bt loss only).")
    args = parser.parse_args(argv)
    shared_args.validate_common(args)
    validate_checkpoint_args(args)
    return args


def pair_loss(output, batch, args) -> torch.Tensor:
    half = batch["input_ids"].size(0) // 2
    if args.loss_type == "span":
        mask = batch["attention_mask"]
        return span_pairwise_loss(output.values[:half], output.values[half:], mask[:half], mask[half:],
                                  batch["input_ids"][:half], batch["input_ids"][half:])
    return pairwise_loss(output.end_scores[:half], output.end_scores[half:], args.margin)


def evaluate(engine, loader, device, max_batches: int = 0) -> dict:
    """Pairwise accuracy, mean chosen/rejected score, mean margin, score mean/std; all ranks together."""
    engine.eval()
    totals = [0.0] * 6  # pairs, correct, sum chosen, sum rejected, sum of scores, sum of squared scores
    with torch.no_grad():
        for step, batch in enumerate(loader):
            if max_batches and step >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).end_scores.float()
            chosen, rejected = scores.chunk(2)
            totals = [t + v for t, v in zip(totals, (
                chosen.numel(), (chosen > rejected).sum().item(), chosen.sum().item(), rejected.sum().item(),
                scores.sum().item(), scores.pow(2).sum().item()))]
    pairs, correct, chosen_sum, rejected_sum, score_sum, square_sum = runtime.all_reduce_sum(totals, device)
    engine.train()
    pairs = max(pairs, 1)
    mean = score_sum / (2 * pairs)
    return {"accuracy": correct / pairs, "chosen_mean": chosen_sum / pairs, "rejected_mean": rejected_sum / pairs,
            "margin_mean": (chosen_sum - rejected_sum) / pairs, "mean": mean,
            "std": math.sqrt(max(square_sum / (2 * pairs) - mean * mean, 0.0)), "pairs": int(pairs)}


def log_eval(metrics, step: int, stats: dict) -> None:
    metrics.log(step, **{f"eval/{k}": v for k, v in stats.items() if k != "pairs"})


def describe(stats: dict) -> str:
    return (f"accuracy {stats['accuracy']:.4f}, chosen {stats['chosen_mean']:.3f}, rejected "
            f"{stats['rejected_mean']:.3f}, margin {stats['margin_mean']:.3f}, reward mean {stats['mean']:.3f} "
            f"std {stats['std']:.3f} ({stats['pairs']} pairs)")


@report_user_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    device = runtime.init_distributed(args.local_rank)
    runtime.set_random_seed(args.seed)
    ds_config = train_ds_config(args, device, tb_name="step2_model")

    tokenizer = load_tokenizer(args.model_name_or_path, args.add_eot_token, args.eot_token, args.trust_remote_code)
    data = build_phase_data(DataConfig.from_args(args), tokenizer, PHASE_REWARD)
    train_loader, eval_loader = make_loaders(data, args, PairCollator(tokenizer.pad_token_id))
    runtime.print_rank_0(f"data: {len(data.train)} train / {len(data.eval)} eval pairs "
                         f"(cache {data.cache_dir}; train {data.stats['train']})")

    model = create_reward_model(args.model_name_or_path, tokenizer, ds_config=ds_config, dropout=args.dropout,
                                trust_remote_code=args.trust_remote_code)
    apply_lora(model, args, force_optimize_params=("v_head",))
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    engine, lr_scheduler = initialize_train_engine(model, args, ds_config, device, steps_per_epoch)

    metrics = runtime.MetricsLog(args.enable_tensorboard, f"{args.tensorboard_path}/step2_model")
    checkpoints = Checkpointer(args, {"model": engine}, device)
    if args.resume is None:
        stats = evaluate(engine, eval_loader, device, args.eval_iters)
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
            output = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = pair_loss(output, batch, args)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            step_losses.append(loss.item())
            epoch_loss += step_losses[-1]
            epoch_batches += 1
            batches_done += 1
            epoch_pairs += batch["input_ids"].size(0) // 2
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
            if args.print_loss:
                print(f"[rank {runtime.rank()}] epoch {epoch + 1} step {global_step} loss {step_losses[-1]:.4f}",
                      flush=True)
            if not boundary:
                continue
            global_step += 1
            metrics.log(global_step, **{"train/loss": step_losses[-1], "train/lr": lr_scheduler.get_last_lr()[0]})
            if args.eval_interval and global_step % args.eval_interval == 0:
                stats = evaluate(engine, eval_loader, device, args.eval_iters)
                log_eval(metrics, global_step, stats)
                runtime.print_rank_0(f"step {global_step}: {describe(stats)}")
            checkpoints.step_boundary(Position(epoch, batches_done, global_step), step_losses, metrics)
            step_losses = []
        elapsed = time.time() - epoch_start
        stats = evaluate(engine, eval_loader, device, args.eval_iters)
        log_eval(metrics, global_step, stats)
        runtime.print_rank_0(f"epoch {epoch + 1}/{args.num_train_epochs}: train loss "
                             f"{epoch_loss / max(epoch_batches, 1):.4f}, {describe(stats)}, "
                             f"{epoch_pairs * runtime.world_size() / elapsed:.1f} pairs/s")

    # The statistics saved with the model cover the whole eval split; the last epoch's evaluation
    # already did when --eval_iters does not cut it short.
    covered_all = args.eval_iters == 0 or args.eval_iters >= len(eval_loader)
    final = stats if covered_all else evaluate(engine, eval_loader, device)
    runtime.print_rank_0(f"final (whole eval split): {describe(final)}")
    save_reward_model(engine.module, tokenizer, args.output_dir, reward_stats=final, metrics=metrics,
                      metrics_title="step 2: reward model",
                      extra_json={"training_args.json": vars(args), "data_stats.json": data.stats})
    checkpoints.finish()
    metrics.close()
    runtime.print_rank_0(f"saved the reward model to {args.output_dir}")
    runtime.shutdown_distributed()


if __name__ == "__main__":
    main()
