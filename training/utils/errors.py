"""Errors by kind, each reported the way its reader needs it, with its own exit code.

Exit codes of every entry point (training steps, evaluation scripts, applications):

    0        success
    2        bad input (UserInputError): one line `error: ...` on stderr naming the input and the fix;
             also an output the disk refused (OutputWriteError: full, quota, read-only), after removing the
             partial copy
    3        training diverged (NonFiniteLossError): one line `error: ...` naming the step and the last
             good checkpoint
    1        an internal error: a bug or a crash, with its traceback
    128 + N  stopped by signal N (SIGTERM/SIGINT after saving a checkpoint; the shell reports 143/130)

applications/e2e_rlhf.py ends with its own bad input's 2, or with what its failed step's code means: 2 and 3
pass through (with the step's own `error:` line and its log's path), a signal is 128 + N (Ctrl-C: 130, after
the running step saved its checkpoint, with one line saying how to continue), any other failure is 1.
"""
import contextlib
import errno
import functools
import os
import signal
import sys

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class UserInputError(Exception):
    """Bad input from the user (flag, file, dataset, model directory).

    The message must name the input and say how to fix it, in one line.
    """


class NonFiniteLossError(Exception):
    """Training diverged: a loss became NaN or infinite. Not bad input (the same flags may train on another
    seed), so it has its own exit code; the message names the step and the last good checkpoint."""


class OutputWriteError(UserInputError):
    """Writing an output failed for a reason the user must fix (disk full, quota, file size limit, read-only or
    vanished disk). Raised after the partial output was removed, so the message can say the previous one is
    intact."""


# What a full disk, a quota, a file-size limit or a failing disk look like, by errno and, where a library
# hides the OSError (torch.save raises RuntimeError("... unexpected pos ..."), safetensors its own error
# with "os error 28"), by message.
_WRITE_FAILURE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
_WRITE_FAILURE_TEXT = ("No space left", "File too large", "Disk quota", "Read-only file system", "os error 28",
                       "os error 27", "os error 122", "file write failed", "unexpected pos")


# The project's on/off environment switches (on unless set to 0), with what "on" does. Every entry point checks
# them before it starts (report_user_errors), so a bad value stops a run before any work, not at first use.
ENV_SWITCHES = {
    "RLHF_KEEP_FREED_MEMORY": "CPU processes keep the memory they free, faster (allocator.py)",
    "RLHF_PACKED_WEIGHTS": "bf16 inference passes on CPU pack their weights once, faster (model/packed_linear.py)",
    "RLHF_FAST_DROPOUT": "bf16 dropout on CPU draws its mask from 16-bit random integers, faster (model/dropout.py)",
    "RLHF_LONE_RANK_NO_ALLREDUCE": "a one-process run without ZeRO skips DeepSpeed's gradient all-reduce with itself "
                                   "(engine.py)",
    "RLHF_DECODING_KERNELS": "bf16 decoding on CPU uses the attention chosen for the CPU, a KV cache grown in "
                             "blocks and lean one-token steps, faster (sampling.py)",
    "RLHF_LEAN_OPTIMIZER_STEP": "DeepSpeed's bf16 optimizer step without ZeRO copies each gradient to fp32 once and "
                                "skips its separate overflow pass, faster (optimizer_step.py)",
    "RLHF_LAST_LAYER_SUFFIX": "step 3's passes compute the last layer after its attention only where they read it, "
                              "faster (model/last_layer.py)",
    "RLHF_DECODE_ATTENTION_KERNEL": "bf16 decoding steps on a CPU with AMX run their attention in a small C++ kernel "
                                    "built on first use, faster (model/decode_attention.py)",
    "RLHF_LEAN_WEIGHT_GRAD": "bf16 linear layers on CPU compute their weight gradient from a contiguous transpose of "
                             "the narrower operand, faster (model/linear_grad.py)",
    "RLHF_AMX_LINEAR_KERNEL": "bf16 decoding steps on a CPU with AMX run their linear layers in a small C++ kernel "
                              "built on first use, faster (model/amx_linear.py)",
    "RLHF_FUSED_ADAMW_KERNEL": "DeepSpeed's bf16 optimizer step without ZeRO runs AdamW from the bf16 gradients in one "
                               "C++ pass on a CPU with AVX-512, built on first use, faster (fused_adamw.py)",
}
_SWITCH_ON, _SWITCH_OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")


def env_switch(name: str) -> bool:
    """The setting of ENV_SWITCHES' `name` (unset or empty: on). Any value but 0/1, false/true, no/yes, off/on
    is a UserInputError naming it."""
    setting = os.environ.get(name, "1").strip().lower()
    if setting not in _SWITCH_ON + _SWITCH_OFF:
        raise UserInputError(f"{name}={os.environ[name]!r}: use 1 (the default: {ENV_SWITCHES[name]}) or 0 (off)")
    return setting in _SWITCH_ON


def shorten(text: str, limit: int) -> str:
    """`text`, or its first `limit` - 3 characters and '...' when it is longer than `limit`."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_error(err: BaseException, limit: int = 200) -> str:
    """'ValueError: first line of its message' cut to `limit` characters (the type alone when it has no message)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {shorten(lines[0], limit)}" if lines else type(err).__name__


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` (or what it was raised from) is a failed write that is the disk's fault, not a bug."""
    return any((isinstance(e, OSError) and e.errno in _WRITE_FAILURE_ERRNOS)
               or (isinstance(e, Exception) and any(text in str(e) for text in _WRITE_FAILURE_TEXT))
               for e in _chain(err))


def write_failure(err: BaseException, path: str, what: str, keeps: str) -> OutputWriteError:
    """The one-line error for a failed write of `what` into `path`; `keeps` says what is still intact."""
    reason = next((e.strerror for e in _chain(err) if isinstance(e, OSError) and e.strerror),
                  "the disk refused the write: full, over quota or over a file-size limit")
    return OutputWriteError(f"could not write {what} to '{path}' ({reason}): the partial copy "
                            f"was removed and {keeps}; free disk space (or choose another location) and run again")


def _chain(err):
    """`err` and the exceptions it was raised from or while handling."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


class _PipeSafeStream:
    """sys.stdout/stderr that survive their reader's death: once a write finds the pipe closed (`| head`, a `tee`
    killed by the same Ctrl-C), the stream's file descriptor is pointed at /dev/null and the program goes on, so
    saving a checkpoint never depends on anyone reading the output."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._to_devnull()

    def _to_devnull(self):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def say(text: str) -> None:
    """Write one line to stderr from anywhere, a signal handler included: no buffering, and no error when
    nobody reads stderr any more."""
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode("utf-8", "replace"))


_cleanups: list = []  # callables run when an entry point ends, however it ends (the output-dir lock's release)


def on_exit(cleanup) -> None:
    """Run `cleanup()` when the entry point returns, fails or is stopped (see report_user_errors)."""
    _cleanups.append(cleanup)


def _process_group_running() -> bool:
    dist = sys.modules.get("torch.distributed")  # (never imported here: a plain tool needs no torch)
    return dist is not None and dist.is_available() and dist.is_initialized()


def _release_process_group() -> None:
    """Tear down the process group an entry point started and left behind by ending early (an error on every
    rank): locally, with no barrier, since the other ranks may be gone already. Left to interpreter exit,
    gloo's destructor can race the peers' exits and abort ("terminate called without an active exception",
    SIGABRT) instead of the exit code the error asked for."""
    with contextlib.suppress(Exception):
        sys.modules["torch.distributed"].destroy_process_group()


def report_user_errors(main):
    """Wrap an entry point's `main()`:

    - the environment switches (ENV_SWITCHES) are checked first;
    - a UserInputError (exit 2) or a NonFiniteLossError (exit 3) ends the process with one line on stderr and
      no traceback; anything else keeps its traceback and exits 1;
    - stdout and stderr survive a closed pipe (see _PipeSafeStream);
    - the cleanups registered with `on_exit` run however main ends.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        streams, group_before = (sys.stdout, sys.stderr), _process_group_running()
        sys.stdout, sys.stderr = _PipeSafeStream(sys.stdout), _PipeSafeStream(sys.stderr)
        try:
            for name in ENV_SWITCHES:
                env_switch(name)
            return main(*args, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_DIVERGED)
        except KeyboardInterrupt:  # (a training loop turns Ctrl-C into a checkpoint itself; before it, or in a
            say("interrupted (Ctrl-C)")  # tool that saves nothing, there is nothing to save)
            sys.exit(128 + signal.SIGINT)
        finally:
            while _cleanups:
                with contextlib.suppress(Exception):
                    _cleanups.pop()()
            if not group_before and _process_group_running():  # (a caller's own group is not ours to end)
                _release_process_group()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            sys.stdout, sys.stderr = streams

    return wrapper
