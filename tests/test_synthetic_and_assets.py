"""The built-in synthetic task, the shipped tokenizer and the tiny model configs (CPU, offline, seconds)."""
import dataclasses
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.utils.assets import ASSETS_DIR, TOKENIZER_DIR
from training.utils.assets.chat_tokenizers import write_chat_tokenizers
from training.utils.assets.train_tokenizer import synthetic_texts, train
from training.utils.data.conversation import format_user_turn
from training.utils.data.synthetic import (
    ArithmeticSpec,
    CopySpec,
    answer_for,
    check_answer,
    generate_rows,
    is_synthetic_name,
    parse_synthetic_name,
)
from training.utils.errors import UserInputError
from training.utils.model.configs import list_tiny_configs, load_tiny_config
from training.utils.tokenizer import load_tokenizer

SMALL = ArithmeticSpec(size=2000, eval_size=300)


@pytest.fixture(scope="module")
def small_train_rows():
    return generate_rows(SMALL, "train")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)


# ---------------------------------------------------------------- synthetic data


def test_parse_name_reads_every_key_and_defaults():
    assert is_synthetic_name("synthetic/arithmetic") and not is_synthetic_name("Dahoas/rm-static")
    assert parse_synthetic_name("synthetic/arithmetic") == ArithmeticSpec()
    spec = parse_synthetic_name("synthetic/arithmetic:size=50, eval_size=7,digits=3,ops=+-,"
                                "wrong_share=0.5,ramble_share=0,seed=4")
    assert spec == ArithmeticSpec(size=50, eval_size=7, digits=3, ops="+-", wrong_share=0.5,
                                  ramble_share=0.0, seed=4)
    assert parse_synthetic_name(spec.name) == spec


@pytest.mark.parametrize("name, offending", [
    ("synthetic/arithmetic:sise=10", "sise=10"),
    ("synthetic/arithmetic:size", "size"),
    ("synthetic/arithmetic:digits=two", "digits=two"),
    ("synthetic/arithmetic:wrong_share=1.5", "wrong_share=1.5"),
    ("synthetic/arithmetic:ops=*", "ops=*"),
    ("synthetic/arithmetic:size=0", "size=0"),
    ("synthetic/arithmetic:seed=1,seed=2", "seed"),
    ("synthetic/algebra", "synthetic/algebra"),
    ("synthetic/copy:digits=3", "eval_size=1000"),  # 1000 sequences, most of them seen in train
    ("synthetic/arithmetic:digits=1", "eval_size=1000"),  # 100 questions cannot hold 1000 unseen ones
])
def test_bad_spec_is_a_user_error_naming_the_input(name, offending):
    with pytest.raises(UserInputError) as error:
        parse_synthetic_name(name)
    message = str(error.value)
    assert offending in message and "\n" not in message


def test_unknown_key_error_lists_valid_keys():
    with pytest.raises(UserInputError, match="size, eval_size, wrong_share, ramble_share, seed, digits, ops"):
        parse_synthetic_name("synthetic/arithmetic:colour=red")


def test_rows_are_deterministic_and_depend_on_seed(small_train_rows):
    assert generate_rows(SMALL, "train") == small_train_rows
    assert generate_rows(SMALL, "eval") == generate_rows(SMALL, "eval")
    assert generate_rows(dataclasses.replace(SMALL, seed=1), "train") != small_train_rows


def test_eval_questions_are_distinct_and_unseen_in_train(small_train_rows):
    eval_prompts = [row["prompt"] for row in generate_rows(SMALL, "eval")]
    assert len(eval_prompts) == SMALL.eval_size == len(set(eval_prompts))
    assert not set(eval_prompts) & {row["prompt"] for row in small_train_rows}


def test_row_format_and_correct_flag(small_train_rows):
    for row in small_train_rows:
        assert row["prompt"].startswith("\n\nHuman: What is ") and row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"] == f" {answer_for(row['prompt'])}"
        is_correct = row["response"] == row["chosen"]
        assert row["correct"] == is_correct == check_answer(row["prompt"], row["response"])
        assert row["response"].startswith(" ") and row["response"][1:].isdigit()


def test_wrong_share_and_ramble_share_are_honoured(small_train_rows):
    wrong = sum(row["response"] != row["chosen"] for row in small_train_rows) / len(small_train_rows)
    rambles = sum(" and " in row["rejected"] for row in small_train_rows) / len(small_train_rows)
    assert abs(wrong - SMALL.wrong_share) < 0.05
    assert abs(rambles - SMALL.ramble_share) < 0.05
    assert all(row["response"] == row["chosen"] for row in generate_rows(
        ArithmeticSpec(size=200, eval_size=10, wrong_share=0.0), "train"))


def test_rejected_is_a_wrong_number_or_a_ramble_after_the_right_one(small_train_rows):
    for row in small_train_rows:
        rejected, chosen = row["rejected"], row["chosen"]
        assert rejected != chosen and not check_answer(row["prompt"], rejected)
        if rejected[1:].isdigit():
            continue
        assert rejected.startswith(chosen + " and ")
        assert len(rejected.split()) >= 10


def test_subtraction_results_are_never_negative():
    rows = generate_rows(ArithmeticSpec(size=500, eval_size=10, ops="-"), "train")
    assert all(" - " in row["prompt"] and int(answer_for(row["prompt"])) >= 0 for row in rows)


@pytest.mark.parametrize("response, expected", [
    (" 85", True),
    ("85", True),
    (" 85 \n", True),
    (" 85<|endoftext|>", True),
    (" 85 </s>", True),
    (" 84", False),
    (" 085", False),
    (" +85", False),
    (" 85.0", False),
    (" 8 5", False),
    (" 85 and 85 and 85", False),
    (" The answer is 85", False),
    ("", False),
    (" 85<|endoftext|><|endoftext|>", False),
])
def test_check_answer_hand_written_cases(response, expected):
    assert check_answer(format_user_turn("What is 37 + 48?"), response) is expected


def test_checker_reads_the_last_human_turn_and_subtraction():
    prompt = ("\n\nHuman: What is 1 + 1?\n\nAssistant: 2" + format_user_turn("What is 90 - 7?"))
    assert answer_for(prompt) == "83"
    assert check_answer(prompt, " 83") and not check_answer(prompt, " 2")
    with pytest.raises(ValueError):
        answer_for(format_user_turn("Tell me a joke."))


def test_copy_task_name_defaults_and_rows():
    assert parse_synthetic_name("synthetic/copy") == CopySpec()
    spec = parse_synthetic_name("synthetic/copy:size=300,eval_size=50,digits=5,seed=3")
    assert spec == CopySpec(size=300, eval_size=50, digits=5, seed=3) and parse_synthetic_name(spec.name) == spec
    train_rows, eval_rows = generate_rows(spec, "train"), generate_rows(spec, "eval")
    assert not {r["prompt"] for r in eval_rows} & {r["prompt"] for r in train_rows}
    for row in train_rows:
        digits = row["prompt"].split("Repeat: ")[1].split("\n")[0]
        assert len(digits.split()) == 5 and row["chosen"] == " " + digits == " " + answer_for(row["prompt"])
        assert row["correct"] == (row["response"] == row["chosen"]) == check_answer(row["prompt"], row["response"])
        rejected = row["rejected"].split()
        assert not check_answer(row["prompt"], row["rejected"])
        if "and" in rejected:  # a ramble: the right copy, then no end
            assert row["rejected"].startswith(row["chosen"] + " and ")
        else:  # a near miss: one digit dropped, added or stuttered
            assert abs(len(rejected) - 5) == 1
    with pytest.raises(UserInputError, match="ops"):
        parse_synthetic_name("synthetic/copy:ops=+")  # arithmetic's key is not the copy task's


@pytest.mark.parametrize("response, expected", [
    (" 4 8 1 9", True), ("4 8 1 9", True), (" 4 8 1 9<|endoftext|>", True), (" 4 8 1 9 ", True),
    (" 4 8 1", False), (" 4 8 1 9 9", False), (" 4819", False), (" 4 8 9 1", False), ("", False),
])
def test_copy_checker_hand_written_cases(response, expected):
    assert check_answer(format_user_turn("Repeat: 4 8 1 9"), response) is expected


def test_unknown_synthetic_prompt_is_refused():
    with pytest.raises(ValueError, match="not a synthetic prompt"):
        check_answer(format_user_turn("Repeat: 48 19"), " 48 19")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 4096
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|endoftext|>",) * 2 + ("<|pad|>",)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0 and tokenizer.pad_token_id == 1
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    assert not set(tokenizer("a")["input_ids"]) & {0, 1}


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer("12345")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list("12345")


@pytest.mark.parametrize("text", ["今天天气很好，我们去公园散步吧。", "次の文章を読んで、質問に答えてください。"])
def test_round_trip_of_cjk_text(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_round_trip_of_synthetic_rows(tokenizer, small_train_rows):
    for row in small_train_rows[:20]:
        for reply in ("chosen", "rejected"):
            text = row["prompt"] + row[reply]
            assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_training_is_deterministic():
    corpus = synthetic_texts()[:1000]
    assert train(corpus).to_str() == train(corpus).to_str()


# ---------------------------------------------------------------- tiny configs


def test_tiny_config_names():
    names = ["tiny/llama", "tiny/llama-20m", "tiny/llama3", "tiny/opt", "tiny/opt-20m", "tiny/qwen2"]
    assert list_tiny_configs() == names
    with pytest.raises(UserInputError, match=", ".join(names)):
        load_tiny_config("tiny/gpt5")


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama", "tiny/opt-20m", "tiny/llama-20m"])
def test_tiny_config_builds_and_runs_forward(name, tokenizer):
    config = load_tiny_config(name)
    assert (config.vocab_size, config.eos_token_id, config.bos_token_id, config.pad_token_id) == (
        len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(2, config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert logits.shape == (2, 9, config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name, architecture, chat_tokens", [
    ("tiny/qwen2", "Qwen2ForCausalLM", ["<|im_start|>", "<|im_end|>"]),
    ("tiny/llama3", "LlamaForCausalLM", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                         "<|eot_id|>"])])
def test_chat_family_tiny_models_use_the_shipped_tokenizer_extended(name, architecture, chat_tokens, tokenizer):
    """The Qwen2- and Llama-3-style shapes: the shipped BPE vocabulary unchanged (same ids for plain text), their
    family's special tokens appended after it, a chat template, and a config that covers every id."""
    chat_tokenizer = load_tokenizer(name)
    assert chat_tokenizer("What is 12 + 5?", add_special_tokens=False)["input_ids"] == \
        tokenizer("What is 12 + 5?", add_special_tokens=False)["input_ids"]
    assert chat_tokenizer.convert_tokens_to_ids(chat_tokens) == list(range(4096, 4096 + len(chat_tokens)))
    assert isinstance(chat_tokenizer.chat_template, str) and chat_tokens[-1] in chat_tokenizer.chat_template
    config = load_tiny_config(name)
    assert config.architectures == [architecture] and config.vocab_size >= len(chat_tokenizer)
    assert config.bos_token_id == chat_tokenizer.bos_token_id  # Llama 3's tokenizer adds <|begin_of_text|>
    assert not hasattr(config, "tokenizer")  # the config file's tokenizer key is not a model setting


def test_shipped_chat_tokenizers_are_rebuilt_byte_for_byte(tmp_path):
    """assets/chat_tokenizers.py reproduces the shipped tokenizer-chatml/ and tokenizer-llama3/ exactly."""
    for path in write_chat_tokenizers(str(tmp_path)):
        name = os.path.basename(path)
        shipped = ASSETS_DIR / name
        assert sorted(os.listdir(path)) == sorted(os.listdir(shipped))
        for file in os.listdir(path):
            assert (tmp_path / name / file).read_bytes() == (shipped / file).read_bytes(), f"{name}/{file}"
