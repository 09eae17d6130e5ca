"""The chat-template format end to end, as a user runs it: steps 1, 2, DPO and 3 on the tiny Qwen2-style model,
chat over a pipe, rw_eval and prompt_eval; the flag is given to the steps that start from the base model only,
and every later program reads the saved format. e2e with --apply-chat-template on the Llama-3-style model."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, assert_ok, clean_env, run_script, write_jsonl

from training.utils.data.synthetic import generate_rows, parse_synthetic_name

STEP_DIRS = {name: REPO / "training" / folder for name, folder in (
    ("step1", "step1_supervised_finetuning"), ("step2", "step2_reward_model_finetuning"),
    ("dpo", "step2_dpo_finetuning"), ("step3", "step3_rlhf_finetuning"))}
DATA = "synthetic/copy:size=2000,eval_size=64"
COMMON = ["--data_path", DATA, "--dtype", "fp32", "--seed", "3"]


def saved_format(directory) -> dict:
    return json.loads((directory / "prompt_format.json").read_text())


@pytest.fixture(scope="module")
def template_runs(tmp_path_factory):
    """SFT and a reward model of tiny/qwen2 trained with --apply_chat_template."""
    root = tmp_path_factory.mktemp("chat_template")
    cache = ["--data_output_path", str(root / "cache")]
    sft, reward = root / "sft", root / "reward"
    assert_ok(run_script(STEP_DIRS["step1"], [
        "main.py", "--model_name_or_path", "tiny/qwen2", "--apply_chat_template", "--output_dir", str(sft),
        "--max_seq_len", "64", "--num_train_epochs", "3", "--learning_rate", "2e-3", *COMMON, *cache]))
    assert_ok(run_script(STEP_DIRS["step2"], [
        "main.py", "--model_name_or_path", "tiny/qwen2", "--apply_chat_template", "--output_dir", str(reward),
        "--max_seq_len", "64", "--num_train_epochs", "2", "--learning_rate", "1e-3", *COMMON, *cache]))
    return {"root": root, "sft": sft, "reward": reward, "cache": cache}


def test_steps_1_and_2_save_the_template_format(template_runs):
    sft, reward = template_runs["sft"], template_runs["reward"]
    for directory in (sft, reward):
        record = saved_format(directory)
        assert record["prompt_format"] == "chat_template" and record["end_of_turn"] == "<|im_end|>"
        assert record["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
        assert "<|im_start|>" in (directory / "chat_template.jinja").read_text()
    meta = json.loads((reward / "reward_model.json").read_text())
    assert meta["end_token"] == "<|im_end|>"  # the reward model scores the template's end of turn
    assert json.loads((sft / "config.json").read_text())["eos_token_id"] == 4097  # <|im_end|>


def test_chat_reads_the_saved_format_and_answers_in_it(template_runs):
    result = subprocess.run([sys.executable, "applications/chat.py", "--path", str(template_runs["sft"]), "--greedy",
                             "--show_prompt", "--max_new_tokens", "16"], input="Repeat: 4 8 1 9\nquit\n", cwd=REPO,
                            capture_output=True, text=True, env=clean_env(), timeout=300)
    assert_ok(result)
    assert "format: chat template of the tokenizer (end of turn '<|im_end|>'" in result.stderr
    assert '<|im_start|>user\\nRepeat: 4 8 1 9<|im_end|>\\n<|im_start|>assistant\\n"' in result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("Assistant:")]
    assert len(replies) == 1 and replies[0].removeprefix("Assistant: ").replace(" ", "").isdigit()
    assert "reply cut at --max_new_tokens" not in result.stderr  # it stopped at <|im_end|>, shown nowhere


def test_rw_eval_and_prompt_eval_read_the_saved_format(template_runs, tmp_path):
    rows = generate_rows(parse_synthetic_name(DATA), "eval")[:32]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    result = run_script(STEP_DIRS["step2"], ["rw_eval.py", "--model_name_or_path", str(template_runs["reward"]),
                                             "--pairs", str(pairs), "--max_seq_len", "64"])
    assert_ok(result)
    assert json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] >= 0.9
    result = run_script(STEP_DIRS["step1"], ["prompt_eval.py", "--model_name_or_path_baseline", "tiny/qwen2",
                                             "--model_name_or_path_finetune", str(template_runs["sft"]),
                                             "--synthetic_task", DATA, "--num_prompts", "32", "--max_new_tokens", "12"])
    assert_ok(result)
    # both models are asked in the fine-tuned model's saved format (the base model has none of its own)
    assert result.stdout.count("format: chat template of the tokenizer (end of turn '<|im_end|>'") == 2
    finetuned = [line.split("finetune: ", 1)[1] for line in result.stdout.splitlines() if "  finetune: " in line]
    assert len(finetuned) == 20 and sum(re.fullmatch(r"'[\d ]+'", reply) is not None for reply in finetuned) >= 15


def test_dpo_and_step3_take_the_format_from_their_models(template_runs):
    root, cache = template_runs["root"], template_runs["cache"]
    dpo = root / "dpo"
    assert_ok(run_script(STEP_DIRS["dpo"], ["main.py", "--model_name_or_path", str(template_runs["sft"]),
                                            "--output_dir", str(dpo), "--max_seq_len", "64", *COMMON, *cache]))
    assert saved_format(dpo)["prompt_format"] == "chat_template"
    ppo = root / "ppo"
    result = run_script(STEP_DIRS["step3"], [
        "main.py", "--actor_model_name_or_path", str(template_runs["sft"]), "--critic_model_name_or_path",
        str(template_runs["reward"]), "--output_dir", str(ppo), "--max_prompt_seq_len", "48",
        "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "8", "--per_device_training_batch_size",
        "8", "--num_warmup_steps", "1", "--enable_test_mode", "--test_stop_step", "2", "--eval_prompts", "16",
        "--print_answers", *COMMON, *cache])
    assert_ok(result)
    assert "format: chat template of the tokenizer" in result.stdout
    assert "--- answer: '" in result.stdout and "<|im_end|>'" in result.stdout  # answers end with the end of turn
    metrics = [json.loads(line) for line in (ppo / "actor" / "training_metrics.jsonl").read_text().splitlines()]
    assert min(row["answer/eos_rate"] for row in metrics if "answer/eos_rate" in row) >= 0.9
    assert saved_format(ppo / "actor")["prompt_format"] == "chat_template"
    assert saved_format(ppo / "critic")["prompt_format"] == "chat_template"


def test_e2e_with_the_template_switch_on_the_llama3_style_model(tmp_path):
    out = tmp_path / "e2e"
    result = run_script(REPO, ["applications/e2e_rlhf.py", "--deployment-type", "cpu", "--quick",
                               "--actor-model", "tiny/llama3", "--reward-model", "tiny/llama3",
                               "--apply-chat-template", "--check-prompts", "32", "--output-dir", str(out)],
                        timeout=1500)
    assert_ok(result)
    for directory in (out / "actor-models" / "llama3", out / "reward-models" / "llama3",
                      out / "step3-models" / "llama3" / "actor"):
        record = saved_format(directory)
        assert record["prompt_format"] == "chat_template" and record["end_of_turn"] == "<|eot_id|>"
    assert json.loads((out / "actor-models" / "llama3" / "training_args.json").read_text())["apply_chat_template"]
    step3_args = json.loads((out / "step3-models" / "llama3" / "actor" / "training_args.json").read_text())
    assert step3_args["apply_chat_template"] is None  # step 3 took the format from its models
    assert "| step3 |" in result.stdout and "held-out checker accuracy" in result.stdout
