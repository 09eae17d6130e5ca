"""Logits only where the loss reads them, against full logits: step 1's forward + loss + backward on real HH batches.

    python benchmarks/bench_logits.py                                        # tiny/opt-20m (4k vocabulary)
    python benchmarks/bench_logits.py --model /path/to/SmolLM2-135M-Instruct  # a 49k vocabulary

Batches: the first --rows rows of ../shared/data/hh_harmless_test.pref.jsonl (prompt + chosen reply, the reply and
its EOS labelled as step 1 labels them, HH format), cut to --max_seq_len, sorted by length and cut into batches of
--batch_size (what length-grouped batches look like). The model keeps its weights (random for a built-in shape) in
--dtype. Each batch runs both ways back to back, in alternating order, --repeats times; the report gives the
median seconds per batch of each way, their ratio, the LM head's share of the model's matmul parameters, the
share of positions that are labelled, and peak RSS. One JSON object on stdout.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from benchmarks import flops

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "hh_harmless_test.pref.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny/opt-20m", help="A built-in shape (random weights) or a model folder.")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="HH preference jsonl (prompt, chosen).")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=2, help="Passes over the batches, each way.")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def batches(args, tokenizer):
    """Length-sorted SFT batches of HH rows: prompt unlabelled, reply + EOS labelled."""
    from training.utils.data.collators import SFTCollator

    samples = []
    with open(args.source, encoding="utf-8") as f:
        for line in list(f)[:args.rows]:
            row = json.loads(line)
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            reply = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt + reply)[:args.max_seq_len]
            mask = ([0] * len(prompt) + [1] * len(reply))[:args.max_seq_len]
            if sum(mask) > 1:
                samples.append({"input_ids": ids, "loss_mask": mask})
    samples.sort(key=lambda s: len(s["input_ids"]))
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    return [collate(samples[i:i + args.batch_size]) for i in range(0, len(samples), args.batch_size)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if not Path(args.source).is_file():
        sys.exit(f"error: --source {args.source} does not exist: pass a copy of hh_harmless_test.pref.jsonl")
    import torch

    from training.utils.losses import causal_lm_loss, labelled_positions
    from training.utils.model.build import create_hf_model
    from training.utils.model.logits import logits_at
    from training.utils.precision import TORCH_DTYPES, resolve_dtype
    from training.utils.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    dtype, why = resolve_dtype(args.dtype, "cpu")
    tokenizer = load_tokenizer(args.model)
    model = create_hf_model(args.model, tokenizer).to(TORCH_DTYPES[dtype]).train()
    data = batches(args, tokenizer)

    def step(batch, kept: bool) -> float:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        start = time.perf_counter()
        if kept:
            logits = logits_at(model, labelled_positions(batch["labels"]), **inputs)
        else:
            logits = model(**inputs).logits
        causal_lm_loss(logits, batch["labels"], compute_fp32=True).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(data[0], True)  # warm-up
    seconds = {True: [], False: []}
    for repeat in range(args.repeats):
        for i, batch in enumerate(data):
            for kept in ((True, False) if (repeat + i) % 2 == 0 else (False, True)):
                seconds[kept].append(step(batch, kept))
    head, matmul = model.get_output_embeddings().weight.numel(), flops.matmul_params(model)
    labelled = sum(int(labelled_positions(b["labels"]).sum()) for b in data)
    positions = sum(b["input_ids"].numel() for b in data)
    full, kept = sum(seconds[False]), sum(seconds[True])
    print(json.dumps({
        "model": args.model, "dtype": dtype, "dtype_reason": why, "vocab": int(model.config.vocab_size),
        "batches": len(data), "batch_size": args.batch_size, "threads": args.threads,
        "labelled_share_of_positions": round(labelled / positions, 3),
        "lm_head_share_of_matmul_params": round(head / matmul, 3),
        "full_logits_s_per_epoch": round(full / args.repeats, 2),
        "kept_logits_s_per_epoch": round(kept / args.repeats, 2),
        "median_batch_s": {"full": round(statistics.median(seconds[False]), 3),
                           "kept": round(statistics.median(seconds[True]), 3)},
        "speedup": round(full / kept, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }, indent=1))


if __name__ == "__main__":
    main()
