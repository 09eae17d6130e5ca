"""Step 3 (PPO): the experience layout, learning on the synthetic task, the variants, two ranks under ZeRO-3.

One short step-1 and step-2 run on `synthetic/copy` is shared by every test of the module.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, STEP1_DIR, assert_ok, read_metrics, run_script, write_jsonl

STEP2_DIR = REPO / "training" / "step2_reward_model_finetuning"
STEP3_DIR = REPO / "training" / "step3_rlhf_finetuning"
# Phase 1: 3200 demonstrations, 2: 3200 pairs, 3: 1600 prompts. No rambling rejected replies: the pairs stay
# short (a fast reward model), and the SFT actor stops anyway.
TASK = "synthetic/copy:size=8000,eval_size=400,ramble_share=0.0"
SPLIT = "4,4,2"


@pytest.fixture(scope="module")
def sft_and_reward(tmp_path_factory):
    """(workdir, SFT actor, reward model) from short step-1 and step-2 runs on the copy task. A quarter of the
    demonstrations are near misses (a digit dropped, added or repeated), so the SFT actor's sampled answers
    are right less than half the time; the reward model ranks the held-out pairs right (>= 95%)."""
    work = tmp_path_factory.mktemp("step3")
    # fp32 random batches: the learning thresholds below were calibrated on that order (length-grouped batches
    # give a stronger SFT actor, with less headroom for PPO); the grouped default runs in the other step-3 tests.
    common = ["--data_path", TASK, "--data_split", SPLIT, "--data_output_path", str(work / "cache"), "--dtype", "fp32",
              "--dropout", "0.0", "--num_warmup_steps", "10", "--no_group_by_length"]
    actor, reward = work / "sft", work / "reward"
    assert_ok(run_script(STEP1_DIR, ["main.py", "--model_name_or_path", "tiny/opt", "--output_dir", str(actor),
                                     "--per_device_train_batch_size", "16", "--max_seq_len", "64",
                                     "--learning_rate", "1e-3", *common]))
    assert_ok(run_script(STEP2_DIR, ["main.py", "--model_name_or_path", str(actor), "--output_dir", str(reward),
                                     "--per_device_train_batch_size", "16", "--max_seq_len", "64",
                                     "--learning_rate", "3e-4", "--eval_iters", "0", *common]))
    assert json.loads((reward / "reward_model.json").read_text())["reward_stats"]["accuracy"] >= 0.95
    return work, actor, reward


def ppo_args(work, actor, reward, output, *extra) -> list[str]:
    return ["main.py", "--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(reward),
            "--data_path", TASK, "--data_split", SPLIT, "--data_output_path", str(work / "cache"),
            "--output_dir", str(output), "--per_device_generation_batch_size", "16",
            "--per_device_training_batch_size", "16", "--max_prompt_seq_len", "32", "--max_answer_seq_len", "16",
            "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-4", "--num_warmup_steps", "0",
            "--actor_dropout", "0.0", "--critic_dropout", "0.0", "--dtype", "fp32", "--eval_prompts", "32", *extra]


def ppo_learning_args(work, actor, reward, output, *extra) -> list[str]:
    """The calibrated learning run: random prompt batches, as the actor and reward model were trained."""
    return ppo_args(work, actor, reward, output, "--no_group_by_length", *extra)


# ---------------------------------------------------------------- the experience layout, in process

def test_answer_lengths_stop_at_the_first_eos_even_when_pad_is_eos():
    from training.utils.masks import answer_lengths, mask_from_lengths

    eos = pad = 0
    answers = torch.tensor([[5, 6, eos, pad, pad],   # EOS, then pad that looks like EOS
                            [eos, pad, pad, pad, pad],  # a 1-token answer: just EOS
                            [5, 6, 7, 8, 9]])  # cut at the limit, no EOS
    lengths, ended = answer_lengths(answers, eos)
    assert lengths.tolist() == [3, 1, 5] and ended.tolist() == [True, True, False]
    assert mask_from_lengths(lengths, 5).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_capped_prompts_truncate_from_the_left_or_drop():
    from training.utils.data.pipeline import RaggedDataset
    from training.utils.errors import UserInputError
    from training.utils.rlhf.experience import CappedPrompts

    data = RaggedDataset({"prompt_ids": [[1, 2, 3], [9, 4, 5, 6, 7, 8], [7]]})
    truncated = CappedPrompts(data, 4, "truncate")
    assert [truncated[i]["prompt_ids"] for i in range(len(truncated))] == [[1, 2, 3], [5, 6, 7, 8], [7]]
    assert truncated.counts == {"prompts": 3, "over_max_prompt_seq_len": 1, "truncated": 1}
    assert CappedPrompts(data, 4, "truncate", bos_token_id=9)[1]["prompt_ids"] == [9, 6, 7, 8]  # BOS kept
    dropped = CappedPrompts(data, 4, "drop")
    assert [dropped[i]["prompt_ids"] for i in range(len(dropped))] == [[1, 2, 3], [7]]
    assert dropped.counts["dropped"] == 1
    with pytest.raises(UserInputError, match="max_prompt_seq_len"):
        CappedPrompts(RaggedDataset({"prompt_ids": [[1, 2, 3]]}), 2, "drop")


def test_experience_buffer_recuts_generation_batches_into_training_batches():
    from training.utils.rlhf.experience import Experience, ExperienceBuffer

    def batch(prompt_lengths, answer_lengths, offset):
        rows = []
        for i, (p, a) in enumerate(zip(prompt_lengths, answer_lengths)):
            values = torch.arange(a, dtype=torch.float32) + 10 * (offset + i)
            rows.append({"prompt_ids": torch.full((p,), 3 + offset + i), "answer_ids": torch.full((a,), 50 + i),
                         "log_probs": -values, "values": values, "advantages": values, "returns": values + 1})
        return Experience.from_rows(rows, pad_token_id=1)

    buffer = ExperienceBuffer(capacity=2, whiten=True, pad_token_id=1, seed=0)
    buffer.add(batch([2, 4, 1], [3, 1, 2], 0))
    assert not buffer.full
    buffer.add(batch([3, 2, 2], [1, 4, 2], 3))
    assert buffer.full and len(buffer.rows) == 6
    minibatches = buffer.minibatches(4)
    assert [m.prompt_ids.size(0) for m in minibatches] == [4, 2]
    tokens = torch.cat([m.advantages[m.action_mask == 1] for m in minibatches])
    assert tokens.numel() == 13 and abs(tokens.mean().item()) < 1e-5
    assert abs(tokens.std(unbiased=False).item() - 1) < 1e-3
    for m in minibatches:
        assert (m.prompt_mask.sum(1) == (m.prompt_ids != 1).sum(1)).all()  # prompts left-padded, none cut
        assert (m.prompt_mask[:, -1] == 1).all()
        assert (m.action_mask[:, 0] == 1).all() and (m.advantages[m.action_mask == 0] == 0).all()
        assert torch.equal(m.returns - m.values, m.action_mask.float())  # per-token entries stay aligned


@pytest.fixture(scope="module")
def in_process_engine(sft_and_reward, distributed):
    """The RLHF engine and trainer built in this process from the step-3 flags, with pad set equal to EOS."""
    from training.step3_rlhf_finetuning.main import parse_args
    from training.utils import seeding
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.ppo_trainer import PPOTrainer
    from training.utils.tokenizer import load_tokenizer

    work, actor, reward = sft_and_reward
    args = parse_args(ppo_args(work, actor, reward, work / "unused")[1:] + ["--enable_ema"])
    tokenizer = load_tokenizer(str(actor))
    seeding.set_random_seed(0)
    engine = build_rlhf_engine(args, tokenizer, torch.device("cpu"), 1000, 1000)
    tokenizer.pad_token = tokenizer.eos_token  # the reference's convention: pad == EOS
    return PPOTrainer(engine, args), tokenizer


def test_experience_keeps_eos_in_the_action_mask_when_pad_equals_eos(in_process_engine):
    from training.utils.data.collators import PromptCollator
    from training.utils.data.conversation import encode_chunks, prompt_chunks

    trainer, tokenizer = in_process_engine
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    prompts = ["\n\nHuman: Repeat: 4 8 1 9\n\nAssistant:", "\n\nHuman: Repeat: 2 0\n\nAssistant:",
               "\n\nHuman: Please repeat: 7 7 7 1\n\nAssistant:"]
    batch = PromptCollator(tokenizer.pad_token_id)([{"prompt_ids": encode_chunks(tokenizer, prompt_chunks(p))[0]}
                                                     for p in prompts])
    torch.manual_seed(0)
    experience, rollout = trainer.generate_experience(batch)
    eos = tokenizer.eos_token_id
    assert rollout.ended.sum() >= 2, "the SFT actor ends its answers"
    for b, length in enumerate(rollout.lengths.tolist()):
        mask = experience.action_mask[b]
        assert mask[:length].all() and not mask[length:].any()
        assert (experience.answer_ids[b, :length - 1] != eos).all()
        if rollout.ended[b]:
            assert experience.answer_ids[b, length - 1] == eos and mask[length - 1] == 1  # EOS is an action
        else:
            assert length == experience.answer_ids.size(1)
        # nothing after the answer carries a return or advantage (no off-by-one at the end)
        assert (experience.returns[b, length:] == 0).all() and (experience.advantages[b, length:] == 0).all()
        assert experience.returns[b, length - 1] != 0
    assert (experience.prompt_mask.sum(1) < experience.prompt_ids.size(1)).any()  # left padding present
    assert torch.isfinite(experience.log_probs).all() and (experience.log_probs[experience.action_mask == 0] == 0).all()

    # Scoring used the training forward: a PPO update on the same batch starts at ratio 1 exactly.
    stats = trainer.train_rlhf(experience)
    assert stats["approx_kl"] < 1e-6 and stats["clip_fraction"] == 0.0
    assert all(map(torch.isfinite, map(torch.tensor, stats.values())))


def test_align_overflow_keeps_both_models_when_one_overflows(in_process_engine, monkeypatch):
    """fp16 overflow cannot happen on CPU, so the overflow verdict is forced: the critic "overflowed", and
    the actor, which did not, must not move either."""
    from training.utils.data.collators import PromptCollator
    from training.utils.data.conversation import encode_chunks, prompt_chunks
    from training.utils.rlhf import ppo_trainer

    trainer, tokenizer = in_process_engine
    actor, critic = trainer.engine.actor, trainer.engine.critic
    batch = PromptCollator(tokenizer.pad_token_id)([{"prompt_ids": encode_chunks(
        tokenizer, prompt_chunks("\n\nHuman: Repeat: 1 2 3 4\n\nAssistant:"))[0]}] * 2)
    experience, _ = trainer.generate_experience(batch)
    monkeypatch.setattr(trainer.config, "align_overflow", True)
    for engine in (actor, critic):
        monkeypatch.setattr(engine, "fp16_enabled", lambda: True)
    monkeypatch.setattr(ppo_trainer, "gradients_overflowed", lambda engine: engine is critic)
    before = [p.detach().clone() for p in list(actor.module.parameters()) + list(critic.module.parameters())]
    stats = trainer.train_rlhf(experience)
    after = list(actor.module.parameters()) + list(critic.module.parameters())
    assert stats["skipped_step"] == 1.0
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    for engine in (actor, critic):  # the learning rates follow the schedule again
        assert [g["lr"] for g in engine.optimizer.param_groups] == engine.lr_scheduler.get_last_lr()
    monkeypatch.setattr(ppo_trainer, "gradients_overflowed", lambda engine: False)
    assert trainer.train_rlhf(experience)["skipped_step"] == 0.0
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_ema_tracks_the_actor_with_beta(in_process_engine):
    trainer, _ = in_process_engine
    actor = dict(trainer.engine.actor.module.named_parameters())
    name, ema = next((n, p) for n, p in trainer.engine.actor_ema.module.named_parameters()
                     if n.endswith("q_proj.weight"))
    before = ema.detach().clone()
    trainer.update_ema()
    expected = 0.992 * before + 0.008 * actor[name].detach()
    assert torch.allclose(ema, expected, atol=1e-7)


# ---------------------------------------------------------------- learning

def test_ppo_raises_held_out_reward_and_accuracy_over_the_sft_actor(sft_and_reward):
    work, actor, reward = sft_and_reward
    output = work / "ppo"
    result = run_script(STEP3_DIR, ppo_learning_args(
        work, actor, reward, output, "--per_device_generation_batch_size", "32", "--per_device_training_batch_size",
        "32", "--eval_prompts", "80", "--enable_test_mode", "--test_stop_step", "24", "--enable_tensorboard",
        "--tensorboard_path", str(work / "tb")))
    assert_ok(result)
    rows = read_metrics(output / "actor")
    evals = [row for row in rows if "eval/accuracy" in row]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 24)
    # Seeded, and both evaluations sample with the same seed. PPO raises what it optimises, the held-out reward:
    # measured +2.9 -> +6.3 (seed 1234) and +3.2 -> +6.5 (seed 1). The checker's accuracy on 80 sampled answers
    # moves within its noise in 24 steps (0.46 -> 0.41 and 0.46 -> 0.51): the reward model sees length mistakes,
    # not substituted digits. The 100-step quality run (docs/quality.md) shows the accuracy gain, 0.60 -> 0.85.
    assert after["eval/reward_mean"] >= before["eval/reward_mean"] + 2.0, (before, after)
    assert after["eval/accuracy"] >= before["eval/accuracy"] - 0.1, (before, after)
    steps = [row for row in rows if "kl/to_reference" in row]
    assert len(steps) == 24 and all(math.isfinite(row["kl/to_reference"]) for row in steps)
    assert 0 < max(row["kl/to_reference"] for row in steps) < 5
    for name in ("reward/std", "answer/length", "answer/eos_rate", "loss/actor", "loss/critic", "ppo/clip_fraction",
                 "ppo/approx_kl", "ppo/entropy", "time/generation_s", "time/experience_s", "time/training_s",
                 "throughput/samples_per_s"):
        assert all(math.isfinite(row[name]) for row in steps), name
    assert "step 24 | reward" in result.stdout and "eval after step 24: reward" in result.stdout
    assert "scoring: old log-probs and values from the first update's forward" in result.stdout
    assert list((work / "tb" / "step3_rlhf").iterdir())  # TensorBoard events
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(output / "actor", local_files_only=True)  # a plain HF model directory


# ---------------------------------------------------------------- variants, a few steps each

@pytest.fixture(scope="module")
def ema_epochs_run(sft_and_reward):
    """EMA + 2 PPO epochs over 2 generation batches of 8 prompts, trained in mini-batches of 6, with the
    Hybrid Engine flag on a CPU (it must fall back to Hugging Face generate and still train)."""
    work, actor, reward = sft_and_reward
    output = work / "ppo_ema"
    result = run_script(STEP3_DIR, ppo_args(work, actor, reward, output, "--enable_ema", "--ppo_epochs", "2",
                                            "--generation_batches", "2", "--per_device_generation_batch_size", "8",
                                            "--per_device_training_batch_size", "6", "--enable_hybrid_engine",
                                            "--enable_test_mode", "--test_stop_step", "2"))
    assert_ok(result)
    return actor, output, result


def test_ppo_epochs_and_generation_batches_train_in_minibatches(ema_epochs_run):
    actor, output, result = ema_epochs_run
    steps = [row for row in read_metrics(output / "actor") if "ppo/approx_kl" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        # 16 answers re-cut into mini-batches of 6, two passes: later mini-batches see a moved policy
        assert 0 < row["ppo/approx_kl"] < 0.5 and 0 <= row["ppo/clip_fraction"] < 1, row
        assert all(math.isfinite(value) for value in row.values())
    assert "step 2 | reward" in result.stdout and "samples/s" in result.stdout
    sft, trained = load_file(str(actor / "model.safetensors")), load_file(str(output / "actor" / "model.safetensors"))
    assert any(not torch.equal(sft[k], trained[k]) for k in sft)


def test_hybrid_engine_flag_on_cpu_falls_back_once_and_trains(ema_epochs_run):
    _, _, result = ema_epochs_run
    assert result.stdout.count("Hybrid Engine: DeepSpeed has no inference kernels on cpu") == 1
    assert ("scoring: old log-probs and values in passes of their own (--generation_batches 2: a mini-batch mixes "
            "generation batches; 8 rows per generation batch in mini-batches of --per_device_training_batch_size 6)"
            in result.stdout)


def test_ema_differs_from_the_sft_and_the_actor_and_lags_behind(ema_epochs_run):
    actor, output, _ = ema_epochs_run
    sft = load_file(str(actor / "model.safetensors"))
    trained = load_file(str(output / "actor" / "model.safetensors"))
    ema = load_file(str(output / "actor_ema" / "model.safetensors"))
    moved = {k: (trained[k] - sft[k]).norm().item() for k in sft}
    lag = {k: (ema[k] - sft[k]).norm().item() for k in sft}
    changed = [k for k in sft if moved[k] > 0]
    assert changed and all(0 < lag[k] < moved[k] for k in changed)
    assert any(not torch.equal(ema[k], trained[k]) for k in changed)


PRETRAINING_TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while {i} small birds sing in the old tree "
    f"near the river, and the farmer counts {i + 1} sheep before the sun goes down." for i in range(60))


def test_lora_actor_and_critic_with_ppo_ptx(sft_and_reward):
    from training.utils.model.reward_model import load_reward_model

    work, actor, reward = sft_and_reward
    text = work / "pretraining.txt"
    text.write_text(PRETRAINING_TEXT, encoding="utf-8")
    output = work / "ppo_lora_ptx"
    assert_ok(run_script(STEP3_DIR, ppo_args(
        work, actor, reward, output, "--actor_lora_dim", "4", "--critic_lora_dim", "4", "--actor_lora_module_name",
        "layers.", "--critic_lora_module_name", "layers.", "--only_optimize_lora", "--actor_lora_learning_rate", "1e-3",
        "--critic_lora_learning_rate", "1e-3", "--unsupervised_dataset_name", str(text), "--unsup_coef", "1.0",
        "--actor_gradient_checkpointing", "--critic_gradient_checkpointing", "--enable_test_mode",
        "--test_stop_step", "2")))
    rows = [row for row in read_metrics(output / "actor") if "loss/unsupervised" in row]
    assert len(rows) == 2 and all(0 < row["loss/unsupervised"] < 20 for row in rows)
    sft, trained = load_file(str(actor / "model.safetensors")), load_file(str(output / "actor" / "model.safetensors"))
    assert sft.keys() == trained.keys()  # LoRA folded into plain weights
    frozen = [k for k in sft if "embed" in k or "layer_norm" in k]
    adapted = [k for k in sft if k.endswith(("q_proj.weight", "fc1.weight"))]
    assert frozen and all(torch.equal(sft[k], trained[k]) for k in frozen)
    assert adapted and all(not torch.equal(sft[k], trained[k]) for k in adapted)
    # the critic is saved in the reward-model format and loads as one; its backbone moved by LoRA only
    _, _, meta = load_reward_model(str(output / "critic"))
    assert meta["reward_stats"] == {}
    rm_body = load_file(str(reward / "model.safetensors"))
    critic_body = load_file(str(output / "critic" / "model.safetensors"))
    assert all(torch.equal(rm_body[k], critic_body[k]) for k in rm_body if "embed" in k)
    assert any(not torch.equal(rm_body[k], critic_body[k]) for k in rm_body if k.endswith("q_proj.weight"))


# ---------------------------------------------------------------- two ranks, ZeRO-3

SHORT_PROMPT, LONG_PROMPT = "Say yes", "Count up"
LONG_ANSWER = " " + " ".join(["go"] * 40)


def test_two_ranks_zero3_when_one_rank_stops_early(tmp_path):
    """Each rank gets one of two prompts: one answered by ' yes' + EOS, the other by ' go go ...' that runs
    past --max_answer_seq_len. With synced_gpus the early rank keeps joining the ZeRO-3 forward passes
    of the other until both are done; without it this hangs."""
    from transformers import AutoModelForCausalLM

    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.tokenizer import load_tokenizer

    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": SHORT_PROMPT, "response": " yes"},
                                                    {"prompt": LONG_PROMPT, "response": LONG_ANSWER}] * 60)
    actor, reward, output = tmp_path / "sft", tmp_path / "reward", tmp_path / "ppo"
    assert_ok(run_script(STEP1_DIR, ["main.py", "--model_name_or_path", "tiny/opt", "--data_path", str(sft_data),
                                     "--data_split", "1,0,0", "--data_output_path", str(tmp_path / "cache"),
                                     "--output_dir", str(actor), "--per_device_train_batch_size", "8",
                                     "--max_seq_len", "128", "--learning_rate", "3e-3", "--num_warmup_steps", "2",
                                     "--num_train_epochs", "8",
                                     "--dtype", "fp32", "--dropout", "0.0"]))
    tokenizer = load_tokenizer(str(actor))

    def stops_within(model, prompt: str, tokens: int) -> bool:
        ids = tokenizer(f"\n\nHuman: {prompt}\n\nAssistant:", return_tensors="pt")
        reply = model.generate(**ids, max_new_tokens=tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].size(1):]
        return tokenizer.eos_token_id in reply.tolist()

    sft_model = AutoModelForCausalLM.from_pretrained(actor, local_files_only=True)
    assert stops_within(sft_model, SHORT_PROMPT, 8) and not stops_within(sft_model, LONG_PROMPT, 24)  # precondition
    save_reward_model(create_reward_model(str(actor), tokenizer), tokenizer, str(reward), reward_stats={})
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": SHORT_PROMPT, "response": " yes"},
                                                       {"prompt": LONG_PROMPT, "response": " 1"}])
    args = ["main.py", "--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(reward),
            "--data_path", str(prompts), "--data_split", "0,0,1", "--data_output_path", str(tmp_path / "cache"),
            "--output_dir", str(output), "--per_device_generation_batch_size", "1",
            "--per_device_training_batch_size", "1", "--num_train_epochs", "2", "--max_answer_seq_len", "24",
            "--actor_zero_stage", "3", "--critic_zero_stage", "3", "--actor_learning_rate", "1e-5",
            "--critic_learning_rate", "1e-5", "--temperature", "0", "--num_warmup_steps", "0", "--dtype", "fp32",
            "--actor_dropout", "0.0", "--deepspeed"]
    assert_ok(run_script(STEP3_DIR, args, num_ranks=2, timeout=400))
    steps = [row for row in read_metrics(output / "actor") if "answer/length" in row]
    assert len(steps) == 2
    for row in steps:  # one rank: a short answer + EOS (at most 8 tokens); the other: 24 tokens, no EOS
        assert row["answer/eos_rate"] == 0.5 and 12.5 <= row["answer/length"] <= 16, row
    # the ZeRO-3 actor was gathered whole: it reloads, moved a little from the SFT weights, and still stops early
    sft, saved = load_file(str(actor / "model.safetensors")), load_file(str(output / "actor" / "model.safetensors"))
    assert sft.keys() == saved.keys() and all(v.shape == sft[k].shape for k, v in saved.items())
    assert max((saved[k] - sft[k]).abs().max().item() for k in sft) < 1e-2
    assert any(not torch.equal(saved[k], sft[k]) for k in sft)
    assert stops_within(AutoModelForCausalLM.from_pretrained(output / "actor", local_files_only=True), SHORT_PROMPT, 8)


def test_a_critic_that_is_not_a_reward_model_is_refused_in_one_line(sft_and_reward):
    work, actor, _ = sft_and_reward
    output = work / "refused"
    result = run_script(STEP3_DIR, ppo_args(work, actor, actor, output), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a reward model directory" in errors[0] and "step 2" in errors[0], errors
    assert not output.exists()
