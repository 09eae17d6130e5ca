"""Preference pairs with their prompt computed once: `[prompt | chosen reply | rejected reply]` in one row.

A pair's chosen and rejected sequences share their prompt (their longest common prefix, however truncation
cut them). Padded as two rows, the prompt is computed twice; on HH data the prompt is most of a pair's tokens.
Here each pair is one row, and a 4-D mask keeps the replies apart:

    segment   0 = the shared prefix, 1 = the chosen suffix, 2 = the rejected suffix, -1 = padding
    allowed[q, k] = k <= q and (segment[k] == segment[q] or segment[k] == 0)
    position_ids  0..P-1 over the prefix, then P.. again for each suffix (0 on padding)

so every token sees exactly the keys, at exactly the positions, it sees in its own padded row: the values
(reward model) are the same up to rounding, which tests/test_pair_packing.py checks. `source` maps every
position of the usual [2B, L] chosen-then-rejected batch to its position in the packed row, so everything
after the forward (end scores, the losses) reads the batch it always read.
"""
from dataclasses import dataclass

import numpy as np
import torch

from training.utils.data.collators import PairCollator
from training.utils.data.packing import block_causal_mask, supports_packing
from training.utils.data.samplers import LengthGroupedSampler
from training.utils.model.attention import packed_segments

PREFIX, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class SharedPromptPairCollator:
    """PairCollator's batch (input_ids, attention_mask [2B, L], reply_mask), plus the packed rows the model
    runs on: packed_input_ids / packed_position_ids / packed_segment_ids [B, W], packed_attention_mask
    [B, 1, W, W], and packed_source [2B, L] (where each token of the plain batch sits in its packed row; 0 on
    padding).
    `mask_dtype`: the model's compute dtype (see packing.PackedSFTCollator)."""
    pad_token_id: int
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = PairCollator(self.pad_token_id)(items)
        pairs = len(items)
        prefixes = [common_prefix_length(item["chosen_ids"], item["rejected_ids"]) for item in items]
        width = max(len(item["chosen_ids"]) + len(item["rejected_ids"]) - p for item, p in zip(items, prefixes))
        input_ids = torch.full((pairs, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((pairs, width), dtype=torch.long)
        segment_ids = torch.full((pairs, width), PADDING, dtype=torch.long)
        source = torch.zeros_like(batch["input_ids"])
        for row, (item, p) in enumerate(zip(items, prefixes)):
            chosen, rejected = item["chosen_ids"], item["rejected_ids"]
            c, r = len(chosen) - p, len(rejected) - p
            input_ids[row, :p + c] = torch.tensor(chosen, dtype=torch.long)
            input_ids[row, p + c:p + c + r] = torch.tensor(rejected[p:], dtype=torch.long)
            position_ids[row, :p + c] = torch.arange(p + c)
            position_ids[row, p + c:p + c + r] = torch.arange(p, p + r)
            # (padding keeps position 0: a packed row is longer than either sequence, so counting on could run
            # past the model's positions)
            segment_ids[row, :p] = PREFIX
            segment_ids[row, p:p + c] = CHOSEN
            segment_ids[row, p + c:p + c + r] = REJECTED
            source[row, :p + c] = torch.arange(p + c)
            source[pairs + row, :p] = torch.arange(p)
            source[pairs + row, p:p + r] = torch.arange(p + c, p + c + r)
        batch.update(packed_input_ids=input_ids, packed_position_ids=position_ids, packed_source=source,
                     packed_segment_ids=segment_ids,
                     packed_attention_mask=block_causal_mask(segment_ids, self.mask_dtype, shared_segment=PREFIX))
        return batch


def packed_model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model reads of a shared-prompt batch's packed rows: ids, 4-D mask, positions and, on CPU, the
    segments (model.attention: each reply attends to the prompt and itself, without the mask's full square)."""
    return {"input_ids": batch["packed_input_ids"], "attention_mask": batch["packed_attention_mask"],
            "position_ids": batch["packed_position_ids"], **packed_segments(batch["packed_segment_ids"], PREFIX)}


def unpack_pairs(packed: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """[B, W] per-position values of the packed rows -> [2B, L] in the plain batch's layout (chosen rows, then
    rejected rows; padding positions read position 0 of their row: mask them as the plain batch's mask says)."""
    return torch.cat([packed, packed]).gather(1, source)


def reward_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a RewardModel reads of a pair batch: the packed rows when the batch has them, else the plain ones."""
    if "packed_input_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {**packed_model_inputs(batch), "packed_source": batch["packed_source"],
            "unpacked_mask": batch["attention_mask"]}


def packed_widths(dataset) -> np.ndarray:
    """Each pair's packed row width, len(chosen) + len(rejected) - their common prefix: what pads a shared-prompt
    batch, so length-grouped batches are grouped by it (not by the longer sequence)."""
    widths = np.empty(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        item = dataset[i]
        chosen, rejected = item["chosen_ids"], item["rejected_ids"]
        widths[i] = len(chosen) + len(rejected) - common_prefix_length(chosen, rejected)
    return widths


def share_prompts(loaders, model, pad_token_id: int, mask_dtype: torch.dtype) -> bool:
    """Switch pair loaders to SharedPromptPairCollator when `model` (a RewardModel's body, or a causal LM) packs
    exactly (packing.supports_packing), and their length-grouped samplers to the packed widths; False (loaders
    unchanged) otherwise."""
    from training.utils import distributed

    if not supports_packing(model):
        distributed.print_rank_0(f"--share_prompt: {model.config.model_type} ({model.config._attn_implementation} "
                                 "attention) cannot be packed exactly; two padded rows per pair instead")
        return False
    for loader in loaders:
        loader.collate_fn = SharedPromptPairCollator(pad_token_id, mask_dtype)
        if isinstance(loader.sampler, LengthGroupedSampler):
            loader.sampler.lengths = packed_widths(loader.dataset)
    distributed.print_rank_0("--share_prompt: each pair is one row, its prompt computed once")
    return True
