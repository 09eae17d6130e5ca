"""Hostile inputs that must just work (issue 16), and the numbers behind the refusals of tests/test_bad_input.py:
a chat history longer than the model's positions, chat's stdin with bytes that are not UTF-8, chat piped into
`head`, JSON lines holding raw U+2028/U+2029/U+0085, `--eval_prompts 0`, invalid DeepSpeed configs, text files
that are not UTF-8, and lengths beyond the model's positions in prompt_eval and rw_eval."""
import io
import json
import subprocess
import sys

import pytest

from conftest import REPO, STEP1_DIR, assert_ok, clean_env, run_script, write_jsonl

from training.utils.data.chat_format import PromptFormat
from training.utils.errors import UserInputError

CHAT = REPO / "applications" / "chat.py"
TINY_POSITIONS = 512  # max_position_embeddings of tiny/opt (training/utils/model/configs/tiny-opt.json)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    from training.utils.model.reward_model import create_reward_model, save_reward_model

    directory = tmp_path_factory.mktemp("hostile") / "reward"
    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(directory), reward_stats={})
    return directory


# ---------------------------------------------------------------------------------------------- chat
def test_chat_history_beyond_the_positions_keeps_the_latest_turns(tokenizer, capsys):
    """--max_history_tokens 5000 on a 512-position model: lowered once (said on stderr), and every model input
    plus the reply fits the positions, over turns that together are far longer than the model's context."""
    from inference.chat import ChatSession, Conversation
    from inference.chatbot import ChatConfig, history_limit
    from training.utils.model.build import create_hf_model
    from training.utils.sampling import SamplingConfig

    model = create_hf_model("tiny/opt", tokenizer).eval()
    config = ChatConfig(path="tiny/opt", max_new_tokens=8, max_history_tokens=5000)
    limit = history_limit(config, model)
    assert limit == TINY_POSITIONS - 8
    assert capsys.readouterr().err.count("keeping the most recent turns that fit in 504 tokens") == 1

    out, log = io.StringIO(), io.StringIO()
    session = ChatSession(model, tokenizer, Conversation(PromptFormat(tokenizer), limit),
                          SamplingConfig(max_new_tokens=8), out, log)
    message = "word " * 200  # 200+ tokens: three turns exceed the positions (an IndexError before the fix)
    for _ in range(4):
        reply = session.answer(message)
        assert reply.new_tokens <= 8
        assert len(session.conversation._encode()) - len(tokenizer(reply.text)["input_ids"]) <= limit
    assert out.getvalue().count("Assistant: ") == 4
    assert "dropped the oldest" in log.getvalue()
    assert len(session.conversation.turns) < 4  # the oldest turns are gone, the latest kept


def test_chat_reads_stdin_that_is_not_utf8(actor_dir):
    result = subprocess.run([sys.executable, str(CHAT), "--path", str(actor_dir), "--greedy", "--max_new_tokens", "4"],
                            input=b"caf\xe9 au lait?\nhello\n", capture_output=True, env=clean_env(), timeout=300)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert result.stdout.decode("utf-8", "replace").count("Assistant: ") == 2


def test_chat_piped_into_head_exits_quietly(actor_dir):
    """`chat.py ... | head -1`: the reader goes away after one line; chat ends with exit 0 and no traceback."""
    lines = "".join(f"question {i}\n" for i in range(30))
    process = subprocess.Popen([sys.executable, str(CHAT), "--path", str(actor_dir), "--greedy", "--max_new_tokens",
                                "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=clean_env())
    process.stdin.write(lines.encode())
    process.stdin.close()
    first = process.stdout.readline()
    process.stdout.close()  # what `head -1` does after its line
    stderr = process.stderr.read().decode("utf-8", "replace")
    code = process.wait(timeout=300)
    assert first.startswith(b"Assistant: ")
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-3000:]


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_rows_with_raw_line_separators_round_trip(tmp_path, separator):
    from training.utils.data.sources import open_source, read_data_file

    rows = [{"prompt": f"first{separator}line", "response": f" two{separator}parts"},
            {"prompt": "plain", "response": " reply"}]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\r\n" for r in rows))
    assert read_data_file(path) == rows
    samples = open_source(str(path)).rows("train")
    assert [s.chosen for s in samples if f"first{separator}line" in s.prompt] == [f" two{separator}parts"]


def test_text_file_that_is_not_utf8_names_byte_and_line(tmp_path):
    from training.utils.data.unsupervised import read_utf8_text

    path = tmp_path / "wiki.txt"
    path.write_bytes("first\n\ncafé\nna\xefve".encode() + b"\n\xff\n")
    with pytest.raises(UserInputError, match=r"is not UTF-8 text: byte 20 \(line 5\) is 0xff"):
        read_utf8_text(path)


def test_pairs_cut_by_a_small_max_seq_len_say_how_long_the_replies_are(tokenizer):
    from training.utils.data.pipeline import PHASE_REWARD, DataConfig, check_max_seq_len_keeps_labels, tokenise_pairs
    from training.utils.data.sources import Sample

    rows = [Sample(prompt="\n\nHuman: q\n\nAssistant:", chosen=" a b c", rejected=" d e f g h")]
    config = DataConfig(data_path=["rows.jsonl"], max_seq_len=4)
    dataset, counts = tokenise_pairs(rows, PromptFormat(tokenizer), config)
    reply = len(tokenizer(" d e f g h", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert len(dataset) == 0 and counts["too_long"] == 1 and counts["shortest_too_long_reply"] == reply
    with pytest.raises(UserInputError, match=f"raise --max_seq_len to at least {reply + 1}"):
        check_max_seq_len_keeps_labels(config, PHASE_REWARD, counts)


def test_every_sft_sample_keeps_a_label_at_the_smallest_max_seq_len(tokenizer):
    """--max_seq_len 2 still leaves one reply token per sample to learn (the loss is never a mean over nothing)."""
    from training.utils.data.pipeline import SFTDataConfig, tokenise_sft
    from training.utils.data.sources import Sample

    rows = [Sample(prompt="\n\nHuman: a long question here\n\nAssistant:", chosen=" a long reply here")] * 3
    dataset, counts = tokenise_sft(rows, PromptFormat(tokenizer), SFTDataConfig(data_path=["x"], max_seq_len=2))
    assert len(dataset) == 3 and counts["no_label"] == 0
    assert all(sum(dataset[i]["loss_mask"][1:]) >= 1 for i in range(3))


def test_eval_prompts_zero_means_no_evaluation():
    from training.utils.data.pipeline import RaggedDataset
    from training.utils.rlhf.experience import CappedPrompts

    dataset = RaggedDataset({"prompt_ids": [[1, 2, 3], [4, 5]]})
    assert len(CappedPrompts(dataset, 8, "drop", limit=0)) == 0
    assert len(CappedPrompts(dataset, 8, "drop", limit=1)) == 1
    with pytest.raises(UserInputError, match="every prompt is longer"):
        CappedPrompts(dataset, 1, "drop", limit=0)


def test_step3_with_eval_prompts_zero_runs(tmp_path, actor_dir, reward_dir):
    result = run_script(REPO / "training" / "step3_rlhf_finetuning", [
        "main.py", "--actor_model_name_or_path", str(actor_dir), "--critic_model_name_or_path", str(reward_dir),
        "--data_path", "synthetic/copy:size=200,eval_size=20", "--data_output_path", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"), "--max_prompt_seq_len", "32", "--max_answer_seq_len", "8",
        "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4", "--eval_prompts", "0",
        "--enable_test_mode", "--test_stop_step", "1", "--dtype", "fp32"], OMP_NUM_THREADS="1")
    assert_ok(result)
    assert "eval after step" not in result.stdout + result.stderr
    assert (tmp_path / "out" / "actor" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- DeepSpeed config
@pytest.mark.parametrize("entries, phrase", [
    ({"zero_optimization": {"stage": 7}}, '"zero_optimization.stage": Input should be 0, 1, 2, 3'),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu9"}}}, '"zero_optimization.offload_optimizer.device"'),
    ({"zero_optimization": {"reduce_bucket_size": -5}}, '"zero_optimization.reduce_bucket_size": Input should be'),
    ({"train_micro_batch_size_per_gpu": "abc"}, '"train_micro_batch_size_per_gpu" must be an integer, got "abc"'),
    ({"train_batch_size": -4}, '"train_batch_size" must be at least 1, got -4'),
    ({"gradient_accumulation_steps": True}, '"gradient_accumulation_steps" must be an integer, got true'),
    ({"gradient_clipping": "1.0"}, '"gradient_clipping" must be a number'),
    ({"optimizer": 5}, '"optimizer" must be a JSON object, got 5'),
    ({"optimizer": {"type": 5}}, '"optimizer.type" must be a string'),
    ({"scheduler": {"type": "WarmupLR", "params": []}}, '"scheduler.params" must be a JSON object'),
    ({"fp16": True}, '"fp16" must be a JSON object, got true'),
    ({"bf16": {"enabled": "maybe"}}, '"bf16.enabled": Input should be a valid boolean'),
    ({"tensorboard": "on"}, '"tensorboard" must be a JSON object'),
    ({"wall_clock_breakdown": 3}, '"wall_clock_breakdown" must be true or false, got 3'),
    ({"train_batch_size": 8}, "train_batch_size is not equal to micro_batch_per_gpu"),
])
def test_invalid_deepspeed_config_entries_are_one_line(tmp_path, entries, phrase):
    from training.utils.ds_config import get_train_ds_config, merge_user_ds_config

    built = get_train_ds_config(offload=False, dtype="fp32", stage=0, train_batch_size=4, micro_batch_size=4,
                                gradient_accumulation_steps=1, device="cpu")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(UserInputError) as err:
        merge_user_ds_config(built, str(path))
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_valid_deepspeed_config_entries_pass(tmp_path):
    from training.utils.ds_config import get_train_ds_config, merge_user_ds_config

    built = get_train_ds_config(offload=True, dtype="bf16", stage=3, train_batch_size=4, micro_batch_size=4,
                                gradient_accumulation_steps=1, device="cpu")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"reduce_bucket_size": 1000}}))
    merged = merge_user_ds_config(built, str(path))
    assert merged["gradient_clipping"] == 0.5 and merged["zero_optimization"]["stage"] == 3


# ---------------------------------------------------------------------------------------------- lengths
def test_position_limit_reads_each_family_and_none_means_no_limit():
    from transformers import BloomConfig, GPT2Config, OPTConfig

    from training.utils.model.build import check_fits_positions, position_limit

    assert position_limit(OPTConfig(max_position_embeddings=2048)) == 2048
    assert position_limit(GPT2Config(n_positions=1024)) == 1024
    assert position_limit(BloomConfig()) is None  # ALiBi: no position table
    check_fits_positions(BloomConfig(), 10**6, "--max_seq_len 1000000", "bloom", "")
    with pytest.raises(UserInputError, match="--max_seq_len 1025 is more than the 1024 positions of model 'gpt2'"):
        check_fits_positions(GPT2Config(), 1025, "--max_seq_len 1025", "gpt2", "lower it to {limit}")


def test_prompt_eval_refuses_a_prompt_beyond_the_positions(capsys):
    from training.step1_supervised_finetuning import prompt_eval

    with pytest.raises(SystemExit) as exit_:
        prompt_eval.main(["--model_name_or_path_baseline", "tiny/opt", "--model_name_or_path_finetune", "tiny/opt",
                          "--prompts", "short", "word " * 600, "--max_new_tokens", "16"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert line.startswith("error: prompt 1 (") and "+ --max_new_tokens 16 is more than the 512 positions" in line


def test_rw_eval_refuses_max_seq_len_beyond_the_positions(reward_dir, capsys):
    from training.step2_reward_model_finetuning import rw_eval

    with pytest.raises(SystemExit) as exit_:
        rw_eval.main(["--model_name_or_path", str(reward_dir), "--prompt", "q", "--chosen", "a",
                      "--max_seq_len", "2048"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert line == (f"error: --max_seq_len 2048 is more than the 512 positions of model '{reward_dir}' (its config's "
                    "position limit): lower --max_seq_len to at most 512")


def test_sft_at_the_position_limit_still_trains(tmp_path):
    """The limit itself is accepted: --max_seq_len 512 on a 512-position model."""
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"q{i}", "response": f" a{i}"} for i in range(20)])
    result = run_script(STEP1_DIR, ["main.py", "--model_name_or_path", "tiny/opt", "--data_path",
                                    str(tmp_path / "rows.jsonl"), "--data_output_path", str(tmp_path / "cache"),
                                    "--output_dir", str(tmp_path / "out"), "--dtype", "fp32", "--max_seq_len", "512"],
                        OMP_NUM_THREADS="1")
    assert_ok(result)
