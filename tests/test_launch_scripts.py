"""The launch matrix: every training and evaluation script of every step is valid bash, and the flags it
hands to its step's Python program parse with that program's own parser.

Each script runs for real under bash, in a temporary directory, with `deepspeed` and `python` replaced by a
test double of the launcher (a stub first on PATH that records its argv and exits 0). The recorded launcher
flags go through DeepSpeed's own launcher parser, the program's flags through the program's parse_args.
Scripts are found by glob, so a new script of any step is covered without editing this file.
"""
import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env

TRAINING_SCRIPTS = sorted(REPO.glob("training/*/training_scripts/**/run_*.sh"))
EVALUATION_SCRIPTS = sorted(REPO.glob("training/*/evaluation_scripts/*.sh"))
RECORDER = "import json, os, sys; open(os.environ['LAUNCH_RECORD'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')"


def script_id(path: Path) -> str:
    return str(path.relative_to(REPO / "training"))


def positional_args_with_zero3(script: Path, output: str) -> list[str]:
    """DeepSpeed-Chat's positional arguments: steps 1-2 take OUTPUT ZERO_STAGE; step 3 takes
    ACTOR_PATH CRITIC_PATH ACTOR_ZERO_STAGE CRITIC_ZERO_STAGE OUTPUT."""
    if step_dir(script).name.startswith("step3"):
        return ["actor_dir", "critic_dir", "3", "3", output]
    return [output, "3"]


def step_dir(script: Path) -> Path:
    return next(parent for parent in script.parents if parent.parent == REPO / "training")


def required_positionals(script: Path) -> list[str]:
    """Placeholders for the `${N:?message}` arguments a script insists on."""
    numbers = [int(n) for n in re.findall(r"\$\{(\d+):\?", script.read_text(encoding="utf-8"))]
    return [f"arg{n}" for n in range(1, max(numbers, default=0) + 1)]


@pytest.fixture(scope="module")
def launcher_double(tmp_path_factory) -> Path:
    """A directory whose `deepspeed` and `python` record their arguments instead of running anything."""
    bin_dir = tmp_path_factory.mktemp("launcher_double")
    for tool in ("deepspeed", "python", "python3"):
        stub = bin_dir / tool
        stub.write_text(f"#!/bin/sh\nexec '{sys.executable}' -c \"{RECORDER}\" {tool} \"$@\"\n")
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def launch(script: Path, args: list[str], launcher_double: Path, workdir: Path, **env) -> list[list[str]]:
    """Run `script` under bash with the launcher double; every recorded command line, in order."""
    record = workdir / "launches.jsonl"
    result = subprocess.run(["bash", str(script), *args], cwd=workdir, capture_output=True, text=True, timeout=60,
                            env=clean_env(PATH=f"{launcher_double}{os.pathsep}{os.environ['PATH']}",
                                          LAUNCH_RECORD=str(record), **env))
    assert result.returncode == 0, f"{script_id(script)} {args} failed:\n{result.stdout}\n{result.stderr}"
    assert record.exists(), f"{script_id(script)} launched nothing"
    return [json.loads(line) for line in record.read_text().splitlines()]


def program_args(script: Path, command: list[str]):
    """(launcher flags parsed by DeepSpeed's launcher or None for python, program flags parsed by the program)."""
    from deepspeed.launcher.runner import parse_args as parse_launcher_args

    tool, rest = command[0], command[1:]
    if tool == "deepspeed":
        launcher = parse_launcher_args(rest)
        program, flags = launcher.user_script, launcher.user_args
    else:
        launcher, program, flags = None, rest[0], rest[1:]
    module = importlib.import_module(f"training.{step_dir(script).name}.{Path(program).stem}")
    try:
        return launcher, module.parse_args(flags)
    except SystemExit as exit_:
        pytest.fail(f"{script_id(script)}: {program} rejects its flags (exit {exit_.code}): {flags}")


def zero_stages(config) -> set[int]:
    from training.utils.config import flag_values

    flags = flag_values(config)
    return {flags[name] for name in ("zero_stage", "actor_zero_stage", "critic_zero_stage") if name in flags}


def test_the_matrix_is_found():
    steps = {step_dir(s).name for s in TRAINING_SCRIPTS}
    assert {"step1_supervised_finetuning", "step2_reward_model_finetuning"} <= steps
    assert any("multi_node" in s.parts for s in TRAINING_SCRIPTS)


@pytest.mark.parametrize("script", TRAINING_SCRIPTS + EVALUATION_SCRIPTS, ids=script_id)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", TRAINING_SCRIPTS, ids=script_id)
def test_training_script_flags_parse(script, launcher_double, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    env = {"HOSTFILE": str(hostfile)}
    # defaults: no positional arguments
    workdir = tmp_path / "defaults"
    workdir.mkdir()
    (default_run,) = launch(script, [], launcher_double, workdir, **env)
    launcher, args = program_args(script, default_run)
    assert default_run[0] == "deepspeed", "training scripts start through the deepspeed launcher"
    assert args.output_dir and (workdir / args.output_dir / "training.log").exists()
    if "multi_node" in script.parts:
        assert launcher.hostfile == str(hostfile), "multi_node scripts launch `deepspeed --hostfile $HOSTFILE`"
    if "single_gpu" in script.parts:
        assert launcher.num_gpus == 1

    # positional arguments: the output directory and ZeRO stage 3 reach the program's flags; a multi_node
    # script also passes $DS_LAUNCHER_FLAGS on, as a Kubernetes or Slurm job uses it (docs/launching.md)
    workdir = tmp_path / "zero3"
    workdir.mkdir()
    env["DS_LAUNCHER_FLAGS"] = "--no_ssh --node_rank 1 --master_addr 10.1.2.3 --master_port 29512"
    (zero3_run,) = launch(script, positional_args_with_zero3(script, "out_zero3"), launcher_double, workdir, **env)
    launcher, args = program_args(script, zero3_run)
    assert zero_stages(args) == {3}
    if "multi_node" in script.parts:
        assert (launcher.no_ssh, launcher.node_rank, launcher.master_addr, launcher.master_port) == \
            (True, 1, "10.1.2.3", 29512)
    assert Path(args.output_dir) == Path("out_zero3") and (workdir / "out_zero3" / "training.log").exists()


@pytest.mark.parametrize("script", [s for s in TRAINING_SCRIPTS if "multi_node" in s.parts], ids=script_id)
def test_multi_node_script_refuses_a_missing_hostfile(script, launcher_double, tmp_path):
    # deepspeed itself would quietly train on the local GPUs only
    missing = tmp_path / "no_such_hostfile"
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=clean_env(PATH=f"{launcher_double}{os.pathsep}{os.environ['PATH']}",
                                          LAUNCH_RECORD=str(tmp_path / "launches.jsonl"), HOSTFILE=str(missing)))
    assert result.returncode == 2 and str(missing) in result.stderr
    assert not (tmp_path / "launches.jsonl").exists()


@pytest.mark.parametrize("script", EVALUATION_SCRIPTS, ids=script_id)
def test_evaluation_script_flags_parse(script, launcher_double, tmp_path):
    placeholders = required_positionals(script)
    (run,) = launch(script, placeholders, launcher_double, tmp_path)
    _, args = program_args(script, run)
    from training.utils.config import flag_values

    passed = {value for value in flag_values(args).values() if isinstance(value, str)}
    assert set(placeholders) <= passed  # every positional argument reached a flag
