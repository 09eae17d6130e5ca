"""Compare a baseline and a fine-tuned model on the same prompts, side by side, offline.

    python prompt_eval.py --model_name_or_path_baseline BASE --model_name_or_path_finetune SFT_DIR
    python prompt_eval.py ... --data_path synthetic/arithmetic --num_prompts 200   # adds checker accuracy
"""
import argparse

import torch

from inference.generation import add_sampling_args, generate_replies, load_causal_lm, sampling_from_args
from training.utils.data.conversation import format_user_turn
from training.utils.errors import UserInputError, report_user_errors
from training.utils.runtime import set_random_seed

DEFAULT_PROMPTS = {
    "English": ["Human: Please tell me about Microsoft in a few sentence? Assistant:",
                "Human: Explain the moon landing to a 6 year old in a few sentences. Assistant:",
                "Human: What is 23 + 45? Assistant:"],
    "Chinese": ["Human: 请用几句话介绍一下微软? Assistant:"],
    "Japanese": ["Human: マイクロソフトについて、簡単に教えてください。 Assistant:"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Baseline vs fine-tuned generations, side by side.")
    parser.add_argument("--model_name_or_path_baseline", type=str, required=True)
    parser.add_argument("--model_name_or_path_finetune", type=str, required=True)
    parser.add_argument("--language", type=str, default="English", choices=sorted(DEFAULT_PROMPTS))
    parser.add_argument("--prompts", nargs="*", default=None, help="Questions to ask (plain text).")
    parser.add_argument("--data_path", type=str, default=None,
                        help="synthetic/arithmetic[...]: ask its eval questions and report checker accuracy.")
    parser.add_argument("--num_prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_return_sequences", type=int, default=1, help="Accepted for compatibility.")
    add_sampling_args(parser)
    return parser.parse_args(argv)


def _to_prompt(text: str) -> str:
    text = text.strip()
    if text.startswith("Human:") and text.endswith("Assistant:"):
        text = text[len("Human:"):-len("Assistant:")]
    return format_user_turn(text)


@report_user_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    set_random_seed(args.seed)
    checker = None
    if args.data_path:
        from training.utils.data.synthetic import check_answer, generate_rows, parse_synthetic_name

        if not args.data_path.startswith("synthetic/"):
            raise UserInputError(f"--data_path {args.data_path}: only synthetic/... has a checker; "
                                 "use --prompts for other questions")
        rows = generate_rows(parse_synthetic_name(args.data_path), "eval")[:args.num_prompts]
        prompts, checker = [row["prompt"] for row in rows], check_answer
    else:
        prompts = [_to_prompt(p) for p in (args.prompts or DEFAULT_PROMPTS[args.language])]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampling = sampling_from_args(args)
    results = {}
    for label, path in (("baseline", args.model_name_or_path_baseline),
                        ("finetune", args.model_name_or_path_finetune)):
        model, tokenizer = load_causal_lm(path, device)
        results[label] = generate_replies(model, tokenizer, prompts, sampling, args.batch_size)
        del model
    for i, prompt in enumerate(prompts[:20]):
        print(f"==== prompt {i}: {prompt.strip()!r}")
        print(f"  baseline: {results['baseline'][i]!r}")
        print(f"  finetune: {results['finetune'][i]!r}")
    summary = {}
    if checker is not None:
        for label in results:
            summary[f"{label}_accuracy"] = sum(checker(p, r) for p, r in zip(prompts, results[label])) / len(prompts)
        print(f"checker accuracy on {len(prompts)} held-out prompts: baseline {summary['baseline_accuracy']:.3f}, "
              f"finetune {summary['finetune_accuracy']:.3f}")
    return summary


if __name__ == "__main__":
    main()
