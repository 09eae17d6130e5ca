"""Step-3 rollout generation throughput: plain `model.generate` against the trainer's path. Prints one JSON document.

    python benchmarks/bench_generation.py                     # tiny/opt, tiny/opt-20m x fp32, bf16 x answers 64, 128
    python benchmarks/bench_generation.py --models tiny/opt --dtypes bf16 --answer_lens 128 --variants compile
    python benchmarks/bench_generation.py --greedy --allow_eos   # greedy decoding; EOS may end answers early

Each row (model x dtype) runs in its own process, one rank and `--threads` torch threads (1 by default), and
builds step 3's RLHF engine from step 3's own flags (random-initialised actor, critic and reward model of the
row's shape; ZeRO-0) and its PPOTrainer. A batch of `--batch_size` prompts of random token ids, each of a
length drawn from `--prompt_lens` (64-256 tokens), is left-padded as step 3's prompt collator does. Per answer
length the row times, with the same seed and the rollout's sampling settings (step 3's defaults: temperature
1.0, so sampled; `--greedy` for argmax):

    plain      `model.generate(...)` on a plain Hugging Face copy of the actor (same weights, same dtype)
    rollout    `PPOTrainer.generate`, the path step 3's generate_experience takes (through the DeepSpeed engine)
    static     plain with a static KV cache (cache_implementation="static")            (--variants static)
    eager      plain with eager attention instead of SDPA (a second plain copy)       (--variants eager)
    compile    plain with a static KV cache and torch.compile'd decoding steps          (--variants compile)

A random model samples EOS now and then (about 1 token in 4000), so EOS is suppressed by default in the
model's generation config, for every variant alike: every answer runs to the length limit and each variant
produces B x answer_len tokens. `--allow_eos` leaves EOS in; tokens then count up to and including each
answer's EOS.

Per variant: generated tokens per second and per CPU second of the process (best of `--repeats` timed calls
after `--warmup` untimed ones; the variants take turns, in alternating order), the seconds of a call, and
whether its tokens equal plain's (torch.equal). `rollout_overhead` is the median over the repeats of
rollout's seconds over plain's in the same repeat, minus one (`rollout_overhead_cpu`: the same in CPU
seconds, steadier on a shared machine). For compile: the first call's seconds (compilation included), a
call on a wider prompt batch (a longer static cache: compiled again), and a 10-call run, its compilation
included, against 10 plain calls.

Measured (2 shared cores of an AMD EPYC with native bf16, 1 thread, batch 8, prompts of 64-256 tokens padded
to 216, sampled, every answer to the limit; generated tokens per CPU second, answers of 64 / 128):

    model        dtype  plain        rollout      static        eager         compile
    tiny/opt     fp32   1200 / 1165  1171 / 1133  1170 / 1206   1096 / 1174   1250 / 1272
    tiny/opt     bf16   1178 / 1124  1174 / 1143  1111 / 1097*  1433 / 1560*  1176 / 1101*
    tiny/opt-20m fp32    206 /  229   206 /  238   217 /  252    207 /  238    230 /  271
    tiny/opt-20m bf16    246 /  262   247 /  267   244 /  241*   343 /  369*   264 /  258*
    (* tokens differ from plain's)

(That table predates sampling.decoding_kernels.) In fp32 rollout is plain within the noise (paired medians -1.7% to
+4.4%; repeated A/B runs of the tiny/opt fp32 row give -2% to +3%): what the engine adds per token, DeepSpeed's
forward pre/post hooks, costs ~4 us. In bf16 on CPU rollout decodes with the attention chosen for the CPU
(sampling.decode_attention: eager on that AMD EPYC, SDPA on a CPU with AMX-BF16) and linear layers on packed
weights (model.packed_linear), so rollout_overhead is negative there: measured 2026-12-06 (tiny/opt-20m
bf16, answers 64 / 128, tokens per CPU second, beside a test run on the other core) plain 254 / 211, eager
356 / 339, rollout 415 / 380, every variant's tokens equal to plain's: packing adds 17% / 12% to eager attention. The
static cache wins 0-10% in fp32 (one cell loses 3%) and loses 1-8% in bf16. Compiling took 9-43 s on a cold
inductor cache (1.5-13 s warm) plus 5-11 s again for each batch wider than any before; a 10-call run with it
was slower than plain in 6 of 8 cells even on a warm cache. Eager attention is 22-41% faster than SDPA in
bf16 (one-token SDPA queries are ~5x slower in bf16 than in fp32 on this CPU); its tokens differed from SDPA's in
that table, not in the 2026-12-06 run.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time

from benchmarks import rows
from benchmarks.shapes import RANDOM_PREFIX, materialise

VARIANTS = ("static", "eager", "compile")
RUN_CALLS = 10  # the "10-step run" compile must win over, its compilation included


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["tiny/opt", "tiny/opt-20m"],
                        help="Actors: tiny/* names, random/opt-1.3b | random/opt-350m, or model directories.")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "fp16", "bf16"],
                        help="One row each (bf16 is fast only on CPUs with native bf16; fp16 needs a GPU).")
    parser.add_argument("--answer_lens", nargs="*", type=int, default=[64, 128])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_lens", nargs=2, type=int, default=[64, 256], metavar=("MIN", "MAX"),
                        help="Prompt lengths are drawn uniformly from [MIN, MAX] (then left-padded).")
    parser.add_argument("--variants", nargs="*", default=["static", "eager"], choices=VARIANTS,
                        help="Variants timed besides plain and rollout (compile: ~1 minute of compilation per "
                             "answer length).")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (default: sample at temperature 1).")
    parser.add_argument("--allow_eos", action="store_true", help="Do not suppress EOS (answers may end early).")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each row.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed calls per variant and answer length.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per variant and answer length (best).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def random_prompts(tokenizer, batch_size: int, min_len: int, max_len: int, seed: int) -> dict:
    """Left-padded prompts of random non-special token ids, as step 3's PromptCollator pads them."""
    import torch

    from training.utils.data.collators import PromptCollator

    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator).tolist()
    items = [{"prompt_ids": allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()}
             for n in lengths]
    return PromptCollator(tokenizer.pad_token_id)(items)


def build_trainer(model_name: str, dtype: str, answer_len: int, greedy: bool, tokenizer, device):
    """Step 3's RLHF engine and PPOTrainer for a random actor (and critic / reward model) of `model_name`'s shape."""
    from training.step3_rlhf_finetuning.main import parse_args as parse_step3_args
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.ppo_trainer import PPOTrainer

    actor = materialise(model_name, tokenizer)
    reward_dir = tempfile.mkdtemp(prefix="bench_generation_reward_")
    save_reward_model(create_reward_model(actor, tokenizer), tokenizer, reward_dir, reward_stats={})
    args3 = parse_step3_args(
        ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", reward_dir, "--data_path",
         "synthetic/copy", "--output_dir", "unused", "--dtype", dtype, "--per_device_generation_batch_size", "8",
         "--per_device_training_batch_size", "8", "--max_answer_seq_len", str(answer_len), "--actor_dropout", "0.0",
         "--critic_dropout", "0.0", "--num_warmup_steps", "0"] + (["--temperature", "0"] if greedy else []))
    return PPOTrainer(build_rlhf_engine(args3, tokenizer, device, 1000, 1000), args3), actor


def plain_copy(actor_engine, actor_name: str, tokenizer):
    """A plain Hugging Face model with the engine's weights and dtype, in eval mode (no DeepSpeed)."""
    from training.utils.model.build import create_hf_model

    module = actor_engine.module
    model = create_hf_model(actor_name, tokenizer, dropout=0.0)
    model.load_state_dict(module.state_dict())
    model.generation_config = module.generation_config  # the same generation defaults (EOS suppression)
    return model.to(next(module.parameters()).dtype).eval()


def paired_overhead(seconds: list[float], baseline: list[float]) -> float:
    """The median over repeats of seconds / baseline - 1, each pair timed back to back (steadier than a ratio of
    bests when other work shares the machine)."""
    return round(statistics.median(s / b for s, b in zip(seconds, baseline)) - 1, 4)


def wider_prompts(args, tokenizer, width: int, device):
    """A prompt batch as random_prompts draws it, wider than `width` once padded."""
    for seed in range(args.seed + 1, args.seed + 1000):
        batch = random_prompts(tokenizer, args.batch_size, *args.prompt_lens, seed=seed)
        if batch["input_ids"].size(1) > width:
            return batch["input_ids"].to(device), batch["attention_mask"].to(device)
    raise SystemExit("--prompt_lens: no batch is wider than the first, so there is no recompilation to time")


def compile_costs(first_s: float, compiled_s: float, plain_s: float, wider_s: float) -> dict:
    """Whether compiling pays over a run of RUN_CALLS calls, compilation included, in the best case: the first
    batch is the widest (generate keeps its static cache while later prompts fit in it, and the compiled steps
    with it). A wider batch than any before allocates a longer cache and compiles again (`wider_prompt_call_s`);
    step 3's widths vary, so that happens now and then."""
    compiled_run = first_s + (RUN_CALLS - 1) * compiled_s
    return {"first_call_s": round(first_s, 2), "wider_prompt_call_s": round(wider_s, 2),
            f"plain_run_of_{RUN_CALLS}_s": round(RUN_CALLS * plain_s, 2),
            f"run_of_{RUN_CALLS}_s": round(compiled_run, 2), "pays_in_run": compiled_run < RUN_CALLS * plain_s}


def run_row(args, model_name: str, dtype: str) -> dict:
    import torch
    from transformers import CompileConfig

    from training.utils import distributed, seeding
    from training.utils.masks import answer_lengths
    from training.utils.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    device = distributed.init_distributed()
    seeding.set_random_seed(args.seed)
    tokenizer = load_tokenizer("tiny/opt" if model_name.startswith(RANDOM_PREFIX) else model_name)
    trainer, actor_name = build_trainer(model_name, dtype, max(args.answer_lens), args.greedy, tokenizer, device)
    actor = trainer.engine.actor
    if not args.allow_eos:  # for every variant: generate reads the model's generation config
        actor.module.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    plain = plain_copy(actor, actor_name, tokenizer)
    eager = plain_copy(actor, actor_name, tokenizer) if "eager" in args.variants else None
    if eager is not None:
        eager.set_attn_implementation("eager")
    batch = random_prompts(tokenizer, args.batch_size, *args.prompt_lens, seed=args.seed)
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    width = prompt_ids.size(1)

    def plain_generate(model=plain, **extra):
        def call(ids, mask):
            return model.generate(input_ids=ids, attention_mask=mask, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **trainer.sampling.generate_kwargs(),
                                  **extra)[:, ids.size(1):]
        return call

    def timed(call, ids=prompt_ids, mask=prompt_mask) -> tuple[float, float, torch.Tensor]:
        """(wall seconds, CPU seconds of this process, answers) of one call, from the same seed."""
        torch.manual_seed(args.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        output = call(ids, mask)
        return time.perf_counter() - wall, time.process_time() - cpu, output

    compile_config = CompileConfig(mode="default", dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles generate on accelerators only otherwise
    variants = {"plain": plain_generate(), "rollout": trainer.generate,
                "static": plain_generate(cache_implementation="static"), "eager": plain_generate(eager),
                "compile": plain_generate(cache_implementation="static", compile_config=compile_config)}
    chosen = ["plain", "rollout"] + list(args.variants)
    results = {}
    for answer_len in args.answer_lens:
        trainer.sampling.max_new_tokens = answer_len
        outputs, first_call = {}, {}
        for name in chosen:  # the first call (compilation, cache allocation) and warm-up, untimed
            first_call[name], _, outputs[name] = timed(variants[name])
            for _ in range(args.warmup - 1):
                timed(variants[name])
        wall, cpu = {name: [] for name in chosen}, {name: [] for name in chosen}
        for repeat in range(args.repeats):  # interleaved (a burst of load hits every variant alike), and in
            for name in chosen[::-1] if repeat % 2 else chosen:  # alternate orders (no variant always goes first)
                seconds, cpu_seconds, output = timed(variants[name])
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
                assert torch.equal(output, outputs[name]), f"{name}: a repeated call gave other tokens"
        best = {name: min(wall[name]) for name in chosen}
        best_cpu = {name: min(cpu[name]) for name in chosen}
        per_variant = {}
        for name in chosen:
            lengths, ended = answer_lengths(outputs[name], tokenizer.eos_token_id)
            tokens = int(lengths.sum())
            per_variant[name] = {"tokens_per_s": round(tokens / best[name], 1),
                                 "tokens_per_cpu_s": round(tokens / best_cpu[name], 1),
                                 "call_s": round(best[name], 4), "tokens": tokens, "ended": int(ended.sum()),
                                 "identical_to_plain": bool(torch.equal(outputs[name], outputs["plain"]))}
        if "compile" in per_variant:
            per_variant["compile"].update(compile_costs(first_call["compile"], best["compile"], best["plain"],
                                                        timed(variants["compile"], *wider_prompts(args, tokenizer,
                                                                                                  width, device))[0]))
        results[str(answer_len)] = {**per_variant, "rollout_overhead": paired_overhead(wall["rollout"], wall["plain"]),
                                    "rollout_overhead_cpu": paired_overhead(cpu["rollout"], cpu["plain"])}
    return {"model": model_name, "dtype": dtype, "batch_size": args.batch_size, "prompt_width": width,
            "prompt_tokens": int(prompt_mask.sum()), "greedy": args.greedy, "eos_suppressed": not args.allow_eos,
            "torch_threads": torch.get_num_threads(), "answers": results, "peak_rss_mib": rows.peak_rss_mib()}


def collect(argv: list[str]) -> dict:
    """Run every row of `argv`'s benchmark, each in its own process; the JSON document."""
    args = parse_args(argv)
    results = []
    for model_name in args.models:
        for dtype in args.dtypes:
            results.append(rows.run_row(__file__, argv, [model_name, dtype]))
            for answer_len, row in results[-1]["answers"].items():
                speeds = "  ".join(f"{name} {row[name]['tokens_per_s']}" for name in ("plain", "rollout", *VARIANTS)
                                   if name in row)
                print(f" generation {model_name:>14} {dtype} answer={answer_len:<4} tok/s: {speeds}  "
                      f"rollout overhead {row['rollout_overhead']:+.1%}", file=sys.stderr)
    return {"benchmark": "rollout_generation", "rows": results}


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.row:
        rows.print_row(run_row(args, args.row[0], args.row[1]))
        return
    print(json.dumps(collect(argv), indent=1))


if __name__ == "__main__":
    main()
