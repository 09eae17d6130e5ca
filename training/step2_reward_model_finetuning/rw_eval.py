"""Score replies with a trained reward model (the one step 2 saved, really loaded).

    python rw_eval.py --model_name_or_path out/reward --prompt "What is 2 + 2?" --chosen " 4" --rejected " 5"
    python rw_eval.py --model_name_or_path out/reward --pairs prefs.jsonl        # accuracy + per-pair scores
    python rw_eval.py --model_name_or_path out/reward --samples replies.jsonl    # {"prompt", "response"} rows
    python rw_eval.py --model_name_or_path out/reward      # the built-in example pairs, as DeepSpeed-Chat's rw_eval

Prompts without the "Human: ... Assistant:" markers are one user turn; prompt and reply are rendered in the
format the reward model was trained with (its prompt_format.json), every reply closed by the end-of-turn
token exactly as in training, so the score is read where the model learnt to put it.
"""
import json
import sys

import torch

from training.utils.config import at_least, configuration, group, option, parse_config
from training.utils.data.chat_format import PromptFormat, PromptFormatFlags, chosen_format, resolve_prompt_format
from training.utils.data.collators import pad_batch
from training.utils.data.conversation import ASSISTANT, Chunk, format_user_turn
from training.utils.data.pipeline import SeqLenFlags
from training.utils.data.sources import open_source
from training.utils.errors import UserInputError, report_user_errors
from training.utils.flags import EotTokenFlags, EvalBatchFlags, ModelPathFlags, PaddingCompatFlags
from training.utils.losses import pairwise_accuracy
from training.utils.model.build import check_fits_positions
from training.utils.model.reward_model import load_reward_model


@configuration()
class RewardEvalConfig(SeqLenFlags, EvalBatchFlags, PaddingCompatFlags, PromptFormatFlags, EotTokenFlags):
    model: ModelPathFlags = group(ModelPathFlags, help={"model_name_or_path": "A step-2 output directory."})
    prompt: str | None = option(None, "One prompt (plain text or HH format).")
    chosen: str | None = option(None, "A reply to --prompt (with --rejected: a pair).")
    rejected: str | None = option(None, "A second reply to --prompt.")
    pairs: str | None = option(None, "A .json/.jsonl/.parquet file of prompt/chosen/rejected rows: accuracy.")
    samples: str | None = option(None, "A .jsonl file of prompt/response rows: scores only.")
    show: int = option(20, "Rows of per-sample scores to print.", check=at_least(0))
    output_json: str | None = option(None, "Also write every score and the summary to this file.")

    def validate(self) -> None:
        if sum(x is not None for x in (self.prompt, self.pairs, self.samples)) > 1:
            raise UserInputError("give at most one of --prompt (with --chosen [--rejected]), --pairs FILE, "
                                 "--samples FILE (none: the built-in example pairs)")
        if self.prompt is not None and self.chosen is None:
            raise UserInputError("--prompt needs --chosen (and optionally --rejected)")
        chosen_format(self, {"--model_name_or_path": self.model.model_name_or_path})


def parse_args(argv=None) -> RewardEvalConfig:
    return parse_config(RewardEvalConfig, argv, "Score prompt/reply pairs with a trained reward model.")


# Scored when no input is given (DeepSpeed-Chat's rw_eval scores a few built-in pairs the same way): a sanity
# check that a reward model prefers a helpful, direct reply.
EXAMPLE_PAIRS = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
     "I am not sure. Maybe it depends on the weather."),
    ("Give me one tip for sleeping better.",
     "Keep a regular schedule: go to bed and get up at the same time every day, weekends included.",
     "Sleep is overrated; stay up as late as you like."),
]


def as_prompt(text: str) -> str:
    return text if ASSISTANT in text else format_user_turn(text)


@torch.no_grad()
def score(model, prompt_format: PromptFormat, prompts: list[list[Chunk]], replies: list[str], max_seq_len: int,
          batch_size: int) -> list[float]:
    """Reward of each (rendered prompt, reply): the value at the end-of-turn token that closes the reply
    (prompts cut from the left to fit)."""
    tokenizer = prompt_format.tokenizer
    conversations = [prompt + [prompt_format.reply(r)] for prompt, r in zip(prompts, replies)]
    encoded = [ids[-max_seq_len:] for ids, _ in prompt_format.encode(conversations)]
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        input_ids, attention_mask = pad_batch(chunk, tokenizer.pad_token_id, max(map(len, chunk)))
        output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        scores += output.end_scores.float().tolist()
    return scores


def load_rows(path: str, need_pairs: bool):
    source = open_source(path)
    rows = source.rows("train")
    if source.has_eval_split:
        rows += source.rows("eval")
    if need_pairs:
        rows = [r for r in rows if r.chosen and r.rejected]
        if not rows:
            raise UserInputError(f"'{path}' has no rows with prompt, chosen and rejected")
    return rows


@report_user_errors
def main(argv=None) -> dict:
    config = parse_args(argv)
    model, tokenizer, info = load_reward_model(config.model.model_name_or_path, add_eot_token=config.add_eot_token,
                                               eot_token=config.eot_token)
    prompt_format = resolve_prompt_format(tokenizer, config, {"--model_name_or_path": config.model.model_name_or_path})
    check_fits_positions(model.config, config.max_seq_len, f"--max_seq_len {config.max_seq_len}",
                         config.model.model_name_or_path, "lower --max_seq_len to at most {limit}")
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if config.prompt is not None or not (config.pairs or config.samples):
        examples = [(config.prompt, config.chosen, config.rejected)] if config.prompt is not None else EXAMPLE_PAIRS
        prompts, chosen = [as_prompt(p) for p, _, _ in examples], [c for _, c, _ in examples]
        rejected = [r for _, _, r in examples] if examples[0][2] is not None else None
        rendered = [prompt_format.prompt(p) for p in prompts]
    else:
        rows = load_rows(config.pairs or config.samples, need_pairs=config.pairs is not None)
        prompts, chosen = [r.prompt for r in rows], [r.chosen for r in rows]
        rejected = [r.rejected for r in rows] if config.pairs else None
        rendered = [prompt_format.prompt_of(r) for r in rows]
    chosen_scores = score(model, prompt_format, rendered, chosen, config.max_seq_len, config.batch_size)
    rejected_scores = (score(model, prompt_format, rendered, rejected, config.max_seq_len, config.batch_size)
                       if rejected else None)
    for i in range(min(config.show, len(prompts))):
        line = f"[{i}] prompt {prompts[i].strip()[:80]!r}\n    chosen   {chosen_scores[i]:+.4f}  {chosen[i][:80]!r}"
        if rejected_scores:
            line += f"\n    rejected {rejected_scores[i]:+.4f}  {rejected[i][:80]!r}"
        print(line)
    summary = {"rows": len(prompts), "mean_score": sum(chosen_scores) / len(chosen_scores),
               "saved_reward_stats": info.get("reward_stats", {})}
    if rejected_scores:
        summary["accuracy"] = pairwise_accuracy(torch.tensor(chosen_scores), torch.tensor(rejected_scores)).item()
        summary["mean_margin"] = sum(c - r for c, r in zip(chosen_scores, rejected_scores)) / len(prompts)
    print(json.dumps(summary))
    if config.output_json:
        with open(config.output_json, "w", encoding="utf-8") as f:
            json.dump({**summary, "chosen_scores": chosen_scores, "rejected_scores": rejected_scores}, f, indent=1)
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
