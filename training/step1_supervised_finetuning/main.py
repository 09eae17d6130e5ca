"""Step 1: supervised fine-tuning of the actor.

    deepspeed main.py --model_name_or_path tiny/opt --data_path synthetic/arithmetic --output_dir out/actor

Recipe: parse flags -> tokenizer -> phase-1 data -> model (+LoRA) -> DeepSpeed engine -> perplexity
before training -> epochs (loss on reply tokens only) with perplexity after each -> save HF directory.
"""
import argparse
import math
import time

import torch

from training.utils import args as shared_args
from training.utils import runtime
from training.utils.checkpoint import Checkpointer, Position, add_checkpoint_args, validate_checkpoint_args
from training.utils.data.collators import SFTCollator
from training.utils.data.pipeline import PHASE_SFT, DataConfig, build_phase_data, make_loaders
from training.utils.engine import apply_lora, initialize_train_engine, train_ds_config
from training.utils.errors import report_user_errors
from training.utils.losses import causal_lm_loss, count_label_tokens
from training.utils.model.build import create_hf_model
from training.utils.model.save import save_hf_format
from training.utils.tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step 1: supervised fine-tuning (SFT) of the actor.")
    shared_args.add_data_args(parser, sft_only=True)
    shared_args.add_model_args(parser)
    shared_args.add_training_args(parser, learning_rate=1e-3, tensorboard_path="step1_tensorboard")
    shared_args.add_lora_args(parser)
    shared_args.add_deepspeed_args(parser)
    add_checkpoint_args(parser)
    parser.add_argument("--train_on_prompt", action="store_true",
                        help="[new] Also train on prompt tokens (default: loss on assistant replies only).")
    args = parser.parse_args(argv)
    shared_args.validate_common(args)
    validate_checkpoint_args(args)
    return args


def evaluate(engine, loader, device, compute_fp32: bool) -> tuple[float, float]:
    """Token-weighted mean loss and perplexity over the whole eval split, all ranks together."""
    engine.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
            loss_sum += causal_lm_loss(logits, batch["labels"], compute_fp32, reduction="sum").item()
            tokens += count_label_tokens(batch["labels"])
    loss_sum, tokens = runtime.all_reduce_sum([loss_sum, tokens], device)
    engine.train()
    mean_loss = loss_sum / max(tokens, 1)
    return mean_loss, math.exp(min(mean_loss, 50.0))


@report_user_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    device = runtime.init_distributed(args.local_rank)
    runtime.set_random_seed(args.seed)
    ds_config = train_ds_config(args, device, tb_name="step1_model")

    tokenizer = load_tokenizer(args.model_name_or_path, args.add_eot_token, args.eot_token, args.trust_remote_code)
    data = build_phase_data(DataConfig.from_args(args), tokenizer, PHASE_SFT)
    train_loader, eval_loader = make_loaders(data, args, SFTCollator(tokenizer.pad_token_id))
    runtime.print_rank_0(f"data: {len(data.train)} train / {len(data.eval)} eval samples "
                         f"(cache {data.cache_dir}; train {data.stats['train']})")

    model = create_hf_model(args.model_name_or_path, tokenizer, ds_config=ds_config, dropout=args.dropout,
                            trust_remote_code=args.trust_remote_code)
    apply_lora(model, args)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    engine, lr_scheduler = initialize_train_engine(model, args, ds_config, device, steps_per_epoch)

    metrics = runtime.MetricsLog(args.enable_tensorboard, f"{args.tensorboard_path}/step1_model")
    checkpoints = Checkpointer(args, {"model": engine}, device)
    if args.resume is None:
        eval_loss, ppl = evaluate(engine, eval_loader, device, args.compute_fp32_loss)
        metrics.log(0, **{"eval/loss": eval_loss, "eval/perplexity": ppl})
        runtime.print_rank_0(f"before training: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}")
    start, _ = checkpoints.resume(metrics, loaders=[train_loader])
    checkpoints.watch_signals()

    global_step = start.global_step
    for epoch in range(start.epoch, args.num_train_epochs):
        train_loader.sampler.set_epoch(epoch)
        batches_done = start.batches_done if epoch == start.epoch else 0
        epoch_start, epoch_loss, epoch_batches, epoch_samples, epoch_tokens = time.time(), 0.0, 0, 0, 0
        step_losses = []
        bar = runtime.progress(train_loader, desc=f"epoch {epoch + 1}/{args.num_train_epochs}")
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
            loss = causal_lm_loss(logits, batch["labels"], args.compute_fp32_loss)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            step_losses.append(loss.item())
            epoch_loss += step_losses[-1]
            epoch_batches += 1
            batches_done += 1
            epoch_samples += batch["input_ids"].size(0)
            epoch_tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
            if args.print_loss:
                print(f"[rank {runtime.rank()}] epoch {epoch + 1} step {global_step} loss {step_losses[-1]:.4f}",
                      flush=True)
            if boundary:
                global_step += 1
                metrics.log(global_step, **{"train/loss": step_losses[-1], "train/lr": lr_scheduler.get_last_lr()[0]})
                checkpoints.step_boundary(Position(epoch, batches_done, global_step), step_losses, metrics)
                step_losses = []
        elapsed = time.time() - epoch_start
        eval_loss, ppl = evaluate(engine, eval_loader, device, args.compute_fp32_loss)
        metrics.log(global_step, **{"eval/loss": eval_loss, "eval/perplexity": ppl})
        world = runtime.world_size()
        runtime.print_rank_0(
            f"epoch {epoch + 1}/{args.num_train_epochs}: train loss {epoch_loss / max(epoch_batches, 1):.4f}, "
            f"eval loss {eval_loss:.4f}, perplexity {ppl:.2f}, {epoch_samples * world / elapsed:.1f} samples/s, "
            f"{epoch_tokens * world / elapsed:.0f} tokens/s")

    save_hf_format(engine.module, tokenizer, args.output_dir, metrics=metrics, metrics_title="step 1: SFT",
                   extra_json={"training_args.json": vars(args), "data_stats.json": data.stats})
    checkpoints.finish()
    metrics.close()
    runtime.print_rank_0(f"saved the SFT model to {args.output_dir}")
    runtime.shutdown_distributed()


if __name__ == "__main__":
    main()
