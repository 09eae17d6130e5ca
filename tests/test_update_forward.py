"""PPO's first update gives the old log-probs and values (ppo_trainer.UpdateForward): when a step trains one
mini-batch holding its whole generation batch and neither model has dropout, scoring runs the update's own forward
instead of separate no-grad actor and critic passes. The experience and the update are those of separate passes
(fp32, to float tolerance), with one actor and one critic forward fewer; every other case scores separately."""
from types import SimpleNamespace

import pytest
import torch

from training.utils.rlhf.experience import Experience, ExperienceBuffer
from training.utils.rlhf.ppo_trainer import UpdateForward, update_forward_blockers


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    from training.utils.model.reward_model import create_reward_model, save_reward_model

    path = tmp_path_factory.mktemp("update_forward") / "reward"
    torch.manual_seed(0)
    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(path), reward_stats={})
    return path


def step3_config(reward_dir, *extra):
    from training.step3_rlhf_finetuning.main import parse_args

    return parse_args(["--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path", str(reward_dir),
                       "--data_path", "synthetic/copy", "--output_dir", str(reward_dir.parent / "unused"),
                       "--dtype", "fp32", "--max_answer_seq_len", "10", "--per_device_generation_batch_size", "4",
                       "--per_device_training_batch_size", "4", "--actor_dropout", "0.0", "--critic_dropout", "0.0",
                       "--num_warmup_steps", "0", "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-4",
                       *extra])


def counted_trainer(reward_dir, tokenizer, *extra):
    """A PPOTrainer (same initial weights for the same flags) whose scoring and training forwards are counted."""
    from training.utils import seeding
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.ppo_trainer import PPOTrainer

    config = step3_config(reward_dir, *extra)
    seeding.set_random_seed(0)
    trainer = PPOTrainer(build_rlhf_engine(config, tokenizer, torch.device("cpu"), 10, 10), config)
    trainer.calls = {}

    def counted(name):
        real = getattr(trainer, name)

        def counting(*args, **kwargs):
            trainer.calls[name] = trainer.calls.get(name, 0) + 1
            return real(*args, **kwargs)
        return counting

    for name in ("_policy_forward", "_action_values", "_scored_log_probs"):
        setattr(trainer, name, counted(name))
    return trainer


def prompt_batch(tokenizer):
    from training.utils.data.collators import PromptCollator

    generator = torch.Generator().manual_seed(0)
    return PromptCollator(tokenizer.pad_token_id)(
        [{"prompt_ids": torch.randint(10, 4000, (n,), generator=generator).tolist()} for n in (6, 11, 3, 9)])


def trained_weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for e in (trainer.engine.actor, trainer.engine.critic) if e is not None
            for p in e.module.parameters()]


def ppo_step(trainer, tokenizer):
    torch.manual_seed(7)
    experience, rollout = trainer.generate_experience(prompt_batch(tokenizer))
    buffer = ExperienceBuffer(1, not trainer.config.rl.critic_free, tokenizer.pad_token_id, seed=0)
    buffer.add(experience)
    [minibatch] = buffer.minibatches(trainer.config.per_device_training_batch_size)
    stats = trainer.train_rlhf(minibatch)
    return experience, rollout, stats, trained_weights(trainer)


@pytest.mark.parametrize("variant", [
    [], ["--actor_gradient_checkpointing", "--critic_gradient_checkpointing"],
    ["--actor_lora_dim", "4", "--critic_lora_dim", "4"]], ids=["plain", "checkpointing", "lora"])
def test_first_update_forward_scores_the_batch_and_trains_as_separate_passes_do(reward_dir, tokenizer, distributed,
                                                                                variant):
    fused = counted_trainer(reward_dir, tokenizer, *variant)
    separate = counted_trainer(reward_dir, tokenizer, *variant, "--separate_scoring_pass")
    assert fused.score_in_update and not separate.score_in_update
    assert separate.scoring_plan.endswith("(--separate_scoring_pass)")
    initial = trained_weights(fused)

    fused_experience, fused_rollout, fused_stats, fused_weights = ppo_step(fused, tokenizer)
    assert fused.pending_update is None  # consumed by the update, its activations freed
    separate_experience, separate_rollout, separate_stats, separate_weights = ppo_step(separate, tokenizer)

    # One actor pass (the update's, reused) and one critic pass instead of two each; the reference's pass stays.
    assert fused.calls == {"_policy_forward": 1, "_action_values": 1, "_scored_log_probs": 1}
    assert separate.calls == {"_policy_forward": 1, "_action_values": 2, "_scored_log_probs": 2}
    assert torch.equal(fused_experience.answer_ids, separate_experience.answer_ids)
    assert fused_experience.action_mask.sum() > 4  # real answers were scored
    for name in ("log_probs", "values", "advantages", "returns"):
        mine, theirs = getattr(fused_experience, name), getattr(separate_experience, name)
        assert mine.abs().sum() > 0, name
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(fused_rollout.scores, separate_rollout.scores)
    # The first update starts at ratio 1 in both; same losses and the same new weights.
    for stats in (fused_stats, separate_stats):
        assert stats["approx_kl"] < 1e-6 and stats["clip_fraction"] == 0.0
    for key in ("actor_loss", "critic_loss", "entropy"):
        assert fused_stats[key] == pytest.approx(separate_stats[key], rel=1e-5, abs=1e-6), key
    # (a third at least: LoRA's zero-initialised factor leaves its partner unmoved in the first step)
    assert sum(not torch.equal(a, b) for a, b in zip(initial, fused_weights)) > len(initial) // 3
    for mine, theirs in zip(fused_weights, separate_weights):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_minibatch_of_other_rows_runs_its_own_forward(reward_dir, tokenizer, distributed):
    trainer = counted_trainer(reward_dir, tokenizer)
    torch.manual_seed(7)
    experience, _ = trainer.generate_experience(prompt_batch(tokenizer))
    rows = experience.rows()
    other = Experience.from_rows(rows[1:] + rows[:1], tokenizer.pad_token_id)  # same rows, another order
    stats = trainer.train_rlhf(other)
    assert trainer.calls["_policy_forward"] == 2 and trainer.calls["_action_values"] == 2
    assert stats["approx_kl"] < 1e-6  # its own forward, from the same weights: still ratio 1


def update_forward(prompt_ids, prompt_mask, answer_ids, action_mask) -> UpdateForward:
    rows, width = answer_ids.shape
    log_probs = torch.arange(rows * width, dtype=torch.float32).view(rows, width)
    return UpdateForward(prompt_ids, prompt_mask, answer_ids, action_mask, log_probs, -log_probs, 2 * log_probs)


def test_outputs_for_accepts_the_same_rows_with_pad_columns_trimmed_only():
    pad = 1
    prompt_ids = torch.tensor([[pad, 5, 6], [7, 8, 9]])
    prompt_mask = (prompt_ids != pad).long()
    answer_ids = torch.tensor([[3, 4, pad, pad], [5, pad, pad, pad]])
    action_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    pending = update_forward(prompt_ids, prompt_mask, answer_ids, action_mask)
    full = pending.outputs_for(Experience(prompt_ids, prompt_mask, answer_ids, action_mask, *[torch.zeros(2, 4)] * 4))
    assert full is not None and torch.equal(full[0], pending.log_probs) and torch.equal(full[2], pending.values)
    # The buffer re-pads answers to the longest one: the all-pad columns go, the outputs are cut to match.
    trimmed = pending.outputs_for(Experience(prompt_ids, prompt_mask, answer_ids[:, :2], action_mask[:, :2],
                                             *[torch.zeros(2, 2)] * 4))
    assert trimmed is not None and torch.equal(trimmed[1], pending.entropy[:, :2])
    swapped = Experience(prompt_ids.flip(0), prompt_mask.flip(0), answer_ids.flip(0), action_mask.flip(0),
                         *[torch.zeros(2, 4)] * 4)
    assert pending.outputs_for(swapped) is None
    cut_real_token = Experience(prompt_ids, prompt_mask, answer_ids[:, :1], action_mask[:, :1],
                                *[torch.zeros(2, 1)] * 4)
    assert pending.outputs_for(cut_real_token) is None
    narrower_prompt = Experience(prompt_ids[:, 1:], prompt_mask[:, 1:], answer_ids, action_mask,
                                 *[torch.zeros(2, 4)] * 4)  # drops row 1's first prompt token
    assert pending.outputs_for(narrower_prompt) is None
    assert pending.outputs_for(Experience(prompt_ids[:1], prompt_mask[:1], answer_ids[:1], action_mask[:1],
                                          *[torch.zeros(1, 4)] * 4)) is None


def model_with(dropout: float, lora_dropout: float = 0.0):
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(lora_dropout))
    module.config = SimpleNamespace(dropout=dropout, attention_dropout=0.0, hidden_size=2)
    return module


@pytest.mark.parametrize("extra, actor_dropout, critic_dropout, expected", [
    ([], 0.0, 0.0, []),
    (["--ppo_epochs", "3"], 0.0, 0.0, []),  # the first epoch's update reuses it; later ones run their own
    (["--separate_scoring_pass"], 0.0, 0.0, ["--separate_scoring_pass"]),
    (["--generation_batches", "2"], 0.0, 0.0, ["--generation_batches 2"]),
    (["--per_device_training_batch_size", "2"], 0.0, 0.0, ["4 rows per generation batch"]),
    (["--advantage_estimator", "rloo", "--n_samples_per_prompt", "2"], 0.0, None, ["8 rows per generation batch"]),
    ([], 0.1, 0.0, ["the actor has dropout (dropout=0.1; --actor_dropout 0"]),
    ([], 0.0, 0.1, ["the critic has dropout (dropout=0.1; --critic_dropout 0"]),
])
def test_what_keeps_scoring_in_passes_of_its_own(reward_dir, extra, actor_dropout, critic_dropout, expected):
    config = step3_config(reward_dir, *extra)
    critic = None if critic_dropout is None else SimpleNamespace(module=model_with(critic_dropout))
    engine = SimpleNamespace(actor=SimpleNamespace(module=model_with(actor_dropout)), critic=critic)
    blockers = update_forward_blockers(config, engine)
    assert len(blockers) == len(expected) and all(b.startswith(e) for b, e in zip(blockers, expected)), blockers


def test_active_dropout_reads_the_config_and_dropout_modules():
    from training.utils.model.build import active_dropout

    assert active_dropout(model_with(0.0)) == []
    assert active_dropout(model_with(0.1)) == ["dropout=0.1"]
    assert active_dropout(model_with(0.0, lora_dropout=0.05)) == ["Dropout(p=0.05)"]


def test_critic_free_estimators_take_the_old_log_probs_from_the_update_too(reward_dir, tokenizer, distributed):
    """GRPO, two answers per prompt (8 rows in one mini-batch of 8): the actor's scoring pass is the update's."""
    grpo = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2", "--per_device_training_batch_size", "8"]
    fused = counted_trainer(reward_dir, tokenizer, *grpo)
    separate = counted_trainer(reward_dir, tokenizer, *grpo, "--separate_scoring_pass")
    assert fused.score_in_update and fused.engine.critic is None
    fused_experience, _, fused_stats, fused_weights = ppo_step(fused, tokenizer)
    separate_experience, _, separate_stats, separate_weights = ppo_step(separate, tokenizer)
    assert fused.calls == {"_policy_forward": 1, "_scored_log_probs": 1}
    assert separate.calls == {"_policy_forward": 1, "_scored_log_probs": 2}
    assert fused_experience.answer_ids.size(0) == 8
    for name in ("log_probs", "advantages", "ref_log_probs"):
        torch.testing.assert_close(getattr(fused_experience, name), getattr(separate_experience, name), rtol=1e-5,
                                   atol=1e-5, msg=name)
    assert fused_experience.advantages.abs().sum() > 0
    assert fused_stats["actor_loss"] == pytest.approx(separate_stats["actor_loss"], rel=1e-5, abs=1e-6)
    for mine, theirs in zip(fused_weights, separate_weights):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
