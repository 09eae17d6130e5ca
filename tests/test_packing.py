"""SFT packing: packed rows give exactly the per-sample logits and the token-weighted loss of the padded
batch (tiny/opt and tiny/llama, eager and sdpa, fp32), no sample attends to another, sample boundaries
are never targets, the packer is deterministic and nearly lossless, and `supports_packing` says no
where the 4-D mask cannot be used."""
import types

import numpy as np
import pytest
import torch

from training.utils.data import packing
from training.utils.data.collators import SFTCollator
from training.utils.data.packing import (
    PackedSFTCollator,
    PackedSFTDataset,
    make_packed_loader,
    pack_samples,
    packing_efficiency,
    packing_mismatch,
    supports_packing,
)
from training.utils.data.pipeline import RaggedDataset
from training.utils.data.samplers import padding_efficiency
from training.utils.losses import IGNORE_INDEX, causal_lm_loss, count_label_tokens
from training.utils.model.build import create_hf_model

PAD = 1


def hh_like_lengths(n: int, seed: int = 0, top: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(177 * top / 512), 0.575, n)), 4, top).astype(np.int64)


def sft_samples(lengths, seed: int = 0, vocab: int = 4000, train_on_prompt: bool = False) -> list[dict]:
    """Random SFT items: a prompt (loss_mask 0) then a reply (loss_mask 1)."""
    rng = np.random.default_rng(seed)
    items = []
    for n in lengths:
        prompt = int(rng.integers(1, n)) if n > 1 else 0
        items.append({"input_ids": rng.integers(2, vocab, n).tolist(),
                      "loss_mask": [1] * n if train_on_prompt else [0] * prompt + [1] * (n - prompt)})
    return items


@pytest.fixture(scope="module", params=["tiny/opt", "tiny/llama"])
def base_model(request, tokenizer):
    torch.manual_seed(0)
    return create_hf_model(request.param, tokenizer).eval()


@pytest.fixture(params=["sdpa", "eager"])
def model(request, base_model):
    base_model.set_attn_implementation(request.param)
    assert base_model.config._attn_implementation == request.param
    return base_model


def run_packed(model, rows: list[list[dict]]):
    batch = PackedSFTCollator(PAD)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
    return batch, logits


def run_padded(model, samples: list[dict]):
    batch = SFTCollator(PAD)(samples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return batch, logits


def per_sample_logits(logits, rows):
    """The packed logits cut back into each sample's [n, vocab], in row order."""
    out = []
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = len(sample["input_ids"])
            out.append(logits[r, start:start + n])
            start += n
    return out


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_and_logits_equal_the_padded_batch(model, train_on_prompt):
    samples = sft_samples([37, 5, 12, 60, 3, 21, 44, 9, 2, 30], seed=1, train_on_prompt=train_on_prompt)
    rows_idx = pack_samples([len(s["input_ids"]) for s in samples], 64, seed=0)
    assert len(rows_idx) < len(samples)  # really packed
    rows = [[samples[i] for i in row] for row in rows_idx]
    packed, packed_logits = run_packed(model, rows)
    order = [i for row in rows_idx for i in row]
    padded, padded_logits = run_padded(model, [samples[i] for i in order])

    packed_loss = (causal_lm_loss(packed_logits, packed["labels"], reduction="sum")
                   / count_label_tokens(packed["labels"]))
    padded_loss = (causal_lm_loss(padded_logits, padded["labels"], reduction="sum")
                   / count_label_tokens(padded["labels"]))
    assert count_label_tokens(packed["labels"]) == count_label_tokens(padded["labels"])
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    assert abs(causal_lm_loss(packed_logits, packed["labels"]).item()
               - causal_lm_loss(padded_logits, padded["labels"]).item()) < 1e-5
    for k, logits in enumerate(per_sample_logits(packed_logits, rows)):
        n = logits.size(0)
        torch.testing.assert_close(logits, padded_logits[k, :n], atol=1e-5, rtol=0)


def test_no_sample_attends_to_another(model):
    samples = sft_samples([10, 7, 12], seed=2)
    _, before = run_packed(model, [samples])
    changed = [dict(samples[0], input_ids=[t + 1 for t in samples[0]["input_ids"]])] + samples[1:]
    _, after = run_packed(model, [changed])
    first, rest = slice(0, 10), slice(10, 29)
    assert (before[0, first] - after[0, first]).abs().max() > 1e-2  # the changed sample did change
    torch.testing.assert_close(before[0, rest], after[0, rest], atol=1e-6, rtol=0)
    # nor does a later sample reach back to an earlier one
    changed = samples[:2] + [dict(samples[2], input_ids=[t + 1 for t in samples[2]["input_ids"]])]
    _, after = run_packed(model, [changed])
    torch.testing.assert_close(before[0, :17], after[0, :17], atol=1e-6, rtol=0)


def test_collator_fields_at_sample_boundaries():
    samples = sft_samples([4, 3, 5], train_on_prompt=True)
    batch = PackedSFTCollator(PAD, pad_to=15)([samples[:2], samples[2:]])
    assert batch["input_ids"].shape == (2, 15) and batch["attention_mask"].shape == (2, 1, 15, 15)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2] + list(range(8))
    assert batch["segment_ids"][0].tolist() == [0] * 4 + [1] * 3 + [-1] * 8
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[4] == IGNORE_INDEX  # each sample's first token
    assert labels[1:4] == samples[0]["input_ids"][1:] and labels[5:7] == samples[1]["input_ids"][1:]
    assert set(labels[7:]) == {IGNORE_INDEX} and batch["labels"][1, 0] == IGNORE_INDEX
    mask = batch["attention_mask"][0, 0]
    allowed = (mask == 0)
    assert allowed[5].tolist() == [False] * 4 + [True, True] + [False] * 9  # 2nd sample sees only itself
    assert allowed.any(dim=-1).all()  # no fully masked query row (padding sees padding)
    assert mask.min() == torch.finfo(torch.float32).min
    assert PackedSFTCollator(PAD, mask_dtype=torch.bfloat16)([samples])["attention_mask"].dtype == torch.bfloat16


def test_packer_fits_rows_covers_all_and_is_deterministic():
    lengths = hh_like_lengths(3000, top=128)
    rows = pack_samples(lengths, 128, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(3000))
    assert all(lengths[row].sum() <= 128 for row in rows)
    assert rows == pack_samples(lengths, 128, seed=3)
    assert rows != pack_samples(lengths, 128, seed=4)  # equal lengths are taken in another order
    with pytest.raises(ValueError, match="does not fit"):
        pack_samples([5, 200], 128)


def test_packing_efficiency_on_long_tailed_lengths():
    lengths = hh_like_lengths(20000)
    rows = pack_samples(lengths, 512, seed=0)
    efficiency = packing_efficiency(rows, lengths, 512)
    row_tokens = [int(lengths[row].sum()) for row in rows]
    batched = padding_efficiency(row_tokens[i:i + 8] for i in range(0, len(rows), 8))
    unpacked = padding_efficiency(lengths[i:i + 8].tolist() for i in range(0, len(lengths), 8))
    print(f"packing efficiency {efficiency:.4f} (batches of 8 rows {batched:.4f}); padded random batches "
          f"{unpacked:.4f}")
    assert efficiency > 0.98 and batched > 0.98 and unpacked < 0.6


def test_packed_loader_batches_rows_and_resumes(tokenizer):
    lengths = hh_like_lengths(200, top=64)
    data = RaggedDataset({k: [s[k] for s in sft_samples(lengths)] for k in ("input_ids", "loss_mask")})
    rows = PackedSFTDataset(data, 64, seed=5)
    assert rows.efficiency() > 0.95 and rows.sample_lengths().max() <= 64
    loader = make_packed_loader(data, 4, 64, PAD, seed=5)
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert all(b["input_ids"].size(0) == 4 for b in batches[:-1])
    assert sum(int((b["segment_ids"] >= 0).sum()) for b in batches) == int(lengths.sum())
    loader.sampler.set_epoch(1)
    loader.sampler.skip_batches(3, 4)
    rest = list(loader)
    assert len(rest) == len(batches) - 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, batches[3:]))


def test_supports_packing(base_model, monkeypatch):
    assert supports_packing(base_model)

    class Engine(torch.nn.Module):  # DeepSpeed engines and DDP keep the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert supports_packing(Engine(base_model))
    flash = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2",
                                                               model_type="llama"))
    assert not supports_packing(flash)
    monkeypatch.setattr(packing, "PACKABLE_MODEL_TYPES", frozenset())
    assert not supports_packing(base_model)
    assert supports_packing(base_model, probe=True)  # the probe finds the model exact


def test_alibi_models_are_not_packable():
    from transformers import AutoConfig, AutoModelForCausalLM

    bloom = AutoModelForCausalLM.from_config(AutoConfig.for_model("bloom", vocab_size=300, hidden_size=64, n_layer=2,
                                                                  n_head=4), attn_implementation="eager")
    assert not supports_packing(bloom) and not supports_packing(bloom, probe=True)
    falcon = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True),
        attn_implementation="eager")
    assert not supports_packing(falcon)


_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2}
_GPT = {"n_embd": 64, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0}
TINY_SHAPES = {
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},
    "gemma": {**_LLAMA_LIKE, "head_dim": 16},
    "phi3": {**_LLAMA_LIKE, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0},
    "gpt2": _GPT,
    "gptj": {**_GPT, "rotary_dim": 8},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def test_every_listed_architecture_has_a_shape_here():
    assert set(packing.PACKABLE_MODEL_TYPES) == set(TINY_SHAPES) | {"opt", "llama"}


@pytest.mark.parametrize("model_type", sorted(TINY_SHAPES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_listed_architectures_pack_exactly(model_type, attention):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=300, **TINY_SHAPES[model_type])
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
    assert supports_packing(model)
    assert packing_mismatch(model) < 1e-5


# ---------------------------------------------------------------- unpadded batches (step 1's default on CPU bf16)

def test_unpadded_batch_is_the_padded_batch_in_one_row():
    from training.utils.data.packing import UnpaddedBatchCollator

    samples = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [1, 1]}]
    batch = UnpaddedBatchCollator(PAD, width_multiple=1)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]  # 8 is not predicted from 7
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]] and batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert batch["attention_mask"].shape == (1, 1, 5, 5)
    # By default the row is rounded up to 64 tokens (oneDNN's kernels stay cached): padding with no label, no segment
    rounded = UnpaddedBatchCollator(PAD)(samples)
    assert rounded["input_ids"].tolist() == [[5, 6, 7, 8, 9] + [PAD] * 59]
    assert rounded["labels"][0, 5:].eq(IGNORE_INDEX).all() and rounded["segment_ids"][0, 5:].eq(-1).all()
    assert rounded["labels"][0, :5].tolist() == batch["labels"][0].tolist()
    assert rounded["attention_mask"].shape == (1, 1, 64, 64)
    assert UnpaddedBatchCollator(PAD)(samples * 13)["input_ids"].shape == (1, 128)  # 65 tokens
    # Over max_tokens the batch is padded as usual (its mask would be too big).
    padded = UnpaddedBatchCollator(PAD, max_tokens=4)(samples)
    assert padded.keys() == SFTCollator(PAD)(samples).keys() and padded["input_ids"].shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpadded_sft_loss_and_gradients_equal_the_padded_ones(tokenizer, dtype):
    """fp32: SDPA under the block mask; bf16 on CPU: segment attention (each sample on its own tokens)."""
    from training.step1_supervised_finetuning.main import real_samples_and_tokens, sft_loss
    from training.utils.data.packing import UnpaddedBatchCollator

    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0).to(dtype)
    samples = sft_samples([23, 7, 41, 12, 30], seed=3)
    results = []
    for batch in (SFTCollator(PAD)(samples), UnpaddedBatchCollator(PAD, dtype)(samples)):
        model.zero_grad()
        loss = sft_loss(model, batch, compute_fp32=True)
        loss.backward()
        results.append((loss.item(), [p.grad.float().clone() for p in model.parameters()],
                        real_samples_and_tokens(batch)))
    (padded_loss, padded_grads, padded_counts), (unpadded_loss, unpadded_grads, unpadded_counts) = results
    assert padded_counts == unpadded_counts == (5, 113)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert unpadded_loss == pytest.approx(padded_loss, rel=tolerance)
    scale = max(grad.abs().max() for grad in padded_grads)
    for padded_grad, unpadded_grad in zip(padded_grads, unpadded_grads):
        torch.testing.assert_close(unpadded_grad, padded_grad, rtol=tolerance, atol=tolerance * scale)


def test_batches_are_unpadded_only_where_segment_attention_runs(tokenizer):
    from training.utils.data.packing import UnpaddedBatchCollator, unpad_batches

    cpu = torch.device("cpu")

    def switched(model, dtype=torch.bfloat16, device=cpu) -> bool:
        loader = types.SimpleNamespace(collate_fn=SFTCollator(PAD))
        done = unpad_batches(loader, model, PAD, dtype, device)
        assert isinstance(loader.collate_fn, UnpaddedBatchCollator if done else SFTCollator)
        return done

    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0)
    assert switched(model)
    assert not switched(model, torch.float32)  # fp32 runs SDPA: the whole row's square would cost more
    assert not switched(model, device=torch.device("cuda"))
    assert not switched(create_hf_model("tiny/opt", tokenizer, dropout=0.1))  # attention dropout -> SDPA
    model.set_attn_implementation("sdpa")
    assert not switched(model)
