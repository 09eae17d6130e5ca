"""Shared test helpers: offline environment, the shipped tokenizer, and running step scripts for real."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEP1_DIR = REPO / "training" / "step1_supervised_finetuning"
# Variables a launcher sets; an in-process DeepSpeed fixture may have set them in this process too.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_script(script_dir: Path, args: list[str], num_ranks: int | None = None, timeout: int = 600,
               **env) -> subprocess.CompletedProcess:
    """Run `main.py`-style script of a step as a user would: plain python, or the deepspeed launcher."""
    if num_ranks is None:
        command = [sys.executable] + args
    else:
        command = ["deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(free_port())] + args
        env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(command, cwd=script_dir, env=clean_env(**env), capture_output=True, text=True,
                            timeout=timeout)
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_ok(result):
    """A finished subprocess exited 0; otherwise fail with the end of its output."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def read_metrics(directory) -> list[dict]:
    """The rows of a run's training_metrics.jsonl (written by metrics_log.MetricsLog)."""
    with open(Path(directory) / "training_metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pickle_only_model_dir(model, directory: Path) -> Path:
    """A model directory as older tools leave it: config.json plus pickle weights (pytorch_model.bin) only."""
    import torch

    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


@pytest.fixture
def failed_kernel_build(monkeypatch, capsys, tmp_path):
    """A machine where no C++ kernel (training/utils/native.py) was built yet and none can be (no ninja). Returns a
    check of what was printed since: one line saying `what` is being built, one warning line naming the failure
    and the switch that skips the build."""
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet

    def check(what: str, switch: str):
        out = capsys.readouterr().out
        assert out.count(f"building {what} (once on this machine") == 1
        assert out.count(f"warning: {what} could not be built") == 1
        assert "Ninja is required" in out and f"{switch}=0" in out
    return check


@pytest.fixture(scope="session")
def tokenizer():
    from training.utils.tokenizer import load_tokenizer

    return load_tokenizer("tiny/opt")


@pytest.fixture(scope="session")
def actor_dir(tmp_path_factory, tokenizer):
    """A random tiny OPT saved the way every training step saves its actor (read-only for tests)."""
    import torch

    from training.utils.model.build import create_hf_model
    from training.utils.model.save import save_hf_format

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_actor") / "actor"
    save_hf_format(create_hf_model("tiny/opt", tokenizer), tokenizer, str(directory))
    return directory


@pytest.fixture(scope="session")
def reward_dir(tmp_path_factory, tokenizer):
    """A random tiny OPT reward model saved as step 2 saves one (read-only for tests)."""
    import torch

    from training.utils.model.reward_model import create_reward_model, save_reward_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_reward") / "reward"
    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(directory), reward_stats={})
    return directory


@pytest.fixture(scope="session")
def distributed():
    """A one-rank gloo process group in this process, as the deepspeed launcher sets up for one rank.

    Session-wide: DeepSpeed caches its process groups, so a group must not be re-created mid-run.
    The launcher variables are restored afterwards (subprocess runs strip them anyway).
    """
    import deepspeed
    import torch

    if torch.distributed.is_initialized():
        yield
        return
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the fast and the slow tier
# `pytest -m "not slow"` is the fast tier. A test is slow when it launches a process (a step's main.py, the
# deepspeed launcher, a shell script, chat or e2e: seconds of Python + DeepSpeed start-up each, then the run)
# or sets up a DeepSpeed training engine itself (deepspeed.initialize). The hook below marks such tests by
# reading their code: the test function, the fixtures it uses and, transitively, the functions of tests/ they
# call (run_script and its kin). A test whose slowness this cannot see gets an explicit @pytest.mark.slow.
# Library code is not read: a frozen engine built inside training/ (initialize_frozen_engine) stays fast.
TESTS_DIR = Path(__file__).resolve().parent
PROCESS_MODULES = {"subprocess"}  # using these launches a process
ENGINE_CALLS = {("deepspeed", "initialize")}  # module.attribute calls that build a DeepSpeed engine


def _tests_function(obj):
    """`obj` if it is a plain function defined under tests/, else None."""
    import inspect

    obj = inspect.unwrap(obj) if callable(obj) else obj
    if inspect.isfunction(obj) and Path(obj.__code__.co_filename).resolve().is_relative_to(TESTS_DIR):
        return obj
    return None


def _own_code_facts(func, cache: dict) -> tuple[bool, list]:
    """(whether `func`'s own code launches a process or sets up a DeepSpeed engine, the tests/ functions it
    names), read from its source."""
    import ast
    import inspect
    import textwrap

    if func in cache:
        return cache[func]
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        tree = ast.Module(body=[], type_ignores=[])
    slow, callees = False, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            slow |= any(alias.name.split(".")[0] in PROCESS_MODULES for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            slow |= (node.module or "").split(".")[0] in PROCESS_MODULES
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            slow |= (node.value.id, node.attr) in ENGINE_CALLS
        if isinstance(node, ast.Name) and node.id in func.__globals__:
            value = func.__globals__[node.id]
            module = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            slow |= (module or "").split(".")[0] in PROCESS_MODULES
            if (callee := _tests_function(value)) is not None:
                callees.append(callee)
    cache[func] = (slow, callees)
    return cache[func]


def _reaches_slow_code(functions: list, cache: dict) -> bool:
    """Whether any of `functions`, or a tests/ function they reach by name, is slow by its own code."""
    stack, seen = list(functions), set()
    while stack:
        func = stack.pop()
        if func in seen:
            continue
        seen.add(func)
        slow, callees = _own_code_facts(func, cache)
        if slow:
            return True
        stack += callees
    return False


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that reaches slow code (see above), unless it is marked already."""
    cache: dict = {}
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        functions = [getattr(item, "function", None)]
        fixture_defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        functions += [defs[-1].func for name, defs in fixture_defs.items() if defs and name in item.fixturenames]
        functions = [f for f in map(_tests_function, filter(None, functions)) if f is not None]
        if _reaches_slow_code(functions, cache):
            item.add_marker(pytest.mark.slow)
