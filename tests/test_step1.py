"""Step 1 end to end, as a user runs it: plain python, the deepspeed launcher with two ranks, bad input."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import STEP1_DIR, assert_ok, read_metrics, run_script, write_jsonl

SYNTHETIC = "synthetic/arithmetic:size=2000,eval_size=200"


def step1_args(tmp_path, output, *extra) -> list[str]:
    return ["main.py", "--model_name_or_path", "tiny/opt", "--data_path", SYNTHETIC, "--data_split", "5,3,2",
            "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(output),
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_seq_len", "48",
            "--learning_rate", "2e-3", "--num_warmup_steps", "5", "--dtype", "fp32", *extra]


def test_sft_learns_and_saves_a_model_that_generates(tmp_path):
    output = tmp_path / "actor"
    result = run_script(STEP1_DIR, step1_args(tmp_path, output, "--num_train_epochs", "2", "--enable_tensorboard",
                                              "--tensorboard_path", str(tmp_path / "tb")))
    assert_ok(result)
    rows = read_metrics(output)
    ppl = [r["eval/perplexity"] for r in rows if "eval/perplexity" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(ppl) == 3  # before training and after each of the two epochs
    assert ppl[-1] < ppl[0] / 20, ppl  # random init ~4000; trained well below 200
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert "perplexity" in result.stdout and "samples/s" in result.stdout
    assert os.listdir(tmp_path / "tb" / "step1_model")  # TensorBoard events were written
    model = AutoModelForCausalLM.from_pretrained(output, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(output)
    prompt = tokenizer("\n\nHuman: What is 12 + 30?\n\nAssistant:", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip().isdigit(), reply  # learnt the answer format
    stats = json.loads((output / "data_stats.json").read_text())
    assert stats["train"]["rows"] == 1000


def test_prompt_eval_compares_baseline_and_finetuned(tmp_path):
    output = tmp_path / "actor"
    assert_ok(run_script(STEP1_DIR, step1_args(tmp_path, output, "--num_train_epochs", "3")))
    result = run_script(STEP1_DIR, ["prompt_eval.py", "--model_name_or_path_baseline", "tiny/opt",
                                    "--model_name_or_path_finetune", str(output), "--synthetic_task", SYNTHETIC,
                                    "--num_prompts", "100", "--max_new_tokens", "6"])
    assert_ok(result)
    line = [s for s in result.stdout.splitlines() if s.startswith("checker accuracy")][0]
    baseline, finetune = (float(x) for x in line.replace(",", "").split()[-3::2])
    assert baseline == 0.0 and finetune >= baseline, line
    finetuned = [s.split(":", 1)[1].strip().strip("'") for s in result.stdout.splitlines() if "finetune: " in s]
    base = [s.split(":", 1)[1].strip().strip("'") for s in result.stdout.splitlines() if "baseline: " in s]
    assert len(finetuned) == 20 and all(r.strip().isdigit() for r in finetuned), finetuned  # answers as numbers
    assert not all(r.strip().isdigit() for r in base), base  # the random model does not


def test_llama_lora_with_gradient_checkpointing(tmp_path):
    output = tmp_path / "actor"
    args = step1_args(tmp_path, output, "--lora_dim", "8", "--lora_module_name", "layers.", "--only_optimize_lora",
                      "--gradient_checkpointing", "--lora_learning_rate", "5e-3")
    args[args.index("tiny/opt")] = "tiny/llama"
    assert_ok(run_script(STEP1_DIR, args))
    ppl = [r["eval/perplexity"] for r in read_metrics(output) if "eval/perplexity" in r]
    assert ppl[-1] < ppl[0]
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(str(output / "model.safetensors")))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_with_zero(tmp_path, stage):
    output = tmp_path / "actor"
    args = step1_args(tmp_path, output, "--zero_stage", str(stage), "--per_device_train_batch_size", "8",
                      "--data_split", "2,4,4")
    result = run_script(STEP1_DIR, args, num_ranks=2)
    assert_ok(result)
    ppl = [r["eval/perplexity"] for r in read_metrics(output) if "eval/perplexity" in r]
    assert ppl[-1] < ppl[0] / 5, ppl
    model = AutoModelForCausalLM.from_pretrained(output, local_files_only=True)
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_zero_offload_with_cpu_adam(tmp_path):
    """ZeRO-2 with the optimizer offloaded to DeepSpeedCPUAdam (JIT-built once per machine)."""
    output = tmp_path / "actor"
    result = run_script(STEP1_DIR, step1_args(tmp_path, output, "--zero_stage", "2", "--offload"))
    assert_ok(result)
    ppl = [r["eval/perplexity"] for r in read_metrics(output) if "eval/perplexity" in r]
    assert ppl[-1] < ppl[0] / 5, ppl


def test_error_on_rank_0_does_not_hang_the_other_rank(tmp_path):
    """The phase split is cut on rank 0 only; its error must reach rank 1 instead of leaving it at a barrier."""
    output = tmp_path / "actor"
    result = run_script(STEP1_DIR, step1_args(tmp_path, output, "--data_split", "0,5,5"), num_ranks=2, timeout=180)
    assert result.returncode != 0
    assert "leaves no training rows for phase 1" in result.stdout + result.stderr
    assert not output.exists()


def bad_json_rows(tmp_path):
    return str(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}]))


@pytest.mark.parametrize("case,flags,message", [
    ("unknown dataset", ["--data_path", "Nobody/no-such-data"], "unknown dataset 'Nobody/no-such-data'"),
    ("missing file", ["--data_path", "/nonexistent/rows.jsonl"], "/nonexistent/rows.jsonl"),
    ("rows missing fields", ["--data_path", bad_json_rows], "bad.jsonl"),
    ("empty split", ["--data_split", "0,5,5"], "leaves no training rows for phase 1"),
    ("fp16 on cpu", ["--dtype", "fp16"], "--dtype fp16 is not supported on CPU"),
    ("lora name matches nothing", ["--lora_dim", "4", "--lora_module_name", "no_such_block."], "no_such_block."),
])
def test_bad_input_is_one_clear_line_and_no_output(tmp_path, case, flags, message):
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    output = tmp_path / "actor"
    args = step1_args(tmp_path, output)
    for flag, value in zip(flags[0::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = run_script(STEP1_DIR, args, timeout=300)
    assert result.returncode == 2, f"{case}: exit {result.returncode}\n{result.stderr[-2000:]}"
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not output.exists()
