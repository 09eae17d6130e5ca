"""Sources -> deterministic phase split -> tokenised, cached splits for phase 1 (SFT), 2 (pairs), 3 (prompts).

Split semantics (DeepSpeed-Chat's `--data_split 2,4,4`): each source's train and eval rows are shuffled
with `--data_seed` and cut into the normalised fractions; phase k uses slice k of both. Sources without
an eval split first get a deterministic 9:1 train/eval cut. `--sft_only_data_path` sources go whole
into phase 1. Several sources are blended by concatenation followed by one seeded shuffle.

The split uses `--data_seed` (default 1234 in every step), not the training `--seed`, so changing the
training seed of one step can never make its phase overlap another step's.
"""
import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.utils import distributed
from training.utils.atomic_dir import atomic_directory
from training.utils.config import FIXED, at_least, in_range, option
from training.utils.data.chat_format import ConversationError, PromptFormat, resolve_prompt_format
from training.utils.data.conversation import Chunk
from training.utils.data.samplers import DEFAULT_GROUP_BATCHES, LengthGroupedSampler, ResumableSampler, sample_lengths
from training.utils.data.sources import Sample, Source, open_source
from training.utils.errors import UserInputError
from training.utils.tokenizer import load_tokenizer, tokenizer_fingerprint

PHASE_SFT, PHASE_REWARD, PHASE_RLHF = 1, 2, 3
EVAL_HOLDOUT = 0.1  # share of a train-only source that becomes its eval split
_CODE_FILES = ("data/*.py", "tokenizer.py")


@dataclass
class DataConfig:
    """data"""
    data_path: list[str] = option(
        ["Dahoas/rm-static"], "Datasets to blend: DeepSpeed-Chat hub names, synthetic/arithmetic[:k=v,...], "
        "synthetic/copy, local/jsonfile, a .json/.jsonl/.parquet file, or a dataset directory.",
        check=lambda paths: _repeated(paths), resume=FIXED)
    data_split: str = option("2,4,4", "Shares of every dataset for phase 1 (SFT), 2 (reward/DPO), 3 (PPO).",
                             check=lambda text: _split_problem(text), resume=FIXED)
    data_output_path: str = option("/tmp/data_files/", "Where split indices and the tokenised cache are stored "
                                                       "(shared by all ranks).")
    data_seed: int = option(1234, "[new] Seed of the phase split, independent of --seed so phases never overlap.",
                            check=in_range(0, 2**32 - 1), resume=FIXED)
    group_by_length: bool = option(True, "[new] Batch samples of similar length together (shuffled groups of "
                                         f"{DEFAULT_GROUP_BATCHES} batches sorted by length, batch order shuffled): "
                                         "little padding on real data. --no_group_by_length: random batches.",
                                   resume=FIXED)
    # Flags of some steps only (SequenceDataConfig, SFTDataConfig); these are their values elsewhere.
    max_seq_len: int = 512
    sft_only_data_path: list[str] = field(default_factory=list)
    train_on_prompt: bool = False

    def validate(self, output_dir: str) -> None:
        """Checks of the data flags against the run's --output_dir (called by each step's validate())."""
        check_cache_outside_output(self.data_output_path, output_dir)


def check_cache_outside_output(data_output_path: str, output_dir: str) -> None:
    """The data cache may not live in --output_dir: that directory holds only the saved model (a resumed run
    refuses unknown files there) and is replaced whole when the model is saved, cache included."""
    cache, output = os.path.realpath(data_output_path), os.path.realpath(output_dir)
    if cache == output or cache.startswith(output.rstrip(os.sep) + os.sep):
        suggestion = os.path.join(os.path.dirname(output.rstrip(os.sep)), "data_files")
        raise UserInputError(f"--data_output_path '{data_output_path}' is inside --output_dir '{output_dir}': the "
                             "saved model replaces that directory and a resumed run refuses the cache in it; pass a "
                             f"path outside it, e.g. --data_output_path {suggestion}")


@dataclass
class SeqLenFlags:
    """data"""
    max_seq_len: int = option(512, "Maximum tokens of prompt + reply; longer samples lose the start of the prompt.",
                              check=at_least(2), resume=FIXED)


@dataclass
class SequenceDataConfig(SeqLenFlags, DataConfig):  # (this order: SeqLenFlags' option replaces the plain field)
    """data"""


@dataclass
class SFTDataConfig(SequenceDataConfig):
    """data"""
    sft_only_data_path: list[str] = option([], "Datasets used whole, and only, for SFT.",
                                           check=lambda paths: _repeated(paths), resume=FIXED)
    train_on_prompt: bool = option(False, "[new] Also train on prompt tokens (default: loss on assistant replies "
                                          "only).", resume=FIXED)


@dataclass
class PhaseData:
    train: "RaggedDataset"
    eval: "RaggedDataset"
    stats: dict = field(default_factory=dict)
    cache_dir: str = ""


def _repeated(paths: list[str]) -> str | None:
    """A dataset named twice would be trained on twice (and counted once in the statistics)."""
    twice = sorted({p for p in paths if paths.count(p) > 1})
    return f"names {', '.join(twice)} more than once: give each dataset once" if twice else None


def _split_shares(text: str) -> list[float] | None:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        return None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        return None
    return parts


def _split_problem(text: str) -> str | None:
    if _split_shares(text) is None:
        return "must be three finite non-negative numbers with a positive sum, e.g. 2,4,4 (phase 1, 2, 3 shares)"
    return None


def parse_data_split(text: str) -> list[float]:
    parts = _split_shares(text)
    if parts is None:
        raise UserInputError(f"--data_split '{text}' {_split_problem(text)}")
    total = sum(parts)
    return [p / total for p in parts]


def phase_slice(n: int, fractions: list[float], phase: int, seed: int) -> np.ndarray:
    """Indices of rows 0..n-1 that belong to `phase` (1-based): a seeded permutation cut by cumulative share."""
    order = np.random.RandomState(seed).permutation(n)
    bounds = [0] + [int(round(c * n)) for c in np.cumsum(fractions)]
    bounds[-1] = n
    return np.sort(order[bounds[phase - 1]:bounds[phase]])


def holdout_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 9:1 train/eval cut for a source without an eval split."""
    order = np.random.RandomState(seed + 1).permutation(n)
    n_eval = int(round(n * EVAL_HOLDOUT)) if n >= 2 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def code_version() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for pattern in _CODE_FILES:
        for path in sorted(glob.glob(os.path.join(here, pattern))):
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_key(config: DataConfig, phase: int, sources: list[Source], sft_only: list[Source],
              prompt_format: PromptFormat) -> str:
    """Everything that changes the tokens: data identity, split, phase, seed, tokenizer, format, limits, code."""
    tokenizer = prompt_format.tokenizer
    payload = {
        "phase": phase,
        "sources": [(s.name, s.fingerprint) for s in sources],
        "sft_only": [(s.name, s.fingerprint) for s in sft_only] if phase == PHASE_SFT else [],
        "data_split": parse_data_split(config.data_split),
        "data_seed": config.data_seed,
        "max_seq_len": config.max_seq_len if phase != PHASE_RLHF else None,
        "train_on_prompt": config.train_on_prompt if phase == PHASE_SFT else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": tokenizer.eos_token_id,
        "prompt_format": prompt_format.fingerprint(),
        "fields": ["prompt_ids", REFERENCE_FIELD] if phase == PHASE_RLHF else None,  # phase 3 gained references
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def build_phase_data(config: DataConfig, prompt_format: PromptFormat, phase: int) -> PhaseData:
    """Open, split, tokenise and cache the data of one phase in `prompt_format`; every rank gets the same
    PhaseData."""
    sources = [open_source(name) for name in config.data_path]
    sft_only = [open_source(name) for name in config.sft_only_data_path] if phase == PHASE_SFT else []
    key = cache_key(config, phase, sources, sft_only, prompt_format)
    cache_dir = os.path.join(os.path.abspath(config.data_output_path), f"phase{phase}_{key}")
    build_cache_once(cache_dir, lambda: _build_cache(config, prompt_format, phase, sources, sft_only, cache_dir))
    return load_phase_data(cache_dir)


def build_cache_once(cache_dir: str, build) -> None:
    """Make `cache_dir` exist on every rank's disk: `build()` (which must write it atomically) runs on
    global rank 0 while the others wait; a node that does not share that disk builds its own
    (identical) copy on its local rank 0."""

    def build_if_missing():
        if not os.path.isdir(cache_dir):
            build()

    distributed.run_on_rank_0(build_if_missing)
    if not os.path.isdir(cache_dir) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        build_if_missing()
    distributed.barrier()


def load_phase_data(cache_dir: str) -> PhaseData:
    with open(os.path.join(cache_dir, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    return PhaseData(RaggedDataset.load(os.path.join(cache_dir, "train.npz")),
                     RaggedDataset.load(os.path.join(cache_dir, "eval.npz")), stats, cache_dir)


def _select_rows(config: DataConfig, phase: int, sources: list[Source], sft_only: list[Source]
                 ) -> tuple[list[Sample], list[Sample], dict, dict]:
    fractions = parse_data_split(config.data_split)
    train, evaluation, indices, per_source = [], [], {}, {}
    for number, source in enumerate(sources):
        rows_train = source.rows("train")
        if source.has_eval_split:
            rows_eval = source.rows("eval")
        else:
            keep, held = holdout_split(len(rows_train), config.data_seed)
            rows_train, rows_eval = [rows_train[i] for i in keep], [rows_train[i] for i in held]
        train_idx = phase_slice(len(rows_train), fractions, phase, config.data_seed)
        eval_idx = phase_slice(len(rows_eval), fractions, phase, config.data_seed)
        indices[f"{number}_train"], indices[f"{number}_eval"] = train_idx, eval_idx
        train += [rows_train[i] for i in train_idx]
        evaluation += [rows_eval[i] for i in eval_idx]
        per_source[source.name] = {"train": len(train_idx), "eval": len(eval_idx),
                                   "skipped": dict(source.skipped)}
    for source in sft_only:
        rows_train = source.rows("train")
        rows_eval = source.rows("eval") if source.has_eval_split else []
        train += rows_train
        evaluation += rows_eval
        per_source[source.name] = {"train": len(rows_train), "eval": len(rows_eval), "sft_only": True,
                                   "skipped": dict(source.skipped)}
    if not train:
        raise UserInputError(
            f"--data_split {config.data_split} leaves no training rows for phase {phase} of "
            f"{', '.join(config.data_path)}: give phase {phase} a non-zero share or add data")
    blend = np.random.RandomState(config.data_seed)
    train = [train[i] for i in blend.permutation(len(train))]
    evaluation = [evaluation[i] for i in blend.permutation(len(evaluation))]
    return train, evaluation, indices, per_source


def _build_cache(config, prompt_format, phase, sources, sft_only, cache_dir) -> None:
    train_rows, eval_rows, indices, per_source = _select_rows(config, phase, sources, sft_only)
    tokenise = {PHASE_SFT: tokenise_sft, PHASE_REWARD: tokenise_pairs, PHASE_RLHF: tokenise_prompts}[phase]
    try:
        train, train_counts = tokenise(train_rows, prompt_format, config)
        evaluation, eval_counts = tokenise(eval_rows, prompt_format, config)
    except ConversationError as err:
        raise UserInputError(f"--data_path {' '.join(config.data_path)}: {err}; fix the data, or drop "
                             "--apply_chat_template (the HH text renders any turn order)") from None
    if len(train) == 0:
        check_max_seq_len_keeps_labels(config, phase, train_counts)
        raise UserInputError(f"no usable phase-{phase} training rows in {', '.join(config.data_path)} "
                             f"(dropped: {train_counts}); phase {phase} needs "
                             f"{'pairs with chosen and rejected' if phase == PHASE_REWARD else 'prompts and replies'}")
    stats = {"phase": phase, "sources": per_source, "train": {"rows": len(train), **train_counts},
             "eval": {"rows": len(evaluation), **eval_counts}, "config": config.__dict__ | {
                 "data_path": list(config.data_path), "sft_only_data_path": list(config.sft_only_data_path)}}
    with atomic_directory(cache_dir) as tmp:
        train.save(os.path.join(tmp, "train.npz"))
        evaluation.save(os.path.join(tmp, "eval.npz"))
        os.makedirs(os.path.join(tmp, "indices"))
        for name, idx in indices.items():
            np.save(os.path.join(tmp, "indices", f"{name}.npy"), idx)
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)


def check_max_seq_len_keeps_labels(config: DataConfig, phase: int, counts: dict) -> None:
    """When --max_seq_len cut away every training sample's reply (so nothing is left to train on: the loss
    would be the mean over no tokens, NaN), say that, with the numbers, rather than "no usable rows"."""
    data = ", ".join(config.data_path)
    if phase == PHASE_SFT and counts.get("no_label"):
        raise UserInputError(f"--max_seq_len {config.max_seq_len} is too small: after truncation none of the "
                             f"{counts['no_label']} training samples of {data} keeps a reply token to learn; raise "
                             "--max_seq_len")
    if phase == PHASE_REWARD and counts.get("too_long"):
        shortest = counts["shortest_too_long_reply"]
        raise UserInputError(f"--max_seq_len {config.max_seq_len} is too small: every one of the "
                             f"{counts['too_long']} training pairs of {data} has a reply (with its EOS) longer than "
                             f"{config.max_seq_len - 1} tokens (the shortest takes {shortest}); raise --max_seq_len "
                             f"to at least {shortest + 1}")


def tokenise_sft(rows: list[Sample], prompt_format: PromptFormat, config: DataConfig) -> tuple["RaggedDataset", dict]:
    """input_ids + label mask. Too-long rows lose the start of the prompt first; a reply that alone
    exceeds the limit keeps its beginning (its EOS is then cut and counted)."""
    counts = {"no_reply": 0, "prompt_truncated": 0, "reply_truncated": 0, "no_label": 0}
    conversations = []
    for sample in rows:
        chunks = prompt_format.sft(sample)
        if chunks is None:
            counts["no_reply"] += 1
        else:
            conversations.append([Chunk(c.text, c.ends_turn, True) for c in chunks] if config.train_on_prompt
                                 else chunks)
    ids_list, mask_list = [], []
    limit = config.max_seq_len
    for ids, trained in prompt_format.encode(conversations):
        if not any(trained[1:]):  # a conversation without an assistant reply
            counts["no_reply"] += 1
            continue
        if len(ids) > limit:
            reply_start = _last_run_start(trained)
            if len(ids) - reply_start <= limit - 1:
                ids, trained = ids[-limit:], trained[-limit:]
                counts["prompt_truncated"] += 1
            else:
                keep_prompt = min(reply_start, limit // 2)
                ids = (ids[reply_start - keep_prompt:])[:limit]
                trained = (trained[reply_start - keep_prompt:])[:limit]
                counts["reply_truncated"] += 1
        if not any(trained[1:]):  # truncation left no label (the loss predicts positions 1..): a NaN mean
            counts["no_label"] += 1
            continue
        ids_list.append(ids)
        mask_list.append([int(t) for t in trained])
    return RaggedDataset({"input_ids": ids_list, "loss_mask": mask_list}), counts


def _last_run_start(trained: list[bool]) -> int:
    """Start index of the last contiguous run of trained tokens (the final reply)."""
    end = len(trained)
    while end > 0 and not trained[end - 1]:
        end -= 1
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return start


def tokenise_pairs(rows: list[Sample], prompt_format: PromptFormat, config: DataConfig
                   ) -> tuple["RaggedDataset", dict]:
    """chosen_ids / rejected_ids, each ending with EOS (the position the reward model scores), and
    chosen_reply_mask / rejected_reply_mask, 1 on the reply's tokens and its EOS (the tokens DPO scores).
    Prompts are cut from the left to fit; pairs whose reply alone does not fit are dropped."""
    counts = {"no_pair": 0, "identical_pair": 0, "too_long": 0, "prompt_truncated": 0}
    conversations = []
    for sample in rows:
        if not sample.chosen or not sample.rejected:
            counts["no_pair"] += 1
        elif sample.chosen.strip() == sample.rejected.strip():
            counts["identical_pair"] += 1
        else:
            context = prompt_format.prompt_of(sample)
            conversations.append(context + [prompt_format.reply(sample.chosen)])
            conversations.append(context + [prompt_format.reply(sample.rejected)])
    encoded = prompt_format.encode(conversations)
    chosen, rejected, chosen_reply, rejected_reply, limit = [], [], [], [], config.max_seq_len
    for (c_ids, c_mask), (r_ids, r_mask) in zip(encoded[0::2], encoded[1::2]):
        reply = max(sum(c_mask), sum(r_mask))
        if reply > limit - 1:
            counts["too_long"] += 1
            counts["shortest_too_long_reply"] = min(reply, counts.get("shortest_too_long_reply", reply))
            continue
        if len(c_ids) > limit or len(r_ids) > limit:
            counts["prompt_truncated"] += 1
        chosen.append(c_ids[-limit:])
        rejected.append(r_ids[-limit:])
        chosen_reply.append([int(t) for t in c_mask[-limit:]])
        rejected_reply.append([int(t) for t in r_mask[-limit:]])
    return RaggedDataset({"chosen_ids": chosen, "rejected_ids": rejected, "chosen_reply_mask": chosen_reply,
                          "rejected_reply_mask": rejected_reply}), counts


def tokenise_prompts(rows: list[Sample], prompt_format: PromptFormat, config: DataConfig
                     ) -> tuple["RaggedDataset", dict]:
    """Prompt ids in full (step 3 applies its own --max_prompt_seq_len policy: truncate or drop), and each row's
    reference answer for a rule reward: its chosen reply (a GSM8K-style row's response), as UTF-8 byte values
    (text, not tokens: the reward function compares strings; empty when the row has none)."""
    encoded = prompt_format.encode([prompt_format.prompt_of(s) for s in rows])
    prompts = [ids for ids, _ in encoded]
    references = [list(reference_text(s).encode("utf-8")) for s in rows]
    return RaggedDataset({"prompt_ids": prompts, REFERENCE_FIELD: references}), {}


REFERENCE_FIELD = "reference_bytes"


def reference_text(row: Sample) -> str:
    """The reference answer of a prompt row: its chosen reply, else its demonstration, else ''."""
    text = row.chosen if row.chosen is not None else row.demonstration
    return text or ""


def decode_reference(byte_values: list[int]) -> str | None:
    """A stored reference back as text; None when the row had none."""
    return bytes(byte_values).decode("utf-8") if byte_values else None


class RaggedDataset:
    """Named lists of variable-length int sequences stored flat (values + offsets) in a .npz file.

    No pickle: `np.load(..., allow_pickle=False)` reads it back. Items are dicts of Python lists.
    """

    def __init__(self, fields: dict[str, list[list[int]]]):
        self.fields = {}
        for name, seqs in fields.items():
            lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
            self.fields[name] = (values, offsets)

    @classmethod
    def load(cls, path: str) -> "RaggedDataset":
        dataset = cls({})
        with np.load(path, allow_pickle=False) as arrays:
            names = sorted({key.rsplit(".", 1)[0] for key in arrays.files})
            dataset.fields = {n: (arrays[f"{n}.values"], arrays[f"{n}.offsets"]) for n in names}
        return dataset

    def save(self, path: str) -> None:
        arrays = {}
        for name, (values, offsets) in self.fields.items():
            arrays[f"{name}.values"], arrays[f"{name}.offsets"] = values, offsets
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    def __len__(self) -> int:
        if not self.fields:
            return 0
        return len(next(iter(self.fields.values()))[1]) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {name: values[offsets[index]:offsets[index + 1]].tolist()
                for name, (values, offsets) in self.fields.items()}

    def lengths(self, name: str) -> np.ndarray:
        offsets = self.fields[name][1]
        return offsets[1:] - offsets[:-1]


def load_supervised_data(config, phase: int, make_collator, unit: str):
    """The tokenizer, the prompt format, the phase's data and its shuffled train / ordered eval loaders for steps
    1, 2 and DPO (`config` is their SupervisedConfig; `make_collator(pad_token_id)`), with one log line in `unit`s."""
    # (imported here: the model layer sits below the data layer)
    from training.utils.model.build import check_model_input
    from training.utils.output_dir import REWARD_MODEL

    model_path = config.model.model_name_or_path
    tokenizer = load_tokenizer(model_path, config.add_eot_token, config.eot_token, config.trust_remote_code)
    prompt_format = resolve_prompt_format(tokenizer, config, {"--model_name_or_path": model_path})
    # Refused before any data is tokenised: steps 1 and DPO train a language model from --model_name_or_path.
    check_model_input(model_path, language_model=config.SAVES != REWARD_MODEL,
                      length=config.data.max_seq_len, what=f"--max_seq_len {config.data.max_seq_len}",
                      fix="lower --max_seq_len to at most {limit}", trust_remote_code=config.trust_remote_code)
    data = build_phase_data(config.data, prompt_format, phase)
    collator, grouped = make_collator(tokenizer.pad_token_id), config.data.group_by_length
    train_loader = make_loader(data.train, config.per_device_train_batch_size, collator, config.seed, shuffle=True,
                               length_grouped=grouped)
    eval_loader = make_loader(data.eval, config.per_device_eval_batch_size, collator, config.seed, shuffle=False,
                              length_grouped=grouped)
    distributed.print_rank_0(f"data: {len(data.train)} train / {len(data.eval)} eval {unit} (cache {data.cache_dir}; "
                             f"train {data.stats['train']}; {'length-grouped' if grouped else 'random'} batches; "
                             f"format: {prompt_format.describe()})")
    return tokenizer, prompt_format, data, train_loader, eval_loader


def make_loader(dataset, batch_size: int, collator, seed: int, shuffle: bool, length_grouped: bool = False,
                group_batches: int = DEFAULT_GROUP_BATCHES, lengths=None) -> DataLoader:
    """A DataLoader whose sampler shards by rank (also with one rank, so the order depends only on seed
    and epoch). Every rank gets the same number of batches, which ZeRO-3's per-forward collectives
    need; for that the sampler repeats up to world_size - 1 samples when the split does not divide.

    `length_grouped=True` batches samples of similar length together (samplers.LengthGroupedSampler,
    groups of `group_batches` steps; `lengths` defaults to samplers.sample_lengths(dataset)), so padding
    to the longest sample of a batch wastes little. Default: plain random batches (ResumableSampler).
    Both support `sampler.set_epoch` and `sampler.skip_batches` alike."""
    if length_grouped:
        sampler = LengthGroupedSampler(sample_lengths(dataset) if lengths is None else lengths, batch_size,
                                       num_replicas=distributed.world_size(), rank=distributed.rank(), seed=seed,
                                       shuffle=shuffle, group_batches=group_batches)
    else:
        sampler = ResumableSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                   shuffle=shuffle, seed=seed)
    # Its own generator: creating an iterator then draws nothing from the global RNG, so a resumed run
    # (which creates its iterator mid-epoch) sees the same random stream as an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))
