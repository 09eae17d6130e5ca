"""Turn one `--data_path` entry into `Sample` rows, whatever the source looks like.

Every later stage (split, tokenisation, cache) sees one normalised row type, so the quirks of each
dataset live here and nowhere else. Resolution of a name, first match wins:

1. `synthetic/...`: the built-in synthetic task (`synthetic.py`), train and eval generated separately.
2. `local/jsonfile`: DeepSpeed-Chat's meaning, `data/train.json` (+ optional `data/eval.json`) found
   under the current directory, else under the repository root (the directory holding `training`).
3. An existing path:
   - a `.json` (list of objects, or JSON lines), `.jsonl` or `.parquet` file: generic rows, no eval split;
   - a `datasets.save_to_disk` directory (DatasetDict or single Dataset). Its adapter is chosen from
     the path as given: when its last two components equal a known name ("data/Dahoas/rm-static"),
     or the path contains a known name, as DeepSpeed-Chat matches ("data/stanfordnlp/SHP-local"; the
     longest such name wins), or, failing that, its last component equals the part after the "/" of a known name
     ("data/rm-static", "mkqa-Chinese"); case is ignored. Other directories use the generic schemas;
   - a directory with `train.{json,jsonl,parquet}` and optionally `eval|validation|dev|test.{...}`;
   - a raw hub snapshot, fetched file by file: README.md / dataset_infos.json + `data/*.parquet` shards,
     splits from the shard names, adapter as for a save_to_disk directory (`hub_snapshot.py`).
4. A known hub name (`KNOWN_DATASETS`): `datasets.load_dataset` on first use of the rows.

Generic schemas, detected per row: `messages` [{role, content}, ...] ending with an assistant reply
after a user turn; `prompt` + `chosen` (+ `rejected`); `prompt` + `response`. A prompt that does not end
with "\\n\\nAssistant:" gets it: HH text with a "\\n\\nHuman:" turn is closed with the marker, plain text
becomes one user turn. Replies are normalised to one leading space.

A first row without the fields an adapter needs is an error (wrong file or wrong adapter); later bad or
empty rows are dropped and counted in `Source.skipped`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from training.utils.data import hub_snapshot
from training.utils.data.conversation import ASSISTANT, HUMAN, format_reply, format_user_turn, messages_to_chunks
from training.utils.errors import UserInputError

SPLITS = ("train", "eval")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
EVAL_SPLIT_NAMES = ("eval", "validation", "dev", "test")  # tried in this order for the eval split
LOCAL_JSONFILE = "local/jsonfile"
REPO_ROOT = Path(__file__).resolve().parents[3]
GENERIC_SCHEMAS = "'messages', 'prompt'+'chosen'(+'rejected') or 'prompt'+'response'"

MISSING_FIELD = "missing field"


@dataclass(frozen=True)
class Sample:
    """One normalised row: an HH-format prompt and its replies."""

    prompt: str  # HH-format text ending with "\n\nAssistant:" (may contain earlier turns)
    chosen: str | None = None  # preferred reply, leading space; for SFT-only data the response
    rejected: str | None = None  # dispreferred reply; None when the source has no pairs
    demonstration: str | None = None  # SFT target when it differs from `chosen`; None -> use chosen
    messages: tuple | None = None  # the source's [{role, content}, ...] when it was a messages list


class _Skip(Exception):
    """A source row that cannot become a Sample; `reason` is the key counted in `Source.skipped`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- adapters (one per source format)

def _after_last_assistant(text: str) -> str:
    return text.split("Assistant:")[-1]


def _vicuna_to_messages(text: str) -> list[dict]:
    """Split Vicuna text `[system] USER: q ASSISTANT: a USER: q2 ASSISTANT:` into messages.

    The trailing empty assistant turn (the one the label answers) is dropped.
    """
    parts = re.split(r"(USER:|ASSISTANT:)", text)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for marker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if marker == "USER:" else "assistant", "content": content.strip()})
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


def _vicuna_prompt(row: dict) -> str:
    messages = _vicuna_to_messages(row["prompt"] or "")
    if not messages or messages[-1]["role"] != "user":
        raise _Skip("empty prompt")
    return _render(messages)


_CITATION = re.compile(r"\s*\[\d+(?:,\s*\d+)*\]")


def _webgpt(row: dict) -> Sample:
    """Higher score is chosen; ties carry no preference and are dropped; "[1]"-style citations removed."""
    scores = float(row["score_0"]), float(row["score_1"])
    if scores[0] == scores[1]:
        raise _Skip("tie")
    better, worse = ("answer_0", "answer_1") if scores[0] > scores[1] else ("answer_1", "answer_0")
    return Sample(row["question"]["full_text"], _CITATION.sub("", row[better]), _CITATION.sub("", row[worse]))


def _shp(row: dict) -> Sample:
    a_wins = int(row["labels"]) == 1  # 1 means human_ref_A is preferred
    a, b = row["human_ref_A"], row["human_ref_B"]
    return Sample(row["history"], a if a_wins else b, b if a_wins else a)


def _pair(row: dict) -> Sample:
    return Sample(row["prompt"], row["chosen"], row["rejected"])


def _mkqa(lang: str) -> Callable[[dict], Sample]:
    return lambda row: Sample(row["queries"][lang], row["answers"][lang][0]["text"])


def _miracl(row: dict) -> Sample:
    return Sample(row["query"], row["positive_passages"][0]["text"], row["negative_passages"][0]["text"])


@dataclass(frozen=True)
class _Adapter:
    convert: Callable[[dict], Sample]
    fields: str  # the source layout, for error messages
    eval_split: str | None = None  # the hub split DeepSpeed-Chat evaluates on; None: train only
    hub_args: tuple = ()  # `load_dataset` arguments when they are not just the name


_ADAPTERS: dict[str, _Adapter] = {
    "Dahoas/rm-static": _Adapter(_pair, "prompt, chosen, rejected", "test"),
    "Dahoas/full-hh-rlhf": _Adapter(_pair, "prompt, chosen, rejected", "test"),
    "zwh9029/rm-static-m2m100-zh-jianti": _Adapter(_pair, "prompt, chosen, rejected", "test"),
    "Dahoas/synthetic-instruct-gptj-pairwise": _Adapter(_pair, "prompt, chosen, rejected"),
    "yitingxie/rlhf-reward-datasets": _Adapter(
        lambda row: Sample(row["prompt"].rstrip() + ASSISTANT, _after_last_assistant(row["chosen"]),
                           _after_last_assistant(row["rejected"])),
        "prompt, chosen, rejected (replies after 'Assistant:')", "test"),
    "openai/webgpt_comparisons": _Adapter(_webgpt, "question.full_text, answer_0, answer_1, score_0, score_1"),
    "stanfordnlp/SHP": _Adapter(_shp, "history, human_ref_A, human_ref_B, labels", "validation"),
    "pvduy/sharegpt_alpaca_oa_vicuna_format": _Adapter(
        lambda row: Sample(_vicuna_prompt(row), row["label"]), "prompt (USER:/ASSISTANT:), label", "test"),
    "wangrui6/Zhihu-KOL": _Adapter(lambda row: Sample(row["INSTRUCTION"], row["RESPONSE"]),
                                   "INSTRUCTION, RESPONSE"),
    "Cohere/miracl-zh-queries-22-12": _Adapter(_miracl, "query, positive_passages, negative_passages", "dev"),
    "Hello-SimpleAI/HC3-Chinese": _Adapter(lambda row: Sample(row["question"], row["human_answers"][0]),
                                           "question, human_answers", hub_args=("Hello-SimpleAI/HC3-Chinese", "all")),
    "mkqa-Chinese": _Adapter(_mkqa("zh_cn"), "queries.zh_cn, answers.zh_cn[0].text", hub_args=("mkqa",)),
    "mkqa-Japanese": _Adapter(_mkqa("ja"), "queries.ja, answers.ja[0].text", hub_args=("mkqa",)),
    "Cohere/miracl-ja-queries-22-12": _Adapter(_miracl, "query, positive_passages, negative_passages", "dev"),
    "lmqg/qg_jaquad": _Adapter(lambda row: Sample(row["question"], row["sentence"]), "question, sentence",
                               "validation"),
    "lmqg/qag_jaquad": _Adapter(lambda row: Sample(row["questions"][0], row["paragraph"]), "questions, paragraph",
                                "validation"),
}
KNOWN_DATASETS: tuple[str, ...] = tuple(_ADAPTERS)  # hub names; `local/jsonfile` is resolved separately


def _render(messages: list[dict]) -> str:
    return "".join(chunk.text for chunk in messages_to_chunks(messages))


def _from_messages(messages) -> Sample:
    """Prompt = the turns before the last assistant reply, which becomes `chosen`."""
    try:
        kept = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        if ([m["role"] for m in kept[-2:]] == ["user", "assistant"]
                and all(isinstance(m["content"], str) for m in kept)):
            return Sample(_render(list(kept[:-1])), format_reply(kept[-1]["content"]), messages=kept)
    except (KeyError, TypeError, ValueError):  # not {role, content} dicts, or a role messages_to_chunks rejects
        pass
    raise _Skip("bad messages")


def _generic(row: dict) -> Sample:
    if "messages" in row:
        return _from_messages(row["messages"])
    if "prompt" in row and "chosen" in row:
        return Sample(row["prompt"], row["chosen"], row.get("rejected"))
    if "prompt" in row and "response" in row:
        return Sample(row["prompt"], row["response"])
    raise _Skip(MISSING_FIELD)


def _synthetic(row: dict) -> Sample:
    return Sample(row["prompt"], row["chosen"], row["rejected"], demonstration=row["response"])


def _normalise(sample: Sample) -> Sample:
    """Enforce the Sample contract: prompt ends with the assistant marker, replies start with one space."""
    prompt = (sample.prompt or "").rstrip()
    if not prompt.strip():
        raise _Skip("empty prompt")
    if not prompt.endswith(ASSISTANT):
        prompt = prompt + ASSISTANT if HUMAN in prompt else format_user_turn(prompt)
    replies = {}
    for field in ("chosen", "rejected", "demonstration"):
        text = getattr(sample, field)
        if text is not None and not text.strip():
            raise _Skip("empty reply")
        replies[field] = None if text is None else format_reply(text)
    if replies["chosen"] is None:
        raise _Skip("empty reply")
    return Sample(prompt, messages=sample.messages, **replies)


# ---------------------------------------------------------------- the Source

class Source:
    """The rows of one `--data_path` entry, normalised to `Sample`.

    `fingerprint` identifies the rows for the tokenisation cache: it changes whenever they could.
    `skipped` counts dropped source rows per reason, over the splits read so far.
    """

    def __init__(self, name: str, *, fingerprint: str | Callable[[], str], has_eval_split: bool,
                 read: Callable[[str], Iterable[dict]], convert: Callable[[dict], Sample], fields: str):
        self.name = name
        self.has_eval_split = has_eval_split
        self._fingerprint = fingerprint
        self._read = read  # split ("train"/"eval") -> raw rows
        self._convert = convert
        self._fields = fields
        self._skipped: dict[str, Counter] = {}

    @property
    def fingerprint(self) -> str:
        if callable(self._fingerprint):  # hub datasets are only known once loaded
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    @property
    def skipped(self) -> dict[str, int]:
        return dict(sum(self._skipped.values(), Counter()))

    def rows(self, split: str) -> list[Sample]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "eval" and not self.has_eval_split:
            raise ValueError(f"'{self.name}' has no eval split: check has_eval_split and cut one from train")
        samples, skipped = [], Counter()
        for index, row in enumerate(self._read(split)):
            try:
                try:
                    samples.append(_normalise(self._convert(row)))
                except (KeyError, IndexError, TypeError, AttributeError):
                    raise _Skip(MISSING_FIELD) from None
            except _Skip as skip:
                if index == 0 and skip.reason == MISSING_FIELD:
                    found = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                    raise UserInputError(
                        f"'{self.name}' ({split} split): the first row has fields [{found}] but needs "
                        f"{self._fields}; fix the data or pass a source with that layout") from None
                skipped[skip.reason] += 1
        self._skipped[split] = skipped
        return samples


def open_source(name: str) -> Source:
    """Resolve a `--data_path` entry (see the module docstring); cheap checks only, rows load later."""
    if name.startswith("synthetic/"):
        return _synthetic_source(name)
    if name == LOCAL_JSONFILE:
        return _local_jsonfile_source()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise UserInputError(f"'{name}' is a file but not {'/'.join(FILE_SUFFIXES)}: convert it to JSON lines")
        return _file_source(name, {"train": path})
    if path.is_dir():
        return _directory_source(name, path)
    if path.suffix in FILE_SUFFIXES:
        raise UserInputError(f"'{name}': no such file (looked for {path.absolute()}); check the path")
    if name in _ADAPTERS:
        return _hub_source(name)
    raise UserInputError(
        f"unknown dataset '{name}': expected one of {', '.join(KNOWN_DATASETS)}, synthetic/arithmetic, "
        f"{LOCAL_JSONFILE}, or a path to a .json/.jsonl/.parquet file or dataset directory")


def _synthetic_source(name: str) -> Source:
    from training.utils.data import synthetic  # imported on use: synthetic data is one source among many

    spec = synthetic.parse_synthetic_name(name)
    return Source(name, fingerprint=name, has_eval_split=True, read=lambda split: synthetic.generate_rows(spec, split),
                  convert=_synthetic, fields="synthetic rows")


def _local_jsonfile_source() -> Source:
    """DeepSpeed-Chat reads `data/train.json` and `data/eval.json` relative to where it runs."""
    places = list(dict.fromkeys([Path.cwd() / "data", REPO_ROOT / "data"]))
    for data_dir in places:
        if (data_dir / "train.json").is_file():
            files = {"train": data_dir / "train.json"}
            if (data_dir / "eval.json").is_file():
                files["eval"] = data_dir / "eval.json"
            return _file_source(LOCAL_JSONFILE, files)
    raise UserInputError(f"{LOCAL_JSONFILE}: no train.json in {' or '.join(map(str, places))}; put "
                         f"data/train.json and data/eval.json (fields prompt, chosen, rejected) in one of them")


def _directory_source(name: str, path: Path) -> Source:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _disk_dataset_source(name, path)
    files = {}
    for split, stems in (("train", ("train",)), ("eval", EVAL_SPLIT_NAMES)):
        found = [path / f"{stem}{suffix}" for stem in stems for suffix in FILE_SUFFIXES
                 if (path / f"{stem}{suffix}").is_file()]
        if found:
            files[split] = found[0]
    if "train" not in files and hub_snapshot.is_snapshot(path):
        return hub_snapshot.snapshot_source(name, path)
    if "train" not in files:
        raise UserInputError(
            f"'{name}' is a directory but not a dataset: expected a datasets.save_to_disk directory "
            f"(dataset_dict.json or state.json) or train.json/.jsonl/.parquet with optional "
            f"eval|validation|dev|test files beside it")
    return _file_source(name, files)


# ---------------------------------------------------------------- local files

def _file_source(name: str, files: dict[str, Path]) -> Source:
    fingerprint = ";".join(f"{split}={file_fingerprint(path)}" for split, path in files.items())
    return Source(name, fingerprint=fingerprint, has_eval_split="eval" in files,
                  read=lambda split: read_data_file(files[split]), convert=_generic, fields=GENERIC_SCHEMAS)


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def read_data_file(path: Path) -> list[dict]:
    """Rows of a local file; a `.json` file may hold one list of objects or JSON lines."""
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json_rows(path)
    if not rows:
        raise UserInputError(f"'{path}' holds no rows: add data to it or pass another file")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowInvalid as err:
        raise UserInputError(f"'{path}' is not a readable Parquet file ({str(err).splitlines()[0]}): "
                             "re-export it, or convert it to JSON lines") from None


def _read_json_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserInputError(f"'{path}' is not UTF-8 text (byte {err.start} cannot be decoded): re-save it as "
                             "UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        numbered, unit = enumerate(_parse_json(path, text, 1), start=1), "item"
    else:
        # JSON lines end at "\n" only: str.splitlines() would also cut at U+2028, U+2029, U+0085 and other
        # characters JSON allows raw inside strings (a trailing "\r" is JSON whitespace).
        lines = enumerate(text.split("\n"), start=1)
        numbered, unit = [(n, _parse_json(path, line, n)) for n, line in lines if line.strip()], "line"
    rows = []
    for number, row in numbered:
        if not isinstance(row, dict):
            raise UserInputError(f"'{path}' {unit} {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _parse_json(path: Path, text: str, first_line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"'{path}' line {first_line + err.lineno - 1}: invalid JSON ({err.msg}); "
                             f"write one JSON object per line or one list of objects") from None


# ---------------------------------------------------------------- Hugging Face datasets

def _adapter_for_path(path: Path) -> tuple[str | None, _Adapter | None]:
    """The known dataset a directory stands for, by its path as given (see the module docstring)."""
    absolute = Path(os.path.abspath(path))
    parts = [part.lower() for part in absolute.parts]
    for known, adapter in _ADAPTERS.items():
        if parts[-2:] == known.lower().split("/"):
            return known, adapter
    # DeepSpeed-Chat matches by substring, so ".../stanfordnlp/SHP-local" is SHP there; the longest name wins.
    inside = [known for known in _ADAPTERS if known.lower() in absolute.as_posix().lower()]
    if inside:
        known = max(inside, key=len)
        return known, _ADAPTERS[known]
    for known, adapter in _ADAPTERS.items():
        if parts[-1] == known.lower().split("/")[-1]:
            return known, adapter
    return None, None


def _pick_splits(name: str, splits: dict, eval_candidates: tuple) -> dict:
    """Map a DatasetDict's splits onto "train" and, from the first candidate present, "eval"."""
    if "train" not in splits:
        raise UserInputError(f"'{name}' has splits {sorted(splits)} but no 'train' split: save one named train")
    picked = {"train": splits["train"]}
    for candidate in eval_candidates:
        if candidate in splits:
            picked["eval"] = splits[candidate]
            break
    return picked


def _datasets_fingerprint(label: str, splits: dict) -> str:
    return ";".join([label] + [f"{split}={dataset._fingerprint}" for split, dataset in splits.items()])


def _disk_dataset_source(name: str, path: Path) -> Source:
    import datasets

    known, adapter = _adapter_for_path(path)
    loaded = datasets.load_from_disk(str(path))  # memory-mapped: cheap until rows are read
    if isinstance(loaded, datasets.DatasetDict):
        preferred = (adapter.eval_split,) if adapter and adapter.eval_split else ()
        splits = _pick_splits(name, loaded, preferred + EVAL_SPLIT_NAMES)
    else:
        splits = {"train": loaded}
    label = f"{path.resolve()}:{known or 'generic'}"
    return Source(name, fingerprint=_datasets_fingerprint(label, splits), has_eval_split="eval" in splits,
                  read=splits.__getitem__, convert=adapter.convert if adapter else _generic,
                  fields=f"{adapter.fields} (the layout of {known})" if adapter else
                  f"{GENERIC_SCHEMAS}, or a directory named after a known dataset (e.g. .../Dahoas/rm-static)")


def _hub_source(name: str) -> Source:
    adapter = _ADAPTERS[name]
    loaded: dict = {}

    def splits() -> dict:
        if not loaded:
            eval_candidates = (adapter.eval_split,) if adapter.eval_split else ()
            loaded.update(_pick_splits(name, _load_hub(name, adapter), eval_candidates))
        return loaded

    return Source(name, fingerprint=lambda: _datasets_fingerprint(name, splits()),
                  has_eval_split=adapter.eval_split is not None, read=lambda split: splits()[split],
                  convert=adapter.convert, fields=adapter.fields)


def _load_hub(name: str, adapter: _Adapter):
    import datasets

    args = adapter.hub_args or (name,)
    call = f"datasets.load_dataset({', '.join(map(repr, args))})"
    try:
        return datasets.load_dataset(*args)
    except (ConnectionError, FileNotFoundError) as err:
        reason = str(err).partition("\n")[0]
        raise UserInputError(
            f"could not load '{name}' from the Hugging Face hub ({reason}): on a machine with "
            f"network run {call}.save_to_disk(DIR), copy DIR here as a path ending with "
            f"'{name}' and pass that path to --data_path") from err
