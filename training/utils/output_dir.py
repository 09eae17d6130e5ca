"""The --output_dir a step saves into: what an earlier run left there, and whether saving may replace it."""
import contextlib
import json
import os
import socket
import sys
import tempfile
import time

from training.utils.atomic_dir import LOCK_FILE, is_run_artifact
from training.utils.errors import UserInputError

# What a step saves, as `saved_kind` names what a directory holds.
LANGUAGE_MODEL, REWARD_MODEL, RLHF_MODELS = "language model", "reward model", "step-3 actor/ and critic/"
RLHF_SUBDIRS = ("actor", "critic", "actor_ema")


def saved_kind(directory: str) -> str | None:
    """What an earlier run saved in `directory`: a language model, a reward model, step 3's models, or None."""
    from training.utils.model.reward_model import is_reward_model_dir  # (here: chat.py's flags import this module)

    if is_reward_model_dir(directory):
        return REWARD_MODEL
    if os.path.isfile(os.path.join(directory, "config.json")):
        return LANGUAGE_MODEL
    if any(os.path.isdir(os.path.join(directory, sub)) for sub in RLHF_SUBDIRS):
        return RLHF_MODELS
    return None


def check_output_dir(output_dir: str, saves: str, inputs: dict[str, list[str | None]]) -> None:
    """Refuse an --output_dir whose save would destroy something, before any work (so nothing is written).

    Saving replaces the whole directory (steps 1 and 2) or its actor/, critic/ and actor_ema/ (step 3)
    in one rename (training.utils.atomic_dir), keeping only run artifacts: logs, checkpoints, TensorBoard events.
    So the directory must not hold this run's inputs, another step's output, or unrelated files.
    """
    out = os.path.realpath(output_dir)
    replaced = [os.path.join(out, sub) for sub in RLHF_SUBDIRS] if saves == RLHF_MODELS else [out]
    for flag, paths in inputs.items():
        for path in filter(None, paths):
            real = os.path.realpath(path)
            if os.path.exists(real) and any(os.path.commonpath([real, r]) == r for r in replaced):
                raise UserInputError(f"--output_dir '{output_dir}' would overwrite the input {flag} '{path}' when "
                                     "the result is saved: pass a different --output_dir")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UserInputError(f"--output_dir '{output_dir}' is a file, not a directory: pass a directory path")
    found = saved_kind(out)
    if found not in (None, saves):
        raise UserInputError(f"--output_dir '{output_dir}' holds another run's {found}, which saving this "
                             f"{saves} would replace: pass a new directory")
    if found is None and saves != RLHF_MODELS:
        others = sorted(e for e in os.listdir(out) if not is_run_artifact(os.path.join(out, e)))
        if others:
            raise UserInputError(f"--output_dir '{output_dir}' holds files that are not a saved model "
                                 f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), which saving "
                                 "would delete: pass a new or empty directory")


# ---------------------------------------------------------------------------------------------- the run's hold
class OutputDirLock:
    """An exclusive lock on --output_dir for a run's whole life, so a second run into it (a second terminal, a
    resubmitted job) is refused instead of deleting the first one's checkpoints or replacing its model.

    `flock` on `<output_dir>/.lock`: the OS releases it when the process dies, however it dies, so a stale file
    never blocks anyone. The file names its holder for the refusal message. Saving carries the file into the new
    directory as a hard link (training.utils.atomic_dir), so the lock survives the final rename.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: int | None = None
        self._created: list[str] = []  # directories this run made (deepest first), removed if left empty

    def acquire(self) -> None:
        import fcntl

        self._created = make_dirs(self.output_dir, "--output_dir")
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                self._remove_created()
                raise UserInputError(f"--output_dir '{self.output_dir}' cannot be written ({err.strerror}): pass a "
                                     "directory you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                refuse_if_in_use(self.output_dir)  # (names the holder)
                continue  # released in between
            except OSError as err:  # a filesystem without locks (some network mounts): run, but say so
                os.close(fd)
                self._remove_created()
                print(f"WARNING: --output_dir '{self.output_dir}' cannot be locked ({err.strerror}): a second run "
                      "into it would not be refused", file=sys.stderr, flush=True)
                return
            if _same_file(fd, self.path):  # (else the holder released and unlinked it in between: retry)
                self._fd = fd
            else:
                os.close(fd)
        with contextlib.suppress(OSError):  # who holds it, for the refusal message (optional: a full disk is told
            os.ftruncate(self._fd, 0)         # when the run writes something that matters)
            os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime(
                "%Y-%m-%d %H:%M:%S"), "program": " ".join(sys.argv[:1])}).encode())

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting opener re-checks the path (see acquire)
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        remove_empty_dirs(self._created)  # a refused run leaves nothing behind


def refuse_if_in_use(output_dir: str) -> None:
    """Refuse at once, before anything else is checked, an --output_dir another run holds (see OutputDirLock)."""
    import fcntl

    try:
        fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it (or the directory is not there yet)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserInputError(f"--output_dir '{output_dir}' is in use by another run ({_read_holder(fd)}): wait for "
                             "it to finish or stop it, or choose another --output_dir") from None
    except OSError:
        pass  # no locks on this filesystem (see OutputDirLock.acquire)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, {holder['program']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that holds its lock file"


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def make_dirs(path: str, flag: str) -> list[str]:
    """`os.makedirs(path)`, returning the directories it created (deepest first, as remove_empty_dirs takes them);
    an unwritable path (read-only disk, a component that is a file, a symlink loop, /proc) is one UserInputError
    line naming `flag`."""
    missing, head = [], os.path.abspath(path)
    while not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        remove_empty_dirs(missing)
        raise UserInputError(f"{flag} '{path}' cannot be created ({err.strerror}): pass a directory you can "
                             "write to") from None
    if not os.path.isdir(path):
        raise UserInputError(f"{flag} '{path}' is a file, not a directory: pass a directory path")
    return missing


def remove_empty_dirs(directories: list[str]) -> None:
    """rmdir each directory (deepest first) that is still empty; others stay."""
    for directory in directories:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def check_writable(path: str, flag: str) -> None:
    """Fail now, not after training, if files cannot be written in `path` (directories made for the test are
    removed again)."""
    created = make_dirs(path, flag)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserInputError(f"{flag} '{path}' is not writable ({err.strerror}): pass a directory you can write "
                             "to") from None
    finally:
        remove_empty_dirs(created)


def hold_output_dir(config) -> None:
    """Rank 0's start of a training run: lock --output_dir for the run's life, check that everything the run
    will write is writable, and clean up after saves an earlier run could not finish."""
    from training.utils import distributed
    from training.utils.atomic_dir import finish_interrupted_saves
    from training.utils.errors import on_exit

    lock = OutputDirLock(config.output_dir)
    lock.acquire()
    on_exit(lock.release)
    if config.SAVES != RLHF_MODELS:  # saved into a temporary sibling of --output_dir, then renamed onto it
        check_writable(os.path.dirname(os.path.realpath(config.output_dir)), "the parent of --output_dir")
    if config.enable_tensorboard:
        check_writable(config.tensorboard_path, "--tensorboard_path")
    check_writable(config.data.data_output_path, "--data_output_path")
    for line in finish_interrupted_saves(config.output_dir):
        distributed.print_rank_0(line)
