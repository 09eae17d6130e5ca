"""PPO for RLHF with DeepSpeed-Chat's trainer API, and the critic-free estimators (GRPO, RLOO, REINFORCE++, ReMax).

    trainer = PPOTrainer(rlhf_engine, config)   # config: the step-3 RLHFConfig
    experience, rollout = trainer.generate_experience(prompt_batch)  # sample, score; no gradients
    stats = trainer.train_rlhf(minibatch)                            # one actor and one critic update
    trainer.train_unsupervised(lm_batch, unsup_coef)                 # PPO-ptx: language-model loss
    trainer.update_ema()

For every generated token a_t of an answer (the action region, formulas in training/utils/losses.py):

    log_probs   log pi(a_t | s_t) under the actor at rollout time (PPO's old policy)
    rewards     -beta * (log pi(a_t) - log pi_ref(a_t)), plus the clipped reward-model score at the
                answer's last token: its EOS, or the last token of an answer cut at the length limit
    values      V(s_t), the critic's value at the position right before a_t
    advantages  GAE(gamma, lambda) that stops at the answer's end; returns = advantages + values

A critic-free --advantage_estimator samples --n_samples_per_prompt answers per prompt in the same batch (each
prompt's answers in consecutive rows) and turns one score per answer into advantages per generation batch, on
each rank, before the buffer cuts mini-batches (losses.critic_free_advantages): a group never spans ranks or
buffers. There are no values (0) and no critic update; returns are the advantages (unused). The KL to the
reference is either in the reward (as PPO's) or a loss term (--use_kl_loss, reference log-probs kept per token).

s_t is the prompt plus a_<t: logits at sequence position P + t - 1 score a_t, where P is the width of
the left-padded prompt block. Scores, values and log-probs are read from positions found from the
masks, never by comparing ids with pad.
"""
import contextlib
import dataclasses
import inspect
import time
from dataclasses import dataclass

import deepspeed
import torch

from training.utils import distributed
from training.utils.losses import (
    aggregate_token_loss,
    apply_truncation_penalty,
    causal_lm_loss,
    critic_free_advantages,
    entropy_from_logits,
    equal_reward_groups,
    gae_advantages_and_returns,
    gather_log_probs,
    kl_estimate,
    kl_penalty_rewards,
    labelled_positions,
    masked_mean,
    policy_loss,
    value_loss,
)
from training.utils.masks import answer_lengths, close_answers, mask_from_lengths, positions_from_mask
from training.utils.model import round_up
from training.utils.model.build import active_dropout
from training.utils.model.last_layer import last_layer_from
from training.utils.model.logits import ONEDNN_DTYPES, last_logits, logits_at
from training.utils.model.packed_linear import packed_linears
from training.utils.rlhf.config import RLHFConfig
from training.utils.rlhf.control import make_kl_controller
from training.utils.rlhf.experience import Experience
from training.utils.rlhf.scorer import Scorer, Scores
from training.utils.sampling import SamplingConfig, decoding_kernels


def sequence_width_multiple(device_type: str, dtype: torch.dtype) -> int:
    """What step 3 rounds the widths of a batch's prompts (PromptCollator) and answers (PPOTrainer.generate) up
    to: 32 tokens for a bf16/fp16 model on CPU, where oneDNN compiles a kernel for every new matrix shape (~25 ms
    for one linear layer's forward and backward) and every rollout batch would otherwise bring new ones (8 rows x
    (prompt + answer) tokens), ~0.3 s of such a step of tiny/opt-20m; 1 (exact widths) elsewhere. The padding
    is masked like any other."""
    return 32 if device_type == "cpu" and dtype in ONEDNN_DTYPES else 1


@dataclass
class Rollout:
    """What one generation batch looked like, per answer (CPU tensors [B]), and where the time went."""
    scores: torch.Tensor  # the raw reward: the reward model's score (or the weighted sum with the function's)
    kl: torch.Tensor  # sum over the answer of log pi - log pi_ref
    lengths: torch.Tensor  # tokens, EOS included
    ended: torch.Tensor  # True when the answer ended with EOS
    generation_s: float
    scoring_s: float
    group_std: torch.Tensor | None = None  # [B / n] population std of each prompt's rewards (n >= 2 only)
    dropped: torch.Tensor | None = None  # [B / n] True for a group --drop_equal_reward_groups left out


@dataclass
class UpdateForward:
    """The first PPO update's forward, run on a generation batch while it is scored (see
    update_forward_blockers): its outputs keep their autograd graphs until train_rlhf trains on the same rows."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    answer_ids: torch.Tensor
    action_mask: torch.Tensor
    log_probs: torch.Tensor  # [B, A] the actor's, with gradients
    entropy: torch.Tensor  # [B, A] no gradients
    values: torch.Tensor | None  # [B, A] the critic's, with gradients (None without a critic)

    def outputs_for(self, experience: Experience) -> tuple | None:
        """(log_probs, entropy, values) cut to `experience`'s answer width when it holds exactly these rows in
        this order (the buffer's re-padding may only have trimmed all-pad columns), else None."""
        cut = self.prompt_ids.size(1) - experience.prompt_ids.size(1)
        width = experience.answer_ids.size(1)
        if len(experience.answer_ids) != len(self.answer_ids) or cut < 0 or width > self.answer_ids.size(1):
            return None
        pairs = ((self.prompt_ids[:, cut:], experience.prompt_ids), (self.prompt_mask[:, cut:], experience.prompt_mask),
                 (self.answer_ids[:, :width], experience.answer_ids),
                 (self.action_mask[:, :width], experience.action_mask))
        trimmed_pad_only = not (self.prompt_mask[:, :cut].any() or self.action_mask[:, width:].any())
        if not trimmed_pad_only or not all(torch.equal(mine.to(theirs.dtype), theirs) for mine, theirs in pairs):
            return None
        return (self.log_probs[:, :width], self.entropy[:, :width],
                None if self.values is None else self.values[:, :width])


def update_forward_blockers(config: RLHFConfig, rlhf_engine) -> list[str]:
    """Why the first update's forward cannot also give the old log-probs and values of a generation batch (empty:
    it does, --separate_scoring_pass aside). It can when the update trains on exactly the generated rows before
    any optimizer step, and its train-mode forward computes what a no-grad scoring pass would (no dropout)."""
    if config.separate_scoring_pass:
        return ["--separate_scoring_pass"]
    blockers = []
    rows = config.per_device_generation_batch_size * config.rl.n_samples_per_prompt
    if config.generation_batches > 1:
        blockers.append(f"--generation_batches {config.generation_batches}: a mini-batch mixes generation batches")
    if rows > config.per_device_training_batch_size:
        blockers.append(f"{rows} rows per generation batch in mini-batches of --per_device_training_batch_size "
                        f"{config.per_device_training_batch_size}")
    for name, engine in (("actor", rlhf_engine.actor), ("critic", rlhf_engine.critic)):
        dropout = active_dropout(engine.module) if engine is not None else []
        if dropout:
            blockers.append(f"the {name} has dropout ({', '.join(dropout)}; --{name}_dropout 0 removes it)")
    return blockers


class PPOTrainer:
    def __init__(self, rlhf_engine, config: RLHFConfig, stop_token_ids: list[int] | None = None,
                 reward_function=None):
        """`stop_token_ids`: the ids that end an answer, the first being the one the reward model scores
        (the prompt format's; default: the tokenizer's EOS). `reward_function`: --reward_function already
        loaded (rewards.load_reward_function); loaded here when None and the flag names one."""
        self.engine, self.config = rlhf_engine, config
        self.tokenizer = rlhf_engine.tokenizer
        self.stop_token_ids = stop_token_ids or [self.tokenizer.eos_token_id]
        self.device = rlhf_engine.actor.device
        actor_dtype = next(rlhf_engine.actor.module.parameters()).dtype
        self.width_multiple = sequence_width_multiple(self.device.type, actor_dtype)
        # One controller for whichever KL term the run has: the reward's penalty (--kl_ctl) or the loss's.
        self.kl_in_loss = bool(config.rl.use_kl_loss)
        initial_kl = config.rl.kl_loss_coef if self.kl_in_loss else config.ppo.kl_ctl
        self.kl_ctl = make_kl_controller(initial_kl, config.ppo.target_kl, config.ppo.kl_horizon)
        self.scorer = Scorer(config, rlhf_engine.reward, rlhf_engine.reward_meta, self.tokenizer, reward_function)
        self.reward_normalizer = self.scorer.normalizer
        self.sampling = SamplingConfig.from_flags(config.max_answer_seq_len, config.sampling)
        self.greedy_sampling = dataclasses.replace(self.sampling, do_sample=False)  # ReMax's baseline answers
        # ZeRO-3 gathers parameters in every forward: each rank must keep stepping until all ranks are done.
        self.synced_gpus = distributed.world_size() > 1 and rlhf_engine.actor.zero_optimization_stage() == 3
        self._positions = {id(e): "position_ids" in inspect.signature(e.module.forward).parameters
                           for e in (rlhf_engine.actor, rlhf_engine.ref)}
        self._warned_fp32_overflow = False
        blockers = update_forward_blockers(config, rlhf_engine)
        self.score_in_update = not blockers
        self.scoring_plan = ("old log-probs and values from the first update's forward" if self.score_in_update else
                             f"old log-probs and values in passes of their own ({'; '.join(blockers)})")
        self.pending_update: UpdateForward | None = None

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 sampling: SamplingConfig | None = None) -> torch.Tensor:
        """[B, A] answers to left-padded prompts, sampled with the rollout settings, stopped at EOS (what
        follows an answer's EOS is padding; A is rounded up to a multiple of self.width_multiple, at most the
        answer limit).

        Exactly the model's own `generate`, so the same tokens as a plain call from the same seed
        (tests/test_generation_speed.py): one forward per token over the KV cache, sampled on the model's
        device, the loop ends once every row has its EOS (or, under ZeRO-3 with several ranks, once every rank
        is done), and the answers are its output's new tokens (padded on when A is rounded up). In bf16 on CPU
        it decodes with the faster kernels of sampling.decoding_kernels (the attention chosen for the CPU, linear
        layers on packed weights, a KV cache grown in blocks).
        The KV cache is asked for explicitly: a checkpoint whose config says `use_cache: false` (as trainers
        with activation checkpointing save it) and that has no generation_config.json would otherwise re-read
        the whole sequence for every token. Measured and left out on CPU: a static KV cache and
        torch.compile'd decoding (no clear win; compiling costs more than 10 rollouts save; both change tokens
        in bf16)."""
        actor = self.engine.actor
        actor.eval()
        with decoding_kernels(actor.module, len(prompt_ids)):
            generate = actor.generate if self.engine.hybrid_generation else actor.module.generate
            output = generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                              eos_token_id=self.stop_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                              synced_gpus=self.synced_gpus, use_cache=True,
                              **(sampling or self.sampling).generate_kwargs())
        # The Hybrid Engine swaps its inference kernels back out on train(); scoring must use the
        # training forward (so PPO's ratio starts at 1) with dropout off.
        actor.train()
        actor.module.eval()
        answers = output[:, prompt_ids.size(1):]
        # Narrower than the limit only when every row has ended (generate stops at the limit otherwise).
        width = min(round_up(answers.size(1), self.width_multiple), (sampling or self.sampling).max_new_tokens)
        return torch.nn.functional.pad(answers, (0, width - answers.size(1)), value=self.tokenizer.pad_token_id) \
            if width > answers.size(1) else answers

    def close_answers(self, answer_ids: torch.Tensor):
        """(answers ending with the scored end token and padded after it, lengths, ended, action mask)."""
        lengths, ended = answer_lengths(answer_ids, self.stop_token_ids)
        action_mask = mask_from_lengths(lengths, answer_ids.size(1))
        answer_ids = close_answers(answer_ids, lengths, ended, self.stop_token_ids[0])
        return answer_ids.masked_fill(action_mask == 0, self.tokenizer.pad_token_id), lengths, ended, action_mask

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict) -> tuple[Experience, Rollout]:
        """Sample answers for a batch of prompts (--n_samples_per_prompt each, in consecutive rows) and turn them
        into experience."""
        n = self.config.rl.n_samples_per_prompt
        prompt_ids = prompt_batch["input_ids"].to(self.device).repeat_interleave(n, dim=0)
        prompt_mask = prompt_batch["attention_mask"].to(self.device).repeat_interleave(n, dim=0)
        references = prompt_batch.get("references")
        if references is not None:
            references = [reference for reference in references for _ in range(n)]
        self.pending_update = None  # an unused one's activations are freed before this batch's passes
        start = time.perf_counter()
        answer_ids = self.generate(prompt_ids, prompt_mask)
        generated = time.perf_counter()
        baseline = None
        if self.config.rl.advantage_estimator == "remax":  # a greedy answer per prompt is the baseline
            # (generated before the update's forward below: nothing may touch the actor's weights in between)
            baseline = self.greedy_scores(prompt_batch, references)

        answer_ids, lengths, ended, action_mask = self.close_answers(answer_ids)
        sequences = torch.cat([prompt_ids, answer_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
        prompt_width = prompt_ids.size(1)

        if self.score_in_update:
            self.pending_update = self._update_forward(prompt_ids, prompt_mask, answer_ids, action_mask)
            log_probs = self.pending_update.log_probs.detach()
        else:
            log_probs = self._scored_log_probs(self.engine.actor, sequences, attention_mask, prompt_width, answer_ids)
        ref_log_probs = self._scored_log_probs(self.engine.ref, sequences, attention_mask, prompt_width, answer_ids)
        group = {}
        if self.engine.critic is not None:  # PPO: GAE over the critic's values
            if self.pending_update is not None:
                values = self.pending_update.values.detach()
            else:
                self.engine.critic.eval()
                with packed_linears(self.engine.critic, len(sequences)):
                    values = self._action_values(self.engine.critic, sequences, attention_mask, prompt_width)
            scores = self.scorer(prompt_ids, prompt_mask, answer_ids, lengths, action_mask, references)
            end_scores = apply_truncation_penalty(scores.train, ended, self.config.ppo.truncation_penalty)
            rewards, kl = kl_penalty_rewards(log_probs, ref_log_probs, action_mask, end_scores, self.kl_ctl.value,
                                             self.config.ppo.clip_reward_value)
            advantages, returns = gae_advantages_and_returns(rewards, values, action_mask, self.config.ppo.gamma,
                                                             self.config.ppo.lam)
            loss_mask = None
        else:
            scores = self.scorer(prompt_ids, prompt_mask, answer_ids, lengths, action_mask, references)
            end_scores = self._clipped(scores, ended)
            advantages, loss_mask, group = self.critic_free_advantages(end_scores, scores.raw, log_probs,
                                                                       ref_log_probs, action_mask, baseline)
            kl = (log_probs - ref_log_probs) * action_mask
            values, returns = torch.zeros_like(advantages), advantages
        experience = Experience(prompt_ids.cpu(), prompt_mask.cpu(), answer_ids.cpu(), action_mask.cpu(),
                                (log_probs * action_mask).cpu(), (values * action_mask).cpu(), advantages.cpu(),
                                returns.cpu(), None if loss_mask is None else loss_mask.cpu(),
                                (ref_log_probs * action_mask).cpu() if self.kl_in_loss else None)
        rollout = Rollout(scores.raw.float().cpu(), kl.sum(dim=1).cpu(), lengths.cpu(), ended.cpu(),
                          generation_s=generated - start, scoring_s=time.perf_counter() - generated, **group)
        return experience, rollout

    def _clipped(self, scores: Scores, ended: torch.Tensor) -> torch.Tensor:
        """[B] fp32 scores the advantages start from: truncation penalty, then clipped to +-clip_reward_value
        (as PPO clips the score it adds to the last token)."""
        limit = self.config.ppo.clip_reward_value
        return apply_truncation_penalty(scores.train, ended, self.config.ppo.truncation_penalty).float().clamp(
            -limit, limit)

    @torch.no_grad()
    def critic_free_advantages(self, end_scores: torch.Tensor, raw_scores: torch.Tensor, log_probs: torch.Tensor,
                               ref_log_probs: torch.Tensor, action_mask: torch.Tensor,
                               baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(advantages [B, T], loss mask [B, T], the Rollout's group statistics) of one generation batch.
        --drop_equal_reward_groups zeroes the loss mask of groups with all-equal scores: they stay in the buffer
        (every rank keeps the same rows) but add neither gradient nor weight to the loss."""
        rl, n = self.config.rl, self.config.rl.n_samples_per_prompt
        mask = action_mask.to(log_probs.dtype)
        group = {}
        if n >= 2:
            group["group_std"] = raw_scores.float().view(-1, n).std(dim=1, unbiased=False).cpu()
            if rl.drop_equal_reward_groups:
                dropped = equal_reward_groups(end_scores, n)
                mask = mask * (~dropped).to(mask.dtype).unsqueeze(1)
                group["dropped"] = dropped.view(-1, n)[:, 0].cpu()
        kl_coef = 0.0 if self.kl_in_loss else self.kl_ctl.value
        if baseline is not None:
            baseline = baseline.repeat_interleave(n)
        advantages = critic_free_advantages(end_scores, log_probs, ref_log_probs, mask, n, rl.advantage_estimator,
                                            kl_coef, self.config.ppo.gamma, baseline_scores=baseline)
        return advantages, mask, group

    @torch.no_grad()
    def greedy_scores(self, prompt_batch: dict, references: list | None) -> torch.Tensor:
        """[prompts] ReMax's baseline: the score (penalised and clipped as the samples') of one greedy answer per
        prompt."""
        n = self.config.rl.n_samples_per_prompt
        prompt_ids = prompt_batch["input_ids"].to(self.device)
        prompt_mask = prompt_batch["attention_mask"].to(self.device)
        answer_ids, lengths, ended, action_mask = self.close_answers(
            self.generate(prompt_ids, prompt_mask, self.greedy_sampling))
        scores = self.scorer(prompt_ids, prompt_mask, answer_ids, lengths, action_mask,
                             None if references is None else references[::n])
        return self._clipped(scores, ended)

    @torch.no_grad()
    def score_answers(self, prompt_ids, prompt_mask, answer_ids, lengths, action_mask, references=None) -> Scores:
        """The rewards of finished answers (held-out evaluation)."""
        return self.scorer(prompt_ids, prompt_mask, answer_ids, lengths, action_mask, references)

    def _scored_log_probs(self, engine, sequences, attention_mask, prompt_width: int, answer_ids) -> torch.Tensor:
        """[B, A] log-probabilities of the answer tokens under `engine` (no gradients; packed weights)."""
        with packed_linears(engine, len(sequences)):
            logits = self._action_logits(engine, sequences, attention_mask, prompt_width)
        return gather_log_probs(logits, answer_ids)

    def _update_forward(self, prompt_ids, prompt_mask, answer_ids, action_mask) -> UpdateForward:
        """The first update's forward of the actor (and critic) on a generation batch, graphs kept for train_rlhf;
        its detached outputs are the batch's old log-probs and values."""
        actor, critic = self.engine.actor, self.engine.critic
        sequences = torch.cat([prompt_ids, answer_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, action_mask], dim=1)
        prompt_width, values = prompt_ids.size(1), None
        with torch.enable_grad():
            with training_pass(actor, self.config.actor.gradient_checkpointing):
                log_probs, entropy = self._policy_forward(actor, sequences, attention_mask, prompt_width, answer_ids)
            if critic is not None:
                with training_pass(critic, self.config.critic.gradient_checkpointing):
                    values = self._action_values(critic, sequences, attention_mask, prompt_width)
        return UpdateForward(prompt_ids, prompt_mask, answer_ids, action_mask, log_probs, entropy, values)

    def _policy_forward(self, actor, sequences, attention_mask, prompt_width: int, answer_ids) -> tuple:
        """([B, A] log-probs of the answer tokens, with gradients; [B, A] entropy of each position, without)."""
        logits = self._action_logits(actor, sequences, attention_mask, prompt_width)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        return gather_log_probs(logits, answer_ids), entropy

    def _action_logits(self, engine, sequences, attention_mask, prompt_width: int) -> torch.Tensor:
        """[B, A, V] logits that score the answer tokens (position P + t - 1 predicts token P + t), at
        the sampling temperature so log-probabilities are those of the distribution sampled from."""
        extra = {"position_ids": positions_from_mask(attention_mask)} if self._positions[id(engine)] else {}
        answer_width = sequences.size(1) - prompt_width  # the LM head runs on the last answer_width + 1 positions only
        logits = last_logits(engine, answer_width + 1, input_ids=sequences, attention_mask=attention_mask,
                             use_cache=False, **extra)[:, :-1]
        if self.config.compute_fp32_loss:
            logits = logits.float()
        temperature = self.config.sampling.temperature
        if temperature > 0 and temperature != 1.0:
            logits = logits / temperature
        return logits

    @staticmethod
    def _action_values(critic, sequences, attention_mask, prompt_width: int) -> torch.Tensor:
        """[B, A] V(s_t): the critic's value at the position right before each answer token."""
        with last_layer_from(critic, prompt_width - 1):
            return critic(input_ids=sequences, attention_mask=attention_mask).values[:, prompt_width - 1:-1]

    # ------------------------------------------------------------------ training
    def train_rlhf(self, experience: Experience) -> dict[str, float]:
        """One update of the actor (and of the critic, with one) on a mini-batch of experience."""
        actor, critic, config = self.engine.actor, self.engine.critic, self.config
        experience = experience.to(self.device)
        sequences, attention_mask = experience.sequences, experience.attention_mask
        prompt_width = experience.prompt_ids.size(1)
        # Rows --drop_equal_reward_groups left out have a zero loss mask; PPO's is the action mask.
        mask = experience.action_mask if critic is not None else experience.loss_mask
        low, high = config.clip_range
        extra = {}
        pending, self.pending_update = self.pending_update, None
        reused = pending.outputs_for(experience) if pending is not None else None  # scoring ran this forward

        with training_pass(actor, config.actor.gradient_checkpointing):
            if reused is None:
                log_probs, entropy = self._policy_forward(actor, sequences, attention_mask, prompt_width,
                                                          experience.answer_ids)
            else:
                log_probs, entropy, _ = reused
            actor_loss, stats = policy_loss(log_probs, experience.log_probs, experience.advantages, mask, low, high,
                                            config.rl.loss_agg_mode or "token_mean", config.max_answer_seq_len)
            if self.kl_in_loss:
                kl_loss = aggregate_token_loss(kl_estimate(log_probs, experience.ref_log_probs, config.rl.kl_estimator),
                                               mask, config.rl.loss_agg_mode, config.max_answer_seq_len)
                extra["kl_loss"] = kl_loss.item()
                actor_loss = actor_loss + self.kl_ctl.value * kl_loss
            entropy = masked_mean(entropy, experience.action_mask)
            actor.backward(actor_loss)
        if critic is None:
            actor.step()
            skipped = False
        else:
            with training_pass(critic, config.critic.gradient_checkpointing):
                values = self._action_values(critic, sequences, attention_mask, prompt_width) if reused is None else (
                    reused[2])
                critic_loss = value_loss(values, experience.values, experience.returns, experience.action_mask,
                                         config.ppo.cliprange_value)
                critic.backward(critic_loss)
            extra["critic_loss"] = critic_loss.item()
            skipped = self._step_both(actor, critic)
        return {"actor_loss": actor_loss.item(), **extra, "clip_fraction": stats["clip_fraction"].item(),
                "approx_kl": stats["approx_kl"].item(), "entropy": entropy.item(), "skipped_step": float(skipped)}

    def train_unsupervised(self, batch: dict[str, torch.Tensor], unsup_coef: float) -> float:
        """PPO-ptx: one actor update on unsup_coef x the language-model loss of a pre-training batch."""
        actor = self.engine.actor
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with training_pass(actor, self.config.actor.gradient_checkpointing):
            logits = logits_at(actor, labelled_positions(batch["labels"]), input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], use_cache=False)
            loss = causal_lm_loss(logits, batch["labels"], self.config.compute_fp32_loss)
            actor.backward(unsup_coef * loss)
        actor.step()
        return loss.item()

    def _step_both(self, actor, critic) -> bool:
        """Step both engines. With --align_overflow, when either one's fp16 gradients overflowed, neither
        moves: DeepSpeed skips the step of the one that overflowed (and lowers its loss scale); the other
        steps with learning rate 0. Returns whether the update was skipped."""
        skip = False
        if self.config.align_overflow and actor.is_gradient_accumulation_boundary():
            if not (actor.fp16_enabled() or critic.fp16_enabled()):
                if not self._warned_fp32_overflow:
                    distributed.print_rank_0("--align_overflow: no fp16 engine, so no gradient overflow to align")
                    self._warned_fp32_overflow = True
            else:
                overflowed = [gradients_overflowed(actor), gradients_overflowed(critic)]
                skip = distributed.all_reduce_sum([float(any(overflowed))], self.device)[0] > 0
        for engine in (actor, critic):
            with hold_weights(engine) if skip else contextlib.nullcontext():
                engine.step()
        return skip

    @torch.no_grad()
    def update_ema(self) -> None:
        """actor_ema <- beta * actor_ema + (1 - beta) * actor, parameter by parameter (gathered under ZeRO-3)."""
        if self.engine.actor_ema is None:
            return
        beta = self.config.ema_beta
        actor_params = dict(self.engine.actor.module.named_parameters())
        for name, ema_param in self.engine.actor_ema.module.named_parameters():
            param = actor_params[name]
            gather_ema = deepspeed.zero.GatheredParameters([ema_param], modifier_rank=0,
                                                           enabled=hasattr(ema_param, "ds_id"))
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")), gather_ema:
                ema_param.data.copy_(torch.lerp(param.data.to(ema_param.dtype), ema_param.data, beta))


@contextlib.contextmanager
def training_pass(engine, gradient_checkpointing: bool):
    """Train mode, with activation checkpointing on for this pass only (generation and scoring run
    without it: it would turn off the KV cache and slow generation down)."""
    engine.train()
    if gradient_checkpointing:
        engine.module.gradient_checkpointing_enable()
    try:
        yield
    finally:
        if gradient_checkpointing:
            engine.module.gradient_checkpointing_disable()


def gradients_overflowed(engine) -> bool:
    """Whether this step's fp16 gradients hold inf/NaN, by DeepSpeed's own check (ZeRO's agrees over the
    data-parallel ranks). Only meaningful after backward and before step."""
    if not engine.fp16_enabled():
        return False
    optimizer = engine.optimizer
    if hasattr(optimizer, "has_overflow"):  # ZeRO stages 1-3
        return bool(optimizer.has_overflow(partition_gradients=getattr(optimizer, "partition_gradients", True)))
    return bool(optimizer.overflow_checker.check())  # fp16 without ZeRO


@contextlib.contextmanager
def hold_weights(engine):
    """One optimizer step that leaves the weights in place: learning rate 0 for its duration (Adam's
    moment estimates still absorb the gradients). Afterwards the rates are the schedule's again: set by
    the LR scheduler when the step advanced it, restored otherwise."""
    groups, scheduler = engine.optimizer.param_groups, engine.lr_scheduler
    saved, scheduler_step = [group["lr"] for group in groups], getattr(scheduler, "last_epoch", None)
    for group in groups:
        group["lr"] = 0.0
    try:
        yield
    finally:
        if getattr(scheduler, "last_epoch", None) == scheduler_step:
            for group, lr in zip(groups, saved):
                group["lr"] = lr
