"""Model FLOPs, the machine's measured matmul peak, and model FLOPs utilisation (MFU).

The benchmark rows count model FLOPs with the usual dense-transformer rule, N being the parameters that
multiply activations (`matmul_params`: every parameter but the embedding tables, which are lookups, plus
the output projection of a language model, which is the token embedding again when the two are tied; a
reward model or critic body has no output projection, and for tiny/opt its embedding is 36% of the weights):

    forward only (generation, experience scoring, frozen references)   2 * N FLOPs per token
    forward + backward (a trained model)                               6 * N FLOPs per token

Tokens are real (non-pad) tokens, so padding shows up as a lower MFU, not as useful work. Attention's
score and value products, which grow with the sequence length T, are left out, as in the 6N rule: per
layer they add about T / (6 * hidden) of the matmul work (up to ~10% for tiny/opt at 128 tokens).

    MFU = model FLOPs / elapsed seconds / peak FLOP/s

with the peak the best fp32 `torch.matmul` rate of two large square matrices on the same machine,
measured in the same run (before and after the rows, the better of the two). The real-data rows
(`run_all.py --real-data`) compute in different dtypes, so each row is measured against the peak of its
own dtype (`training.utils.precision.matmul_peak_gflops(dtype)`, `add_mfu_by_dtype`).
"""
import time

import torch

FORWARD_FLOPS_PER_PARAM_TOKEN = 2
TRAIN_FLOPS_PER_PARAM_TOKEN = 6


def matmul_params(model: torch.nn.Module) -> int:
    """The N of the FLOPs rule for `model` (see the module docstring)."""
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_head = head is not None and any(head.weight is weight for weight in embeddings)
    return (sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in embeddings)
            + (head.weight.numel() if tied_head else 0))


def forward_flops(params: int, tokens: int) -> float:
    return FORWARD_FLOPS_PER_PARAM_TOKEN * params * tokens


def train_flops(params: int, tokens: int) -> float:
    return TRAIN_FLOPS_PER_PARAM_TOKEN * params * tokens


def gflops_per_s(flops: float, seconds: float) -> float:
    return round(flops / seconds / 1e9, 3)


def mfu(achieved_gflops: float, peak_gflops: float) -> float:
    return round(achieved_gflops / peak_gflops, 4)


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of `size x size` matrix products (2 * size^3 FLOPs each) with torch's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up: thread pool start and allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return round(2 * size ** 3 / best / 1e9, 1)


def add_mfu(document: dict, peak_gflops: float) -> None:
    """Give every row of a benchmark document its MFU next to its achieved `model_gflops_per_s` (a number,
    or a dict of numbers per phase for step 3)."""
    for row in document["rows"]:
        achieved = row["model_gflops_per_s"]
        if isinstance(achieved, dict):
            row["mfu"] = {phase: mfu(value, peak_gflops) for phase, value in achieved.items()}
        else:
            row["mfu"] = mfu(achieved, peak_gflops)


def add_mfu_by_dtype(document: dict, peaks_gflops: dict[str, float]) -> None:
    """add_mfu with each row's own peak: the matmul peak in the dtype the row computed in (`row["dtype"]`,
    e.g. fp32 for a baseline row, bf16 for a `--dtype auto` row on a CPU with native bf16). The peak used
    is recorded in the row as `mfu_peak_gflops`."""
    for row in document["rows"]:
        if row["dtype"] not in peaks_gflops:
            raise KeyError(f"no {row['dtype']} matmul peak measured for the {row.get('variant', '?')} row")
        peak = peaks_gflops[row["dtype"]]
        add_mfu({"rows": [row]}, peak)
        row["mfu_peak_gflops"] = peak
