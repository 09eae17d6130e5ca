"""Step 2: reward model training on chosen/rejected pairs.

    deepspeed main.py --model_name_or_path out/actor --data_path synthetic/arithmetic --output_dir out/reward

Recipe: parse flags -> tokenizer -> phase-2 pairs -> reward model (decoder backbone + value head, +LoRA)
-> DeepSpeed engine -> evaluation before training -> epochs of pairwise loss, evaluated every
--eval_interval steps and after each epoch -> final evaluation over the whole eval split -> save the
reward model with its score statistics (step 3 loads it as critic and reward model).

The reward is read at the last real token of prompt + reply + EOS (the same end convention as steps 1
and 3), found from the attention mask, so padding side and pad == EOS do not matter.
"""
import math

import torch

from training.utils import distributed
from training.utils.checkpoint import Checkpointer
from training.utils.config import FIXED, at_least, configuration, flag_values, group, option, parse_config
from training.utils.data.chat_format import PROMPT_FORMAT_FILE
from training.utils.data.collators import PairCollator
from training.utils.data.pair_packing import reward_model_inputs, share_prompts
from training.utils.data.pipeline import PHASE_REWARD, SequenceDataConfig, load_supervised_data
from training.utils.engine import (
    apply_lora,
    initialize_train_engine,
    supervised_steps_per_epoch,
    train_ds_config,
    training_dtype,
)
from training.utils.errors import report_user_errors
from training.utils.flags import ModelFlags, PaddingCompatFlags, PeriodicEvalFlags, SharedPromptFlags, SupervisedConfig
from training.utils.loop import TrainLoop, finish_run, start_run
from training.utils.losses import pairwise_loss, span_pairwise_loss
from training.utils.metrics_log import NO_EVAL_DATA, MetricsLog
from training.utils.model.packed_linear import packed_linears
from training.utils.model.reward_model import create_reward_model, save_reward_model
from training.utils.output_dir import REWARD_MODEL
from training.utils.precision import TORCH_DTYPES


@configuration(tensorboard_path="step2_tensorboard")
class RewardConfig(SupervisedConfig, SharedPromptFlags, PeriodicEvalFlags, PaddingCompatFlags):
    SAVES = REWARD_MODEL
    data: SequenceDataConfig = group(SequenceDataConfig)
    model: ModelFlags = group(ModelFlags, learning_rate=5e-5)
    eval_iters: int = option(100, "Batches per periodic evaluation (0: the whole eval split). The final evaluation, "
                                  "whose statistics are saved with the model, always uses the whole split.",
                             check=at_least(0))
    reward_loss: str = option("bt", "[new] bt: Bradley-Terry on the last-token scores; span: DeepSpeed-Chat's mean "
                                    "over the tokens where chosen and rejected differ.", choices=("bt", "span"),
                              resume=FIXED)
    margin: float = option(0.0, "[new] Margin m in -log sigmoid(r_chosen - r_rejected - m) (bt loss only).")


def parse_args(argv=None) -> RewardConfig:
    return parse_config(RewardConfig, argv, "Step 2: reward model training on preference pairs.")


def pair_loss(output, batch, config: RewardConfig) -> torch.Tensor:
    half = batch["input_ids"].size(0) // 2
    if config.reward_loss == "span":
        mask = batch["attention_mask"]
        return span_pairwise_loss(output.values[:half], output.values[half:], mask[:half], mask[half:],
                                  batch["input_ids"][:half], batch["input_ids"][half:])
    return pairwise_loss(output.end_scores[:half], output.end_scores[half:], config.margin)


def evaluate(engine, loader, device, max_batches: int = 0) -> dict | None:
    """Pairwise accuracy, mean chosen/rejected score, mean margin, score mean/std; all ranks together. None when
    there is no pair to score (an empty eval split): invented numbers would be saved as the reward statistics."""
    engine.eval()
    totals = [0.0] * 6  # pairs, correct, sum chosen, sum rejected, sum of scores, sum of squared scores
    with torch.no_grad(), packed_linears(engine):
        for step, batch in enumerate(loader):
            if max_batches and step >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            scores = engine(**reward_model_inputs(batch)).end_scores.float()
            chosen, rejected = scores.chunk(2)
            totals = [t + v for t, v in zip(totals, (
                chosen.numel(), (chosen > rejected).sum().item(), chosen.sum().item(), rejected.sum().item(),
                scores.sum().item(), scores.pow(2).sum().item()))]
    pairs, correct, chosen_sum, rejected_sum, score_sum, square_sum = distributed.all_reduce_sum(totals, device)
    engine.train()
    if pairs == 0:
        return None
    mean = score_sum / (2 * pairs)
    return {"accuracy": correct / pairs, "chosen_mean": chosen_sum / pairs, "rejected_mean": rejected_sum / pairs,
            "margin_mean": (chosen_sum - rejected_sum) / pairs, "mean": mean,
            "std": math.sqrt(max(square_sum / (2 * pairs) - mean * mean, 0.0)), "pairs": int(pairs)}


def describe(stats: dict | None) -> str:
    if stats is None:
        return NO_EVAL_DATA
    return (f"accuracy {stats['accuracy']:.4f}, chosen {stats['chosen_mean']:.3f}, rejected "
            f"{stats['rejected_mean']:.3f}, margin {stats['margin_mean']:.3f}, reward mean {stats['mean']:.3f} "
            f"std {stats['std']:.3f} ({stats['pairs']} pairs)")


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    device = start_run(config)
    ds_config = train_ds_config(config, config.model, config.per_device_train_batch_size, device, "step2_model")

    tokenizer, prompt_format, data, train_loader, eval_loader = load_supervised_data(config, PHASE_REWARD,
                                                                                     PairCollator, "pairs")

    model = create_reward_model(config.model.model_name_or_path, tokenizer, ds_config=ds_config,
                                dropout=config.model.dropout, trust_remote_code=config.trust_remote_code)
    apply_lora(model, config.model, config.only_optimize_lora, force_optimize_params=("v_head",))
    if config.share_prompt:
        share_prompts([train_loader, eval_loader], model.backbone, tokenizer.pad_token_id,
                      TORCH_DTYPES[training_dtype(config, device)])
    steps_per_epoch = supervised_steps_per_epoch(config, len(train_loader), "pairs")
    engine, lr_scheduler = initialize_train_engine(model, config, config.model, ds_config, device, steps_per_epoch)

    metrics = MetricsLog(config.enable_tensorboard, f"{config.tensorboard_path}/step2_model")
    checkpoints = Checkpointer(config, {"model": engine}, device, data=data)
    if config.resume is None:
        stats = evaluate(engine, eval_loader, device, config.eval_iters)
        metrics.log_eval(0, stats)
        distributed.print_rank_0(f"before training: {describe(stats)}")
    start, _ = checkpoints.resume(metrics, loaders=[train_loader])
    checkpoints.watch_signals()

    loop = TrainLoop(start, config.num_train_epochs, config.print_loss)
    for epoch in loop.epochs(train_loader):
        for batch in loop.batches(train_loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            output = engine(**reward_model_inputs(batch))
            loss = pair_loss(output, batch, config)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            loop.record(loss.item(), samples=batch["input_ids"].size(0) // 2)
            if not boundary:
                continue
            losses = loop.optimizer_step()
            metrics.log(loop.global_step, **{"train/loss": losses[-1], "train/lr": lr_scheduler.get_last_lr()[0]})
            if config.eval_interval and loop.global_step % config.eval_interval == 0:
                stats = evaluate(engine, eval_loader, device, config.eval_iters)
                metrics.log_eval(loop.global_step, stats)
                distributed.print_rank_0(f"step {loop.global_step}: {describe(stats)}")
            checkpoints.step_boundary(loop.position, losses, metrics)
        summary = loop.epoch_summary()
        stats = evaluate(engine, eval_loader, device, config.eval_iters)
        metrics.log_eval(loop.global_step, stats)
        distributed.print_rank_0(f"epoch {epoch + 1}/{config.num_train_epochs}: train loss {summary.mean_loss:.4f}, "
                                 f"{describe(stats)}, {summary.samples_per_s:.1f} pairs/s")

    # The statistics saved with the model cover the whole eval split; the last epoch's evaluation
    # already did when --eval_iters does not cut it short.
    covered_all = config.eval_iters == 0 or config.eval_iters >= len(eval_loader)
    final = stats if covered_all else evaluate(engine, eval_loader, device)
    distributed.print_rank_0(f"final (whole eval split): {describe(final)}"
                             + ("; reward_model.json records no reward statistics" if final is None else ""))
    save_reward_model(engine.module, tokenizer, config.output_dir, reward_stats=final or {}, metrics=metrics,
                      metrics_title="step 2: reward model",
                      extra_json={"training_args.json": flag_values(config), "data_stats.json": data.stats,
                               PROMPT_FORMAT_FILE: prompt_format.record()})
    finish_run(checkpoints, metrics, f"saved the reward model to {config.output_dir}")


if __name__ == "__main__":
    main()
