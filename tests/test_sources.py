"""Every `--data_path` form becomes the same normalised Sample rows, offline.

Each known DeepSpeed-Chat dataset is faked with its real field layout and saved with `save_to_disk`
under a directory named like the hub dataset, which is how users without network pass them.
"""
import json
import time

import datasets
import huggingface_hub.constants
import pytest

from training.utils.data.sources import KNOWN_DATASETS, Sample, open_source
from training.utils.errors import UserInputError

HI = "\n\nHuman: Hi\n\nAssistant:"


def turn(question):
    return f"\n\nHuman: {question}\n\nAssistant:"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables at import time, which may have happened already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


HH_ROWS = [
    {"prompt": HI, "response": " Hello", "chosen": " Hello", "rejected": " Go away"},
    {"prompt": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", "response": " D", "chosen": " D",
     "rejected": " E"},
    {"prompt": HI, "response": "", "chosen": "", "rejected": " x"},
]
HH_EXPECTED = [Sample(HI, " Hello", " Go away"),
               Sample("\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", " D", " E")]


def miracl(query, positive, negative):
    return {"query_id": "1", "query": query,
            "positive_passages": [{"docid": "d1", "text": p, "title": "t"} for p in positive],
            "negative_passages": [{"docid": "d2", "text": n, "title": "t"} for n in negative]}


def mkqa(zh, ja, zh_answer, ja_answer):
    def answer(text):
        return [{"type": "entity", "entity": "Q1", "text": text, "aliases": []}]

    return {"example_id": 1, "query": "q", "queries": {"en": "q", "zh_cn": zh, "ja": ja},
            "answers": {"en": answer("a"), "zh_cn": answer(zh_answer), "ja": answer(ja_answer)}}


def webgpt(question, answer_0, answer_1, score_0, score_1):
    return {"question": {"dataset": "eli5", "id": "x", "full_text": question}, "answer_0": answer_0,
            "answer_1": answer_1, "score_0": score_0, "score_1": score_1, "tokens_0": [], "tokens_1": []}


def shp(history, a, b, label):
    return {"post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.9, "history": history,
            "c_root_id_A": "a", "c_root_id_B": "b", "human_ref_A": a, "human_ref_B": b, "labels": label,
            "score_A": 5, "score_B": 1}


def qg(question, sentence):
    return {"answer": "x", "paragraph_question": "p", "question": question, "sentence": sentence,
            "paragraph": "para", "sentence_answer": "s", "paragraph_answer": "pa", "paragraph_sentence": "ps",
            "paragraph_id": "1"}


# name -> (rows of the train split, the eval split's name or None, expected Samples, expected skipped)
CASES = {
    "Dahoas/rm-static": (HH_ROWS, "test", HH_EXPECTED, {"empty reply": 1}),
    "Dahoas/full-hh-rlhf": (HH_ROWS, "test", HH_EXPECTED, {"empty reply": 1}),
    "zwh9029/rm-static-m2m100-zh-jianti": (HH_ROWS, "test", HH_EXPECTED, {"empty reply": 1}),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        [{"prompt": "Write a haiku", "chosen": "Leaves fall", "rejected": "No."},
         {"prompt": "Name a fruit ", "chosen": " Apple ", "rejected": "Car"},
         {"prompt": "", "chosen": "x", "rejected": "y"}],
        None, [Sample(turn("Write a haiku"), " Leaves fall", " No."), Sample(turn("Name a fruit"), " Apple", " Car")],
        {"empty prompt": 1}),
    "yitingxie/rlhf-reward-datasets": (
        [{"prompt": "\n\nHuman: Why is the sky blue?\n\n", "chosen": "Assistant: Rayleigh scattering.",
          "rejected": "Assistant: Paint."},
         {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\n", "chosen": "Assistant: See you",
          "rejected": "Assistant: No"},
         {"prompt": "\n\nHuman: Q\n\n", "chosen": "Assistant: ", "rejected": "Assistant: R"}],
        "test", [Sample(turn("Why is the sky blue?"), " Rayleigh scattering.", " Paint."),
                 Sample("\n\nHuman: Hi\n\nAssistant: Hello" + turn("Bye"), " See you", " No")],
        {"empty reply": 1}),
    "openai/webgpt_comparisons": (
        [webgpt("Why do cats purr?", "They are content [1].", "No idea [1, 2].", 1.0, -1.0),
         webgpt("Why is ice slippery?", "Cold.", "A thin water layer[2] forms.", -0.5, 0.5),
         webgpt("Tie?", "a", "b", 0.0, 0.0)],
        None, [Sample(turn("Why do cats purr?"), " They are content.", " No idea."),
               Sample(turn("Why is ice slippery?"), " A thin water layer forms.", " Cold.")],
        {"tie": 1}),
    "stanfordnlp/SHP": (
        [shp("What is a good book?", "Dune", "Nothing", 1), shp("Best pan?", "Any", "Cast iron", 0),
         shp("Empty?", "", "b", 1)],
        "validation", [Sample(turn("What is a good book?"), " Dune", " Nothing"),
                       Sample(turn("Best pan?"), " Cast iron", " Any")],
        {"empty reply": 1}),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": (
        [{"prompt": "USER: What is 2+2? ASSISTANT:", "label": "4"},
         {"prompt": "USER: Hi ASSISTANT: Hello! USER: Name a color ASSISTANT:", "label": " Blue"},
         {"prompt": "USER: Q ASSISTANT:", "label": ""}],
        "test", [Sample(turn("What is 2+2?"), " 4"), Sample(HI + " Hello!" + turn("Name a color"), " Blue")],
        {"empty reply": 1}),
    "wangrui6/Zhihu-KOL": (
        [{"INSTRUCTION": "如何学习？", "RESPONSE": "多读书。", "SOURCE": "Zhihu", "METADATA": "{}"},
         {"INSTRUCTION": "为什么？", "RESPONSE": "因为。", "SOURCE": "Zhihu", "METADATA": "{}"},
         {"INSTRUCTION": None, "RESPONSE": "x", "SOURCE": "Zhihu", "METADATA": "{}"}],
        None, [Sample(turn("如何学习？"), " 多读书。"), Sample(turn("为什么？"), " 因为。")], {"empty prompt": 1}),
    "Cohere/miracl-zh-queries-22-12": (
        [miracl("天空", ["蓝色"], ["红色"]), miracl("水", ["液体"], ["固体", "气体"]), miracl("无", ["有"], [])],
        "dev", [Sample(turn("天空"), " 蓝色", " 红色"), Sample(turn("水"), " 液体", " 固体")],
        {"missing field": 1}),
    "Cohere/miracl-ja-queries-22-12": (
        [miracl("空", ["青"], ["赤"]), miracl("水", ["液体"], ["固体"]), miracl("無", [], ["x"])],
        "dev", [Sample(turn("空"), " 青", " 赤"), Sample(turn("水"), " 液体", " 固体")], {"missing field": 1}),
    "Hello-SimpleAI/HC3-Chinese": (
        [{"id": "1", "question": "什么是猫？", "human_answers": ["一种动物。"], "chatgpt_answers": ["猫是..."]},
         {"id": "2", "question": "什么是狗？", "human_answers": ["也是动物。", "宠物"], "chatgpt_answers": ["狗"]},
         {"id": "3", "question": "空？", "human_answers": [], "chatgpt_answers": ["x"]}],
        None, [Sample(turn("什么是猫？"), " 一种动物。"), Sample(turn("什么是狗？"), " 也是动物。")],
        {"missing field": 1}),
    "mkqa-Chinese": (
        [mkqa("天空是什么颜色", "空の色", "蓝色", "青"), mkqa("一加一", "一足す一", "二", "二"),
         mkqa("无答案", "答えなし", None, None)],
        None, [Sample(turn("天空是什么颜色"), " 蓝色"), Sample(turn("一加一"), " 二")], {"empty reply": 1}),
    "mkqa-Japanese": (
        [mkqa("天空是什么颜色", "空の色", "蓝色", "青"), mkqa("一加一", "一足す一", "二", "二"),
         mkqa("无答案", "答えなし", None, None)],
        None, [Sample(turn("空の色"), " 青"), Sample(turn("一足す一"), " 二")], {"empty reply": 1}),
    "lmqg/qg_jaquad": (
        [qg("富士山の高さは？", "富士山は3776mです。"), qg("首都は？", "東京です。"), qg("", "空")],
        "validation",
        [Sample(turn("富士山の高さは？"), " 富士山は3776mです。"), Sample(turn("首都は？"), " 東京です。")],
        {"empty prompt": 1}),
    "lmqg/qag_jaquad": (
        [{"paragraph": "東京は首都です。", "questions": ["首都は？", "何？"], "answers": ["東京", "x"],
          "questions_answers": "q"},
         {"paragraph": "富士山は高い。", "questions": ["高い山は？"], "answers": ["富士山"], "questions_answers": "q"},
         {"paragraph": "空", "questions": [], "answers": [], "questions_answers": ""}],
        "validation", [Sample(turn("首都は？"), " 東京は首都です。"), Sample(turn("高い山は？"), " 富士山は高い。")],
        {"missing field": 1}),
}


def save_known(tmp_path, name, rows, eval_split, directory=None):
    splits = {"train": datasets.Dataset.from_list(rows)}
    if eval_split:
        splits[eval_split] = datasets.Dataset.from_list(rows)
    path = tmp_path / (directory or name)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def test_every_known_name_has_a_case():
    assert set(CASES) == set(KNOWN_DATASETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_known_dataset_saved_to_disk(tmp_path, name):
    rows, eval_split, expected, skipped = CASES[name]
    source = open_source(str(save_known(tmp_path, name, rows, eval_split)))
    assert source.has_eval_split == (eval_split is not None)
    assert source.rows("train") == expected
    assert source.skipped == skipped
    if eval_split:
        assert source.rows("eval") == expected


def test_shp_uses_validation_not_test(tmp_path):
    splits = {"train": [shp("a", "b", "c", 1)], "validation": [shp("v", "b", "c", 1)], "test": [shp("t", "b", "c", 1)]}
    path = tmp_path / "stanfordnlp" / "SHP"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    assert open_source(str(path)).rows("eval") == [Sample(turn("v"), " b", " c")]


def test_directory_matched_by_last_component_and_single_dataset(tmp_path):
    path = save_known(tmp_path, "Dahoas/rm-static", HH_ROWS, "test", directory="downloads/RM-Static")
    assert open_source(str(path)).rows("train") == HH_EXPECTED
    single = tmp_path / "mine"
    datasets.Dataset.from_list([{"prompt": "Q", "response": "A"}]).save_to_disk(str(single))
    source = open_source(str(single))
    assert not source.has_eval_split
    assert source.rows("train") == [Sample(turn("Q"), " A")]
    with pytest.raises(ValueError, match="no eval split"):
        source.rows("eval")


def test_directory_whose_path_contains_a_known_name(tmp_path):
    """DeepSpeed-Chat's substring match: an offline copy in .../stanfordnlp/SHP-local is SHP; the longest known
    name in the path wins; a path without one still gets the generic schemas and their clear error."""
    path = tmp_path / "stanfordnlp" / "SHP-local"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([shp("a", "b", "c", 1)]),
                          "validation": datasets.Dataset.from_list([shp("v", "b", "c", 1)])}).save_to_disk(str(path))
    assert open_source(str(path)).rows("eval") == [Sample(turn("v"), " b", " c")]
    nested = save_known(tmp_path, "x", HH_ROWS, "test",
                        directory="Dahoas/rm-static/zwh9029/rm-static-m2m100-zh-jianti-copy")
    assert ":zwh9029/rm-static-m2m100-zh-jianti;" in open_source(str(nested)).fingerprint  # path:known;splits
    unknown = save_known(tmp_path, "x", [{"text": "x"}], None, directory="corpora/mystery")
    with pytest.raises(UserInputError, match="or a directory named after a known dataset"):
        open_source(str(unknown)).rows("train")


def test_known_directory_with_wrong_fields(tmp_path):
    path = save_known(tmp_path, "Dahoas/rm-static", [{"text": "x"}], None)
    with pytest.raises(UserInputError, match=r"rm-static.*\[text\].*prompt, chosen, rejected"):
        open_source(str(path)).rows("train")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you"}]


def test_generic_jsonl_all_schemas(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": MESSAGES},
        {"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"},
        {"prompt": HI, "response": "Hello"},
        {"text": "no usable fields"},
        {"messages": MESSAGES[:2]},
    ])
    source = open_source(str(path))
    assert not source.has_eval_split
    assert source.rows("train") == [
        Sample("System: Be brief." + HI + " Hello" + turn("Bye"), " See you", messages=tuple(MESSAGES)),
        Sample(turn("What is 1+1?"), " 2", " 3"),
        Sample(HI, " Hello"),
    ]
    assert source.skipped == {"missing field": 1, "bad messages": 1}


def test_json_list_json_lines_and_parquet(tmp_path):
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "B"}]
    expected = [Sample(turn("Q"), " A", " B")]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(rows, indent=1))
    lines = write_jsonl(tmp_path / "lines.json", rows)
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for path in (listed, lines, parquet):
        assert open_source(str(path)).rows("train") == expected


def test_directory_of_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q", "response": "A"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "E", "response": "F"}])
    source = open_source(str(tmp_path))
    assert source.has_eval_split
    assert source.rows("train") == [Sample(turn("Q"), " A")]
    assert source.rows("eval") == [Sample(turn("E"), " F")]


def test_local_jsonfile_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps([{"prompt": HI, "chosen": " a", "rejected": " b"}]))
    (tmp_path / "data" / "eval.json").write_text(json.dumps([{"prompt": HI, "chosen": " c", "rejected": " d"}]))
    monkeypatch.chdir(tmp_path)
    source = open_source("local/jsonfile")
    assert source.has_eval_split
    assert source.rows("train") == [Sample(HI, " a", " b")]
    assert source.rows("eval") == [Sample(HI, " c", " d")]


def test_fingerprint_follows_file_content(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q", "response": "A"}])
    first = open_source(str(path)).fingerprint
    assert open_source(str(path)).fingerprint == first
    write_jsonl(path, [{"prompt": "Q", "response": "B"}])  # same size, other content
    assert open_source(str(path)).fingerprint != first


def test_synthetic_source():
    synthetic = pytest.importorskip("training.utils.data.synthetic")
    name = "synthetic/arithmetic:size=5,eval_size=2"
    source = open_source(name)
    assert source.has_eval_split and source.fingerprint == name
    train = source.rows("train")
    raw = synthetic.generate_rows(synthetic.parse_synthetic_name(name), "train")
    assert [(s.prompt, s.chosen, s.rejected, s.demonstration) for s in train] == [
        (r["prompt"], r["chosen"], r["rejected"], r["response"]) for r in raw]
    assert len(source.rows("eval")) == 2
    with pytest.raises(UserInputError, match="synthetic/nope"):
        open_source("synthetic/nope")


def test_unknown_name():
    with pytest.raises(UserInputError, match="unknown dataset 'nope/nothing': expected one of Dahoas/rm-static"):
        open_source("nope/nothing")


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="missing.jsonl'.*no such file"):
        open_source(str(tmp_path / "missing.jsonl"))


def test_first_row_without_fields(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(UserInputError, match=r"bad.jsonl.*\[question, answer\].*'messages'"):
        open_source(str(path)).rows("train")


def test_bad_json_line_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "Q", "response": "A"}\n{"prompt": oops}\n')
    with pytest.raises(UserInputError, match="broken.jsonl' line 2: invalid JSON"):
        open_source(str(path)).rows("train")


def test_hub_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory may shadow the hub name
    source = open_source("Dahoas/rm-static")
    assert source.has_eval_split
    start = time.monotonic()
    with pytest.raises(UserInputError, match=r"'Dahoas/rm-static'.*save_to_disk"):
        source.rows("train")
    assert time.monotonic() - start < 10


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserInputError, match=f"'{tmp_path}' is a directory but not a dataset"):
        open_source(str(tmp_path))
