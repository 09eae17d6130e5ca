"""Pairs with their prompt computed once (training/utils/data/pair_packing.py): the layout, and a reward model's
values and scores on packed rows equal to those on plain padded rows."""
import pytest
import torch

from training.utils.data.collators import PairCollator
from training.utils.data.pair_packing import (
    SharedPromptPairCollator,
    common_prefix_length,
    reward_model_inputs,
    share_prompts,
    unpack_pairs,
)
from training.utils.losses import pairwise_loss

PAIRS = [  # chosen, rejected: a shared prompt then different replies; a reply that extends the other; identical
    ([5, 6, 7, 8, 9, 2], [5, 6, 7, 11, 2]),
    ([5, 6, 7, 2], [5, 6, 7, 2, 12, 13, 2]),
    ([20, 21, 2], [20, 21, 2]),
    ([30, 31, 32, 33, 34, 35, 36, 2], [40, 2]),  # nothing shared (prompts truncated differently)
]


def items():
    return [{"chosen_ids": c, "rejected_ids": r} for c, r in PAIRS]


def test_the_packed_row_holds_the_prompt_once_and_both_replies_after_it():
    batch = SharedPromptPairCollator(pad_token_id=1)(items())
    assert [common_prefix_length(c, r) for c, r in PAIRS] == [3, 4, 3, 0]
    assert batch["packed_input_ids"][0].tolist()[:8] == [5, 6, 7, 8, 9, 2, 11, 2]
    assert batch["packed_position_ids"][0].tolist()[:8] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert batch["packed_input_ids"].size(1) == max(len(c) + len(r) - common_prefix_length(c, r) for c, r in PAIRS)
    # positions never pass the longer sequence of a pair (the row is longer than either)
    assert batch["packed_position_ids"].max() == max(len(seq) for pair in PAIRS for seq in pair) - 1
    assert batch["packed_position_ids"][2, 3:].tolist() == [0] * (batch["packed_input_ids"].size(1) - 3)
    # the plain batch is rebuilt exactly from the packed rows through `source`
    rebuilt = unpack_pairs(batch["packed_input_ids"], batch["packed_source"])
    mask = batch["attention_mask"].bool()
    assert torch.equal(rebuilt[mask], batch["input_ids"][mask])
    assert torch.equal(batch["input_ids"], PairCollator(pad_token_id=1)(items())["input_ids"])
    # row 0: the rejected reply (positions 6, 7) sees the prompt (0-2) and itself, never the chosen reply (3-5)
    allowed = batch["packed_attention_mask"][0, 0] == 0
    assert allowed[7].nonzero().flatten().tolist() == [0, 1, 2, 6, 7]
    assert allowed[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]


@pytest.fixture(params=["sdpa", "segments"])
def attention_path(request, monkeypatch):
    """'segments': model.attention's per-segment form in fp32 (on CPU it runs for bf16/fp16 only), and SDPA must
    never be called; 'sdpa': transformers' SDPA under the 4-D mask."""
    from training.utils.model import attention

    if request.param == "segments":
        monkeypatch.setattr(attention, "SEGMENT_DTYPES", (torch.float32,))

        def refuse(*args, **kwargs):
            raise AssertionError("SDPA ran where segments apply")

        monkeypatch.setattr(attention, "sdpa_attention_forward", refuse)
    return request.param


def test_reward_model_scores_on_packed_rows_equal_the_plain_rows(tokenizer, attention_path):
    from training.utils.model.reward_model import create_reward_model

    torch.manual_seed(0)
    model = create_reward_model("tiny/opt", tokenizer).eval()
    plain = PairCollator(pad_token_id=tokenizer.pad_token_id)(items())
    packed = SharedPromptPairCollator(pad_token_id=tokenizer.pad_token_id)(items())
    with torch.no_grad():
        expected = model(**reward_model_inputs(plain))
        got = model(**reward_model_inputs(packed))
    mask = plain["attention_mask"].bool()
    assert (got.values[mask] - expected.values[mask]).abs().max() < 1e-5
    assert (got.end_scores - expected.end_scores).abs().max() < 1e-5
    half = len(PAIRS)
    assert abs(pairwise_loss(got.end_scores[:half], got.end_scores[half:])
               - pairwise_loss(expected.end_scores[:half], expected.end_scores[half:])) < 1e-6


def test_models_that_cannot_be_packed_keep_plain_rows(tokenizer):
    from training.utils.model.reward_model import create_reward_model

    model = create_reward_model("tiny/opt", tokenizer)
    loader = torch.utils.data.DataLoader(items(), batch_size=2, collate_fn=PairCollator(1))
    model.backbone.config._attn_implementation = "flash_attention_2"  # takes no 4-D mask
    assert not share_prompts([loader], model.backbone, 1, torch.float32)
    assert isinstance(loader.collate_fn, PairCollator)
    model.backbone.config._attn_implementation = "sdpa"
    assert share_prompts([loader], model.backbone, 1, torch.float32)
    assert isinstance(loader.collate_fn, SharedPromptPairCollator)


def test_dpo_reply_log_probs_on_packed_rows_equal_the_plain_rows(tokenizer, attention_path):
    from training.utils.data.pair_packing import packed_model_inputs
    from training.utils.losses import packed_sequence_log_probs, sequence_log_probs
    from training.utils.model.build import create_hf_model

    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer).eval()
    pairs = []
    for chosen, rejected in PAIRS:  # the reply (+ EOS) is what follows the shared prompt; one token at least
        p = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
        pairs.append({"chosen_ids": chosen, "rejected_ids": rejected,
                      "chosen_reply_mask": [0] * p + [1] * (len(chosen) - p),
                      "rejected_reply_mask": [0] * p + [1] * (len(rejected) - p)})
    plain = PairCollator(pad_token_id=tokenizer.pad_token_id)(pairs)
    packed = SharedPromptPairCollator(pad_token_id=tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        plain_logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        expected = sequence_log_probs(plain_logits, plain["input_ids"], plain["reply_mask"])
        logits = model(**packed_model_inputs(packed)).logits
        got = packed_sequence_log_probs(logits, packed["packed_source"], packed["input_ids"], packed["reply_mask"])
    assert torch.equal(packed["reply_mask"], plain["reply_mask"])
    assert (got - expected).abs().max() < 1e-4, (got, expected)
    assert expected.abs().min() > 1.0  # real sums of several tokens' log-probs, not zeros


def test_shared_prompt_batches_are_grouped_by_the_packed_width(tokenizer):
    from training.utils.data.pair_packing import packed_widths
    from training.utils.data.samplers import LengthGroupedSampler
    from training.utils.model.reward_model import create_reward_model

    # prompt + chosen + rejected - shared prefix: 6 + 5 - 3, 4 + 7 - 4, 3 + 3 - 3, 8 + 2 - 0
    assert packed_widths(items()).tolist() == [8, 7, 3, 10]
    sampler = LengthGroupedSampler([6, 7, 3, 8], batch_size=2, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(items(), batch_size=2, sampler=sampler, collate_fn=PairCollator(1))
    assert share_prompts([loader], create_reward_model("tiny/opt", tokenizer).backbone, 1, torch.float32)
    assert loader.sampler.lengths.tolist() == [8, 7, 3, 10]
    # grouped by packed width: the two widest rows (8 and 10) share a batch, so the narrow ones pad less
    assert sorted(sorted(batch) for batch in sampler.rank_batches()) == [[0, 3], [1, 2]]
