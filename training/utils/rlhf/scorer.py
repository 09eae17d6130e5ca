"""The reward of each answer in step 3: a reward model, a rule (a reward function), or both with weights.

    score = reward_model_weight x normalise(reward model) + reward_function_weight x function
                                                       (either term alone when only it is used, unweighted)

The reward model reads the token ids (prompt + answer, scored at the answer's last token). The function
(training/utils/rlhf/rewards.py) reads text: the prompt and the answer decoded without special tokens, and the
data row's reference answer. `Scores.raw` is what the step log reports as the reward (the reward model's score
before normalisation); `Scores.train` is what the advantages are computed from.
"""
from dataclasses import dataclass

import torch

from training.utils.masks import last_real_token_index
from training.utils.model.last_layer import last_layer_from
from training.utils.model.packed_linear import packed_linears
from training.utils.rlhf.control import RewardNormalizer
from training.utils.rlhf.rewards import compute_rule_rewards, load_reward_function


@dataclass
class Scores:
    raw: torch.Tensor  # [B] fp32 on the scoring device: logged as reward/mean
    train: torch.Tensor  # [B]: the score the advantages start from (normalised reward-model part)
    rule: torch.Tensor | None  # [B] fp32 on CPU: the function's own values (None without a function)


class Scorer:
    def __init__(self, config, reward_engine, reward_meta: dict, tokenizer, reward_function=None):
        """`reward_engine`: the frozen reward model, or None; `reward_function`: the loaded function (loaded here
        from --reward_function when not given)."""
        rl = config.rl
        self.reward_engine, self.tokenizer = reward_engine, tokenizer
        self.spec = rl.reward_function
        self.function = reward_function
        if self.function is None and self.spec is not None:
            self.function = load_reward_function(self.spec)
        both = reward_engine is not None and self.function is not None
        # One source alone is used unweighted, so PPO with a reward model is exactly DeepSpeed-Chat's.
        self.model_weight = rl.reward_model_weight if both else 1.0
        self.function_weight = rl.reward_function_weight if both else 1.0
        self.normalizer = RewardNormalizer.from_reward_model_meta(reward_meta, config.ppo.normalize_reward)

    def describe(self) -> str:
        """What gives the rewards, for the log."""
        model = "the reward model" if self.reward_engine is not None else None
        function = f"the '{self.spec}' reward function" if self.function is not None else None
        if model and function:
            return f"{self.model_weight:g} x {model} + {self.function_weight:g} x {function}"
        return model or function

    @torch.no_grad()
    def __call__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answer_ids: torch.Tensor,
                 lengths: torch.Tensor, action_mask: torch.Tensor, references: list | None) -> Scores:
        model_scores = rule = None
        if self.reward_engine is not None:
            sequences = torch.cat([prompt_ids, answer_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
            first_end = int(last_real_token_index(attention_mask).min())  # the scores are read there and after
            with packed_linears(self.reward_engine, len(sequences)), last_layer_from(self.reward_engine, first_end):
                model_scores = self.reward_engine(input_ids=sequences, attention_mask=attention_mask).end_scores
        if self.function is not None:
            prompts, replies = self.texts(prompt_ids, prompt_mask, answer_ids, lengths)
            rule = compute_rule_rewards(self.function, self.spec, prompts, replies,
                                        references if references is not None else [None] * len(replies))
        if rule is None:
            return Scores(model_scores, self.normalizer(model_scores), None)
        rule_here = rule.to(prompt_ids.device)
        if model_scores is None:
            return Scores(rule_here, rule_here, rule)
        model_scores = model_scores.float()
        raw = self.model_weight * model_scores + self.function_weight * rule_here
        train = self.model_weight * self.normalizer(model_scores) + self.function_weight * rule_here
        return Scores(raw, train, rule)

    def texts(self, prompt_ids, prompt_mask, answer_ids, lengths) -> tuple[list[str], list[str]]:
        """Prompts and answers as text, special tokens (pad, EOS, a template's markers) left out."""
        decode = self.tokenizer.decode
        prompts = [decode(prompt_ids[b][prompt_mask[b] == 1], skip_special_tokens=True)
                   for b in range(prompt_ids.size(0))]
        replies = [decode(answer_ids[b, :int(lengths[b])], skip_special_tokens=True)
                   for b in range(answer_ids.size(0))]
        return prompts, replies
