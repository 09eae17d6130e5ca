"""model/multinomial.py: one draw per row is torch.multinomial's, bit for bit, with the default generator left in the
same state; every other call, and invalid probabilities, are torch's own; sampled generation gives the same tokens."""
import contextlib

import pytest
import torch

from tests.test_kv_cache import left_padded_prompts, tiny_model
from training.utils import sampling
from training.utils.model import multinomial as fast


def probabilities(rows: int, vocab: int, seed: int, zeros: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * (1 + seed % 4)
    if zeros and vocab > 2:  # top-k / top-p leave most entries at probability zero
        logits[:, vocab // 3:] = float("-inf")
    return logits.softmax(-1)


def draws(sample, probs, seed):
    torch.manual_seed(seed)
    return sample(probs, 1), torch.rand(3)  # the tokens, and what the generator gives next


@pytest.mark.parametrize("rows, vocab", [(8, 4096), (3, 50), (1, 7), (5, 1), (2, 50272)])
def test_one_draw_per_row_is_torchs(rows, vocab):
    assert fast._replica_matches()
    for seed in range(20):
        probs = probabilities(rows, vocab, seed, zeros=seed % 2 == 1)
        tokens, after = draws(fast.multinomial, probs, seed)
        expected, expected_after = draws(fast._torch_multinomial, probs, seed)
        assert torch.equal(tokens, expected) and tokens.shape == (rows, 1) and tokens.dtype == torch.int64
        assert torch.equal(after, expected_after)
    one_hot = torch.zeros(4, 9)
    one_hot[torch.arange(4), torch.tensor([3, 0, 8, 5])] = 1.0
    assert fast.multinomial(one_hot, 1).flatten().tolist() == [3, 0, 8, 5]


@pytest.mark.parametrize("bad", ["nan", "negative", "inf", "zero row"])
def test_invalid_probabilities_get_torchs_error(bad):
    probs = probabilities(3, 10, 0)
    if bad == "zero row":
        probs[1] = 0.0
    else:
        probs[1, 4] = {"nan": float("nan"), "negative": -0.1, "inf": float("inf")}[bad]
    with pytest.raises(RuntimeError) as expected:
        fast._torch_multinomial(probs, 1)
    with pytest.raises(RuntimeError) as got:
        fast.multinomial(probs, 1)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("call", ["two draws", "own generator", "float64", "bf16", "strided", "1-d"])
def test_other_calls_are_torchs(call, monkeypatch):
    monkeypatch.setattr(fast, "_exponential_waits", lambda shape: pytest.fail("the replica ran"))
    probs = probabilities(4, 30, 1)
    kwargs, samples = {}, 1
    if call == "two draws":
        samples = 2
    elif call == "own generator":
        kwargs["generator"] = torch.Generator().manual_seed(5)
    elif call in ("float64", "bf16"):
        probs = probs.to(torch.float64 if call == "float64" else torch.bfloat16)
    elif call == "strided":
        probs = probabilities(30, 4, 1).t()
    else:
        probs = probs[0]
    torch.manual_seed(3)
    got = fast.multinomial(probs, samples, **kwargs)
    if "generator" in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(5)
    torch.manual_seed(3)
    assert torch.equal(got, fast._torch_multinomial(probs, samples, **kwargs))


def test_a_torch_whose_draws_differ_falls_back(monkeypatch):
    monkeypatch.setattr(fast, "_replica_matches", lambda: False)
    monkeypatch.setattr(fast, "_exponential_waits", lambda shape: pytest.fail("the replica ran"))
    probs = probabilities(2, 40, 2)
    assert torch.equal(draws(fast.multinomial, probs, 0)[0], draws(fast._torch_multinomial, probs, 0)[0])


def test_the_probe_leaves_the_generator_as_it_was():
    fast._replica_matches.cache_clear()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    assert fast._replica_matches()
    assert torch.equal(torch.get_rng_state(), state)


def test_fast_multinomial_is_scoped():
    with fast.fast_multinomial():
        assert torch.multinomial is fast.multinomial
    assert torch.multinomial is fast._torch_multinomial
    with pytest.raises(KeyError), fast.fast_multinomial():
        raise KeyError
    assert torch.multinomial is fast._torch_multinomial


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama"])
def test_sampled_generation_gives_the_same_tokens(name, tokenizer, monkeypatch):
    """generate inside decoding_kernels (where the replica is used) against the same call with torch's sampler."""
    model = tiny_model(name, tokenizer, eager=False)
    ids, mask = left_padded_prompts(tokenizer)
    used = []
    original = fast._exponential_waits
    monkeypatch.setattr(fast, "_exponential_waits", lambda shape: used.append(shape) or original(shape))

    def sampled():
        torch.manual_seed(7)
        with torch.no_grad(), sampling.decoding_kernels(model, len(ids)):
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=0,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None), torch.rand(2)

    tokens, after = sampled()
    assert len(used) == 16
    monkeypatch.setattr(sampling, "fast_multinomial", contextlib.nullcontext)
    expected, expected_after = sampled()
    assert len(used) == 16
    assert torch.equal(tokens, expected) and torch.equal(after, expected_after)
