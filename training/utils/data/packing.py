"""Packing SFT samples: several samples share one row of up to `max_seq_len` tokens, and each still
sees only itself, so the loss and every logit are those of the sample alone (no padding compute).

How it stays exact: every row gets
  * `position_ids` restarting at 0 at each sample's first token (what the sample would have alone);
  * a 4-D additive attention mask [rows, 1, L, L]: 0 where query and key belong to the same sample
    and key <= query, the dtype's minimum elsewhere (block-diagonal causal). transformers' mask
    builders (`masking_utils.create_causal_mask`) hand a 4-D mask to the attention as it is, for the
    eager and sdpa implementations alike.
transformers' own packed-sequence detection (position_ids with `attention_mask=None`, see
`masking_utils.find_packed_sequence_indices`) is not enough: OPT does not pass position_ids to its mask
builder and would attend across samples; the explicit 4-D mask works for OPT and Llama alike.
Labels: a sample's first token is never a target (it would be predicted from the previous sample's
last token), exactly as an unpacked sample's first token never is.

Architectures whose positions or attention come from elsewhere (ALiBi models such as Bloom build their
bias from a 2-D mask; flash-attention / flex implementations take no 4-D tensor mask) cannot be packed
this way: `supports_packing(model)` says False and callers fall back to length-grouped batches.

Usage (step 1):

    if supports_packing(model):
        loader = make_packed_loader(data.train, rows_per_batch, args.max_seq_len, tokenizer.pad_token_id,
                                    seed=args.seed, shuffle=True, mask_dtype=torch.bfloat16)  # model dtype
    else:
        loader = make_loader(data.train, batch_size, SFTCollator(pad_id), seed, True, length_grouped=True)
    ...
    logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    position_ids=b["position_ids"], use_cache=False).logits
    loss = causal_lm_loss(logits, b["labels"])   # token-weighted, as for padded batches
    tokens = int((b["segment_ids"] >= 0).sum())  # real tokens (attention_mask is 4-D here)

A batch is always `rows_per_batch` rows (a fixed micro-batch for DeepSpeed) holding a varying number
of samples; rows are padded to the batch's longest row (or `pad_to`). The rows are packed once,
deterministically from the seed; the sampler reshuffles their order every epoch and resumes mid-epoch
(`set_epoch`, `skip_batches`) like every loader of `pipeline.make_loader`.
"""
import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from training.utils.losses import IGNORE_INDEX
from training.utils.model import round_up
from training.utils.model.attention import SEGMENT_ATTENTION, SEGMENT_DTYPES
from training.utils.model.build import unwrap_model

# model_type values whose eager/sdpa attention takes a 4-D additive mask as is and whose positions come
# from position_ids; each is checked by tests/test_packing.py (packed logits == unpacked logits).
PACKABLE_MODEL_TYPES = frozenset({"opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2",
                                  "gpt_neox", "gptj", "falcon"})
PACKABLE_ATTENTION = ("eager", "sdpa", SEGMENT_ATTENTION)
# Config keys of attention-probability dropout: with it on, segment attention hands the call to SDPA.
ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def pack_samples(lengths: Sequence[int], max_seq_len: int, seed: int = 0) -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most `max_seq_len`: best-fit decreasing
    (longest sample first, into the open row with the least room that still fits it; a new row when
    none does). Equal lengths are taken in a seeded random order, so the result depends only on the
    lengths and the seed. O(n log max_seq_len)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_seq_len:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit a row of max_seq_len {max_seq_len}")
    tie_break = np.random.default_rng(seed % 2**63).permutation(len(lengths))
    order = np.lexsort((tie_break, -lengths))
    rows: list[list[int]] = []
    free: list[int] = []                  # sorted room values that some open row has
    rows_with_free: dict[int, list[int]] = {}
    for index in order.tolist():
        need = int(lengths[index])
        slot = bisect.bisect_left(free, need)
        if slot == len(free):
            row, room = len(rows), max_seq_len
            rows.append([])
        else:
            room = free[slot]
            row = rows_with_free[room].pop()
            if not rows_with_free[room]:
                del rows_with_free[room]
                free.pop(slot)
        rows[row].append(index)
        room -= need
        if room > 0:
            if room not in rows_with_free:
                rows_with_free[room] = []
                bisect.insort(free, room)
            rows_with_free[room].append(row)
    return rows


def packing_efficiency(rows: Sequence[Sequence[int]], lengths: Sequence[int], max_seq_len: int) -> float:
    """Real tokens / (rows * max_seq_len): the share of full-width rows that is not padding."""
    if not rows:
        return 1.0
    lengths = np.asarray(lengths)
    return float(sum(int(lengths[list(row)].sum()) for row in rows) / (len(rows) * max_seq_len))


class PackedSFTDataset(Dataset):
    """Rows of packed phase-1 samples over a dataset of {"input_ids", "loss_mask"} items (a RaggedDataset
    from pipeline.tokenise_sft). Item i is row i: the list of its sample dicts."""

    def __init__(self, dataset, max_seq_len: int, seed: int = 0, lengths: Sequence[int] | None = None):
        self.dataset = dataset
        self.max_seq_len = max_seq_len
        if lengths is None:
            lengths = dataset.lengths("input_ids") if hasattr(dataset, "lengths") else [
                len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.rows = pack_samples(self.lengths, max_seq_len, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.dataset[i] for i in self.rows[index]]

    def sample_lengths(self) -> np.ndarray:
        """Tokens per row (samplers.sample_lengths reads this)."""
        return np.array([int(self.lengths[row].sum()) for row in self.rows], dtype=np.int64)

    def efficiency(self) -> float:
        return packing_efficiency(self.rows, self.lengths, self.max_seq_len)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                      shared_segment: int | None = None) -> torch.Tensor:
    """[B, 1, L, L] additive mask from [B, L] segment ids: query q sees key k iff k <= q and both are in
    the same segment (padding, id -1, is one more segment, so no query row is fully masked), or k is in
    `shared_segment`, which every later segment sees (a prompt shared by two replies: data.pair_packing)."""
    length = segment_ids.size(-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if shared_segment is not None:
        same |= segment_ids[:, None, :] == shared_segment
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


@dataclass
class PackedSFTCollator:
    """Rows of packed samples -> input_ids / labels / position_ids / segment_ids [k, L] and a 4-D
    block-causal `attention_mask` [k, 1, L, L] (see the module docstring).

    labels: input_ids where loss_mask is 1, IGNORE_INDEX elsewhere, on padding and on every sample's
    first token. position_ids: 0.. per sample (and 0.. over the padding). segment_ids: the sample's
    position in its row, -1 on padding. `mask_dtype`: give the model's compute dtype (bf16/fp16 under
    mixed precision): torch's sdpa documents a float attn_mask of the query's dtype (CPU also accepted
    an fp32 mask with bf16 queries; CUDA kernels were not checked). `pad_to` fixes L (e.g. max_seq_len).
    """
    pad_token_id: int
    pad_to: int | None = None
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, rows: list[list[dict]]) -> dict[str, torch.Tensor]:
        widths = [sum(len(sample["input_ids"]) for sample in row) for row in rows]
        length = self.pad_to or max(widths)
        if max(widths) > length:
            raise ValueError(f"a packed row of {max(widths)} tokens is longer than pad_to {length}")
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for number, sample in enumerate(row):
                ids = torch.tensor(sample["input_ids"], dtype=torch.long)
                n = len(ids)
                trained = torch.tensor(sample["loss_mask"], dtype=torch.bool)
                target = ids.masked_fill(~trained, IGNORE_INDEX)
                target[:1] = IGNORE_INDEX  # never predicted from the previous sample
                input_ids[r, start:start + n] = ids
                labels[r, start:start + n] = target
                position_ids[r, start:start + n] = torch.arange(n)
                segment_ids[r, start:start + n] = number
                start += n
            position_ids[r, start:] = torch.arange(length - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
                "attention_mask": block_causal_mask(segment_ids, self.mask_dtype)}


@dataclass
class UnpaddedBatchCollator:
    """A batch of SFT samples as one row, almost none of its padding computed: PackedSFTCollator over [samples]
    (positions restart per sample, a block-causal mask keeps samples apart), so samples, labels and loss are those
    of the padded batch (SFTCollator). The row is padded to a multiple of `width_multiple` tokens: oneDNN compiles
    its matmul kernels for every new row count it meets (~6 ms each, a dozen per step), and its cache (1,024
    kernels) cannot hold one set per possible width; rounded to 64, a run meets at most max_tokens / 64 widths, whose
    kernels stay cached, for at most 63 padding tokens a batch (the padding attends to nothing and has no label).
    A batch of more than `max_tokens` tokens is right-padded as usual: its [1, 1, L, L] mask would hold more than
    max_tokens^2 entries."""
    pad_token_id: int
    mask_dtype: torch.dtype = torch.float32
    max_tokens: int = 4096
    width_multiple: int = 64

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        from training.utils.data.collators import SFTCollator

        tokens = sum(len(sample["input_ids"]) for sample in samples)
        if tokens > self.max_tokens:
            return SFTCollator(self.pad_token_id)(samples)
        return PackedSFTCollator(self.pad_token_id, pad_to=round_up(tokens, self.width_multiple),
                                 mask_dtype=self.mask_dtype)([samples])


def unpad_batches(loader, model, pad_token_id: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Switch an SFT loader of padded batches to UnpaddedBatchCollator where that is cheaper: `model` packs exactly
    and its training passes run segment attention (model.attention: CPU, bf16/fp16, no attention dropout), so each
    sample attends within itself and one row costs what its samples cost. Elsewhere attention would run over the
    row's whole [L, L] square, more than the padding saves. Returns whether it switched."""
    model = unwrap_model(model)
    config = model.config
    attention_dropout = any(getattr(config, key, 0) or 0 for key in ATTENTION_DROPOUT_KEYS)
    if (device.type != "cpu" or dtype not in SEGMENT_DTYPES or attention_dropout
            or getattr(config, "_attn_implementation", None) != SEGMENT_ATTENTION or not supports_packing(model)):
        return False
    loader.collate_fn = UnpaddedBatchCollator(pad_token_id, dtype)
    return True


def make_packed_loader(dataset, rows_per_batch: int, max_seq_len: int, pad_token_id: int, seed: int,
                       shuffle: bool = True, mask_dtype: torch.dtype = torch.float32, pad_to: int | None = None):
    """A pipeline.make_loader DataLoader over PackedSFTDataset(dataset, max_seq_len, seed): batches of
    `rows_per_batch` rows, rank-sharded, reshuffled per epoch, resumable (`sampler.skip_batches`)."""
    from training.utils.data.pipeline import make_loader

    rows = PackedSFTDataset(dataset, max_seq_len, seed)
    return make_loader(rows, rows_per_batch, PackedSFTCollator(pad_token_id, pad_to, mask_dtype), seed, shuffle)


def supports_packing(model, probe: bool = False, atol: float = 1e-4) -> bool:
    """Whether packed rows (4-D block-causal mask + restarting position_ids) give exactly the unpacked
    results for `model` (a transformers model, or an engine/wrapper around one).

    True for the model types in PACKABLE_MODEL_TYPES (not Falcon with ALiBi) running eager or sdpa
    attention. For other types: False, unless `probe=True`, which runs `packing_mismatch` (one small
    forward pass; under ZeRO-3 every rank must call it) and accepts a max logit difference <= atol.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
        return False
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "") == "alibi":
        return False
    if config.model_type in PACKABLE_MODEL_TYPES:
        return True
    if not probe:
        return False
    try:
        return packing_mismatch(model) <= atol
    except Exception:  # noqa: BLE001 (a model that refuses a 4-D mask or position_ids cannot be packed)
        return False


@torch.no_grad()
def packing_mismatch(model, lengths: Sequence[int] = (5, 9, 3), seed: int = 0) -> float:
    """Max |logit difference| between random samples packed in one row and the same samples as a
    right-padded batch (0 up to rounding when packing is exact for `model`; order 1 when samples
    attend to each other)."""
    from training.utils.data.collators import SFTCollator

    model = unwrap_model(model)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    samples = [{"input_ids": torch.randint(2, vocab, (n,), generator=generator).tolist(), "loss_mask": [1] * n}
               for n in lengths]
    packed = PackedSFTCollator(pad_token_id=0, pad_to=sum(lengths) + 2, mask_dtype=parameter.dtype)([samples])
    padded = SFTCollator(pad_token_id=0)(samples)
    was_training = model.training
    model.eval()
    try:
        packed_logits = model(input_ids=packed["input_ids"].to(parameter.device),
                              attention_mask=packed["attention_mask"].to(parameter.device),
                              position_ids=packed["position_ids"].to(parameter.device), use_cache=False).logits
        padded_logits = model(input_ids=padded["input_ids"].to(parameter.device),
                              attention_mask=padded["attention_mask"].to(parameter.device), use_cache=False).logits
    finally:
        model.train(was_training)
    worst, start = 0.0, 0
    for row, n in enumerate(lengths):
        diff = (packed_logits[0, start:start + n].float() - padded_logits[row, :n].float()).abs().max()
        worst = max(worst, float(diff))
        start += n
    return worst
