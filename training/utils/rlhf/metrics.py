"""What step 3 reports: per-step rollout and training statistics, and the held-out evaluation.

Every number is over all ranks (sums are all-reduced), so rank 0 prints and logs the global value.
"""
import math

import torch

from training.utils import distributed
from training.utils.data.synthetic import check_answer
from training.utils.rlhf.rewards import BUILTIN_REWARDS

CHECKER_REWARDS = BUILTIN_REWARDS  # rule rewards that are 1.0 exactly for a right answer (eval/accuracy)

# Per step, in the order the log line prints them.
STEP_LINE = (("reward", "reward/mean", "{:+.3f}"), ("+-", "reward/std", "{:.3f}"), ("kl", "kl/to_reference", "{:.3f}"),
             ("kl_coef", "kl/coef", "{:.3g}"), ("len", "answer/length", "{:.1f}"), ("eos", "answer/eos_rate", "{:.2f}"),
             ("group_std", "reward/group_std", "{:.3f}"), ("dropped", "groups/dropped_share", "{:.2f}"),
             ("pg", "loss/actor", "{:+.4f}"), ("vf", "loss/critic", "{:.4f}"), ("kl_loss", "loss/kl", "{:.4f}"),
             ("clip", "ppo/clip_fraction", "{:.3f}"),
             ("approx_kl", "ppo/approx_kl", "{:.4f}"), ("entropy", "ppo/entropy", "{:.3f}"),
             ("ptx", "loss/unsupervised", "{:.3f}"), ("gen", "time/generation_s", "{:.1f}s"),
             ("exp", "time/experience_s", "{:.1f}s"), ("train", "time/training_s", "{:.1f}s"),
             ("", "throughput/samples_per_s", "{:.1f} samples/s"))


def step_metrics(rollouts: list, train_stats: list[dict[str, float]], device, *, training_s: float,
                 elapsed_s: float) -> dict[str, float]:
    """Everything a step logs (but the KL coefficient): the rollouts' statistics, the mini-batch statistics
    averaged, and where the time went. Samples/s counts the answers of all ranks over the whole step."""
    values = summarize_rollouts(rollouts, device)
    trained = average_training_stats(train_stats, device)
    values.update({"loss/actor": trained["actor_loss"],
                   "ppo/clip_fraction": trained["clip_fraction"], "ppo/approx_kl": trained["approx_kl"],
                   "ppo/entropy": trained["entropy"], "ppo/skipped_steps": trained["skipped_step"],
                   "time/generation_s": sum(r.generation_s for r in rollouts),
                   "time/experience_s": sum(r.scoring_s for r in rollouts), "time/training_s": training_s,
                   "throughput/samples_per_s": values.pop("answers") / elapsed_s})
    for stat, key in (("critic_loss", "loss/critic"), ("kl_loss", "loss/kl"), ("unsup_loss", "loss/unsupervised")):
        if stat in trained:  # no critic in a critic-free run; a KL loss only with --use_kl_loss
            values[key] = trained[stat]
    return values


def summarize_rollouts(rollouts: list, device) -> dict[str, float]:
    """Mean/std of the raw reward-model score, mean KL to the reference per answer, mean answer length,
    the share of answers that ended with EOS, and the number of answers, over all ranks."""
    scores = torch.cat([r.scores for r in rollouts]).double()
    n, score_sum, square_sum, kl_sum, length_sum, eos_sum = distributed.all_reduce_sum([
        scores.numel(), scores.sum().item(), scores.pow(2).sum().item(),
        sum(r.kl.sum().item() for r in rollouts), sum(r.lengths.sum().item() for r in rollouts),
        sum(r.ended.sum().item() for r in rollouts)], device)
    mean = score_sum / n
    values = {"reward/mean": mean, "reward/std": math.sqrt(max(square_sum / n - mean * mean, 0.0)),
              "kl/to_reference": kl_sum / n, "answer/length": length_sum / n, "answer/eos_rate": eos_sum / n,
              "answers": n}
    if rollouts[0].group_std is not None:  # several answers per prompt: the spread within a prompt's group
        groups, std_sum, dropped = distributed.all_reduce_sum([
            sum(len(r.group_std) for r in rollouts), sum(r.group_std.sum().item() for r in rollouts),
            sum(r.dropped.sum().item() for r in rollouts if r.dropped is not None)], device)
        values["reward/group_std"] = std_sum / groups
        if rollouts[0].dropped is not None:
            values["groups/dropped_share"] = dropped / groups
    return values


def average_training_stats(stats: list[dict[str, float]], device) -> dict[str, float]:
    """Mean of each mini-batch statistic over the mini-batches and the ranks."""
    names = sorted(stats[0])
    totals = distributed.all_reduce_sum([sum(s[name] for s in stats) / len(stats) for name in names], device)
    return {name: total / distributed.world_size() for name, total in zip(names, totals)}


def describe_step(step: int, values: dict[str, float]) -> str:
    """The one line printed per step."""
    parts = [f"step {step}"]
    for label, key, fmt in STEP_LINE:
        if key in values:
            parts.append(f"{label} {fmt.format(values[key])}".strip())
    return " | ".join(parts)


@torch.no_grad()
def evaluate_policy(trainer, loader, seed: int) -> dict[str, float]:
    """Answers to the held-out prompts, sampled as in the rollouts (the policy PPO trains): mean and std
    of the reward (the reward model's score, or the rule reward without one, or their weighted sum), answer
    length, EOS rate and the accuracy: by the built-in --reward_function checker (synthetic, math) when one is
    used, else when every prompt belongs to a built-in synthetic task, by the task's checker. Every evaluation
    samples from the same seed, so two evaluations differ by the policy, not by the dice; the training random
    stream is left untouched."""
    device = trainer.device
    totals = [0.0] * 7  # answers, score sum, squared score sum, length sum, EOS count, checked, correct
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + distributed.rank())
        for batch in loader:
            _evaluate_batch(trainer, batch, totals)
    n, score_sum, square_sum, length_sum, eos_sum, checked, correct = distributed.all_reduce_sum(totals, device)
    n = max(n, 1)
    mean = score_sum / n
    result = {"eval/reward_mean": mean, "eval/reward_std": math.sqrt(max(square_sum / n - mean * mean, 0.0)),
              "eval/answer_length": length_sum / n, "eval/eos_rate": eos_sum / n}
    if checked == n:
        result["eval/accuracy"] = correct / n
    return result


def _evaluate_batch(trainer, batch, totals: list[float]) -> None:
    tokenizer, device = trainer.tokenizer, trainer.device
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    answer_ids = trainer.generate(prompt_ids, prompt_mask)
    answer_ids, lengths, ended, action_mask = trainer.close_answers(answer_ids)
    result = trainer.score_answers(prompt_ids, prompt_mask, answer_ids, lengths, action_mask, batch.get("references"))
    scores = result.raw.double()
    if result.rule is not None and trainer.scorer.spec in CHECKER_REWARDS:
        # A built-in checker's reward is 1 exactly for a right answer; one cut off before its EOS is wrong.
        checked, correct = len(result.rule), int(((result.rule == 1.0) & ended.cpu()).sum())
    else:
        checked, correct = _check_answers(tokenizer, prompt_ids, prompt_mask, answer_ids, lengths, ended)
    batch_totals = (scores.numel(), scores.sum().item(), scores.pow(2).sum().item(), lengths.sum().item(),
                    ended.sum().item(), checked, correct)
    for i, value in enumerate(batch_totals):
        totals[i] += value


def _check_answers(tokenizer, prompt_ids, prompt_mask, answer_ids, lengths, ended) -> tuple[int, int]:
    """(answers the synthetic checker could judge, answers it found correct). An answer cut off before
    its EOS is wrong; a prompt that is not from a synthetic task is not judged."""
    checked = correct = 0
    for b in range(answer_ids.size(0)):
        prompt = tokenizer.decode(prompt_ids[b][prompt_mask[b] == 1], skip_special_tokens=True)
        answer = tokenizer.decode(answer_ids[b, :lengths[b]], skip_special_tokens=True)
        try:
            right = check_answer(prompt, answer)
        except ValueError:
            continue
        checked += 1
        correct += int(right and bool(ended[b]))
    return checked, correct


def describe_evaluation(values: dict[str, float]) -> str:
    accuracy = f", accuracy {values['eval/accuracy']:.3f}" if "eval/accuracy" in values else ""
    return (f"reward {values['eval/reward_mean']:+.3f} +- {values['eval/reward_std']:.3f}{accuracy}, "
            f"answer length {values['eval/answer_length']:.1f}, EOS rate {values['eval/eos_rate']:.2f}")


def show_answer(tokenizer, experience, step: int) -> None:
    """--print_answers: the first prompt of the batch and its answer (special tokens shown), rank 0."""
    prompt = experience.prompt_ids[0][experience.prompt_mask[0] == 1]
    answer = experience.answer_ids[0][experience.action_mask[0] == 1]
    distributed.print_rank_0(f"--- step {step} prompt: {tokenizer.decode(prompt)!r}\n"
                             f"--- answer: {tokenizer.decode(answer)!r}")
