"""Step 1: supervised fine-tuning of the actor.

    deepspeed main.py --model_name_or_path tiny/opt --data_path synthetic/arithmetic --output_dir out/actor

Recipe: parse flags -> tokenizer -> phase-1 data -> model (+LoRA) -> DeepSpeed engine -> perplexity
before training -> epochs (loss on reply tokens only) with perplexity after each -> save HF directory.
"""
import math

import torch

from training.utils import distributed
from training.utils.checkpoint import Checkpointer
from training.utils.config import FIXED, configuration, flag_values, group, option, parse_config
from training.utils.data.chat_format import PROMPT_FORMAT_FILE
from training.utils.data.collators import SFTCollator
from training.utils.data.packing import make_packed_loader, supports_packing, unpad_batches
from training.utils.data.pipeline import PHASE_SFT, SFTDataConfig, load_supervised_data
from training.utils.engine import (
    apply_lora,
    initialize_train_engine,
    supervised_steps_per_epoch,
    train_ds_config,
    training_dtype,
)
from training.utils.errors import report_user_errors
from training.utils.flags import ModelFlags, SupervisedConfig
from training.utils.loop import TrainLoop, finish_run, start_run
from training.utils.losses import causal_lm_loss, count_label_tokens, labelled_positions
from training.utils.metrics_log import NO_EVAL_DATA, MetricsLog
from training.utils.model.attention import packed_segments
from training.utils.model.build import create_hf_model
from training.utils.model.logits import logits_at
from training.utils.model.packed_linear import packed_linears
from training.utils.model.save import save_hf_format
from training.utils.precision import TORCH_DTYPES


@configuration(tensorboard_path="step1_tensorboard")
class SFTConfig(SupervisedConfig):
    data: SFTDataConfig = group(SFTDataConfig)
    model: ModelFlags = group(ModelFlags, learning_rate=1e-3)
    packing: bool = option(False, "[new] Pack several samples into each row of up to --max_seq_len tokens (exact: "
                                  "positions restart per sample and a block-diagonal mask keeps samples apart); "
                                  "--per_device_train_batch_size then counts rows. Models it cannot pack exactly "
                                  "fall back to length-grouped batches (logged).", resume=FIXED)


def parse_args(argv=None) -> SFTConfig:
    return parse_config(SFTConfig, argv, "Step 1: supervised fine-tuning (SFT) of the actor.")


def packed_train_loader(config: SFTConfig, data, tokenizer, model, dtype: str, fallback):
    """--packing's loader (rows of several samples), or `fallback` for a model packing would change."""
    if not supports_packing(model):
        distributed.print_rank_0(f"--packing: {type(model).__name__} ({model.config._attn_implementation} attention) "
                                 "cannot be packed exactly; training on length-grouped batches instead")
        return fallback
    loader = make_packed_loader(data.train, config.per_device_train_batch_size, config.data.max_seq_len,
                                tokenizer.pad_token_id, config.seed, mask_dtype=TORCH_DTYPES[dtype])
    distributed.print_rank_0(f"--packing: {len(data.train)} samples in {len(loader.dataset)} rows of up to "
                             f"{config.data.max_seq_len} tokens (efficiency {loader.dataset.efficiency():.3f})")
    return loader


def model_inputs(batch: dict) -> dict:
    """What the model reads of a batch: packed batches add per-sample position_ids, a 4-D mask and, on CPU, their
    segments (model.attention: each sample's attention computed on its own)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return inputs | (packed_segments(batch["segment_ids"]) if "segment_ids" in batch else {})


def sft_loss(engine, batch: dict, compute_fp32: bool, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the reply tokens, the LM head applied at the positions that predict them only."""
    logits = logits_at(engine, labelled_positions(batch["labels"]), **model_inputs(batch), use_cache=False)
    return causal_lm_loss(logits, batch["labels"], compute_fp32, reduction)


def real_samples_and_tokens(batch: dict) -> tuple[int, int]:
    """Samples and non-padding tokens of a batch, packed (segment_ids: -1 on padding) or not."""
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        return int((segments.max(dim=1).values + 1).sum()), int((segments >= 0).sum())
    return batch["input_ids"].size(0), int(batch["attention_mask"].sum())


def evaluate(engine, loader, device, compute_fp32: bool) -> tuple[float, float] | None:
    """Token-weighted mean loss and perplexity over the whole eval split, all ranks together; None when the split
    has no reply token to score (an empty eval split): a made-up loss 0 / perplexity 1 would read as perfect."""
    engine.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad(), packed_linears(engine):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum += sft_loss(engine, batch, compute_fp32, reduction="sum").item()
            tokens += count_label_tokens(batch["labels"])
    loss_sum, tokens = distributed.all_reduce_sum([loss_sum, tokens], device)
    engine.train()
    if tokens == 0:
        return None
    mean_loss = loss_sum / tokens
    return mean_loss, math.exp(min(mean_loss, 50.0))


def report_eval(metrics, step: int, result: tuple[float, float] | None) -> str:
    """Log an evaluation (never an absent one) and describe it for the log line."""
    if result is None:
        return NO_EVAL_DATA
    eval_loss, ppl = result
    metrics.log(step, **{"eval/loss": eval_loss, "eval/perplexity": ppl})
    return f"eval loss {eval_loss:.4f}, perplexity {ppl:.2f}"


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    device = start_run(config)
    ds_config = train_ds_config(config, config.model, config.per_device_train_batch_size, device, "step1_model")

    tokenizer, prompt_format, data, train_loader, eval_loader = load_supervised_data(config, PHASE_SFT,
                                                                                     SFTCollator, "samples")

    model = create_hf_model(config.model.model_name_or_path, tokenizer, ds_config=ds_config,
                            dropout=config.model.dropout, trust_remote_code=config.trust_remote_code)
    apply_lora(model, config.model, config.only_optimize_lora)
    if config.packing:
        train_loader = packed_train_loader(config, data, tokenizer, model, training_dtype(config, device), train_loader)
    elif unpad_batches(train_loader, model, tokenizer.pad_token_id, TORCH_DTYPES[training_dtype(config, device)],
                       device):
        distributed.print_rank_0("batches: each batch's samples in one row, padded to a multiple of 64 tokens only "
                                 "(segment attention on CPU; the same samples and loss as the padded batch)")
    steps_per_epoch = supervised_steps_per_epoch(config, len(train_loader), "rows" if config.packing else "samples")
    engine, lr_scheduler = initialize_train_engine(model, config, config.model, ds_config, device, steps_per_epoch)

    metrics = MetricsLog(config.enable_tensorboard, f"{config.tensorboard_path}/step1_model")
    checkpoints = Checkpointer(config, {"model": engine}, device, data=data)
    if config.resume is None:
        result = evaluate(engine, eval_loader, device, config.compute_fp32_loss)
        distributed.print_rank_0(f"before training: {report_eval(metrics, 0, result)}")
    start, _ = checkpoints.resume(metrics, loaders=[train_loader])
    checkpoints.watch_signals()

    loop = TrainLoop(start, config.num_train_epochs, config.print_loss)
    for epoch in loop.epochs(train_loader):
        for batch in loop.batches(train_loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = sft_loss(engine, batch, config.compute_fp32_loss)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            samples, tokens = real_samples_and_tokens(batch)
            loop.record(loss.item(), samples=samples, tokens=tokens)
            if boundary:
                losses = loop.optimizer_step()
                metrics.log(loop.global_step, **{"train/loss": losses[-1], "train/lr": lr_scheduler.get_last_lr()[0]})
                checkpoints.step_boundary(loop.position, losses, metrics)
        summary = loop.epoch_summary()
        result = evaluate(engine, eval_loader, device, config.compute_fp32_loss)
        distributed.print_rank_0(
            f"epoch {epoch + 1}/{config.num_train_epochs}: train loss {summary.mean_loss:.4f}, "
            f"{report_eval(metrics, loop.global_step, result)}, {summary.samples_per_s:.1f} samples/s, "
            f"{summary.tokens_per_s:.0f} tokens/s")

    save_hf_format(engine.module, tokenizer, config.output_dir, metrics=metrics, metrics_title="step 1: SFT",
                   extra_json={"training_args.json": flag_values(config), "data_stats.json": data.stats,
                               PROMPT_FORMAT_FILE: prompt_format.record()})
    finish_run(checkpoints, metrics, f"saved the SFT model to {config.output_dir}")


if __name__ == "__main__":
    main()
