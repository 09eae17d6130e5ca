"""Results a user can trust, and the e2e driver's exits: an empty eval split reports no metrics (and step 2 saves
no invented reward statistics), a warmup longer than the run is warned about, runs that would never step are
refused, and e2e maps its steps' outcomes to its own exit codes (2 bad input, 3 diverged, 1 crash, 128 + N
signal) with the step's own error line, surviving a Ctrl-C without a traceback."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import LAUNCHER_VARS, REPO, STEP1_DIR, assert_ok, read_metrics, run_script

from applications import e2e_rlhf
from training.utils.errors import UserInputError

BASE = ["--model_name_or_path", "tiny/opt", "--max_seq_len", "64", "--dtype", "fp32"]
# 1 eval row: with --data_split 6,2,2 it falls into phase 1, so steps 2 and DPO get an empty eval split; with
# 2,4,4 it falls into phase 2, so step 1 gets none.
NO_EVAL_DATA = "synthetic/copy:size=200,eval_size=1"
SMALL_DATA = "synthetic/copy:size=200,eval_size=20"


def eval_keys(rows: list[dict]) -> set:
    return {key for row in rows for key in row if key.startswith("eval/")}


def test_step1_with_an_empty_eval_split_reports_no_perplexity(tmp_path):
    out = tmp_path / "sft"
    result = run_script(STEP1_DIR, ["main.py", *BASE, "--data_path", NO_EVAL_DATA, "--data_split", "2,4,4",
                                    "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out)])
    assert_ok(result)
    assert "data: 40 train / 0 eval samples" in result.stdout
    assert "before training: no eval data" in result.stdout
    assert "perplexity" not in result.stdout  # before this fix: "perplexity 1.00" over no tokens
    rows = read_metrics(out)
    assert eval_keys(rows) == set() and sum("train/loss" in row for row in rows) == 3


def test_step2_with_an_empty_eval_split_saves_no_reward_statistics(tmp_path, capsys):
    out = tmp_path / "rm"
    result = run_script(REPO / "training" / "step2_reward_model_finetuning",
                        ["main.py", *BASE, "--data_path", NO_EVAL_DATA, "--data_split", "6,2,2",
                         "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out)])
    assert_ok(result)
    assert "final (whole eval split): no eval data" in result.stdout
    assert "accuracy" not in result.stdout  # before: "accuracy 0.0000 ... (1 pairs)", saved as statistics
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["reward_stats"] == {}
    assert eval_keys(read_metrics(out)) == set()
    # What step 3 makes of it: --normalize_reward warns once and uses raw scores, nothing invented.
    from training.utils.rlhf.control import RewardNormalizer

    normalizer = RewardNormalizer.from_reward_model_meta(meta, enabled=True)
    assert (normalizer.mean, normalizer.std) == (0.0, 1.0)
    assert "no usable reward_stats" in capsys.readouterr().out
    # and e2e's summary of the step says so instead of failing on the missing figure
    step = e2e_rlhf.Step("step2", "step2_reward_model_finetuning", [], out)
    assert e2e_rlhf.key_figures(step) == "no eval data"


def test_dpo_with_an_empty_eval_split_logs_no_eval_metrics(tmp_path):
    out = tmp_path / "dpo"
    result = run_script(REPO / "training" / "step2_dpo_finetuning",
                        ["main.py", *BASE, "--data_path", NO_EVAL_DATA, "--data_split", "6,2,2",
                         "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out)])
    assert_ok(result)
    assert "before training: no eval data" in result.stdout and "reward accuracy" not in result.stdout
    rows = read_metrics(out)
    assert eval_keys(rows) == set() and any("train/loss" in row for row in rows)


def test_a_warmup_longer_than_the_run_is_warned_about_once(tmp_path):
    out = tmp_path / "sft"
    result = run_script(STEP1_DIR, ["main.py", *BASE, "--data_path", SMALL_DATA, "--num_warmup_steps", "1000",
                                    "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(out)])
    assert_ok(result)
    warnings = [line for line in result.stdout.splitlines() if "--num_warmup_steps" in line]
    steps = sum("train/loss" in row for row in read_metrics(out))
    assert warnings == [f"WARNING: --num_warmup_steps 1000 >= the {steps} optimizer steps of this run: the learning "
                        "rate is still warming up when training ends; lower --num_warmup_steps (e.g. to 0) to train "
                        "at the full --learning_rate"]


def supervised_config(**overrides):
    values = dict(gradient_accumulation_steps=4, num_train_epochs=3, per_device_train_batch_size=8,
                  num_warmup_steps=0, lr_scheduler_type="linear") | overrides
    return SimpleNamespace(**values)


def test_supervised_schedule_counts_steps_across_epochs_and_refuses_none(capsys):
    from training.utils.engine import supervised_steps_per_epoch

    # DeepSpeed accumulates across epoch ends: 3 micro-batches x 3 epochs // 4 = 2 optimizer steps, not 0.
    assert supervised_steps_per_epoch(supervised_config(), 3) == 1
    supervised_steps_per_epoch(supervised_config(num_warmup_steps=2), 3)
    assert "--num_warmup_steps 2 >= the 2 optimizer steps" in capsys.readouterr().out
    supervised_steps_per_epoch(supervised_config(num_warmup_steps=2, lr_scheduler_type="constant"), 3)
    assert capsys.readouterr().out == ""  # a constant schedule has no warmup
    with pytest.raises(UserInputError, match=r"--gradient_accumulation_steps 10 is more than the 9 micro-batches .*"
                                             r"\(3 per epoch .* x 3 epochs\).*at most 9"):
        supervised_steps_per_epoch(supervised_config(gradient_accumulation_steps=10), 3)


def rlhf_config(tmp_path, *flags):
    from training.step3_rlhf_finetuning.main import parse_args

    return parse_args(["--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path", "tiny/opt",
                       "--output_dir", str(tmp_path / "out"), "--per_device_generation_batch_size", "4",
                       "--per_device_training_batch_size", "4", *flags])


def test_step3_schedule_refuses_zero_ppo_or_optimizer_steps_and_warns_on_warmup(tmp_path, capsys):
    from training.utils.rlhf.engine import optimizer_steps_per_epoch

    assert optimizer_steps_per_epoch(rlhf_config(tmp_path, "--num_warmup_steps", "0"), 20) == (20, 20)
    assert capsys.readouterr().out == ""
    # The buffer carries over the epoch's end: 3 prompt batches x 2 epochs fill 5 generation batches once.
    assert optimizer_steps_per_epoch(rlhf_config(tmp_path, "--generation_batches", "5", "--num_train_epochs", "2"),
                                     3)
    assert "--num_warmup_steps 100 >= the 5 optimizer steps" in capsys.readouterr().out  # step 3's default warmup
    with pytest.raises(UserInputError, match="--generation_batches 7 is more than the 6 prompt batches"):
        optimizer_steps_per_epoch(rlhf_config(tmp_path, "--generation_batches", "7", "--num_train_epochs", "2"), 3)
    with pytest.raises(UserInputError, match="--gradient_accumulation_steps 9 is more than the 8 PPO mini-batches "
                                             r"of the whole run \(4 PPO steps x 2 mini-batches"):
        optimizer_steps_per_epoch(rlhf_config(tmp_path, "--gradient_accumulation_steps", "9", "--enable_test_mode",
                                              "--test_stop_step", "4", "--ppo_epochs", "2"), 20)


# ---------------------------------------------------------------------------------------------- e2e


def e2e_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and k != "EXTRA_ARGS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2", **extra)
    return env


def run_e2e(tmp_path, *args, extra_args: str = "", timeout=600):
    """e2e over step 1 and 2 of small synthetic data; EXTRA_ARGS reaches the CPU scripts (without --quick)."""
    return subprocess.run([sys.executable, str(REPO / "applications" / "e2e_rlhf.py"), "--deployment-type", "cpu",
                           "--output-dir", str(tmp_path / "out"), "--data-path", SMALL_DATA, *args], cwd=REPO,
                          env=e2e_env(EXTRA_ARGS=extra_args), capture_output=True, text=True, timeout=timeout)


def test_e2e_exit_code_mapping():
    assert [e2e_rlhf.e2e_exit_code(code) for code in (2, 3, 1, 4, 255, 130, 143, -9, -2)] == \
        [2, 3, 1, 1, 1, 130, 143, 137, 130]


def test_e2e_passes_on_a_bad_input_exit_with_the_steps_whole_error_line(tmp_path):
    result = run_e2e(tmp_path, "--step", "1", extra_args="--num_train_epochs 0")
    assert result.returncode == 2, result.stderr[-3000:]
    log = tmp_path / "out" / "step1" / "training.log"
    assert "step1 failed (exit 2: bad input)" in result.stderr and f"its log: {log}" in result.stderr
    assert "the step said: error: --num_train_epochs must be at least 1 (got 0)" in result.stderr
    assert "hostfile" not in result.stderr  # the launcher's "Unable to find hostfile" is no multi_node failure


def test_e2e_reports_a_diverged_step_with_exit_3_and_its_error_line(tmp_path):
    result = run_e2e(tmp_path, "--step", "1",
                     extra_args="--num_train_epochs 1 --dtype fp32 --num_warmup_steps 0 --learning_rate 1e6")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "step1 failed (exit 3: training diverged)" in result.stderr
    assert re.search(r"the step said: error: non-finite loss at epoch 1, optimizer step \d+: training stopped",
                     result.stderr)


def test_e2e_calls_a_crash_exit_1_with_the_last_lines(tmp_path):
    log = tmp_path / "training.log"
    log.write_text("epoch 1/1:  10%|#  | 1/10\rTraceback (most recent call last):\nRuntimeError: boom\n")
    step = e2e_rlhf.Step("step1", "step1_supervised_finetuning", [], tmp_path)
    message = e2e_rlhf.explain_failure(step, log, 1)
    assert "step1 failed (exit 1)" in message and "RuntimeError: boom" in message and "hostfile" not in message
    assert e2e_rlhf.e2e_exit_code(1) == 1
    # the step's error line is found whole, also after a progress bar's carriage return
    assert e2e_rlhf.last_error_line("epoch 1/1: 5%\rerror: model directory 'x' has no tokenizer files (a, b): "
                                    "save it\n[launcher] done\n") == \
        "error: model directory 'x' has no tokenizer files (a, b): save it"


def test_e2e_ctrl_c_lets_the_step_save_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "out"
    # A terminal's Ctrl-C signals the whole foreground process group: e2e runs in a session of its own here,
    # so the test can signal its group the same way.
    process = subprocess.Popen([sys.executable, str(REPO / "applications" / "e2e_rlhf.py"), "--deployment-type",
                                "cpu", "--output-dir", str(out), "--data-path", "synthetic/copy:size=2000,eval_size=20",
                                "--step", "1", "2"], cwd=REPO, env=e2e_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "step1" / "training.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "before training:" in log.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)  # into the training loop
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"e2e: SIGINT stopped step1 (it saved a checkpoint if it had started training); its log: {log}; "
                     "to continue, rerun the same e2e command plus --step 1 2 --resume"]
    checkpoints = out / "actor-models" / "opt" / "checkpoints"
    assert len(list(checkpoints.glob("step_*/trainer_state.json"))) == 1
    text = log.read_text()
    assert "stopped by SIGINT after step" in text and text in stdout  # the step's log is whole
    assert not (out / "step2").exists()
    # The suggested rerun resumes step 1 from its checkpoint (the script's EXTRA_ARGS) and runs step 2 as usual.
    args = e2e_rlhf.parse_args(["--deployment-type", "cpu", "--output-dir", str(out), "--step", "1", "2", "--resume"])
    step1, step2 = e2e_rlhf.build_steps(args)
    assert step1.env["EXTRA_ARGS"].split()[-1] == "--resume" and "EXTRA_ARGS" not in step2.env
    assert step1.resume and not step2.resume  # step 1's log is continued, not overwritten
