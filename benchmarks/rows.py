"""The harness the benchmark scripts share: each row runs in a fresh process of the same script, so its
peak RSS is its own, and reports one JSON line back."""
import glob
import json
import os
import resource
import socket
import subprocess
import sys

ROW_PREFIX = "BENCH_ROW "
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
# DeepSpeed's CPU shared-memory all-reduce creates this file per rank (named with the master port) and never
# unlinks it: 66 MB of RAM in /dev/shm per run until the machine restarts.
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_row(row: dict) -> None:
    """Called in the row's process: hand the figures back to the parent."""
    print(ROW_PREFIX + json.dumps(row), flush=True)


def run_row(script: str, base_args: list[str], row_args: list[str]) -> dict:
    """Run `script base_args --row row_args` in a new single-rank process and return its row."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.setdefault("HF_HUB_OFFLINE", "1")
    with socket.socket() as sock:  # a free port, chosen here so the row's shared-memory buffer can be found
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = port = str(sock.getsockname()[1])
    try:
        result = subprocess.run([sys.executable, script, *base_args, "--row", *row_args],
                                capture_output=True, text=True, env=env)
    finally:
        for path in glob.glob(SHM_BUFFERS.format(port=port)):
            os.remove(path)
    lines = [line for line in result.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if result.returncode != 0 or not lines:
        sys.exit(f"benchmark row {'/'.join(row_args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[0][len(ROW_PREFIX):])
