"""Phase split semantics, the tokenisation cache, label masks and truncation."""
import os

import numpy as np
import pytest
import torch

from conftest import write_jsonl

from training.utils.data import pipeline
from training.utils.data.chat_format import PromptFormat
from training.utils.data.collators import IGNORE_INDEX, PairCollator, PromptCollator, SFTCollator
from training.utils.data.conversation import encode_chunks, prompt_chunks
from training.utils.data.pipeline import (
    PHASE_REWARD,
    PHASE_RLHF,
    PHASE_SFT,
    DataConfig,
    build_phase_data,
    parse_data_split,
    phase_slice,
)
from training.utils.data.sources import Sample
from training.utils.errors import UserInputError
from training.utils.tokenizer import load_tokenizer


def pair_rows(n: int, tag: str = "q") -> list[dict]:
    return [{"prompt": f"\n\nHuman: {tag} {i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": f" no {i}"}
            for i in range(n)]


def config(tmp_path, data_path, **overrides) -> DataConfig:
    fields = dict(data_path=tuple(data_path), data_output_path=str(tmp_path / "cache"), max_seq_len=64)
    fields.update(overrides)
    return DataConfig(**fields)


def prompts_of(phase_data, tokenizer, field="input_ids") -> set[str]:
    texts = set()
    for i in range(len(phase_data.train)):
        texts.add(tokenizer.decode(phase_data.train[i][field]).split("\n\nAssistant:")[0])
    return texts


# --- split semantics -------------------------------------------------------------------------------

def test_phase_slices_are_disjoint_and_cover_everything():
    fractions = parse_data_split("2,4,4")
    slices = [phase_slice(1000, fractions, phase, seed=7) for phase in (1, 2, 3)]
    assert [len(s) for s in slices] == [200, 400, 400]
    union = np.concatenate(slices)
    assert len(set(union.tolist())) == 1000 and sorted(union.tolist()) == list(range(1000))


def test_same_seed_same_split_other_seed_other_split():
    fractions = parse_data_split("2,4,4")
    assert np.array_equal(phase_slice(500, fractions, 2, 1), phase_slice(500, fractions, 2, 1))
    assert not np.array_equal(phase_slice(500, fractions, 2, 1), phase_slice(500, fractions, 2, 2))


def test_split_10_0_0_gives_everything_to_phase_1():
    fractions = parse_data_split("10,0,0")
    assert fractions == [1.0, 0.0, 0.0]
    assert len(phase_slice(37, fractions, 1, 0)) == 37
    assert len(phase_slice(37, fractions, 2, 0)) == 0 and len(phase_slice(37, fractions, 3, 0)) == 0


@pytest.mark.parametrize("bad", ["2,4", "a,b,c", "-1,1,1", "0,0,0"])
def test_bad_data_split_is_rejected(bad):
    with pytest.raises(UserInputError, match="--data_split"):
        parse_data_split(bad)


def test_phases_of_a_real_build_do_not_overlap(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(200))
    cfg = config(tmp_path, [str(data)])
    sft = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_SFT)
    rm = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_REWARD)
    ppo = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_RLHF)
    p1, p2 = prompts_of(sft, tokenizer), prompts_of(rm, tokenizer, "chosen_ids")
    p3 = prompts_of(ppo, tokenizer, "prompt_ids")
    assert p1 and p2 and p3
    assert not (p1 & p2) and not (p1 & p3) and not (p2 & p3)
    # 200 rows, no eval split: 180 train / 20 eval, then 2,4,4 of each
    assert (len(sft.train), len(rm.train), len(ppo.train)) == (36, 72, 72)
    assert (len(sft.eval), len(rm.eval), len(ppo.eval)) == (4, 8, 8)
    # --seed of training does not move the split: the same data_seed gives the same train set
    again = build_phase_data(config(tmp_path / "other", [str(data)]), PromptFormat(tokenizer), PHASE_SFT)
    assert prompts_of(again, tokenizer) == p1


def test_sft_only_data_is_used_whole_in_phase_1_only(tmp_path, tokenizer):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(100))
    sft_rows = [{"prompt": f"\n\nHuman: extra {i}\n\nAssistant:", "response": f" ok {i}"} for i in range(30)]
    sft_only = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    cfg = config(tmp_path, [str(pairs)], sft_only_data_path=(str(sft_only),))
    sft = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_SFT)
    assert len(sft.train) == 18 + 30  # 2/10 of the 90 train rows, plus every sft-only row
    assert sum(t.startswith("\n\nHuman: extra") for t in prompts_of(sft, tokenizer)) == 30
    rm = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_REWARD)
    assert not any(t.startswith("\n\nHuman: extra") for t in prompts_of(rm, tokenizer, "chosen_ids"))


def test_empty_phase_is_one_clear_error(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(50))
    with pytest.raises(UserInputError, match="--data_split 0,5,5 leaves no training rows for phase 1"):
        build_phase_data(config(tmp_path, [str(data)], data_split="0,5,5"), PromptFormat(tokenizer), PHASE_SFT)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def test_blending_two_sources(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(50, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", pair_rows(50, "beta"))
    sft = build_phase_data(config(tmp_path, [str(a), str(b)], data_split="10,0,0"), PromptFormat(tokenizer), PHASE_SFT)
    texts = prompts_of(sft, tokenizer)
    assert len(sft.train) == 90
    assert sum("alpha" in t for t in texts) == 45 and sum("beta" in t for t in texts) == 45


# --- cache -----------------------------------------------------------------------------------------

def test_cache_is_reused_when_nothing_changed(tmp_path, tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(60))
    cfg = config(tmp_path, [str(data)])
    first = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_SFT)

    def fail(*args, **kwargs):
        raise AssertionError("the cache was rebuilt although nothing changed")

    monkeypatch.setattr(pipeline, "_build_cache", fail)
    second = build_phase_data(cfg, PromptFormat(tokenizer), PHASE_SFT)
    assert second.cache_dir == first.cache_dir
    assert [second.train[i] for i in range(len(second.train))] == [first.train[i] for i in range(len(first.train))]


def test_cache_key_changes_with_everything_that_changes_tokens(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(60))
    base = config(tmp_path, [str(data)])
    hh = PromptFormat(tokenizer)
    dirs = {build_phase_data(base, hh, PHASE_SFT).cache_dir}
    dirs.add(build_phase_data(config(tmp_path, [str(data)], max_seq_len=32), hh, PHASE_SFT).cache_dir)
    dirs.add(build_phase_data(config(tmp_path, [str(data)], data_seed=5), hh, PHASE_SFT).cache_dir)
    dirs.add(build_phase_data(config(tmp_path, [str(data)], data_split="3,3,4"), hh, PHASE_SFT).cache_dir)
    dirs.add(build_phase_data(base, PromptFormat(tokenizer), PHASE_REWARD).cache_dir)
    eot_tokenizer = load_tokenizer("tiny/opt", add_eot_token=True, eot_token="<|end_of_turn|>")
    dirs.add(build_phase_data(base, PromptFormat(eot_tokenizer), PHASE_SFT).cache_dir)
    llama_style = load_tokenizer("tiny/opt")
    llama_style.add_tokens(["arithmetic"])  # a different vocabulary
    dirs.add(build_phase_data(base, PromptFormat(llama_style), PHASE_SFT).cache_dir)
    write_jsonl(data, pair_rows(61))  # the data changed
    dirs.add(build_phase_data(base, PromptFormat(tokenizer), PHASE_SFT).cache_dir)
    assert len(dirs) == 8


def test_eot_token_is_the_trained_end_token(tmp_path):
    tok = load_tokenizer("tiny/opt", add_eot_token=True, eot_token="<|end_of_turn|>")
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|end_of_turn|>"
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(20))
    sft = build_phase_data(config(tmp_path, [str(data)], data_split="1,0,0"), PromptFormat(tok), PHASE_SFT)
    item = sft.train[0]
    assert item["input_ids"][-1] == tok.eos_token_id and item["loss_mask"][-1] == 1


# --- masks -----------------------------------------------------------------------------------------

def test_sft_labels_cover_reply_and_eos_only(tokenizer):
    rows = [Sample(prompt="\n\nHuman: What is 2 + 2?\n\nAssistant:", chosen=" 4"),
            Sample(prompt="\n\nHuman: Say a long thing\n\nAssistant:", chosen=" one two three four")]
    dataset, _ = pipeline.tokenise_sft(rows, PromptFormat(tokenizer), DataConfig(data_path=()))
    batch = SFTCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    prompt_len = len(encode_chunks(tokenizer, prompt_chunks(rows[0].prompt))[0])
    reply = tokenizer(" 4", add_special_tokens=False)["input_ids"]
    labels = batch["labels"][0]
    assert labels[:prompt_len].eq(IGNORE_INDEX).all()
    assert labels[prompt_len:prompt_len + len(reply) + 1].tolist() == reply + [tokenizer.eos_token_id]
    assert labels[prompt_len + len(reply) + 1:].eq(IGNORE_INDEX).all()  # padding
    assert batch["attention_mask"][0].sum() == prompt_len + len(reply) + 1
    assert batch["input_ids"].shape[1] == len(dataset[1]["input_ids"])  # padded to the longest, not max_seq_len


def test_eos_is_a_label_even_when_pad_equals_eos(tokenizer):
    items = [{"input_ids": [5, 6, 0], "loss_mask": [0, 1, 1]},
             {"input_ids": [5, 6, 7, 8, 0], "loss_mask": [0, 0, 1, 1, 1]}]
    batch = SFTCollator(pad_token_id=0)(items)  # pad id == eos id == 0
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 6, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]


def test_multi_turn_trains_assistant_turns_only(tokenizer):
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "goodbye"})
    sample = Sample(prompt="unused", chosen=" goodbye", messages=messages)
    dataset, _ = pipeline.tokenise_sft([sample], PromptFormat(tokenizer), DataConfig(data_path=()))
    item = dataset[0]
    trained = [t for t, m in zip(item["input_ids"], item["loss_mask"]) if m]
    eos = tokenizer.eos_token_id
    assert trained == (tokenizer(" hello", add_special_tokens=False)["input_ids"] + [eos]
                       + tokenizer(" goodbye", add_special_tokens=False)["input_ids"] + [eos])
    text = tokenizer.decode(item["input_ids"])
    assert text.startswith("System: Be brief.\n\nHuman: hi\n\nAssistant: hello<|endoftext|>\n\nHuman: bye")


def test_history_in_prompt_gets_eos_after_each_earlier_reply(tokenizer):
    prompt = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    ids, _ = encode_chunks(tokenizer, prompt_chunks(prompt))
    assert tokenizer.decode(ids) == "\n\nHuman: q1\n\nAssistant: a1<|endoftext|>\n\nHuman: q2\n\nAssistant:"


def test_train_on_prompt_puts_prompt_in_the_loss(tokenizer):
    rows = [Sample(prompt="\n\nHuman: x\n\nAssistant:", chosen=" y")]
    dataset, _ = pipeline.tokenise_sft(rows, PromptFormat(tokenizer), DataConfig(data_path=(), train_on_prompt=True))
    assert all(dataset[0]["loss_mask"])


def test_truncation_keeps_reply_and_eos(tokenizer):
    long_prompt = "\n\nHuman: " + " ".join(["word"] * 100) + "\n\nAssistant:"
    rows = [Sample(prompt=long_prompt, chosen=" short")]
    dataset, counts = pipeline.tokenise_sft(rows, PromptFormat(tokenizer), DataConfig(data_path=(), max_seq_len=16))
    item = dataset[0]
    assert len(item["input_ids"]) == 16 and counts["prompt_truncated"] == 1
    assert item["input_ids"][-1] == tokenizer.eos_token_id and item["loss_mask"][-1] == 1
    assert item["loss_mask"][0] == 0  # some prompt context is kept


def test_pairs_end_with_eos_and_identical_pairs_are_counted(tokenizer):
    rows = [Sample(prompt="\n\nHuman: a\n\nAssistant:", chosen=" good", rejected=" bad"),
            Sample(prompt="\n\nHuman: b\n\nAssistant:", chosen=" same", rejected=" same"),
            Sample(prompt="\n\nHuman: c\n\nAssistant:", chosen=" only")]
    dataset, counts = pipeline.tokenise_pairs(rows, PromptFormat(tokenizer), DataConfig(data_path=()))
    assert len(dataset) == 1 and counts["identical_pair"] == 1 and counts["no_pair"] == 1
    batch = PairCollator(tokenizer.pad_token_id)([dataset[0]])
    assert batch["input_ids"].shape[0] == 2
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert row[int(mask.sum()) - 1] == tokenizer.eos_token_id


def test_prompts_are_left_padded():
    batch = PromptCollator(pad_token_id=1)([{"prompt_ids": [7, 8, 9]}, {"prompt_ids": [5]}])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [1, 1, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prompt_width_is_rounded_up_to_the_multiple():
    """width_multiple (step 3 on CPU in bf16): the longest prompt's 5 tokens -> 8, every row left-padded."""
    batch = PromptCollator(pad_token_id=1, width_multiple=4)([{"prompt_ids": [7, 8, 9, 10, 11]}, {"prompt_ids": [5]}])
    assert batch["input_ids"].tolist() == [[1, 1, 1, 7, 8, 9, 10, 11], [1, 1, 1, 1, 1, 1, 1, 5]]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 7 + [1]]
    exact = PromptCollator(pad_token_id=1, width_multiple=4)([{"prompt_ids": [7, 8, 9, 10]}])
    assert exact["input_ids"].tolist() == [[7, 8, 9, 10]]


def test_ragged_dataset_round_trip(tmp_path):
    dataset = pipeline.RaggedDataset({"a": [[1, 2], [], [3]], "b": [[4], [5, 6], [7, 8, 9]]})
    dataset.save(str(tmp_path / "x.npz"))
    loaded = pipeline.RaggedDataset.load(str(tmp_path / "x.npz"))
    assert len(loaded) == 3 and [loaded[i] for i in range(3)] == [dataset[i] for i in range(3)]
    assert loaded.lengths("b").tolist() == [1, 2, 3]


def test_synthetic_source_through_the_pipeline(tmp_path, tokenizer):
    name = "synthetic/arithmetic:size=500,eval_size=50"
    sft = build_phase_data(config(tmp_path, [name]), PromptFormat(tokenizer), PHASE_SFT)
    assert len(sft.train) == 100 and len(sft.eval) == 10
    text = tokenizer.decode(sft.train[0]["input_ids"])
    assert text.startswith("\n\nHuman: What is ") and text.endswith("<|endoftext|>")
    assert torch.tensor(sft.train[0]["loss_mask"]).sum() >= 2  # at least one digit and the EOS
