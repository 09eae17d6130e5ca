"""Rule (verifiable) rewards for step 3: a function scores each generated reply, no reward model involved.

A reward function has the signature

    fn(prompts: list[str], replies: list[str], references: list[str | None]) -> list[float]

one number per reply: `prompts` are the question texts (HH text "\\n\\nHuman: ...\\n\\nAssistant:" or plain
text), `replies` the generated texts, `references` the data row's reference answer (its response / chosen
text) or None.

`load_reward_function(spec)` turns a `--reward` style spec into such a function:

    synthetic                   1.0 when the reply is the exact answer to a synthetic/copy or synthetic/arithmetic
                                question (training.utils.data.synthetic.check_answer), else 0.0
    math                        GSM8K-style: 1.0 when the reply's final number equals the reference's number
                                after '####' (or a bare-number reference), else 0.0
    path/to/file.py:function    a function of your own. The file is imported (its top-level code runs, as any
                                Python file you run does) only when this spec is asked for.

`compute_rule_rewards` calls the function and checks what it returns; every failure is one UserInputError line
naming the spec, and the row where that helps.
"""
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from training.utils.data.synthetic import check_answer
from training.utils.errors import UserInputError, describe_error, shorten

RewardFunction = Callable[[list[str], list[str], list[str | None]], list[float]]

BUILTIN_REWARDS = ("synthetic", "math")
GSM8K_ANSWER_MARK = "####"
# A number as written in a reply: optional minus and "$", digits with thousands commas, optional decimals. Not
# preceded by a digit or ".", so "2-1" reads as 2 and 1, not 2 and -1. Commas and "$" are removed before parsing.
_NUMBER = re.compile(r"(?<![\d.])-?\$?\d[\d,]*(?:\.\d+)?")
_SHOWN_CHARS = 60  # how much of a prompt or a value an error message shows


# ---------------------------------------------------------------- built-in rewards

def synthetic_reward(prompts: list[str], replies: list[str], references: list[str | None]) -> list[float]:
    """1.0 for the exact answer to the synthetic question in the prompt (HH or plain text), 0.0 otherwise.

    check_answer reads the question after the last "\\n\\nHuman:"; plain text has no such marker and is read
    whole. A prompt that is no synthetic question raises ValueError (reported by compute_rule_rewards).
    """
    rewards = []
    for row, (prompt, reply) in enumerate(zip(prompts, replies)):
        try:
            rewards.append(1.0 if check_answer(prompt, reply) else 0.0)
        except ValueError as err:
            raise ValueError(f"row {row}: {err}") from None
    return rewards


def parse_number(text: str) -> Decimal | None:
    """The number written in `text` ("$1,234.50", "18.", "-3"), exactly, or None when it is no number."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def reference_answer(reference: str | None) -> Decimal | None:
    """The reference's answer: the number after its last '####' (a GSM8K response " ... #### 18"), or the
    reference itself when it is a bare number ("18", "$70,000"); None when it has neither."""
    if reference is None:
        return None
    if GSM8K_ANSWER_MARK in reference:
        tail = reference.rsplit(GSM8K_ANSWER_MARK, 1)[1]
        match = _NUMBER.search(tail)
        return None if match is None else parse_number(match.group())
    return parse_number(reference)


def reply_answer(reply: str) -> Decimal | None:
    """The model's final answer: the first number after its first '####' when it wrote one (what follows it is
    rambling), otherwise the last number of the reply; None when there is none."""
    if GSM8K_ANSWER_MARK in reply:
        match = _NUMBER.search(reply.split(GSM8K_ANSWER_MARK, 1)[1])
        return None if match is None else parse_number(match.group())
    numbers_found = _NUMBER.findall(reply)
    return parse_number(numbers_found[-1]) if numbers_found else None


def math_reward(prompts: list[str], replies: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the reply's final number equals the reference answer (compared as exact decimals, so "18.0",
    "18" and "$18." agree), 0.0 otherwise. A row without a usable reference raises ValueError."""
    rewards = []
    for row, (reply, reference) in enumerate(zip(replies, references)):
        expected = reference_answer(reference)
        if expected is None:
            raise ValueError(f"row {row} has no reference answer ('{GSM8K_ANSWER_MARK} <answer>' or a number)")
        answer = reply_answer(reply)
        rewards.append(1.0 if answer is not None and answer == expected else 0.0)
    return rewards


_BUILTINS: dict[str, RewardFunction] = {"synthetic": synthetic_reward, "math": math_reward}


# ---------------------------------------------------------------- loading

def load_reward_function(spec: str) -> RewardFunction:
    """The reward function `spec` names: a built-in ("synthetic", "math") or "path/to/file.py:function".

    The file form imports that file with importlib, so its top-level code runs in this process: it is user
    code, trusted as the training script itself is. Nothing is imported for a built-in.
    """
    if spec in _BUILTINS:
        return _BUILTINS[spec]
    usage = f"use one of {', '.join(BUILTIN_REWARDS)} or 'path/to/file.py:function'"
    path_text, sep, name = spec.rpartition(":")
    if not sep:
        hint = f"name the function too: '{spec}:<function>'" if spec.endswith(".py") else usage
        raise UserInputError(f"unknown reward '{spec}': {hint}")
    if not path_text or not name:
        raise UserInputError(f"reward '{spec}' needs both a file and a function: {usage}")
    path = Path(path_text)
    if not path.is_file():
        raise UserInputError(f"reward function file '{path_text}' does not exist (looked for {path.absolute()}); "
                             f"check the path in '{spec}'")
    module = _import_file(path, spec)
    if not hasattr(module, name):
        defined = sorted(key for key, value in vars(module).items() if callable(value) and not key.startswith("_"))
        raise UserInputError(f"reward function file '{path_text}' has no function '{name}' (its functions: "
                             f"{', '.join(defined) or 'none'}); fix the name in '{spec}'")
    function = getattr(module, name)
    if not callable(function):
        raise UserInputError(f"'{name}' in '{path_text}' is not callable (it is {type(function).__name__} "
                             f"{shorten(repr(function), _SHOWN_CHARS)}); name a function "
                             f"fn(prompts, replies, references) -> list[float] in '{spec}'")
    return function


def _import_file(path: Path, spec: str):
    """Import the Python file at `path` as a fresh module (registered in sys.modules while it runs, so
    dataclasses and pickling inside it work); an error while importing becomes one UserInputError line."""
    module_name = f"_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserInputError(f"reward function file '{path}' is not a Python file; point '{spec}' at a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        del sys.modules[module_name]
        raise UserInputError(f"reward function file '{path}' failed to import ({describe_error(err)}); "
                             f"fix the file named in '{spec}'") from None
    return module


# ---------------------------------------------------------------- calling and checking

def compute_rule_rewards(fn: RewardFunction, spec: str, prompts: list[str], replies: list[str],
                         references: list[str | None]) -> torch.Tensor:
    """[B] fp32 rewards: fn's result for the batch, checked.

    A bool counts as 0/1; any other real number (Python, NumPy, 0-d tensor) is accepted if finite. A failure is
    a UserInputError naming `spec`: an exception inside fn (its type and first line, no traceback), a result
    that is not one number per reply, or the first row whose value is not a finite number (with its prompt).
    """
    try:
        result = fn(list(prompts), list(replies), list(references))
    except UserInputError:
        raise
    except Exception as err:
        raise UserInputError(f"reward function '{spec}' raised {describe_error(err)}; fix the function "
                             "(or the data it was given)") from None
    if isinstance(result, torch.Tensor) or hasattr(result, "tolist"):  # a tensor or a NumPy array
        result = result.tolist()
    if not isinstance(result, Sequence) or isinstance(result, str):
        raise UserInputError(f"reward function '{spec}' returned a {type(result).__name__}: it must return a "
                             "list of numbers, one per reply")
    if len(result) != len(replies):
        raise UserInputError(f"reward function '{spec}' returned {len(result)} rewards for {len(replies)} "
                             "replies: it must return one number per reply")
    values = []
    for row, value in enumerate(result):
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise UserInputError(f"reward function '{spec}' returned {shorten(repr(value), _SHOWN_CHARS)} for row "
                                 f"{row} (prompt {shorten(prompts[row], _SHOWN_CHARS)!r}): each reward must be a "
                                 "finite number")
        values.append(number)
    return torch.tensor(values, dtype=torch.float32)


def _as_number(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def needs_references(spec: str) -> bool:
    """Whether the reward `spec` compares replies with the data's reference answers (only the math reward;
    a user function receives them too, but may ignore them)."""
    return spec == "math"


def check_references(spec: str, references: Sequence[str | None]) -> None:
    """UserInputError when the reward `spec` needs reference answers and a row has none (or one without an
    answer), naming the first such row; before any generation, so a wrong dataset fails at once."""
    if not needs_references(spec):
        return
    for row, reference in enumerate(references):
        if reference_answer(reference) is None:
            found = "no reference" if reference is None else f"reference {shorten(reference, _SHOWN_CHARS)!r}"
            raise UserInputError(f"the math reward needs reference answers: data rows need a response/chosen with "
                                 f"'{GSM8K_ANSWER_MARK} <answer>' (row {row} has {found})")
