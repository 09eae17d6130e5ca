"""model/decode_attention.py: the C++ decoding attention gives softmax attention over the allowed cached positions to
bf16 rounding (padding skipped, grouped KV heads, strided cache views), decoding steps use it where it applies, and
everything else (other calls, a failed build, the switch off, a CPU without AMX) keeps SDPA."""
import pytest
import torch
import torch.nn.functional as F

from tests.test_kv_cache import left_padded_prompts, tiny_model
from training.utils import native, precision, sampling
from training.utils.model import decode_attention

needs_avx512 = pytest.mark.skipif(not native.cpu_runs_avx512(),
                                  reason="the kernel is compiled for AVX-512, which this CPU lacks")


def reference(query, key, value, allowed, scale):
    """fp32 softmax attention of one query per (row, head) over the allowed positions; [B, 1, H, D]."""
    heads, kv_heads = query.size(1), key.size(1)
    key, value = (t.float().repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    scores = torch.einsum("bhd,bhtd->bht", query.float(), key) * scale
    scores = scores.masked_fill(~allowed[:, None, : key.size(2)], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1))  # a row with nothing allowed: zeros
    return torch.einsum("bht,bhtd->bhd", weights, value)[:, None]


@needs_avx512
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 8, 64), (4, 2, 48), (2, 1, 128), (3, 3, 16)])
def test_kernel_is_softmax_attention_over_the_allowed_positions(heads, kv_heads, head_dim):
    torch.manual_seed(0)
    batch, length, reserved = 4, 45, 64
    query = torch.randn(batch, heads, head_dim).to(torch.bfloat16)
    # keys and values as the block cache hands them over: a view of the first positions of a wider buffer
    key, value = (torch.randn(batch, kv_heads, reserved, head_dim).to(torch.bfloat16)[:, :, :length]
                  for _ in range(2))
    allowed = torch.ones(batch, length + 3, dtype=torch.bool)  # the mask may be wider than the keys
    allowed[1, :20] = False  # left padding
    allowed[2, :-4] = False  # only the newest position (length - 1) allowed among the keys
    allowed[3, 10:30] = False  # a hole
    scale = head_dim ** -0.5
    got = decode_attention._extension().decode_attention(query, key, value, allowed, scale)
    assert got.shape == (batch, 1, heads, head_dim) and got.dtype == torch.bfloat16
    expected = reference(query, key, value, allowed, scale)
    assert (got.float() - expected).abs().max() <= expected.abs().max() * 2 ** -7  # one bf16 rounding
    assert torch.equal(got[2, 0], value[2, :, length - 1].repeat_interleave(heads // kv_heads, dim=0))
    sdpa = F.scaled_dot_product_attention(query[:, :, None], key, value, attn_mask=allowed[:, None, None, :length],
                                          scale=scale, enable_gqa=heads != kv_heads).transpose(1, 2)
    assert (got.float() - sdpa.float()).abs().max() <= expected.abs().max() * 2 ** -6


@needs_avx512
def test_a_row_with_no_allowed_position_gets_zeros():
    query, key = torch.randn(2, 2, 16).to(torch.bfloat16), torch.randn(2, 2, 5, 16).to(torch.bfloat16)
    allowed = torch.ones(2, 5, dtype=torch.bool)
    allowed[0] = False
    got = decode_attention._extension().decode_attention(query, key, key, allowed, 0.25)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and got[1].abs().sum() > 0


def test_other_calls_go_to_sdpa():
    calls = []

    def sdpa(module, query, key, value, mask, **kwargs):
        calls.append(kwargs)
        return "sdpa", None

    attention = decode_attention.kernel_attention(sdpa)
    query, key = torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16)
    allowed = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    assert attention(None, query, key, key, allowed, sliding_window=3)[0] == "sdpa"
    assert attention(None, query, key, key, torch.zeros(1, 1, 1, 4))[0] == "sdpa"  # an additive mask
    assert attention(None, query.expand(1, 2, 3, 16), key, key, allowed)[0] == "sdpa"  # several query positions
    assert attention(None, query, key, key, allowed.expand(1, 2, 1, 4))[0] == "sdpa"  # a mask per head
    assert attention(None, query, key, key, allowed, dropout=0.1)[0] == "sdpa"
    assert len(calls) == 5 and calls[0]["sliding_window"] == 3


def sdpa_model(name, tokenizer):
    """A bf16 tiny model with SDPA, as sampling.decode_attention sets it for decoding on a CPU with AMX."""
    model = tiny_model(name, tokenizer, eager=False)
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel's calls during the test (the compiled module wrapped), with AMX reported present."""
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.delenv("RLHF_DECODE_ATTENTION_KERNEL", raising=False)
    compiled, calls = decode_attention._extension(), []

    class Recording:
        @staticmethod
        def decode_attention(*args):
            calls.append(args[1].size(2))
            return compiled.decode_attention(*args)
    monkeypatch.setattr(decode_attention, "_extension", lambda: Recording)
    return calls


@needs_avx512
@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama3"])  # llama3: grouped KV heads
def test_generate_decodes_with_the_kernel(name, tokenizer, kernel_calls, monkeypatch):
    """Every decoding step of every layer runs the kernel; the tokens are SDPA's where no two candidates were nearly
    tied (greedy here, all of them)."""
    model = tiny_model(name, tokenizer, eager=False)  # segment attention, switched to SDPA for decoding
    ids, mask = left_padded_prompts(tokenizer)
    new_tokens = 12

    def greedy():
        with torch.no_grad(), sampling.decoding_kernels(model, len(ids)):
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with_kernel = greedy()
    layers = model.config.num_hidden_layers
    assert len(kernel_calls) == (new_tokens - 1) * layers  # every step after the prompt's, every layer
    monkeypatch.setenv("RLHF_DECODE_ATTENTION_KERNEL", "0")
    without = greedy()
    assert len(kernel_calls) == (new_tokens - 1) * layers  # the switch off: none more
    assert torch.equal(with_kernel, without)


def test_kernel_not_used_without_amx_or_with_the_switch_off(tokenizer, monkeypatch):
    model = sdpa_model("tiny/opt", tokenizer)
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    assert not decode_attention.kernel_applies(model)
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.delenv("RLHF_DECODE_ATTENTION_KERNEL", raising=False)
    assert decode_attention.kernel_applies(model) == native.cpu_runs_avx512()
    monkeypatch.setenv("RLHF_DECODE_ATTENTION_KERNEL", "0")
    assert not decode_attention.kernel_applies(model)
    monkeypatch.delenv("RLHF_DECODE_ATTENTION_KERNEL")
    model.set_attn_implementation("eager")
    assert not decode_attention.kernel_applies(model)
    assert not decode_attention.kernel_applies(model.float())


def test_a_failed_build_leaves_sdpa_with_one_warning(tokenizer, monkeypatch, failed_kernel_build):
    """On a machine where it was never built, one line says it is being built; a failed build, one warning line."""
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: native.AVX512_CPU_FLAGS)
    decode_attention._extension.cache_clear()
    try:
        model = sdpa_model("tiny/opt", tokenizer)
        assert not decode_attention.kernel_applies(model)
        assert not decode_attention.kernel_applies(model)
        failed_kernel_build("the decoding attention kernel", "RLHF_DECODE_ATTENTION_KERNEL")
    finally:
        decode_attention._extension.cache_clear()  # later tests build (or load) the real one
