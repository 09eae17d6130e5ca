"""Rule rewards (training/utils/rlhf/rewards.py): the synthetic checker, the GSM8K-style math checker, a user's
reward function loaded from a file, and every bad input, each a one-line UserInputError naming the input.

The GSM8K strings are copied from the test split (gsm8k_test.sft.jsonl rows: prompt, and response ending
"#### <answer>"), so the tests need no data directory.
"""
from decimal import Decimal

import pytest
import torch

from training.utils.data.synthetic import generate_rows, parse_synthetic_name
from training.utils.errors import UserInputError
from training.utils.rlhf.rewards import (
    check_references,
    compute_rule_rewards,
    load_reward_function,
    math_reward,
    needs_references,
    reference_answer,
    reply_answer,
    synthetic_reward,
)

JANET_PROMPT = ("\n\nHuman: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                "muffins for her friends every day with four. She sells the remainder at the farmers' market daily "
                "for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?"
                "\n\nAssistant:")
JANET_REFERENCE = (" Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer’s "
                   "market.\n#### 18")
JOSH_PROMPT = ("\n\nHuman: Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in "
               "$50,000 in repairs.  This increased the value of the house by 150%.  How much profit did he make?"
               "\n\nAssistant:")
JOSH_REFERENCE = (" The cost of the house and repairs came out to 80,000+50,000=$130,000\nHe increased the value of "
                  "the house by 80,000*1.5=120,000\nSo the new value of the house is 120,000+80,000=$200,000\nSo he "
                  "made a profit of 200,000-130,000=$70,000\n#### 70000")


def rewards(spec: str, prompts, replies, references=None) -> list[float]:
    references = [None] * len(replies) if references is None else references
    return compute_rule_rewards(load_reward_function(spec), spec, prompts, replies, references).tolist()


def user_error(spec: str, prompts, replies, references=None) -> str:
    with pytest.raises(UserInputError) as caught:
        rewards(spec, prompts, replies, references)
    message = str(caught.value)
    assert "\n" not in message  # one line, no traceback
    return message


# ---------------------------------------------------------------- synthetic


def test_synthetic_reward_on_generated_rows():
    rows = generate_rows(parse_synthetic_name("synthetic/arithmetic:size=4,eval_size=2"), "train")
    prompts = [row["prompt"] for row in rows]
    # chosen is always the right answer; rejected a near miss or the right answer followed by rambling
    assert rewards("synthetic", prompts, [row["chosen"] for row in rows]) == [1.0] * 4
    assert rewards("synthetic", prompts, [row["rejected"] for row in rows]) == [0.0] * 4
    copy_rows = generate_rows(parse_synthetic_name("synthetic/copy:size=2,eval_size=1"), "train")
    assert rewards("synthetic", [r["prompt"] for r in copy_rows], [r["chosen"] for r in copy_rows]) == [1.0, 1.0]


def test_synthetic_reward_on_hh_and_plain_prompts():
    hh, plain = "\n\nHuman: What is 3 + 4?\n\nAssistant:", "What is 3 + 4?"
    # 3 + 4 = 7: " 7" and "7<|endoftext|>" are right, " 8" and " 7 and more" are not
    replies = [" 7", "7<|endoftext|>", " 8", " 7 and more"]
    assert rewards("synthetic", [hh] * 4, replies) == [1.0, 1.0, 0.0, 0.0]
    assert rewards("synthetic", [plain] * 4, replies) == [1.0, 1.0, 0.0, 0.0]
    assert synthetic_reward(["Repeat: 4 8 1 9"], [" 4 8 1 9"], [None]) == [1.0]


def test_synthetic_reward_on_a_non_synthetic_prompt_names_the_row():
    message = user_error("synthetic", ["What is 3 + 4?", JANET_PROMPT], [" 7", " 18"])
    assert "reward function 'synthetic' raised ValueError: row 1: not a synthetic prompt" in message


# ---------------------------------------------------------------- math (GSM8K)


def test_reference_and_reply_answers():
    assert reference_answer(JANET_REFERENCE) == 18
    assert reference_answer(JOSH_REFERENCE) == 70000
    assert reference_answer("18") == 18 and reference_answer(" $70,000 ") == 70000  # bare-number references
    assert reference_answer("no answer here") is None and reference_answer(None) is None
    assert reply_answer("She makes 9 * 2 = $18 every day.\n#### 18") == 18
    assert reply_answer("So he made a profit of $70,000.") == 70000  # no ####: the last number, "$", "," and "."
    assert reply_answer("It is 1,234.50 dollars") == Decimal("1234.50")
    assert reply_answer("2-1=1") == 1  # a minus between digits is an operator, not a sign
    assert reply_answer("It dropped to -3 degrees") == -3
    assert reply_answer("#### 18\n\nHuman: and #### 5") == 18  # the first #### commits; what follows rambles
    assert reply_answer("I do not know") is None and reply_answer("#### none") is None


def test_math_reward_on_gsm8k_strings():
    prompts = [JANET_PROMPT] * 4 + [JOSH_PROMPT] * 4
    replies = ["She sells 9 eggs and makes 9 * 2 = $18 every day.\n#### 18",  # right, with ####
               "She makes $18.",  # right: the last number, "$" and the final "." removed
               "#### $18.00",  # right: 18.00 == 18
               "16 - 3 - 4 = 9 eggs, 9 * 2 = 17",  # wrong final number
               "He made a profit of $70,000.",  # right: "," removed
               "#### 70,000",  # right
               "200,000-130,000=$70,000 so the answer is 130,000",  # wrong: the last number is 130000
               "I cannot tell"]  # no number at all
    references = [JANET_REFERENCE] * 4 + [JOSH_REFERENCE] * 3 + ["70000"]  # the last one a bare number
    assert rewards("math", prompts, replies, references) == [1, 1, 1, 0, 1, 1, 0, 0]
    assert math_reward(["q"], ["The answer is 18"], ["$18"]) == [1.0]


def test_math_needs_references():
    assert needs_references("math")
    assert not needs_references("synthetic") and not needs_references("my_reward.py:score")
    check_references("math", [JANET_REFERENCE, "18"])  # fine
    check_references("synthetic", [None, None])  # the synthetic reward needs none
    with pytest.raises(UserInputError, match=r"the math reward needs reference answers: data rows need a "
                                             r"response/chosen with '#### <answer>' \(row 1 has no reference\)"):
        check_references("math", [JANET_REFERENCE, None])
    with pytest.raises(UserInputError, match=r"\(row 0 has reference ' Janet sells 16"):
        check_references("math", [JANET_REFERENCE.replace("#### 18", "")])
    # without the check first, the reward itself refuses the row
    message = user_error("math", [JANET_PROMPT, JOSH_PROMPT], [" 18", " 70000"], [JANET_REFERENCE, None])
    assert "reward function 'math' raised ValueError: row 1 has no reference answer" in message


# ---------------------------------------------------------------- a user's function from a file


def write(tmp_path, text: str, name: str = "my_reward.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_user_function_from_a_file(tmp_path):
    path = write(tmp_path, "def length_reward(prompts, replies, references):\n"
                           "    return [float(len(reply)) for reply in replies]\n"
                           "def says_yes(prompts, replies, references):\n"
                           "    return [reply.strip() == 'yes' for reply in replies]\n"
                           "def as_tensor(prompts, replies, references):\n"
                           "    import torch\n"
                           "    return torch.tensor([0.25] * len(replies))\n")
    result = compute_rule_rewards(load_reward_function(f"{path}:length_reward"), "x", ["a", "b"], ["hi", "hello"],
                                  [None, None])
    assert result.dtype == torch.float32 and result.tolist() == [2.0, 5.0]
    assert rewards(f"{path}:says_yes", ["a", "b"], [" yes", "no"]) == [1.0, 0.0]  # bools count as 1 / 0
    assert rewards(f"{path}:as_tensor", ["a", "b"], ["x", "y"]) == [0.25, 0.25]


def test_user_file_is_imported_only_when_asked_for(tmp_path):
    marker = tmp_path / "imported"
    path = write(tmp_path, f"open({str(marker)!r}, 'w').close()\ndef f(p, r, x):\n    return [0.0] * len(r)\n")
    load_reward_function("math")
    assert not marker.exists()
    load_reward_function(f"{path}:f")
    assert marker.exists()


def test_unknown_reward_names(tmp_path):
    with pytest.raises(UserInputError, match="unknown reward 'maths': use one of synthetic, math or "
                                             "'path/to/file.py:function'"):
        load_reward_function("maths")
    with pytest.raises(UserInputError, match="name the function too: 'rewards.py:<function>'"):
        load_reward_function("rewards.py")
    with pytest.raises(UserInputError, match="needs both a file and a function"):
        load_reward_function(f"{write(tmp_path, 'x = 1')}:")


def test_missing_file(tmp_path):
    spec = f"{tmp_path}/nope.py:score"
    with pytest.raises(UserInputError, match=r"reward function file '.*nope\.py' does not exist .* check the path"):
        load_reward_function(spec)


@pytest.mark.parametrize("source, reason", [
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("def score(:\n", "SyntaxError"),
    ("import a_module_that_does_not_exist\n", "ModuleNotFoundError: No module named 'a_module_that_does_not_exist'"),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
])
def test_file_that_fails_to_import(tmp_path, source, reason):
    path = write(tmp_path, source, name="broken_reward.py")
    with pytest.raises(UserInputError) as caught:
        load_reward_function(f"{path}:score")
    message = str(caught.value)
    assert "\n" not in message
    assert f"reward function file '{path}' failed to import ({reason}" in message


def test_no_such_function_or_not_callable(tmp_path):
    path = write(tmp_path, "THRESHOLD = 3\ndef score(prompts, replies, references):\n    return [0.0] * len(replies)\n"
                           "def _helper():\n    pass\n")
    with pytest.raises(UserInputError, match=r"'.*my_reward\.py' has no function 'scores' \(its functions: score\)"):
        load_reward_function(f"{path}:scores")
    with pytest.raises(UserInputError, match=r"'THRESHOLD' in '.*my_reward\.py' is not callable \(it is int 3\)"):
        load_reward_function(f"{path}:THRESHOLD")


# ---------------------------------------------------------------- what the function returns


@pytest.fixture
def user_functions(tmp_path):
    return write(tmp_path, "def raises(p, r, x):\n    raise KeyError('no such key')\n"
                           "def raises_long(p, r, x):\n    raise ValueError('first line\\nsecond line')\n"
                           "def too_few(p, r, x):\n    return [1.0]\n"
                           "def a_word(p, r, x):\n    return [1.0, 'high']\n"
                           "def a_none(p, r, x):\n    return [None, 1.0]\n"
                           "def a_nan(p, r, x):\n    return [1.0, float('nan')]\n"
                           "def an_inf(p, r, x):\n    return [float('-inf'), 1.0]\n"
                           "def a_number(p, r, x):\n    return 1.0\n", name="checks.py")


def test_function_that_raises(user_functions):
    message = user_error(f"{user_functions}:raises", ["q1", "q2"], ["a", "b"])
    assert message.startswith(f"reward function '{user_functions}:raises' raised KeyError: 'no such key'")
    message = user_error(f"{user_functions}:raises_long", ["q1", "q2"], ["a", "b"])
    assert "raised ValueError: first line;" in message and "second line" not in message


def test_wrong_count_or_type(user_functions):
    assert (f"reward function '{user_functions}:too_few' returned 1 rewards for 2 replies: it must return one "
            "number per reply") in user_error(f"{user_functions}:too_few", ["q1", "q2"], ["a", "b"])
    assert "returned a float: it must return a list of numbers" in user_error(f"{user_functions}:a_number",
                                                                             ["q1", "q2"], ["a", "b"])


@pytest.mark.parametrize("function, row, shown", [("a_word", 1, "'high'"), ("a_none", 0, "None"),
                                                  ("a_nan", 1, "nan"), ("an_inf", 0, "-inf")])
def test_bad_value_names_the_row_and_its_prompt(user_functions, function, row, shown):
    prompts = ["\n\nHuman: What is 1 + 1?\n\nAssistant:", "\n\nHuman: What is 2 + 2?\n\nAssistant:"]
    message = user_error(f"{user_functions}:{function}", prompts, ["a", "b"])
    assert message == (f"reward function '{user_functions}:{function}' returned {shown} for row {row} "
                       f"(prompt {prompts[row]!r}): each reward must be a finite number")


def test_a_long_prompt_is_shortened(user_functions):
    message = user_error(f"{user_functions}:a_word", ["q1", JOSH_PROMPT], ["a", "b"])
    # 60 characters shown: the prompt's first 57, then "..."
    assert "(prompt '\\n\\nHuman: Josh decides to try flipping a house.  He buys a...')" in message
    assert "150%" not in message
