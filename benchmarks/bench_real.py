"""Real-data throughput rows: each step's old default (fp32, random batches) and its new defaults side by side.

    python benchmarks/bench_real.py --step sft      # baseline, auto dtype + length-grouped, + --packing
    python benchmarks/bench_real.py --step rm       # reward model (pairs/s)
    python benchmarks/bench_real.py --step dpo      # DPO: policy trained + frozen reference (pairs/s)
    python benchmarks/bench_real.py --step ppo      # step 3: generation / experience / training split
    python benchmarks/run_all.py --real-data        # all four, with the per-dtype matmul peaks and the report

Workload (the defaults): the first --rows 400 rows of ../shared/data/hh_harmless_test.pref.jsonl (the path is
relative to the repository root), copied into a local jsonl file under --data_output_path; `--data_split
2,4,4`, so after the 9:1 train/eval hold-out of a file without an eval split 72 SFT samples, 143 pairs (one
of the 144 is longer than --max_seq_len and dropped) and 144 prompts; tiny/opt-20m (21M parameters, random
weights), per-device batch 8, --max_seq_len 512, ZeRO 0, one rank, --threads 1 (torch.set_num_threads and
OMP_NUM_THREADS).

Variants (`--variants`; the report divides every row's samples/s by the baseline's):

    fp32-random           --dtype fp32 --no_group_by_length   the old default: the baseline (reward model,
                                                               DPO: also --no_share_prompt)
    fp32-grouped          --dtype fp32                         (optional: length grouping alone)
    auto-random           --dtype auto --no_group_by_length    (optional: the dtype alone)
    auto-grouped          --dtype auto                         today's default (pairs: prompts shared)
    auto-grouped-packed   --dtype auto --packing               step 1 only
    auto-grouped-unshared --dtype auto --no_share_prompt       reward model and DPO: two padded rows per pair
    auto-grouped-separate --dtype auto --separate_scoring_pass step 3: old log-probs and values in passes of their
                                                               own (the default takes them from the update's forward)
    dschat-layout         --dtype bf16 --no_group_by_length    DeepSpeed-Chat's layout on this code:
                          (+ --no_share_prompt), every sample  the work DeepSpeed-Chat's own step does per sample,
                          padded to --max_seq_len (step 3:     measured beside the other rows on the same machine
                          prompts to --max_prompt_seq_len)

The baseline and dschat-layout rows also run the old kernels, as the old default and DeepSpeed-Chat's own code
do: transformers' SDPA attention (not model.attention's segment attention), glibc's default allocator
(RLHF_KEEP_FREED_MEMORY=0, see training/utils/allocator.py), F.linear in inference passes
(RLHF_PACKED_WEIGHTS=0, see training/utils/model/packed_linear.py), torch's dropout (RLHF_FAST_DROPOUT=0, see
training/utils/model/dropout.py), DeepSpeed's gradient all-reduce of a lone rank (RLHF_LONE_RANK_NO_ALLREDUCE=0,
see training/utils/engine.py), and every other ENV_SWITCHES entry (decoding kernels, the lean optimizer step, step
3's last layer computed only where it is read, the C++ decoding attention, the lean weight gradients, the fused
AdamW kernel).

Each row runs in its own process (rows.run_row) through the step's own code: its parse_args (the flags
above, as a user would pass them), load_supervised_data (the step's sampler and collator), its model
builder, train_ds_config / initialize_train_engine (a real DeepSpeed engine in the resolved dtype), and its
loss helpers (step 1's model_inputs / real_samples_and_tokens / packed_train_loader, step 2's pair_loss,
DPO's preference_loss / build_reference, with --no_precompute_ref_log_probs: the reference runs on every
batch, so the DPO rows compare dtype and batching alone); step 3 runs build_rlhf_engine, PPOTrainer and
ExperienceBuffer as its main.py does. Evaluation and saving are left out. One untimed warm-up step on the
first batch, then one whole epoch is timed (PPO: --ppo_steps steps, one epoch over the first --ppo_steps x
batch prompts), so every variant of a step trains on exactly the same samples: the ratio of samples/s is the
ratio of epoch times.

Per row: samples/s (pairs/s for rm/dpo, answers/s for ppo), samples per CPU second (the process's user + system
time over the timed epoch: with one thread, a figure that other jobs on a shared machine disturb much less
than the wall clock), real (non-pad) tokens/s, padding efficiency
(real / computed tokens: pad tokens are computed), achieved model GFLOP/s (flops.py's 6N / 2N rule on real
tokens), the resolved dtype, wall seconds of the epoch, peak RSS. `run_all.py --real-data` adds the MFU
against the matmul peak of the row's own dtype (training.utils.precision.matmul_peak_gflops).
"""
import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import flops, rows

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "hh_harmless_test.pref.jsonl"
STEPS = ("sft", "rm", "dpo", "ppo")
BASELINE = "fp32-random"
VARIANT_FLAGS = {
    "fp32-random": ["--dtype", "fp32", "--no_group_by_length"],
    "fp32-grouped": ["--dtype", "fp32"],
    "auto-random": ["--dtype", "auto", "--no_group_by_length"],
    "auto-grouped": ["--dtype", "auto"],
    "auto-grouped-packed": ["--dtype", "auto", "--packing"],
    "auto-grouped-unshared": ["--dtype", "auto", "--no_share_prompt"],  # reward model and DPO
    "auto-grouped-separate": ["--dtype", "auto", "--separate_scoring_pass"],  # step 3 only
    # DeepSpeed-Chat's data layout on this project's code: bf16, random batches, every sample padded to
    # --max_seq_len (step 3: prompts to --max_prompt_seq_len; the collators' pad_to), two rows per pair.
    "dschat-layout": ["--dtype", "bf16", "--no_group_by_length"],
}
OLD_KERNELS = (BASELINE, "dschat-layout")  # rows that run transformers' SDPA, glibc's allocator, unpacked weights
DEFAULT_VARIANTS = {"sft": (BASELINE, "auto-grouped", "auto-grouped-packed", "dschat-layout"),
                    "rm": (BASELINE, "auto-grouped-unshared", "auto-grouped", "dschat-layout"),
                    "dpo": (BASELINE, "auto-grouped-unshared", "auto-grouped", "dschat-layout"),
                    "ppo": (BASELINE, "auto-grouped-separate", "auto-grouped", "dschat-layout")}
STEP_MODULES = {"sft": "training.step1_supervised_finetuning.main", "rm": "training.step2_reward_model_finetuning.main",
                "dpo": "training.step2_dpo_finetuning.main", "ppo": "training.step3_rlhf_finetuning.main"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=STEPS, default="sft")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANT_FLAGS), default=None,
                        help=f"Rows to run (default per step: {DEFAULT_VARIANTS}); the first is not special: the "
                             f"report's baseline is {BASELINE}.")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="Preference jsonl whose first --rows rows "
                                                                      "are the workload.")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--model", default="tiny/opt-20m", help="Every model of the row (step 3: actor, and the "
                                                                "shape of its critic and reward model).")
    parser.add_argument("--data_split", default="2,4,4")
    parser.add_argument("--batch_size", type=int, default=8, help="Per-device batch (step 3: generation and "
                                                                  "training).")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--max_prompt_seq_len", type=int, default=256)
    parser.add_argument("--max_answer_seq_len", type=int, default=128)
    parser.add_argument("--ppo_steps", type=int, default=10, help="Timed PPO steps (one epoch over that many "
                                                                  "batches of prompts).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (0: torch's default).")
    parser.add_argument("--data_output_path", default="/tmp/data_files/bench_real")
    parser.add_argument("--row", nargs=2, metavar=("STEP", "VARIANT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def variants_for(step: str, requested=None) -> list[str]:
    """The variants a step runs (packing exists for SFT only), the baseline first."""
    chosen = list(requested) if requested else list(DEFAULT_VARIANTS[step])
    bad = [v for v in chosen if "packed" in v and step != "sft"]
    if bad:
        raise SystemExit(f"--variants {' '.join(bad)}: --packing is a step-1 (sft) flag only")
    bad = [v for v in chosen if v.endswith("-separate") and step != "ppo"]
    if bad:
        raise SystemExit(f"--variants {' '.join(bad)}: --separate_scoring_pass is a step-3 (ppo) flag only")
    return sorted(dict.fromkeys(chosen), key=lambda v: v != BASELINE)


def subset_path(source: str | Path, rows: int, directory: str | Path) -> Path:
    """Where the first `rows` rows of `source` are written (a .jsonl file the data pipeline reads as is)."""
    name = Path(source).name.removesuffix(".jsonl").removesuffix(".pref")
    return Path(directory) / f"{name}_first{rows}.pref.jsonl"


def write_subset(source: str | Path, rows: int, directory: str | Path) -> Path:
    """The first `rows` non-empty lines of the jsonl file `source` as their own file (see subset_path).

    The file is rewritten only when its content would change: the data cache's key includes the file's
    modification time, so an unchanged subset keeps its tokenised cache between runs. A missing source
    raises FileNotFoundError with the path; a source with fewer rows is an error too (the workload would
    silently be smaller)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"real-data benchmark source {source} not found")
    kept = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                kept.append(line if line.endswith("\n") else line + "\n")
                if len(kept) == rows:
                    break
    if len(kept) < rows:
        raise ValueError(f"{source} has {len(kept)} rows, fewer than the {rows} asked for")
    text = "".join(kept)
    target = subset_path(source, rows, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return target


def step_argv(args, step: str, variant: str, data_file: str | Path, output_dir: str | Path,
              critic_dir: str | Path | None = None) -> list[str]:
    """The step's own command line for a row: what a user would pass to its main.py."""
    common = ["--data_path", str(data_file), "--data_split", args.data_split, "--data_output_path",
              args.data_output_path, "--output_dir", str(output_dir), "--num_train_epochs", "1", "--seed", "1234"]
    if step == "ppo":
        # No dropout in step 3, as every DeepSpeed-Chat step-3 script runs it (--actor_dropout 0.0; its critic is a
        # step-2 model trained with --dropout 0.0). The old default and DeepSpeed-Chat score in passes of their own.
        separate = ["--separate_scoring_pass"] if variant in OLD_KERNELS else []
        return common + ["--actor_model_name_or_path", args.model, "--critic_model_name_or_path", str(critic_dir),
                         "--actor_dropout", "0.0", "--critic_dropout", "0.0", *separate,
                         "--actor_zero_stage", "0", "--critic_zero_stage", "0",
                         "--per_device_generation_batch_size", str(args.batch_size),
                         "--per_device_training_batch_size", str(args.batch_size),
                         "--max_prompt_seq_len", str(args.max_prompt_seq_len),
                         "--max_answer_seq_len", str(args.max_answer_seq_len), "--num_warmup_steps", "0",
                         *VARIANT_FLAGS[variant]]
    # DPO: the frozen reference runs on every batch in every variant (not the one pass over the data before
    # training that --precompute_ref_log_probs does by default), so the rows compare dtype and batching only.
    reference = ["--no_precompute_ref_log_probs"] if step == "dpo" else []
    # The old default ran two padded rows per pair (no --share_prompt).
    old_pairs = ["--no_share_prompt"] if step in ("rm", "dpo") and variant in (BASELINE, "dschat-layout") else []
    return common + ["--model_name_or_path", args.model, "--zero_stage", "0",
                     "--per_device_train_batch_size", str(args.batch_size),
                     "--per_device_eval_batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
                     *reference, *old_pairs, *VARIANT_FLAGS[variant]]


def _set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _start_row(variant: str):
    """This row's process group and device; OLD_KERNELS rows switch off every ENV_SWITCHES speed-up (glibc's
    default allocator, F.linear, torch's dropout, DeepSpeed's all-reduce)."""
    from training.utils import distributed
    from training.utils.errors import ENV_SWITCHES

    if variant in OLD_KERNELS:
        os.environ.update(dict.fromkeys(ENV_SWITCHES, "0"))
    return distributed.init_distributed()


def _old_attention(*models) -> None:
    """OLD_KERNELS rows: transformers' SDPA, as the models had before segment attention."""
    from training.utils.model.attention import SEGMENT_ATTENTION
    from training.utils.model.build import unwrap_model

    for model in models:
        for module in unwrap_model(model).modules():
            if (hasattr(module, "set_attn_implementation")
                    and getattr(module.config, "_attn_implementation", None) == SEGMENT_ATTENTION):
                module.set_attn_implementation("sdpa")


def train_row(args, step: str, variant: str) -> dict:
    """Steps 1, 2 and DPO: one warm-up step, then one timed epoch through the step's own code."""
    import torch

    from training.utils import seeding
    from training.utils.data.collators import PairCollator, SFTCollator
    from training.utils.data.pair_packing import reward_model_inputs, share_prompts
    from training.utils.data.pipeline import PHASE_REWARD, PHASE_SFT, load_supervised_data
    from training.utils.engine import initialize_train_engine, train_ds_config, training_dtype
    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model
    from training.utils.precision import TORCH_DTYPES

    recipe = importlib.import_module(STEP_MODULES[step])
    data_file = write_subset(args.source, args.rows, args.data_output_path)
    config = recipe.parse_args(step_argv(args, step, variant, data_file, Path(tempfile.gettempdir()) / "bench_unused"))
    device = _start_row(variant)
    _set_threads(args.threads)
    seeding.set_random_seed(config.seed)
    ds_config = train_ds_config(config, config.model, config.per_device_train_batch_size, device)
    dtype = training_dtype(config, device)
    pairs = step != "sft"
    tokenizer, _, data, loader, _ = load_supervised_data(config, PHASE_REWARD if pairs else PHASE_SFT,
                                                      PairCollator if pairs else SFTCollator,
                                                      "pairs" if pairs else "samples")
    build = create_reward_model if step == "rm" else create_hf_model
    seeding.set_random_seed(config.seed)
    model = build(config.model.model_name_or_path, tokenizer, ds_config=ds_config, dropout=config.model.dropout,
                  trust_remote_code=config.trust_remote_code)
    if variant in OLD_KERNELS:
        _old_attention(model)
    if step == "sft" and config.packing:
        loader = recipe.packed_train_loader(config, data, tokenizer, model, dtype, loader)
    elif step == "sft":
        recipe.unpad_batches(loader, model, tokenizer.pad_token_id, TORCH_DTYPES[dtype], device)
    if variant == "dschat-layout":
        loader.collate_fn = dataclasses.replace(loader.collate_fn, pad_to=config.data.max_seq_len)
    if step in ("rm", "dpo") and config.share_prompt:
        share_prompts([loader], model.backbone if step == "rm" else model, tokenizer.pad_token_id, TORCH_DTYPES[dtype])
    params, flop_params = sum(p.numel() for p in model.parameters()), flops.matmul_params(model)
    engine, _ = initialize_train_engine(model, config, config.model, ds_config, device,
                                        math.ceil(len(loader) / config.gradient_accumulation_steps))
    reference = recipe.build_reference(config, tokenizer, ds_config, device) if step == "dpo" else None
    if variant in OLD_KERNELS and reference is not None:
        _old_attention(reference)

    def train_step(batch: dict) -> tuple[int, int, int]:
        """The recipe's forward, loss, backward and step; (samples, real tokens, computed tokens)."""
        batch = {k: v.to(device) for k, v in batch.items()}
        computed = batch["input_ids"].numel()
        if step == "sft":
            loss = recipe.sft_loss(engine, batch, config.compute_fp32_loss)
            samples, tokens = recipe.real_samples_and_tokens(batch)
        elif step == "rm":
            output = engine(**reward_model_inputs(batch))
            loss = recipe.pair_loss(output, batch, config)
            samples, tokens = batch["input_ids"].size(0) // 2, int(batch["attention_mask"].sum())
        else:
            losses, *_ = recipe.preference_loss(engine, reference, batch, config)
            loss = losses.mean()
            samples, tokens = losses.numel(), int(batch["attention_mask"].sum())
        if "packed_input_ids" in batch:  # pairs in one row each, the prompt once: count those tokens, as computed
            source = batch["packed_source"]
            tokens = int((torch.maximum(*source.chunk(2)).max(dim=1).values + 1).sum())
            computed = batch["packed_input_ids"].numel()
        engine.backward(loss)
        engine.step()
        if not torch.isfinite(loss):
            raise SystemExit(f"{step}/{variant}: non-finite loss {loss.item()}")
        return samples, tokens, computed

    loader.sampler.set_epoch(0)
    train_step(next(iter(loader)))  # warm-up: thread pool, allocator, kernel choice; not timed
    totals, batches = [0, 0, 0], 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in loader:
        totals = [t + v for t, v in zip(totals, train_step(batch))]
        batches += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    samples, real_tokens, computed_tokens = totals
    model_flops = flops.train_flops(flop_params, real_tokens)
    if reference is not None:
        model_flops += flops.forward_flops(flop_params, real_tokens)
    return {"step": step, "variant": variant, "baseline": variant == BASELINE, "model": args.model, "params": params,
            "matmul_params": flop_params, "dtype": dtype, "group_by_length": config.data.group_by_length,
            "packing": bool(getattr(config, "packing", False)), "data_path": str(data_file), "rows": args.rows,
            "train_samples": len(data.train), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
            "batches": batches, "samples": samples, "real_tokens": real_tokens, "computed_tokens": computed_tokens,
            "elapsed_s": round(elapsed, 2), "cpu_s": round(cpu, 2), "samples_per_s": round(samples / elapsed, 3),
            "samples_per_cpu_s": round(samples / cpu, 3), "real_tokens_per_s": round(real_tokens / elapsed, 1),
            "padding_efficiency": round(real_tokens / computed_tokens, 4),
            "model_gflops_per_s": flops.gflops_per_s(model_flops, elapsed),
            "peak_rss_mib": rows.peak_rss_mib(), "torch_threads": torch.get_num_threads()}


def ppo_row(args, variant: str) -> dict:
    """Step 3: one warm-up PPO step, then --ppo_steps timed steps (one epoch over that many prompt batches)."""
    import torch

    from training.utils import seeding
    from training.utils.data.chat_format import resolve_prompt_format
    from training.utils.data.collators import PromptCollator
    from training.utils.data.pipeline import PHASE_RLHF, build_phase_data, make_loader
    from training.utils.engine import training_dtype
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.precision import TORCH_DTYPES
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.experience import CappedPrompts, ExperienceBuffer
    from training.utils.rlhf.ppo_trainer import PPOTrainer, sequence_width_multiple
    from training.utils.tokenizer import load_tokenizer

    recipe = importlib.import_module(STEP_MODULES["ppo"])
    data_file = write_subset(args.source, args.rows, args.data_output_path)
    device = _start_row(variant)
    _set_threads(args.threads)
    seeding.set_random_seed(1234)
    # The critic and reward model: a random-initialised reward model of the actor's shape, saved as step 2 would.
    critic_dir = tempfile.mkdtemp(prefix="bench_real_reward_")
    base_tokenizer = load_tokenizer(args.model)
    save_reward_model(create_reward_model(args.model, base_tokenizer), base_tokenizer, critic_dir, reward_stats={})
    config = recipe.parse_args(step_argv(args, "ppo", variant, data_file,
                                         Path(tempfile.gettempdir()) / "bench_unused", critic_dir))
    seeding.set_random_seed(config.seed)
    dtype = training_dtype(config, device)
    # From here on as step 3's main.py: tokenizer, capped prompts, the prompt loader, engine, trainer, buffer.
    tokenizer = load_tokenizer(config.actor.model_name_or_path, config.add_eot_token, config.eot_token,
                               config.trust_remote_code)
    prompt_format = resolve_prompt_format(tokenizer, config, config.model_paths())
    data = build_phase_data(config.data, prompt_format, PHASE_RLHF)
    bos = prompt_format.bos_id
    batch_size = config.per_device_generation_batch_size
    prompts = CappedPrompts(data.train, config.max_prompt_seq_len, config.prompt_overflow, bos,
                            args.ppo_steps * batch_size)
    pad_to = config.max_prompt_seq_len if variant == "dschat-layout" else None
    width_multiple = sequence_width_multiple(device.type, TORCH_DTYPES[dtype])
    loader = make_loader(prompts, batch_size, PromptCollator(tokenizer.pad_token_id, pad_to, width_multiple),
                         config.seed, shuffle=True, length_grouped=config.data.group_by_length)
    actor_steps, critic_steps = recipe.optimizer_steps_per_epoch(config, len(loader))
    engine = build_rlhf_engine(config, tokenizer, device, actor_steps, critic_steps)
    if variant in OLD_KERNELS:
        _old_attention(*(e for e in (engine.actor, engine.ref, engine.critic, engine.reward) if e is not None))
    trainer = PPOTrainer(engine, config, prompt_format.stop_token_ids)
    buffer = ExperienceBuffer(config.generation_batches, not config.ppo.no_whiten_advantages, tokenizer.pad_token_id,
                              config.seed)
    n_actor, n_ref, n_critic, n_reward = (flops.matmul_params(e.module)
                                          for e in (engine.actor, engine.ref, engine.critic, engine.reward))
    params, critic_params = (sum(p.numel() for p in e.module.parameters()) for e in (engine.actor, engine.critic))

    def ppo_step(prompt_batch: dict) -> dict:
        experience, rollout = trainer.generate_experience(prompt_batch)
        buffer.add(experience)
        train_start = time.perf_counter()
        if buffer.full:
            for _ in range(config.ppo_epochs):
                for minibatch in buffer.minibatches(config.per_device_training_batch_size):
                    trainer.train_rlhf(minibatch)
            trainer.update_ema()
            buffer.clear()
        return {"generation_s": rollout.generation_s, "experience_s": rollout.scoring_s,
                "training_s": time.perf_counter() - train_start, "samples": len(rollout.lengths),
                "generated_tokens": int(rollout.lengths.sum()), "prompt_tokens": int(experience.prompt_mask.sum()),
                "computed_tokens": experience.prompt_ids.numel() + experience.answer_ids.numel()}

    loader.sampler.set_epoch(0)
    ppo_step(next(iter(loader)))  # warm-up, not timed
    totals: dict = {}
    steps = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for prompt_batch in loader:
        for key, value in ppo_step(prompt_batch).items():
            totals[key] = totals.get(key, 0) + value
        steps += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    samples, generated = totals["samples"], totals["generated_tokens"]
    sequence_tokens = totals["prompt_tokens"] + generated  # what the scoring and training passes read, pad excluded
    phase_flops = {"generation": flops.forward_flops(n_actor, sequence_tokens),
                   "experience": flops.forward_flops(n_actor + n_ref + n_critic + n_reward, sequence_tokens),
                   "training": flops.train_flops(n_actor + n_critic, sequence_tokens)}
    if trainer.score_in_update:  # the actor's and critic's forwards ran in the experience phase: training is backward
        phase_flops["training"] -= flops.forward_flops(n_actor + n_critic, sequence_tokens)
    return {"step": "ppo", "variant": variant, "baseline": variant == BASELINE, "model": args.model,
            "critic_model": args.model, "params": params, "critic_params": critic_params,
            "matmul_params": {"actor": n_actor, "critic": n_critic}, "dtype": dtype,
            "group_by_length": config.data.group_by_length, "packing": False, "data_path": str(data_file),
            "rows": args.rows, "prompts": len(prompts), "batch_size": batch_size,
            "max_prompt_seq_len": config.max_prompt_seq_len, "max_answer_seq_len": config.max_answer_seq_len,
            "steps": steps, "samples": samples, "real_tokens": sequence_tokens,
            "computed_tokens": totals["computed_tokens"], "elapsed_s": round(elapsed, 2), "cpu_s": round(cpu, 2),
            "mean_answer_tokens": round(generated / samples, 1),
            "samples_per_s": round(samples / elapsed, 3), "samples_per_cpu_s": round(samples / cpu, 3),
            "generated_tokens_per_s": round(generated / elapsed, 1),
            "real_tokens_per_s": round(sequence_tokens / elapsed, 1),
            "padding_efficiency": round(sequence_tokens / totals["computed_tokens"], 4),
            **{k: round(totals[k], 3) for k in ("generation_s", "experience_s", "training_s")},
            "model_gflops_per_s": {**{phase: flops.gflops_per_s(f, totals[f"{phase}_s"])
                                      for phase, f in phase_flops.items()},
                                   "total": flops.gflops_per_s(sum(phase_flops.values()), elapsed)},
            "peak_rss_mib": rows.peak_rss_mib(), "torch_threads": torch.get_num_threads()}


def collect(argv: list[str]) -> dict:
    """Run every variant of `argv`'s step, each in its own process; the JSON document."""
    args = parse_args(argv)
    if not Path(args.source).is_file():
        raise SystemExit(f"real-data benchmark: {args.source} not found (the shared data directory is not here); "
                         "pass --source FILE")
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    write_subset(args.source, args.rows, args.data_output_path)
    results = []
    for variant in variants_for(args.step, args.variants):
        results.append(rows.run_row(__file__, argv, [args.step, variant]))
        row = results[-1]
        print(f"real {args.step:>4} {variant:<20} {row['dtype']:>5} {row['samples_per_s']:>8} samples/s "
              f"{row['real_tokens_per_s']:>8} real tok/s  eff {row['padding_efficiency']:.3f}  {row['elapsed_s']} s",
              file=sys.stderr)
    return {"benchmark": f"real_{args.step}", "rows": results}


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.row:
        step, variant = args.row
        rows.print_row(ppo_row(args, variant) if step == "ppo" else train_row(args, step, variant))
        return
    print(json.dumps(collect(argv), indent=1))


if __name__ == "__main__":
    main()
