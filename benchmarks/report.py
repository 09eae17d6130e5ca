"""Markdown tables of a `run_all.py` report (the JSON document it writes as bench.json)."""


def _model(row: dict, key: str = "model", params: str = "params") -> str:
    return f"{row[key]} ({row[params] / 1e6:.1f}M)"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def training_table(documents: list[dict]) -> list[str]:
    lines = ["| step | model | padding | samples/s | real tokens/s | padding efficiency | model GFLOP/s | MFU | "
             "peak RSS MiB |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for document in documents:
        for row in document["rows"]:
            unit = " pairs/s" if row["step"] in ("rm", "dpo") else ""
            lines.append(f"| {row['step'].upper()} | {_model(row)} | {row['padding']} | {row['samples_per_s']}{unit} "
                         f"| {row['real_tokens_per_s']:.0f} | {row['padding_efficiency']:.2f} | "
                         f"{row['model_gflops_per_s']:.2f} | {_pct(row['mfu'])} | {row['peak_rss_mib']:.0f} |")
    return lines


def ppo_table(document: dict) -> list[str]:
    lines = ["| actor / critic | answer tokens | batch | samples/s | generated tokens/s | real tokens/s | "
             "padding efficiency | generation s | experience s | training s | MFU generation / experience / "
             "training / all | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in document["rows"]:
        if row.get("algo", "ppo") != "ppo":  # critic-free: no critic, no reward model
            models = f"{_model(row)}, {row['algo']} ({row['n_samples_per_prompt']} answers per prompt, no critic)"
        elif row["critic_model"] == row["model"]:
            models = _model(row)
        else:
            models = f"{_model(row)} / {_model(row, 'critic_model', 'critic_params')}"
        if row["hybrid_engine"]:
            models += ", Hybrid Engine" + ("" if row["hybrid_generation"] else " (fallback)")
        mfu = " / ".join(_pct(row["mfu"][phase]) for phase in ("generation", "experience", "training", "total"))
        lines.append(f"| {models} | {row['mean_answer_tokens']:.0f} | {row['batch_size']} | {row['samples_per_s']} | "
                     f"{row['generated_tokens_per_s']:.0f} | {row['real_tokens_per_s']:.0f} | "
                     f"{row['padding_efficiency']:.2f} | {row['generation_s']:.2f} | {row['experience_s']:.2f} | "
                     f"{row['training_s']:.2f} | {mfu} | {row['peak_rss_mib']:.0f} |")
    return lines


def speedups(rows: list[dict], key: str = "samples_per_s", reference: str | None = None) -> list[float | None]:
    """Each row's `key` divided by that of the reference row of the same step (the baseline row, `"baseline":
    True`, or the row of variant `reference`), rounded to two places; None for a step without one (or of 0)."""
    references = {row["step"]: row[key] for row in rows
                  if (row["variant"] == reference if reference else row.get("baseline"))}
    return [round(row[key] / references[row["step"]], 2) if references.get(row["step"]) else None for row in rows]


DSCHAT = "dschat-layout"  # bench_real's variant: DeepSpeed-Chat's data layout and kernels on this code


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def variant_label(row: dict) -> str:
    """What a real-data row ran: its dtype (and whether --dtype auto chose it), batching, packing."""
    dtype = f"auto -> {row['dtype']}" if row["variant"].startswith("auto") else row["dtype"]
    if row["variant"] == DSCHAT:
        padded = {"sft": "every sample padded to --max_seq_len", "ppo": "prompts padded to --max_prompt_seq_len"}
        return f"DeepSpeed-Chat's layout: {dtype}, random batches, " + padded.get(
            row["step"], "both rows of a pair padded to --max_seq_len")
    parts = [dtype, "length-grouped" if row["group_by_length"] else "random batches"]
    parts += ["packed (--packing)"] if row["packing"] else []
    if row["step"] in ("rm", "dpo") and row["variant"].startswith("auto"):
        parts += ["prompt shared" if row["variant"] == "auto-grouped" else "two padded rows per pair"]
    if row["step"] == "ppo" and row["variant"].startswith("auto"):
        parts += ["separate scoring passes" if row["variant"].endswith("-separate") else
                  "scored in the update's forward"]
    return ", ".join(parts) + (" (baseline)" if row.get("baseline") else
                               " (default)" if row["variant"] == "auto-grouped" else "")


def real_training_table(documents: list[dict]) -> list[str]:
    lines = ["| step | run | batches | samples/s | speed-up | speed-up by CPU time | vs DeepSpeed-Chat's layout | "
             "real tokens/s | padding efficiency | epoch s (CPU s) | model GFLOP/s | MFU (peak of its dtype) | "
             "peak RSS MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for document in documents:
        rows = document["rows"]
        for row, ratio, cpu_ratio, dschat in zip(rows, speedups(rows), speedups(rows, "samples_per_cpu_s"),
                                                 speedups(rows, reference=DSCHAT)):
            unit = " pairs/s" if row["step"] in ("rm", "dpo") else ""
            lines.append(f"| {row['step'].upper()} | {variant_label(row)} | {row['batches']} | "
                         f"{row['samples_per_s']:.2f}{unit} | {_ratio(ratio)} | {_ratio(cpu_ratio)} | "
                         f"{_ratio(dschat)} | "
                         f"{row['real_tokens_per_s']:.0f} | {row['padding_efficiency']:.2f} | "
                         f"{row['elapsed_s']:.1f} ({row['cpu_s']:.1f}) | {row['model_gflops_per_s']:.2f} | "
                         f"{_pct(row['mfu'])} | {row['peak_rss_mib']:.0f} |")
    return lines


def real_ppo_table(document: dict) -> list[str]:
    lines = ["| run | steps | answers/s | speed-up | speed-up by CPU time | vs DeepSpeed-Chat's layout | "
             "generated tokens/s | real tokens/s | padding efficiency | generation s | experience s | training s | "
             "epoch s (CPU s) | MFU generation / experience / training / all | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    rows = document["rows"]
    for row, ratio, cpu_ratio, dschat in zip(rows, speedups(rows), speedups(rows, "samples_per_cpu_s"),
                                             speedups(rows, reference=DSCHAT)):
        mfu = " / ".join(_pct(row["mfu"][phase]) for phase in ("generation", "experience", "training", "total"))
        lines.append(f"| {variant_label(row)} | {row['steps']} | {row['samples_per_s']:.2f} | {_ratio(ratio)} | "
                     f"{_ratio(cpu_ratio)} | {_ratio(dschat)} | {row['generated_tokens_per_s']:.0f} | "
                     f"{row['real_tokens_per_s']:.0f} | "
                     f"{row['padding_efficiency']:.2f} | {row['generation_s']:.1f} | {row['experience_s']:.1f} | "
                     f"{row['training_s']:.1f} | {row['elapsed_s']:.1f} ({row['cpu_s']:.1f}) | {mfu} | "
                     f"{row['peak_rss_mib']:.0f} |")
    return lines


def real_markdown(report: dict) -> str:
    """A `run_all.py --real-data` report: machine, per-dtype peaks, workload, then the tables with ratios."""
    machine, workload = report["machine"], report["workload"]
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in machine.get("bf16_flags", {}).items())
    peaks = "; ".join(f"{dtype} {peak['before']} GFLOP/s before, {peak['after']} after"
                      for dtype, peak in report["matmul_peaks_gflops"].items())
    documents = report["benchmarks"]
    training = [d for d in documents if d["benchmark"] in ("real_sft", "real_rm", "real_dpo")]
    ppo = [d for d in documents if d["benchmark"] == "real_ppo"]
    parts = [f"# Real-data benchmark ({report['date']})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores ({flags}), torch {machine['torch']} with "
             f"{machine['torch_threads']} threads, DeepSpeed {machine['deepspeed']}. Load average (1 min) "
             f"{machine['load_before']:.2f} before, {machine['load_after']:.2f} after the rows.", "",
             f"Matmul peak ({report['peak_size']}x{report['peak_size']}, best product over "
             f"{report['peak_seconds']} s; each row's MFU uses the better value of its own dtype): {peaks}.", "",
             f"Workload: {workload['description']}", "",
             "Speed-up: samples/s over the baseline row of the same step (every row of a step trains on the same "
             "samples, so it is also the ratio of epoch times). Speed-up by CPU time: the same with the row "
             "process's CPU seconds instead of wall seconds; with one thread per row it is much less disturbed by "
             "other jobs on the machine than the wall clock. vs DeepSpeed-Chat's layout: samples/s over the "
             "dschat-layout row of the same step (DeepSpeed-Chat's padding, batching and kernels on this code, "
             "measured in the same run).", "",
             f"MFU: {report['mfu_formula']}", ""]
    if training:
        parts += ["## Steps 1-2: SFT, reward model, DPO", "", *real_training_table(training), ""]
    for document in ppo:
        parts += ["## Step 3: PPO (time totals over the timed steps)", "", *real_ppo_table(document), ""]
    return "\n".join(parts)


def markdown(report: dict) -> str:
    """The whole report as Markdown: the machine and its measured peak, then one table per kind of row."""
    if report.get("kind") == "real":
        return real_markdown(report)
    machine, peak = report["machine"], report["matmul_peak_gflops"]
    documents = report["benchmarks"]
    training = [d for d in documents if d["benchmark"].startswith("train_")]
    ppo = [d for d in documents if d["benchmark"] == "ppo_step3"]
    parts = [f"# Benchmark ({report['date']})", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} with "
             f"{machine['torch_threads']} threads, DeepSpeed {machine['deepspeed']}. Load average (1 min) "
             f"{machine['load_before']:.2f} before, {machine['load_after']:.2f} after the rows. fp32 matmul peak "
             f"({peak['size']}x{peak['size']}, best of {peak['repeats']}): {peak['before']} GFLOP/s before, "
             f"{peak['after']} after; MFU uses {peak['used']} GFLOP/s.", "",
             f"MFU: {report['mfu_formula']}", ""]
    if training:
        parts += ["## Steps 1-2: SFT, reward model, DPO", "", *training_table(training), ""]
    for document in ppo:
        parts += ["## Step 3: PPO (time totals over the timed steps)", "", *ppo_table(document), ""]
    return "\n".join(parts)
