"""e2e as a DeepSpeed-Chat user runs it (issue 19): the ZeRO stage every step gets per deployment and model size,
DeepSpeed-Chat's output folder names, and `--step 3` over an output tree DeepSpeed-Chat wrote."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env

from applications import e2e_layout, e2e_rlhf

LLAMA2_7B, LLAMA2_70B = "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf"
# The stages each step gets with --actor-zero-stage / --reward-zero-stage left empty, as (step 1, step 2,
# step 3 actor, step 3 critic); the reward model is DeepSpeed-Chat's 350m throughout. "ds": the values of
# DeepSpeed-Chat's own scripts (training_scripts/opt/<deployment>/run_<size>.sh, and llama2/run_llama2_7b.sh;
# 30b: its run_30b_lora.sh). "rule": DeepSpeed-Chat has no script for that pair (its e2e stops there); e2e builds
# the command at the stage DeepSpeed-Chat's scripts give that size (e2e_layout.default_zero_stage).
# single_gpu 6.7b: DeepSpeed-Chat's only script is run_6.7b_lora.sh (LoRA at ZeRO 0), so e2e builds a full
# fine-tuning command, at the size's stage 3.
ZERO_DEFAULTS = {
    ("single_gpu", "1.3b"): (0, 0, 0, 0),  # ds
    ("single_gpu", "6.7b"): (3, 0, 3, 3),  # rule (see above)
    ("single_gpu", "13b"): (3, 0, 3, 3),  # rule
    ("single_gpu", "30b"): (3, 0, 3, 3),  # rule
    ("single_gpu", "66b"): (3, 0, 3, 3),  # rule
    ("single_gpu", LLAMA2_7B): (3, 0, 3, 3),  # rule
    ("single_node", "1.3b"): (2, 0, 2, 2),  # ds
    ("single_node", "6.7b"): (3, 0, 3, 3),  # ds
    ("single_node", "13b"): (3, 0, 3, 3),  # ds
    ("single_node", "30b"): (3, 0, 3, 3),  # ds (run_30b_lora.sh)
    ("single_node", "66b"): (3, 0, 3, 3),  # rule
    ("single_node", LLAMA2_7B): (3, 0, 3, 3),  # ds (llama2/run_llama2_7b.sh)
    ("multi_node", "1.3b"): (2, 0, 2, 2),  # rule
    ("multi_node", "6.7b"): (3, 0, 3, 3),  # rule
    ("multi_node", "13b"): (3, 0, 3, 3),  # rule
    ("multi_node", "30b"): (3, 0, 3, 3),  # rule
    ("multi_node", "66b"): (3, 0, 3, 3),  # ds
    ("multi_node", LLAMA2_70B): (3, 0, 3, 3),  # rule
}
ZERO_FLAGS = ("--zero_stage", "--actor_zero_stage", "--critic_zero_stage")


@pytest.fixture(scope="module")
def launcher_stub(tmp_path_factory):
    """A `deepspeed` first on PATH that records its arguments, one per line, instead of launching anything."""
    bin_dir = tmp_path_factory.mktemp("launcher_stub")
    stub = bin_dir / "deepspeed"
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$LAUNCH_RECORD"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def launched_zero_stages(step, launcher_stub, workdir) -> list[int]:
    """Run the step's command (its script, or the command e2e built) with the launcher stub: the ZeRO stages that
    reach main.py, in the order of ZERO_FLAGS."""
    record = workdir / f"{step.key}.args"
    result = subprocess.run(step.command, cwd=REPO / "training" / step.folder, capture_output=True, text=True,
                            timeout=60, env=clean_env(**step.env, LAUNCH_RECORD=str(record),
                                                      PATH=f"{launcher_stub}{os.pathsep}{os.environ['PATH']}"))
    assert result.returncode == 0, f"{step.command}\n{result.stdout}\n{result.stderr}"
    argv = record.read_text().splitlines()
    return [int(argv[argv.index(flag) + 1]) for flag in ZERO_FLAGS if flag in argv]


@pytest.mark.parametrize("deployment, actor", list(ZERO_DEFAULTS), ids=lambda v: str(v).replace("/", "_"))
def test_empty_zero_stages_give_each_step_deepspeed_chats_stage(deployment, actor, tmp_path, launcher_stub,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("HOSTFILE", str(tmp_path / "hostfile"))  # a stand-in: multi_node checks that it exists
    (tmp_path / "hostfile").write_text("worker-0 slots=8\nworker-1 slots=8\n")
    flags = ["--deployment-type", deployment, "--actor-model", actor, "--reward-model", "350m",
             "--output-dir", str(tmp_path / "out")]
    e2e_rlhf.main(flags + ["--dry-run"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== ")]
    assert [line.split(":")[0] for line in printed] == ["=== step1", "=== step2", "=== step3"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    step1, step2, step3 = e2e_rlhf.build_steps(e2e_rlhf.parse_args(flags))
    if deployment == "multi_node":
        assert step1.env["HOSTFILE"] == str(tmp_path / "hostfile")  # the scripts' default is another file
    stages = [launched_zero_stages(step, launcher_stub, tmp_path) for step in (step1, step2, step3)]
    want = ZERO_DEFAULTS[deployment, actor]
    assert stages == [[want[0]], [want[1]], [want[2], want[3]]]


def test_an_explicit_stage_wins_over_the_default(tmp_path, launcher_stub):
    args = e2e_rlhf.parse_args(["--deployment-type", "single_node", "--actor-model", "66b", "--output-dir",
                                str(tmp_path / "out"), "--actor-zero-stage", "2", "--reward-zero-stage", "1"])
    step1, step2, step3 = e2e_rlhf.build_steps(args)
    assert [launched_zero_stages(s, launcher_stub, tmp_path) for s in (step1, step2, step3)] == [[2], [1], [2, 1]]


def test_folder_names_are_deepspeed_chats():
    assert [e2e_layout.folder_name(m) for m in ("facebook/opt-1.3b", "facebook/opt-350m", "1.3b",
                                                "/assets/models/facebook/opt-66b", "tiny/opt", LLAMA2_7B)] == \
        ["1.3b", "350m", "1.3b", "66b", "opt", "Llama-2-7b-hf"]
    assert [e2e_layout.model_size_billions(m) for m in ("facebook/opt-350m", LLAMA2_70B, "tiny/opt", "gpt2")] == \
        [0.35, 70, None, None]


def test_an_earlier_tree_with_opt_size_folders_is_still_found(tmp_path, capsys):
    out = tmp_path / "out"
    for folder in ("actor-models/opt-1.3b", "reward-models/opt-350m"):
        (out / folder).mkdir(parents=True)
        (out / folder / "model.safetensors").write_bytes(b"")  # this project's format: nothing to convert
    args = e2e_rlhf.parse_args(["--deployment-type", "single_gpu", "--step", "3", "--output-dir", str(out)])
    (step3,) = e2e_rlhf.build_steps(args)
    assert step3.command[2:4] == [str(out / "actor-models/opt-1.3b"), str(out / "reward-models/opt-350m")]
    assert step3.model_dir == out / "step3-models" / "1.3b"
    # a new run next to them writes DeepSpeed-Chat's names
    (step1, _, _) = e2e_rlhf.build_steps(e2e_rlhf.parse_args(["--deployment-type", "single_gpu", "--actor-model",
                                                              "6.7b", "--output-dir", str(out)]))
    assert step1.model_dir == out / "actor-models" / "6.7b"


# ---------------------------------------------------------------- an output tree DeepSpeed-Chat wrote

def save_like_deepspeed_chat(state: dict, config, tokenizer, directory) -> None:
    """What DeepSpeed-Chat's save_hf_format leaves: config.json (transformers 4 recorded the base model in
    `_name_or_path`), a torch.save'd state dict as pytorch_model.bin, and the tokenizer's files."""
    directory.mkdir(parents=True)
    config.to_json_file(str(directory / "config.json"))
    saved = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**saved, "_name_or_path": "tiny/opt"}))
    torch.save(state, directory / "pytorch_model.bin")
    tokenizer.save_pretrained(str(directory))


@pytest.fixture
def dschat_tree(tmp_path, tokenizer):
    """<tree>/actor-models/1.3b and <tree>/reward-models/350m as DeepSpeed-Chat's e2e leaves them, from tiny OPTs."""
    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model

    torch.manual_seed(0)
    tree = tmp_path / "dschat_output"
    actor = create_hf_model("tiny/opt", tokenizer)
    save_like_deepspeed_chat(actor.state_dict(), actor.config, tokenizer, tree / "actor-models" / "1.3b")
    reward = create_reward_model("tiny/opt", tokenizer)
    state = {("rwtranrsformer." + k.removeprefix("backbone.") if k.startswith("backbone.") else k): v
             for k, v in reward.state_dict().items()}  # DeepSpeed-Chat's RewardModel attribute names
    save_like_deepspeed_chat(state, reward.config, tokenizer, tree / "reward-models" / "350m")
    return tree


def tree_files(tree) -> dict:
    return {str(p.relative_to(tree)): p.stat().st_mtime_ns for p in sorted(tree.rglob("*")) if p.is_file()}


def test_a_dry_run_over_a_deepspeed_chat_tree_plans_the_conversions_and_writes_nothing(dschat_tree, capsys):
    before = tree_files(dschat_tree)
    e2e_rlhf.main(["--deployment-type", "single_gpu", "--step", "3", "--output-dir", str(dschat_tree), "--dry-run"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("=== ")]
    actor, critic = dschat_tree / "actor-models" / "1.3b", dschat_tree / "reward-models" / "350m"
    assert lines[0] == (f"=== convert: python applications/convert_dschat.py --input {actor} --output "
                        f"{actor}-safetensors --tokenizer tiny/opt")  # the base model DeepSpeed-Chat recorded
    assert lines[1].startswith(f"=== convert: python applications/convert_dschat.py --input {critic} ")
    assert "opt/single_gpu/run_1.3b.sh" in lines[2]
    assert f" {actor}-safetensors {critic}-safetensors '' '' {dschat_tree / 'step3-models' / '1.3b'}" in lines[2]
    assert tree_files(dschat_tree) == before


def test_a_deepspeed_chat_model_that_does_not_convert_is_one_error_line(dschat_tree, capsys):
    (dschat_tree / "actor-models" / "1.3b" / "pytorch_model.bin").write_bytes(b"junk")  # cut short
    with pytest.raises(SystemExit) as exit_:
        e2e_rlhf.main(["--deployment-type", "cpu", "--actor-model", "1.3b", "--reward-model", "350m", "--step", "3",
                       "--output-dir", str(dschat_tree)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    actor = dschat_tree / "actor-models" / "1.3b"
    assert error.startswith(f"error: converting the DeepSpeed-Chat model '{actor}' (`python applications/"
                            f"convert_dschat.py --input {actor} --output {actor}-safetensors --tokenizer tiny/opt`) "
                            f"failed: '{actor / 'pytorch_model.bin'}' holds more than tensors or is damaged")
    assert not (dschat_tree / "actor-models" / "1.3b-safetensors").exists()  # nothing half-written
    assert not (dschat_tree / "step3-models").exists()


@pytest.mark.slow  # (~1-2 min: the conversions, then a real step 3 of two PPO steps on CPU)
def test_step_3_runs_over_a_deepspeed_chat_output_tree(dschat_tree):
    """DeepSpeed-Chat's `python e2e_rlhf.py --step 3 --actor-model 1.3b --reward-model 350m` over its own outputs,
    here on the CPU deployment with tiny models and a few PPO steps."""
    actor, critic = dschat_tree / "actor-models" / "1.3b", dschat_tree / "reward-models" / "350m"
    before = {folder: tree_files(folder) for folder in (actor, critic)}
    short = ("--test_stop_step 2 --eval_interval 2 --eval_prompts 8 --per_device_generation_batch_size 4 "
             "--per_device_training_batch_size 4 --print_answers_interval 2")
    result = subprocess.run([sys.executable, str(REPO / "applications" / "e2e_rlhf.py"), "--deployment-type", "cpu",
                             "--actor-model", "1.3b", "--reward-model", "350m", "--step", "3", "--output-dir",
                             str(dschat_tree), "--data-path", "synthetic/copy:size=200,eval_size=20",
                             "--check-prompts", "0"],
                            cwd=REPO, env=clean_env(EXTRA_ARGS=short, OMP_NUM_THREADS="2"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("=== convert: ") == 2
    final = dschat_tree / "step3-models" / "1.3b" / "actor"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)  # plain Hugging Face
    assert f"final actor: {final}" in result.stdout
    assert {folder: tree_files(folder) for folder in (actor, critic)} == before  # DeepSpeed-Chat's left as they were
    # the conversions are reused by the next run
    args = e2e_rlhf.parse_args(["--deployment-type", "cpu", "--actor-model", "1.3b", "--reward-model", "350m",
                                "--step", "3", "--output-dir", str(dschat_tree)])
    (step3,) = e2e_rlhf.build_steps(args)
    assert step3.conversions == [] and step3.command[2:4] == [f"{actor}-safetensors", f"{critic}-safetensors"]
