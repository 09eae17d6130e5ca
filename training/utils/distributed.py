"""Distributed start-up and the per-rank helpers every step uses: rank, barriers, rank-0 printing and progress.

Works with or without a process group: a plain `python main.py` is rank 0 of a world of one.
"""
import atexit
import contextlib
import glob
import os
import sys

import torch
import torch.distributed as dist

from training.utils.allocator import keep_freed_memory
from training.utils.errors import UserInputError

# Variables through which torchrun/deepspeed, Open MPI and MPICH/Intel MPI give a process its rank.
# (Not SLURM_PROCID: a plain `python main.py` inside an sbatch script has it too.)
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def init_distributed(local_rank: int = -1) -> torch.device:
    """Start the process group the way the `deepspeed` launcher expects, and return this rank's device.

    Plain `python main.py` (no launcher) gets single-process defaults, so DeepSpeed does not go looking
    for MPI. Under mpirun (`deepspeed --launcher openmpi|mpich`) the rank comes from their
    variables, which DeepSpeed reads itself. On CPU DeepSpeed picks the gloo backend itself, and the process
    keeps the memory it frees (allocator.keep_freed_memory: no page faults on every step's large tensors).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not any(name in os.environ for name in _RANK_VARIABLES):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank >= 0 else 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accelerator.device_name())
    if device.type == "cpu":
        keep_freed_memory()
    if not dist.is_initialized():
        deepspeed.init_distributed()
        atexit.register(remove_shm_buffer)
    return device


def remove_shm_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce, which DeepSpeed leaves behind
    (66 MB of RAM per rank and run until reboot). Safe at exit: every rank mapped it at start-up."""
    rank_ids = {os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")}
    port = os.environ.get("MASTER_PORT", "*")
    for rank_id in rank_ids:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank_id}"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown_distributed() -> None:
    """Tear the process group down explicitly: ZeRO-3 runs sometimes abort at exit without it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank_0() -> bool:
    return rank() == 0


def print_rank_0(*args, **kwargs) -> None:
    if is_rank_0():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_on_rank_0(fn, *args, **kwargs):
    """Run `fn` on global rank 0 while the others wait, then tell every rank whether it worked, so no rank is
    left waiting at a barrier for a result that will never come.

    A UserInputError on rank 0 is raised on every rank with the same message (exit 2: bad input). Any other
    failure is an internal error, never reported as bad input: rank 0 re-raises it and the other ranks raise
    a RuntimeError naming it (exit 1, with a traceback).
    """
    failure, outcome = None, None  # outcome: (is bad input, message), the same on every rank
    if is_rank_0():
        try:
            fn(*args, **kwargs)
        except UserInputError as err:
            failure, outcome = err, (True, str(err))
        except Exception as err:  # any other failure must still release the waiting ranks
            failure, outcome = err, (False, f"rank 0 failed: {type(err).__name__}: {err}")
    if dist.is_initialized() and world_size() > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if failure is not None:
        raise failure
    if outcome is not None:
        bad_input, message = outcome
        raise UserInputError(message) if bad_input else RuntimeError(message)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over ranks (used for token-weighted eval loss)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def progress(iterable, **kwargs):
    """A tqdm bar on rank 0 only (other ranks iterate silently); redrawn every 10 s when the output is a
    log file rather than a terminal, so training.log stays readable."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not is_rank_0(), file=sys.stdout, dynamic_ncols=True,
                mininterval=0.1 if sys.stdout.isatty() else 10.0, **kwargs)
