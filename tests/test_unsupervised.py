"""PPO-ptx pre-training data: local text -> exact token blocks, cached; bad sources fail with one clear error."""
import json
import os

import pytest

from conftest import write_jsonl

from training.utils.data import unsupervised
from training.utils.data.unsupervised import build_unsupervised_dataset, make_unsupervised_loader
from training.utils.errors import UserInputError

BLOCK = 16
PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Seven ships sailed north;\nonly three came back before the winter storms.",
    "Numbers like 12 + 30 = 42 are easy, words are harder to predict.",
    "A short one.",
]


def expected_stream(tokenizer, documents: list[str]) -> list[int]:
    stream = []
    for text in documents:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


def concatenated(dataset) -> list[int]:
    return [token for index in range(len(dataset)) for token in dataset[index]["input_ids"]]


def assert_blocks_of(dataset, stream: list[int]) -> None:
    assert len(dataset) == len(stream) // BLOCK > 1
    assert all(len(dataset[i]["input_ids"]) == BLOCK for i in range(len(dataset)))
    assert concatenated(dataset) == stream[:len(dataset) * BLOCK]


def test_txt_file_becomes_exact_blocks_and_is_cached(tmp_path, tokenizer, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n" + "\n\n  \n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    dataset = build_unsupervised_dataset(str(source), None, tokenizer, BLOCK, str(cache), seed=1)
    stream = expected_stream(tokenizer, PARAGRAPHS)
    assert_blocks_of(dataset, stream)
    (cache_dir,) = os.listdir(cache)
    stats = json.loads((cache / cache_dir / "stats.json").read_text())
    assert (stats["documents"], stats["tokens"], stats["dropped_tail_tokens"]) == (4, len(stream), len(stream) % BLOCK)

    def fail(*args):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(unsupervised, "_build_cache", fail)
    again = build_unsupervised_dataset(str(source), None, tokenizer, BLOCK, str(cache), seed=2)
    assert concatenated(again) == concatenated(dataset)
    monkeypatch.undo()
    build_unsupervised_dataset(str(source), None, tokenizer, BLOCK + 1, str(cache), seed=1)
    assert len(os.listdir(cache)) == 2  # a new block size is a new cache entry

    loader = make_unsupervised_loader(dataset, batch_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, BLOCK)
    assert batch["labels"].equal(batch["input_ids"]) and bool(batch["attention_mask"].all())


def test_jsonl_and_saved_dataset_use_the_text_field(tmp_path, tokenizer):
    import datasets

    rows = [{"text": PARAGRAPHS[0], "id": 1}, {"text": "", "id": 2}, {"text": PARAGRAPHS[1]},
            {"text": PARAGRAPHS[2]}, {"text": PARAGRAPHS[3]}]
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", rows)
    stream = expected_stream(tokenizer, PARAGRAPHS)  # the empty row is skipped, not an extra EOS
    assert_blocks_of(build_unsupervised_dataset(str(jsonl), None, tokenizer, BLOCK, str(tmp_path / "c"), 0), stream)

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [r["text"] for r in rows]})}).save_to_disk(saved)
    assert_blocks_of(build_unsupervised_dataset(str(saved), None, tokenizer, BLOCK, str(tmp_path / "c"), 0), stream)


def test_bad_sources_fail_with_one_clear_line(tmp_path, tokenizer):
    cache = str(tmp_path / "cache")
    with pytest.raises(UserInputError, match="no such file"):
        build_unsupervised_dataset(str(tmp_path / "missing.txt"), None, tokenizer, BLOCK, cache, 0)
    with pytest.raises(UserInputError, match="save_to_disk"):  # HF_DATASETS_OFFLINE=1 in tests
        build_unsupervised_dataset("wikitext", "wikitext-2-raw-v1", tokenizer, BLOCK, cache, 0)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="no text"):
        build_unsupervised_dataset(str(blank), None, tokenizer, BLOCK, cache, 0)
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(UserInputError, match="fewer than one block"):
        build_unsupervised_dataset(str(short), None, tokenizer, BLOCK, cache, 0)
    wrong_field = write_jsonl(tmp_path / "wrong.jsonl", [{"content": "hello"}])
    with pytest.raises(UserInputError, match="'text'"):
        build_unsupervised_dataset(str(wrong_field), None, tokenizer, BLOCK, cache, 0)
    assert not os.path.exists(cache) or os.listdir(cache) == []  # nothing half-written
