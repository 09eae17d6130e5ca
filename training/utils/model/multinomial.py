"""torch.multinomial's one draw per row, bit for bit, with the random numbers made ~3x faster (CPU, float32).

Sampling a token from probabilities p is, in torch.multinomial, argmax(p / q) with q ~ Exp(1) drawn by
`exponential_`: one 64-bit draw of the default generator per vocabulary entry, turned into -log1p(-u) (u its low
53 bits / 2^53) one at a time, ~600 us for 8 rows of a 4,096-token vocabulary on one Xeon core, ~6% of a decoding
step of tiny/opt-20m. `torch.randint(0, 2**53)` takes the same 64-bit draws from the generator in the same order and
keeps the same 53 bits; the logarithm then runs vectorised over the whole tensor in double and is rounded to float
as `exponential_` rounds it: the same q, so the same tokens from the same seed, and the generator ends in the same
state (~250 us). A probe at first use checks that identity on this torch (a different torch falls back for good).

    with fast_multinomial():        # inside generate: HF's sampler calls torch.multinomial(probs, num_samples=1)
        model.generate(...)

It applies to one draw per row of a contiguous 2-D float32 CPU tensor from the default generator, without `out`;
any other call, and invalid probabilities (torch's error), go to torch.multinomial. Used by
sampling.decoding_kernels (RLHF_DECODING_KERNELS=0 turns it off with the rest).
"""
import contextlib
import functools

import torch

_torch_multinomial = torch.multinomial
_MANTISSA = 2 ** 53


def _exponential_waits(shape: torch.Size) -> torch.Tensor:
    """`torch.empty(shape).exponential_()`'s values and generator use (float32), vectorised."""
    bits = torch.randint(0, _MANTISSA, shape, dtype=torch.int64)
    return torch.log1p(bits.double().mul_(-1.0 / _MANTISSA)).neg_().float()


def _applies(probs, num_samples, generator, out) -> bool:
    return (num_samples == 1 and generator is None and out is None and isinstance(probs, torch.Tensor)
            and probs.dtype == torch.float32 and probs.device.type == "cpu" and probs.dim() == 2
            and probs.is_contiguous() and probs.numel() > 0)


def multinomial(input: torch.Tensor, num_samples: int, replacement: bool = False, *, generator=None, out=None):
    """torch.multinomial's signature and result (see the module docstring)."""
    if not (_applies(input, num_samples, generator, out) and _replica_matches()):
        return _torch_multinomial(input, num_samples, replacement, generator=generator, out=out)
    low, high = torch.aminmax(input)
    if not (bool(high < float("inf")) and bool(low >= 0)) or bool((input.sum(1) == 0).any()):
        return _torch_multinomial(input, num_samples, replacement)  # torch's own error for these
    waits = _exponential_waits(input.shape)
    return torch.div(input, waits, out=waits).argmax(-1, keepdim=True)


@functools.cache
def _replica_matches() -> bool:
    """Whether this torch's multinomial draws are the replica's (probed once; the default generator's state is put
    back afterwards)."""
    state = torch.get_rng_state()
    try:
        probs = torch.rand(5, 300, generator=torch.Generator().manual_seed(0)).softmax(-1)
        torch.manual_seed(1234)
        expected, after_expected = _torch_multinomial(probs, 1), torch.rand(2)
        torch.manual_seed(1234)
        waits = _exponential_waits(probs.shape)
        got, after_got = (probs / waits).argmax(-1, keepdim=True), torch.rand(2)
        return torch.equal(got, expected) and torch.equal(after_got, after_expected)
    finally:
        torch.set_rng_state(state)


@contextlib.contextmanager
def fast_multinomial():
    """torch.multinomial is `multinomial` inside the block (put back on exit)."""
    previous = torch.multinomial
    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = previous
