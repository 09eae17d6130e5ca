"""training/utils/model/dropout.py: bf16 dropout on CPU with a 16-bit-integer mask is F.dropout's Bernoulli(1 - p)
mask and 1 / (1 - p) scaling, from the default generator; every other call is torch's own."""
import pytest
import torch
import torch.nn.functional as F

from training.utils.model import dropout as fast
from training.utils.model.build import create_hf_model


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.delenv("RLHF_FAST_DROPOUT", raising=False)
    assert fast.install_fast_dropout()
    yield
    F.dropout = fast._torch_dropout  # leave torch as other tests expect it


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_values_and_gradient(p):
    torch.manual_seed(0)
    x = torch.randn(1000, 1000, dtype=torch.bfloat16, requires_grad=True)
    out = fast.dropout(x, p, training=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 2e-3  # 1M draws: ~5 standard deviations at p = 0.5
    # kept values are x / (1 - p) rounded once, as torch's dropout gives them; the rest are zeros
    assert torch.equal(out[kept], (x.detach().float()[kept] / (1 - p)).to(torch.bfloat16))
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(x.grad, torch.where(kept, (upstream.float() / (1 - p)).to(torch.bfloat16), 0))
    # bit for bit aten's own dropout arithmetic, given the mask, both ways
    assert torch.equal(out, torch.ops.aten.native_dropout_backward(x.detach(), kept, 1 / (1 - p)))
    assert torch.equal(x.grad, torch.ops.aten.native_dropout_backward(upstream, kept, 1 / (1 - p)))


def test_keep_mask_in_any_dtype():
    torch.manual_seed(2)
    as_bool = fast.keep_mask(torch.Size([3, 50]), 0.25, torch.device("cpu"))
    torch.manual_seed(2)
    as_bf16 = fast.keep_mask(torch.Size([3, 50]), 0.25, torch.device("cpu"), torch.bfloat16)
    assert as_bool.dtype == torch.bool and as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, as_bool.to(torch.bfloat16)) and set(as_bf16.unique().tolist()) == {0.0, 1.0}


def test_the_default_generator_decides_the_mask():
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    torch.manual_seed(1)
    first = fast.dropout(x, 0.3)
    state = torch.get_rng_state()
    second = fast.dropout(x, 0.3)
    assert not torch.equal(first, second)  # the generator moved on
    torch.manual_seed(1)
    assert torch.equal(fast.dropout(x, 0.3), first)
    torch.set_rng_state(state)
    assert torch.equal(fast.dropout(x, 0.3), second)  # a restored RNG state (resume) gives the same mask


def test_every_other_call_is_torchs_own():
    x = torch.randn(32, 32, dtype=torch.bfloat16)
    assert torch.equal(fast.dropout(x, 0.2, training=False), x)
    assert torch.equal(fast.dropout(x, 0.0), x)
    assert torch.equal(fast.dropout(x, 1.0), torch.zeros_like(x))
    for tensor, inplace in ((x.float(), False), (x.clone(), True)):
        torch.manual_seed(3)
        want = fast._torch_dropout(tensor.clone(), 0.2, True, inplace)
        torch.manual_seed(3)
        assert torch.equal(fast.dropout(tensor.clone(), 0.2, True, inplace), want)


def test_install_and_the_switch(monkeypatch, installed):
    assert F.dropout is fast.dropout
    monkeypatch.setenv("RLHF_FAST_DROPOUT", "0")
    assert not fast.install_fast_dropout() and F.dropout is fast._torch_dropout


def test_a_bf16_model_in_training_mode_uses_it(installed, tokenizer):
    """transformers' OPT layers call nn.functional.dropout: a bf16 model built by the project draws its masks here
    (counted), and the same seed gives the same logits."""
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.5).to(torch.bfloat16).train()
    calls = []
    original = fast._MaskedScale.apply
    input_ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def counted(*args):
        calls.append(args[1])
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast._MaskedScale, "apply", counted)
        torch.manual_seed(5)
        first = model(input_ids=input_ids).logits
    assert calls and set(calls) == {0.5}
    torch.manual_seed(5)
    assert torch.equal(model(input_ids=input_ids).logits, first)
    torch.manual_seed(6)
    assert not torch.equal(model(input_ids=input_ids).logits, first)
