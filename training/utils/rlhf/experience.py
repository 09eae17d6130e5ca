"""PPO's data between generation and training: capped prompts, rollouts, the experience buffer.

Layout of one batch of experience (B rows):

    prompt_ids  [B, P]   left-padded to the batch's longest prompt (prompt_mask marks real tokens)
    answer_ids  [B, A]   the generated tokens, right-padded; action_mask[b, t] = 1 for t < length[b]
    per-token   [B, A]   old log-probs, old values, advantages, returns, the loss mask and the reference's
                         log-probs (KL loss): one entry per answer token

An answer's length counts its tokens up to and including the first EOS, or all A when it has none
(cut at --max_answer_seq_len). It is found from the generated ids by position (masks.answer_lengths), so the
pad after an early EOS is excluded even when the tokenizer's pad id equals its EOS id.

The buffer holds --generation_batches such batches and re-cuts them into mini-batches of
--per_device_training_batch_size rows (re-padding prompts on the left and answers on the right), so
generation and training batch sizes are independent. Every rank holds the same number of rows, so
every rank runs the same number of mini-batches (ZeRO-3 needs matching collectives).
"""
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset

from training.utils.data.collators import pad_batch
from training.utils.data.pipeline import REFERENCE_FIELD, decode_reference
from training.utils.errors import UserInputError
from training.utils.losses import masked_whiten

# loss_mask: action_mask, with the rows --drop_equal_reward_groups leaves out of the loss zeroed (they stay in the
# buffer, so every rank keeps the same number of rows and mini-batches).
# ref_log_probs: the reference's log-probs, kept only for --use_kl_loss (zeros otherwise).
PER_TOKEN_FIELDS = ("log_probs", "values", "advantages", "returns", "loss_mask", "ref_log_probs")


class CappedPrompts(Dataset):
    """Phase-3 prompts with --max_prompt_seq_len applied: longer prompts keep their last tokens
    (`truncate`; the BOS is kept in front when the tokenizer starts sequences with one) or are left
    out (`drop`). The same on every rank, so all ranks see the same number of prompts. `limit` keeps
    only the first prompts (held-out evaluation uses a fixed subset)."""

    def __init__(self, dataset, max_len: int, overflow: str, bos_token_id: int | None = None,
                 limit: int | None = None):
        lengths = dataset.lengths("prompt_ids")
        too_long = lengths > max_len
        self.dataset, self.max_len, self.bos_token_id = dataset, max_len, bos_token_id
        usable = [i for i in range(len(dataset)) if overflow == "truncate" or not too_long[i]]
        self.indices = usable[:limit]  # limit 0 (--eval_prompts 0): none, on purpose
        self.counts = {"prompts": len(dataset), "over_max_prompt_seq_len": int(too_long.sum()),
                       "truncated" if overflow == "truncate" else "dropped": int(too_long.sum())}
        if len(dataset) and not usable:
            raise UserInputError(f"every prompt is longer than --max_prompt_seq_len {max_len} (longest "
                                 f"{int(lengths.max())}): raise it, or use --prompt_overflow truncate")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[self.indices[index]]
        ids = row["prompt_ids"]
        if len(ids) > self.max_len:
            keep_bos = self.bos_token_id is not None and ids[0] == self.bos_token_id
            ids = ids[:1] + ids[len(ids) - self.max_len + 1:] if keep_bos else ids[-self.max_len:]
        item = {"prompt_ids": ids}
        if REFERENCE_FIELD in row:  # the rule reward's reference answer (PromptCollator passes it on)
            item["reference"] = decode_reference(row[REFERENCE_FIELD])
        return item

    def sample_lengths(self) -> np.ndarray:
        """Prompt lengths after the cap, read from the offsets (samplers.sample_lengths), not item by item."""
        return np.minimum(self.dataset.lengths("prompt_ids")[self.indices], self.max_len)

    def references(self) -> list[str | None]:
        """Every kept row's reference answer (None where it has none), for the rule reward's up-front check."""
        return [self[i].get("reference") for i in range(len(self))]


@dataclass
class Experience:
    """One batch of rollouts with everything PPO trains on (see the module docstring for shapes)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    answer_ids: torch.Tensor
    action_mask: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    loss_mask: torch.Tensor | None = None  # None: the action mask
    ref_log_probs: torch.Tensor | None = None  # None: zeros (no KL loss)

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.action_mask.to(self.advantages.dtype)
        if self.ref_log_probs is None:
            self.ref_log_probs = torch.zeros_like(self.log_probs)

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.answer_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.action_mask], dim=1)

    def rows(self) -> list[dict[str, torch.Tensor]]:
        """Each row without its padding: prompt tokens, answer tokens and its per-token entries."""
        prompt_lengths, answer_lengths_ = self.prompt_mask.sum(dim=1).tolist(), self.action_mask.sum(dim=1).tolist()
        rows = []
        for b, (p, a) in enumerate(zip(prompt_lengths, answer_lengths_)):
            row = {"prompt_ids": self.prompt_ids[b, self.prompt_ids.size(1) - p:], "answer_ids": self.answer_ids[b, :a]}
            row.update({name: getattr(self, name)[b, :a] for name in PER_TOKEN_FIELDS})
            rows.append(row)
        return rows

    @classmethod
    def from_rows(cls, rows: list[dict[str, torch.Tensor]], pad_token_id: int) -> "Experience":
        """Rows re-padded into a batch: prompts on the left, answers and per-token entries on the right."""
        prompt_width = max(len(r["prompt_ids"]) for r in rows)
        answer_width = max(len(r["answer_ids"]) for r in rows)
        prompt_ids, prompt_mask = pad_batch([r["prompt_ids"].tolist() for r in rows], pad_token_id, prompt_width,
                                            left=True)
        answer_ids, action_mask = pad_batch([r["answer_ids"].tolist() for r in rows], pad_token_id, answer_width)
        per_token = {}
        for name in (n for n in PER_TOKEN_FIELDS if n in rows[0]):
            padded = torch.zeros(len(rows), answer_width, dtype=rows[0][name].dtype)
            for b, row in enumerate(rows):
                padded[b, :len(row[name])] = row[name].cpu()
            per_token[name] = padded
        return cls(prompt_ids, prompt_mask, answer_ids, action_mask, **per_token)

    def to(self, device) -> "Experience":
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class ExperienceBuffer:
    """--generation_batches batches of experience, served as shuffled mini-batches for --ppo_epochs.

    With `whiten`, advantages are whitened once over every answer token in the buffer (this rank's),
    so mini-batches share one scale and PPO epochs see the same advantages.
    """

    def __init__(self, capacity: int, whiten: bool, pad_token_id: int, seed: int):
        self.capacity, self.whiten, self.pad_token_id = capacity, whiten, pad_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: list[dict[str, torch.Tensor]] = []
        self.batches = 0
        self.whitened = False

    def add(self, experience: Experience) -> None:
        self.rows += experience.rows()
        self.batches += 1

    @property
    def full(self) -> bool:
        return self.batches >= self.capacity

    def minibatches(self, batch_size: int) -> list[Experience]:
        """One pass (a PPO epoch) over the buffer in a fresh random order. A buffer that fits one mini-batch
        keeps its rows in generation order (an order within one mini-batch changes nothing), so that mini-batch
        is the generation batch PPOTrainer may already have run the update's forward on."""
        if self.whiten and not self.whitened:
            self._whiten_advantages()
        n = len(self.rows)
        order = list(range(n)) if n <= batch_size else torch.randperm(n, generator=self.generator).tolist()
        return [Experience.from_rows([self.rows[i] for i in order[start:start + batch_size]], self.pad_token_id)
                for start in range(0, n, batch_size)]

    def _whiten_advantages(self) -> None:
        flat = torch.cat([row["advantages"] for row in self.rows]).unsqueeze(0)
        whitened = masked_whiten(flat, torch.ones_like(flat)).squeeze(0)
        start = 0
        for row in self.rows:
            n = len(row["advantages"])
            row["advantages"] = whitened[start:start + n]
            start += n
        self.whitened = True

    def clear(self) -> None:
        self.rows, self.batches, self.whitened = [], 0, False


class EndlessBatches:
    """Batches of `loader` (one of ours, see pipeline.make_loader) forever, reshuffled each pass: PPO-ptx
    draws one per PPO mini-batch, so the pre-training text never runs out before the prompts do.

    `drawn` counts the batches handed out; a resumed run passes it back as `start` and continues with
    the same batch it would have drawn next.
    """

    def __init__(self, loader, start: int = 0):
        self.loader, self.drawn = loader, start
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            epoch, done = divmod(self.drawn, len(self.loader))
            self.loader.sampler.set_epoch(epoch)
            self.loader.sampler.skip_batches(done, self.loader.batch_size)
            self._iterator = iter(self.loader)
        try:
            batch = next(self._iterator)
        except StopIteration:  # a pass ended: the next one starts at epoch drawn // len(loader)
            self._iterator = None
            return next(self)
        self.drawn += 1
        return batch
