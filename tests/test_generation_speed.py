"""Step 3's rollout generation (PPOTrainer.generate, through the actor's DeepSpeed engine) is plain
`model.generate`: the same tokens from the same seed, greedy and sampled, one forward per token over the
KV cache, and no step once every answer has ended. In process, on tiny/opt; the throughput itself is
benchmarks/bench_generation.py's to measure."""
import pytest
import torch

from training.utils.data.collators import PromptCollator
from training.utils.masks import answer_lengths
from training.utils.sampling import SamplingConfig

ANSWER_LEN = 24
EOS_BOOST = 64  # the EOS row of the (tied) output embedding is scaled by this: answers end, at varied lengths
SAMPLINGS = {"greedy": SamplingConfig(ANSWER_LEN),
             "sampled": SamplingConfig(ANSWER_LEN, do_sample=True),  # step 3's defaults: temperature 1, no top-k/p
             "sampled_top_k_top_p": SamplingConfig(ANSWER_LEN, do_sample=True, temperature=0.7, top_p=0.9, top_k=50)}


@pytest.fixture(scope="module")
def rollout(tmp_path_factory, distributed, tokenizer):
    """(PPOTrainer over step 3's engines with a tiny/opt actor in fp32, a plain Hugging Face copy of its actor)."""
    from training.step3_rlhf_finetuning.main import parse_args
    from training.utils import seeding
    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.ppo_trainer import PPOTrainer

    work = tmp_path_factory.mktemp("rollout_generation")
    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(work / "reward"), reward_stats={})
    config = parse_args(["--actor_model_name_or_path", "tiny/opt", "--critic_model_name_or_path", str(work / "reward"),
                         "--data_path", "synthetic/copy", "--output_dir", str(work / "unused"), "--dtype", "fp32",
                         "--max_answer_seq_len", str(ANSWER_LEN), "--actor_dropout", "0.0", "--critic_dropout", "0.0",
                         "--per_device_generation_batch_size", "6", "--per_device_training_batch_size", "6"])
    seeding.set_random_seed(0)
    trainer = PPOTrainer(build_rlhf_engine(config, tokenizer, torch.device("cpu"), 10, 10), config)
    actor = trainer.engine.actor.module
    with torch.no_grad():
        actor.get_output_embeddings().weight[tokenizer.eos_token_id] *= EOS_BOOST
    plain = create_hf_model("tiny/opt", tokenizer, dropout=0.0)
    plain.load_state_dict(actor.state_dict())
    return trainer, plain.eval()


def left_padded_prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    items = [{"prompt_ids": torch.randint(10, 4000, (n,), generator=generator).tolist()} for n in (5, 12, 9, 3, 16, 7)]
    batch = PromptCollator(tokenizer.pad_token_id)(items)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_rollout_answers_are_plain_generate_token_for_token(rollout, tokenizer, monkeypatch, sampling):
    trainer, plain = rollout
    monkeypatch.setattr(trainer, "sampling", SAMPLINGS[sampling])
    prompt_ids, prompt_mask = left_padded_prompts(tokenizer)
    torch.manual_seed(1)
    answers = trainer.generate(prompt_ids, prompt_mask)
    torch.manual_seed(1)
    expected = plain.generate(input_ids=prompt_ids, attention_mask=prompt_mask, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **SAMPLINGS[sampling].generate_kwargs())
    assert torch.equal(answers, expected[:, prompt_ids.size(1):])
    lengths, ended = answer_lengths(answers, tokenizer.eos_token_id)
    assert ended.any() and len(set(lengths.tolist())) > 2  # answers of several lengths, EOS and padding included
    if trainer.sampling.do_sample:  # the sampled answers all end early here: generation stopped with the last one
        assert ended.all() and answers.size(1) == int(lengths.max()) < ANSWER_LEN


def test_rollout_decodes_one_token_per_forward_over_the_kv_cache(rollout, tokenizer, monkeypatch):
    """Even for a model whose configs turn the cache off (a checkpoint saved with activation checkpointing on),
    the prompt is read once and every further forward reads one token; no forward after the last answer ended."""
    trainer, plain = rollout
    actor = trainer.engine.actor.module
    monkeypatch.setattr(trainer, "sampling", SAMPLINGS["sampled"])
    monkeypatch.setattr(actor.config, "use_cache", False)
    monkeypatch.setattr(actor.generation_config, "use_cache", False)
    prompt_ids, prompt_mask = left_padded_prompts(tokenizer)
    widths = []
    hook = actor.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].size(1)),
                                           with_kwargs=True)
    try:
        torch.manual_seed(1)
        answers = trainer.generate(prompt_ids, prompt_mask)
    finally:
        hook.remove()
    assert widths == [prompt_ids.size(1)] + [1] * (answers.size(1) - 1)
    lengths, _ = answer_lengths(answers, tokenizer.eos_token_id)
    assert answers.size(1) == int(lengths.max()) < ANSWER_LEN
    torch.manual_seed(1)
    expected = plain.generate(input_ids=prompt_ids, attention_mask=prompt_mask, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **SAMPLINGS["sampled"].generate_kwargs())
    assert torch.equal(answers, expected[:, prompt_ids.size(1):])


def test_rollout_answers_are_padded_to_the_width_multiple(rollout, tokenizer, monkeypatch):
    """sequence_width_multiple (bf16 on CPU: 32): the answers are plain generate's, padded after every row's end to a
    multiple of the width (never past the answer limit); fp32 and accelerators keep the exact width."""
    from training.utils.rlhf.ppo_trainer import sequence_width_multiple

    assert [sequence_width_multiple(device, dtype) for device, dtype in (
        ("cpu", torch.bfloat16), ("cpu", torch.float16), ("cpu", torch.float32), ("cuda", torch.bfloat16))] == [32, 32,
                                                                                                               1, 1]
    trainer, plain = rollout
    monkeypatch.setattr(trainer, "sampling", SAMPLINGS["sampled"])
    prompt_ids, prompt_mask = left_padded_prompts(tokenizer)
    torch.manual_seed(1)
    expected = plain.generate(input_ids=prompt_ids, attention_mask=prompt_mask, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **SAMPLINGS["sampled"].generate_kwargs())
    expected = expected[:, prompt_ids.size(1):]
    for multiple, width in ((8, -(-expected.size(1) // 8) * 8), (ANSWER_LEN + 8, ANSWER_LEN)):
        monkeypatch.setattr(trainer, "width_multiple", multiple)
        torch.manual_seed(1)
        answers = trainer.generate(prompt_ids, prompt_mask)
        assert answers.size(1) == width > expected.size(1)
        assert torch.equal(answers[:, :expected.size(1)], expected)
        assert (answers[:, expected.size(1):] == tokenizer.pad_token_id).all()
        assert torch.equal(answer_lengths(answers, tokenizer.eos_token_id)[0],
                           answer_lengths(expected, tokenizer.eos_token_id)[0])


# ---------------------------------------------------------------- benchmarks/bench_generation.py

def test_benchmark_prompts_are_left_padded_and_of_the_asked_lengths(tokenizer):
    from benchmarks.bench_generation import random_prompts

    batch = random_prompts(tokenizer, 8, 64, 256, seed=0)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].size(1) == int(lengths.max()) and 64 <= int(lengths.min()) and int(lengths.max()) <= 256
    assert len(set(lengths.tolist())) > 1 and (batch["attention_mask"][:, -1] == 1).all()  # padding on the left
    real = batch["input_ids"][batch["attention_mask"] == 1]
    assert not torch.isin(real, torch.tensor(tokenizer.all_special_ids)).any()
    assert torch.equal(random_prompts(tokenizer, 8, 64, 256, seed=0)["input_ids"], batch["input_ids"])


def test_benchmark_overhead_is_the_median_of_paired_ratios():
    from benchmarks.bench_generation import compile_costs, paired_overhead

    # a load burst in repeat 2 slows both variants; the pairs still say 10%
    assert paired_overhead([1.1, 5.5, 1.1], [1.0, 5.0, 1.0]) == pytest.approx(0.1)
    costs = compile_costs(first_s=30.0, compiled_s=0.5, plain_s=1.0, wider_s=20.0)
    assert costs["run_of_10_s"] == 34.5 and costs["plain_run_of_10_s"] == 10.0 and not costs["pays_in_run"]
    assert compile_costs(first_s=2.0, compiled_s=0.5, plain_s=1.0, wider_s=2.0)["pays_in_run"]


def test_benchmark_row_times_plain_and_rollout_on_the_same_tokens(distributed):
    from benchmarks.bench_generation import parse_args, run_row

    threads = torch.get_num_threads()
    try:
        row = run_row(parse_args(["--answer_lens", "4", "--batch_size", "2", "--prompt_lens", "4", "8",
                                  "--repeats", "1", "--variants", "static", "eager"]), "tiny/opt", "fp32")
    finally:
        torch.set_num_threads(threads)
    answers = row["answers"]["4"]
    for name in ("plain", "rollout", "static", "eager"):
        assert answers[name]["tokens"] == 2 * 4 and answers[name]["ended"] == 0  # EOS suppressed: to the limit
        assert answers[name]["tokens_per_s"] > 0 and answers[name]["tokens_per_cpu_s"] > 0
    assert answers["rollout"]["identical_to_plain"]
    assert row["torch_threads"] == 1 and isinstance(answers["rollout_overhead"], float)


@pytest.mark.parametrize("amx, attention", [(False, "eager"), (True, "sdpa")])
def test_bf16_decoding_on_cpu_uses_the_attention_chosen_for_the_cpu_and_switches_back(tokenizer, monkeypatch, amx,
                                                                                      attention):
    """decoding_kernels: segment attention (SDPA wherever segments do not apply) -> eager attention for a bf16
    model on CPU, SDPA where the CPU has AMX-BF16, only while generating; fp32 and RLHF_DECODING_KERNELS=0 are left
    alone."""
    import copy

    from training.utils import precision
    from training.utils.model.attention import SEGMENT_ATTENTION
    from training.utils.model.build import create_hf_model
    from training.utils.model.kv_cache import block_kv_cache, cache_kwarg
    from training.utils.sampling import decoding_kernels

    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: amx)
    torch.manual_seed(0)
    model = create_hf_model("tiny/opt", tokenizer).to(torch.bfloat16).eval()
    prompt = torch.randint(4, 200, (2, 12))
    # a left-padded row: transformers' own decoding over the block cache is masked then (model.lean_decode)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    with decoding_kernels(model):
        assert model.config._attn_implementation == attention
        answer = model.generate(prompt, **kwargs)
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    plain = copy.deepcopy(model)
    plain.set_attn_implementation(attention)
    assert torch.equal(answer, plain.generate(prompt, **{cache_kwarg(plain): block_kv_cache(plain)}, **kwargs))

    monkeypatch.setenv("RLHF_DECODING_KERNELS", "0")
    with decoding_kernels(model):
        assert model.config._attn_implementation == SEGMENT_ATTENTION and "generate" not in vars(model)
    monkeypatch.delenv("RLHF_DECODING_KERNELS")

    fp32 = create_hf_model("tiny/opt", tokenizer)
    with decoding_kernels(fp32):
        assert fp32.config._attn_implementation == SEGMENT_ATTENTION
