"""One error type for bad user input, reported as a single actionable line."""
import functools
import sys


class UserInputError(Exception):
    """Bad input from the user (flag, file, dataset, model directory).

    The message must name the input and say how to fix it, in one line.
    """


def report_user_errors(main):
    """Wrap a `main()` so a UserInputError ends the process with one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
