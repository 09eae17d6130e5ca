"""Segment attention (training/utils/model/attention.py): per-sample attention equals SDPA under the mask.

The per-segment form runs for bf16/fp16 on CPU; SEGMENT_DTYPES is widened to fp32 in the exactness tests so the
comparison against SDPA holds to 1e-5 (bf16 rounding would hide a wrong mask of one token)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from training.utils.data.packing import block_causal_mask
from training.utils.model import attention
from training.utils.model.attention import (
    SEGMENT_ATTENTION,
    SEGMENTS_KWARG,
    Segments,
    segment_attention,
    segments_from_ids,
    segments_from_mask,
    use_segment_attention,
)

OPT_20M = "training/utils/model/configs/opt-20m.json"


@pytest.fixture
def fp32_segments(monkeypatch):
    monkeypatch.setattr(attention, "SEGMENT_DTYPES", (torch.float32, torch.bfloat16, torch.float16))


def test_segments_from_ids_and_from_mask():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert segments_from_ids(ids) == Segments(((3, 2, 1), (6,)), ((False, False, True), (False,)))
    assert segments_from_ids(ids, shared_segment=0).shared == ((True, False, False), (True,))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    assert segments_from_mask(mask) == Segments(((2, 3, 1), (6,), (2, 4)),
                                                ((True, False, True), (False,), (False, True)))
    # Tokens with a hole between them attend across it under the mask: no segments, the mask is applied.
    assert segments_from_mask(torch.tensor([[1, 0, 1, 1]])) is None


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("long_segments", [False, True])
@pytest.mark.parametrize("shared_segment", [None, 0])
def test_segment_attention_equals_sdpa_with_the_block_mask_values_and_gradients(fp32_segments, shared_segment,
                                                                               long_segments, monkeypatch):
    """Packed samples, and (shared_segment=0) a preference pair's prompt that both replies see; long_segments: the
    segments over MAX_SCORES_PER_SEGMENT run SDPA's kernel (memory linear in their length)."""
    if long_segments:
        monkeypatch.setattr(attention, "MAX_SCORES_PER_SEGMENT", 4 * 6 * 6)
    torch.manual_seed(0)
    segment_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 1 + [-1] * 3, [0] * 16, [0] * 10 + [-1] * 6])
    heads, kv_heads, width, dim = 4, 2, 16, 8
    query = torch.randn(3, heads, width, dim, requires_grad=True)
    key = torch.randn(3, kv_heads, width, dim, requires_grad=True)
    value = torch.randn(3, kv_heads, width, dim, requires_grad=True)
    out, _ = segment_attention(_Module(), query, key, value, None, scaling=0.3,
                               **{SEGMENTS_KWARG: segments_from_ids(segment_ids, shared_segment)})
    mask = block_causal_mask(segment_ids, shared_segment=shared_segment)
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                                              attn_mask=mask, scale=0.3).transpose(1, 2)
    real = segment_ids >= 0
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padding: zeros
    weights = torch.randn_like(out) * real[:, :, None, None]
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("shared_segment", [None, 0])
def test_score_matrices_are_rounded_to_the_length_bucket(fp32_segments, shared_segment, monkeypatch):
    """oneDNN compiles a kernel per new matrix shape: every segment's scores are computed over lengths rounded up to
    LENGTH_BUCKET (a shared prompt's keys too, the extra ones masked out), with SDPA's values and gradients."""
    shapes = []
    baddbmm = torch.baddbmm

    def spy(*args, **kwargs):
        shapes.append(tuple(args[0].shape))
        return baddbmm(*args, **kwargs)

    monkeypatch.setattr(torch, "baddbmm", spy)
    torch.manual_seed(1)
    segment_ids = torch.tensor([[0] * 45 + [1] * 37 + [2] * 70 + [-1] * 8])
    query, key, value = (torch.randn(1, 2, 160, 8, requires_grad=True) for _ in range(3))
    module = _Module()
    module.num_key_value_groups = 1
    out, _ = segment_attention(module, query, key, value, None, scaling=0.5,
                               **{SEGMENTS_KWARG: segments_from_ids(segment_ids, shared_segment)})
    bucket = attention.LENGTH_BUCKET
    assert shapes and all(rows % bucket == 0 and keys % bucket == 0 for _, rows, keys in shapes), shapes
    if shared_segment == 0:  # the replies see the prompt's 45 keys rounded to 64, then their own
        assert shapes[1:] == [(2, 64, 64 + 64), (2, 96, 64 + 96)]
    mask = block_causal_mask(segment_ids, shared_segment=shared_segment)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.5).transpose(1, 2)
    real = segment_ids >= 0
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out) * real[:, :, None, None]
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (query, key, value)),
                         torch.autograd.grad((expected * weights).sum(), (query, key, value))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_of_one_sample_attends_over_a_window_of_its_own_row(fp32_segments, dtype, monkeypatch):
    """Unpacked rows (one sample and its padding) round the sample's scores up to LENGTH_BUCKET with the row's own
    neighbouring positions (views): after the sample (hidden by the causal mask) or, in a left-padded row, before it
    (keys masked). Values and gradients are SDPA's under the mask (fp32 to 1e-5); padding gives zeros; the
    right-extended window is bit for bit the zero-padded per-segment form, in bf16 too."""
    lone = []
    real_lone = attention._lone_sample
    monkeypatch.setattr(attention, "_lone_sample", lambda *a: lone.append(real_lone(*a)) or lone[-1])
    torch.manual_seed(3)
    width, heads, dim = 96, 2, 8
    rows = [(20, 76), (0, 45), (10, 45), (40, 45), (0, 96)]  # (padding before, sample length): padding after
    segment_ids = torch.full((len(rows), width), -1)
    for row, (before, n) in enumerate(rows):
        segment_ids[row, before:before + n] = 0
    query, key, value = (torch.randn(len(rows), heads, width, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    module = _Module()
    module.num_key_value_groups = 1
    segments = segments_from_ids(segment_ids)
    out, _ = segment_attention(module, query, key, value, None, scaling=0.4, **{SEGMENTS_KWARG: segments})
    assert len(lone) == len(rows) and all(row is not None for row in lone)
    real = segment_ids >= 0
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    mask = block_causal_mask(segment_ids)
    exact = [t.detach().float().requires_grad_() for t in (query, key, value)]
    expected = F.scaled_dot_product_attention(*exact, attn_mask=mask, scale=0.4).transpose(1, 2)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out[real].float(), expected[real], **tolerance)
    weights = torch.randn(out.shape) * real[:, :, None, None]
    grads = torch.autograd.grad((out.float() * weights).sum(), (query, key, value))
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), exact)):
        torch.testing.assert_close(got.float(), want, **(tolerance if dtype == torch.float32
                                                          else {"atol": 5e-2, "rtol": 5e-2}))
    with torch.no_grad():  # rows whose window extends after the sample: the zero-padded form's bits
        for row, (before, n) in enumerate(rows):
            if before + -(-n // attention.LENGTH_BUCKET) * attention.LENGTH_BUCKET <= width:  # 3 of the 5 rows
                q, k, v = (t[row, :, before:before + n] for t in (query, key, value))
                assert torch.equal(out[row, before:before + n].transpose(0, 1), attention._attend(q, k, v, [], [], 0.4))


def _model(dtype=torch.float32, **config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(OPT_20M, **config)).to(dtype).eval()
    assert use_segment_attention(model) and model.config._attn_implementation == SEGMENT_ATTENTION
    return model


def _sdpa_copy(model):
    import copy

    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    return reference


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_padded_batches_give_sdpa_logits_and_gradients(fp32_segments, family):
    """Left and right padding, through the model's own pre-hook: logits and weight gradients equal SDPA's."""
    if family == "opt":
        model = _model()
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
        assert use_segment_attention(model)
    reference = _sdpa_copy(model)
    ids = torch.randint(2, 90, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding (a step-3 prompt)
    mask[1, 7:] = 0  # right padding (an SFT sample)
    calls = []
    original = attention.sdpa_attention_forward
    attention.sdpa_attention_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        attention.sdpa_attention_forward = original
    assert calls == []  # every layer took the per-segment form
    expected = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    (logits[real].logsumexp(-1).sum()).backward()
    (expected[real].logsumexp(-1).sum()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_with_segments_give_the_unpacked_logits(fp32_segments):
    from training.step1_supervised_finetuning.main import model_inputs
    from training.utils.data.collators import SFTCollator
    from training.utils.data.packing import PackedSFTCollator

    model = _model()
    samples = [{"input_ids": torch.randint(2, 4000, (n,)).tolist(), "loss_mask": [1] * n} for n in (6, 9, 4)]
    packed = PackedSFTCollator(pad_token_id=1, pad_to=22)([samples])
    inputs = model_inputs(packed)
    assert inputs[SEGMENTS_KWARG] == Segments(((6, 9, 4, 3),), ((False, False, False, True),))
    logits = model(**inputs).logits[0]
    padded = SFTCollator(pad_token_id=1)(samples)
    alone = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    start = 0
    for row, n in enumerate((6, 9, 4)):
        torch.testing.assert_close(logits[start:start + n], alone[row, :n], atol=1e-5, rtol=1e-5)
        start += n


def test_bf16_is_close_to_sdpa_and_fp32_runs_sdpa_unchanged():
    model = _model(torch.bfloat16)
    ids = torch.randint(2, 4000, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits.float()
        want = _sdpa_copy(model)(input_ids=ids, attention_mask=mask).logits.float()
        exact = _model().float()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    # bf16 against the fp32 result: no further from it than bf16 SDPA is
    assert (got - exact)[real].abs().max() <= 2 * (want - exact)[real].abs().max() + 1e-2
    fp32 = _model()
    with torch.no_grad():
        torch.testing.assert_close(fp32(input_ids=ids, attention_mask=mask).logits,
                                   _sdpa_copy(fp32)(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_sdpa_runs_where_segments_do_not_apply(fp32_segments):
    """A KV cache (generation), attention dropout and a mask with a hole all go to SDPA unchanged."""
    model = _model()
    reference = _sdpa_copy(model)
    ids = torch.randint(2, 4000, (2, 12))
    holed = torch.ones_like(ids)
    holed[0, 5] = 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=holed).logits,
                           reference(input_ids=ids, attention_mask=holed).logits)
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 1, "attention_mask": torch.ones_like(ids)}
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    query = torch.randn(1, 2, 6, 4)
    segments = Segments(((6,),), ((False,),))
    torch.manual_seed(3)
    dropped, _ = segment_attention(_Module(), query, query[:, :1], query[:, :1], None, dropout=0.5,
                                   **{SEGMENTS_KWARG: segments})
    torch.manual_seed(3)
    expected = F.scaled_dot_product_attention(query, query[:, :1].expand(1, 2, 6, 4), query[:, :1].expand(1, 2, 6, 4),
                                              dropout_p=0.5, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(dropped, expected)


def test_only_sdpa_models_switch_and_saved_configs_do_not_name_it(tmp_path):
    import json

    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(OPT_20M), attn_implementation="eager")
    assert not use_segment_attention(eager) and eager.config._attn_implementation == "eager"
    model = _model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert SEGMENT_ATTENTION not in json.dumps(config)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"


_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4),
    "gptj": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gpt_neox": _SMALL,
    "falcon": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phi3": dict(_SMALL, pad_token_id=0),
    "qwen2": dict(_SMALL, num_key_value_heads=2),
    "qwen3": dict(_SMALL, num_key_value_heads=2, head_dim=16),
    "gemma": dict(_SMALL, num_key_value_heads=2, head_dim=16),
    "mistral": dict(_SMALL, num_key_value_heads=2, sliding_window=4),  # sliding window: SDPA runs it
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_sdpa_results_with_padding(fp32_segments, family):
    """Scaling, rotary, GQA, query norms, biases: whatever the family does around its attention call, the
    per-segment form gives SDPA's hidden states on every real token (fp32)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(family, **FAMILIES[family])).eval()
    reference = _sdpa_copy(model)
    assert use_segment_attention(model)
    ids = torch.randint(3, 120, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, 8:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_recomputes_with_the_segments(fp32_segments):
    """Checkpointed layers get the segments again when they recompute: the gradients equal SDPA's."""
    model = _model(dropout=0.0).train()  # no dropout: the two models' random masks would differ
    reference = _sdpa_copy(model)
    for m in (model, reference):
        m.gradient_checkpointing_enable()
    ids = torch.randint(2, 4000, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for m in (model, reference):
        m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("trains", [False, True])
def test_a_frozen_models_no_grad_pass_runs_sdpas_kernel_per_sample(trains, monkeypatch):
    """A reference or reward model (no parameter trains) scoring without gradients attends per sample with SDPA's
    flash kernel (2-3x faster than the bucketed eager form there; causal on the window, or under the window's mask
    when it is extended before the sample); values are the block-causal attention's to bf16 rounding. A trained
    model's no-grad pass keeps the eager form, bit for bit its training forward's values."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or real_sdpa(*a, **k))
    torch.manual_seed(4)
    width, heads, dim = 96, 2, 16
    rows = [(20, 76), (0, 45), (40, 45), (0, 96)]  # (padding before, sample length): windows after and before
    segment_ids = torch.full((len(rows), width), -1)
    for row, (before, n) in enumerate(rows):
        segment_ids[row, before:before + n] = 0
    query, key, value = (torch.randn(len(rows), heads, width, dim, dtype=torch.bfloat16) for _ in range(3))
    module = _Module()
    module.num_key_value_groups = 1
    module.proj = torch.nn.Linear(2, 2).requires_grad_(trains)
    segments = segments_from_ids(segment_ids)
    with torch.no_grad():
        out, _ = segment_attention(module, query, key, value, None, scaling=0.25, **{SEGMENTS_KWARG: segments})
    assert len(calls) == (0 if trains else len(rows))
    if not trains:
        assert [call["is_causal"] for call in calls] == [False, True, False, True]  # rows 0 and 2: windows before
    real = segment_ids >= 0
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    expected = real_sdpa(query.float(), key.float(), value.float(), attn_mask=block_causal_mask(segment_ids),
                         scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out[real].float(), expected[real], atol=2e-2, rtol=2e-2)
    if trains:  # the eager form: what the same call with gradients gives
        grad_out, _ = segment_attention(module, *(t.requires_grad_() for t in (query, key, value)), None,
                                        scaling=0.25, **{SEGMENTS_KWARG: segments})
        assert torch.equal(out, grad_out.detach())
