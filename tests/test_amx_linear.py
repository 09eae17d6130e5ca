"""model/amx_linear.py: the AMX kernel gives oneDNN's packed linear bit for bit (bias, ReLU, 1 to 16 rows, several
threads), packed_linears runs it for decoding steps only, generation gives the same tokens with it on and off, and
everything else (the switch off, no AMX, a failed build, a kernel whose outputs differ, shapes it does not take)
keeps oneDNN's linear."""
import pytest
import torch
from torch import nn

from training.utils import native, precision
from training.utils.model import amx_linear, packed_linear
from training.utils.model.packed_linear import packed_linears

needs_amx = pytest.mark.skipif(not (precision.cpu_has_amx_bf16() and native.cpu_runs_avx512()),
                               reason="the kernel runs on AMX tiles, which this CPU lacks")


def onednn(x, weight, bias, relu):
    ops = torch.ops.mkldnn
    return ops._linear_pointwise(x, ops._reorder_linear_weight(weight, 8), bias, "relu" if relu else "none", [], "")


def layer(out_width, in_width, with_bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_width, in_width, generator=generator) / in_width ** 0.5).to(torch.bfloat16)
    bias = torch.randn(out_width, generator=generator).to(torch.bfloat16) if with_bias else None
    return weight, bias


@pytest.fixture
def kernel_calls(monkeypatch):
    """The shapes of the inputs the kernel's layers were called with."""
    calls = []
    original = amx_linear.layer_forward

    def counting(*args, **kwargs):
        layer = original(*args, **kwargs)
        return lambda x: calls.append(tuple(x.shape)) or layer(x)
    monkeypatch.setattr(amx_linear, "layer_forward", counting)
    return calls


@needs_amx
@pytest.mark.parametrize("out_width, in_width", [(512, 512), (2048, 512), (512, 2048), (4096, 512), (64, 32),
                                                 (192, 768)])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("with_bias, relu", [(True, False), (False, False), (True, True)])
def test_kernel_is_onednns_linear_bit_for_bit(out_width, in_width, rows, with_bias, relu):
    weight, bias = layer(out_width, in_width, with_bias, seed=rows)
    x = torch.randn(rows, 1, in_width, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = amx_linear.layer_forward(weight, bias, relu)(x)
    assert got.shape == (rows, 1, out_width) and got.dtype == torch.bfloat16
    assert torch.equal(got, onednn(x, weight, bias, relu))
    if relu:
        assert (got >= 0).all() and (got == 0).any()


@needs_amx
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_a_non_contiguous_input(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight, bias = layer(1024, 256)
        x = torch.randn(256, 8).to(torch.bfloat16).t()  # [8, 256], columns apart
        assert torch.equal(amx_linear.layer_forward(weight, bias)(x), onednn(x, weight, bias, False))
    finally:
        torch.set_num_threads(before)


def test_tile_layout_places_each_weight_where_the_tiles_read_it():
    out_width, in_width = 128, 64
    weight = torch.arange(out_width * in_width, dtype=torch.float32).view(out_width, in_width).to(torch.bfloat16)
    tiles = amx_linear.tile_layout(weight)
    assert tiles.shape == (2, 2, 4, 16, 32)
    for out_index, in_index in [(0, 0), (0, 1), (5, 2), (17, 33), (70, 63), (127, 40)]:
        group, block, column = out_index // 64, (out_index % 64) // 16, out_index % 16
        depth, pair_row, half = in_index // 32, (in_index % 32) // 2, in_index % 2
        assert tiles[group, depth, block, pair_row, 2 * column + half] == weight[out_index, in_index]


@needs_amx
def test_a_weight_at_an_odd_place_of_a_flat_buffer():
    """ZeRO keeps parameters as views into one flat buffer, at any offset."""
    weight, bias = layer(128, 64)
    flat = torch.zeros(1 + weight.numel(), dtype=torch.bfloat16)
    flat[1:] = weight.flatten()
    view = flat[1:].view(128, 64)
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert view.storage_offset() == 1
    assert torch.equal(amx_linear.layer_forward(view, bias)(x), onednn(x, weight, bias, False))


def test_shapes_and_dtypes_the_kernel_takes():
    weight, bias = layer(128, 64)
    assert amx_linear.fits(weight, bias) and amx_linear.fits(weight, None)
    assert not amx_linear.fits(layer(96, 64)[0], None)  # outputs no multiple of 64
    assert not amx_linear.fits(layer(128, 48)[0], None)  # inputs no multiple of 32
    assert not amx_linear.fits(weight.float(), None)
    assert not amx_linear.fits(weight, bias.float())


@needs_amx
def test_decoding_steps_run_the_kernel_with_the_same_tokens(tokenizer, kernel_calls, monkeypatch):
    """Generation inside packed_linears: the prompt's pass (more rows than MAX_ROWS) runs oneDNN, every decoding
    step's layers the kernel; the sampled tokens are those of oneDNN's linear."""
    from training.utils.model.build import create_hf_model

    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0).to(torch.bfloat16).eval()
    linears = len([m for m in model.modules() if type(m) is nn.Linear])
    ids = torch.randint(10, 4000, (3, 9), generator=torch.Generator().manual_seed(2))

    def sampled():
        with torch.no_grad(), packed_linears(model, rows_hint=3):
            torch.manual_seed(5)
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True,
                                  pad_token_id=tokenizer.pad_token_id)

    with_kernel = sampled()
    # every layer of the 5 decoding steps, and the prompt pass's output head (transformers asks for the logits of
    # the last position only); OPT's MLP takes its rows flattened
    assert len(kernel_calls) == 5 * linears + 1 and set(kernel_calls) == {(3, 1, 192), (3, 192), (3, 768)}
    monkeypatch.setenv("RLHF_AMX_LINEAR_KERNEL", "0")
    assert torch.equal(sampled(), with_kernel) and len(kernel_calls) == 5 * linears + 1


@pytest.mark.parametrize("case", ["switch off", "no amx", "outputs differ"])
def test_kernel_not_used(case, tokenizer, kernel_calls, monkeypatch, capsys):
    if case == "switch off":
        monkeypatch.setenv("RLHF_AMX_LINEAR_KERNEL", "0")
    if case == "no amx":
        monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    if case == "outputs differ":
        if amx_linear._extension() is None or not amx_linear._extension().amx_ready():
            pytest.skip("the kernel cannot run here")
        real = amx_linear._extension()

        class Off:  # a "kernel" whose outputs are one bf16 step off oneDNN's
            amx_ready = staticmethod(real.amx_ready)

            @staticmethod
            def amx_linear(*args):
                return real.amx_linear(*args).mul_(1.0078125)
        monkeypatch.setattr(amx_linear, "_extension", lambda: Off())
        amx_linear._kernel_matches_onednn.cache_clear()
    try:
        assert not amx_linear.available()
        assert not amx_linear.available()
        weight, bias = layer(128, 64)
        module = nn.Linear(64, 128).to(torch.bfloat16)
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
            x = torch.randn(4, 64).to(torch.bfloat16)
            with packed_linears(module, rows_hint=4):
                out = module(x)
        assert torch.equal(out, onednn(x, weight, bias, False)) and len(kernel_calls) == 0
        if case == "outputs differ":
            assert capsys.readouterr().out.count("warning: the AMX linear kernel is not used (its outputs differ "
                                                 "from oneDNN's); decoding steps use oneDNN's linear") == 1
    finally:
        amx_linear._kernel_matches_onednn.cache_clear()


def test_a_failed_build_leaves_onednn_with_one_warning(monkeypatch, failed_kernel_build):
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: native.AVX512_CPU_FLAGS | {"amx_bf16"})
    amx_linear._extension.cache_clear()
    try:
        assert not amx_linear.available() and not amx_linear.available()
        failed_kernel_build("the AMX linear kernel", "RLHF_AMX_LINEAR_KERNEL")
    finally:
        amx_linear._extension.cache_clear()  # later tests build (or load) the real one


def test_packed_linear_keeps_onednn_for_layers_the_kernel_does_not_take(kernel_calls):
    module = nn.Linear(64, 96).to(torch.bfloat16)  # 96 outputs: no multiple of 64
    x = torch.randn(2, 64).to(torch.bfloat16)
    with torch.no_grad():
        expected = module(x)
        with packed_linears(module, rows_hint=2):
            got = module(x)
    assert torch.equal(got, expected) and kernel_calls == []


def test_only_a_call_of_few_rows_asks_for_the_kernel(monkeypatch):
    """A block whose calls all have more than MAX_ROWS rows (a scoring pass, an evaluation) never asks whether the
    kernel is available (which builds it on first use); a block with calls of few rows asks once."""
    asked = []
    monkeypatch.setattr(amx_linear, "available", lambda: asked.append(1) or False)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64)).to(torch.bfloat16)
    with torch.no_grad():
        with packed_linears(model, rows_hint=40):
            model(torch.randn(40, 64).to(torch.bfloat16))
        assert asked == []
        with packed_linears(model, rows_hint=3):
            model(torch.randn(3, 64).to(torch.bfloat16))
            model(torch.randn(3, 64).to(torch.bfloat16))
    assert asked == ([1] if packed_linear._kernels_match() else [])
