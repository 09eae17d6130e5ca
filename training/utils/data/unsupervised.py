"""Pre-training text for PPO-ptx (`--unsupervised_dataset_name`): documents -> fixed-size token blocks.

Sources, first match wins:
- a local `.txt` file: documents are separated by blank lines (newlines inside one are kept, the
  whitespace around one is not);
- a local `.json` (list of objects or JSON lines), `.jsonl` or `.parquet` file with a "text" field;
- a `datasets.save_to_disk` directory (its "train" split when it holds several) with a "text" column;
- otherwise a Hugging Face hub dataset name, loaded as `datasets.load_dataset(name, config_name,
  split="train")` (DeepSpeed-Chat's `wikitext` + `wikitext-2-raw-v1`). `config_name` is used for hub
  names only.

Blocks: every non-blank document is tokenised without special tokens and followed by the EOS id (the
same end-of-text id the chat data uses), the documents are concatenated in their order and the result
is cut into blocks of exactly `block_size` tokens; the last partial block is dropped (and counted).
Every token is a label: the actor learns to continue the text (the loss shifts by one itself).

The blocks are cached under `data_output_path/unsupervised_<key>/`, built once on global rank 0 and
written atomically; the key covers the source's identity, the tokenizer, EOS, block size and this code.
"""
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from training.utils import distributed
from training.utils.atomic_dir import atomic_directory
from training.utils.data.pipeline import RaggedDataset, build_cache_once, code_version, make_loader
from training.utils.data.sources import file_fingerprint, read_data_file
from training.utils.errors import UserInputError
from training.utils.tokenizer import tokenizer_fingerprint

TEXT_FIELD = "text"
TEXT_SUFFIX = ".txt"
ROW_SUFFIXES = (".json", ".jsonl", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_TOKENISE_BATCH = 1000  # documents per tokenizer call: parallel in Rust, bounded memory


def build_unsupervised_dataset(name: str, config_name: str | None, tokenizer, block_size: int,
                               data_output_path: str, seed: int) -> RaggedDataset:
    """Blocks {"input_ids": [block_size ids]} of the text in `name` (see the module docstring).

    `seed` does not change the blocks (they keep the text's order so each one is contiguous text);
    it is accepted so the caller passes the run's seed alongside, and `make_unsupervised_loader`
    shuffles the blocks with it.
    """
    if block_size < 2:
        raise UserInputError(f"unsupervised block size {block_size} is too small: make "
                             "--max_prompt_seq_len + --max_answer_seq_len at least 2")
    texts, identity = _open_texts(name, config_name)
    key_payload = {"source": identity, "tokenizer": tokenizer_fingerprint(tokenizer), "eos": tokenizer.eos_token_id,
                   "block_size": block_size, "code": code_version()}
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = os.path.join(os.path.abspath(data_output_path), f"unsupervised_{key}")
    build_cache_once(cache_dir, lambda: _build_cache(name, texts(), tokenizer, block_size, cache_dir))
    with open(os.path.join(cache_dir, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    distributed.print_rank_0(f"unsupervised data '{name}': {stats['documents']} documents, {stats['tokens']} tokens "
                             f"-> {stats['blocks']} blocks of {block_size} ({stats['dropped_tail_tokens']} tail "
                             f"tokens dropped), cached in {cache_dir}")
    return RaggedDataset.load(os.path.join(cache_dir, "blocks.npz"))


def make_unsupervised_loader(dataset: RaggedDataset, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled, rank-sharded batches of blocks (see pipeline.make_loader)."""
    return make_loader(dataset, batch_size, BlockCollator(), seed, shuffle=True)


class BlockCollator:
    """input_ids / attention_mask / labels of equal-length blocks: no padding, every token a label."""

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([item["input_ids"] for item in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def tokenise_into_blocks(documents: list[str], tokenizer, block_size: int) -> tuple[np.ndarray, dict]:
    """[N, block_size] int32 blocks of `doc_1 EOS doc_2 EOS ...`, and counts for stats.json."""
    stream = []
    for start in range(0, len(documents), _TOKENISE_BATCH):
        batch = documents[start:start + _TOKENISE_BATCH]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.append(np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int32))
    tokens = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int32)
    n_blocks = len(tokens) // block_size
    blocks = tokens[:n_blocks * block_size].reshape(n_blocks, block_size)
    return blocks, {"documents": len(documents), "tokens": len(tokens), "blocks": n_blocks,
                    "dropped_tail_tokens": int(len(tokens) - n_blocks * block_size)}


def _build_cache(name: str, texts: list[str], tokenizer, block_size: int, cache_dir: str) -> None:
    documents = [text for text in texts if text.strip()]
    if not documents:
        raise UserInputError(f"unsupervised dataset '{name}' has no text (every '{TEXT_FIELD}' is empty): "
                             "pass a source with text in it")
    blocks, stats = tokenise_into_blocks(documents, tokenizer, block_size)
    if stats["blocks"] == 0:
        raise UserInputError(f"unsupervised dataset '{name}' has {stats['tokens']} tokens, fewer than one block "
                             f"of {block_size}: add text or lower --max_prompt_seq_len + --max_answer_seq_len")
    with atomic_directory(cache_dir) as tmp:
        RaggedDataset({"input_ids": list(blocks)}).save(os.path.join(tmp, "blocks.npz"))
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump({"source": name, "block_size": block_size, **stats}, f, indent=1)


def _open_texts(name: str, config_name: str | None):
    """(a function returning the documents, the source's identity for the cache key). Reading local
    files is deferred to the cache build; hub datasets are loaded here, their fingerprint is the identity."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == TEXT_SUFFIX:
            return lambda: _paragraphs(path), file_fingerprint(path)
        if path.suffix in ROW_SUFFIXES:
            return lambda: _text_field(name, read_data_file(path)), file_fingerprint(path)
        raise UserInputError(f"unsupervised dataset '{name}' is a file but not {TEXT_SUFFIX} or "
                             f"{'/'.join(ROW_SUFFIXES)}: convert it to one of those")
    if path.is_dir():
        dataset = _load_disk_dataset(name, path)
        return lambda: _text_column(name, dataset), f"{path.resolve()}:{dataset._fingerprint}"
    if path.suffix in (TEXT_SUFFIX,) + ROW_SUFFIXES or name.startswith((".", "/", "~")):
        raise UserInputError(f"unsupervised dataset '{name}': no such file or directory "
                             f"(looked for {path.absolute()}); check the path")
    dataset = _load_hub_dataset(name, config_name)
    return lambda: _text_column(name, dataset), f"{name}:{config_name}:{dataset._fingerprint}"


def _load_disk_dataset(name: str, path: Path):
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise UserInputError(f"unsupervised dataset '{name}' is a directory but not a datasets.save_to_disk "
                             f"directory: pass that, or a {TEXT_SUFFIX}/{'/'.join(ROW_SUFFIXES)} file")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserInputError(f"unsupervised dataset '{name}' has splits {sorted(loaded)} but no 'train' split: "
                                 "save the text as a split named train")
        return loaded["train"]
    return loaded


def _load_hub_dataset(name: str, config_name: str | None):
    import datasets

    call = f"datasets.load_dataset({name!r}, {config_name!r}, split='train')"
    try:
        return datasets.load_dataset(name, config_name, split="train")
    except (OSError, ValueError) as err:  # offline, unknown name, unknown config
        reason = str(err).partition("\n")[0]
        raise UserInputError(
            f"could not load unsupervised dataset '{name}' (config {config_name}) from the Hugging Face hub "
            f"({reason}): on a machine with network run {call}.save_to_disk(DIR) and pass DIR, or pass a "
            f"local {TEXT_SUFFIX}/.jsonl file") from None


def _paragraphs(path: Path) -> list[str]:
    return [paragraph.strip() for paragraph in _BLANK_LINES.split(read_utf8_text(path))]


def read_utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 end the run with where they are (byte offset and line)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserInputError(f"unsupervised dataset '{path}' is not UTF-8 text: byte {err.start} (line {line}) is "
                             f"0x{data[err.start]:02x}; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                             ) from None


def _text_column(name: str, dataset) -> list[str]:
    if TEXT_FIELD not in dataset.column_names:
        raise UserInputError(f"unsupervised dataset '{name}' has columns {dataset.column_names} but no "
                             f"'{TEXT_FIELD}' column: rename the text column to '{TEXT_FIELD}'")
    return [text or "" for text in dataset[TEXT_FIELD]]


def _text_field(name: str, rows: list[dict]) -> list[str]:
    texts = []
    for number, row in enumerate(rows, start=1):
        text = row.get(TEXT_FIELD)
        if text is not None and not isinstance(text, str):
            raise UserInputError(f"unsupervised dataset '{name}' row {number}: '{TEXT_FIELD}' is "
                                 f"{type(text).__name__}, not a string; fix the data")
        if text is None and number == 1:
            raise UserInputError(f"unsupervised dataset '{name}': the first row has fields {sorted(row)} but "
                                 f"needs '{TEXT_FIELD}'; fix the data or rename the field")
        texts.append(text or "")
    return texts
