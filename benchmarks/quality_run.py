"""Reference quality run on the built-in synthetic task: SFT -> RM -> PPO, SFT -> DPO and SFT -> critic-free step 3
(GRPO, RLOO, REINFORCE++ with the checker's rule reward), on CPU, one command.

    python benchmarks/quality_run.py --output-dir ./output_quality         # ~10-20 min on 2 CPU cores

1. `applications/e2e_rlhf.py` (the tiny default, synthetic/copy, the CPU scripts' fixed seeds) runs steps
   1-3, then `--algo dpo --step 2` trains DPO from the same step-1 actor, and `--algo <estimator> --step 3` a
   critic-free step 3 from it per estimator of CRITIC_FREE (no reward model: the synthetic checker rewards).
2. Each actor (step 1, PPO, DPO) answers the same held-out prompts of the task's eval split (never seen in
   training), greedy and sampled at temperature 1 from seed 0. Per actor: the checker's accuracy (an
   answer is right only when exact and ended by EOS), the step-2 reward model's mean score, the KL to the
   step-1 actor (per answer, sum over its tokens of log p_actor - log p_sft on the sampled answers: the
   estimator step 3 logs against its reference), answer length in tokens (EOS included) and EOS rate.
3. Writes <docs-dir>/results.json, results.md (the tables) and loss.png, reward.png, kl.png, length.png
   (the training curves from each step's training_metrics.jsonl); prints the JSON.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = "synthetic/copy"  # e2e's CPU default
CRITIC_FREE = {"GRPO (step 3)": "grpo", "RLOO (step 3)": "rloo", "REINFORCE++ (step 3)": "reinforce_plus_plus"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output_quality", help="Where the pipelines put their models.")
    parser.add_argument("--docs-dir", default=str(REPO / "docs" / "quality"), help="Where tables and PNGs go.")
    parser.add_argument("--prompts", type=int, default=200, help="Held-out prompts per actor.")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="Step 3's --max_answer_seq_len on CPU.")
    parser.add_argument("--skip-training", action="store_true",
                        help="Only evaluate and plot the models already in --output-dir.")
    return parser.parse_args(argv)


def run_pipeline(out: Path, extra: list[str], log_name: str) -> tuple[dict[str, float], float]:
    """Run e2e_rlhf.py into `out` (its log beside it); the wall seconds of each step it reports, and the peak RSS
    (MiB) of the largest process of the run (wait4 reports the maximum over the child and its descendants: the
    deepspeed launcher and the training process of every step the run started)."""
    command = [sys.executable, str(REPO / "applications" / "e2e_rlhf.py"), "--output-dir", str(out),
               "--check-prompts", "0", *extra]
    log = out / log_name
    out.mkdir(parents=True, exist_ok=True)
    print(f"running: {' '.join(command)} (log {log})", file=sys.stderr, flush=True)
    with open(log, "w", encoding="utf-8") as f:
        process = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed (exit {code}); see {log}")
    steps = {key: float(seconds) for key, seconds in re.findall(r"^=== (\w+) done in (\d+) s", log.read_text(), re.M)}
    return steps, usage.ru_maxrss / 1024  # Linux reports KiB


def read_metrics(directory: Path) -> list[dict]:
    path = directory / "training_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar over the rows that logged it."""
    points = [(row["step"], row[key]) for row in metrics if key in row]
    return [p[0] for p in points], [p[1] for p in points]


def evaluate_actor(actor_dir: Path, sft, reward_model, prompts: list[str], max_new_tokens: int) -> dict:
    """Checker accuracy greedy and sampled, and on the sampled answers: mean reward, KL to the step-1
    actor, length and EOS rate (see the module docstring)."""
    import torch

    from training.utils.data.collators import PromptCollator
    from training.utils.data.conversation import encode_chunks, prompt_chunks
    from training.utils.data.synthetic import check_answer
    from training.utils.losses import gather_log_probs
    from training.utils.masks import answer_lengths, mask_from_lengths
    from training.utils.model.load import load_causal_lm
    from training.utils.sampling import SamplingConfig

    actor, tokenizer = load_causal_lm(str(actor_dir), torch.device("cpu"))
    collator = PromptCollator(tokenizer.pad_token_id)
    totals = {"greedy_correct": 0, "sampled_correct": 0, "reward": 0.0, "kl": 0.0, "length": 0, "eos": 0}
    for greedy in (True, False):
        torch.manual_seed(0)  # the same sampling noise for every actor
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=not greedy)
        for start in range(0, len(prompts), 50):
            texts = prompts[start:start + 50]
            batch = collator([{"prompt_ids": encode_chunks(tokenizer, prompt_chunks(p))[0]} for p in texts])
            with torch.no_grad():
                output = actor.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **sampling.generate_kwargs())
            width = batch["input_ids"].size(1)
            answers = output[:, width:]
            lengths, ended = answer_lengths(answers, tokenizer.eos_token_id)
            correct = sum(bool(ended[b]) and check_answer(texts[b], tokenizer.decode(answers[b, :lengths[b]],
                                                                                     skip_special_tokens=True))
                          for b in range(len(texts)))
            totals["greedy_correct" if greedy else "sampled_correct"] += correct
            if greedy:
                continue
            action_mask = mask_from_lengths(lengths, answers.size(1))
            answers = answers.masked_fill(action_mask == 0, tokenizer.pad_token_id)
            sequences = torch.cat([batch["input_ids"], answers], dim=1)
            mask = torch.cat([batch["attention_mask"], action_mask], dim=1)
            with torch.no_grad():
                log_ratio = [gather_log_probs(_logits(model, sequences, mask)[:, width - 1:-1], answers)
                             for model in (actor, sft)]
                totals["reward"] += reward_model(input_ids=sequences, attention_mask=mask).end_scores.sum().item()
            totals["kl"] += ((log_ratio[0] - log_ratio[1]) * action_mask).sum().item()
            totals["length"] += int(lengths.sum())
            totals["eos"] += int(ended.sum())
    n = len(prompts)
    return {"checker_accuracy_greedy": totals["greedy_correct"] / n,
            "checker_accuracy_sampled": totals["sampled_correct"] / n, "reward_mean": totals["reward"] / n,
            "kl_to_sft": totals["kl"] / n, "answer_length": totals["length"] / n, "eos_rate": totals["eos"] / n}


def _logits(model, sequences, mask):
    """Logits of left-padded sequences, with positions counted from the mask as generation counts them."""
    import inspect

    from training.utils.masks import positions_from_mask

    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    extra = {"position_ids": positions_from_mask(mask)} if takes_positions else {}
    return model(input_ids=sequences, attention_mask=mask, use_cache=False, **extra).logits


def markdown(results: dict) -> str:
    """The actors' table and the training figures as Markdown."""
    lines = [f"Held-out prompts: {results['prompts']} of the `{results['data']}` eval split, answers up to "
             f"{results['max_new_tokens']} tokens; sampled = temperature 1 from seed 0.", "",
             "| actor | checker accuracy (greedy) | checker accuracy (sampled) | mean reward (sampled) | "
             "KL to SFT (sampled) | answer length (tokens) | EOS rate |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in results["actors"].items():
        lines.append(f"| {name} | {row['checker_accuracy_greedy']:.3f} | {row['checker_accuracy_sampled']:.3f} | "
                     f"{row['reward_mean']:+.3f} | {row['kl_to_sft']:.3f} | {row['answer_length']:.2f} | "
                     f"{row['eos_rate']:.3f} |")
    training = results["training"]
    lines += ["", "| training figure | value |", "| --- | ---: |",
              f"| reward model: held-out pairwise accuracy | {training['rm_accuracy']:.3f} |",
              f"| DPO: held-out implicit-reward accuracy, start -> end | {training['dpo_accuracy'][0]:.3f} -> "
              f"{training['dpo_accuracy'][1]:.3f} |",
              f"| PPO: held-out mean reward (step 3's own evaluation), start -> end | "
              f"{training['ppo_eval_reward'][0]:+.3f} -> {training['ppo_eval_reward'][1]:+.3f} |",
              f"| PPO: KL to reference at the last step | {training['ppo_final_kl']:.3f} |"]
    for name, accuracy in training.get("critic_free_accuracy", {}).items():
        lines.append(f"| {name}: held-out sampled checker accuracy (step 3's own evaluation), start -> end | "
                     f"{accuracy[0]:.3f} -> {accuracy[1]:.3f} |")
    lines += [f"| wall time {step} | {seconds:.0f} s |" for step, seconds in results["wall_s"].items()]
    lines += [f"| peak RSS, e2e run of {name} | {mib:.0f} MiB |"
              for name, mib in results.get("peak_rss_mib", {}).items()]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], docs: Path) -> None:
    """loss.png, reward.png, kl.png, length.png: small figures for the docs page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (title, step, keys, y scale): the supervised losses fall over orders of magnitude, hence log scales.
    panels = {
        "loss": [("SFT", "step1", ["train/loss", "eval/loss"], "log"), ("reward model", "step2", ["train/loss"], "log"),
                 ("DPO", "dpo", ["train/loss", "eval/loss"], "log"),
                 ("PPO", "step3", ["loss/actor", "loss/critic"], "linear")],
        "reward": [("PPO reward-model score", "step3", ["reward/mean", "eval/reward_mean"], "linear"),
                   ("DPO implicit reward", "dpo", ["eval/chosen_reward", "eval/rejected_reward"], "linear")],
        "kl": [("PPO KL to reference", "step3", ["kl/to_reference"], "linear")],
        "length": [("PPO answer length (tokens)", "step3", ["answer/length", "eval/answer_length"], "linear")],
    }
    for name, figure_panels in panels.items():
        fig, axes = plt.subplots(1, len(figure_panels), figsize=(3.6 * len(figure_panels), 2.8), squeeze=False)
        for ax, (title, step, keys, scale) in zip(axes[0], figure_panels):
            for key in keys:
                x, y = series(curves[step], key)
                ax.plot(x, y, marker="." if len(x) < 30 else None, label=key)
            ax.set_yscale(scale)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(docs / f"{name}.png", dpi=80)
        plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, docs = Path(args.output_dir).resolve(), Path(args.docs_dir)
    wall, peak_rss = {}, {}
    if not args.skip_training:
        start = time.time()
        # One e2e run per RL step, so each one's peak RSS is its own (steps 1-2 run first, apart).
        runs = [("steps 1-2", ["--step", "1", "2"], "e2e_sft_rm.log"), ("PPO", ["--step", "3"], "e2e_ppo.log"),
                ("DPO", ["--algo", "dpo", "--step", "2"], "e2e_dpo.log")]
        runs += [(algo, ["--algo", algo, "--step", "3"], f"e2e_{algo}.log") for algo in CRITIC_FREE.values()]
        for name, extra, log_name in runs:
            seconds, peak_rss[name] = run_pipeline(out, extra, log_name)
            wall.update({f"{step} ({name})": s for step, s in seconds.items()})
        wall["all (every pipeline)"] = time.time() - start

    import torch

    from training.utils.data.synthetic import generate_rows, parse_synthetic_name
    from training.utils.model.load import load_causal_lm
    from training.utils.model.reward_model import load_reward_model

    sft_dir, rm_dir = out / "actor-models" / "opt", out / "reward-models" / "opt"
    actors = {"SFT (step 1)": sft_dir, "PPO (step 3)": out / "step3-models" / "opt" / "actor",
              "DPO": out / "dpo-models" / "opt"}
    actors.update({name: out / "step3-models" / f"opt-{algo}" / "actor" for name, algo in CRITIC_FREE.items()})
    prompts = [row["prompt"] for row in generate_rows(parse_synthetic_name(DATA), "eval")[:args.prompts]]
    sft, _ = load_causal_lm(str(sft_dir), torch.device("cpu"))
    reward_model, _, reward_meta = load_reward_model(str(rm_dir))
    reward_model.eval()
    if args.skip_training and (docs / "results.json").exists():  # the figures of the run that trained them
        previous = json.loads((docs / "results.json").read_text())
        wall, peak_rss = previous["wall_s"], previous.get("peak_rss_mib", {})
    results = {"data": DATA, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "wall_s": wall,
               "peak_rss_mib": peak_rss,
               "actors": {name: evaluate_actor(path, sft, reward_model, prompts, args.max_new_tokens)
                          for name, path in actors.items()}}
    curves = {"step1": read_metrics(sft_dir), "step2": read_metrics(rm_dir), "dpo": read_metrics(actors["DPO"]),
              "step3": read_metrics(actors["PPO (step 3)"])}
    dpo_accuracy = series(curves["dpo"], "eval/reward_accuracy")[1]
    ppo_reward = series(curves["step3"], "eval/reward_mean")[1]
    results["training"] = {"rm_accuracy": reward_meta["reward_stats"]["accuracy"],
                           "dpo_accuracy": [dpo_accuracy[0], dpo_accuracy[-1]],
                           "ppo_eval_reward": [ppo_reward[0], ppo_reward[-1]],
                           "ppo_final_kl": series(curves["step3"], "kl/to_reference")[1][-1]}
    accuracy = {name: series(read_metrics(actors[name]), "eval/accuracy")[1] for name in CRITIC_FREE}
    results["training"]["critic_free_accuracy"] = {name: [a[0], a[-1]] for name, a in accuracy.items()}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (docs / "results.md").write_text(markdown(results))
    plot(curves, docs)
    print(json.dumps(results, indent=1))
    print(f"wrote {docs}/results.json, results.md, loss.png, reward.png, kl.png, length.png", file=sys.stderr)


if __name__ == "__main__":
    main()
