"""Real-data run: reward model held-out accuracy and a PPO reward curve on the shared preference files.

    python applications/convert_gguf.py --out ./models/smollm2-135m-instruct     # once (see that script)
    python benchmarks/real_data_run.py --model ./models/smollm2-135m-instruct --output-dir ./output_real

Per data set (`en`: hh_harmless_test.pref.jsonl; `zh`: the LLaMA-Factory and MedicalGPT Chinese DPO files):
1. A deterministic split written under <output-dir>/<set>/ (the data is never copied into the repository):
   held-out test pairs (a source's own `_test` file, else the pairs whose sha256(prompt) bucket is 0 of
   10), and the remaining pairs cut by the same hash into reward-model training pairs (buckets 1-6) and
   PPO prompts (buckets 7-9), so the three never share a prompt. Caps keep the CPU run short.
2. Step 2 (`training/step2_reward_model_finetuning/main.py`) trains a reward model on the backbone,
   evaluated on the whole held-out split before training, every --rm-eval-interval steps and after it.
3. Step 3 (`training/step3_rlhf_finetuning/main.py`) runs PPO with the backbone as actor (it is already
   instruction-tuned, so step 1 is skipped) and the new reward model as critic and reward.
4. Writes <docs-dir>/results.json, results.md and reward_<set>.png; prints the JSON.
"""
import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = {"en": ["hh_harmless_test.pref.jsonl"],
        "zh": ["llamafactory_dpo_zh_train.pref.jsonl", "llamafactory_dpo_zh_test.pref.jsonl",
               "medicalgpt_dpo_zh_train.pref.jsonl", "medicalgpt_dpo_zh_test.pref.jsonl"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A Hugging Face model directory (see convert_gguf.py).")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--output-dir", default="output_real")
    parser.add_argument("--docs-dir", default=str(REPO / "docs" / "real_data"))
    parser.add_argument("--sets", nargs="*", choices=sorted(SETS), default=sorted(SETS))
    parser.add_argument("--rm-pairs", type=int, default=2000, help="Reward-model training pairs (cap).")
    parser.add_argument("--rm-lr", type=float, default=2e-5, help="Reward-model learning rate.")
    parser.add_argument("--rm-epochs", type=int, default=1,
                        help="Reward-model epochs (one, as InstructGPT: reward models overfit after the first).")
    parser.add_argument("--rm-eval-interval", type=int, default=50,
                        help="Evaluate the reward model on the whole held-out split every this many steps.")
    parser.add_argument("--test-pairs", type=int, default=1000, help="Held-out pairs (cap).")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--truncate-replies", action="store_true",
                        help="Cut every reply to half of --max-seq-len (the prompt keeps the other half) instead "
                             "of dropping the pairs that do not fit (Chinese replies run to hundreds of tokens: "
                             "without it few pairs fit).")
    parser.add_argument("--ppo-steps", type=int, default=12)
    parser.add_argument("--ppo-batch", type=int, default=4, help="Prompts per PPO step.")
    parser.add_argument("--ppo-eval-prompts", type=int, default=32,
                        help="Held-out prompts PPO is evaluated on at the start and every quarter of the run.")
    parser.add_argument("--reuse-reward-model", action="store_true",
                        help="Skip step 2 when <output-dir>/<set>/reward holds the reward model of an earlier run "
                             "(to rerun PPO with other settings).")
    parser.add_argument("--answer-len", type=int, default=32)
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="Steps 2 and 3 format every conversation with the model's chat template "
                             "(--apply_chat_template) instead of the HH text.")
    parser.add_argument("--rm-lora-dim", type=int, default=0,
                        help="Train the reward model's LoRA factors (rank N) and value head only (0: full).")
    parser.add_argument("--rm-lora-lr", type=float, default=5e-4, help="Learning rate of the LoRA factors.")
    parser.add_argument("--dtype", default="fp32", choices=("auto", "fp32", "bf16", "fp16"),
                        help="Training precision of both steps (fp32: the first runs' setting).")
    parser.add_argument("--run-name", default=None,
                        help="The results key and table row of this run (default: the set name); runs under other "
                             "names keep their rows, so one table compares formats and settings.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="Steps 2 and 3 recompute activations in the backward pass: less memory, more time "
                             "(the zh run at max_seq_len 256 needed it on a 24 GB machine).")
    return parser.parse_args(argv)


def hash_bucket(prompt: str, buckets: int = 10) -> int:
    """The data README's rule: the first 8 hex digits of sha256(prompt), mod `buckets`."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % buckets


def split_pairs(files: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """{"test", "rm", "ppo"} rows from {file name: rows}, as the module docstring says. Deterministic; a
    prompt never lands in two parts."""
    # A source's own test split is a `_test` file next to its `_train` file (hh_harmless_test alone is not one).
    test_files = [name for name in files if "_test." in name and name.replace("_test.", "_train.") in files]
    parts = {"test": [row for name in test_files for row in files[name]], "rm": [], "ppo": []}
    test_prompts = {row["prompt"] for row in parts["test"]}
    for name, rows in files.items():
        if name in test_files:
            continue
        has_own_test = "_train." in name and name.replace("_train.", "_test.") in files
        for row in rows:
            if row["prompt"] in test_prompts:  # a held-out prompt is never trained on
                continue
            bucket = hash_bucket(row["prompt"])
            if bucket == 0 and not has_own_test:
                parts["test"].append(row)
            else:
                parts["rm" if bucket <= 6 else "ppo"].append(row)
    return parts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def prepare(args, name: str, out: Path) -> dict[str, int]:
    """Write <out>/rm/{train,test}.jsonl and <out>/ppo/{train,test}.jsonl; the source and PPO row counts
    (the reward model's own pair counts are read from its directory after step 2).

    Step 2 drops a pair whose reply alone does not fit --max-seq-len, so pairs are filtered by that first
    and the caps count pairs step 2 keeps (Chinese replies run to hundreds of SmolLM2 tokens: the kept
    pairs are the shorter ones), or with --truncate-replies every reply is cut to fit and no pair is lost."""
    from training.utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    files = {}
    for file_name in SETS[name]:
        with open(Path(args.data_dir) / file_name, encoding="utf-8") as f:
            files[file_name] = [json.loads(line) for line in f if line.strip()]
    parts = split_pairs(files)
    reply_limit = args.max_seq_len - 8  # room for the reply's EOS, a BOS and the end of the prompt

    def fits(row: dict) -> bool:
        return max(len(tokenizer(row[key]).input_ids) for key in ("chosen", "rejected")) <= reply_limit

    if args.truncate_replies:
        parts = {part: [truncate_replies(tokenizer, row, reply_limit // 2) for row in rows]
                 for part, rows in parts.items()}
    test = [row for row in parts["test"] if fits(row)][:args.test_pairs]
    rm_pairs = [row for row in parts["rm"][:8 * args.rm_pairs] if fits(row)][:args.rm_pairs]
    ppo_prompts = parts["ppo"][:args.ppo_steps * args.ppo_batch]
    write_jsonl(out / "rm" / "train.jsonl", rm_pairs)
    write_jsonl(out / "rm" / "test.jsonl", test)
    write_jsonl(out / "ppo" / "train.jsonl", ppo_prompts)
    write_jsonl(out / "ppo" / "test.jsonl", test[:args.ppo_eval_prompts])  # step 3's held-out evaluation
    return {"source_pairs": sum(map(len, files.values())), "fitting_test_pairs": sum(map(fits, parts["test"])),
            "all_test_pairs": len(parts["test"]), "ppo_prompts": len(ppo_prompts)}


def truncate_replies(tokenizer, row: dict, limit: int) -> dict:
    """The pair with each reply cut to at most `limit` tokens (decoded back to text, which can re-tokenise a
    little longer at the cut, hence the loop)."""
    row = dict(row)
    for key in ("chosen", "rejected"):
        ids = tokenizer(row[key]).input_ids
        keep = limit
        while len(ids) > limit:
            # A cut inside a multi-byte character decodes to U+FFFD: drop it.
            row[key] = tokenizer.decode(ids[:keep], skip_special_tokens=True).rstrip("\ufffd")
            ids, keep = tokenizer(row[key]).input_ids, keep - 4
    return row


def run_step(folder: str, flags: list[str], log: Path) -> float:
    """One step through the deepspeed launcher on a free port, as the CPU scripts run it; wall seconds."""
    from training.utils.distributed import free_port

    port = free_port()
    command = ["deepspeed", "--num_gpus", "1", "--master_port", str(port), "main.py", *flags]
    print(f"running (cd training/{folder} && {' '.join(command)}) > {log}", file=sys.stderr, flush=True)
    # Two threads as the CPU scripts default to; OMP_NUM_THREADS=1 is much faster when other jobs share the cores.
    env = {"OMP_NUM_THREADS": "2", **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.run(command, cwd=REPO / "training" / folder, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    # DeepSpeed's CPU all-reduce leaves a 66 MB shared-memory buffer per run in /dev/shm (RAM): remove ours.
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        os.remove(path)
    if code != 0:
        sys.exit(f"{folder} failed (exit {code}); see {log}")
    return time.time() - start


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_set(args, name: str) -> dict:
    out = Path(args.output_dir).resolve() / (args.run_name or name)
    counts = prepare(args, name, out)
    common = ["--dtype", args.dtype, "--deepspeed", "--data_output_path", str(out / "cache")]
    common += ["--apply_chat_template"] if args.apply_chat_template else []
    lora = (["--lora_dim", str(args.rm_lora_dim), "--lora_module_name", "layers.", "--only_optimize_lora",
             "--lora_learning_rate", str(args.rm_lora_lr)] if args.rm_lora_dim else [])
    checkpointing = args.gradient_checkpointing
    rm_dir, ppo_dir = out / "reward", out / "ppo_model"
    rm_time_file = out / "reward_seconds.txt"  # step 2's wall time, kept for runs that reuse its model
    reuse = args.reuse_reward_model and (rm_dir / "reward_model.json").is_file()
    if reuse:
        rm_seconds = float(rm_time_file.read_text()) if rm_time_file.is_file() else None
    else:
        rm_seconds = run_step("step2_reward_model_finetuning", [
            "--model_name_or_path", args.model, "--data_path", str(out / "rm"), "--data_split", "0,1,0",
            "--max_seq_len", str(args.max_seq_len), "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--learning_rate", str(args.rm_lr), "--num_train_epochs",
            str(args.rm_epochs), "--num_warmup_steps", "10", "--eval_interval", str(args.rm_eval_interval),
            "--eval_iters", "0", "--dropout", "0.0",
            "--output_dir", str(rm_dir), *common, *lora] + (["--gradient_checkpointing"] if checkpointing else []),
            out / "step2.log")
        rm_time_file.write_text(f"{rm_seconds:.0f}\n")
    ppo_seconds = args.ppo_steps and run_step("step3_rlhf_finetuning", [
        "--actor_model_name_or_path", args.model, "--critic_model_name_or_path", str(rm_dir),
        "--data_path", str(out / "ppo"), "--data_split", "0,0,1",
        "--per_device_generation_batch_size", str(args.ppo_batch), "--per_device_training_batch_size",
        str(args.ppo_batch), "--max_prompt_seq_len", str(args.max_seq_len - args.answer_len),
        "--max_answer_seq_len", str(args.answer_len), "--actor_learning_rate", "1e-5",
        "--critic_learning_rate", "1e-5", "--num_warmup_steps", "2", "--actor_dropout", "0.0",
        "--critic_dropout", "0.0", "--eval_prompts", str(args.ppo_eval_prompts),
        "--eval_interval", str(max(args.ppo_steps // 4, 1)),
        "--enable_test_mode",
        "--test_stop_step", str(args.ppo_steps), "--output_dir", str(ppo_dir), *common]
        + (["--actor_gradient_checkpointing", "--critic_gradient_checkpointing"] if checkpointing else []),
        out / "step3.log")
    rm_metrics = read_metrics(rm_dir / "training_metrics.jsonl")
    rm_eval = [row["eval/accuracy"] for row in rm_metrics if "eval/accuracy" in row]
    ppo = read_metrics(ppo_dir / "actor" / "training_metrics.jsonl") if args.ppo_steps else []
    # The reward model's settings come from its own directory: a reused model was trained by an earlier run,
    # whose flags may differ from this one's.
    rm_args = json.loads((rm_dir / "training_args.json").read_text())
    rm_data = json.loads((rm_dir / "data_stats.json").read_text())
    rm_format = json.loads((rm_dir / "prompt_format.json").read_text())["prompt_format"] if (
        rm_dir / "prompt_format.json").is_file() else "hh"
    log = (out / "step2.log").read_text(encoding="utf-8", errors="replace") if (out / "step2.log").is_file() else ""
    precision = next((line.split()[1] for line in log.splitlines() if line.startswith("precision: ")), None)
    return {**counts, "rm_train_pairs": rm_data["train"]["rows"], "test_pairs": rm_data["eval"]["rows"],
            "rm_lr": rm_args["learning_rate"], "rm_epochs": rm_args["num_train_epochs"], "rm_format": rm_format,
            "rm_precision": precision,
            "rm_dtype": rm_args.get("dtype", "fp32"), "rm_lora_dim": rm_args.get("lora_dim", 0),
            "rm_accuracy_before": rm_eval[0],
            "rm_accuracy": json.loads((rm_dir / "reward_model.json").read_text())["reward_stats"]["accuracy"],
            "rm_seconds": rm_seconds and round(rm_seconds), "rm_reused": reuse, "ppo_seconds": round(ppo_seconds or 0),
            "rm_metrics": rm_metrics, "ppo_metrics": ppo}


def plot(name: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 2.8))
    for key, color in (("train/loss", "tab:gray"), ("eval/accuracy", "tab:red")):
        points = [(row["step"], row[key]) for row in result["rm_metrics"] if key in row]
        axes[0].plot([p[0] for p in points], [p[1] for p in points], color=color, label=key,
                     marker="." if key.startswith("eval") else None, linewidth=0.8)
    axes[0].axhline(0.5, color="black", linewidth=0.5, linestyle=":")
    axes[0].set_title(f"{name}: reward model (held-out accuracy)", fontsize=9)
    axes[0].set_xlabel("optimizer step", fontsize=8)
    for ax in axes[:1]:
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax, (title, keys) in zip(axes[1:], [("reward-model score", ["reward/mean", "eval/reward_mean"]),
                                        ("KL to reference", ["kl/to_reference"]),
                                        ("answer length (tokens)", ["answer/length", "eval/answer_length"])]):
        for key in keys:
            points = [(row["step"], row[key]) for row in result["ppo_metrics"] if key in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key)
        ax.set_title(f"{name}: PPO {title}", fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(results: dict) -> str:
    """One table row per set, each with the settings it ran with."""
    lines = ["| run | format | RM training | max_seq_len | source pairs | RM train pairs x epochs (lr) | "
             "held-out pairs (of all that fit) | RM held-out accuracy before -> after | "
             "PPO steps x prompts, answer tokens | held-out reward start -> end | KL at the end | RM time | PPO time |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        run = r["args"]
        evals = [row["eval/reward_mean"] for row in r["ppo_metrics"] if "eval/reward_mean" in row]
        kl = [row["kl/to_reference"] for row in r["ppo_metrics"] if "kl/to_reference" in row]
        rm_time = f"{r['rm_seconds']} s" if r["rm_seconds"] else "?"
        if r.get("rm_reused"):
            rm_time += " (earlier run)"
        dtype = r.get("rm_dtype", "fp32")
        training = (f"{dtype} ({r['rm_precision']})" if r.get("rm_precision") and dtype == "auto" else dtype) + (
            f", LoRA {r['rm_lora_dim']}" if r.get("rm_lora_dim") else ", full")
        ppo = (f"{run['ppo_steps']} x {run['ppo_batch']}, {run['answer_len']} | {evals[0]:+.3f} -> {evals[-1]:+.3f} | "
               f"{kl[-1]:.3f}" if evals else "- | - | -")
        lines.append(f"| {name} | {r.get('rm_format', 'hh')} | {training} | {run['max_seq_len']} | "
                     f"{r['source_pairs']} | {r['rm_train_pairs']} x {r['rm_epochs']} ({r['rm_lr']:g}) | "
                     f"{r['test_pairs']} ({r['fitting_test_pairs']} of {r['all_test_pairs']}) | "
                     f"{r['rm_accuracy_before']:.3f} -> {r['rm_accuracy']:.3f} | {ppo} | {rm_time} | "
                     f"{str(r['ppo_seconds']) + ' s' if r['ppo_seconds'] else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_name and len(args.sets) != 1:
        sys.exit("error: --run-name names one run: give one set with --sets")
    if not Path(args.data_dir).is_dir():
        sys.exit(f"error: --data-dir {args.data_dir} does not exist (the shared data folder, see its README)")
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    results_file = docs / "results.json"
    for name in args.sets:
        result = {"args": vars(args), **run_set(args, name)}
        plot(name, result, docs / f"reward_{args.run_name or name}.png")
        # Read just before writing: runs of other sets (one at a time or side by side) keep their results.
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        results[args.run_name or name] = result
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        (docs / "results.md").write_text(markdown(results))
    print(json.dumps({name: {k: v for k, v in r.items() if not k.endswith("_metrics")} for name, r in results.items()},
                     indent=1))


if __name__ == "__main__":
    main()
