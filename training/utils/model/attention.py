"""Segment attention: CPU training and scoring passes attend within each sample's own tokens only.

A row of a batch is a run of segments: packed samples (step 1's --packing), one sample with its padding (every
other batch), or a preference pair's shared prompt and its two replies (data.pair_packing). Each token attends
causally to the tokens of its own segment, and to every token of the row's shared segments before it (the prompt
that both replies see); padding attends to nothing and its output is zero (no loss reads it, and no real token
attends to it). That is exactly what SDPA computes under the block-causal / padding mask, but SDPA computes the
whole [T, T] square of every row, masked entries included, and its bf16 kernel is slow on CPU: per sample, one
causal score matrix costs n^2 instead of the row's T^2.

Measured (tiny/opt-20m, bf16, one thread of an AMD EPYC with avx512_bf16): an SFT step over 8 packed rows of 512
tokens spends 27% of its 4.4 s in SDPA; with the per-segment form the step takes 3.8 s.

How it is switched on: `use_segment_attention(model)` (every model builder calls it) registers the attention
function under SEGMENT_ATTENTION with SDPA's mask builder, and a forward pre-hook that turns a contiguous 2-D
padding mask into `attention_segments` (the kwarg transformers passes down to every attention call). Packed rows
pass `**packed_segments(segment_ids)` themselves, beside their 4-D block mask. Whenever the per-segment form does
not apply (not CPU, fp32, a KV cache, attention dropout, sliding windows, soft-capping, attention sinks or position
biases, no segments), the call is SDPA's, unchanged; decoding picks its attention for the CPU
(sampling.decoding_kernels).

A frozen model's passes without gradients (step 3's reference and reward model, DPO's reference) attend per
sample with SDPA's flash kernel instead of the bucketed [n, n] scores: without a backward to keep probabilities
for, it is 2.3-2.9x faster there (one Xeon core with AMX, 8 heads, 330-480 tokens; a step-3 reference pass of 8 x
~330 tokens 0.27 -> 0.23 s). A trained model's no-grad passes (step 3's separate scoring, evaluation) keep the
eager form, so their values are bit for bit those of its training forward (PPO's ratio starts at exactly 1).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from training.utils.model import round_up

SEGMENT_ATTENTION = "segment_sdpa"
SEGMENTS_KWARG = "attention_segments"
# fp32 keeps SDPA: there the per-segment form is no faster (tiny/opt-20m, one thread: training passes 2-4% faster,
# a step-3 scoring forward 22% slower).
SEGMENT_DTYPES = (torch.bfloat16, torch.float16)
# The per-segment form keeps each segment's [heads, n, keys] probabilities for the backward pass (as eager attention
# does); SDPA's kernel keeps memory linear in n. A segment with more score entries than this runs SDPA (causal).
MAX_SCORES_PER_SEGMENT = 2**24
# Segment lengths are rounded up to a multiple of this for their matmuls. oneDNN compiles a kernel for every new
# matrix shape (~1.4 ms per attention bmm on a Xeon with AMX, more than the bmm itself), and samples of every length
# would each compile their own; rounded, a run meets at most 512 / 32 lengths. The extra query rows are dropped,
# and the extra keys come after every real query, so the causal mask hides them (a row of one sample takes them from
# its own neighbouring positions, see _lone_sample: a no-grad pass of 8 x 384 tokens 4% faster than copying zeros).
LENGTH_BUCKET = 32
# kwargs with which the per-segment form would compute something else than SDPA does: SDPA runs them.
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks", "sliding_window")


@dataclass(frozen=True)
class Segments:
    """Per row, the lengths of its consecutive segments (summing to the row's width), which are padding, and which
    are shared: seen whole by every later segment of the row (empty: none is)."""
    lengths: tuple[tuple[int, ...], ...]
    padding: tuple[tuple[bool, ...], ...]
    shared: tuple[tuple[bool, ...], ...] = ()


def _runs(values: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """Per row of `values` [B, T]: the lengths of its runs of equal values, and each run's value."""
    width = values.size(1)
    starts_here = torch.ones_like(values, dtype=torch.bool)
    starts_here[:, 1:] = values[:, 1:] != values[:, :-1]
    row_ids, starts = starts_here.nonzero(as_tuple=True)
    run_values = values[row_ids, starts].tolist()
    row_ids, starts = row_ids.tolist(), starts.tolist()
    lengths, values_per_row = [[] for _ in range(values.size(0))], [[] for _ in range(values.size(0))]
    for i, (row, start) in enumerate(zip(row_ids, starts)):
        end = starts[i + 1] if i + 1 < len(starts) and row_ids[i + 1] == row else width
        lengths[row].append(end - start)
        values_per_row[row].append(run_values[i])
    return lengths, values_per_row


def segments_from_ids(segment_ids: torch.Tensor, shared_segment: int | None = None) -> Segments:
    """Packed rows [B, T]: a sample's tokens share an id (its index in the row), padding is -1; tokens of
    `shared_segment` are seen by every later segment (packing.block_causal_mask's rule)."""
    lengths, ids = _runs(segment_ids)
    shared = () if shared_segment is None else tuple(tuple(i == shared_segment for i in row) for row in ids)
    return Segments(tuple(map(tuple, lengths)), tuple(tuple(i < 0 for i in row) for row in ids), shared)


def segments_from_mask(attention_mask: torch.Tensor) -> Segments | None:
    """Padded rows [B, T] (1 = token, 0 = padding, on either side): one segment per row plus its padding runs;
    None when some row's tokens are not contiguous (then the mask itself must be applied)."""
    lengths, values = _runs(attention_mask)
    if any(sum(1 for v in row if v) > 1 for row in values):
        return None
    return Segments(tuple(map(tuple, lengths)), tuple(tuple(not v for v in row) for row in values))


def packed_segments(segment_ids: torch.Tensor, shared_segment: int | None = None) -> dict:
    """The model-call kwarg that hands packed rows' segments (segments_from_ids) to segment attention: on CPU, the
    only device it runs on; {} elsewhere (where reading the ids back would only cost a device sync)."""
    if segment_ids.device.type != "cpu":
        return {}
    return {SEGMENTS_KWARG: segments_from_ids(segment_ids, shared_segment)}


_causal_biases: dict[tuple, torch.Tensor] = {}


def _causal_bias(n: int, dtype: torch.dtype, device: torch.device, masked: int = 0) -> torch.Tensor:
    """[n, n] additive causal mask (0 on and below the diagonal, the dtype's minimum above), a view of one cached
    matrix per dtype and device; `masked`: its first columns are the minimum in every row too (a new matrix)."""
    key = (dtype, device)
    bias = _causal_biases.get(key)
    if bias is None or bias.size(0) < n:
        bias = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)
        _causal_biases[key] = bias
    if not masked:
        return bias[:n, :n]
    bias = bias[:n, :n].clone()  # not cached: a matrix per (n, masked) pair would add up to gigabytes for long rows
    bias[:, :masked] = torch.finfo(dtype).min
    return bias


def _applies(module, query, key, segments, dropout, is_causal, kwargs) -> bool:
    return (segments is not None and query.device.type == "cpu" and query.dtype in SEGMENT_DTYPES
            and query.size(2) == key.size(2) and len(segments.lengths) == query.size(0)
            and all(sum(row) == query.size(2) for row in segments.lengths)
            and not dropout and is_causal is not False and getattr(module, "is_causal", True)
            and not kwargs.get("output_attentions") and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS))


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query/key/value [B, H, T, D] -> ([B, T, H, D], None).

    Per segment of length n: softmax(scale * q k^T + causal) v with [n, n] scores in the input dtype (as the
    eager implementation computes them; SDPA's causal kernel for a segment over MAX_SCORES_PER_SEGMENT); padding
    segments give zeros. Otherwise SDPA's forward, unchanged."""
    segments = kwargs.get(SEGMENTS_KWARG)
    if not _applies(module, query, key, segments, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    zero = query.new_zeros(())
    frozen = _frozen_pass(module, query, key, value)
    pieces = []  # every row's segments in order, [heads, n, D] each: one copy into the [B, T, H, D] output
    for row, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        lengths = segments.lengths[row]
        shared = segments.shared[row] if segments.shared else (False,) * len(lengths)
        lone = _lone_sample(q_row, k_row, v_row, lengths, segments.padding[row], shared, scale, zero, frozen)
        if lone is not None:
            pieces += lone
            continue
        seen_keys, seen_values = [], []  # the shared segments so far
        for q, k, v, is_padding, is_shared in zip(q_row.split(lengths, 1), k_row.split(lengths, 1),
                                                  v_row.split(lengths, 1), segments.padding[row], shared):
            if is_padding:
                pieces.append(zero.expand(q.size(0), q.size(1), v.size(-1)))
                continue
            pieces.append(_attend(q, k, v, seen_keys, seen_values, scale))
            if is_shared:
                seen_keys.append(k)
                seen_values.append(v)
    out = torch.cat([piece.transpose(0, 1) for piece in pieces])
    return out.view(query.size(0), query.size(2), query.size(1), value.size(-1)), None


def _frozen_pass(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether this is a pass of a frozen model (a reference or reward model: no parameter of the attention
    layer trains) that computes no gradient."""
    return (not (query.requires_grad or key.requires_grad or value.requires_grad)
            and not any(parameter.requires_grad for parameter in module.parameters()))


def _lone_sample(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: tuple[int, ...],
                 padding: tuple[bool, ...], shared: tuple[bool, ...], scale: float,
                 zero: torch.Tensor, frozen: bool = False) -> list[torch.Tensor] | None:
    """The attention of a row [heads, T, D] holding one sample and padding (every unpacked batch), as pieces [heads,
    n, D] covering the row in order, or None where the row is not that or its bucketed window does not fit. The
    sample's scores are rounded up to a LENGTH_BUCKET multiple with the row's own neighbouring positions instead of
    zero rows copied around it (views, no copies): positions after the sample are hidden from its queries by the
    causal mask, positions before it (a left-padded row) by masking their keys. The padding's output is `zero` (a
    0-d zero of the output's dtype) expanded."""
    real = [index for index, is_padding in enumerate(padding) if not is_padding]
    if len(real) != 1 or any(shared):
        return None
    start, n = sum(lengths[:real[0]]), lengths[real[0]]
    heads, width = query.shape[:2]
    window = round_up(n, LENGTH_BUCKET)
    if heads * window * window > MAX_SCORES_PER_SEGMENT or window > width:
        return None
    masked = max(start + window - width, 0)  # the window's first positions, before the sample: keys masked
    low = start - masked
    q, k, v = (t[:, low:low + window] for t in (query, key, value))
    bias = _causal_bias(window, query.dtype, query.device, masked)
    if frozen:
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias if masked else None,
                                             is_causal=not masked, scale=scale)[0]
    else:
        out = _biased_attention(q, k, v, bias, scale)
    out = out[:, masked:masked + n]
    return [zero.expand(heads, start, out.size(-1)), out, zero.expand(heads, width - start - n, out.size(-1))]


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shared_keys: list[torch.Tensor],
            shared_values: list[torch.Tensor], scale: float) -> torch.Tensor:
    """[heads, n, D] attention of a segment's n queries to the shared segments' keys before it (a shared prompt, all
    visible) and to its own n keys (causally); computed with both lengths padded to a LENGTH_BUCKET multiple."""
    heads, n = query.shape[:2]
    shared = sum(k.size(1) for k in shared_keys)
    if heads * n * (shared + n) > MAX_SCORES_PER_SEGMENT:
        keys, values = torch.cat([*shared_keys, key], dim=1), torch.cat([*shared_values, value], dim=1)
        bias = None if shared == 0 else torch.cat([query.new_zeros(n, shared),
                                                   _causal_bias(n, query.dtype, query.device)], dim=1)
        return torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=bias, is_causal=shared == 0, scale=scale)
    extra, shared_extra = round_up(n, LENGTH_BUCKET) - n, round_up(shared, LENGTH_BUCKET) - shared
    query = F.pad(query, (0, 0, 0, extra))
    # keys: the shared ones, zeros up to a bucket (masked out), the segment's own, zeros up to a bucket (causal)
    keys, values = (torch.cat([*before, t.new_zeros(heads, shared_extra, t.size(-1)), t,
                               t.new_zeros(heads, extra, t.size(-1))], dim=1)
                    for before, t in ((shared_keys, key), (shared_values, value)))
    bias = _causal_bias(n + extra, query.dtype, query.device)
    if shared:
        bias = torch.cat([bias.new_zeros(n + extra, shared),
                          bias.new_full((n + extra, shared_extra), torch.finfo(bias.dtype).min), bias], dim=1)
    return _biased_attention(query, keys, values, bias, scale)[:, :n]


def _biased_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v over [heads, rows, D] / [heads, keys, D] tensors and a [rows, keys] bias, the
    scores in the input dtype."""
    scores = torch.baddbmm(bias.expand(query.size(0), *bias.shape), query, keys.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), values)


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def _segments_from_padding_mask(module, args, kwargs):
    """Forward pre-hook: a full-sequence pass with a contiguous 2-D padding mask on CPU gets its segments."""
    mask = kwargs.get("attention_mask")
    if (SEGMENTS_KWARG in kwargs or mask is None or mask.dim() != 2 or mask.device.type != "cpu"
            or any(kwargs.get(k) is not None for k in ("past_key_values", "cache"))):
        return None
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.dtype not in SEGMENT_DTYPES:
        return None
    segments = segments_from_mask(mask)
    if segments is None:
        return None
    return args, {**kwargs, SEGMENTS_KWARG: segments}


def use_segment_attention(model) -> bool:
    """Switch a transformers model that uses SDPA to segment attention (SDPA wherever segments do not apply);
    other implementations (eager, flash, flex) are left alone. Returns whether the model now uses it."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(SEGMENT_ATTENTION)
    except (ValueError, ImportError):  # an architecture that takes no registered attention function
        return False
    model.register_forward_pre_hook(_segments_from_padding_mask, with_kwargs=True)
    return True

