"""applications/e2e_rlhf.py: the step plan it builds, a quick CPU run of all three steps, and a failing step."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import LAUNCHER_VARS, REPO

from applications import e2e_rlhf


def run_e2e(*args, timeout=1200):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(REPO / "applications" / "e2e_rlhf.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_plan_uses_the_matching_script_or_builds_the_command(tmp_path):
    args = e2e_rlhf.parse_args(["--deployment-type", "single_gpu", "--actor-model", "1.3b", "--reward-model",
                                "350m", "--output-dir", str(tmp_path)])
    step1, step2, step3 = e2e_rlhf.build_steps(args)
    assert step1.command[:2] == ["bash", str(REPO / "training/step1_supervised_finetuning/training_scripts/opt/"
                                              "single_gpu/run_1.3b.sh")]
    assert step1.model_dir == tmp_path.resolve() / "actor-models" / "1.3b"  # DeepSpeed-Chat's folder name
    assert step2.command[1].endswith("step2_reward_model_finetuning/training_scripts/opt/single_gpu/run_350m.sh")
    assert step3.command[2:4] == [str(step1.model_dir), str(step2.model_dir)]  # $1 actor, $2 critic
    # a local model has no script of its own: the command is built from the step's defaults
    args = e2e_rlhf.parse_args(["--deployment-type", "single_node", "--actor-model", "/models/my-llama",
                                "--output-dir", str(tmp_path), "--step", "1"])
    (step1,) = e2e_rlhf.build_steps(args)
    assert step1.command[:2] == ["deepspeed", "main.py"]
    assert step1.command[step1.command.index("--model_name_or_path") + 1] == "/models/my-llama"
    args = e2e_rlhf.parse_args(["--algo", "dpo", "--output-dir", str(tmp_path), "--deployment-type", "cpu"])
    assert [s.key for s in e2e_rlhf.build_steps(args)] == ["step1", "dpo"]


def test_dpo_has_no_step_3(capsys):
    with pytest.raises(SystemExit):
        e2e_rlhf.main(["--algo", "dpo", "--step", "3"])
    assert "DPO replaces steps 2-3" in capsys.readouterr().err


def test_quick_cpu_run_of_all_three_steps(tmp_path):
    out = tmp_path / "out"
    result = run_e2e("--deployment-type", "cpu", "--quick", "--output-dir", str(out), "--check-prompts", "20")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    actor, reward, final = (out / "actor-models" / "opt", out / "reward-models" / "opt",
                            out / "step3-models" / "opt" / "actor")
    from transformers import AutoModelForCausalLM

    sft_model = AutoModelForCausalLM.from_pretrained(actor)
    final_model = AutoModelForCausalLM.from_pretrained(final)
    assert any(not torch.equal(a, b) for a, b in zip(sft_model.parameters(), final_model.parameters()))
    assert json.loads((reward / "reward_model.json").read_text())["reward_stats"]["accuracy"] > 0.5
    for step in ("step1", "step2", "step3"):
        log = (out / step / "training.log").read_text()
        assert log and log in result.stdout  # streamed to the terminal and kept in the step's log
        assert f"| {step} |" in result.stdout
    assert "held-out checker accuracy (20 prompts, greedy): step-1 actor" in result.stdout
    assert f"final actor: {final}" in result.stdout


def test_a_failing_step_stops_the_pipeline_with_its_error(tmp_path):
    out = tmp_path / "out"
    result = run_e2e("--deployment-type", "cpu", "--quick", "--output-dir", str(out),
                     "--actor-model", str(tmp_path / "no-such-model"), timeout=300)
    assert result.returncode != 0
    assert "step1 failed" in result.stderr and "the step said: error:" in result.stderr
    assert not (out / "reward-models").exists() and not (out / "step2").exists()


def script_default(script: str, variable: str) -> str:
    """The value a script gives `variable` when its positional argument is empty (`NAME=${N:-default}`)."""
    import re

    return re.search(rf"^{variable}=\$\{{\d:-(\w*)\}}", open(script).read(), flags=re.MULTILINE).group(1)


def test_empty_zero_stages_leave_the_scripts_defaults_and_a_dry_run_only_prints(tmp_path, capsys):
    """DeepSpeed-Chat's e2e passes an empty stage on, so each script's own default applies: OPT-13B's step 3 runs
    at ZeRO 3 (with its --inference_tp_size 2) instead of 0. --dry-run prints the plan and writes nothing."""
    out = tmp_path / "out"
    e2e_rlhf.main(["--deployment-type", "single_node", "--actor-model", "13b", "--output-dir", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    step3 = next(line for line in printed.splitlines() if line.startswith("=== step3: "))
    assert "training_scripts/opt/single_node/run_13b.sh" in step3 and "'' ''" in step3  # $3 $4 left empty
    script = str(REPO / "training/step3_rlhf_finetuning/training_scripts/opt/single_node/run_13b.sh")
    assert script_default(script, "ACTOR_ZERO_STAGE") == script_default(script, "CRITIC_ZERO_STAGE") == "3"
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("===")] == \
        ["=== step1", "=== step2", "=== step3"]
    assert not out.exists()
    args = e2e_rlhf.parse_args(["--deployment-type", "single_node", "--actor-model", "13b", "--output-dir", str(out),
                                "--actor-zero-stage", "2"])
    assert e2e_rlhf.build_steps(args)[-1].command[4] == "2"  # an explicit stage still wins (step 3: $3)
