"""Step 1: supervised fine-tuning of the actor.

    deepspeed main.py --model_name_or_path tiny/opt --data_path synthetic/arithmetic --output_dir out/actor

Recipe: parse flags -> tokenizer -> phase-1 data -> model (+LoRA) -> DeepSpeed engine -> perplexity
before training -> epochs (loss on reply tokens only) with perplexity after each -> save HF directory.
"""
import math

import torch

from training.utils import distributed, seeding
from training.utils.checkpoint import Checkpointer
from training.utils.config import configuration, flag_values, group, parse_config
from training.utils.data.collators import SFTCollator
from training.utils.data.pipeline import PHASE_SFT, SFTDataConfig, build_phase_data, make_loaders
from training.utils.engine import apply_lora, initialize_train_engine, train_ds_config
from training.utils.errors import report_user_errors
from training.utils.flags import ModelFlags, SupervisedConfig
from training.utils.loop import TrainLoop
from training.utils.losses import causal_lm_loss, count_label_tokens
from training.utils.metrics_log import MetricsLog
from training.utils.model.build import create_hf_model
from training.utils.model.save import save_hf_format
from training.utils.tokenizer import load_tokenizer


@configuration(tensorboard_path="step1_tensorboard")
class SFTConfig(SupervisedConfig):
    data: SFTDataConfig = group(SFTDataConfig)
    model: ModelFlags = group(ModelFlags, learning_rate=1e-3)


def parse_args(argv=None) -> SFTConfig:
    return parse_config(SFTConfig, argv, "Step 1: supervised fine-tuning (SFT) of the actor.")


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
    loss_sum, tokens = distributed.all_reduce_sum([loss_sum, tokens], device)
    engine.train()
    mean_loss = loss_sum / max(tokens, 1)
    return mean_loss, math.exp(min(mean_loss, 50.0))


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    device = distributed.init_distributed(config.local_rank)
    seeding.set_random_seed(config.seed)
    ds_config = train_ds_config(config, config.model, config.per_device_train_batch_size, device, "step1_model")

    tokenizer = load_tokenizer(config.model.model_name_or_path, config.add_eot_token, config.eot_token,
                               config.trust_remote_code)
    data = build_phase_data(config.data, tokenizer, PHASE_SFT)
    train_loader, eval_loader = make_loaders(data, config, SFTCollator(tokenizer.pad_token_id))
    distributed.print_rank_0(f"data: {len(data.train)} train / {len(data.eval)} eval samples "
                             f"(cache {data.cache_dir}; train {data.stats['train']})")

    model = create_hf_model(config.model.model_name_or_path, tokenizer, ds_config=ds_config,
                            dropout=config.model.dropout, trust_remote_code=config.trust_remote_code)
    apply_lora(model, config.model, config.only_optimize_lora)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    engine, lr_scheduler = initialize_train_engine(model, config, config.model, ds_config, device, steps_per_epoch)

    metrics = MetricsLog(config.enable_tensorboard, f"{config.tensorboard_path}/step1_model")
    checkpoints = Checkpointer(config, {"model": engine}, device)
    if config.resume is None:
        eval_loss, ppl = evaluate(engine, eval_loader, device, config.compute_fp32_loss)
        metrics.log(0, **{"eval/loss": eval_loss, "eval/perplexity": ppl})
        distributed.print_rank_0(f"before training: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}")
    start, _ = checkpoints.resume(metrics, loaders=[train_loader])
    checkpoints.watch_signals()

    loop = TrainLoop(start, config.num_train_epochs, config.print_loss)
    for epoch in loop.epochs(train_loader):
        for batch in loop.batches(train_loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
            loss = causal_lm_loss(logits, batch["labels"], config.compute_fp32_loss)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loop.record(loss.item(), samples=batch["input_ids"].size(0), tokens=int(batch["attention_mask"].sum()))
            if boundary:
                losses = loop.optimizer_step()
                metrics.log(loop.global_step, **{"train/loss": losses[-1], "train/lr": lr_scheduler.get_last_lr()[0]})
                checkpoints.step_boundary(loop.position, losses, metrics)
        summary = loop.epoch_summary()
        eval_loss, ppl = evaluate(engine, eval_loader, device, config.compute_fp32_loss)
        metrics.log(loop.global_step, **{"eval/loss": eval_loss, "eval/perplexity": ppl})
        distributed.print_rank_0(
            f"epoch {epoch + 1}/{config.num_train_epochs}: train loss {summary.mean_loss:.4f}, eval loss "
            f"{eval_loss:.4f}, perplexity {ppl:.2f}, {summary.samples_per_s:.1f} samples/s, "
            f"{summary.tokens_per_s:.0f} tokens/s")

    save_hf_format(engine.module, tokenizer, config.output_dir, metrics=metrics, metrics_title="step 1: SFT",
                   extra_json={"training_args.json": flag_values(config), "data_stats.json": data.stats})
    checkpoints.finish()
    metrics.close()
    distributed.print_rank_0(f"saved the SFT model to {config.output_dir}")
    distributed.shutdown_distributed()


if __name__ == "__main__":
    main()
