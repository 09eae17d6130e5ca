"""Step 2 alternative, DPO: the reply mask, policy == reference, the cached reference log-probs, learning on the
built-in copy pairs, reload of the saved policy, the same run with and without the cache, two-rank ZeRO-3 with an
offloaded reference, bad input. The loss math on hand-worked numbers is in test_losses.py."""
import argparse
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, assert_ok, read_metrics, run_script, write_jsonl

from training.utils.data.chat_format import PromptFormat
from training.utils.data.collators import PairCollator
from training.utils.data.pipeline import PHASE_REWARD, DataConfig, build_phase_data, make_loader, tokenise_pairs
from training.utils.data.sources import Sample
from training.utils.errors import UserInputError
from training.utils.losses import sequence_log_probs

DPO_DIR = REPO / "training" / "step2_dpo_finetuning"
COPY = "synthetic/copy:size=800,eval_size=200"
SMALL = "synthetic/copy:size=200,eval_size=40"
LOG2 = math.log(2.0)


def dpo_args(tmp_path, output, *extra, data=COPY) -> list[str]:
    return ["main.py", "--model_name_or_path", "tiny/opt", "--data_path", data, "--data_split", "1,8,1",
            "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(output),
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_seq_len", "96",
            "--learning_rate", "1e-3", "--num_warmup_steps", "10", "--dtype", "fp32", "--dropout", "0.0", *extra]


def eval_rows(output) -> list[dict]:
    return [row for row in read_metrics(output) if "eval/loss" in row]


def loss_settings(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**({"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"} | overrides))


def seeded_tiny_model(tokenizer, seed: int = 1234):
    """tiny/opt exactly as main.py builds the policy and the reference (seeded right before)."""
    from training.utils import seeding
    from training.utils.model.build import create_hf_model

    seeding.set_random_seed(seed)
    return create_hf_model("tiny/opt", tokenizer).eval()


def eval_loader(tmp_path, tokenizer, data=COPY, batch_size=32):
    """The eval split main.py used (the cache it built is found again by its key)."""
    config = DataConfig(data_path=(data,), data_split="1,8,1", data_output_path=str(tmp_path / "cache"), max_seq_len=96)
    data = build_phase_data(config, PromptFormat(tokenizer), PHASE_REWARD)
    return make_loader(data.eval, batch_size, PairCollator(tokenizer.pad_token_id), seed=1234, shuffle=False)


# ---------------------------------------------------------------- the math


def test_reply_log_prob_sums_reply_and_eos_only_with_right_padding(tokenizer):
    rows = [Sample(prompt="\n\nHuman: Repeat: 1 2 3 4\n\nAssistant:", chosen=" 1 2 3 4", rejected=" 1 2 4"),
            Sample(prompt="\n\nHuman: a much longer question, so the rows differ in length\n\nAssistant:",
                   chosen=" yes", rejected=" no, and then it goes on and on")]
    dataset, _ = tokenise_pairs(rows, PromptFormat(tokenizer), DataConfig(data_path=()))
    batch = PairCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    ids, mask, reply = batch["input_ids"], batch["attention_mask"], batch["reply_mask"]
    assert ids.shape == reply.shape and (mask == 0).any()  # right padding present
    eos = tokenizer.eos_token_id
    replies = [r.chosen for r in rows] + [r.rejected for r in rows]
    for row, text in enumerate(replies):  # exactly the reply's tokens and its EOS, at the end of the real tokens
        assert ids[row][reply[row] == 1].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        last = int(mask[row].sum()) - 1
        assert reply[row, last] == 1 and reply[row, last + 1:].sum() == 0 and reply[row, 0] == 0

    torch.manual_seed(0)
    logits = torch.randn(ids.size(0), ids.size(1), 50) * 3
    ids_small = ids % 50  # any ids work for the arithmetic; keep the vocabulary small
    expected = torch.zeros(ids.size(0))
    for b in range(ids.size(0)):
        for t in range(1, ids.size(1)):
            if reply[b, t]:
                expected[b] += torch.log_softmax(logits[b, t - 1], dim=-1)[ids_small[b, t]]
    got = sequence_log_probs(logits, ids_small, reply)
    assert torch.allclose(got, expected, atol=1e-5)
    # logits that predict prompt or pad tokens do not count, whatever they are
    unused = torch.ones_like(reply, dtype=torch.bool)
    unused[:, :-1] = reply[:, 1:] == 0
    noisy = logits + 100.0 * torch.randn_like(logits) * unused.unsqueeze(-1)
    assert torch.allclose(sequence_log_probs(noisy, ids_small, reply), expected, atol=1e-5)


def test_truncated_prompt_keeps_the_reply_mask_aligned(tokenizer):
    long_prompt = "\n\nHuman: " + " ".join(["word"] * 60) + "\n\nAssistant:"
    dataset, counts = tokenise_pairs([Sample(prompt=long_prompt, chosen=" short", rejected=" other")],
                                     PromptFormat(tokenizer), DataConfig(data_path=(), max_seq_len=16))
    item = dataset[0]
    assert counts["prompt_truncated"] == 1 and len(item["chosen_ids"]) == len(item["chosen_reply_mask"]) == 16
    reply_ids = tokenizer(" short", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["chosen_reply_mask"] == [0] * (16 - len(reply_ids)) + [1] * len(reply_ids)
    assert item["chosen_ids"][-len(reply_ids):] == reply_ids


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(tokenizer):
    """Through the recipe's own forward path: real models, a padded pair batch, the reply masks."""
    from training.step2_dpo_finetuning.main import preference_loss

    rows = [Sample(prompt=f"\n\nHuman: Repeat: {i} 2 7\n\nAssistant:", chosen=f" {i} 2 7", rejected=f" {i} 7")
            for i in range(4)] + [Sample(prompt="\n\nHuman: hello there\n\nAssistant:", chosen=" hi", rejected=" go")]
    dataset, _ = tokenise_pairs(rows, PromptFormat(tokenizer), DataConfig(data_path=()))
    batch = PairCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    policy, reference = seeded_tiny_model(tokenizer), seeded_tiny_model(tokenizer)
    with torch.no_grad():
        losses, chosen, rejected, logp_margin = preference_loss(policy, reference, batch, loss_settings())
        ipo, _, _, _ = preference_loss(policy, reference, batch, loss_settings(loss_type="ipo"))
    assert torch.allclose(losses, torch.full((5,), LOG2), atol=1e-6)
    assert torch.equal(chosen, torch.zeros(5)) and torch.equal(rejected, torch.zeros(5))
    assert torch.allclose(ipo, torch.full((5,), 25.0))  # (0 - 1 / (2 * 0.1))^2
    assert (logp_margin != 0).all()  # the policy itself does prefer one reply: only the ratio is neutral

    # a padded row scores as it does alone: padding never leaks into a reply's log-prob
    from training.step2_dpo_finetuning.main import reply_log_probs

    alone = PairCollator(tokenizer.pad_token_id)([dataset[4]])
    with torch.no_grad():
        padded_logps, alone_logps = reply_log_probs(policy, batch), reply_log_probs(policy, alone)
    assert torch.allclose(padded_logps[[4, 9]], alone_logps, atol=1e-4)


def test_cached_reference_log_probs_equal_a_reference_forward_per_batch(tmp_path, tokenizer):
    """The one pass before training gives what running the reference on each batch gives: bitwise in the batches
    it scored (the eval loader's own, the train split's length-grouped pass), and in the differently padded
    training batches up to fp32 rounding (a sum of about -500 has a last bit of 6e-5). Evaluation reading the
    cache equals evaluation running the reference, and the indexed loader yields the plain loader's batches."""
    from training.step2_dpo_finetuning.main import cache_reference_log_probs, evaluate, reply_log_probs
    from training.utils.reference_cache import IndexedCollator, IndexedDataset, with_sample_index

    config = DataConfig(data_path=(SMALL,), data_split="1,8,1", data_output_path=str(tmp_path / "cache"),
                        max_seq_len=96)
    data = build_phase_data(config, PromptFormat(tokenizer), PHASE_REWARD)
    collator, cpu = PairCollator(tokenizer.pad_token_id), torch.device("cpu")
    plain_train = make_loader(data.train, 16, collator, seed=1234, shuffle=True, length_grouped=True)
    train_loader = with_sample_index(plain_train)
    eval_loader = with_sample_index(make_loader(data.eval, 32, collator, seed=1234, shuffle=False,
                                                length_grouped=True))
    reference = seeded_tiny_model(tokenizer)
    settings = argparse.Namespace(per_device_eval_batch_size=32, seed=1234)
    train_ref, eval_ref = cache_reference_log_probs(reference, data, eval_loader, collator, settings, cpu)
    assert train_ref.table.shape == (len(data.train), 2) and eval_ref.table.shape == (len(data.eval), 2)
    assert train_ref.table.dtype == eval_ref.table.dtype == torch.float32
    assert train_ref.nbytes == 8 * len(data.train)

    # the indexed loader: the plain loader's batches, plus each row's dataset position
    for plain, indexed in zip(plain_train, train_loader, strict=True):
        assert indexed.keys() == plain.keys() | {"index"}
        assert all(torch.equal(plain[k], indexed[k]) for k in plain)
        first = data.train[int(indexed["index"][0])]["chosen_ids"]
        assert indexed["input_ids"][0, :len(first)].tolist() == first

    train_pass = make_loader(IndexedDataset(data.train), 32, IndexedCollator(collator), seed=1234, shuffle=False,
                             length_grouped=True)
    with torch.no_grad():
        for cached, loader in ((eval_ref, eval_loader), (train_ref, train_pass)):
            for batch in loader:
                assert torch.equal(cached(batch), reply_log_probs(reference, batch))
        seen = set()
        for epoch in (0, 1):
            train_loader.sampler.set_epoch(epoch)
            for batch in train_loader:
                torch.testing.assert_close(train_ref(batch), reply_log_probs(reference, batch), rtol=1e-6, atol=1e-6)
                seen |= set(batch["index"].tolist())
    assert seen == set(range(len(data.train)))

    policy = seeded_tiny_model(tokenizer, seed=99)  # another model, so the rewards are not all 0
    cached_stats = evaluate(policy, eval_ref, eval_loader, cpu, loss_settings())
    assert cached_stats == evaluate(policy, reference, eval_loader, cpu, loss_settings())
    assert cached_stats["pairs"] == len(data.eval) and cached_stats["chosen_reward"] != 0


def test_bad_flags_are_refused():
    from training.step2_dpo_finetuning.main import parse_args
    from training.utils.config import flag_values

    base = ["--model_name_or_path", "tiny/opt", "--output_dir", "out"]
    for extra, message in ((["--loss_type", "ipo", "--label_smoothing", "0.1"], "sigmoid only"),
                           (["--beta", "0"], "--beta"), (["--label_smoothing", "0.5"], "--label_smoothing")):
        with pytest.raises(UserInputError, match=message):
            parse_args(base + extra)
    args = parse_args(base)
    defaults = (args.beta, args.label_smoothing, args.loss_type, args.offload_reference_model,
                args.model.learning_rate)
    assert defaults == (0.1, 0.0, "sigmoid", False, 1e-3)  # DeepSpeed-Chat's DPO defaults
    assert args.precompute_ref_log_probs and not parse_args(base + ["--no_precompute_ref_log_probs"]
                                                            ).precompute_ref_log_probs
    assert "sft_only_data_path" not in flag_values(args)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_policy(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dpo")
    output = tmp_path / "policy"
    # One thread: the tiny model gains little from a second one, and on a busy machine spinning OpenMP
    # threads make the run several times slower.
    result = run_script(DPO_DIR, dpo_args(tmp_path, output, "--eval_interval", "15", "--enable_tensorboard",
                                          "--tensorboard_path", str(tmp_path / "tb")), OMP_NUM_THREADS="1")
    assert_ok(result)
    return tmp_path, output, result


def test_dpo_raises_held_out_reward_accuracy_and_log_prob_margin(trained_policy):
    tmp_path, output, result = trained_policy
    rows = eval_rows(output)
    before, after = rows[0], rows[-1]
    assert len(rows) == 4  # before training, steps 15 and 30, after the epoch (40 steps)
    # policy == reference before training, through the whole recipe: loss log 2, rewards 0, ties (0.5)
    assert before["eval/loss"] == pytest.approx(LOG2, abs=1e-6)
    assert before["eval/chosen_reward"] == before["eval/rejected_reward"] == 0.0
    assert before["eval/reward_accuracy"] == 0.5
    assert after["eval/reward_accuracy"] >= 0.7, after
    assert after["eval/loss"] < LOG2 - 0.2 and after["eval/reward_margin"] > 1.0, after
    assert after["eval/logp_margin"] > before["eval/logp_margin"] + 10.0, (before, after)
    assert result.stdout.count("epoch 1/1: train loss") == 1 and "reward accuracy" in result.stdout
    assert os.listdir(tmp_path / "tb" / "step2_dpo_model")  # TensorBoard events were written


def test_saved_policy_reloads_and_reproduces_the_final_evaluation(trained_policy, tokenizer):
    """The reloaded directory scores the eval split exactly as the trained policy did in the run."""
    from training.step2_dpo_finetuning.main import evaluate

    tmp_path, output, _ = trained_policy
    assert not any(name.endswith(".bin") for name in os.listdir(output))
    policy = AutoModelForCausalLM.from_pretrained(output, local_files_only=True)
    stats = evaluate(policy, seeded_tiny_model(tokenizer), eval_loader(tmp_path, tokenizer), torch.device("cpu"),
                     loss_settings())
    final = eval_rows(output)[-1]
    for name in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "logp_margin", "reward_accuracy"):
        assert stats[name] == pytest.approx(final[f"eval/{name}"], rel=1e-4, abs=1e-4), name
    assert stats["logp_margin"] > 0


def test_two_ranks_zero3_with_offloaded_reference(tmp_path, tokenizer):
    data = "synthetic/copy:size=200,eval_size=40"
    output = tmp_path / "policy"
    args = dpo_args(tmp_path, output, "--zero_stage", "3", "--offload_reference_model",
                    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", data=data)
    result = run_script(DPO_DIR, args, num_ranks=2)
    assert_ok(result)
    assert result.stdout.count("the reference model's parameters live in CPU memory") == 1
    before, after = eval_rows(output)[0], eval_rows(output)[-1]
    assert before["eval/loss"] == pytest.approx(LOG2, abs=1e-6)  # ZeRO-3 builds policy and reference alike
    assert after["eval/logp_margin"] > before["eval/logp_margin"]
    # the gathered ZeRO-3 save is the trained policy: its log-prob margin on the eval split is the logged one
    from training.step2_dpo_finetuning.main import reply_log_probs

    policy = AutoModelForCausalLM.from_pretrained(output, local_files_only=True).eval()
    margins = []
    with torch.no_grad():
        for batch in eval_loader(tmp_path, tokenizer, data, batch_size=8):
            chosen, rejected = reply_log_probs(policy, batch).chunk(2)
            margins.append(chosen - rejected)
    assert torch.cat(margins).mean().item() == pytest.approx(after["eval/logp_margin"], rel=1e-4)


def test_cached_reference_log_probs_give_the_run_of_a_reference_forward_per_step(tmp_path):
    """fp32, 10 steps: every evaluation with the reference's log-probs cached (the default) matches the run that
    keeps the reference and runs it on every batch."""
    logs = {}
    for name, extra in (("cached", ()), ("per_step", ("--no_precompute_ref_log_probs",))):
        result = run_script(DPO_DIR, dpo_args(tmp_path, tmp_path / name, "--num_warmup_steps", "2", "--eval_interval",
                                              "5", *extra, data=SMALL), OMP_NUM_THREADS="1")
        assert_ok(result)
        logs[name] = result.stdout
    assert logs["cached"].count("reference log-probs cached in") == 1
    assert "160 train + 32 eval pairs" in logs["cached"] and "reference log-probs" not in logs["per_step"]
    cached, per_step = eval_rows(tmp_path / "cached"), eval_rows(tmp_path / "per_step")
    assert len(cached) == len(per_step) == 4  # before training, steps 5 and 10, after the epoch
    assert cached[0]["eval/loss"] == pytest.approx(LOG2, abs=1e-6) and cached[0]["eval/chosen_reward"] == 0.0
    for with_cache, without in zip(cached, per_step):
        assert with_cache.keys() == without.keys()
        for name, value in without.items():
            assert with_cache[name] == pytest.approx(value, rel=0, abs=1e-4), (name, with_cache, without)
    assert cached[-1]["eval/loss"] < LOG2 - 0.1  # it did learn


def test_pairs_without_rejected_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "response": f" a{i}"} for i in range(50)])
    output = tmp_path / "policy"
    result = run_script(DPO_DIR, dpo_args(tmp_path, output, data=str(data)), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable phase-2 training rows" in errors[0], result.stderr[-2000:]
    assert not output.exists()
