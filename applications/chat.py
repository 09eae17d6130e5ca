"""Chat with a trained actor (step 1, DPO or step 3 output, or any Hugging Face causal LM directory).

    python applications/chat.py --path output/step3-models/actor
    printf 'What is 2 + 3?\\nAnd 4 + 4?\\nquit\\n' | python applications/chat.py --path DIR --greedy

Type a message and press Enter; "clear" empties the history, "quit" (or end of input) exits. The model
sees the whole conversation in the training prompt format; the oldest turns are dropped when it gets
longer than --max_history_tokens. Replies stream to stdout as "Assistant: <reply>" lines; the "Human: "
prompt is shown only when stdin is a terminal, and notices go to stderr, so piped output stays parseable.
"""
import argparse
import contextlib
import sys

from inference.chat import ChatSession, Conversation, context_length
from inference.generation import SamplingConfig, default_device, load_causal_lm
from training.utils.errors import UserInputError, report_user_errors
from training.utils.runtime import set_random_seed

FALLBACK_CONTEXT = 1024  # for configs that do not state their maximum length


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Multi-turn chat with a trained actor, from a terminal or a pipe.")
    parser.add_argument("--path", type=str, required=True,
                        help="A model directory saved by step 1, DPO or step 3 (or any HF causal LM directory), "
                             "loaded offline; tiny/opt | tiny/llama give a random-initialised baseline.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Most tokens per reply.")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="[new] Sampling temperature; 0 means greedy decoding.")
    parser.add_argument("--top_p", type=float, default=0.9, help="[new] Nucleus sampling mass (1.0: off).")
    parser.add_argument("--top_k", type=int, default=0, help="[new] Sample from the k likeliest tokens (0: off).")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="[new] >1 discourages repeats.")
    parser.add_argument("--greedy", action="store_true",
                        help="[new] Greedy decoding whatever --temperature says (deterministic replies).")
    parser.add_argument("--seed", type=int, default=1234, help="[new] Sampling seed, so a scripted chat repeats.")
    parser.add_argument("--max_history_tokens", type=int, default=None,
                        help="[new] Most tokens of model input (history + new message); older turns are dropped "
                             "beyond it. Default: the model's context length minus --max_new_tokens.")
    parser.add_argument("--show_prompt", action="store_true",
                        help="[new] Print each model input (decoded, special tokens shown) to stderr.")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise UserInputError(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if args.max_history_tokens is not None and args.max_history_tokens < 1:
        raise UserInputError(f"--max_history_tokens must be at least 1 (got {args.max_history_tokens})")
    return args


def history_limit(args, model) -> int:
    if args.max_history_tokens is not None:
        return args.max_history_tokens
    context = context_length(model) or FALLBACK_CONTEXT
    if context <= args.max_new_tokens:
        raise UserInputError(f"--max_new_tokens {args.max_new_tokens} leaves no room for input in the model's "
                             f"{context}-token context: lower it")
    return context - args.max_new_tokens


@report_user_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    set_random_seed(args.seed)
    device = default_device()
    with contextlib.redirect_stdout(sys.stderr):  # library logs while loading must not mix with the replies
        model, tokenizer = load_causal_lm(args.path, device)
    sampling = SamplingConfig.from_temperature(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                               args.repetition_penalty, args.greedy)
    session = ChatSession(model, tokenizer, Conversation(tokenizer, history_limit(args, model)), sampling,
                          out=sys.stdout, log=sys.stderr, show_prompt=args.show_prompt)
    interactive = sys.stdin.isatty()
    print(f"[chat] {args.path} on {device}; 'clear' empties the history, 'quit' exits", file=sys.stderr, flush=True)
    try:
        session.run(sys.stdin.readline, prompt_user=interactive)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
