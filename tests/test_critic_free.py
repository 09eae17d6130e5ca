"""Step 3 without a critic: GRPO, Dr. GRPO, RLOO, REINFORCE++ (and its group-baseline form) and ReMax, rewarded by a
rule (the synthetic tasks' checker, or a function file) instead of, or beside, a reward model.

One short step-1 run on `synthetic/copy` gives the SFT actor every run of the module starts from. The estimator
math itself is hand-checked in tests/test_advantages.py; here: the trainer computes exactly those advantages, every
estimator trains end to end, two ranks under ZeRO-3, bitwise resume, e2e, the refusals, and a learning test.
"""
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, STEP1_DIR, assert_ok, read_metrics, run_script, write_jsonl

STEP3_DIR = REPO / "training" / "step3_rlhf_finetuning"
TASK = "synthetic/copy:size=8000,eval_size=400,ramble_share=0.0"
SPLIT = "4,4,2"
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """(workdir, SFT actor) from a short step-1 run on the copy task (the actor of tests/test_step3.py: a quarter of
    the demonstrations are near misses, so about half of its sampled answers are right)."""
    work = tmp_path_factory.mktemp("critic_free")
    actor = work / "sft"
    assert_ok(run_script(STEP1_DIR, ["main.py", "--model_name_or_path", "tiny/opt", "--output_dir", str(actor),
                                     "--data_path", TASK, "--data_split", SPLIT, "--data_output_path",
                                     str(work / "cache"), "--dtype", "fp32", "--dropout", "0.0",
                                     "--num_warmup_steps", "10", "--no_group_by_length",
                                     "--per_device_train_batch_size", "16", "--max_seq_len", "64",
                                     "--learning_rate", "1e-3"]))
    return work, actor


def rl_args(work, actor, output, estimator, *extra, samples="4") -> list[str]:
    return ["main.py", "--actor_model_name_or_path", str(actor), "--advantage_estimator", estimator,
            "--n_samples_per_prompt", samples, "--reward_function", "synthetic", "--data_path", TASK,
            "--data_split", SPLIT, "--data_output_path", str(work / "cache"), "--output_dir", str(output),
            "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "8",
            "--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--actor_learning_rate", "1e-4",
            "--num_warmup_steps", "0", "--actor_dropout", "0.0", "--dtype", "fp32", "--eval_prompts", "16", *extra]


def changed_weights(before_dir, after_dir) -> list[str]:
    before, after = load_file(str(before_dir / "model.safetensors")), load_file(str(after_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


# ---------------------------------------------------------------- the trainer's advantages, in process

REWARD_FILE = '''
def fixed(prompts, replies, references):
    """A fixed reward per row: 0, 1, 2, 0, 1, 2, ... whatever was answered."""
    return [float(i % 3) for i in range(len(replies))]
'''


@pytest.fixture(scope="module")
def make_trainer(sft, distributed, tmp_path_factory):
    """build(estimator, *flags) -> a PPOTrainer for that estimator, built in this process on the SFT actor and
    rewarded by REWARD_FILE's fixed rewards."""
    from training.step3_rlhf_finetuning.main import parse_args
    from training.utils import seeding
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.ppo_trainer import PPOTrainer
    from training.utils.tokenizer import load_tokenizer

    work, actor = sft
    reward_file = tmp_path_factory.mktemp("reward") / "fixed_reward.py"
    reward_file.write_text(REWARD_FILE, encoding="utf-8")

    def build(estimator, *extra):
        args = rl_args(work, actor, work / "unused", estimator, "--reward_function", f"{reward_file}:fixed", *extra)
        config = parse_args(args[1:])
        tokenizer = load_tokenizer(str(actor))
        seeding.set_random_seed(0)
        return PPOTrainer(build_rlhf_engine(config, tokenizer, torch.device("cpu"), 100, 100), config), tokenizer

    return build


def prompt_batch(tokenizer, questions):
    from training.utils.data.collators import PromptCollator
    from training.utils.data.conversation import encode_chunks, prompt_chunks

    items = [{"prompt_ids": encode_chunks(tokenizer, prompt_chunks(f"\n\nHuman: {q}\n\nAssistant:"))[0],
              "reference": None} for q in questions]
    return PromptCollator(tokenizer.pad_token_id)(items)


QUESTIONS = ["Repeat: 4 8 1 9", "Repeat: 2 0", "Repeat: 7 7 7 1 5 3"]


@pytest.mark.slow
@pytest.mark.parametrize("estimator, extra", [
    ("grpo", ()),  # KL as a loss term by default: none in the reward, so exactly group_advantages per token
    ("rloo", ("--kl_ctl", "0")),
    ("dr_grpo", ()),
    ("remax", ("--kl_ctl", "0")),
])
def test_the_trainer_computes_group_advantages_of_the_rewards(make_trainer, estimator, extra):
    from training.utils.losses import group_advantages

    trainer, tokenizer = make_trainer(estimator, *extra)
    assert trainer.engine.critic is None and trainer.engine.reward is None
    torch.manual_seed(0)
    experience, rollout = trainer.generate_experience(prompt_batch(tokenizer, QUESTIONS))
    n = 4
    assert experience.prompt_ids.shape[0] == len(QUESTIONS) * n == len(rollout.lengths)
    for k in range(len(QUESTIONS)):  # each prompt's answers are consecutive rows
        group = experience.prompt_ids[k * n:(k + 1) * n]
        assert (group == group[0]).all()
    scores = torch.tensor([float(i % 3) for i in range(len(QUESTIONS) * n)])
    assert torch.equal(rollout.scores, scores)
    baseline = None
    if estimator == "remax":  # the greedy answer of prompt k is row k of its own call: reward k % 3
        baseline = torch.tensor([float(k % 3) for k in range(len(QUESTIONS))]).repeat_interleave(n)
    expected = group_advantages(scores, n, estimator, baseline_scores=baseline)
    mask = experience.action_mask.bool()
    for b in range(len(scores)):
        assert torch.allclose(experience.advantages[b][mask[b]], expected[b].expand(int(mask[b].sum())), atol=1e-6)
        assert (experience.advantages[b][~mask[b]] == 0).all()
    assert (experience.values == 0).all()
    assert torch.allclose(rollout.group_std, scores.view(-1, n).std(dim=1, unbiased=False))
    stats = trainer.train_rlhf(experience)
    assert "critic_loss" not in stats and all(math.isfinite(v) for v in stats.values())
    assert ("kl_loss" in stats) == (estimator in ("grpo", "dr_grpo"))


@pytest.mark.slow
def test_dropped_groups_leave_the_loss_but_keep_their_rows(make_trainer):
    """Two groups of 4: the first all 1 (no signal: dropped), the second mixed. The dropped rows stay (every rank
    keeps its rows) with a zero loss mask and zero advantages."""
    trainer, tokenizer = make_trainer("grpo", "--drop_equal_reward_groups")
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    log_probs = -torch.rand(8, 5)
    advantages, mask, group = trainer.critic_free_advantages(scores, scores, log_probs, log_probs,
                                                             torch.ones(8, 5, dtype=torch.long))
    assert group["dropped"].tolist() == [True, False] and mask[:4].sum() == 0 and mask[4:].sum() == 20
    assert (advantages[:4] == 0).all() and (advantages[4:, 0] != 0).all()


def test_critic_free_advantages_with_the_kl_in_the_reward_hand_computed():
    """Two prompts x two answers; answer lengths 2, 1, 2, 2 (mask), KL per token given, coefficient 0.5, gamma 1."""
    from training.utils.losses import critic_free_advantages

    scores = torch.tensor([1.0, 0.0, 2.0, 2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    ref = torch.zeros(4, 2)
    log_probs = torch.tensor([[0.2, 0.4], [0.6, 0.0], [0.0, 0.2], [0.4, 0.0]])  # kl_t = log_probs (ref 0)
    rloo = critic_free_advantages(scores, log_probs, ref, mask, 2, "rloo", 0.5, 1.0)
    # rloo: A_b = r_b - r_other = 1, -1, 0, 0; A_t = A_b - 0.5 * (kl_t + kl_t+1 ...)
    expected = torch.tensor([[1 - 0.5 * 0.6, 1 - 0.5 * 0.4], [-1 - 0.5 * 0.6, 0.0], [-0.5 * 0.2, -0.5 * 0.2],
                             [-0.5 * 0.4, 0.0]])
    assert torch.allclose(rloo, expected, atol=1e-6)
    # REINFORCE++: returns G of (-0.5 kl + r at the end), whitened over the 7 actions
    returns = torch.tensor([[1 - 0.3, 1 - 0.2], [0 - 0.3, 0.0], [2 - 0.1, 2 - 0.1], [2 - 0.2, 2.0]])
    valid = mask.bool()
    mean, std = returns[valid].mean(), returns[valid].std(unbiased=False)
    expected = torch.where(valid, (returns - mean) / std, torch.zeros(()))
    rpp = critic_free_advantages(scores, log_probs, ref, mask, 2, "reinforce_plus_plus", 0.5, 1.0)
    assert torch.allclose(rpp, expected, atol=1e-4)


# ---------------------------------------------------------------- every estimator, a few real steps

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_estimator_trains_without_a_critic_or_reward_model(sft, estimator):
    work, actor = sft
    output = work / f"run_{estimator}"
    extra = ["--enable_test_mode", "--test_stop_step", "2", "--enable_ema"]
    if estimator == "remax":  # one answer per prompt suffices for ReMax; LoRA and PPO-ptx here too
        text = work / "pretraining.txt"
        text.write_text("\n\n".join(f"Paragraph {i}: one two three four five six seven" for i in range(40)))
        extra += ["--actor_lora_dim", "4", "--actor_lora_module_name", "layers.", "--only_optimize_lora",
                  "--actor_lora_learning_rate", "1e-3", "--unsupervised_dataset_name", str(text), "--unsup_coef", "0.5"]
    result = run_script(STEP3_DIR, rl_args(work, actor, output, estimator, *extra,
                                           samples="1" if estimator == "remax" else "4"))
    assert_ok(result)
    assert f"no critic ({estimator} is critic-free), no reward model" in result.stdout
    assert "step 2 | reward" in result.stdout
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == ["actor", "actor_ema"]  # no critic/
    steps = [row for row in read_metrics(output / "actor") if "loss/actor" in row]
    assert len(steps) == 2 and "loss/critic" not in steps[0]
    for row in steps:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
        assert ("reward/group_std" in row) == (estimator != "remax")
        assert ("loss/kl" in row) == (estimator in ("grpo", "dr_grpo"))
        if estimator == "remax":
            assert row["loss/unsupervised"] > 0
    evals = [row for row in read_metrics(output / "actor") if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [0, 2] and evals[0]["eval/reward_mean"] == evals[0]["eval/accuracy"]
    assert changed_weights(actor, output / "actor")


# ---------------------------------------------------------------- two ranks, ZeRO-3, and resume

def test_two_ranks_zero3_grpo_with_uneven_answers(sft):
    """Each rank samples its own answers (lengths differ between ranks and rows); ZeRO-3 keeps both ranks in step
    through generation, the greedy-free rollouts and the training passes."""
    work, actor = sft
    output = work / "zero3"
    result = run_script(STEP3_DIR, rl_args(work, actor, output, "grpo", "--actor_zero_stage", "3",
                                           "--per_device_generation_batch_size", "2", "--drop_equal_reward_groups",
                                           "--enable_test_mode", "--test_stop_step", "2", "--deepspeed"),
                        num_ranks=2, timeout=500)
    assert_ok(result)
    steps = [row for row in read_metrics(output / "actor") if "loss/actor" in row]
    assert len(steps) == 2 and all(0 <= row["groups/dropped_share"] <= 1 for row in steps)
    assert changed_weights(actor, output / "actor")


@pytest.mark.slow
def test_grpo_killed_and_resumed_matches_an_uninterrupted_run(sft):
    from test_resume import assert_same_weights, kill_and_resume, logged

    work, actor = sft
    text = work / "resume_text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: " + "one two three four " * (i % 4 + 2) for i in range(40)))

    def args(output, *extra):
        return rl_args(work, actor, output, "grpo", "--actor_dropout", "0.1", "--enable_ema", "--target_kl", "0.05",
                       "--drop_equal_reward_groups", "--clip_ratio_high", "0.28", "--unsupervised_dataset_name",
                       str(text), "--unsup_coef", "0.5", "--eval_prompts", "8", "--enable_test_mode",
                       "--test_stop_step", "4", "--seed", "7", *extra)

    assert_ok(run_script(STEP3_DIR, args(work / "full")))
    kill_and_resume(STEP3_DIR, args(work / "resumed", "--save_interval", "2"), work / "resumed",
                    model_dir=work / "resumed" / "actor")
    assert not (work / "resumed" / "critic").exists()
    assert_same_weights(work / "full", work / "resumed")  # actor and actor_ema
    assert logged(work / "full" / "actor") == logged(work / "resumed" / "actor")


# ---------------------------------------------------------------- learning

def test_grpo_with_the_checker_reward_raises_held_out_accuracy_over_the_sft_actor(sft):
    """No reward model: the synthetic checker rewards exact copies. Measured on 80 held-out prompts, sampled at
    temperature 1 with the same seed before and after, 24 steps of 8 prompts x 4 answers: 0.487 -> 0.800 (seed
    1234) and 0.525 -> 0.838 (seed 1), both +0.31; the accuracy's sampling noise on 80 answers is about 0.06."""
    work, actor = sft
    output = work / "learn"
    result = run_script(STEP3_DIR, rl_args(work, actor, output, "grpo", "--per_device_generation_batch_size", "8",
                                           "--per_device_training_batch_size", "32", "--eval_prompts", "80",
                                           "--no_group_by_length", "--enable_test_mode", "--test_stop_step", "24",
                                           "--enable_tensorboard", "--tensorboard_path", str(work / "tb")))
    assert_ok(result)
    evals = [row for row in read_metrics(output / "actor") if "eval/accuracy" in row]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 24)
    assert after["eval/accuracy"] >= before["eval/accuracy"] + 0.2, (before, after)
    steps = [row for row in read_metrics(output / "actor") if "kl/to_reference" in row]
    assert 0 < max(row["kl/to_reference"] for row in steps) < 5
    assert list((work / "tb" / "step3_rlhf").iterdir())


# ---------------------------------------------------------------- e2e

@pytest.mark.slow  # runs e2e_rlhf.py (imported helper: the slow-test detection does not see it)
def test_e2e_grpo_quick_runs_sft_then_critic_free_step3(tmp_path):
    from test_e2e import run_e2e

    out = tmp_path / "out"
    result = run_e2e("--algo", "grpo", "--deployment-type", "cpu", "--quick", "--output-dir", str(out),
                     "--check-prompts", "20")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (out / "reward-models").exists() and not (out / "step2").exists()
    final = out / "step3-models" / "opt-grpo"  # beside a PPO result, not over it
    assert (final / "actor" / "model.safetensors").is_file() and not (final / "critic").exists()
    assert "no critic (grpo is critic-free)" in result.stdout
    assert "held-out checker accuracy (20 prompts, greedy): step-1 actor" in result.stdout
    assert "| step3 |" in result.stdout and "| step2 |" not in result.stdout


def test_e2e_plan_of_a_critic_free_algo(tmp_path):
    from applications import e2e_rlhf

    args = e2e_rlhf.parse_args(["--algo", "rloo", "--deployment-type", "cpu", "--output-dir", str(tmp_path)])
    step1, step3 = e2e_rlhf.build_steps(args)
    assert (step1.key, step3.key) == ("step1", "step3") and args.step == [1, 3]
    assert step3.command[3] == "none"  # run_tiny.sh's critic path: none
    assert "--advantage_estimator rloo --n_samples_per_prompt 4 --reward_function synthetic" in step3.env["EXTRA_ARGS"]
    args = e2e_rlhf.parse_args(["--algo", "grpo", "--deployment-type", "single_gpu", "--output-dir", str(tmp_path)])
    step3 = e2e_rlhf.build_steps(args)[-1]
    assert "--critic_model_name_or_path" not in step3.command and "grpo" in step3.command
    with pytest.raises(Exception, match="has no step 2"):
        e2e_rlhf.parse_args(["--algo", "grpo", "--step", "2", "--output-dir", str(tmp_path)])


# ---------------------------------------------------------------- bad input

def parse_error(*flags) -> str:
    from training.step3_rlhf_finetuning.main import parse_args
    from training.utils.errors import UserInputError

    base = ["--actor_model_name_or_path", "tiny/opt", "--data_path", "synthetic/copy", "--output_dir", "/nonexistent"]
    with pytest.raises(UserInputError) as raised:
        parse_args(base + list(flags))
    return str(raised.value)


def test_flag_combinations_are_refused_at_parse_time(tmp_path):
    assert "needs --n_samples_per_prompt >= 2" in parse_error("--advantage_estimator", "grpo", "--reward_function",
                                                               "synthetic")
    assert "trains a critic" in parse_error("--reward_function", "synthetic")  # gae without a critic
    assert "no reward" in parse_error("--advantage_estimator", "remax")
    assert "would be unused" in parse_error("--advantage_estimator", "remax", "--reward_function", "synthetic",
                                            "--critic_model_name_or_path", str(tmp_path), "--reward_model_weight",
                                            "0")
    assert "KL loss" in parse_error("--advantage_estimator", "rloo", "--n_samples_per_prompt", "2",
                                    "--reward_function", "synthetic", "--kl_estimator", "k2")
    assert "--drop_equal_reward_groups" in parse_error("--advantage_estimator", "remax", "--reward_function",
                                                       "synthetic", "--drop_equal_reward_groups")


def test_estimator_defaults_follow_the_papers():
    from training.step3_rlhf_finetuning.main import parse_args

    base = ["--actor_model_name_or_path", "tiny/opt", "--data_path", "synthetic/copy", "--output_dir", "/nonexistent",
            "--reward_function", "synthetic", "--n_samples_per_prompt", "4", "--advantage_estimator"]
    grpo, dr_grpo, rloo = (parse_args(base + [e]).rl for e in ("grpo", "dr_grpo", "rloo"))
    assert (grpo.use_kl_loss, grpo.kl_estimator, grpo.kl_loss_coef, grpo.loss_agg_mode) == (
        True, "k3", 0.04, "seq_mean_token_mean")
    assert (dr_grpo.kl_loss_coef, dr_grpo.loss_agg_mode) == (0.0, "seq_mean_token_sum_norm")
    assert (rloo.use_kl_loss, rloo.kl_estimator, rloo.loss_agg_mode) == (False, None, "token_mean")
    config = parse_args(base + ["grpo", "--clip_ratio_high", "0.28"])
    assert config.clip_range == (0.2, 0.28)


def step3_refusal(sft, tmp_path, *extra, samples="4", data=None):
    work, actor = sft
    output = tmp_path / "out"
    args = rl_args(work, actor, output, "grpo", "--enable_test_mode", "--test_stop_step", "1", *extra,
                   samples=samples)
    if data is not None:
        args[args.index("--data_path") + 1] = str(data)
        args[args.index("--data_split") + 1] = "0,0,1"
    result = run_script(STEP3_DIR, args, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert not output.exists()
    return errors[0]


USER_REWARDS = {
    "raises": "def fn(prompts, replies, references):\n    raise RuntimeError('checker crashed')\n",
    "count": "def fn(prompts, replies, references):\n    return [1.0]\n",
    "nan": "def fn(prompts, replies, references):\n    return [float('nan')] * len(replies)\n",
    "text": "def fn(prompts, replies, references):\n    return ['good'] * len(replies)\n",
}


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"), ("no_function", "has no function 'fn'"), ("raises", "raised RuntimeError"),
    ("count", "returned 1 rewards for"), ("nan", "for row 0"), ("text", "'good' for row 0"),
])
def test_a_bad_reward_function_is_one_error_line(sft, tmp_path, case, expected):
    path = tmp_path / "reward.py"
    if case == "no_function":
        path.write_text("def other(prompts, replies, references):\n    return []\n")
    elif case != "missing":
        path.write_text(USER_REWARDS[case])
    error = step3_refusal(sft, tmp_path, "--reward_function", f"{path}:fn")
    assert expected in error, error


def test_the_math_reward_on_data_without_reference_answers_is_refused(sft, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"How many apples? {i}", "response": " many"}
                                                    for i in range(20)])
    error = step3_refusal(sft, tmp_path, "--reward_function", "math", data=data)
    assert "needs reference answers" in error and "row 0" in error, error


def test_quality_table_has_a_row_per_critic_free_estimator():
    from benchmarks.quality_run import CRITIC_FREE, markdown

    actor = {"checker_accuracy_greedy": 1.0, "checker_accuracy_sampled": 0.8, "reward_mean": 5.0, "kl_to_sft": 1.25,
             "answer_length": 9.0, "eos_rate": 1.0}
    results = {"data": "synthetic/copy", "prompts": 200, "max_new_tokens": 24, "wall_s": {"step3 (grpo)": 60.0},
               "actors": {name: actor for name in CRITIC_FREE},
               "training": {"rm_accuracy": 1.0, "dpo_accuracy": [0.5, 0.9], "ppo_eval_reward": [5.0, 8.0],
                            "ppo_final_kl": 0.5, "critic_free_accuracy": {"GRPO (step 3)": [0.5, 0.85]}}}
    text = markdown(results)
    assert "| GRPO (step 3) | 1.000 | 0.800 |" in text and "| REINFORCE++ (step 3) |" in text
    assert "| GRPO (step 3): held-out sampled checker accuracy (step 3's own evaluation), start -> end | 0.500 -> " \
           "0.850 |" in text and "| wall time step3 (grpo) | 60 s |" in text
