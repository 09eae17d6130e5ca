"""Loss functions as pure tensor functions (no DeepSpeed, no model), each with its math."""
import torch
import torch.nn.functional as F

from training.utils.masks import last_real_token_index

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, compute_fp32: bool = False,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labelled positions.

        loss = -(1/N) * sum_{t: labels[t+1] != IGNORE} log p(labels[t+1] | x_<=t)

    `logits`: every position's [B, T, V], or only the N labelled positions' [N, V] in row-major order
    (`model.logits.logits_at(model, labelled_positions(labels), ...)`), the same loss either way.
    `reduction="sum"` returns the sum (for token-weighted averages across batches and ranks).
    `compute_fp32` upcasts the logits first, so fp16/bf16 training keeps an accurate loss.
    """
    targets = labels[:, 1:]
    if logits.dim() == 3:
        logits, targets = logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1)
    else:
        targets = targets[targets != IGNORE_INDEX]
    if compute_fp32:
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def _predicting(scored: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t predicts token t + 1, so it is kept when token t + 1 is scored ([B, T - 1])."""
    keep = torch.zeros(scored.size(0), scored.size(1) + 1, dtype=torch.bool, device=scored.device)
    keep[:, :-1] = scored
    return keep


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits causal_lm_loss reads (t where labels[:, t + 1] is a target)."""
    return _predicting(labels[:, 1:] != IGNORE_INDEX)


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                  margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Bradley-Terry preference loss, averaged over pairs.

        loss = -(1/B) * sum_b log sigmoid(r_c[b] - r_r[b] - margin)

    `logsigmoid` keeps it finite for large score gaps. A margin (scalar or per pair, as in Llama 2's
    reward model) asks the chosen score to win by at least that much.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores - margin).mean()


def span_pairwise_loss(chosen_values: torch.Tensor, rejected_values: torch.Tensor,
                       chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
                       chosen_ids: torch.Tensor, rejected_ids: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-Chat's per-token pairwise loss over the span where the two replies differ.

    Rows are right-padded (as PairCollator builds them), so both sequences of a pair start at t = 0.
    With l_c, l_r the last real index of each and e = max(l_c, l_r):

        d        = first t <= e where the ids differ or exactly one sequence has ended
                   (a prefix pair diverges at the shorter one's length; ids are never compared
                   with pad, so pad == EOS is safe); d = e when the pair is identical
        v~_x[t]  = v_x[min(t, l_x)]   (past its end a sequence keeps its end score: the values a
                                       model computes on pad positions mean nothing)
        loss_b   = mean_{t = d..e} -log sigmoid(v~_c[t] - v~_r[t])
        loss     = (1/B) * sum_b loss_b
    """
    positions = torch.arange(chosen_values.size(1), device=chosen_values.device).expand_as(chosen_values)
    last_c, last_r = last_real_token_index(chosen_mask), last_real_token_index(rejected_mask)
    end = torch.maximum(last_c, last_r).unsqueeze(1)
    differs = (chosen_ids != rejected_ids) | ((chosen_mask != 0) != (rejected_mask != 0))
    differs &= positions <= end
    first = torch.where(differs.any(dim=1), differs.int().argmax(dim=1), end.squeeze(1)).unsqueeze(1)
    span = (positions >= first) & (positions <= end)
    held_c = chosen_values.gather(1, torch.minimum(positions, last_c.unsqueeze(1)))
    held_r = rejected_values.gather(1, torch.minimum(positions, last_r.unsqueeze(1)))
    per_token = -F.logsigmoid(held_c - held_r)
    per_pair = (per_token * span).sum(dim=1) / span.sum(dim=1)
    return per_pair.mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right: (1/B) * sum_b [r_c[b] > r_r[b]] (a tie counts as wrong)."""
    return (chosen_scores > rejected_scores).float().mean()


# ---------------------------------------------------------------- PPO
# Every PPO tensor below covers the action region only: [B, T] over the T generated positions, with
# action_mask[b, t] = 1 for each token row b generated, its EOS included, and 0 after it. The mask
# comes from generation lengths, never from comparing ids with pad (pad may equal EOS). A row may
# have no action at all (an empty answer): its mask is all 0 and it contributes nothing.

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask = 1 (over all entries, or along `dim`).

        masked_mean(x, m) = sum(x * m) / max(sum(m), 1)

    An empty mask gives 0 (not NaN), so a batch of empty answers still yields a finite loss whose
    backward pass every rank can run.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x normalised with the mean and (population) variance of its masked entries only.

        mu = masked_mean(x, m),  var = masked_mean((x - mu)^2, m)
        out = (x - mu) / sqrt(var + eps)          (+ mu again when shift_mean is False)
        out = 0 where m = 0

    `shift_mean=False` only rescales (used for rewards, whose sign carries meaning).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L] log-probability of each label under its logits row (the caller aligns them: logits at
    position t score the token at t + 1).

        log p(y | z) = z_y - logsumexp_v(z_v)

    In fp32, one batch row at a time: no [B, L, V] log_softmax is materialised, only one row's [L, V]
    temporary (fp32 logits are not copied at all). Under torch.no_grad (the experience pass) that is
    the whole extra memory; with gradients, autograd keeps each row's fp32 upcast of bf16/fp16 logits.
    """
    label_logits = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    return label_logits - log_normalisers(logits)


def log_normalisers(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp_v z[..., v] in fp32, shape logits.shape[:-1], a block of rows at a time (see gather_log_probs)."""
    rows = logits.reshape(-1, logits.size(-1))
    block = logits.size(-2) if logits.dim() > 2 else 512
    return torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in rows.split(block)]).view(logits.shape[:-1])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, L] entropy of the softmax distribution at each position, in nats.

        H(z) = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,   p = softmax(z)
    """
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


@torch.no_grad()
def kl_penalty_rewards(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, action_mask: torch.Tensor,
                       end_scores: torch.Tensor, kl_coef: float | torch.Tensor,
                       clip_reward_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a KL penalty on every action, the reward model's score on the last one.

        kl[b, t]      = (log pi(a_t) - log pi_ref(a_t)) * m[b, t]
        rewards[b, t] = -kl_coef * kl[b, t]
                        + clip(end_scores[b], -c, c)   at t = last action of row b (its EOS, or the
                                                       last generated token of a truncated answer)

    A row with no action gets no score. Returns (rewards, kl), both [B, T] and 0 outside the mask.
    """
    mask = action_mask.to(log_probs.dtype)
    kl = (log_probs - ref_log_probs) * mask
    last = last_real_token_index(action_mask).unsqueeze(1)
    end_rewards = end_scores.to(kl.dtype).clamp(-clip_reward_value, clip_reward_value) * mask.amax(dim=1)
    rewards = (-kl_coef * kl).scatter_add(1, last, end_rewards.unsqueeze(1))
    return rewards, kl


@torch.no_grad()
def gae_advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor,
                               gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) that stops exactly at each row's end.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}          (A_T = 0, m_T = 0)
        R_t     = A_t + V_t
        A, R    = 0 where m = 0

    m_{t+1} = 0 past the last action, so the last action gets A = r - V and no value or reward from a
    position after the answer leaks in (DeepSpeed-Chat's end index lets one through). Returns
    (advantages, returns), both [B, T].
    """
    mask = action_mask.to(values.dtype)
    next_mask = F.pad(mask[:, 1:], (0, 1))
    next_values = F.pad(values[:, 1:], (0, 1)) * next_mask
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss_tokens(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                               clip_low: float, clip_high: float) -> torch.Tensor:
    """[B, T] PPO-clip loss per token, with an asymmetric clip range (DAPO's clip-higher: clip_high > clip_low
    leaves low-probability tokens more room to grow). Not masked: aggregate with aggregate_token_loss.

        ratio_t = exp(log pi(a_t) - log pi_old(a_t))
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
    """
    ratio = torch.exp(log_probs - old_log_probs)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, cliprange: float, cliprange_high: float | None = None,
                agg_mode: str = "token_mean", agg_constant: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, as a loss averaged over all actions of the batch.

        ratio_t = exp(log pi(a_t) - log pi_old(a_t))
        loss    = masked_mean( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) )

    `cliprange_high` (None: = cliprange) widens the upper clip (DAPO's clip-higher); `agg_mode` replaces the
    token mean with another aggregate_token_loss mode (the default is exactly the masked mean above).

    stats (detached float tensors):
        clip_fraction = masked_mean([clipped term > unclipped term])   share of actions whose gradient
                                                                       the clip removes
        approx_kl     = masked_mean((ratio_t - 1) - log ratio_t)       the k3 estimator of KL(old || new)
    """
    high = cliprange if cliprange_high is None else cliprange_high
    loss_tokens = clipped_policy_loss_tokens(log_probs, old_log_probs, advantages, cliprange, high)
    loss = aggregate_token_loss(loss_tokens, action_mask, agg_mode, agg_constant)
    with torch.no_grad():
        log_ratio = log_probs - old_log_probs
        ratio = torch.exp(log_ratio)
        # max(u, c) > u exactly when c > u: the clipped term won
        stats = {"clip_fraction": masked_mean((loss_tokens > -advantages * ratio).float(), action_mask),
                 "approx_kl": masked_mean((ratio - 1.0) - log_ratio, action_mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """The critic's clipped squared error, averaged over all actions of the batch.

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = 0.5 * masked_mean( max((V - R)^2, (V_clip - R)^2) )
    """
    clipped_values = values.clamp(old_values - cliprange_value, old_values + cliprange_value)
    squared_error = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return 0.5 * masked_mean(squared_error, action_mask)


def apply_truncation_penalty(end_scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores with `penalty` (a number <= 0) added to answers cut at the length limit before their EOS.

        score'[b] = score[b] + penalty * [row b did not end with EOS]
    """
    return end_scores + penalty * (~ended_with_eos.bool()).to(end_scores.dtype)


# ----------------------------------------------------------------------------------------------------------
# DPO: direct preference optimisation (Rafailov et al. 2023), IPO (Azar et al. 2023), conservative DPO.

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def reply_positions(reply_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits sequence_log_probs reads (t where reply_mask[:, t + 1] is set)."""
    return _predicting(reply_mask[:, 1:] != 0)


def sequence_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, reply_mask: torch.Tensor) -> torch.Tensor:
    """[B] log-probability of each row's reply: next-token log-probs summed over the reply mask, in fp32.

        logp[b] = sum_{t=1..T-1} reply_mask[b, t] * log softmax(logits[b, t-1])[input_ids[b, t]]

    Token t is predicted by the logits at t - 1, so the mask is read from position 1 on. With the
    phase-2 reply mask the sum covers the reply and the EOS that ends it; prompt and padding add
    exactly zero whatever their ids or logits. `logits`: every position's [B, T, V], or only those of
    `reply_positions(reply_mask)`, [N, V] in row-major order.
    """
    scored = reply_mask[:, 1:] != 0
    if logits.dim() == 2:
        rows = torch.arange(scored.size(0), device=scored.device).unsqueeze(1)
        positions = torch.arange(scored.size(1), device=scored.device).unsqueeze(0)
        token_log_probs = _kept_log_probs(logits, reply_positions(reply_mask), rows, positions, input_ids[:, 1:])
    else:
        token_log_probs = gather_log_probs(logits[:, :-1, :], input_ids[:, 1:])
    return torch.where(scored, token_log_probs, torch.zeros_like(token_log_probs)).sum(dim=-1)


def _kept_log_probs(kept_logits: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """[S, L] log p(labels[s, t]) in fp32 from logits kept at the True positions of `keep` [R, W] ([N, V], row-major):
    token (s, t) is predicted at position positions[s, t] of row rows[s]. Positions not kept read some kept row:
    the caller masks them."""
    if kept_logits.size(0) == 0:  # nothing scored
        return torch.zeros(labels.shape, device=kept_logits.device)
    index = (keep.flatten().cumsum(0) - 1).clamp(min=0).view_as(keep)[rows, positions]
    return kept_logits[index, labels].float() - log_normalisers(kept_logits)[index]


def packed_reply_positions(source: torch.Tensor, reply_mask: torch.Tensor, packed_shape: torch.Size) -> torch.Tensor:
    """[B, W] bool: the positions of the packed rows (shape [B, W]) whose logits packed_sequence_log_probs reads."""
    rows, width = packed_shape
    row_of = (torch.arange(source.size(0), device=source.device) % rows).unsqueeze(1)
    flat = (row_of * width + source[:, :-1])[reply_mask[:, 1:] != 0]
    keep = torch.zeros(rows * width, dtype=torch.bool, device=source.device)
    keep[flat] = True
    return keep.view(rows, width)


def packed_sequence_log_probs(packed_logits: torch.Tensor, source: torch.Tensor, input_ids: torch.Tensor,
                              reply_mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """sequence_log_probs of the plain [2B, L] pair batch (chosen rows, then rejected rows), read from the logits
    of its packed rows [B, W, V] (data.pair_packing): the logits that predict plain token t of row s sit at
    position source[s, t - 1] of packed row s mod B.

        logp[s] = sum_{t=1..L-1} reply_mask[s, t] * (z[s mod B, source[s, t-1], x[s, t]]
                                                     - logsumexp_v z[s mod B, source[s, t-1], v])

    In fp32; the normalisers are computed once per packed position. With `keep` (packed_reply_positions),
    `packed_logits` are only those positions' [N, V], in row-major order.
    """
    rows = keep.size(0) if keep is not None else packed_logits.size(0)
    row_of = (torch.arange(source.size(0), device=source.device) % rows).unsqueeze(1)
    previous, labels = source[:, :-1], input_ids[:, 1:]
    scored = reply_mask[:, 1:] != 0
    if keep is None:
        token_log_probs = (packed_logits[row_of, previous, labels].float()
                           - log_normalisers(packed_logits)[row_of, previous])
    else:
        token_log_probs = _kept_log_probs(packed_logits, keep, row_of, previous, labels)
    return torch.where(scored, token_log_probs, torch.zeros_like(token_log_probs)).sum(dim=-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses [B] and implicit rewards [B], from sequence log-probs [B].

        h   = (logp_pi(y_c) - logp_ref(y_c)) - (logp_pi(y_r) - logp_ref(y_r))
        sigmoid (DPO; with eps = label_smoothing > 0 conservative DPO, which assumes each label is
                 flipped with probability eps):
              loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        ipo:  loss = (h - 1 / (2 * beta))^2          (eps unused; h over summed sequence log-probs)
        r_c = beta * (logp_pi(y_c) - logp_ref(y_c)),  r_r = beta * (logp_pi(y_r) - logp_ref(y_r))

    The rewards are detached: they are what DPO implicitly optimises, reported, never trained on.
    With policy == reference, h = 0: the sigmoid loss is log 2 and both rewards are 0.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_log_ratio = policy_chosen - reference_chosen
    rejected_log_ratio = policy_rejected - reference_rejected
    h = chosen_log_ratio - rejected_log_ratio
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach()


# ----------------------------------------------------------------------------------------------------------
# Critic-free advantage estimators: GRPO (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025), RLOO
# (Ahmadian et al. 2024), REINFORCE++ (Hu 2025), ReMax (Li et al. 2023); DAPO's clip-higher and dynamic
# sampling (Yu et al. 2025). A batch holds G = group_size samples of each prompt, each prompt's G rows
# consecutive: rows [k*G, (k+1)*G) are group k. Scores r[b] are one scalar per sequence (rule or reward model).

# Names as veRL's algorithm.adv_estimator (one spelling: lower case, "_"). The same estimators elsewhere:
#   ours                          OpenRLHF --advantage_estimator   veRL
#   gae (PPO with a critic)       gae                              gae
#   grpo                          group_norm                       grpo
#   dr_grpo                       dr_grpo                          grpo with norm_adv_by_std_in_grpo=False
#   rloo                          rloo                             rloo
#   reinforce_plus_plus           reinforce                        reinforce_plus_plus
#   reinforce_plus_plus_baseline  reinforce_baseline               reinforce_plus_plus_baseline
#   remax                         (none)                           remax
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline",
                        "remax")
GROUP_BASELINE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline")  # need group_size >= 2
KL_ESTIMATORS = ("k1", "k2", "k3")
# veRL's loss_agg_mode values, "-" written "_"
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores [B] as [B / G, G], one prompt per row; ValueError unless B is a positive multiple of G."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be one number per sequence ([B]), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"batch of {scores.numel()} scores is not whole groups of group_size={group_size}: "
                         "each prompt needs exactly group_size consecutive samples")
    return scores.view(-1, group_size)


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6,
                     baseline_scores: torch.Tensor | None = None) -> torch.Tensor:
    """[B] one advantage per sequence from its score r and the scores of its group g (G samples of one prompt).

        grpo                          A = (r - mean_g) / (std_g + eps)       std_g: sample std (Bessel, / (G - 1)),
                                                                             as DeepSeekMath's implementations
        dr_grpo                       A = r - mean_g
        rloo                          A = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g)
        reinforce_plus_plus           A = (r - mean_B) / (std_B + eps)      over the whole batch, no groups;
                                                                             std_B: population std (/ B), as
                                                                             masked_whiten
        reinforce_plus_plus_baseline  A = whiten_B(r - mean_g)               the same batch whitening
        remax                         A = r - baseline_scores                the greedy reply's reward

    With a group baseline (GROUP_BASELINE_ESTIMATORS, group_size >= 2) a group whose scores are all equal gets
    A = 0: it carries no signal (see equal_reward_groups). reinforce_plus_plus and remax ignore the groups (B
    must still be a multiple of group_size). For REINFORCE++ with a per-token KL penalty in the reward use
    discounted_token_returns, then masked_whiten. Integer scores are taken as fp32.
    """
    if not scores.is_floating_point():
        scores = scores.float()
    if estimator == "gae":
        raise ValueError("estimator 'gae' needs a critic's values: use gae_advantages_and_returns")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS[1:]}, got {estimator!r}")
    groups = _groups(scores, group_size)
    if estimator in GROUP_BASELINE_ESTIMATORS and group_size < 2:
        raise ValueError(f"estimator {estimator!r} compares samples of the same prompt: group_size must be at "
                         f"least 2, got {group_size}")
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if estimator == "grpo":
        return centred / (groups.std(dim=1, unbiased=True).repeat_interleave(group_size) + eps)
    if estimator == "dr_grpo":
        return centred
    if estimator == "rloo":
        return centred * (group_size / (group_size - 1))
    if estimator == "reinforce_plus_plus":
        return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
    if estimator == "reinforce_plus_plus_baseline":
        return (centred - centred.mean()) / (centred.std(unbiased=False) + eps)
    if baseline_scores is None or baseline_scores.shape != scores.shape:
        raise ValueError("estimator 'remax' needs baseline_scores: the greedy reply's score, one per sequence "
                         f"(shape {tuple(scores.shape)}), got "
                         f"{None if baseline_scores is None else tuple(baseline_scores.shape)}")
    return scores - baseline_scores.to(scores.dtype)


def token_advantages(seq_adv: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] each sequence's advantage on every one of its actions:  A[b, t] = seq_adv[b] * m[b, t]."""
    return seq_adv.unsqueeze(1) * action_mask.to(seq_adv.dtype)


@torch.no_grad()
def discounted_token_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """[B, T] return-to-go of each action, stopping exactly at each row's end (GAE with V = 0 and lam = 1).

        G_t = r_t + gamma * m_{t+1} * G_{t+1}          (G_T = 0, m_T = 0);   G = 0 where m = 0

    REINFORCE++: rewards are kl_penalty_rewards' (a KL penalty per token, the score on the last action), and
    the advantages are masked_whiten(G, action_mask) over the whole batch.
    """
    mask = action_mask.to(rewards.dtype)
    next_mask = F.pad(mask[:, 1:], (0, 1))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * next_mask[:, t] * running
        returns[:, t] = running
    return returns * mask


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman, "Approximating KL
    divergence", 2020). With log r = log pi(a_t) - log pi_ref(a_t):

        k1 = log r                        unbiased, high variance, can be negative
        k2 = 0.5 * (log r)^2              biased, low variance, >= 0
        k3 = exp(-log r) - 1 + log r      unbiased, low variance, >= 0 (GRPO's KL term)

    Not masked, not clamped: the caller masks (and aggregates) it. Differentiable in log_probs.
    """
    log_ratio = log_probs - ref_log_probs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")


def aggregate_token_loss(loss_tokens: torch.Tensor, mask: torch.Tensor, mode: str,
                         constant: float | None = None) -> torch.Tensor:
    """A scalar loss from per-token losses [B, T] over mask [B, T] (veRL's loss_agg_mode, "-" written "_").

        token_mean               sum_{b,t} l * m / sum_{b,t} m              every token weighs the same
                                                                            (DAPO; PPO's policy_loss)
        seq_mean_token_mean      mean over rows with m != 0 of (sum_t l * m / sum_t m)
                                                                            every sequence weighs the same (GRPO)
        seq_mean_token_sum_norm  sum_{b,t} l * m / (B * constant)           Dr. GRPO: constant = the maximum
                                                                            generation length, fixed for the run

    An empty mask gives 0; a row with no token is left out of seq_mean_token_mean's mean.
    """
    mask = mask.to(loss_tokens.dtype)
    if mode == "token_mean":
        return masked_mean(loss_tokens, mask)
    if mode == "seq_mean_token_mean":
        return masked_mean(masked_mean(loss_tokens, mask, dim=1), (mask.sum(dim=1) > 0).to(mask.dtype))
    if mode == "seq_mean_token_sum_norm":
        if constant is None or constant <= 0:
            raise ValueError("mode 'seq_mean_token_sum_norm' needs constant > 0 (the maximum generation length), "
                             f"got {constant}")
        return (loss_tokens * mask).sum() / (loss_tokens.size(0) * constant)
    raise ValueError(f"mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


def equal_reward_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: True on every row of a group whose G scores are all equal (max_g == min_g). Such a group's
    group-baseline advantages are all 0, so it carries no gradient; DAPO's dynamic sampling drops it."""
    groups = _groups(scores, group_size)
    return (groups.amax(dim=1) == groups.amin(dim=1)).repeat_interleave(group_size)


@torch.no_grad()
def critic_free_advantages(scores: torch.Tensor, log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                           action_mask: torch.Tensor, group_size: int, estimator: str, kl_coef: float,
                           gamma: float, baseline_scores: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] per-token advantages of a critic-free estimator from one score per answer, with an optional KL
    penalty to the reference in the reward (kl_t = log pi(a_t) - log pi_ref(a_t), k1, as PPO's).

        reinforce_plus_plus, reinforce_plus_plus_baseline (OpenRLHF's REINFORCE++ order: KL first, whiten last):
            s_b = r_b  (reinforce_plus_plus)  or  r_b - mean_g  (_baseline)
            G_t = sum_{u >= t} gamma^(u - t) * (-kl_coef * kl_u  +  s_b at the last action)
            A_t = masked_whiten(G, m)             over every action of the batch (population std)
        grpo, dr_grpo, rloo, remax:
            A_b = group_advantages(r, group_size, estimator, baseline_scores=...)       one number per answer
            A_t = A_b - kl_coef * sum_{u >= t} gamma^(u - t) * kl_u                      the same sum, A_b at the end

    With kl_coef = 0 (KL as a loss term instead, or no KL) the sequence estimators give A_t = A_b on every action
    (token_advantages). Rows whose mask is all 0 (answers left out of the loss) get 0 and, for REINFORCE++, do not
    enter the whitening statistics. A, 0 outside the mask.
    """
    mask = action_mask.to(log_probs.dtype)
    no_clip = float("inf")  # the scores were clipped before (a group baseline must see the clipped ones)
    if estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        _groups(scores, group_size)  # whole groups only, as every estimator
        shaped = scores.float()
        if estimator == "reinforce_plus_plus_baseline":
            shaped = group_advantages(scores, group_size, "dr_grpo")
        rewards, _ = kl_penalty_rewards(log_probs, ref_log_probs, mask, shaped, kl_coef, no_clip)
        return masked_whiten(discounted_token_returns(rewards, mask, gamma), mask)
    sequence = group_advantages(scores, group_size, estimator, baseline_scores=baseline_scores)
    if kl_coef == 0:
        return token_advantages(sequence.to(log_probs.dtype), mask)
    rewards, _ = kl_penalty_rewards(log_probs, ref_log_probs, mask, sequence, kl_coef, no_clip)
    return discounted_token_returns(rewards, mask, gamma)
