"""Batch builders per phase. Padding goes to the longest sample of the batch, never to --max_seq_len
(unless `pad_to` asks for it, e.g. to benchmark the difference). Masks come from lengths, never from
comparing ids with the pad id, so a tokenizer whose pad equals EOS cannot hide EOS from the loss."""
from dataclasses import dataclass

import torch

from training.utils.losses import IGNORE_INDEX
from training.utils.model import round_up


def pad_batch(seqs: list[list[int]], pad_id: int, length: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids padded to `length` (right, or left) and the matching attention mask."""
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if left:
            ids[row, length - n:] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - n:] = 1
        else:
            ids[row, :n] = torch.tensor(seq, dtype=torch.long)
            mask[row, :n] = 1
    return ids, mask


@dataclass
class SFTCollator:
    """input_ids / attention_mask / labels, right-padded; labels are IGNORE_INDEX except trained tokens."""
    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = self.pad_to or max(len(item["input_ids"]) for item in items)
        input_ids, attention_mask = pad_batch([item["input_ids"] for item in items], self.pad_token_id, length)
        loss_mask, _ = pad_batch([item["loss_mask"] for item in items], 0, length)
        labels = input_ids.masked_fill(loss_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PairCollator:
    """Chosen rows then rejected rows in one batch of 2B, right-padded to the longest of all 2B.
    Items with reply masks (phase-2 data) also give `reply_mask`: 1 on reply + EOS tokens, same row order.
    `pad_to` pads to that length instead (DeepSpeed-Chat's layout, for benchmarks)."""
    pad_token_id: int
    pad_to: int | None = None

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [item["chosen_ids"] for item in items] + [item["rejected_ids"] for item in items]
        length = self.pad_to or max(map(len, seqs))
        input_ids, attention_mask = pad_batch(seqs, self.pad_token_id, length)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "chosen_reply_mask" in items[0]:
            masks = [item["chosen_reply_mask"] for item in items] + [item["rejected_reply_mask"] for item in items]
            batch["reply_mask"] = pad_batch(masks, 0, length)[0]
        return batch


@dataclass
class PromptCollator:
    """Prompts left-padded to the batch's longest prompt rounded up to a multiple of `width_multiple` (step 3 on
    CPU: rlhf.ppo_trainer.sequence_width_multiple), so generation continues every row at the end. `pad_to` pads to
    that length instead (DeepSpeed-Chat's layout, for benchmarks)."""
    pad_token_id: int
    pad_to: int | None = None
    width_multiple: int = 1

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [item["prompt_ids"] for item in items]
        width = self.pad_to or round_up(max(map(len, seqs)), self.width_multiple)
        input_ids, attention_mask = pad_batch(seqs, self.pad_token_id, width, left=True)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "reference" in items[0]:  # step 3's reference answers (text) for a rule reward
            batch["references"] = [item["reference"] for item in items]
        return batch
