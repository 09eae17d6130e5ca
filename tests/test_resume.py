"""Checkpoints and exact resume in every step, and the faults that must not lose work.

For steps 1, 2, DPO and 3: a run killed with SIGKILL right after a periodic checkpoint, then resumed,
ends with the same weights as an uninterrupted run, bitwise (fp32 on CPU, dropout on, so the RNG
states matter too), and logs the same losses. Also: a kill in the middle of writing a checkpoint, SIGTERM
on one and on two ranks, a NaN loss, and resume refusing what it cannot continue.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, STEP1_DIR, assert_ok, clean_env, free_port, read_metrics, run_script

STEP2_DIR = REPO / "training" / "step2_reward_model_finetuning"
DPO_DIR = REPO / "training" / "step2_dpo_finetuning"
STEP3_DIR = REPO / "training" / "step3_rlhf_finetuning"
TASK = "synthetic/copy:size=1200,eval_size=60"


def common(tmp_path) -> list[str]:
    return ["--data_path", TASK, "--data_split", "1,1,1", "--data_output_path", str(tmp_path / "cache"),
            "--dtype", "fp32", "--seed", "7"]


def sft_args(tmp_path, output, *extra) -> list[str]:
    # 400 rows / 8 = 50 batches an epoch; two epochs, so a resume crosses an epoch boundary
    return ["main.py", "--model_name_or_path", "tiny/opt", "--output_dir", str(output), *common(tmp_path),
            "--per_device_train_batch_size", "8", "--max_seq_len", "32", "--num_train_epochs", "2",
            "--learning_rate", "1e-3", "--num_warmup_steps", "5", *extra]


def pair_args(tmp_path, output, *extra) -> list[str]:
    return ["main.py", "--model_name_or_path", "tiny/opt", "--output_dir", str(output), *common(tmp_path),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_seq_len", "32",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", *extra]


def weights(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".safetensors") and "checkpoints" not in root:
                tensors.update({f"{os.path.relpath(root, directory)}/{name}/{k}": v
                                for k, v in load_file(os.path.join(root, name)).items()})
    return tensors


def assert_same_weights(a, b):
    first, second = weights(a), weights(b)
    assert first and first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different[:5]


def logged(directory) -> list[dict]:
    """The metrics history without wall-clock figures (they differ between any two runs)."""
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}
            for row in read_metrics(directory)]


def run_until_checkpoint(script_dir, args, kill=signal.SIGKILL, after="saved checkpoint") -> tuple[int, str]:
    """Start a step, send `kill` as soon as a line containing `after` appears; return (exit code, output)."""
    process = subprocess.Popen([sys.executable, *args], cwd=script_dir, env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if after in line:
            process.send_signal(kill)
            break
    output.append(process.stdout.read())
    return process.wait(timeout=300), "".join(output)


def checkpoint_steps(output) -> list[int]:
    return sorted(int(name[5:]) for name in os.listdir(output / "checkpoints") if name.startswith("step_"))


def kill_and_resume(script_dir, args, output, model_dir=None):
    """SIGKILL after the first periodic checkpoint, check nothing final was written, resume to the end."""
    code, log = run_until_checkpoint(script_dir, args)
    assert code == -signal.SIGKILL, log[-2000:]
    saved = checkpoint_steps(output)
    assert saved and not (model_dir or output).joinpath("config.json").exists()
    resumed = run_script(script_dir, args + ["--resume"])
    assert_ok(resumed)
    assert f"resumed from {output / 'checkpoints'}/step_{saved[-1]:08d}" in resumed.stdout
    assert not (output / "checkpoints").exists()  # removed once the final model is saved
    return saved[-1]


# ---------------------------------------------------------------- every step: kill, resume, same result

def test_sft_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    assert_ok(run_script(STEP1_DIR, sft_args(tmp_path, tmp_path / "full")))
    step = kill_and_resume(STEP1_DIR, sft_args(tmp_path, tmp_path / "resumed", "--save_interval", "30"),
                           tmp_path / "resumed")
    assert step < 100  # killed before the end of the second epoch
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")
    assert logged(tmp_path / "full") == logged(tmp_path / "resumed")


def test_sft_killed_and_resumed_matches_in_the_auto_dtype_with_packing(tmp_path):
    """--dtype auto where it picks bf16 (a CPU with native bf16), with packed rows: segment attention, the kept
    heap and bf16 mixed precision resume bit for bit too."""
    from training.utils.precision import resolve_dtype

    if resolve_dtype("auto", "cpu")[0] != "bf16":
        pytest.skip("--dtype auto is fp32 on this CPU: the fp32 resume test covers it")

    def args(output, *extra):
        return [a if a != "fp32" else "auto" for a in sft_args(tmp_path, output, "--packing", *extra)]

    full = run_script(STEP1_DIR, args(tmp_path / "full"))
    assert_ok(full)
    assert "precision: bf16" in full.stdout and "--packing: 400 samples in" in full.stdout, full.stdout[-2000:]
    kill_and_resume(STEP1_DIR, args(tmp_path / "resumed", "--save_interval", "10"), tmp_path / "resumed")
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")
    assert logged(tmp_path / "full") == logged(tmp_path / "resumed")


@pytest.mark.parametrize("step_dir, extra", [
    (STEP2_DIR, ("--eval_interval", "10", "--eval_iters", "2")),  # reward model: periodic evaluations too
    (DPO_DIR, ("--dropout", "0.1", "--beta", "0.5")),
], ids=["reward_model", "dpo"])
def test_pair_steps_killed_and_resumed_match_an_uninterrupted_run(tmp_path, step_dir, extra):
    assert_ok(run_script(step_dir, pair_args(tmp_path, tmp_path / "full", *extra)))
    kill_and_resume(step_dir, pair_args(tmp_path, tmp_path / "resumed", *extra, "--save_interval", "5"),
                    tmp_path / "resumed")
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")
    assert logged(tmp_path / "full") == logged(tmp_path / "resumed")
    if step_dir == STEP2_DIR:  # the saved score statistics come from the final evaluation
        full, resumed = (json.loads((tmp_path / d / "reward_model.json").read_text()) for d in ("full", "resumed"))
        assert full["reward_stats"] == resumed["reward_stats"]


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    """A reward model from a short step-2 run (step 3 needs one as critic and reward model)."""
    work = tmp_path_factory.mktemp("resume3")
    output = work / "reward"
    assert_ok(run_script(STEP2_DIR, pair_args(work, output, "--gradient_accumulation_steps", "1")))
    return work, output


def ppo_args(work, critic_dir, output, *extra) -> list[str]:
    return ["main.py", "--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path", str(critic_dir),
            *common(work), "--output_dir", str(output), "--per_device_generation_batch_size", "8",
            "--per_device_training_batch_size", "4", "--max_prompt_seq_len", "24", "--max_answer_seq_len", "8",
            "--actor_dropout", "0.1", "--enable_ema", "--target_kl", "0.05", "--kl_horizon", "100",
            "--unsupervised_dataset_name", str(work / "text.txt"), "--unsup_coef", "0.5", "--eval_prompts", "8",
            "--enable_test_mode", "--test_stop_step", "6", *extra]


def test_ppo_killed_and_resumed_matches_an_uninterrupted_run(critic):
    """Sampling, EMA, the adaptive KL coefficient, the mini-batch shuffle and the PPO-ptx text position
    all continue exactly."""
    work, critic_dir = critic
    (work / "text.txt").write_text("\n\n".join(f"Paragraph {i}: " + "one two three four five six " * (i % 5 + 3)
                                               for i in range(60)), encoding="utf-8")
    assert_ok(run_script(STEP3_DIR, ppo_args(work, critic_dir, work / "full")))
    kill_and_resume(STEP3_DIR, ppo_args(work, critic_dir, work / "resumed", "--save_interval", "2"),
                    work / "resumed", model_dir=work / "resumed" / "actor")
    assert_same_weights(work / "full", work / "resumed")  # actor, critic and actor_ema
    full, resumed = logged(work / "full" / "actor"), logged(work / "resumed" / "actor")
    assert full == resumed
    assert any({"kl/coef", "loss/unsupervised"} <= row.keys() for row in full)


# ---------------------------------------------------------------- faults

def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing the second checkpoint (after DeepSpeed's files, before this rank's RNG
    file): the first checkpoint stays the newest complete one, and resuming from it ends like a run never
    interrupted."""
    output = tmp_path / "resumed"
    args = sft_args(tmp_path, output, "--save_interval", "20", "--num_train_epochs", "1")
    killer = textwrap.dedent(f"""
        import os, signal, sys, torch
        save = torch.save
        def save_then_die(obj, path, *a, **k):
            if "step_00000040" in str(path) and str(path).endswith("rank_0.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, path, *a, **k)
        torch.save = save_then_die
        from training.step1_supervised_finetuning.main import main
        main({args[1:]!r})
    """)
    killed = subprocess.run([sys.executable, "-c", killer], cwd=STEP1_DIR, env=clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = os.listdir(output / "checkpoints")
    assert sorted(leftovers) == [".tmp-step_00000040", "step_00000020"]
    assert os.listdir(output / "checkpoints" / ".tmp-step_00000040" / "model")  # it died half-way
    assert_ok(run_script(STEP1_DIR, args + ["--resume"]))
    assert_ok(run_script(STEP1_DIR, sft_args(tmp_path, tmp_path / "full", "--num_train_epochs", "1")))
    assert_same_weights(tmp_path / "full", output)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    output = tmp_path / "stopped"
    args = sft_args(tmp_path, output, "--print_loss", "--num_train_epochs", "1")
    code, log = run_until_checkpoint(STEP1_DIR, args, kill=signal.SIGTERM, after="step 3 loss")
    assert code == 128 + signal.SIGTERM, log[-2000:]
    assert "stopped by SIGTERM" in log and "--resume" in log
    step = checkpoint_steps(output)[-1]
    assert 3 <= step < 50 and not (output / "config.json").exists()
    assert_ok(run_script(STEP1_DIR, args + ["--resume"]))
    assert_ok(run_script(STEP1_DIR, sft_args(tmp_path, tmp_path / "full", "--print_loss", "--num_train_epochs", "1")))
    assert_same_weights(tmp_path / "full", output)


def test_sigterm_to_one_rank_saves_on_both_ranks(tmp_path):
    """The deepspeed launcher passes SIGTERM on to its ranks one at a time; here only rank 1 gets it. Rank 0
    learns of it through the step-boundary all-reduce, so both ranks write their ZeRO shards before exiting."""
    import psutil

    output = tmp_path / "stopped"
    args = pair_args(tmp_path, output, "--zero_stage", "2", "--print_loss", "--num_train_epochs", "3",
                     "--gradient_accumulation_steps", "1")
    launcher = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *args],
                                cwd=STEP2_DIR, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    log = []
    for line in launcher.stdout:
        log.append(line)
        if "[rank 1] epoch 1 step 2 loss" in line:
            (rank_1,) = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                         if "--local_rank=1" in p.cmdline()]
            rank_1.send_signal(signal.SIGTERM)
            break
    log.append(launcher.stdout.read())
    launcher.wait(timeout=300)
    log = "".join(log)
    assert "[rank 1] SIGTERM: saving a checkpoint" in log and "stopped by SIGTERM" in log, log[-3000:]
    assert "[rank 0] SIGTERM" not in log and "epoch 3/3" not in log
    (checkpoint,) = [output / "checkpoints" / f"step_{s:08d}" for s in checkpoint_steps(output)]
    shards = sorted(p.name for p in (checkpoint / "model").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2 and (checkpoint / "rank_1.pt").exists()
    resumed = run_script(STEP2_DIR, args + ["--resume"], num_ranks=2)
    assert_ok(resumed)
    assert (output / "reward_model.json").exists() and f"resumed from {checkpoint}" in resumed.stdout


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    # A learning rate of 1e6 blows the weights up within a few steps: a real divergence, no test double.
    output = tmp_path / "diverged"
    result = run_script(STEP1_DIR, sft_args(tmp_path, output, "--learning_rate", "1e6", "--num_warmup_steps", "0",
                                            "--save_interval", "1", "--save_total_limit", "0"))
    assert result.returncode == 3, result.stdout[-2000:]  # training diverged: not bad input (2), not a crash (1)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: non-finite loss at epoch 1, optimizer step "), error
    step = int(error.split("optimizer step ")[1].split(":")[0])
    assert f"the last good checkpoint is {output / 'checkpoints'}/step_{step - 1:08d}" in error
    assert checkpoint_steps(output) == list(range(1, step))  # nothing saved at or after the bad step
    assert not (output / "config.json").exists()
    last_good = torch.load(output / "checkpoints" / f"step_{step - 1:08d}" / "model" / "mp_rank_00_model_states.pt",
                           weights_only=False)["module"]
    assert all(torch.isfinite(t).all() for t in last_good.values())


# ---------------------------------------------------------------- what resume refuses

def test_resume_refuses_a_different_topology_or_data_order_before_training(tmp_path):
    output = tmp_path / "run"
    code, _ = run_until_checkpoint(STEP1_DIR, sft_args(tmp_path, output, "--save_interval", "10"))
    assert code == -signal.SIGKILL
    cases = [(["--per_device_train_batch_size", "4"], "--per_device_train_batch_size 8 -> 4"),
             (["--zero_stage", "2"], "--zero_stage 0 -> 2")]
    for extra, phrase in cases:
        result = run_script(STEP1_DIR, sft_args(tmp_path, output, "--resume", *extra))
        assert result.returncode == 2 and phrase in result.stderr.strip().splitlines()[-1], result.stderr[-1500:]
    two_ranks = run_script(STEP1_DIR, sft_args(tmp_path, output, "--resume"), num_ranks=2)
    assert two_ranks.returncode != 0
    assert "was written by 1 ranks, this run has 2" in two_ranks.stderr + two_ranks.stdout
    assert "epoch 1/2" not in two_ranks.stdout  # refused before any training

    # A checkpoint file that carries code instead of weights: DeepSpeed's loader is made weights-only.
    checkpoint = output / "checkpoints" / f"step_{checkpoint_steps(output)[-1]:08d}"
    torch.save({"module": PlantedCode(str(tmp_path / "planted"))}, checkpoint / "model" / "mp_rank_00_model_states.pt")
    planted = run_script(STEP1_DIR, sft_args(tmp_path, output, "--resume"))
    assert planted.returncode == 2 and not (tmp_path / "planted").exists()
    assert "holds a pickled object that is not weights" in planted.stderr.strip().splitlines()[-1]


class PlantedCode:
    """Unpickling it runs os.mkdir(path)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_output_dir_with_checkpoints_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    output = tmp_path / "run"
    no_checkpoint = run_script(STEP1_DIR, sft_args(tmp_path, output, "--resume"))
    assert no_checkpoint.returncode == 2 and "--resume: no checkpoint in" in no_checkpoint.stderr
    assert not output.exists()
    code, _ = run_until_checkpoint(STEP1_DIR, sft_args(tmp_path, output, "--save_interval", "10"))
    assert code == -signal.SIGKILL
    again = run_script(STEP1_DIR, sft_args(tmp_path, output))
    assert again.returncode == 2 and "holds checkpoints of an earlier run" in again.stderr
    assert "add --resume" in again.stderr


# ---------------------------------------------------------------- pieces, in process

@pytest.mark.parametrize("stage", [0, 3])
def test_module_shards_restore_the_exact_weights(tmp_path, distributed, tokenizer, stage):
    """Step 3 saves its EMA model as this rank's share: the ZeRO-3 partitions (ds_tensor) or the whole
    parameters. Restoring the share brings back every parameter exactly."""
    from safetensors.torch import save_file

    from training.utils.checkpoint import module_shard, restore_module_shard
    from training.utils.ds_config import get_eval_ds_config
    from training.utils.engine import initialize_frozen_engine
    from training.utils.model.build import create_hf_model

    config = get_eval_ds_config(offload=False, dtype="fp32", stage=stage, micro_batch_size=1, train_batch_size=1)
    engine = initialize_frozen_engine(create_hf_model("tiny/opt", tokenizer, ds_config=config), config)
    shard = module_shard(engine.module)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters()) == (stage == 3)
    save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp_path / "ema_rank_0.safetensors"))
    saved = {k: v.clone() for k, v in shard.items()}
    with torch.no_grad():
        for p in engine.module.parameters():
            (p.ds_tensor if stage == 3 else p).add_(1.0)
    restore_module_shard(engine.module, str(tmp_path), "ema")
    assert all(torch.equal(module_shard(engine.module)[k], saved[k]) for k in saved)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from training.utils.seeding import get_rng_state, set_rng_state

    torch.save({"rng": get_rng_state()}, tmp_path / "rank_0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rank_0.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_endless_batches_and_samplers_continue_from_a_position():
    """PPO-ptx text batches resume at the batch count saved (across a pass boundary), and a resumed sampler
    skips exactly the batches already trained in its epoch."""
    from training.utils.data.pipeline import make_loader
    from training.utils.rlhf.experience import EndlessBatches

    data = [{"x": i} for i in range(10)]
    collate = lambda rows: torch.tensor([row["x"] for row in rows])  # noqa: E731
    uninterrupted = EndlessBatches(make_loader(data, 3, collate, seed=5, shuffle=True))
    drawn = [next(uninterrupted).tolist() for _ in range(7)]  # 4 batches a pass: crosses into the second
    resumed = EndlessBatches(make_loader(data, 3, collate, seed=5, shuffle=True), start=uninterrupted.drawn - 4)
    assert [next(resumed).tolist() for _ in range(4)] == drawn[3:]

    loader = make_loader(data, 3, collate, seed=5, shuffle=True)
    loader.sampler.set_epoch(1)
    loader.sampler.skip_batches(2, 3)
    rest = [b.tolist() for b in loader]
    assert len(rest) == 2 and rest[0] == drawn[6]  # epoch 1 from its third batch on
    assert [b.tolist() for b in loader][2] == drawn[6]  # the skip applies to one pass only
