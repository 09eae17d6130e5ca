"""Masks, positions and lengths of padded batches, as pure tensor functions (no DeepSpeed, no model).

Everything here is computed from the attention mask or from positions, never by comparing ids with the pad
id, so right padding, left padding and a tokenizer whose pad equals its EOS give the same answer.
"""
import torch


def last_real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last 1 in each row of the mask: where a sequence's reward sits.

        last[b] = max { t : mask[b, t] = 1 }

    Found from the mask, never from token ids, so it is the same for right and left padding and
    correct when pad == EOS. A row without any 1 gives 0.
    """
    positions = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (positions * (attention_mask != 0)).amax(dim=-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding does not shift a sequence.

    Bodies with learned absolute positions (GPT-2) number positions 0..T-1 whatever the mask says,
    so a left-padded row would get other position embeddings than the same row right-padded.
    Rotary bodies (Llama, Qwen2) see only position differences; OPT counts from the mask itself;
    Bloom (ALiBi) takes no position ids and is not given any.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def answer_lengths(answer_ids: torch.Tensor, stop_ids: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] answer lengths, [B] bool ended with a stop token) of generated answers [B, A]; `stop_ids` is the
    EOS id, or every id that ends a reply (a chat template's end of turn and the tokenizer's EOS).

        length[b] = 1 + first t with answer_ids[b, t] in stop_ids,   or A when row b has none

    Only the first stop token counts: what follows it is padding, whatever its id.
    """
    stops = torch.as_tensor(stop_ids if isinstance(stop_ids, list) else [stop_ids], device=answer_ids.device)
    is_eos = torch.isin(answer_ids, stops)
    ended = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    width = torch.full_like(first_eos, answer_ids.size(1))
    return torch.where(ended, first_eos + 1, width), ended


def close_answers(answer_ids: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor, end_id: int) -> torch.Tensor:
    """Answers whose stop token is `end_id` (the end of turn the reward model was trained on), whichever
    stop token ended them; rows that did not end are unchanged."""
    last = (lengths - 1).clamp(min=0).unsqueeze(1)
    closed = answer_ids.scatter(1, last, torch.full_like(last, end_id))
    return torch.where(ended.unsqueeze(1), closed, answer_ids)


def mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] long mask with mask[b, t] = 1 for t < lengths[b]."""
    positions = torch.arange(width, device=lengths.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()
