"""Every step's benchmark in one command: writes bench.json and bench.md, prints the JSON.

    python benchmarks/run_all.py --output-dir bench_results             # CPU: tiny/opt and tiny/opt-20m
    python benchmarks/run_all.py --quick                                # fewer timed steps (a smoke run)
    # on a GPU: step 3 with an OPT-1.3B-shaped actor and OPT-350M-shaped critic (random weights), with and
    # without the Hybrid Engine
    python benchmarks/run_all.py --only ppo --ppo_models random/opt-1.3b --critic_model random/opt-350m \
        --answer_lens 256 --batch_sizes 4 --dtype fp16 --hybrid_engine

    # real data (bench_real.py): the first 400 rows of ../shared/data/hh_harmless_test.pref.jsonl, each step's
    # old default (fp32, random batches) beside the new ones (--dtype auto, length-grouped, SFT --packing)
    python benchmarks/run_all.py --real-data --output-dir bench_results     # bench_real.json, bench_real.md
    python benchmarks/run_all.py --real-data --only sft rm

In order: the fp32 matmul peak of this machine (flops.py), the SFT, reward-model and DPO rows
(bench_train.py), the PPO rows (bench_ppo.py: answer lengths x batch sizes), the peak again; then each row
gets its MFU against the better of the two peaks. Each row runs in its own process. The machine's load
average before and after is recorded: other jobs on the machine slow the rows, not the formula.
With --real-data the matmul peak is measured in every dtype the rows use (fp32, and what --dtype auto resolves
to), with --threads threads, before and after the rows, and each row's MFU uses the peak of its own dtype; the
rows run with --threads threads too. Without the data file the real-data rows are skipped with a message.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from benchmarks import bench_ppo, bench_real, bench_train, flops, report

STEPS = ("sft", "rm", "dpo", "ppo")
MFU_FORMULA = ("achieved model FLOP/s / {peak} of this machine; model FLOPs = 6 N per real token for a trained "
               "model (forward + backward), 2 N per real token for a forward pass (generation, experience scoring, "
               "frozen references), N = the parameters that multiply activations (embedding lookups excluded, a "
               "language model's output projection included); attention score products not counted "
               "(benchmarks/flops.py)")
REAL_PEAK_SIZE, REAL_PEAK_SECONDS = 1024, 1.0


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
    parser.add_argument("--ppo_algos", nargs="*", default=["ppo", "grpo"],
                        help="Step-3 rows per estimator: ppo (critic + reward model) and critic-free ones (grpo, "
                             "dr_grpo, rloo, reinforce_plus_plus, ...: 4 answers per prompt, the checker's reward).")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="Step 3.")
    parser.add_argument("--hybrid_engine", action="store_true", help="Step 3 with --enable_hybrid_engine.")
    parser.add_argument("--quick", action="store_true", help="10 timed training steps and 2 PPO steps per row "
                                                              "(--real-data: 100 rows, 2 PPO steps).")
    parser.add_argument("--real-data", dest="real_data", action="store_true",
                        help="Run the real-data row set (benchmarks/bench_real.py: baseline fp32 + random batches "
                             "beside --dtype auto + length grouping, and SFT --packing) instead of the synthetic rows; "
                             "writes bench_real.json and bench_real.md.")
    parser.add_argument("--real_source", default=str(bench_real.DEFAULT_SOURCE),
                        help="--real-data: preference jsonl whose first --real_rows rows are the workload.")
    parser.add_argument("--real_rows", type=int, default=400)
    parser.add_argument("--real_model", default="tiny/opt-20m")
    parser.add_argument("--threads", type=int, default=1,
                        help="--real-data: torch threads of every row and of the peak measurement (0: torch's "
                             "default).")
    return parser.parse_args(argv)


def machine_facts() -> dict:
    import deepspeed
    import torch

    from training.utils.precision import read_cpu_flags

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    if torch.cuda.is_available():
        cpu += f"; GPU {torch.cuda.get_device_name(0)}"
    cpu_flags = read_cpu_flags()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
            "bf16_flags": {flag: flag in cpu_flags for flag in ("avx512_bf16", "amx_bf16")}}


def real_workload(documents: list[dict], source: str, rows: int) -> str:
    """One sentence describing the real-data rows' workload, from what the rows report."""
    first = {d["benchmark"]: d["rows"][0] for d in documents if d["rows"]}
    counts = [f"{first[f'real_{step}']['train_samples']} {unit}" for step, unit in
              (("sft", "SFT samples"), ("rm", "reward-model pairs"), ("dpo", "DPO pairs")) if f"real_{step}" in first]
    row = next(iter(first.values()))
    text = (f"the first {rows} rows of {Path(source).name} as a local jsonl file, --data_split 2,4,4 after the 9:1 "
            f"train/eval hold-out ({', '.join(counts) or 'no supervised rows'}); {row['model']} "
            f"({row['params'] / 1e6:.1f}M parameters, random weights), per-device batch {row['batch_size']}, ")
    if any(step in first for step in ("real_sft", "real_rm", "real_dpo")):
        text += f"--max_seq_len {next(r for r in first.values() if 'max_seq_len' in r)['max_seq_len']}, "
    if "real_ppo" in first:
        ppo = first["real_ppo"]
        text += (f"PPO: actor {ppo['model']} with a reward model of the same shape as critic and reward model, "
                 f"{ppo['steps']} steps over {ppo['prompts']} prompts, generation and training batch "
                 f"{ppo['batch_size']}, prompts <= {ppo['max_prompt_seq_len']} and answers <= "
                 f"{ppo['max_answer_seq_len']} tokens; ")
    return text + (f"ZeRO 0, one rank, {row['torch_threads']} torch thread(s); one untimed warm-up step, then one "
                   "timed epoch.")


def run_real(args) -> None:
    """The real-data row set: per-dtype peaks, bench_real's rows for each step of --only, bench_real.{json,md}."""
    import torch

    from training.utils.precision import matmul_peak_gflops, resolve_dtype

    if not Path(args.real_source).is_file():
        print(f"skipping the real-data rows: {args.real_source} not found (it is in the shared data directory "
              "beside the repository; pass --real_source FILE to use another copy)", file=sys.stderr)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = sorted({"fp32", resolve_dtype("auto", device)[0]})
    machine = machine_facts()

    def peak(dtype: str) -> float:
        return matmul_peak_gflops(dtype, REAL_PEAK_SIZE, REAL_PEAK_SECONDS, device)

    peaks = {dtype: {"before": peak(dtype)} for dtype in dtypes}
    print(f"matmul peaks: { {d: p['before'] for d, p in peaks.items()} } GFLOP/s", file=sys.stderr)
    rows = 100 if args.quick else args.real_rows
    common = ["--source", args.real_source, "--rows", str(rows), "--model", args.real_model,
              "--threads", str(args.threads)] + (["--ppo_steps", "2"] if args.quick else [])
    documents = [bench_real.collect(["--step", step, *common]) for step in STEPS if step in args.only]
    for dtype, values in peaks.items():
        values["after"] = peak(dtype)
        values["used"] = max(values["before"], values["after"])
    machine["load_after"] = os.getloadavg()[0]
    for document in documents:
        flops.add_mfu_by_dtype(document, {dtype: values["used"] for dtype, values in peaks.items()})
    result = {"kind": "real", "date": datetime.date.today().isoformat(), "machine": machine,
              "peak_size": REAL_PEAK_SIZE, "peak_seconds": REAL_PEAK_SECONDS, "matmul_peaks_gflops": peaks,
              "workload": {"source": args.real_source, "rows": rows,
                           "description": real_workload(documents, args.real_source, rows)},
              "mfu_formula": MFU_FORMULA.format(peak="the matmul peak FLOP/s in the row's own dtype"),
              "benchmarks": documents}
    write_report(result, Path(args.output_dir), "bench_real")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.real_data:
        run_real(args)
        return
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
                    "--batch_sizes", *map(str, args.batch_sizes), "--dtype", args.dtype, "--algos", *args.ppo_algos]
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
              "mfu_formula": MFU_FORMULA.format(peak="fp32 matmul peak FLOP/s"),
              "benchmarks": documents}
    write_report(result, Path(args.output_dir), "bench")


def write_report(result: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(result))
    print(json.dumps(result, indent=1))
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
