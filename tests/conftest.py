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
    """The rows of a run's training_metrics.jsonl (written by runtime.MetricsLog)."""
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


@pytest.fixture(scope="session")
def tokenizer():
    from training.utils.tokenizer import load_tokenizer

    return load_tokenizer("tiny/opt")


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
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()
