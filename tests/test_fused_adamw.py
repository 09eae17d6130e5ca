"""fused_adamw.py's C++ kernel against torch itself, bit for bit: the fused AdamW update from bf16 gradients (master
weights, moments, bf16 weights) over sizes, hyperparameters, clipping and thread counts, and the gradient norms
against torch's norm of the fp32 copies (down to squares that underflow). The kernel inside DeepSpeed's step is
tests/test_optimizer_step.py's."""
import pytest
import torch

from training.utils import fused_adamw, native

pytestmark = pytest.mark.skipif(not native.cpu_runs_avx512(),
                                reason="the fused AdamW kernel is compiled for AVX-512, which this CPU lacks")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("size, lr, betas, weight_decay, eps, clip", [
    (16 * 4099, 3e-3, (0.9, 0.95), 0.1, 1e-8, None),
    (1 << 20, 1e-5, (0.9, 0.999), 0.0, 1e-6, 2.5),
    (4096, 0.5, (0.3, 0.5), 0.01, 1e-3, 0.37),  # a large first-moment weight: torch's other lerp form
    (16, 1e-2, (0.0, 0.99), 1.0, 1e-8, None)])
def test_the_kernel_is_torchs_fused_adamw_from_fp32_copies(threads, size, lr, betas, weight_decay, eps, clip):
    generator = torch.Generator().manual_seed(size)
    reference = torch.randn(size, generator=generator) * 0.05
    param, weight = reference.clone(), torch.empty(size, dtype=torch.bfloat16)
    adamw = torch.optim.AdamW([reference], lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=True)
    exp_avg, exp_avg_sq = torch.zeros(size), torch.zeros(size)
    for step in range(1, 8):
        grad = (torch.randn(size, generator=generator) * 10.0 ** -step).to(torch.bfloat16)
        reference.grad = grad.float()
        if clip:
            torch._foreach_mul_([reference.grad], 1.0 / clip)
        adamw.step()
        fused_adamw._extension().fused_adamw_bf16([param], [weight], [grad], [exp_avg], [exp_avg_sq], [float(step)],
                                                  lr, *betas, weight_decay, eps, 1.0 / clip if clip else 1.0,
                                                  clip is not None)
        state = adamw.state[reference]
        assert torch.equal(param, reference) and torch.equal(weight, reference.to(torch.bfloat16))
        assert torch.equal(exp_avg, state["exp_avg"]) and torch.equal(exp_avg_sq, state["exp_avg_sq"])
    assert not torch.equal(param, torch.randn(size, generator=torch.Generator().manual_seed(size)) * 0.05)


def test_the_kernel_leaves_each_tensors_tail_to_torch():
    """Only whole vectors of 16: the last numel % 16 elements are untouched (fused_adamw.step hands them to torch)."""
    size = 16 * 5 + 7
    param, weight = torch.ones(size), torch.zeros(size, dtype=torch.bfloat16)
    fused_adamw._extension().fused_adamw_bf16([param], [weight], [torch.ones(size, dtype=torch.bfloat16)],
                                              [torch.zeros(size)], [torch.zeros(size)], [1.0], 0.1, 0.9, 0.95, 0.0,
                                              1e-8, 1.0, False)
    assert torch.all(param[:80] < 1) and torch.all(weight[:80] != 0)
    assert torch.all(param[80:] == 1) and torch.all(weight[80:] == 0)


@pytest.mark.parametrize("size", [1, 7, 8, 77, 1024, 4099, 65536, 1000003])
@pytest.mark.parametrize("scale", [1e-21, 1e-3, 1.0, 1e18])
def test_gradient_norms_are_torchs_norms_of_the_fp32_copies(threads, size, scale):
    generator = torch.Generator().manual_seed(size)
    grads = [(torch.randn(size, generator=generator) * scale).to(torch.bfloat16) for _ in range(3)]
    grads[1][: size // 3] *= 1e-4  # mixed magnitudes; at 1e-21 their squares underflow before the sum
    grads.append(torch.zeros(size, dtype=torch.bfloat16))
    got = fused_adamw.grad_norms(grads)
    want = torch._foreach_norm([g.float() for g in grads], 2.0)
    assert len(got) == 4 and all(g.dtype == torch.float32 and g.dim() == 0 for g in got)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[3] == 0 and got[0] > 0
    inf = grads[0].clone()
    inf[size // 2] = float("inf")
    assert fused_adamw.grad_norms([inf])[0] == float("inf")


def test_the_probe_finds_the_kernel_matching_this_torch():
    assert fused_adamw._kernel_matches_torch()
