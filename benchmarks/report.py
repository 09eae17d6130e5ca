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
        models = _model(row) if row["critic_model"] == row["model"] else \
            f"{_model(row)} / {_model(row, 'critic_model', 'critic_params')}"
        if row["hybrid_engine"]:
            models += ", Hybrid Engine" + ("" if row["hybrid_generation"] else " (fallback)")
        mfu = " / ".join(_pct(row["mfu"][phase]) for phase in ("generation", "experience", "training", "total"))
        lines.append(f"| {models} | {row['mean_answer_tokens']:.0f} | {row['batch_size']} | {row['samples_per_s']} | "
                     f"{row['generated_tokens_per_s']:.0f} | {row['real_tokens_per_s']:.0f} | "
                     f"{row['padding_efficiency']:.2f} | {row['generation_s']:.2f} | {row['experience_s']:.2f} | "
                     f"{row['training_s']:.2f} | {mfu} | {row['peak_rss_mib']:.0f} |")
    return lines


def markdown(report: dict) -> str:
    """The whole report as Markdown: the machine and its measured peak, then one table per kind of row."""
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
