"""Every step's benchmark in one command: writes bench.json and bench.md, prints the JSON.

    python benchmarks/run_all.py --output-dir bench_results             # CPU: tiny/opt and tiny/opt-20m
    python benchmarks/run_all.py --quick                                # fewer timed steps (a smoke run)
    # on a GPU: step 3 with an OPT-1.3B-shaped actor and OPT-350M-shaped critic (random weights), with and
    # without the Hybrid Engine
    python benchmarks/run_all.py --only ppo --ppo_models random/opt-1.3b --critic_model random/opt-350m \
        --answer_lens 256 --batch_sizes 4 --dtype fp16 --hybrid_engine

In order: the fp32 matmul peak of this machine (flops.py), the SFT, reward-model and DPO rows
(bench_train.py), the PPO rows (bench_ppo.py: answer lengths x batch sizes), the peak again; then each row
gets its MFU against the better of the two peaks. Each row runs in its own process. The machine's load
average before and after is recorded: other jobs on the machine slow the rows, not the formula.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from benchmarks import bench_ppo, bench_train, flops, report

STEPS = ("sft", "rm", "dpo", "ppo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="bench_results", help="Where bench.json and bench.md go.")
    parser.add_argument("--only", nargs="*", choices=STEPS, default=list(STEPS), help="Benchmarks to run.")
    parser.add_argument("--models", nargs="*", default=["tiny/opt", "tiny/opt-20m"], help="Steps 1-2 and DPO.")
    parser.add_argument("--ppo_models", nargs="*", default=["tiny/opt", "tiny/opt-20m"],
                        help="Step-3 actors (tiny/*, random/opt-1.3b, random/opt-350m or directories).")
    parser.add_argument("--critic_model", default=None, help="Step-3 critic shape (default: the actor's).")
    parser.add_argument("--answer_lens", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--batch_sizes", nargs="*", type=int, default=[8, 16], help="Step-3 batch sizes.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="Step 3.")
    parser.add_argument("--hybrid_engine", action="store_true", help="Step 3 with --enable_hybrid_engine.")
    parser.add_argument("--quick", action="store_true", help="10 timed training steps and 2 PPO steps per row.")
    return parser.parse_args(argv)


def machine_facts() -> dict:
    import deepspeed
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name(0)}"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()[0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    train_steps = ["--steps", "10"] if args.quick else []
    machine = machine_facts()
    peak = {"size": 2048, "repeats": 5, "before": flops.matmul_peak_gflops(2048, 5)}
    print(f"fp32 matmul peak: {peak['before']} GFLOP/s", file=sys.stderr)
    documents = []
    for step in ("sft", "rm", "dpo"):
        if step in args.only:
            documents.append(bench_train.collect(["--step", step, "--models", *args.models, *train_steps]))
    if "ppo" in args.only:
        ppo_argv = ["--models", *args.ppo_models, "--answer_lens", *map(str, args.answer_lens),
                    "--batch_sizes", *map(str, args.batch_sizes), "--dtype", args.dtype]
        ppo_argv += ["--critic_model", args.critic_model] if args.critic_model else []
        ppo_argv += ["--hybrid_engine"] if args.hybrid_engine else []
        ppo_argv += ["--steps", "2"] if args.quick else []
        documents.append(bench_ppo.collect(ppo_argv))
    peak["after"] = flops.matmul_peak_gflops(2048, 5)
    peak["used"] = max(peak["before"], peak["after"])
    machine["load_after"] = os.getloadavg()[0]
    for document in documents:
        flops.add_mfu(document, peak["used"])
    result = {"date": datetime.date.today().isoformat(), "machine": machine, "matmul_peak_gflops": peak,
              "mfu_formula": "achieved model FLOP/s / fp32 matmul peak FLOP/s of this machine; model FLOPs = "
                             "6 N per real token for a trained model (forward + backward), 2 N per real token "
                             "for a forward pass (generation, experience scoring, frozen references), N = the "
                             "parameters that multiply activations (embedding lookups excluded, a language "
                             "model's output projection included); attention score products not counted "
                             "(benchmarks/flops.py)",
              "benchmarks": documents}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(report.markdown(result))
    print(json.dumps(result, indent=1))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
