"""Errors by kind, each reported the way its reader needs it, with its own exit code.

Exit codes of every entry point (training steps, evaluation scripts, applications):

    0        success
    2        bad input (UserInputError): one line `error: ...` on stderr naming the input and the fix
    3        training diverged (NonFiniteLossError): one line `error: ...` naming the step and the last
             good checkpoint
    1        an internal error: a bug or a crash, with its traceback
    128 + N  stopped by signal N (SIGTERM/SIGINT after saving a checkpoint; the shell reports 143/130)
"""
import functools
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


def report_user_errors(main):
    """Wrap a `main()` so a UserInputError (exit 2) or a NonFiniteLossError (exit 3) ends the process with one
    line on stderr and no traceback; anything else keeps its traceback and exits 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_DIVERGED)

    return wrapper
