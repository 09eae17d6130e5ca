"""Run the whole pipeline (step 1 SFT -> step 2 reward model -> step 3 PPO, or SFT -> DPO) with one command.

    python applications/e2e_rlhf.py                                  # CPU: tiny default on synthetic data
    python applications/e2e_rlhf.py --deployment-type single_gpu --actor-model 1.3b --reward-model 350m
    python applications/e2e_rlhf.py --step 2 3 --output-dir ./output  # resume the pipeline after step 1
    python applications/e2e_rlhf.py --algo dpo                        # SFT, then DPO instead of steps 2-3
    python applications/e2e_rlhf.py --algo grpo                       # SFT, then critic-free step 3 (rule reward)

Outputs (as DeepSpeed-Chat): <output>/actor-models/<name>, <output>/reward-models/<name>,
<output>/step3-models/<name> (actor/, critic/; a critic-free --algo skips step 2 and saves only actor/ in
step3-models/<name>-<algo>),
<output>/dpo-models/<name>. <name> is DeepSpeed-Chat's: the OPT size (1.3b, 350m), the name after tiny/ (opt),
else the model's last path component (applications/e2e_layout.py). A step-1/2 output DeepSpeed-Chat saved
(pytorch_model.bin) is converted into <name>-safetensors before a later step reads it. Each step's full log is
streamed to the terminal and written to <output>/step<N>/training.log (DPO: <output>/dpo/training.log).

How a step is launched: with `--deployment-type cpu` the step's `training_scripts/cpu/run_tiny.sh`;
otherwise the per-topology script `training_scripts/<family>/<deployment>/run_<size>.sh` when one exists
for exactly that model (e.g. facebook/opt-1.3b on single_gpu), else a `deepspeed ... main.py` command
built from the step's own defaults with the model, ZeRO stage (by default DeepSpeed-Chat's for the model's size)
and output directory filled in.

Exit codes: 0 done; 2 bad input (e2e's own flags, or a step that exited 2); 3 a step diverged; 1 a step
crashed; 128 + N stopped by signal N. On Ctrl-C the running step saves a checkpoint and e2e exits 130 with one
line naming the step; the same command plus `--step <that step and the rest> --resume` continues from there.
"""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from applications import e2e_layout as layout
from training.utils import distributed
from training.utils.checkpoint import CHECKPOINTS
from training.utils.config import at_least
from training.utils.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, UserInputError, report_user_errors
from training.utils.losses import ADVANTAGE_ESTIMATORS

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("cpu", "single_gpu", "single_node", "multi_node")
DEFAULT_DATA = "synthetic/copy"
QUICK_DATA = "synthetic/copy:size=1500,eval_size=200"
# Short overrides per step for --quick (a smoke run of the pipeline, not a quality run).
QUICK_ARGS = {
    "step1": "--num_train_epochs 1",
    "step2": "--num_train_epochs 1 --eval_interval 0 --eval_iters 0",
    "dpo": "--num_train_epochs 1",
    "step3": "--test_stop_step 4 --eval_interval 2 --eval_prompts 32 --per_device_generation_batch_size 8 "
             "--per_device_training_batch_size 8 --print_answers_interval 2",
}
FAILURE_HINTS = [
    (r"out of memory|OutOfMemoryError", "GPU memory: lower the per-device batch size, raise "
                                        "--gradient_accumulation_steps, add --offload or use ZeRO stage 3"),
    (r"Killed|exit code -9|returncode=-9", "host memory: lower the batch size or the number of ranks"),
    (r"fp16 is not supported|Type fp16", "fp16 needs a GPU: use --dtype fp32 (or bf16) on CPU"),
    (r"Address already in use", "another run holds the port: set MASTER_PORT to a free port"),
    (r"offline|Cannot reach|couldn't connect|LocalEntryNotFoundError", "no network: pass a local model "
                                                                       "directory or dataset file"),
]
# Only for multi_node: every single-machine DeepSpeed launch logs "Unable to find hostfile" and carries on.
MULTI_NODE_HINTS = [
    (r"hostfile.*(not found|does not exist|no such file|invalid|unable to|error)|ssh|pdsh|Permission denied "
     r"\(publickey", "multi_node needs a hostfile naming reachable nodes: set HOSTFILE (see docs/launching.md)"),
]
EXIT_CRASH = 1
# Critic-free step 3 (--algo grpo, rloo, ...): no step 2; each prompt answered 4 times, so a step's 8 prompts give
# the 32 answers of the PPO default's 32 prompts.
CRITIC_FREE_ALGOS = tuple(e for e in ADVANTAGE_ESTIMATORS if e != "gae")
CRITIC_FREE_ARGS = "--advantage_estimator {algo} --n_samples_per_prompt 4 --reward_function {reward} " \
                   "--per_device_generation_batch_size 8"
QUICK_CRITIC_FREE_ARGS = "--per_device_generation_batch_size 2"
ZERO_STAGES = ("", "0", "1", "2", "3")
# What a step's own exit code says (training/utils/errors.py), and what to do about it. Other codes are
# crashes (1, with a traceback in the log) or signals (128 + N).
EXIT_MEANINGS = {
    EXIT_BAD_INPUT: ("bad input", "fix the flag, file, dataset or model directory the error line names"),
    EXIT_DIVERGED: ("training diverged", "a loss became NaN or infinite: continue from the last good checkpoint "
                                         "with --resume and a lower --learning_rate"),
}


@dataclass
class Step:
    key: str  # step1 | step2 | dpo | step3
    folder: str  # training/<folder>
    command: list[str]
    model_dir: Path
    env: dict = field(default_factory=dict)
    seconds: float = 0.0
    figures: str = ""
    resume: bool = False  # continues from its checkpoints: its log is appended to, not started anew
    conversions: list = field(default_factory=list)  # DeepSpeed-Chat models converted before it runs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other bad input (argparse would print the usage first)."""
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    has_cuda = _has_cuda()
    parser = _Parser(description="Run RLHF steps 1-3 (or SFT + DPO) one after the other. Exit codes: 0 done; 2 bad "
                                 "input (here or a step's); 3 a step diverged; 1 a crash; 128+N stopped by signal N "
                                 "(Ctrl-C: 130, after the running step saved a checkpoint).")
    parser.add_argument("--step", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3],
                        help="Steps to run (with --algo dpo, step 2 is DPO and step 3 does not exist).")
    parser.add_argument("--algo", choices=("ppo", "dpo") + CRITIC_FREE_ALGOS, default="ppo",
                        help="[new] ppo: reward model + PPO (steps 2-3); dpo: DPO replaces steps 2-3; grpo, dr_grpo, "
                             "rloo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax: no step 2, a "
                             "critic-free step 3 rewarded by --reward-function (4 answers per prompt).")
    parser.add_argument("--reward-function", default="synthetic",
                        help="[new] The rule reward of a critic-free --algo: synthetic (the built-in tasks' checker), "
                             "math (GSM8K-style) or path/to/file.py:function (step 3's --reward_function).")
    parser.add_argument("--actor-model", default=None,
                        help="Actor: an OPT size as in DeepSpeed-Chat (1.3b, 6.7b, 13b, 66b), a hub id or a local "
                             "path, or tiny/opt. Default: tiny/opt on cpu, facebook/opt-1.3b otherwise.")
    parser.add_argument("--reward-model", default=None,
                        help="Reward model: an OPT size (350m), a hub id, a local path, or tiny/opt. "
                             "Default: tiny/opt on cpu, facebook/opt-350m otherwise.")
    parser.add_argument("--actor-zero-stage", type=str, default="", choices=ZERO_STAGES,
                        help="ZeRO stage of the actor, 0-3 (empty: the script's default).")
    parser.add_argument("--reward-zero-stage", type=str, default="", choices=ZERO_STAGES,
                        help="ZeRO stage of the reward model / critic, 0-3 (empty: the script's default).")
    parser.add_argument("--output-dir", default="./output", help="Where the three model folders go.")
    parser.add_argument("--deployment-type", choices=DEPLOYMENTS, default="single_gpu" if has_cuda else "cpu",
                        help="cpu (the default without a CUDA device) | single_gpu | single_node | multi_node.")
    parser.add_argument("--data-path", default=None,
                        help=f"[new] --data_path of every step (default: the scripts' own; cpu: {DEFAULT_DATA}).")
    parser.add_argument("--quick", action="store_true",
                        help="[new] Smoke run: small synthetic data and a few steps each (minutes on CPU).")
    parser.add_argument("--check-prompts", type=int, default=200,
                        help="[new] Held-out synthetic prompts on which the step-1 and final actors are checked "
                             "(0: no check).")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="[new] Format every conversation with the actor's chat template (tiny/qwen2, tiny/llama3 "
                             "or any model whose tokenizer has one) instead of the HH text: passed to steps 1 and 2, "
                             "which save it with their models; step 3 and the final check read it from there.")
    parser.add_argument("--dry-run", action="store_true",
                        help="[new] Print each step's command (script, arguments, environment) and exit without "
                             "running or writing anything.")
    parser.add_argument("--resume", action="store_true",
                        help="[new] Continue an interrupted pipeline: every step whose output directory holds "
                             "checkpoints continues from them (the step's own --resume); the others run as usual.")
    args = parser.parse_args(argv)
    check_numbers(args)
    check_output_dir(Path(args.output_dir))
    if args.data_path is None and args.deployment_type == "cpu":
        args.data_path = QUICK_DATA if args.quick else DEFAULT_DATA
    if args.algo == "dpo" and 3 in args.step:
        if args.step != [1, 2, 3]:
            raise UserInputError("--algo dpo has no step 3 (DPO replaces steps 2-3): use --step 1 2")
        args.step = [1, 2]
    if args.algo in CRITIC_FREE_ALGOS and 2 in args.step:
        if args.step != [1, 2, 3]:
            raise UserInputError(f"--algo {args.algo} has no step 2 (it trains no reward model: step 3 is rewarded "
                                 "by --reward-function): use --step 1 3")
        args.step = [1, 3]
    path, sep, function = args.reward_function.rpartition(":")
    if sep and path.endswith(".py"):  # the step runs in its own folder: a relative file path must not move
        args.reward_function = f"{os.path.abspath(path)}:{function}"
    if args.deployment_type == "multi_node" and not os.path.isfile(hostfile()):
        raise UserInputError(f"--deployment-type multi_node needs a hostfile, and '{hostfile()}' does not exist: "
                             "set HOSTFILE to one (see docs/launching.md)")
    return args


def check_numbers(args) -> None:
    """Range checks of the numeric flags, now rather than after the whole pipeline ran."""
    problem = at_least(0)(args.check_prompts)
    if problem:
        raise UserInputError(f"--check-prompts {problem} (got {args.check_prompts}): pass 0 to skip the check")


def check_output_dir(out: Path) -> None:
    """--output-dir must be a directory or creatable as one: a file there (or in its path) would only fail
    once the first step writes."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise UserInputError(f"--output-dir '{out}': '{path}' is a file, not a directory: pass a directory "
                                     "(an existing one, or a new path)")
            return


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def hostfile() -> str:
    return os.environ.get("HOSTFILE", "/job/hostfile")


def launcher(deployment: str) -> list[str]:
    if deployment == "multi_node":
        return ["deepspeed", "--hostfile", hostfile()]
    return ["deepspeed"] + (["--num_gpus", "1"] if deployment == "single_gpu" else [])


def build_steps(args) -> list[Step]:
    cpu = args.deployment_type == "cpu"
    out = Path(args.output_dir).resolve()
    actor = layout.model_id(args.actor_model, "1.3b", cpu)
    reward = layout.model_id(args.reward_model, "350m", cpu)
    sft_dir = layout.model_folder(out / "actor-models", actor)
    rm_dir = layout.model_folder(out / "reward-models", reward)
    data = args.data_path
    steps = []
    plan = [(1, "step1", "step1_supervised_finetuning", actor, sft_dir, args.actor_zero_stage)]
    if args.algo == "ppo":
        plan.append((2, "step2", "step2_reward_model_finetuning", reward, rm_dir, args.reward_zero_stage))
    elif args.algo == "dpo":
        plan.append((2, "dpo", "step2_dpo_finetuning", actor, layout.model_folder(out / "dpo-models", actor),
                     args.actor_zero_stage))
    for number, key, folder, model, model_dir, zero in plan:
        if number in args.step:
            # DPO starts from the step-1 actor; a hub/tiny name only when step 1 is skipped and never ran.
            start, conversion = model, None
            if key == "dpo" and 1 in args.step:
                start = sft_dir
            elif key == "dpo" and sft_dir.is_dir():  # an earlier run's (DeepSpeed-Chat's: converted first)
                start, conversion = layout.converted_input(sft_dir, actor)
            step = single_model_step(args, key, folder, str(start), model_dir, zero, data, sized_by=model)
            step.conversions += [conversion] if conversion else []
            steps.append(step)
    if args.algo != "dpo" and 3 in args.step:
        # Checked before anything runs, so a refused pipeline leaves no logs or half a run behind.
        needed = ((1, sft_dir), (2, rm_dir)) if args.algo == "ppo" else ((1, sft_dir),)
        for number, model_dir in needed:
            if number not in args.step and not model_dir.is_dir():
                raise UserInputError(f"--step 3 needs the step-{number} output '{model_dir}', which does not "
                                     f"exist: add {number} to --step, or pass the --output-dir of the run that made it")
        # Outputs of earlier runs (DeepSpeed-Chat's pytorch_model.bin ones converted first) or of this one.
        actor_in, critic_in, conversions = sft_dir, rm_dir, []
        if 1 not in args.step:
            actor_in, conversion = layout.converted_input(sft_dir, actor)
            conversions += [conversion] if conversion else []
        if 2 not in args.step and args.algo == "ppo":
            critic_in, conversion = layout.converted_input(rm_dir, reward)
            conversions += [conversion] if conversion else []
        # A critic-free run gets a folder of its own, so it does not replace a PPO result of the same output dir.
        suffix = "" if args.algo == "ppo" else f"-{args.algo}"
        step3_dir = layout.model_folder(out / "step3-models", actor, suffix)
        step = ppo_step(args, actor_in, critic_in, step3_dir, data, actor, reward)
        step.conversions = conversions
        steps.append(step)
    for step in steps:
        if args.apply_chat_template and step.key != "step3":  # step 3 reads the format its two models saved
            add_flag(step, "--apply_chat_template", "--apply-chat-template")
        if args.resume and (step.model_dir / CHECKPOINTS).is_dir():
            # --resume: the step continues from its own checkpoints, when it has some (the step's --resume)
            step.resume = True
            add_flag(step, "--resume", "--resume")
    return steps


def add_flag(step: Step, flag: str, why: str) -> None:
    """Give a step's main.py one more flag: on its command line, or through a script's EXTRA_ARGS."""
    if step.command[0] != "bash":
        step.command.append(flag)
    elif "EXTRA_ARGS" in Path(step.command[1]).read_text():
        step.env["EXTRA_ARGS"] = f"{step.env.get('EXTRA_ARGS', '')} {flag}".strip()
    else:
        raise UserInputError(f"{why}: {step.command[1]} takes no extra flags, so e2e cannot pass {flag} to "
                             f"{step.key}: run that script's command by hand with {flag}")


def single_model_step(args, key, folder, model, model_dir, zero, data, sized_by: str | None = None) -> Step:
    """`sized_by`: the model whose size sets a built command's ZeRO stage (DPO starts from a step-1 folder)."""
    script = layout.find_script(folder, args.deployment_type, model)
    if script is not None:
        command = ["bash", str(script), str(model_dir), zero]  # "" is unset for ${2:-...}: the script's default
        if args.deployment_type == "cpu":
            command.append(model)
    else:
        command = launcher(args.deployment_type) + ["main.py", "--model_name_or_path", model,
                                                    "--output_dir", str(model_dir), "--deepspeed",
                                                    "--enable_tensorboard", "--tensorboard_path", str(model_dir)]
        zero = zero or layout.default_zero_stage(sized_by or model, args.deployment_type)
        command += ["--zero_stage", zero] if zero else []
        command += ["--data_path", data] if data else []
    return Step(key, folder, command, model_dir, env=_script_env(args, key, data))


def ppo_step(args, sft_dir: Path, rm_dir: Path, model_dir: Path, data, actor: str, reward: str) -> Step:
    folder = "step3_rlhf_finetuning"
    critic_free = args.algo in CRITIC_FREE_ALGOS
    script = layout.find_script(folder, args.deployment_type, actor, names_model=False)  # takes model paths as $1 $2
    if script is not None and critic_free and args.deployment_type != "cpu":
        script = None  # the GPU scripts' critic flags need a critic; the CPU script takes "none" for none
    if script is not None:
        command = ["bash", str(script), str(sft_dir), "none" if critic_free else str(rm_dir),
                   args.actor_zero_stage, args.reward_zero_stage, str(model_dir)]  # "": the script's default
    else:
        command = launcher(args.deployment_type) + ["main.py", "--actor_model_name_or_path", str(sft_dir)]
        command += [] if critic_free else ["--critic_model_name_or_path", str(rm_dir)]
        command += ["--output_dir", str(model_dir), "--deepspeed", "--enable_tensorboard", "--tensorboard_path",
                    str(model_dir)]
        actor_zero = args.actor_zero_stage or layout.default_zero_stage(actor, args.deployment_type)
        critic_zero = args.reward_zero_stage or layout.critic_zero_stage(actor, reward, args.deployment_type)
        command += ["--actor_zero_stage", actor_zero] if actor_zero else []
        command += ["--critic_zero_stage", critic_zero] if critic_zero and not critic_free else []
        command += ["--data_path", data] if data else []
    step = Step("step3", folder, command, model_dir, env=_script_env(args, "step3", data))
    if critic_free:
        extra = CRITIC_FREE_ARGS.format(algo=args.algo, reward=args.reward_function)
        extra += f" {QUICK_CRITIC_FREE_ARGS}" if args.quick else ""
        for flag in shlex.split(extra):
            add_flag(step, flag, f"--algo {args.algo}")
    return step


def _script_env(args, key: str, data) -> dict:
    """The CPU scripts read DATA_PATH and MASTER_PORT and append EXTRA_ARGS (so --quick can shorten them).
    A free port per step keeps the pipeline clear of other DeepSpeed jobs on the default port 29500."""
    env = {"DATA_PATH": data} if data else {}
    if args.deployment_type == "cpu":
        env["MASTER_PORT"] = str(distributed.free_port())
    if args.deployment_type == "multi_node":  # the one e2e checked, also for the scripts (their default differs)
        env["HOSTFILE"] = os.path.abspath(hostfile())
    if args.quick:
        env["EXTRA_ARGS"] = QUICK_ARGS[key]
    return env


def shell_line(step: Step) -> str:
    """The step as one shell line a user can paste: (cd training/FOLDER && VAR=... command)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
    return f"(cd training/{step.folder} && {env + ' ' if env else ''}{shlex.join(step.command)})"


def run_step(step: Step, log_path: Path) -> tuple[int, int | None]:
    """Run one step with its output streamed to the terminal and to `log_path`; returns its exit code and the
    signal (SIGINT/SIGTERM) e2e received meanwhile, if any.

    The step runs in a session of its own and e2e passes such a signal on to the step's training processes
    only: they save a checkpoint and exit 128 + N, and the deepspeed launcher and the script's `tee` in between
    report that instead of dying first (the launcher would print a KeyboardInterrupt traceback). e2e itself
    keeps relaying the step's output until it ends, so the step's log is whole."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **step.env}
    print(f"\n=== {step.key}: {shell_line(step)}", flush=True)
    start, received = time.time(), []
    process = None

    def on_signal(signum, frame):
        received.append(signum)
        if process is not None:
            pass_signal_on(process.pid, signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log_path, "a" if step.resume else "w", encoding="utf-8") as log:
            process = subprocess.Popen(step.command, cwd=REPO / "training" / step.folder, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                                       errors="replace", start_new_session=True)
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
                log.flush()  # the log is whole whenever the run is stopped
            code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    step.seconds = time.time() - start
    return code, (received[0] if received else None)


def pass_signal_on(pid: int, signum: int) -> None:
    """Signal the training processes (`python [-flags] main.py ...`) under the step's process `pid`; before
    they exist, the step's whole process group."""
    import psutil

    try:
        ranks = [child for child in psutil.Process(pid).children(recursive=True) if _is_training_process(child)]
    except psutil.Error:
        ranks = []
    for rank in ranks:
        try:
            rank.send_signal(signum)
        except psutil.Error:
            pass
    if not ranks:
        try:
            os.killpg(pid, signum)
        except OSError:
            pass


def _is_training_process(process) -> bool:
    try:
        args = [a for a in process.cmdline()[1:] if not a.startswith("-")]
    except Exception:  # gone, or not ours to read
        return False
    return bool(args) and args[0].endswith("main.py")


def step_number(step: Step) -> int:
    return {"step1": 1, "step2": 2, "dpo": 2, "step3": 3}[step.key]


def e2e_exit_code(code: int) -> int:
    """e2e's exit code for a step's: bad input 2 and divergence 3 pass through, a signal is 128 + N (a process
    killed by one reports -N), anything else is a crash, 1 (never 2: that would blame the user's input)."""
    if code in (EXIT_BAD_INPUT, EXIT_DIVERGED):
        return code
    if code < 0:
        return 128 - code
    if 128 < code < 128 + 65:
        return code
    return EXIT_CRASH


def explain_interrupt(step: Step, log_path: Path, signum: int, steps: list[Step], finished: bool) -> str:
    """One line: which step the signal stopped, where its log is, and how to continue."""
    rest = steps[steps.index(step) + (1 if finished else 0):]
    what = (f"came after {step.key} finished" if finished else
            f"stopped {step.key} (it saved a checkpoint if it had started training)")
    cont = (f"rerun the same e2e command plus --step {' '.join(str(step_number(s)) for s in rest)} --resume" if rest
            else "nothing is left to run")
    return f"e2e: {signal.Signals(signum).name} {what}; its log: {log_path}; to continue, {cont}"

def last_error_line(text: str) -> str | None:
    """The step's own last `error: ...` line, whole: found also after a progress bar's carriage return or a
    launcher's `[rank0]: ` prefix."""
    found = None
    for line in text.splitlines():
        match = re.search(r"(?:^|\r|\]: )((?:\S+: )?error: .*)$", line)
        if match:
            found = match.group(1).split("\r")[0].rstrip()
    return found


def explain_failure(step: Step, log_path: Path, code: int, deployment: str = "cpu") -> str:
    text = log_path.read_text(encoding="utf-8", errors="replace")
    what, fix = EXIT_MEANINGS.get(code, (None, None))
    error = last_error_line(text)
    tail = "\n".join(text.splitlines()[-25:])
    patterns = FAILURE_HINTS + (MULTI_NODE_HINTS if deployment == "multi_node" else [])
    hints = ([fix] if fix else []) + [hint for pattern, hint in patterns if re.search(pattern, tail, re.IGNORECASE)]
    outcome = f"exit {code}: {what}" if what else f"exit {code}"
    # A step that ended on its own error line said what is wrong; a crash's traceback is in the last lines.
    message = [f"\n{step.key} failed ({outcome}) after {step.seconds:.0f} s; its log: {log_path}"]
    if error is None or code not in EXIT_MEANINGS:
        message += [f"last lines of the log:\n{tail}"]
    if error is not None:
        message.append(f"the step said: {error}")
    message += [f"hint: {hint}" for hint in hints] or [f"hint: read the log above; rerun only this step with "
                                                      f"--step {step_number(step)}"]
    return "\n".join(message)


def key_figures(step: Step) -> str:
    """The headline numbers of a finished step, read from what it saved."""
    metrics = _metrics(step.model_dir / ("actor" if step.key == "step3" else ""))
    if step.key == "step1":
        ppl = [row["eval/perplexity"] for row in metrics if "eval/perplexity" in row]
        return f"eval perplexity {ppl[0]:.2f} -> {ppl[-1]:.2f}" if ppl else "no eval data"
    if step.key == "step2":
        stats = json.loads((step.model_dir / "reward_model.json").read_text()).get("reward_stats") or {}
        # Step 2 records no statistics without eval pairs, rather than invented ones.
        return f"reward accuracy {stats['accuracy']:.3f} (held-out pairs)" if "accuracy" in stats else "no eval data"
    if step.key == "dpo":
        accuracy = [row["eval/reward_accuracy"] for row in metrics if "eval/reward_accuracy" in row]
        return f"reward accuracy {accuracy[0]:.3f} -> {accuracy[-1]:.3f}" if accuracy else "no eval data"
    reward = [row["eval/reward_mean"] for row in metrics if "eval/reward_mean" in row]
    return f"mean reward {reward[0]:.3f} -> {reward[-1]:.3f} (held-out prompts)" if reward else "no eval data"


def _metrics(directory: Path) -> list[dict]:
    for path in (directory / "training_metrics.jsonl", directory.parent / "training_metrics.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def final_actor(steps: list[Step]) -> Path:
    last = steps[-1]
    return last.model_dir / "actor" if last.key == "step3" else last.model_dir


def checker_accuracy(actor_dir: Path, data: str, prompts: int, sampling) -> float | None:
    """Share of held-out synthetic prompts the actor answers right, by the task's checker."""
    import torch

    from training.utils.data.chat_format import PromptFormatFlags, resolve_prompt_format
    from training.utils.data.synthetic import check_answer, generate_rows, parse_synthetic_name
    from training.utils.model.load import load_causal_lm
    from training.utils.sampling import generate_replies

    rows = generate_rows(parse_synthetic_name(data), "eval")[:prompts]
    if not rows:  # no held-out prompts to check on
        return None
    model, tokenizer = load_causal_lm(str(actor_dir), torch.device("cpu"))
    prompt_format = resolve_prompt_format(tokenizer, PromptFormatFlags(), {"actor": str(actor_dir)})  # as it was saved
    torch.manual_seed(0)  # the same sampling noise for every actor checked
    replies = generate_replies(model, prompt_format, [r["prompt"] for r in rows], sampling)
    return sum(check_answer(r["prompt"], reply) for r, reply in zip(rows, replies)) / len(rows)


def summary(steps: list[Step], args) -> None:
    data = args.data_path
    print("\n| step | wall time | key figures | output |\n| --- | ---: | --- | --- |")
    for step in steps:
        print(f"| {step.key} | {step.seconds:.0f} s | {step.figures} | {step.model_dir} |")
    actor = final_actor(steps)
    print(f"\nfinal actor: {actor}\nchat with it: python applications/chat.py --path {actor}")
    sft_dir = next((s.model_dir for s in steps if s.key == "step1"), None)
    if data and data.startswith("synthetic/") and sft_dir is not None and actor != sft_dir and args.check_prompts:
        from training.utils.sampling import SamplingConfig

        # Greedy shows the most likely answer; sampling at temperature 1 (what PPO's rollouts do) shows
        # how much of the policy's probability sits on right answers, which greedy can hide.
        for label, sampling in (("greedy", SamplingConfig(max_new_tokens=24)),
                                ("sampled at temperature 1", SamplingConfig(max_new_tokens=24, do_sample=True))):
            before = checker_accuracy(sft_dir, data, args.check_prompts, sampling)
            if before is None:
                print("held-out checker accuracy: no eval data (the synthetic task has no eval prompts)")
                break
            after = checker_accuracy(actor, data, args.check_prompts, sampling)
            print(f"held-out checker accuracy ({args.check_prompts} prompts, {label}): step-1 actor {before:.3f}, "
                  f"final actor {after:.3f} ({after - before:+.3f})")


@report_user_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    steps = build_steps(args)
    out = Path(args.output_dir).resolve()
    print(f"e2e: {args.algo}, steps {args.step}, deployment {args.deployment_type}, output {out}")
    if args.dry_run:  # the plan only: nothing runs, nothing is written
        for step in steps:
            for conversion in step.conversions:
                print(f"=== convert: {conversion.shell_line()}")
            print(f"=== {step.key}: {shell_line(step)}")
        return
    for step in steps:
        for conversion in step.conversions:
            print(f"\n=== convert: {conversion.shell_line()}", flush=True)
            conversion.run()
        log_path = out / ("dpo" if step.key == "dpo" else step.key) / "training.log"
        code, signum = run_step(step, log_path)
        if signum is not None:
            print(explain_interrupt(step, log_path, signum, steps, code == 0), file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        if code != 0:
            print(explain_failure(step, log_path, code, args.deployment_type), file=sys.stderr, flush=True)
            sys.exit(e2e_exit_code(code))
        step.figures = key_figures(step)
        print(f"=== {step.key} done in {step.seconds:.0f} s: {step.figures}", flush=True)
    try:
        summary(steps, args)
    except KeyboardInterrupt:  # every step is saved; only the closing check was cut short
        print("e2e: SIGINT during the closing accuracy check; every step finished and is saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
