"""Step-3 (PPO) throughput benchmark: prints one JSON document.

    python tests/bench/bench_ppo.py                                   # tiny/opt and tiny/opt-20m, answers of 16 and 64
    python tests/bench/bench_ppo.py --models tiny/opt --answer_lens 32 128 --steps 10

Each row (model x answer length) runs in its own process (so peak RSS is that row's own), one rank, with
the same components as step 3: phase-3 prompts of the synthetic task, the RLHF engine (actor, reference,
critic, reward model; ZeRO-0, fp32) and the PPO trainer. The models are random-initialised, so answers
practically never sample EOS and run to --max_answer_seq_len: the answer length is what the row says.
Per row: samples/s (answers per second of a whole PPO step), generated tokens/s, the time split between
generation, experience (the scoring forward passes of actor, reference, critic and reward model) and
training, and peak RSS in MiB.
"""
import argparse
import json
import sys
import tempfile
import time

import rows  # tests/bench/rows.py, beside this script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["tiny/opt", "tiny/opt-20m"])
    parser.add_argument("--answer_lens", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--data_path", default="synthetic/copy")
    parser.add_argument("--batch_size", type=int, default=16, help="Generation and training batch per step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed PPO steps (after one warm-up step).")
    parser.add_argument("--data_output_path", default="/tmp/data_files/bench")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "ANSWER_LEN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_row(args, model_name: str, answer_len: int) -> dict:
    import torch

    from training.step3_rlhf_finetuning.main import parse_args as step3_args
    from training.utils import runtime
    from training.utils.data.collators import PromptCollator
    from training.utils.data.pipeline import PHASE_RLHF, DataConfig, build_phase_data
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.rlhf.engine import build_rlhf_engine
    from training.utils.rlhf.experience import CappedPrompts
    from training.utils.rlhf.ppo_trainer import PPOConfig, PPOTrainer
    from training.utils.tokenizer import load_tokenizer

    device = runtime.init_distributed()
    runtime.set_random_seed(0)
    tokenizer = load_tokenizer(model_name)
    reward_dir = tempfile.mkdtemp(prefix="bench_ppo_reward_")
    save_reward_model(create_reward_model(model_name, tokenizer), tokenizer, reward_dir, reward_stats={})
    args3 = step3_args(["--actor_model_name_or_path", model_name, "--critic_model_name_or_path", reward_dir,
                        "--data_path", args.data_path, "--output_dir", "unused", "--dtype", "fp32",
                        "--per_device_generation_batch_size", str(args.batch_size),
                        "--per_device_training_batch_size", str(args.batch_size),
                        "--max_prompt_seq_len", "64", "--max_answer_seq_len", str(answer_len),
                        "--actor_dropout", "0.0", "--critic_dropout", "0.0", "--num_warmup_steps", "0"])
    data = build_phase_data(DataConfig(data_path=(args.data_path,), data_output_path=args.data_output_path),
                            tokenizer, PHASE_RLHF)
    loader = torch.utils.data.DataLoader(CappedPrompts(data.train, 64, "truncate"), batch_size=args.batch_size,
                                         shuffle=True, collate_fn=PromptCollator(tokenizer.pad_token_id),
                                         generator=torch.Generator().manual_seed(0))
    trainer = PPOTrainer(build_rlhf_engine(args3, tokenizer, device, 1000, 1000), PPOConfig.from_args(args3))
    params = sum(p.numel() for p in trainer.engine.actor.module.parameters())
    batches = iter(loader)
    timings = {"generation_s": 0.0, "experience_s": 0.0, "training_s": 0.0}
    samples = generated_tokens = 0
    for step in range(1 + args.steps):
        if step == 1:
            start = time.perf_counter()
            timings = dict.fromkeys(timings, 0.0)
            samples = generated_tokens = 0
        experience, rollout = trainer.generate_experience(next(batches))
        train_start = time.perf_counter()
        trainer.train_rlhf(experience)
        timings["training_s"] += time.perf_counter() - train_start
        timings["generation_s"] += rollout.generation_s
        timings["experience_s"] += rollout.scoring_s
        samples += len(rollout.lengths)
        generated_tokens += int(rollout.lengths.sum())
    elapsed = time.perf_counter() - start
    return {"model": model_name, "params": params, "answer_len": answer_len, "batch_size": args.batch_size,
            "steps": args.steps, "mean_answer_tokens": round(generated_tokens / samples, 1),
            "samples_per_s": round(samples / elapsed, 2), "generated_tokens_per_s": round(generated_tokens / elapsed, 1),
            **{k: round(v, 3) for k, v in timings.items()},
            "time_share": {k.removesuffix("_s"): round(v / elapsed, 3) for k, v in timings.items()},
            "peak_rss_mib": rows.peak_rss_mib(),
            "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.row:
        rows.print_row(run_row(args, args.row[0], int(args.row[1])))
        return
    results = []
    base = list(argv if argv is not None else sys.argv[1:])
    for model_name in args.models:
        for answer_len in args.answer_lens:
            results.append(rows.run_row(__file__, base, [model_name, str(answer_len)]))
            row = results[-1]
            print(f"{model_name:>14} answer={answer_len:<4} {row['samples_per_s']:>7} samples/s "
                  f"{row['generated_tokens_per_s']:>8} gen tok/s  split {row['time_share']}", file=sys.stderr)
    print(json.dumps({"benchmark": "ppo_step3", "rows": results}, indent=1))


if __name__ == "__main__":
    main()
