"""The built-in synthetic dataset: integer arithmetic with a programmatic checker.

Why it exists: tests and the default demo must run offline and must be able to *measure* learning.
A question such as "What is 37 + 48?" has exactly one right answer, so SFT accuracy, reward-model
pairwise accuracy and PPO correctness are all numbers we can assert on.

Name on `--data_path`: `synthetic/arithmetic`, optionally followed by `:key=value,...`, e.g.
`synthetic/arithmetic:size=20000,eval_size=1000,digits=2,ops=+-,wrong_share=0.2,seed=0`.

Rows (one dict per question, HH format from `conversation.py`):
    prompt    "\\n\\nHuman: What is 37 + 48?\\n\\nAssistant:"
    response  the SFT demonstration; wrong with probability `wrong_share`, so SFT leaves room for PPO
    chosen    always the correct answer, e.g. " 85"
    rejected  with probability `ramble_share` the correct answer followed by text that never stops
              (teaches the reward model to value stopping), otherwise a plausible wrong number
    correct   whether `response` is the correct answer

Generation is deterministic per (spec, split); train and eval use separate random streams, and eval
questions never occur in train, so eval accuracy measures generalisation rather than recall.

Run `python -m training.utils.data.synthetic --spec 'synthetic/arithmetic:size=10' --split train`
to print rows as JSON lines.
"""
import argparse
import dataclasses
import json
import random
import re
from dataclasses import dataclass

from training.utils.data.conversation import HUMAN, format_reply, format_user_turn
from training.utils.errors import UserInputError, report_user_errors

SYNTHETIC_PREFIX = "synthetic/"
ARITHMETIC_TASK = "arithmetic"
SPLITS = ("train", "eval")
SUPPORTED_OPS = "+-"
MAX_DIGITS = 9  # operands of up to 9 digits: far beyond what the tiny models can learn

QUESTION_TEMPLATE = "What is {a} {op} {b}?"
QUESTION_PATTERN = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
# EOS texts a decoded response may still carry when special tokens were not skipped.
TRAILING_EOS_TEXTS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>")

RAMBLE_FILLERS = ("and", "then", "so", "the", "answer", "is", "also", "plus", "more", "again", "maybe")
RAMBLE_EXTRA_TOKENS = (20, 40)  # rough token budget of the never-ending tail (digits count one each)


@dataclass(frozen=True)
class ArithmeticSpec:
    """Parameters of `synthetic/arithmetic`; every field can be set in the dataset name."""

    size: int = 20000  # train rows
    eval_size: int = 1000  # eval rows, with questions unseen in train
    digits: int = 2  # operands are drawn uniformly from 0 .. 10**digits - 1
    ops: str = "+"  # "+", "-" or "+-"; subtraction orders operands so results are never negative
    wrong_share: float = 0.25  # share of SFT demonstrations that give a wrong answer
    ramble_share: float = 0.3  # share of rejected replies that are the right answer, then rambling
    seed: int = 0

    @property
    def name(self) -> str:
        """The canonical dataset name with every parameter spelled out (stable for cache keys)."""
        params = ",".join(f"{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self))
        return f"{SYNTHETIC_PREFIX}{ARITHMETIC_TASK}:{params}"


SPEC_KEYS = tuple(field.name for field in dataclasses.fields(ArithmeticSpec))


def is_synthetic_name(name: str) -> bool:
    """True for any `--data_path` entry that asks for built-in synthetic data."""
    return name.startswith(SYNTHETIC_PREFIX)


def parse_synthetic_name(name: str) -> ArithmeticSpec:
    """Turn `synthetic/arithmetic[:key=value,...]` into a validated spec."""
    task, _, params_text = name.removeprefix(SYNTHETIC_PREFIX).partition(":")
    if not is_synthetic_name(name) or task != ARITHMETIC_TASK:
        raise UserInputError(f"unknown synthetic dataset '{name}': use "
                             f"'{SYNTHETIC_PREFIX}{ARITHMETIC_TASK}[:key=value,...]' with keys {', '.join(SPEC_KEYS)}")
    values = {}
    for item in filter(None, (part.strip() for part in params_text.split(","))):
        key, sep, raw = (text.strip() for text in item.partition("="))
        if not sep or key not in SPEC_KEYS:
            raise UserInputError(f"bad parameter '{item}' in '{name}': "
                                 f"write key=value with keys {', '.join(SPEC_KEYS)}")
        if key in values:
            raise UserInputError(f"parameter '{key}' is given twice in '{name}': keep one")
        values[key] = _convert(name, key, raw)
    spec = ArithmeticSpec(**values)
    _validate(name, spec)
    _require_enough_unseen(spec, _train_question_set(spec))  # fail now, not after train data is written
    return spec


def _convert(name: str, key: str, raw: str):
    field_type = type(getattr(ArithmeticSpec(), key))
    try:
        return field_type(raw)
    except ValueError:
        raise UserInputError(f"bad value '{key}={raw}' in '{name}': {key} must be {field_type.__name__} "
                             f"(valid keys: {', '.join(SPEC_KEYS)})") from None


def _validate(name: str, spec: ArithmeticSpec) -> None:
    problems = []
    if spec.size < 1:
        problems.append(f"size={spec.size} must be at least 1")
    if spec.eval_size < 1:
        problems.append(f"eval_size={spec.eval_size} must be at least 1")
    if not 1 <= spec.digits <= MAX_DIGITS:
        problems.append(f"digits={spec.digits} must be between 1 and {MAX_DIGITS}")
    if not spec.ops or set(spec.ops) - set(SUPPORTED_OPS) or len(set(spec.ops)) != len(spec.ops):
        problems.append(f"ops={spec.ops} must be '+', '-' or '+-'")
    for key in ("wrong_share", "ramble_share"):
        if not 0.0 <= getattr(spec, key) <= 1.0:
            problems.append(f"{key}={getattr(spec, key)} must be between 0 and 1")
    if problems:
        raise UserInputError(f"bad parameter in '{name}': {'; '.join(problems)} "
                             f"(valid keys: {', '.join(SPEC_KEYS)})")


def generate_rows(spec: ArithmeticSpec, split: str) -> list[dict]:
    """The rows of one split; the same spec and split always give the same rows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = _stream(spec, split)
    if split == "train":
        questions = _draw_train_questions(spec, rng)
    else:
        questions = _draw_unseen_questions(spec, rng, seen=_train_question_set(spec))
    return [_make_row(spec, rng, question) for question in questions]


def _stream(spec: ArithmeticSpec, split: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs and processes.
    return random.Random(f"{SYNTHETIC_PREFIX}{ARITHMETIC_TASK}|seed={spec.seed}|split={split}")


def _draw_train_questions(spec: ArithmeticSpec, rng: random.Random) -> list[tuple[int, str, int]]:
    """All train questions come first in the train stream, so eval can replay them without the rows."""
    return [_draw_question(spec, rng) for _ in range(spec.size)]


def _train_question_set(spec: ArithmeticSpec) -> set[tuple[int, str, int]]:
    return set(_draw_train_questions(spec, _stream(spec, "train")))


def _draw_question(spec: ArithmeticSpec, rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice(spec.ops)
    a, b = rng.randrange(10 ** spec.digits), rng.randrange(10 ** spec.digits)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def _draw_unseen_questions(spec: ArithmeticSpec, rng: random.Random, seen: set) -> list[tuple[int, str, int]]:
    """Distinct questions absent from `seen`, by rejection sampling (after checking enough exist)."""
    _require_enough_unseen(spec, seen)
    chosen: list[tuple[int, str, int]] = []
    taken = set(seen)
    while len(chosen) < spec.eval_size:
        question = _draw_question(spec, rng)
        if question not in taken:
            taken.add(question)
            chosen.append(question)
    return chosen


def _require_enough_unseen(spec: ArithmeticSpec, seen: set) -> None:
    available = _question_space_size(spec) - len(seen)
    if available < spec.eval_size:
        raise UserInputError(f"'{spec.name}' leaves only {available} questions unseen by train for "
                             f"eval_size={spec.eval_size}: raise digits or lower size or eval_size")


def _question_space_size(spec: ArithmeticSpec) -> int:
    operands = 10 ** spec.digits
    sizes = {"+": operands * operands, "-": operands * (operands + 1) // 2}  # "-" keeps a >= b only
    return sum(sizes[op] for op in spec.ops)


def _make_row(spec: ArithmeticSpec, rng: random.Random, question: tuple[int, str, int]) -> dict:
    a, op, b = question
    answer = _apply(a, op, b)
    correct = rng.random() >= spec.wrong_share
    response = answer if correct else _wrong_answer(rng, answer)
    if rng.random() < spec.ramble_share:
        rejected = _ramble(rng, answer)
    else:
        rejected = format_reply(str(_wrong_answer(rng, answer)))
    return {
        "prompt": format_user_turn(QUESTION_TEMPLATE.format(a=a, op=op, b=b)),
        "response": format_reply(str(response)),
        "chosen": format_reply(str(answer)),
        "rejected": rejected,
        "correct": correct,
    }


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _wrong_answer(rng: random.Random, answer: int) -> int:
    """A near miss a weak model would plausibly give: off by one or ten, or one digit changed or swapped."""
    while True:
        text = str(answer)
        kind = rng.choice(("off_by_one", "off_by_ten", "change_digit", "swap_digits"))
        if kind == "off_by_one":
            candidate = answer + rng.choice((-1, 1))
        elif kind == "off_by_ten":
            candidate = answer + rng.choice((-10, 10))
        elif kind == "change_digit":
            position = rng.randrange(len(text))
            digits = "123456789" if position == 0 and len(text) > 1 else "0123456789"
            candidate = int(text[:position] + rng.choice(digits) + text[position + 1:])
        else:
            if len(text) < 2:
                continue
            i = rng.randrange(len(text) - 1)
            candidate = int(text[:i] + text[i + 1] + text[i] + text[i + 2:])
        if candidate != answer and candidate >= 0:
            return candidate


def _ramble(rng: random.Random, answer: int) -> str:
    """The right answer followed by filler that never ends, as a model that cannot stop would write."""
    budget = rng.randint(*RAMBLE_EXTRA_TOKENS)
    words = []
    while budget > 0:
        word = rng.choice(RAMBLE_FILLERS) if rng.random() < 0.6 else str(rng.choice((answer, rng.randrange(100))))
        words.append(word)
        budget -= len(word) if word.isdigit() else 1
    return format_reply(f"{answer} and " + " ".join(words))


def _parse_question(prompt: str) -> tuple[int, str, int]:
    last_human_turn = prompt.rsplit(HUMAN, 1)[-1]
    match = QUESTION_PATTERN.search(last_human_turn)
    if match is None:
        raise ValueError(f"not a synthetic arithmetic prompt (expected '{QUESTION_TEMPLATE}'): {prompt!r}")
    return int(match.group(1)), match.group(2), int(match.group(3))


def answer_for(prompt: str) -> int:
    """The correct answer to the question in the last human turn of `prompt`."""
    return _apply(*_parse_question(prompt))


def check_answer(prompt: str, response: str) -> bool:
    """True only when `response` is exactly the correct integer (surrounding space and one EOS text allowed)."""
    text = response.strip()
    for eos_text in TRAILING_EOS_TEXTS:
        if text.endswith(eos_text):
            text = text[: -len(eos_text)].rstrip()
            break
    return text == str(answer_for(prompt))


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description="Print synthetic rows as JSON lines.")
    parser.add_argument("--spec", default=f"{SYNTHETIC_PREFIX}{ARITHMETIC_TASK}", help="dataset name with parameters")
    parser.add_argument("--split", choices=SPLITS, default="train")
    args = parser.parse_args()
    for row in generate_rows(parse_synthetic_name(args.spec), args.split):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
