"""Compare a baseline and a fine-tuned model on the same prompts, side by side, offline.

    python prompt_eval.py --model_name_or_path_baseline BASE --model_name_or_path_finetune SFT_DIR
    python prompt_eval.py ... --synthetic_task synthetic/arithmetic --num_prompts 200   # adds checker accuracy
"""
import torch

from training.utils.config import at_least, configuration, group, option, parse_config
from training.utils.data.chat_format import PromptFormatFlags, chosen_format, resolve_prompt_format
from training.utils.data.conversation import format_user_turn
from training.utils.errors import UserInputError, report_user_errors
from training.utils.flags import EotTokenFlags, EvalBatchFlags, ReplyLengthFlags, SamplingFlags, SeedFlags
from training.utils.model.build import check_fits_positions
from training.utils.model.load import load_causal_lm
from training.utils.sampling import SamplingConfig, generate_replies
from training.utils.seeding import set_random_seed

DEFAULT_PROMPTS = {
    "English": ["Human: Please tell me about Microsoft in a few sentence? Assistant:",
                "Human: Explain the moon landing to a 6 year old in a few sentences. Assistant:",
                "Human: What is 23 + 45? Assistant:"],
    "Chinese": ["Human: 请用几句话介绍一下微软? Assistant:"],
    "Japanese": ["Human: マイクロソフトについて、簡単に教えてください。 Assistant:"],
}


@configuration(max_new_tokens=64)
class PromptEvalConfig(ReplyLengthFlags, SeedFlags, EvalBatchFlags, PromptFormatFlags, EotTokenFlags):
    model_name_or_path_baseline: str = option(help="The model before fine-tuning (a directory or tiny name).",
                                              required=True)
    model_name_or_path_finetune: str = option(help="The fine-tuned model directory.", required=True)
    language: str = option("English", "Language of the built-in questions.", choices=tuple(sorted(DEFAULT_PROMPTS)))
    prompts: list[str] | None = option(None, "Questions to ask (plain text) instead of the built-in ones.")
    synthetic_task: str | None = option(None, "[new] synthetic/arithmetic[...] or synthetic/copy: ask its held-out "
                                              "questions and report the checker's accuracy.")
    num_prompts: int = option(100, "Questions taken from --synthetic_task.", check=at_least(1))
    num_return_sequences: int = option(1, "Accepted for DeepSpeed-Chat compatibility (one reply per prompt).")
    do_sample: bool = option(False, "Sample with --temperature/--top_p/--top_k instead of greedy decoding.")
    num_beams: int = option(1, "Beam search width (greedy decoding only).", check=at_least(1))
    num_beam_groups: int = option(1, "Accepted for DeepSpeed-Chat compatibility; only 1: transformers 5 moved "
                                     "diverse (group) beam search to a Hub repository of remote code, which this "
                                     "offline tool does not run.", check=at_least(1))
    penalty_alpha: float | None = option(None, "Accepted for DeepSpeed-Chat compatibility; leave it unset: "
                                               "transformers 5 moved contrastive search to a Hub repository of remote "
                                               "code, which this offline tool does not run.")
    sampling: SamplingFlags = group(SamplingFlags)

    def validate(self) -> None:
        moved = {"--num_beam_groups": self.num_beam_groups != 1, "--penalty_alpha": self.penalty_alpha is not None}
        for flag, given in moved.items():
            if given:
                raise UserInputError(f"{flag}: transformers 5 moved this decoding method (diverse beam search, "
                                     "contrastive search) to a Hub repository of remote code, which prompt_eval "
                                     f"does not run: drop {flag} (--num_beams, --do_sample and --top_k remain)")
        chosen_format(self, self.model_paths())

    def model_paths(self, first: str | None = None) -> dict[str, str]:
        """Both models by flag (`first` of them first): they are asked in one format, the one either was
        trained with (chat_format.chosen_format)."""
        paths = {"--model_name_or_path_baseline": self.model_name_or_path_baseline,
                 "--model_name_or_path_finetune": self.model_name_or_path_finetune}
        return dict(sorted(paths.items(), key=lambda item: item[1] != first))


def parse_args(argv=None) -> PromptEvalConfig:
    return parse_config(PromptEvalConfig, argv, "Baseline vs fine-tuned generations, side by side.")


def _to_prompt(text: str) -> str:
    text = text.strip()
    if text.startswith("Human:") and text.endswith("Assistant:"):
        text = text[len("Human:"):-len("Assistant:")]
    return format_user_turn(text)


def check_prompts_fit(model, prompt_format, prompts: list[str], max_new_tokens: int, path: str) -> None:
    """Refuse before generating when the longest prompt plus --max_new_tokens exceeds the model's positions
    (generation would fail with an IndexError half-way through)."""
    lengths = [len(prompt_format.encode_prompt(p)) for p in prompts]
    longest = max(range(len(prompts)), key=lengths.__getitem__)
    check_fits_positions(model.config, lengths[longest] + max_new_tokens,
                         f"prompt {longest} ({lengths[longest]} tokens) + --max_new_tokens {max_new_tokens}", path,
                         "shorten that prompt or lower --max_new_tokens so that both fit in {limit} tokens")


@report_user_errors
def main(argv=None) -> dict:
    config = parse_args(argv)
    set_random_seed(config.seed)
    checker = None
    if config.synthetic_task:
        from training.utils.data.synthetic import check_answer, generate_rows, parse_synthetic_name

        if not config.synthetic_task.startswith("synthetic/"):
            raise UserInputError(f"--synthetic_task {config.synthetic_task}: only synthetic/... has a checker; "
                                 "use --prompts for other questions")
        rows = generate_rows(parse_synthetic_name(config.synthetic_task), "eval")[:config.num_prompts]
        prompts, checker = [row["prompt"] for row in rows], check_answer
    else:
        prompts = [_to_prompt(p) for p in (config.prompts or DEFAULT_PROMPTS[config.language])]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampling = SamplingConfig.from_flags(config.max_new_tokens, config.sampling, do_sample=config.do_sample,
                                         num_beams=config.num_beams)
    results = {}
    for label, path in (("baseline", config.model_name_or_path_baseline),
                        ("finetune", config.model_name_or_path_finetune)):
        model, tokenizer = load_causal_lm(path, device, config.add_eot_token, config.eot_token)
        prompt_format = resolve_prompt_format(tokenizer, config, config.model_paths(first=path))
        print(f"{label} model {path}, format: {prompt_format.describe()}")
        check_prompts_fit(model, prompt_format, prompts, config.max_new_tokens, path)
        results[label] = generate_replies(model, prompt_format, prompts, sampling, config.batch_size)
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
