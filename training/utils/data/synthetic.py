"""The built-in synthetic datasets: small tasks with a programmatic checker.

Why they exist: tests and the default demo must run offline and must be able to *measure* learning.
Every question has exactly one right answer, so SFT accuracy, reward-model pairwise accuracy and PPO
correctness are all numbers we can assert on.

Two tasks, named on `--data_path` as `synthetic/<task>`, optionally followed by `:key=value,...`:

    synthetic/copy        "Repeat: 4 8 1 9" -> " 4 8 1 9"   (the default of the demo and the tests:
                          a 2M-parameter model learns it, and its reward model, in minutes on a CPU)
    synthetic/arithmetic  "What is 37 + 48?" -> " 85"        (harder: a tiny model stays weak at it)

e.g. `synthetic/copy:size=20000,eval_size=1000,digits=4,wrong_share=0.25,ramble_share=0.3,seed=0` or
`synthetic/arithmetic:digits=2,ops=+-`.

Rows (one dict per question, HH format from `conversation.py`):
    prompt    "\\n\\nHuman: Repeat: 4 8 1 9\\n\\nAssistant:"
    response  the SFT demonstration; wrong with probability `wrong_share`, so SFT leaves room for PPO
    chosen    always the correct answer, e.g. " 4 8 1 9"
    rejected  with probability `ramble_share` the correct answer followed by text that never stops
              (teaches the reward model to value stopping), otherwise a near miss (copy: a digit
              dropped, added or stuttered; arithmetic: off by one or ten, a digit changed or swapped)
    correct   whether `response` is the correct answer

Generation is deterministic per (spec, split); train and eval use separate random streams, and eval
questions never occur in train, so eval accuracy measures generalisation rather than recall.

Run `python -m training.utils.data.synthetic --spec 'synthetic/copy:size=10' --split train`
to print rows as JSON lines.
"""
import argparse
import dataclasses
import json
import random
import re
from dataclasses import dataclass
from typing import ClassVar

from training.utils.data.conversation import HUMAN, format_reply, format_user_turn
from training.utils.errors import UserInputError, report_user_errors

SYNTHETIC_PREFIX = "synthetic/"
SPLITS = ("train", "eval")
SUPPORTED_OPS = "+-"
MAX_DIGITS = 9  # operands / sequences of up to 9 digits: far beyond what the tiny models can learn

# EOS texts a decoded response may still carry when special tokens were not skipped.
TRAILING_EOS_TEXTS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>")

RAMBLE_FILLERS = ("and", "then", "so", "the", "answer", "is", "also", "plus", "more", "again", "maybe")
RAMBLE_EXTRA_TOKENS = (20, 40)  # rough token budget of the never-ending tail (digits count one each)


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters every task has; each can be set in the dataset name."""

    TASK: ClassVar[str] = ""
    size: int = 20000  # train rows
    eval_size: int = 1000  # eval rows, with questions unseen in train
    wrong_share: float = 0.25  # share of SFT demonstrations that give a wrong answer
    ramble_share: float = 0.3  # share of rejected replies that are the right answer, then rambling
    seed: int = 0

    @property
    def name(self) -> str:
        """The canonical dataset name with every parameter spelled out (stable for cache keys)."""
        params = ",".join(f"{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self))
        return f"{SYNTHETIC_PREFIX}{self.TASK}:{params}"

    # What a task defines: how to draw a question, say it, answer it, and miss the answer narrowly.
    def draw_question(self, rng: random.Random) -> tuple:
        raise NotImplementedError

    def question_space_size(self) -> int:
        raise NotImplementedError

    def validation_problems(self) -> list[str]:
        problems = []
        if self.size < 1:
            problems.append(f"size={self.size} must be at least 1")
        if self.eval_size < 1:
            problems.append(f"eval_size={self.eval_size} must be at least 1")
        for key in ("wrong_share", "ramble_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                problems.append(f"{key}={getattr(self, key)} must be between 0 and 1")
        return problems


@dataclass(frozen=True)
class ArithmeticSpec(SyntheticSpec):
    """`synthetic/arithmetic`: "What is a op b?" with integer operands."""

    TASK: ClassVar[str] = "arithmetic"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
    digits: int = 2  # operands are drawn uniformly from 0 .. 10**digits - 1
    ops: str = "+"  # "+", "-" or "+-"; subtraction orders operands so results are never negative

    def draw_question(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.ops)
        a, b = rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits)
        if op == "-" and a < b:
            a, b = b, a
        return a, op, b

    def question_space_size(self) -> int:
        operands = 10 ** self.digits
        sizes = {"+": operands * operands, "-": operands * (operands + 1) // 2}  # "-" keeps a >= b only
        return sum(sizes[op] for op in self.ops)

    def validation_problems(self) -> list[str]:
        problems = super().validation_problems()
        if not 1 <= self.digits <= MAX_DIGITS:
            problems.append(f"digits={self.digits} must be between 1 and {MAX_DIGITS}")
        if not self.ops or set(self.ops) - set(SUPPORTED_OPS) or len(set(self.ops)) != len(self.ops):
            problems.append(f"ops={self.ops} must be '+', '-' or '+-'")
        return problems

    @staticmethod
    def question_text(question: tuple[int, str, int]) -> str:
        a, op, b = question
        return f"What is {a} {op} {b}?"

    @classmethod
    def parse_question(cls, text: str) -> tuple[int, str, int] | None:
        match = cls.PATTERN.search(text)
        return None if match is None else (int(match.group(1)), match.group(2), int(match.group(3)))

    @staticmethod
    def answer_text(question: tuple[int, str, int]) -> str:
        a, op, b = question
        return str(a + b if op == "+" else a - b)

    @staticmethod
    def near_miss(rng: random.Random, answer: str) -> str:
        """Off by one or ten, or one digit changed or swapped: what a weak model plausibly says."""
        value = int(answer)
        while True:
            kind = rng.choice(("off_by_one", "off_by_ten", "change_digit", "swap_digits"))
            if kind == "off_by_one":
                candidate = value + rng.choice((-1, 1))
            elif kind == "off_by_ten":
                candidate = value + rng.choice((-10, 10))
            elif kind == "change_digit":
                position = rng.randrange(len(answer))
                digits = "123456789" if position == 0 and len(answer) > 1 else "0123456789"
                candidate = int(answer[:position] + rng.choice(digits) + answer[position + 1:])
            else:
                if len(answer) < 2:
                    continue
                i = rng.randrange(len(answer) - 1)
                candidate = int(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:])
            if candidate != value and candidate >= 0:
                return str(candidate)


@dataclass(frozen=True)
class CopySpec(SyntheticSpec):
    """`synthetic/copy`: "Repeat: d1 d2 ... dn" answered by the same digits, space-separated."""

    TASK: ClassVar[str] = "copy"
    PATTERN: ClassVar[re.Pattern] = re.compile(r"Repeat:((?: \d)+)(?=\s|$)")
    digits: int = 4  # length of the digit sequence to repeat

    def draw_question(self, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.randrange(10) for _ in range(self.digits))

    def question_space_size(self) -> int:
        return 10 ** self.digits

    def validation_problems(self) -> list[str]:
        problems = super().validation_problems()
        if not 1 <= self.digits <= MAX_DIGITS:
            problems.append(f"digits={self.digits} must be between 1 and {MAX_DIGITS}")
        return problems

    @staticmethod
    def question_text(question: tuple[int, ...]) -> str:
        return "Repeat: " + " ".join(map(str, question))

    @classmethod
    def parse_question(cls, text: str) -> tuple[int, ...] | None:
        match = cls.PATTERN.search(text)
        return None if match is None else tuple(int(d) for d in match.group(1).split())

    @staticmethod
    def answer_text(question: tuple[int, ...]) -> str:
        return " ".join(map(str, question))

    @staticmethod
    def near_miss(rng: random.Random, answer: str) -> str:
        """A digit dropped, a digit added, or a digit stuttered (written twice).

        Only length mistakes, on purpose: the tiny reward model tells them apart reliably (>= 95% in a
        short CPU run), while a substituted digit it learns only slowly (~70% after two epochs in our
        runs). The checker still counts every mistake, substitutions included.
        """
        digits = answer.split()
        kind = rng.choice(("drop", "add", "stutter") if len(digits) > 1 else ("add", "stutter"))
        candidate = list(digits)
        if kind == "drop":
            del candidate[rng.randrange(len(candidate))]
        elif kind == "add":
            candidate.insert(rng.randrange(len(candidate) + 1), str(rng.randrange(10)))
        else:
            i = rng.randrange(len(candidate))
            candidate.insert(i, candidate[i])
        return " ".join(candidate)


TASKS = {spec.TASK: spec for spec in (CopySpec, ArithmeticSpec)}


def is_synthetic_name(name: str) -> bool:
    """True for any `--data_path` entry that asks for built-in synthetic data."""
    return name.startswith(SYNTHETIC_PREFIX)


def _usage() -> str:
    return "; ".join(f"'{SYNTHETIC_PREFIX}{task}[:key=value,...]' with keys {', '.join(_keys(spec))}"
                     for task, spec in TASKS.items())


def _keys(spec_class) -> list[str]:
    return [field.name for field in dataclasses.fields(spec_class)]


def parse_synthetic_name(name: str) -> SyntheticSpec:
    """Turn `synthetic/<task>[:key=value,...]` into a validated spec."""
    task, _, params_text = name.removeprefix(SYNTHETIC_PREFIX).partition(":")
    if not is_synthetic_name(name) or task not in TASKS:
        raise UserInputError(f"unknown synthetic dataset '{name}': use {_usage()}")
    spec_class = TASKS[task]
    keys = _keys(spec_class)
    values = {}
    for item in filter(None, (part.strip() for part in params_text.split(","))):
        key, sep, raw = (text.strip() for text in item.partition("="))
        if not sep or key not in keys:
            raise UserInputError(f"bad parameter '{item}' in '{name}': write key=value with keys {', '.join(keys)}")
        if key in values:
            raise UserInputError(f"parameter '{key}' is given twice in '{name}': keep one")
        values[key] = _convert(name, spec_class, key, raw)
    spec = spec_class(**values)
    problems = spec.validation_problems()
    if problems:
        raise UserInputError(f"bad parameter in '{name}': {'; '.join(problems)} (valid keys: {', '.join(keys)})")
    _require_enough_unseen(spec, _train_question_set(spec))  # fail now, not after train data is written
    return spec


def _convert(name: str, spec_class, key: str, raw: str):
    field_type = type(getattr(spec_class(), key))
    try:
        return field_type(raw)
    except ValueError:
        raise UserInputError(f"bad value '{key}={raw}' in '{name}': {key} must be {field_type.__name__} "
                             f"(valid keys: {', '.join(_keys(spec_class))})") from None


def generate_rows(spec: SyntheticSpec, split: str) -> list[dict]:
    """The rows of one split; the same spec and split always give the same rows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _stream(spec, split)
    if split == "train":
        questions = _draw_train_questions(spec, rng)
    else:
        questions = _draw_unseen_questions(spec, rng, seen=_train_question_set(spec))
    return [_make_row(spec, rng, question) for question in questions]


def _stream(spec: SyntheticSpec, split: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs and processes.
    return random.Random(f"{SYNTHETIC_PREFIX}{spec.TASK}|seed={spec.seed}|split={split}")


def _draw_train_questions(spec: SyntheticSpec, rng: random.Random) -> list[tuple]:
    """All train questions come first in the train stream, so eval can replay them without the rows."""
    return [spec.draw_question(rng) for _ in range(spec.size)]


def _train_question_set(spec: SyntheticSpec) -> set[tuple]:
    return set(_draw_train_questions(spec, _stream(spec, "train")))


def _draw_unseen_questions(spec: SyntheticSpec, rng: random.Random, seen: set) -> list[tuple]:
    """Distinct questions absent from `seen`, by rejection sampling (after checking enough exist)."""
    _require_enough_unseen(spec, seen)
    chosen: list[tuple] = []
    taken = set(seen)
    while len(chosen) < spec.eval_size:
        question = spec.draw_question(rng)
        if question not in taken:
            taken.add(question)
            chosen.append(question)
    return chosen


def _require_enough_unseen(spec: SyntheticSpec, seen: set) -> None:
    available = spec.question_space_size() - len(seen)
    if available < spec.eval_size:
        raise UserInputError(f"'{spec.name}' leaves only {available} questions unseen by train for "
                             f"eval_size={spec.eval_size}: raise digits or lower size or eval_size")


def _make_row(spec: SyntheticSpec, rng: random.Random, question: tuple) -> dict:
    answer = spec.answer_text(question)
    correct = rng.random() >= spec.wrong_share
    response = answer if correct else spec.near_miss(rng, answer)
    if rng.random() < spec.ramble_share:
        rejected = _ramble(rng, answer)
    else:
        rejected = format_reply(spec.near_miss(rng, answer))
    return {
        "prompt": format_user_turn(spec.question_text(question)),
        "response": format_reply(response),
        "chosen": format_reply(answer),
        "rejected": rejected,
        "correct": correct,
    }


def _ramble(rng: random.Random, answer: str) -> str:
    """The right answer followed by filler that never ends, as a model that cannot stop would write."""
    budget = rng.randint(*RAMBLE_EXTRA_TOKENS)
    words = []
    while budget > 0:
        word = rng.choice(RAMBLE_FILLERS) if rng.random() < 0.6 else str(rng.choice((answer, rng.randrange(100))))
        words.append(word)
        budget -= sum(c.isdigit() for c in word) or 1  # a number costs a token per digit
    return format_reply(f"{answer} and " + " ".join(words))


def answer_for(prompt: str) -> str:
    """The correct answer text to the synthetic question in the last human turn of `prompt`."""
    last_human_turn = prompt.rsplit(HUMAN, 1)[-1]
    for spec_class in TASKS.values():
        question = spec_class.parse_question(last_human_turn)
        if question is not None:
            return spec_class.answer_text(question)
    raise ValueError(f"not a synthetic prompt (expected one of: 'Repeat: 4 8 1 9', 'What is 37 + 48?'): {prompt!r}")


def check_answer(prompt: str, response: str) -> bool:
    """True only when `response` is exactly the correct answer (surrounding space and one EOS text allowed)."""
    text = response.strip()
    for eos_text in TRAILING_EOS_TEXTS:
        if text.endswith(eos_text):
            text = text[: -len(eos_text)].rstrip()
            break
    return text == answer_for(prompt)


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description="Print synthetic rows as JSON lines.")
    parser.add_argument("--spec", default=f"{SYNTHETIC_PREFIX}{CopySpec.TASK}", help="dataset name with parameters")
    parser.add_argument("--split", choices=SPLITS, default="train")
    args = parser.parse_args()
    for row in generate_rows(parse_synthetic_name(args.spec), args.split):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
