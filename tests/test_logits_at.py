"""Logits only where a loss reads them (training/utils/model/logits.py): the LM head runs on the kept positions only,
and every loss equals the one computed from full logits."""
import pytest
import torch

from training.utils.data.collators import PairCollator, SFTCollator
from training.utils.data.pair_packing import SharedPromptPairCollator, common_prefix_length
from training.utils.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    labelled_positions,
    packed_reply_positions,
    packed_sequence_log_probs,
    reply_positions,
    sequence_log_probs,
)
from training.utils.model import logits
from training.utils.model.build import create_hf_model
from training.utils.model.logits import _logits_to_keep_support, last_logits, logits_at


@pytest.fixture(autouse=True)
def exact_head_rows(monkeypatch):
    """These tests count the head's rows: no rounding up for oneDNN (test_head_rows_round_up_on_cpu checks it)."""
    monkeypatch.setattr(logits, "HEAD_ROWS_MULTIPLE", 1)


def head_rows(model):
    """A list that receives the number of rows each LM head call computes."""
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(out[..., 0].numel()))
    return rows


def sft_batch(tokenizer):
    samples = [{"input_ids": list(range(5, 5 + n)), "loss_mask": [0] * p + [1] * (n - p)}
               for n, p in ((9, 4), (6, 1), (12, 10))]
    return SFTCollator(pad_token_id=tokenizer.pad_token_id)(samples)


@pytest.mark.parametrize("model_name", ["tiny/opt", "tiny/llama", "tiny/qwen2"])
def test_sft_loss_and_gradients_from_kept_logits_equal_full_logits(tokenizer, model_name):
    torch.manual_seed(0)
    model = create_hf_model(model_name, tokenizer)
    model.config.dropout = 0.0
    model.eval()  # no dropout: the two passes must see the same network
    assert _logits_to_keep_support(type(model)) == "mask"
    batch = sft_batch(tokenizer)
    labels = batch["labels"]
    keep = labelled_positions(labels)
    # hand check of the positions: sample 0 has prompt 4, reply 5 (tokens 4..8), so positions 3..7 predict them
    assert keep[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert int(keep.sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 5 + 5 + 2

    rows = head_rows(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    full = model(**inputs).logits
    full_loss = causal_lm_loss(full, labels)
    full_grads = torch.autograd.grad(full_loss, [p for p in model.parameters() if p.requires_grad])
    kept = logits_at(model, keep, **inputs)
    kept_loss = causal_lm_loss(kept, labels)
    kept_grads = torch.autograd.grad(kept_loss, [p for p in model.parameters() if p.requires_grad])
    assert rows == [labels.numel(), 12]  # full: B x T rows; kept: the 12 labelled positions only
    assert kept.shape == (12, full.size(-1))
    assert torch.allclose(kept, full[keep], atol=1e-5)
    assert abs(kept_loss.item() - full_loss.item()) < 1e-6
    assert abs(causal_lm_loss(kept, labels, reduction="sum").item()
               - causal_lm_loss(full, labels, reduction="sum").item()) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(kept_grads, full_grads)) < 1e-5


def test_dpo_log_probs_from_kept_logits_equal_full_logits_plain_and_packed(tokenizer):
    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer).eval()
    pairs = []
    for chosen, rejected in (([5, 6, 7, 8, 9, 2], [5, 6, 7, 11, 2]), ([5, 6, 7, 2], [5, 6, 7, 2, 12, 13, 2]),
                             ([30, 31, 32, 33, 2], [40, 2])):
        p = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
        pairs.append({"chosen_ids": chosen, "rejected_ids": rejected,
                      "chosen_reply_mask": [0] * p + [1] * (len(chosen) - p),
                      "rejected_reply_mask": [0] * p + [1] * (len(rejected) - p)})
    plain = PairCollator(pad_token_id=tokenizer.pad_token_id)(pairs)
    packed = SharedPromptPairCollator(pad_token_id=tokenizer.pad_token_id)(pairs)
    rows = head_rows(model)
    with torch.no_grad():
        inputs = {"input_ids": plain["input_ids"], "attention_mask": plain["attention_mask"]}
        expected = sequence_log_probs(model(**inputs).logits, plain["input_ids"], plain["reply_mask"])
        keep = reply_positions(plain["reply_mask"])
        got = sequence_log_probs(logits_at(model, keep, **inputs), plain["input_ids"], plain["reply_mask"])
        assert torch.allclose(got, expected, atol=1e-5)

        packed_inputs = {"input_ids": packed["packed_input_ids"], "attention_mask": packed["packed_attention_mask"],
                         "position_ids": packed["packed_position_ids"]}
        full_packed = packed_sequence_log_probs(model(**packed_inputs).logits, packed["packed_source"],
                                                packed["input_ids"], packed["reply_mask"])
        packed_keep = packed_reply_positions(packed["packed_source"], packed["reply_mask"],
                                             packed["packed_input_ids"].shape)
        kept_packed = packed_sequence_log_probs(logits_at(model, packed_keep, **packed_inputs), packed["packed_source"],
                                                packed["input_ids"], packed["reply_mask"], packed_keep)
    # scored reply tokens (+ EOS) 3 and 2, 1 and 4, 4 and 1 (the third pair shares nothing: a row's first token is
    # never predicted): one kept position each; on packed rows fewer, where both replies' first tokens are
    # predicted by the same shared-prompt position
    assert int(keep.sum()) == 3 + 2 + 1 + 4 + 4 + 1
    assert rows[1] == int(keep.sum()) and rows[3] == int(packed_keep.sum()) <= int(keep.sum())
    assert torch.allclose(kept_packed, full_packed, atol=1e-5)
    assert torch.allclose(kept_packed, expected, atol=1e-4)
    assert expected.abs().min() > 1.0


def test_last_logits_are_the_tail_of_the_full_logits(tokenizer):
    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer).eval()
    ids = torch.randint(3, 200, (2, 10))
    rows = head_rows(model)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        tail = last_logits(model, 4, input_ids=ids)
    assert rows == [20, 8]
    assert torch.allclose(tail, full[:, -4:], atol=1e-5)


class _NoKeepModel(torch.nn.Module):
    """A test double for a model whose forward has no logits_to_keep (every transformers causal LM here has it)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 5)

    def forward(self, input_ids):
        class Output:
            logits = self.head(torch.nn.functional.one_hot(input_ids, 3).float())
        return Output()


def test_models_without_logits_to_keep_get_their_full_logits_indexed():
    model = _NoKeepModel()
    ids = torch.tensor([[0, 1, 2], [2, 2, 1]])
    keep = torch.tensor([[False, True, True], [True, False, False]])
    assert _logits_to_keep_support(_NoKeepModel) is None
    full = model(ids).logits
    assert torch.equal(logits_at(model, keep, input_ids=ids), full[keep])
    assert torch.equal(last_logits(model, 2, input_ids=ids), full[:, -2:])


@pytest.mark.parametrize("multiple", [8, 64])
def test_head_rows_round_up_on_cpu(tokenizer, monkeypatch, multiple):
    """In bf16/fp16 on CPU the head computes a multiple of HEAD_ROWS_MULTIPLE rows (oneDNN compiles kernels per row
    count): the first unkept positions are added, their logits dropped, the kept logits and gradients unchanged;
    with fewer positions than that in the batch, every position. fp32 computes the kept rows only."""
    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0).eval()
    batch = sft_batch(tokenizer)
    keep = labelled_positions(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    exact = logits_at(model, keep, **inputs)
    exact_grads = torch.autograd.grad(causal_lm_loss(exact, batch["labels"]), list(model.parameters()))
    monkeypatch.setattr(logits, "HEAD_ROWS_MULTIPLE", multiple)
    monkeypatch.setattr(logits, "ONEDNN_DTYPES", (torch.float32,))  # fp32 here, so the comparison holds to 1e-6
    rows = head_rows(model)
    rounded = logits_at(model, keep, **inputs)
    assert rows == [16 if multiple == 8 else keep.numel()]  # 12 kept -> 16; 36 positions in all < 64
    torch.testing.assert_close(rounded, exact, atol=1e-6, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(causal_lm_loss(rounded, batch["labels"]), list(model.parameters())),
                         exact_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    widened, originally_kept = logits._rounded_up(keep)
    assert int(widened.sum()) == rows[0] and widened[keep].all() and int(originally_kept.sum()) == 12
    monkeypatch.setattr(logits, "ONEDNN_DTYPES", (torch.bfloat16, torch.float16))
    rows.clear()
    logits_at(model, keep, **inputs)
    assert rows == [12]
