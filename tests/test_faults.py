"""Real runs under the faults users meet (issue 16): Ctrl-C through a documented script, a second run on the same
--output_dir, kill -9 in the middle of step 3's final save, a full disk at the final save and at a checkpoint, and
resumes that must refuse (changed data, damaged checkpoint, another step's checkpoint) or apply a new learning rate.

A full disk is simulated with a file-size limit (RLIMIT_FSIZE set in the child before it starts): Python ignores
SIGXFSZ, so the first write past the limit fails with EFBIG, as a write to a full disk fails with ENOSPC.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from test_resume import (
    DPO_DIR,
    STEP2_DIR,
    STEP3_DIR,
    assert_same_weights,
    checkpoint_steps,
    pair_args,
    run_until_checkpoint,
    sft_args,
)

from conftest import STEP1_DIR, assert_ok, clean_env, free_port, read_metrics, run_script

SCRIPT = "training_scripts/cpu/run_tiny.sh"


def wait_for(predicate, timeout: float = 240, interval: float = 0.01):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ---------------------------------------------------------------------------------------------- Ctrl-C
def run_tiny_script(output, extra: str, interrupt_after: str | None = None) -> tuple[int, str]:
    """bash run_tiny.sh OUTPUT 0 in its own process group, as a terminal runs it; with `interrupt_after`, Ctrl-C
    (SIGINT to the whole group: bash, the launcher, the rank and tee) once that text is in training.log."""
    env = clean_env(EXTRA_ARGS=extra, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
                    DATA_PATH="synthetic/copy:size=600,eval_size=20")
    process = subprocess.Popen(["bash", SCRIPT, str(output), "0"], cwd=STEP1_DIR, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = output / "training.log"
    if interrupt_after:
        assert wait_for(lambda: log.exists() and interrupt_after in log.read_text(errors="replace"))
        os.killpg(process.pid, signal.SIGINT)
    stdout, _ = process.communicate(timeout=600)
    return process.returncode, stdout


def test_ctrl_c_through_the_script_saves_keeps_the_log_and_resumes_exactly(tmp_path):
    flags = "--num_train_epochs 3 --dtype fp32 --seed 3"
    code, stdout = run_tiny_script(tmp_path / "full", flags)
    assert code == 0, stdout[-3000:]

    stopped = tmp_path / "stopped"
    code, stdout = run_tiny_script(stopped, flags, interrupt_after="epoch 1/3")
    assert code != 0 and "Traceback" not in stdout, stdout[-3000:]
    first_log = (stopped / "training.log").read_text()
    assert "stopped by SIGINT" in first_log and "--resume" in first_log
    assert checkpoint_steps(stopped) and not (stopped / "config.json").exists()

    code, stdout = run_tiny_script(stopped, flags + " --resume")
    assert code == 0, stdout[-3000:]
    log = (stopped / "training.log").read_text()
    assert log.startswith(first_log) and "resumed from" in log[len(first_log):]  # appended, not truncated
    assert_same_weights(tmp_path / "full", stopped)


# ---------------------------------------------------------------------------------------------- two runs
def test_a_second_run_on_the_same_output_dir_is_refused_and_the_first_is_unharmed(tmp_path):
    output = tmp_path / "out"
    args = sft_args(tmp_path, output, "--save_interval", "5", "--keep_checkpoints", "--save_total_limit", "0")
    first = subprocess.Popen([sys.executable, *args], cwd=STEP1_DIR, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:  # wait until the first run is training and has written a checkpoint
        lines.append(line)
        if "saved checkpoint" in line:
            break
    # Paused (it still holds the directory), so it cannot finish before the other two have started: the run is
    # faster than their start-up.
    first.send_signal(signal.SIGSTOP)
    try:
        second, resuming = run_script(STEP1_DIR, args), run_script(STEP1_DIR, args + ["--resume"])
    finally:
        first.send_signal(signal.SIGCONT)
    lines.append(first.stdout.read())
    assert first.wait(timeout=600) == 0, "".join(lines)[-3000:]
    for refused in (second, resuming):
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1].startswith(
            f"error: --output_dir '{output}' is in use by another run (pid {first.pid} on ")
    assert checkpoint_steps(output) == list(range(5, 101, 5))  # none deleted as a "leftover"
    assert not (output / ".lock").exists()


# ---------------------------------------------------------------------------------------------- step 3's set
@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults3")
    assert_ok(run_script(STEP2_DIR, pair_args(work, work / "reward", "--gradient_accumulation_steps", "1")))
    return work, work / "reward"


def ppo_args(work, reward, output, seed: str, *extra) -> list[str]:
    return ["main.py", "--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path", str(reward),
            "--data_path", "synthetic/copy:size=1200,eval_size=60", "--data_split", "1,1,1", "--data_output_path",
            str(work / "cache"), "--dtype", "fp32", "--seed", seed, "--output_dir", str(output),
            "--per_device_generation_batch_size", "8", "--per_device_training_batch_size", "8",
            "--max_prompt_seq_len", "24", "--max_answer_seq_len", "8", "--eval_prompts", "8",
            "--enable_test_mode", "--test_stop_step", "2", *extra]


def set_seeds(output) -> dict[str, int]:
    return {name: json.loads((output / name / "training_args.json").read_text())["seed"]
            for name in ("actor", "critic", "actor_ema") if (output / name).exists()}


def test_kill_during_step3s_final_save_leaves_the_old_set_and_a_rerun_replaces_it_whole(reward_model):
    work, reward = reward_model
    output = work / "ppo"
    assert_ok(run_script(STEP3_DIR, ppo_args(work, reward, output, "1", "--enable_ema")))
    assert set_seeds(output) == {"actor": 1, "critic": 1, "actor_ema": 1}

    rerun = subprocess.Popen([sys.executable, *ppo_args(work, reward, output, "2")], cwd=STEP3_DIR, env=clean_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged_actor = output / ".saving" / "actor"
    assert wait_for(staged_actor.exists)  # the new actor is written; the critic is not yet
    rerun.send_signal(signal.SIGKILL)
    rerun.wait()
    assert set_seeds(output) == {"actor": 1, "critic": 1, "actor_ema": 1}  # the old set, whole

    result = run_script(STEP3_DIR, ppo_args(work, reward, output, "3"))  # no --enable_ema this time
    assert_ok(result)
    assert "left by an interrupted save" in result.stdout
    assert set_seeds(output) == {"actor": 3, "critic": 3}  # the old actor_ema is gone with its set
    assert sorted(os.listdir(output)) == ["actor", "critic"]


# ---------------------------------------------------------------------------------------------- full disks
def limited_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def run_with_file_size_limit(args, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=STEP1_DIR, env=clean_env(), capture_output=True, text=True,
                          timeout=600, preexec_fn=limited_file_size(limit))


def snapshot(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_a_full_disk_at_the_final_save_keeps_the_earlier_model(tmp_path):
    output = tmp_path / "out"
    args = sft_args(tmp_path, output, "--num_train_epochs", "1")
    assert_ok(run_script(STEP1_DIR, args))
    before = snapshot(tmp_path / "out")
    # the model's 8.9 MB safetensors file is the first write past 4 MB (the data cache exists already)
    result = run_with_file_size_limit(args, 4 * 2**20)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the model to '{output}' (")
    assert "earlier contents are intact" in last
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path / "out") == before
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".")) == []  # no temporary sibling left


def test_a_full_disk_at_a_checkpoint_keeps_the_earlier_checkpoints_and_resume_works(tmp_path):
    output = tmp_path / "out"
    args = sft_args(tmp_path, output, "--num_train_epochs", "1", "--save_interval", "10")
    code, log = run_until_checkpoint(STEP1_DIR, args)  # SIGKILL right after checkpoint 10
    assert checkpoint_steps(output) == [10], log[-2000:]
    before = snapshot(output / "checkpoints")
    result = run_with_file_size_limit(args + ["--resume"], 2**20)  # optimizer states are ~27 MB
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write a checkpoint to '{output}/checkpoints/step_00000020' (")
    assert f"the last complete checkpoint is {output}/checkpoints/step_00000010" in last
    assert snapshot(output / "checkpoints") == before  # no .tmp-step_ directory, step 10 unchanged
    assert_ok(run_script(STEP1_DIR, args + ["--resume"]))


# ---------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def stopped_sft(tmp_path_factory):
    """A step-1 run killed after checkpoints 10 and 20 (kept), and its arguments."""
    work = tmp_path_factory.mktemp("resume_faults")
    (work / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"Human: count to {i}\n\nAssistant:",
                                                         "chosen": " " + " ".join(map(str, range(i % 9 + 2)))}) + "\n"
                                             for i in range(400)), encoding="utf-8")
    output = work / "out"
    args = ["main.py", "--model_name_or_path", "tiny/opt", "--data_path", str(work / "rows.jsonl"), "--data_split",
            "1,0,0", "--data_output_path", str(work / "cache"), "--dtype", "fp32", "--output_dir", str(output),
            "--per_device_train_batch_size", "4", "--max_seq_len", "32", "--lr_scheduler_type", "linear",
            "--save_interval", "10", "--save_total_limit", "0", "--print_loss"]
    code, log = run_until_checkpoint(STEP1_DIR, args, after="step 21 loss")
    assert checkpoint_steps(output) == [10, 20], log[-2000:]
    return work, output, args


def copy_run(stopped_sft, tmp_path):
    import shutil

    work, output, args = stopped_sft
    shutil.copytree(output, tmp_path / "out")
    return [str(tmp_path / "out") if a == str(output) else a for a in args], tmp_path / "out"


def test_resume_applies_a_new_learning_rate_to_the_restored_schedule(stopped_sft, tmp_path):
    args, output = copy_run(stopped_sft, tmp_path)
    result = run_script(STEP1_DIR, args + ["--resume", "--learning_rate", "5e-4"])
    assert_ok(result)
    assert "applied this run's learning rate 0.001 -> 0.0005" in result.stdout
    rates = {row["step"]: row["train/lr"] for row in read_metrics(output) if "train/lr" in row}
    total = max(rates)
    for step in (21, 30):  # linear decay: after the resume, half of what the schedule gives 1e-3
        assert rates[step] == pytest.approx(5e-4 * (total - step) / total, rel=1e-6)
    assert rates[20] == pytest.approx(1e-3 * (total - 20) / total, rel=1e-6)
    assert json.loads((output / "training_args.json").read_text())["learning_rate"] == 5e-4


def test_resume_refuses_data_whose_contents_changed(stopped_sft, tmp_path):
    args, output = copy_run(stopped_sft, tmp_path)
    rows = stopped_sft[0] / "rows.jsonl"  # the same path, other contents
    original = rows.read_text()
    rows.write_text(original.replace("count to 7", "count to seven"))
    try:
        result = run_script(STEP1_DIR, args + ["--resume"])
    finally:
        rows.write_text(original)
    assert result.returncode == 2
    assert "error: --resume: the training data differ from those" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", ["truncated model states", "missing rank file", "empty trainer state"])
def test_resume_from_a_damaged_checkpoint_names_the_earlier_one(stopped_sft, tmp_path, damage):
    args, output = copy_run(stopped_sft, tmp_path)
    newest = output / "checkpoints" / "step_00000020"
    if damage == "truncated model states":
        states = next((newest / "model").glob("*model_states.pt"))
        states.write_bytes(states.read_bytes()[:1000])
    elif damage == "missing rank file":
        (newest / "rank_0.pt").unlink()
    else:
        (newest / "trainer_state.json").write_text("")
    result = run_script(STEP1_DIR, args + ["--resume"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume: checkpoint {newest} is damaged or incomplete (")
    assert f"resume from the earlier checkpoint with --resume {output}/checkpoints/step_00000010" in last


def test_dpo_refuses_to_resume_from_a_step_2_checkpoint(stopped_sft, tmp_path):
    work, output, _ = stopped_sft
    args = ["main.py", "--model_name_or_path", "tiny/opt", "--data_path", "synthetic/copy:size=200,eval_size=20",
            "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "dpo"), "--dtype", "fp32",
            "--max_seq_len", "32", "--resume", str(output / "checkpoints" / "step_00000010")]
    result = run_script(DPO_DIR, args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume: {output}/checkpoints/step_00000010 is a checkpoint of step 1 (SFT), not of DPO: pass a "
        "checkpoint this step wrote")


def test_a_symlinked_output_dir_receives_the_model_through_the_link(tmp_path):
    target, link = tmp_path / "disk" / "model", tmp_path / "out"
    target.mkdir(parents=True)
    link.symlink_to(target)
    assert_ok(run_script(STEP1_DIR, sft_args(tmp_path, link, "--num_train_epochs", "1")))
    assert link.is_symlink() and (target / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path / "disk")) == ["model"]
