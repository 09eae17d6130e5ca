"""Training throughput benchmark for step 1 (SFT), step 2 (reward model) and DPO: prints one JSON document.

    python benchmarks/bench_train.py --step sft             # tiny/opt and tiny/opt-20m, synthetic data
    python benchmarks/bench_train.py --step rm              # reward model: pairs/s
    python benchmarks/bench_train.py --step dpo             # DPO: pairs/s, policy trained + frozen reference
    python benchmarks/bench_train.py --data_path ../shared/data/gsm8k_train.sft.jsonl --max_seq_len 256

Each row runs in its own process (so peak RSS is that row's own), one rank, the same components as the
step (tokenizer, phase cache, collator, model, DeepSpeed engine, loss). SFT rows: every model x {pad to the
longest sample in the batch (what step 1 does), pad to --max_seq_len (the reference)}. RM rows: every
model, padded to the longest of the batch's 2B sequences. Figures: samples/s (pairs/s for rm), real
tokens/s (non-pad), computed tokens/s, padding efficiency (real / computed), peak RSS in MiB.
"""
import argparse
import json
import sys
import time

from benchmarks import flops, rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=["sft", "rm", "dpo"], default="sft")
    parser.add_argument("--models", nargs="*", default=["tiny/opt", "tiny/opt-20m"])
    parser.add_argument("--data_path", default="synthetic/arithmetic")
    parser.add_argument("--max_seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="Timed steps (after 3 warm-up steps).")
    parser.add_argument("--data_output_path", default="/tmp/data_files/bench")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "PADDING"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_row(args, model_name: str, padding: str) -> dict:
    import deepspeed
    import torch

    from training.utils import distributed, seeding
    from training.utils.data.chat_format import PromptFormat
    from training.utils.data.collators import PairCollator, SFTCollator
    from training.utils.data.pipeline import PHASE_REWARD, PHASE_SFT, DataConfig, build_phase_data
    from training.utils.ds_config import get_train_ds_config
    from training.utils.losses import causal_lm_loss, dpo_loss, pairwise_loss, sequence_log_probs
    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model
    from training.utils.tokenizer import load_tokenizer

    device = distributed.init_distributed()
    seeding.set_random_seed(0)
    tokenizer = load_tokenizer(model_name)
    pairs = args.step in ("rm", "dpo")
    data = build_phase_data(DataConfig(data_path=(args.data_path,), data_split="0,1,0" if pairs else "1,0,0",
                                       data_output_path=args.data_output_path, max_seq_len=args.max_seq_len),
                            PromptFormat(tokenizer), PHASE_REWARD if pairs else PHASE_SFT)
    if pairs:
        collator = PairCollator(tokenizer.pad_token_id)
    else:
        collator = SFTCollator(tokenizer.pad_token_id, pad_to=args.max_seq_len if padding == "max_length" else None)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(0))
    ds_config = get_train_ds_config(offload=False, dtype="fp32", stage=0, train_batch_size=args.batch_size,
                                    micro_batch_size=args.batch_size, gradient_accumulation_steps=1,
                                    device=device.type)
    build = create_reward_model if args.step == "rm" else create_hf_model
    model = build(model_name, tokenizer, ds_config=ds_config)
    params = sum(p.numel() for p in model.parameters())
    flop_params = flops.matmul_params(model)
    # DPO's frozen reference: the same starting weights, forward only (as step 2's DPO builds it).
    reference = create_hf_model(model_name, tokenizer).eval() if args.step == "dpo" else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    batches = iter(loader)
    samples = real_tokens = computed_tokens = 0
    for step in range(3 + args.steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        if step == 3:
            start = time.perf_counter()
            samples = real_tokens = computed_tokens = 0
        output = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if args.step == "rm":
            loss = pairwise_loss(*output.end_scores.chunk(2))
        elif args.step == "dpo":
            policy_logps = sequence_log_probs(output.logits, batch["input_ids"], batch["reply_mask"])
            with torch.no_grad():
                logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
                reference_logps = sequence_log_probs(logits, batch["input_ids"], batch["reply_mask"])
            loss = dpo_loss(*policy_logps.chunk(2), *reference_logps.chunk(2), beta=0.1)[0].mean()
        else:
            loss = causal_lm_loss(output.logits, batch["labels"])
        engine.backward(loss)
        engine.step()
        samples += batch["input_ids"].size(0) // (2 if pairs else 1)
        real_tokens += int(batch["attention_mask"].sum())
        computed_tokens += batch["input_ids"].numel()
    elapsed = time.perf_counter() - start
    model_flops = flops.train_flops(flop_params, real_tokens)
    if reference is not None:
        model_flops += flops.forward_flops(flop_params, real_tokens)
    return {"step": args.step, "model": model_name, "params": params, "matmul_params": flop_params,
            "padding": padding, "data_path": args.data_path,
            "max_seq_len": args.max_seq_len, "batch_size": args.batch_size, "steps": args.steps,
            "samples_per_s": round(samples / elapsed, 2), "real_tokens_per_s": round(real_tokens / elapsed, 1),
            "computed_tokens_per_s": round(computed_tokens / elapsed, 1),
            "padding_efficiency": round(real_tokens / computed_tokens, 4),
            "model_gflops_per_s": flops.gflops_per_s(model_flops, elapsed),
            "peak_rss_mib": rows.peak_rss_mib(),
            "torch_threads": torch.get_num_threads()}


def collect(argv: list[str]) -> dict:
    """Run every row of `argv`'s benchmark, each in its own process; the JSON document."""
    args = parse_args(argv)
    results = []
    for model_name in args.models:
        for padding in ("longest", "max_length") if args.step == "sft" else ("longest",):
            results.append(rows.run_row(__file__, argv, [model_name, padding]))
            print(f"{args.step:>4} {model_name:>14} pad={padding:<10} {results[-1]['samples_per_s']:>8} samples/s "
                  f"{results[-1]['real_tokens_per_s']:>9} real tok/s  eff {results[-1]['padding_efficiency']}",
                  file=sys.stderr)
    return {"benchmark": f"train_{args.step}", "rows": results}


def main(argv=None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.row:
        rows.print_row(run_row(args, *args.row))
        return
    print(json.dumps(collect(argv), indent=1))


if __name__ == "__main__":
    main()
