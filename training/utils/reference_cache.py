"""A frozen model's per-sample scores computed once and looked up by dataset index (DPO's reference log-probs).

DPO's reference never changes, so its summed reply log-probs of every pair are a fixed table: one no-grad pass
fills it before training, and training and evaluation read rows of it instead of running the reference:

    loader = with_sample_index(loader)                  # the same batches, each with "index" (dataset positions)
    cached = ReferenceLogProbs.compute(score, indexed_loader, len(dataset), device)   # score(batch) -> [2B]
    reference_logps = cached(batch)                     # [2B]: chosen rows then rejected rows, as score(batch)

Each rank scores the samples its loader yields; the rows are then gathered, so every rank holds the whole table
(N x 2 fp32: 8 bytes a pair). The loader must give every rank the same number of batches (pipeline.make_loader's
samplers do): under ZeRO-3 each forward is a collective.
"""
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from training.utils import distributed
from training.utils.data.samplers import sample_lengths


class IndexedDataset:
    """`dataset` whose items also carry "index", their position in it (so a batch can find its cached rows)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index] | {"index": int(index)}

    def sample_lengths(self):
        return sample_lengths(self.dataset)


class IndexedCollator:
    """`collator`'s batch plus "index": the items' dataset positions, a [B] long tensor in item order."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator([{k: v for k, v in item.items() if k != "index"} for item in items])
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


def with_sample_index(loader: DataLoader) -> DataLoader:
    """`loader`'s batches, in its order (the same sampler, batch size and generator), each with "index".
    Use it instead of `loader`, not next to it: the two share the sampler (its epoch and resume skip)."""
    return DataLoader(IndexedDataset(loader.dataset), batch_size=loader.batch_size, sampler=loader.sampler,
                      collate_fn=IndexedCollator(loader.collate_fn), generator=loader.generator)


class ReferenceLogProbs:
    """The cached scores of a split: `table[i] = (chosen, rejected)` of dataset item i, fp32, on the device."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, batch: dict) -> torch.Tensor:
        """[2B] for a batch with "index": the chosen rows then the rejected rows, like the model's forward."""
        rows = self.table[batch["index"]]
        return torch.cat([rows[:, 0], rows[:, 1]])

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    @classmethod
    @torch.no_grad()
    def compute(cls, score, loader, size: int, device, desc: str = "reference log-probs") -> "ReferenceLogProbs":
        """Run `score(batch) -> [2B]` over `loader` (batches with "index", see IndexedCollator) once and gather
        every rank's rows; all `size` indices must be covered. A sample scored twice (a sampler repeats up to
        world_size - 1 to even out the ranks) keeps this rank's own value, so a rank reads back exactly what
        it computed for the batches it scored."""
        indices, values = [], []
        for batch in distributed.progress(loader, desc=desc):
            batch = {k: v.to(device) for k, v in batch.items()}
            chosen, rejected = score(batch).float().chunk(2)
            indices.append(batch["index"])
            values.append(torch.stack([chosen, rejected], dim=1))
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
        value = torch.cat(values) if values else torch.zeros(0, 2, dtype=torch.float32, device=device)
        table = torch.zeros(size, 2, dtype=torch.float32, device=device)
        filled = torch.zeros(size, dtype=torch.bool, device=device)
        # `size` is the same on every rank, so skipping an empty split keeps the collectives aligned
        for rank_index, rank_value in _gather_rows(index, value) if size else ():
            table[rank_index] = rank_value
            filled[rank_index] = True
        if not bool(filled.all()):
            missing = (~filled).nonzero().flatten()[:5].tolist()
            raise RuntimeError(f"{desc}: {int((~filled).sum())} of {size} samples were never scored (e.g. {missing}); "
                               "the loader must cover the whole dataset")
        return cls(table)


def _gather_rows(index: torch.Tensor, value: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's (index, value) rows, this rank's own last (so its values win where samples repeat)."""
    if not (dist.is_initialized() and distributed.world_size() > 1):
        return [(index, value)]
    count = torch.tensor([index.numel()], dtype=torch.long, device=index.device)
    counts = [torch.zeros_like(count) for _ in range(distributed.world_size())]
    dist.all_gather(counts, count)
    longest = max(int(c.item()) for c in counts)
    padded_index = torch.zeros(longest, dtype=torch.long, device=index.device)
    padded_value = torch.zeros(longest, 2, dtype=value.dtype, device=value.device)
    padded_index[:index.numel()], padded_value[:index.numel()] = index, value
    all_index = [torch.zeros_like(padded_index) for _ in counts]
    all_value = [torch.zeros_like(padded_value) for _ in counts]
    dist.all_gather(all_index, padded_index)
    dist.all_gather(all_value, padded_value)
    me = distributed.rank()
    order = [r for r in range(len(counts)) if r != me] + [me]
    return [(all_index[r][:int(counts[r].item())], all_value[r][:int(counts[r].item())]) for r in order]
