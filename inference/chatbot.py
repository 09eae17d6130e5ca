"""Chat with a trained actor (step 1, DPO or step 3 output, or any Hugging Face causal LM directory): the entry
point DeepSpeed-Chat calls `inference/chatbot.py`, also run as `applications/chat.py`.

    python applications/chat.py --path output/step3-models/actor
    python inference/chatbot.py --path output/step3-models/actor --max_new_tokens 128
    printf 'What is 2 + 3?\\nAnd 4 + 4?\\nquit\\n' | python applications/chat.py --path DIR

Type a message and press Enter; "clear" empties the history, "quit" (or end of input) exits. The model
sees the whole conversation in the prompt format it was trained with (its prompt_format.json: HH text or its
chat template; --apply_chat_template for a model saved without one); the oldest turns are dropped when it gets
longer than --max_history_tokens. Decoding is greedy by default, as DeepSpeed-Chat's chatbot decodes;
--temperature above 0 samples (with --top_p, --top_k). Replies stream to stdout as "Assistant: <reply>" lines;
the "Human: " prompt is shown only when stdin is a terminal, and notices go to stderr, so piped output stays
parseable.
"""
import contextlib
import sys

from inference.chat import ChatSession, Conversation, context_length
from training.utils.config import at_least, configuration, group, option, parse_config
from training.utils.data.chat_format import PromptFormatFlags, chosen_format, resolve_prompt_format
from training.utils.errors import UserInputError, report_user_errors
from training.utils.flags import ReplyLengthFlags, SamplingFlags, SeedFlags
from training.utils.model.load import default_device, load_causal_lm
from training.utils.sampling import SamplingConfig
from training.utils.seeding import set_random_seed

FALLBACK_CONTEXT = 1024  # for configs that do not state their maximum length


@configuration()
class ChatConfig(ReplyLengthFlags, SeedFlags, PromptFormatFlags):
    path: str = option(help="A model directory saved by step 1, DPO or step 3 (or any HF causal LM directory), loaded "
                            "offline; tiny/opt | tiny/llama give a random-initialised baseline.", required=True)
    # Greedy by default, as DeepSpeed-Chat's chatbot decodes; --temperature above 0 samples.
    sampling: SamplingFlags = group(SamplingFlags, temperature=0.0, top_p=0.9)
    greedy: bool = option(False, "[new] Greedy decoding whatever --temperature says (deterministic replies).")
    max_history_tokens: int | None = option(None, "[new] Most tokens of model input (history + new message); older "
                                                  "turns are dropped beyond it. Default: the model's context length "
                                                  "minus --max_new_tokens.", check=at_least(1))
    show_prompt: bool = option(False, "[new] Print each model input (decoded, special tokens shown) to stderr.")


    def validate(self) -> None:
        chosen_format(self, {"--path": self.path})


def parse_args(argv=None) -> ChatConfig:
    return parse_config(ChatConfig, argv, "Multi-turn chat with a trained actor, from a terminal or a pipe.")


def history_limit(config: ChatConfig, model) -> int:
    """Most tokens of model input. History and reply together must fit the model's positions (beyond them the
    embedding lookup fails), so a larger --max_history_tokens is lowered to what fits, said once on stderr."""
    context = context_length(model)
    if context is None:  # the config states no limit: trust --max_history_tokens, else assume a common one
        if config.max_history_tokens is not None:
            return config.max_history_tokens
        context = FALLBACK_CONTEXT
    if context <= config.max_new_tokens:
        raise UserInputError(f"--max_new_tokens {config.max_new_tokens} leaves no room for input in the model's "
                             f"{context}-token context: lower it")
    room = context - config.max_new_tokens
    if config.max_history_tokens is not None and config.max_history_tokens > room:
        print(f"[chat] --max_history_tokens {config.max_history_tokens} + --max_new_tokens {config.max_new_tokens} "
              f"is more than the model's {context} positions: keeping the most recent turns that fit in {room} "
              "tokens", file=sys.stderr, flush=True)
    return min(config.max_history_tokens or room, room)


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    set_random_seed(config.seed)
    device = default_device()
    with contextlib.redirect_stdout(sys.stderr):  # library logs while loading must not mix with the replies
        model, tokenizer = load_causal_lm(config.path, device)
    prompt_format = resolve_prompt_format(tokenizer, config, {"--path": config.path})
    sampling = SamplingConfig.from_flags(config.max_new_tokens, config.sampling,
                                         do_sample=False if config.greedy else None)
    session = ChatSession(model, tokenizer, Conversation(prompt_format, history_limit(config, model)), sampling,
                          out=sys.stdout, log=sys.stderr, show_prompt=config.show_prompt)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD instead of ending the chat
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")
    interactive = sys.stdin.isatty()
    print(f"[chat] {config.path} on {device}, format: {prompt_format.describe()}; 'clear' empties the history, "
          "'quit' exits", file=sys.stderr, flush=True)
    try:
        session.run(sys.stdin.readline, prompt_user=interactive)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
