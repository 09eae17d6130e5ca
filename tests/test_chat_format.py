"""Prompt formats (training/utils/data/chat_format.py): chat-template masks, HH parsing, one prompt's ids across
steps, stop tokens, the saved format, and the template checks. The end-to-end runs are in test_chat_template_runs.py."""
import json

import pytest
import torch

from training.utils.data.chat_format import (
    CHAT_TEMPLATE,
    HH,
    PROMPT_FORMAT_FILE,
    ChatTemplateFormat,
    ConversationError,
    PromptFormat,
    PromptFormatFlags,
    chosen_format,
    hh_to_messages,
    resolve_prompt_format,
)
from training.utils.data.conversation import messages_to_chunks
from training.utils.data.pipeline import DataConfig, tokenise_pairs, tokenise_prompts, tokenise_sft
from training.utils.data.sources import Sample
from training.utils.errors import UserInputError
from training.utils.masks import answer_lengths, close_answers
from training.utils.tokenizer import load_tokenizer

TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
THREE_TURNS = [{"role": "system", "content": "Be brief."}, *TWO_TURNS, {"role": "user", "content": "Repeat: 1 2"},
               {"role": "assistant", "content": "1 2"}]
THINKING_TEMPLATE = (  # a Qwen3-like template: an empty <think> block before every assistant reply
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think>\n\n</think>\n\n"
    "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def template_format(model: str = "tiny/qwen2", template: str | None = None) -> ChatTemplateFormat:
    tokenizer = load_tokenizer(model)
    return ChatTemplateFormat(tokenizer, template or tokenizer.chat_template, model)


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Ids and label mask of hand-rendered text pieces, each tokenised on its own."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def sft_ids_and_mask(prompt_format, messages) -> tuple[list[int], list[bool]]:
    return prompt_format.encode([prompt_format.sft(Sample(prompt="", chosen=" x", messages=tuple(messages)))])[0]


# ---------------------------------------------------------------- SFT label masks, written out by hand
CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def test_chatml_two_turn_mask_is_exactly_the_replies_and_their_end_of_turn():
    chatml = template_format("tiny/qwen2")
    pieces = [(CHATML_SYSTEM + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n", False),
              ("5<|im_end|>", True),
              ("\n<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n", False),
              ("8<|im_end|>", True), ("\n", False)]
    ids, mask = sft_ids_and_mask(chatml, TWO_TURNS)
    assert (ids, mask) == expected(chatml.tokenizer, pieces)
    im_end = chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [i for i, m in zip(ids, mask) if m] == chatml.tokenizer("5")["input_ids"] + [im_end] + \
        chatml.tokenizer("8")["input_ids"] + [im_end]


def test_llama3_three_turn_mask_with_a_system_message():
    llama3 = template_format("tiny/llama3")
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    pieces = [("<|begin_of_text|>" + header.format("system") + "Be brief.<|eot_id|>" + header.format("user")
               + "What is 2 + 3?<|eot_id|>" + header.format("assistant"), False),
              ("5<|eot_id|>", True),
              (header.format("user") + "And 4 + 4?<|eot_id|>" + header.format("assistant"), False),
              ("8<|eot_id|>", True),
              (header.format("user") + "Repeat: 1 2<|eot_id|>" + header.format("assistant"), False),
              ("1 2<|eot_id|>", True)]
    ids, mask = sft_ids_and_mask(llama3, THREE_TURNS)
    assert (ids, mask) == expected(llama3.tokenizer, pieces)
    assert ids.count(llama3.tokenizer.bos_token_id) == 1  # the template's BOS, not a second one from the tokenizer
    assert llama3.tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "5<|eot_id|>8<|eot_id|>1 2<|eot_id|>"


def test_text_a_template_adds_around_a_reply_is_never_trained():
    thinking = template_format("tiny/qwen2", THINKING_TEMPLATE)
    ids, mask = sft_ids_and_mask(thinking, TWO_TURNS)
    text = thinking.tokenizer.decode(ids)
    assert text.count("<think>") == 2
    assert thinking.tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "5<|im_end|>8<|im_end|>"


def test_an_hh_row_trains_its_final_reply_and_a_messages_row_every_reply():
    chatml = template_format("tiny/qwen2")
    hh_row = Sample(prompt="\n\nHuman: What is 2 + 3?\n\nAssistant: 5\n\nHuman: And 4 + 4?\n\nAssistant:",
                    chosen=" 8")
    ids, mask = chatml.encode([chatml.sft(hh_row)])[0]
    assert chatml.tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "8<|im_end|>"
    assert ids == sft_ids_and_mask(chatml, TWO_TURNS)[0]  # the same conversation, rendered the same


def test_train_on_prompt_trains_every_token(tokenizer):
    rows = [Sample(prompt="", chosen=" x", messages=tuple(TWO_TURNS))]
    dataset, _ = tokenise_sft(rows, template_format(), DataConfig(data_path=(), train_on_prompt=True))
    assert all(dataset[0]["loss_mask"])


# ---------------------------------------------------------------- HH text <-> turns
@pytest.mark.parametrize("messages", [TWO_TURNS, THREE_TURNS, TWO_TURNS[:1]])
def test_hh_text_round_trips_through_turns(messages):
    hh_text = "".join(chunk.text for chunk in messages_to_chunks(messages))
    assert hh_to_messages(hh_text) == messages
    prompt = "".join(chunk.text for chunk in messages_to_chunks(messages[:-1])) if messages[-1]["role"] == \
        "assistant" else hh_text
    assert hh_to_messages(prompt) == (messages[:-1] if messages[-1]["role"] == "assistant" else messages)


def test_one_speakers_consecutive_hh_turns_become_one_turn():
    """4 of Anthropic HH-harmless's test prompts have two Assistant turns in a row."""
    text = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant:"
    assert hh_to_messages(text) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"},
                                    {"role": "user", "content": "d"}]


# ---------------------------------------------------------------- one prompt, one id sequence everywhere
@pytest.mark.parametrize("model", ["tiny/qwen2", "tiny/llama3"])
def test_a_prompt_has_the_same_ids_in_sft_pairs_rlhf_and_chat(model):
    from inference.chat import Conversation

    chat = template_format(model)
    hh_prompt = "\n\nHuman: What is 2 + 3?\n\nAssistant: 5\n\nHuman: And 4 + 4?\n\nAssistant:"
    row = Sample(prompt=hh_prompt, chosen=" 8", rejected=" 9")
    config = DataConfig(data_path=())
    sft, _ = tokenise_sft([row], chat, config)
    pairs, _ = tokenise_pairs([row], chat, config)
    prompts, _ = tokenise_prompts([row], chat, config)
    prompt_ids = prompts[0]["prompt_ids"]
    mask = sft[0]["loss_mask"]
    assert sft[0]["input_ids"][:mask.index(1)] == prompt_ids
    for side in ("chosen", "rejected"):
        reply_mask = pairs[0][f"{side}_reply_mask"]
        assert pairs[0][f"{side}_ids"][:reply_mask.index(1)] == prompt_ids
        assert pairs[0][f"{side}_ids"][-1] == chat.tokenizer.eos_token_id == chat.stop_token_ids[0]
    conversation = Conversation(chat, 10_000)
    conversation.add_user_message("What is 2 + 3?")
    conversation.add_reply("5")
    conversation.add_user_message("And 4 + 4?")
    assert conversation.model_input().ids == prompt_ids


def test_the_hh_format_is_unchanged(tokenizer):
    """PromptFormat is DeepSpeed-Chat's text, exactly as conversation.py rendered it before formats existed."""
    from training.utils.data.conversation import encode_chunks, prompt_chunks

    hh = PromptFormat(tokenizer)
    prompt = "\n\nHuman: What is 2 + 3?\n\nAssistant: 5\n\nHuman: And 4 + 4?\n\nAssistant:"
    assert hh.encode_prompt(prompt) == encode_chunks(tokenizer, prompt_chunks(prompt))[0]
    assert hh.encode_prompt(hh_to_messages(prompt)) == hh.encode_prompt(prompt)
    assert hh.stop_token_ids == [tokenizer.eos_token_id] and hh.record() == {"prompt_format": HH}


# ---------------------------------------------------------------- stop tokens
def test_the_end_of_turn_becomes_eos_and_generation_stops_at_both():
    chatml = template_format("tiny/qwen2")
    tokenizer = chatml.tokenizer
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == im_end and chatml.stop_token_ids == [im_end, endoftext]
    assert tokenizer.pad_token_id not in (im_end, endoftext)
    answers = torch.tensor([[5, im_end, 1, 1], [5, endoftext, 7, 7], [5, 6, 7, 8]])
    lengths, ended = answer_lengths(answers, chatml.stop_token_ids)
    assert lengths.tolist() == [2, 2, 4] and ended.tolist() == [True, True, False]
    # the reward model scores the end of turn it was trained on, whichever stop token ended the answer
    closed = close_answers(answers, lengths, ended, chatml.stop_token_ids[0])
    assert closed.tolist() == [[5, im_end, 1, 1], [5, im_end, 7, 7], [5, 6, 7, 8]]


# ---------------------------------------------------------------- the format travels with the model
def save_record(directory, record: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PROMPT_FORMAT_FILE).write_text(json.dumps(record))
    return str(directory)


def test_the_saved_format_is_used_without_the_flag_and_a_contradiction_is_refused(tmp_path):
    template_model = save_record(tmp_path / "sft", template_format().record())
    hh_model = save_record(tmp_path / "hh", {"prompt_format": HH})
    unset = PromptFormatFlags()
    assert chosen_format(unset, {"--path": template_model}) == CHAT_TEMPLATE
    assert chosen_format(unset, {"--path": hh_model}) == HH
    assert chosen_format(unset, {"--path": "tiny/qwen2"}) == HH  # nothing saved: DeepSpeed-Chat's default
    assert chosen_format(PromptFormatFlags(apply_chat_template=True), {"--path": template_model}) == CHAT_TEMPLATE
    with pytest.raises(UserInputError, match="--no_apply_chat_template contradicts the prompt format "
                                             "'chat_template' that --path"):
        chosen_format(PromptFormatFlags(apply_chat_template=False), {"--path": template_model})
    with pytest.raises(UserInputError, match="--apply_chat_template contradicts the prompt format 'hh'"):
        chosen_format(PromptFormatFlags(apply_chat_template=True), {"--path": hh_model})
    with pytest.raises(UserInputError, match="trained with different prompt formats: --actor .* --critic"):
        chosen_format(unset, {"--actor": template_model, "--critic": hh_model})


def test_a_saved_template_model_restores_its_stop_tokens(tmp_path):
    """Saved after the switch, the tokenizer's EOS is the end of turn; the record keeps the original EOS a stop."""
    chatml = template_format()
    directory = tmp_path / "sft"
    chatml.tokenizer.save_pretrained(directory)
    save_record(directory, chatml.record())
    reloaded = load_tokenizer(str(directory))
    restored = resolve_prompt_format(reloaded, PromptFormatFlags(), {"--path": str(directory)})
    assert restored.name == CHAT_TEMPLATE and restored.stop_token_ids == chatml.stop_token_ids
    assert restored.encode_prompt(TWO_TURNS[:1]) == chatml.encode_prompt(TWO_TURNS[:1])


def test_a_template_file_becomes_the_saved_template(tmp_path):
    path = tmp_path / "thinking.jinja"
    path.write_text(THINKING_TEMPLATE)
    tokenizer = load_tokenizer("tiny/opt")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fmt = resolve_prompt_format(tokenizer, PromptFormatFlags(chat_template=str(path)), {"--model_name_or_path": "x"})
    assert fmt.name == CHAT_TEMPLATE and tokenizer.chat_template == THINKING_TEMPLATE
    assert fmt.end_of_turn == "<|im_end|>"


# ---------------------------------------------------------------- templates that cannot work
@pytest.mark.parametrize("template, phrase", [
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "has no generation prompt"),
    ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:"
     "{% endif %}", "does not close an assistant turn with a special token"),
    ("{% for m in messages %}{{ m.content }", "fails: TemplateSyntaxError"),
    ("{% for m in messages %}<|im_start|>{{ m.role }}<|im_end|>{% endfor %}{% if add_generation_prompt %}x"
     "{% endif %}", "does not write the assistant's message"),
])
def test_a_template_that_cannot_work_is_refused(template, phrase):
    with pytest.raises(UserInputError, match=phrase):
        template_format("tiny/qwen2", template)


def test_a_tokenizer_without_a_template_needs_a_file():
    with pytest.raises(UserInputError, match="the tokenizer of 'tiny/opt' has no chat template: give one with "
                                             "--chat_template FILE"):
        resolve_prompt_format(load_tokenizer("tiny/opt"), PromptFormatFlags(apply_chat_template=True),
                              {"--model_name_or_path": "tiny/opt"})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}, {"role": "user", "content": "b"},
     {"role": "assistant", "content": "c"}],
])
def test_roles_that_do_not_alternate_are_refused(messages):
    with pytest.raises(ConversationError, match="roles do not alternate"):
        sft_ids_and_mask(template_format(), messages)
