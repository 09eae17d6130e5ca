"""Step-3 (PPO) throughput benchmark: prints one JSON document.

    python benchmarks/bench_ppo.py                     # tiny/opt and tiny/opt-20m x answers of 16, 64 x batch 8, 16
    python benchmarks/bench_ppo.py --models tiny/opt --answer_lens 32 128 --batch_sizes 16 --steps 10
    python benchmarks/bench_ppo.py --algos ppo grpo rloo reinforce_plus_plus   # critic-free rows beside PPO
    # on a GPU: DeepSpeed-Chat's single-GPU shape, random weights, Hybrid Engine on (then again without)
    python benchmarks/bench_ppo.py --models random/opt-1.3b --critic_model random/opt-350m \
        --answer_lens 256 --batch_sizes 4 --dtype fp16 --hybrid_engine

Each row (model x answer length x batch size) runs in its own process (so peak RSS is that row's own),
one rank, with the same components as step 3: phase-3 prompts of the synthetic task, the RLHF engine
(actor, reference, critic, reward model; ZeRO-0) and the PPO trainer. The models are random-initialised,
so answers practically never sample EOS and run to --max_answer_seq_len: the answer length is what the
row says. The critic and reward model have the actor's shape unless --critic_model names another.
A critic-free row (--algos: an --advantage_estimator other than gae) builds neither critic nor reward model: it
samples --n_samples 4 answers for each of batch / 4 prompts (the same answers per step as a PPO row of that
batch) and rewards them with the synthetic task's checker (--reward_function synthetic).

`random/opt-1.3b` and `random/opt-350m` (shapes.py) are OPT-1.3B / OPT-350M shapes with random weights
and the project's vocabulary; the row writes them to a temporary directory first. They are meant for a
GPU: on CPU the 1.3B actor with its reference and Adam states needs ~25 GB.

Per row: samples/s (answers per second of a whole PPO step), generated tokens/s, real (non-pad) tokens/s
of the scored sequences and their padding efficiency, the time split between generation, experience (the
scoring forward passes of actor, reference, critic and reward model) and training, achieved model GFLOP/s
per phase (flops.py: generation 2 N_actor per prompt and generated token; experience 2 (N_actor + N_ref +
N_critic + N_reward) per sequence token; training 6 (N_actor + N_critic) per sequence token), and peak
RSS in MiB. `run_all.py` turns the GFLOP/s into MFU against the machine's measured matmul peak.
"""
import argparse
import json
import sys
import tempfile
import time

from benchmarks import flops, rows
from benchmarks.shapes import RANDOM_PREFIX, materialise
from training.utils.rlhf.config import CRITIC_FREE


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["tiny/opt", "tiny/opt-20m"],
                        help="Actors: tiny/* names, random/opt-1.3b | random/opt-350m, or model directories.")
    parser.add_argument("--critic_model", default=None,
                        help="Critic and reward model shape (default: the row's actor).")
    parser.add_argument("--answer_lens", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--batch_sizes", nargs="*", type=int, default=[8, 16],
                        help="Generation and training batch per step (one row each).")
    parser.add_argument("--data_path", default="synthetic/copy")
    parser.add_argument("--steps", type=int, default=5, help="Timed PPO steps (after one warm-up step).")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="fp32 on CPU (fp16 needs a GPU, bf16 is emulated on CPUs without AVX-512).")
    parser.add_argument("--hybrid_engine", action="store_true",
                        help="--enable_hybrid_engine for the actor (CUDA; on CPU step 3 logs a fallback to "
                             "Hugging Face generate).")
    parser.add_argument("--algos", nargs="*", default=["ppo"], choices=["ppo", *CRITIC_FREE],
                        help="ppo (GAE, critic and reward model) and/or critic-free --advantage_estimator values.")
    parser.add_argument("--n_samples", type=int, default=4, help="Answers per prompt of a critic-free row.")
    parser.add_argument("--data_output_path", default="/tmp/data_files/bench")
    parser.add_argument("--row", nargs=4, metavar=("MODEL", "ANSWER_LEN", "BATCH", "ALGO"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_row(args, model_name: str, answer_len: int, batch_size: int, algo: str = "ppo") -> dict:
    import torch

    from training.step3_rlhf_finetuning.main import parse_args as parse_step3_args
    from training.utils import distributed, seeding
    from training.utils.data.chat_format import PromptFormat
    from training.utils.data.collators import PromptCollator
    from training.utils.data.pipeline import PHASE_RLHF, DataConfig, build_phase_data
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.experience import CappedPrompts
    from training.utils.rlhf.ppo_trainer import PPOTrainer
    from training.utils.tokenizer import load_tokenizer

    device = distributed.init_distributed()
    seeding.set_random_seed(0)
    tokenizer = load_tokenizer("tiny/opt" if model_name.startswith(RANDOM_PREFIX) else model_name)
    actor = materialise(model_name, tokenizer)
    if algo == "ppo":
        reward_dir = tempfile.mkdtemp(prefix="bench_ppo_reward_")
        save_reward_model(create_reward_model(materialise(args.critic_model or model_name, tokenizer), tokenizer),
                          tokenizer, reward_dir, reward_stats={})
        algo_flags, prompts_per_step = ["--critic_model_name_or_path", reward_dir], batch_size
    else:  # the same answers per step as a PPO row: batch / n prompts, n answers each
        prompts_per_step = max(1, batch_size // args.n_samples)
        algo_flags = ["--advantage_estimator", algo, "--n_samples_per_prompt", str(args.n_samples),
                      "--reward_function", "synthetic"]
    args3 = parse_step3_args(  # step 3's own flags and checks, as its main.py parses them
        ["--actor_model_name_or_path", actor, *algo_flags, "--data_path", args.data_path,
         "--output_dir", "unused", "--dtype", args.dtype, "--per_device_generation_batch_size", str(prompts_per_step),
         "--per_device_training_batch_size", str(batch_size), "--max_prompt_seq_len", "64",
         "--max_answer_seq_len", str(answer_len), "--actor_dropout", "0.0", "--critic_dropout", "0.0",
         "--num_warmup_steps", "0"] + (["--enable_hybrid_engine"] if args.hybrid_engine else []))
    data = build_phase_data(DataConfig(data_path=[args.data_path], data_output_path=args.data_output_path),
                            PromptFormat(tokenizer), PHASE_RLHF)
    loader = torch.utils.data.DataLoader(CappedPrompts(data.train, 64, "truncate"), batch_size=prompts_per_step,
                                         shuffle=True, collate_fn=PromptCollator(tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(0))
    trainer = PPOTrainer(build_rlhf_engine(args3, tokenizer, device, 1000, 1000), args3)
    engine = trainer.engine
    # FLOPs count the parameters that multiply activations (flops.py); the table shows all parameters.
    # A critic-free row has no critic and no reward model (the checker rewards): 0 parameters of theirs.
    n_actor, n_ref, n_critic, n_reward = (0 if e is None else flops.matmul_params(e.module)
                                          for e in (engine.actor, engine.ref, engine.critic, engine.reward))
    params, critic_params = (0 if e is None else sum(p.numel() for p in e.module.parameters())
                             for e in (engine.actor, engine.critic))
    batches = iter(loader)
    timings = {"generation_s": 0.0, "experience_s": 0.0, "training_s": 0.0}
    samples = generated_tokens = prompt_tokens = computed_tokens = 0
    for step in range(1 + args.steps):
        if step == 1:
            start = time.perf_counter()
            timings = dict.fromkeys(timings, 0.0)
            samples = generated_tokens = prompt_tokens = computed_tokens = 0
        experience, rollout = trainer.generate_experience(next(batches))
        train_start = time.perf_counter()
        trainer.train_rlhf(experience)
        timings["training_s"] += time.perf_counter() - train_start
        timings["generation_s"] += rollout.generation_s
        timings["experience_s"] += rollout.scoring_s
        samples += len(rollout.lengths)
        generated_tokens += int(rollout.lengths.sum())
        prompt_tokens += int(experience.prompt_mask.sum())
        computed_tokens += experience.prompt_ids.numel() + experience.answer_ids.numel()
    elapsed = time.perf_counter() - start
    sequence_tokens = prompt_tokens + generated_tokens  # what experience and training passes read, pad excluded
    phase_flops = {"generation": flops.forward_flops(n_actor, sequence_tokens),
                   "experience": flops.forward_flops(n_actor + n_ref + n_critic + n_reward, sequence_tokens),
                   "training": flops.train_flops(n_actor + n_critic, sequence_tokens)}
    return {"model": model_name, "algo": algo, "n_samples_per_prompt": args3.rl.n_samples_per_prompt,
            "critic_model": (args.critic_model or model_name) if algo == "ppo" else None, "params": params,
            "critic_params": critic_params, "matmul_params": {"actor": n_actor, "critic": n_critic},
            "answer_len": answer_len, "batch_size": batch_size, "steps": args.steps,
            "dtype": args.dtype, "hybrid_engine": args.hybrid_engine,
            "hybrid_generation": engine.hybrid_generation,
            "mean_answer_tokens": round(generated_tokens / samples, 1),
            "samples_per_s": round(samples / elapsed, 2),
            "generated_tokens_per_s": round(generated_tokens / elapsed, 1),
            "real_tokens_per_s": round(sequence_tokens / elapsed, 1),
            "padding_efficiency": round(sequence_tokens / computed_tokens, 4),
            **{k: round(v, 3) for k, v in timings.items()},
            "time_share": {k.removesuffix("_s"): round(v / elapsed, 3) for k, v in timings.items()},
            "model_gflops_per_s": {**{phase: flops.gflops_per_s(f, timings[f"{phase}_s"])
                                      for phase, f in phase_flops.items()},
                                   "total": flops.gflops_per_s(sum(phase_flops.values()), elapsed)},
            "peak_rss_mib": rows.peak_rss_mib(),
            "torch_threads": torch.get_num_threads()}


def collect(argv: list[str]) -> dict:
    """Run every row of `argv`'s benchmark, each in its own process; the JSON document."""
    args = parse_args(argv)
    results = []
    for model_name in args.models:
        for answer_len in args.answer_lens:
            for batch_size in args.batch_sizes:
                for algo in args.algos:
                    results.append(rows.run_row(__file__, argv, [model_name, str(answer_len), str(batch_size), algo]))
                    row = results[-1]
                    print(f" {algo:>8} {model_name:>14} answer={answer_len:<4} batch={batch_size:<3} "
                          f"{row['samples_per_s']:>7} samples/s {row['generated_tokens_per_s']:>8} gen tok/s  "
                          f"split {row['time_share']}", file=sys.stderr)
    return {"benchmark": "ppo_step3", "rows": results}


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.row:
        rows.print_row(run_row(args, args.row[0], int(args.row[1]), int(args.row[2]), args.row[3]))
        return
    print(json.dumps(collect(argv), indent=1))


if __name__ == "__main__":
    main()
