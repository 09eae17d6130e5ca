"""training/utils/model/linear_grad.py: bf16 linear layers on CPU whose width in and out differ at least twofold take
their weight gradient from a contiguous transpose of the narrower operand; the gradients are autograd's to bf16
rounding, and every other call is the F.linear installed before."""
import pytest
import torch
import torch.nn.functional as F

from training.utils.model import linear_grad as lean
from training.utils.model.build import create_hf_model

SHAPES = [(512, 2048), (2048, 512), (64, 512), (96, 40)]  # (in, out): wide out, wide in, LoRA-like, not a multiple


@pytest.fixture(autouse=True)
def small_products_too(monkeypatch):
    """These tests' products are small (fast tests): the size rule is lowered for them, and tested on its own."""
    monkeypatch.setattr(lean, "MIN_PRODUCT", 1)


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.delenv("RLHF_LEAN_WEIGHT_GRAD", raising=False)
    before = F.linear
    assert lean.install_lean_weight_grad() and F.linear is lean.linear
    yield
    F.linear = before  # leave F.linear as other tests expect it


@pytest.fixture
def lean_calls(monkeypatch):
    """How many backward passes went through the lean weight gradient."""
    calls = []
    original = lean.weight_gradient
    monkeypatch.setattr(lean, "weight_gradient", lambda grad, x: calls.append(grad.shape) or original(grad, x))
    return calls


def gradients(linear, x, weight, bias, upstream):
    for tensor in (x, weight, bias):
        if tensor is not None:
            tensor.grad = None
    linear(x, weight, bias).backward(upstream)
    return [None if t is None else t.grad.clone() for t in (x, weight, bias)]


@pytest.mark.parametrize("width_in, width_out", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_are_autograds(width_in, width_out, with_bias, lean_calls):
    torch.manual_seed(0)
    x = torch.randn(3, 37, width_in, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(width_out, width_in) / width_in ** 0.5).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(width_out, dtype=torch.bfloat16, requires_grad=True) if with_bias else None
    upstream = torch.randn(3, 37, width_out, dtype=torch.bfloat16)
    expected = gradients(lean._previous_linear, x, weight, bias, upstream)
    got = gradients(lean.linear, x, weight, bias, upstream)
    assert lean_calls == [torch.Size([111, width_out])]
    assert torch.equal(got[0], expected[0])  # the input gradient: autograd's own product
    if with_bias:
        assert torch.equal(got[2], expected[2])
    assert got[1].shape == weight.shape and got[1].is_contiguous()
    # the weight gradient: the same sums (in fp32, rounded once to bf16), accumulated in another order
    exact = upstream.float().reshape(-1, width_out).t() @ x.detach().float().reshape(-1, width_in)
    tolerance = exact.abs().max() * 2 ** -7  # one bf16 rounding of the largest entry
    assert (got[1].float() - exact).abs().max() <= tolerance
    assert (got[1].float() - expected[1].float()).abs().max() <= tolerance


def test_weight_gradient_of_each_orientation_is_the_product():
    torch.manual_seed(1)
    for width_in, width_out in [(8, 32), (32, 8), (16, 16)]:
        grad = torch.randn(50, width_out).to(torch.bfloat16)
        x = torch.randn(50, width_in).to(torch.bfloat16)
        exact = grad.float().t() @ x.float()
        got = lean.weight_gradient(grad, x)
        assert got.shape == (width_out, width_in) and got.is_contiguous()
        assert (got.float() - exact).abs().max() <= exact.abs().max() * 2 ** -7
    matrix = torch.arange(12, dtype=torch.bfloat16).view(3, 4)
    assert torch.equal(lean.transposed(matrix), matrix.t()) and lean.transposed(matrix).is_contiguous()


@pytest.mark.parametrize("case", ["square", "no grad", "fp32", "frozen weight", "zero3 weight", "1-d input",
                                  "small product"])
def test_other_calls_are_the_previous_linear(case, lean_calls, monkeypatch):
    torch.manual_seed(2)
    width_in, width_out = (64, 64) if case == "square" else (64, 256)
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    x = torch.randn(*(() if case == "1-d input" else (5,)), width_in, dtype=dtype, requires_grad=True)
    weight = torch.randn(width_out, width_in, dtype=dtype, requires_grad=case != "frozen weight")
    if case == "zero3 weight":
        weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    if case == "small product":
        monkeypatch.setattr(lean, "MIN_PRODUCT", 5 * width_in * width_out + 1)  # one row more than the input has
    with torch.set_grad_enabled(case != "no grad"):
        out = lean.linear(x, weight)
        assert torch.equal(out, lean._previous_linear(x, weight))
        if out.requires_grad:
            out.sum().backward()
    assert lean_calls == []


def test_install_switch_and_the_previous_linear(monkeypatch):
    start = F.linear  # (earlier tests' model builds may have installed it already)
    before = F.linear = lean._previous_linear if start is lean.linear else start
    try:
        monkeypatch.setenv("RLHF_LEAN_WEIGHT_GRAD", "0")
        assert not lean.install_lean_weight_grad() and F.linear is before
        monkeypatch.delenv("RLHF_LEAN_WEIGHT_GRAD")
        assert lean.install_lean_weight_grad() and lean.install_lean_weight_grad()  # idempotent
        assert F.linear is lean.linear and lean._previous_linear is before
        monkeypatch.setenv("RLHF_LEAN_WEIGHT_GRAD", "0")
        assert not lean.install_lean_weight_grad() and F.linear is before
    finally:
        F.linear = start


def test_model_training_step_through_the_lean_path(installed, tokenizer, lean_calls):
    """A bf16 OPT's backward: fc1, fc2 and the tied output head go through it (not the square attention
    projections), and every parameter's gradient is the plain F.linear one's to bf16 rounding."""
    torch.manual_seed(3)
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0).to(torch.bfloat16)
    ids = torch.randint(5, 4000, (2, 24))

    def parameter_gradients():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}

    got = parameter_gradients()
    layers = model.config.num_hidden_layers
    assert len(lean_calls) == 2 * layers + 1
    F.linear = lean._previous_linear
    expected = parameter_gradients()
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        scale = expected[name].abs().max()
        assert (grad - expected[name]).abs().max() <= scale * 2 ** -6, name
