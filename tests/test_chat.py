"""chat.py: the conversation format equals step 1's training tokens, stopping and streaming, history
trimming, and the real command driven through a pipe (two turns, clear, quit, end of input, bad --path)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, clean_env

from inference.chat import Conversation, ReplyStreamer, generate_reply
from training.utils.data.chat_format import PromptFormat
from training.utils.data.conversation import encode_chunks, format_reply, format_user_turn, prompt_chunks
from training.utils.errors import UserInputError
from training.utils.model.load import load_causal_lm
from training.utils.sampling import SamplingConfig

CHAT = REPO / "applications" / "chat.py"
EOS_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def actor(actor_dir):
    return load_causal_lm(str(actor_dir), torch.device("cpu"))


def run_chat(actor_dir, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHAT), "--path", str(actor_dir), "--greedy", "--max_new_tokens", "6",
                           *flags], input=stdin, capture_output=True, text=True, env=clean_env(), timeout=300)


def model_inputs(stderr: str) -> list[tuple[int, str]]:
    """(token count, decoded text) of every `--show_prompt` line."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("[chat] model input ("):
            count, text = line[len("[chat] model input ("):].split(" tokens): ", 1)
            found.append((int(count), json.loads(text)))
    return found


def test_conversation_tokens_are_step1_training_tokens(tokenizer):
    from training.utils.data.pipeline import DataConfig, tokenise_sft
    from training.utils.data.sources import Sample

    conversation = Conversation(PromptFormat(tokenizer), max_input_tokens=512)
    conversation.add_user_message("What is 2 + 3?")
    conversation.add_reply("5")
    conversation.add_user_message("  And 4 + 4? ")
    model_input = conversation.model_input()

    # step 1 on the same conversation, as an HH prompt with history and as a messages row
    hh_prompt = format_user_turn("What is 2 + 3?") + format_reply("5") + format_user_turn("And 4 + 4?")
    messages = ({"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"})
    rows = [Sample(prompt=hh_prompt, demonstration=" 8"), Sample(prompt="", messages=messages)]
    trained, _ = tokenise_sft(rows, PromptFormat(tokenizer), DataConfig(data_path=("unused",)))
    reply_ids = tokenizer(" 8", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for row in (trained[0], trained[1]):
        assert model_input.ids + reply_ids == row["input_ids"]
    # the step-1 labels of the HH row are exactly the tokens the model generates next: reply + EOS
    assert [i for i, m in zip(trained[0]["input_ids"], trained[0]["loss_mask"]) if m] == reply_ids
    eos = tokenizer.eos_token_id
    assert model_input.ids.count(eos) == 1  # the earlier reply is closed by the EOS id, not by EOS text
    assert tokenizer.decode(model_input.ids[:model_input.ids.index(eos)]) == format_user_turn("What is 2 + 3?") + " 5"


def test_history_drops_the_oldest_turns_to_fit(tokenizer):
    def encoded(turns, question):  # the model input of an untrimmed conversation
        full = Conversation(PromptFormat(tokenizer), 10_000)
        for q, a in turns:
            full.add_user_message(q)
            full.add_reply(a)
        full.add_user_message(question)
        hh_text = "".join(format_user_turn(q) + format_reply(a) for q, a in turns) + format_user_turn(question)
        assert full.model_input().ids == encode_chunks(tokenizer, prompt_chunks(hh_text))[0]
        return full.model_input().ids

    turns = [("What is 1 + 1?", "2"), ("What is 2 + 2?", "4"), ("What is 3 + 3?", "6")]
    last_two = len(encoded(turns[1:], "What is 4 + 4?"))
    conversation = Conversation(PromptFormat(tokenizer), max_input_tokens=last_two)
    for question, answer in turns:
        conversation.add_user_message(question)
        conversation.add_reply(answer)
    conversation.add_user_message("What is 4 + 4?")
    model_input = conversation.model_input()
    assert model_input.dropped_turns == 1 and not model_input.truncated
    assert model_input.ids == encoded(turns[1:], "What is 4 + 4?")
    assert [t.user for t in conversation.turns] == ["What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?"]

    # a single message longer than the limit keeps its end, as step 1 truncates long prompts
    long_message = " ".join(["word"] * 40)
    short = Conversation(PromptFormat(tokenizer), max_input_tokens=12)
    short.add_user_message(long_message)
    model_input = short.model_input()
    assert model_input.truncated and model_input.ids == encoded([], long_message)[-12:]
    assert tokenizer.decode(model_input.ids).endswith("word\n\nAssistant:")


class ForcedTokens:
    """Makes the model emit `script` token by token (a forward hook on the LM head), so the stopping and
    streaming logic meets a known continuation."""

    def __init__(self, model, script: list[int]):
        self.script, self.step = script, 0
        self.handle = model.get_output_embeddings().register_forward_hook(self.force)

    def force(self, module, inputs, logits):
        forced = torch.full_like(logits, -1e9)
        forced[..., -1, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return forced


@pytest.mark.parametrize("continuation, reply, reason, tokens", [
    (" 5\n\nHuman: and now", "5", "turn marker", 6),  # " ", "5", "\n", "\n", "Human", ":"
    (" 7<EOS> junk", "7", "eos", 3),
    (" 1 2 3 4 5 6 7 8 9", "1 2 3", "max_new_tokens", 6),
])
def test_reply_stops_at_turn_marker_eos_or_limit_and_streams_only_the_reply(actor, continuation, reply, reason,
                                                                             tokens):
    model, tokenizer = actor
    before, _, after = continuation.partition("<EOS>")
    script = tokenizer(before, add_special_tokens=False)["input_ids"]
    if after:
        script += [tokenizer.eos_token_id] + tokenizer(after, add_special_tokens=False)["input_ids"]
    streamed = []
    forced = ForcedTokens(model, script)
    try:
        prompt_ids = tokenizer(format_user_turn("What is 2 + 3?"), add_special_tokens=False)["input_ids"]
        result = generate_reply(model, tokenizer, prompt_ids, SamplingConfig(max_new_tokens=6),
                                ReplyStreamer(tokenizer, streamed.append))
    finally:
        forced.handle.remove()
    assert (result.text, result.stop_reason, result.new_tokens) == (reply, reason, tokens)
    assert "".join(streamed).strip() == reply  # the marker, EOS and the prompt never reach the output
    if reason == "turn marker":
        assert streamed == ["5"]  # "\n" was held back until it turned out to start "\n\nHuman:"


def test_sampling_is_on_when_temperature_is_positive_and_not_greedy():
    from training.utils.flags import SamplingFlags

    assert SamplingConfig.from_flags(8, SamplingFlags(temperature=0.7)).do_sample
    assert not SamplingConfig.from_flags(8, SamplingFlags(temperature=0.0)).do_sample
    assert not SamplingConfig.from_flags(8, SamplingFlags(temperature=0.7), do_sample=False).do_sample
    flags = SamplingFlags(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1)
    kwargs = SamplingConfig.from_flags(8, flags).generate_kwargs()
    assert kwargs == {"max_new_tokens": 8, "do_sample": True, "repetition_penalty": 1.1, "num_beams": 1,
                      "temperature": 0.7, "top_p": 0.9, "top_k": 5}


def test_chat_through_a_pipe_keeps_history_clears_and_quits(actor_dir):
    stdin = "What is 2 + 3?\nWhat is 4 + 4?\nclear\nWhat is 1 + 1?\nquit\nWhat is 9 + 9?\n"
    result = run_chat(actor_dir, stdin, "--show_prompt")
    assert result.returncode == 0, result.stderr[-3000:]
    inputs = model_inputs(result.stderr)
    assert len(inputs) == 3  # nothing after "quit" is read
    first, second, after_clear = (text for _, text in inputs)
    assert first == format_user_turn("What is 2 + 3?")
    # the second model input is the first turn, its reply closed by EOS, then the new question
    assert second.startswith(first) and second.endswith(EOS_TEXT + format_user_turn("What is 4 + 4?"))
    first_reply = second[len(first):-len(EOS_TEXT + format_user_turn("What is 4 + 4?"))]
    assert first_reply.startswith(" ") and inputs[1][0] > inputs[0][0] + 1
    assert after_clear == format_user_turn("What is 1 + 1?") and inputs[2][0] == inputs[0][0]
    assert "[chat] history cleared" in result.stderr
    # stdout holds the replies only: no "Human: " prompt on a pipe, no library logs
    assert result.stdout.count("Assistant: ") == 3 and not result.stdout.startswith("Human")
    assert result.stdout.split("Assistant: ")[1].startswith(first_reply.strip())
    assert "WARNING" not in result.stdout


def test_chat_ends_at_end_of_input_and_trims_long_history(actor_dir):
    stdin = "What is 2 + 3?\nWhat is 4 + 4?\nWhat is 5 + 5?"  # no "quit", no final newline
    result = run_chat(actor_dir, stdin, "--show_prompt", "--max_history_tokens", "30")
    assert result.returncode == 0, result.stderr[-3000:]
    inputs = model_inputs(result.stderr)
    assert len(inputs) == 3 and all(count <= 30 for count, _ in inputs)
    assert result.stderr.count("[chat] history trimmed: dropped the oldest 1 turn(s)") == 2
    assert all("2 + 3" not in text for _, text in inputs[1:])  # the first turn is gone for good
    assert inputs[2][1].endswith(format_user_turn("What is 5 + 5?"))


@pytest.mark.parametrize("path, expected", [("does/not/exist", "does not exist"), ("empty", "no config.json")])
def test_bad_path_is_one_clear_error(actor_dir, tmp_path, path, expected):
    if path == "empty":
        (tmp_path / "empty").mkdir()
        path = str(tmp_path / "empty")
    result = run_chat(path, "hello\n")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and path in errors[0] and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_reward_model_and_pickle_directories_are_refused(tmp_path, tokenizer):
    from conftest import write_pickle_only_model_dir

    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model, save_reward_model

    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(tmp_path / "rm"), reward_stats={})
    with pytest.raises(UserInputError, match="is a reward model"):
        load_causal_lm(str(tmp_path / "rm"), torch.device("cpu"))
    pickled = write_pickle_only_model_dir(create_hf_model("tiny/opt", tokenizer), tmp_path / "pickled")
    tokenizer.save_pretrained(pickled)
    with pytest.raises(UserInputError, match="pickle"):
        load_causal_lm(str(pickled), torch.device("cpu"))
