"""Multi-turn chat with a trained actor: history in the training prompt format, streaming, stopping.

The model input of every turn is built exactly as the training steps build a prompt with history, by the
model's prompt format (training/utils/data/chat_format.py): the HH text "\\n\\nHuman: q1\\n\\nAssistant: a1
\\n\\nHuman: q2\\n\\nAssistant:" with each earlier reply closed by the EOS id, or the model's chat template
with its end-of-turn token. A reply ends at a stop token (EOS, the template's end of turn) or, in the HH
format, where the model starts the next turn ("\\n\\nHuman:").
"""
import json
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from training.utils.data.chat_format import HH, PromptFormat
from training.utils.data.conversation import ASSISTANT, HUMAN
from training.utils.model.build import position_limit
from training.utils.sampling import SamplingConfig, decoding_kernels

TURN_MARKERS = (HUMAN, ASSISTANT)
CLEAR_COMMAND = "clear"
QUIT_COMMAND = "quit"


@dataclass
class Turn:
    user: str
    reply: str | None = None  # None until the model has answered


@dataclass
class ModelInput:
    ids: list[int]
    dropped_turns: int = 0  # oldest turns removed from the history to fit the limit
    truncated: bool = False  # the newest message alone was too long: only its end is kept


class Conversation:
    """The turns of one chat and the token ids the model sees for the next reply.

    `max_input_tokens` bounds the model input: the oldest complete turns are dropped (for good) until it
    fits; a single message longer than the limit keeps its last tokens, as training truncates prompts.
    """

    def __init__(self, prompt_format: PromptFormat, max_input_tokens: int):
        self.prompt_format = prompt_format
        self.max_input_tokens = max_input_tokens
        self.turns: list[Turn] = []

    def clear(self) -> None:
        self.turns = []

    def add_user_message(self, text: str) -> None:
        if self.turns and self.turns[-1].reply is None:
            raise ValueError("the previous message has no reply yet")
        self.turns.append(Turn(text))

    def add_reply(self, text: str) -> None:
        if not self.turns or self.turns[-1].reply is not None:
            raise ValueError("no user message is waiting for a reply")
        self.turns[-1].reply = text

    def messages(self) -> list[dict]:
        """Every turn so far as [{role, content}], ending with the user message the next reply answers."""
        messages = []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.reply is not None:
                messages.append({"role": "assistant", "content": turn.reply})
        return messages

    def model_input(self) -> ModelInput:
        dropped = 0
        ids = self._encode()
        while len(ids) > self.max_input_tokens and len(self.turns) > 1:
            self.turns.pop(0)
            dropped += 1
            ids = self._encode()
        if len(ids) > self.max_input_tokens:
            return ModelInput(ids[-self.max_input_tokens:], dropped, truncated=True)
        return ModelInput(ids, dropped)

    def _encode(self) -> list[int]:
        return self.prompt_format.encode_prompt(self.messages())


def turn_markers(prompt_format: PromptFormat) -> tuple[str, ...]:
    """The texts that start another turn in a format's plain text: HH's markers; none for a chat template
    (its turns start with special tokens, which generation stops at)."""
    return TURN_MARKERS if prompt_format.name == HH else ()


def cut_at_turn_marker(text: str, markers: tuple[str, ...] = TURN_MARKERS) -> tuple[str, bool]:
    """`text` up to the first turn marker, and whether there was one."""
    positions = [p for p in (text.find(m) for m in markers) if p != -1]
    return (text[:min(positions)], True) if positions else (text, False)


def unsettled_suffix_length(text: str, markers: tuple[str, ...] = TURN_MARKERS) -> int:
    """How many trailing characters may still change or turn out to start a turn marker: an incomplete
    multi-byte character (decoded as U+FFFD) or a proper prefix of a marker ("\\n", "\\n\\nHum", ...)."""
    settled = text.rstrip("\ufffd")
    marker_prefix = max((size for marker in markers for size in range(1, min(len(marker), len(settled) + 1))
                         if settled.endswith(marker[:size])), default=0)
    return len(text) - len(settled) + marker_prefix


class StopAtTurnMarker(StoppingCriteria):
    """Stop once the generated text (after `prompt_length` tokens) contains a turn marker."""

    def __init__(self, tokenizer, prompt_length: int, markers: tuple[str, ...] = TURN_MARKERS):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.markers = markers

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([cut_at_turn_marker(t, self.markers)[1] for t in texts], device=input_ids.device)


class ReplyStreamer(BaseStreamer):
    """Writes the reply while it is generated: decoded text increments, never the prompt, never a turn
    marker. Text that could still become a marker is held back until the next token settles it."""

    def __init__(self, tokenizer, write, markers: tuple[str, ...] = TURN_MARKERS):
        self.tokenizer = tokenizer
        self.write = write
        self.markers = markers
        self.ids: list[int] = []
        self.written = 0
        self.prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:  # generate() pushes the prompt ids first
            self.prompt_skipped = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._write_settled(final=False)

    def end(self) -> None:
        self._write_settled(final=True)

    def _write_settled(self, final: bool) -> None:
        text, stopped = cut_at_turn_marker(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.markers)
        text = text.lstrip()
        if not (final or stopped):
            text = text[:len(text) - unsettled_suffix_length(text, self.markers)]
        if len(text) > self.written:
            self.write(text[self.written:])
            self.written = len(text)


@dataclass
class Reply:
    text: str
    new_tokens: int
    stop_reason: str  # "eos", "turn marker" or "max_new_tokens"


@torch.no_grad()
def generate_reply(model, tokenizer, input_ids: list[int], sampling: SamplingConfig, streamer=None,
                   stop_token_ids: list[int] | None = None, markers: tuple[str, ...] = TURN_MARKERS) -> Reply:
    """One reply to `input_ids` (a single conversation), cut at a stop token (default: EOS) or at the next
    turn marker."""
    stop_token_ids = stop_token_ids or [tokenizer.eos_token_id]
    device = next(model.parameters()).device
    prompt = torch.tensor([input_ids], dtype=torch.long, device=device)
    stop_at_marker = StoppingCriteriaList([StopAtTurnMarker(tokenizer, prompt.size(1), markers)] if markers else [])
    with decoding_kernels(model):
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                                stopping_criteria=stop_at_marker, streamer=streamer, **sampling.generate_kwargs())
    new_ids = output[0, prompt.size(1):].tolist()
    text, at_marker = cut_at_turn_marker(tokenizer.decode(new_ids, skip_special_tokens=True), markers)
    if any(i in new_ids for i in stop_token_ids):
        reason = "eos"
    elif at_marker:
        reason = "turn marker"
    else:
        reason = "max_new_tokens"
    return Reply(text.strip(), len(new_ids), reason)


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    return position_limit(model.config)


@dataclass
class ChatSession:
    """What the chat loop needs: the model, its conversation, the decoding controls and two streams."""
    model: object
    tokenizer: object
    conversation: Conversation
    sampling: SamplingConfig
    out: object  # replies go here (stdout): "Assistant: <reply>" per turn
    log: object  # notices and --show_prompt dumps go here (stderr), so `out` stays parseable
    show_prompt: bool = False

    def run(self, read_line, prompt_user: bool = False) -> None:
        """Answer lines from `read_line()` until "quit" or end of input ("" from read_line)."""
        while True:
            if prompt_user:
                self.out.write("Human: ")
                self.out.flush()
            line = read_line()
            if not line:  # end of input
                if prompt_user:
                    self.out.write("\n")
                return
            message = line.strip()
            if not message:
                continue
            if message.lower() == QUIT_COMMAND:
                return
            if message.lower() == CLEAR_COMMAND:
                self.conversation.clear()
                self._notice("history cleared")
                continue
            self.answer(message)

    def answer(self, message: str) -> Reply:
        self.conversation.add_user_message(message)
        model_input = self.conversation.model_input()
        if model_input.dropped_turns:
            self._notice(f"history trimmed: dropped the oldest {model_input.dropped_turns} turn(s) to fit "
                         f"{self.conversation.max_input_tokens} input tokens (--max_history_tokens)")
        if model_input.truncated:
            self._notice(f"message too long: the model sees only its last {self.conversation.max_input_tokens} "
                         "tokens (--max_history_tokens)")
        if self.show_prompt:
            text = self.tokenizer.decode(model_input.ids, skip_special_tokens=False)
            self._notice(f"model input ({len(model_input.ids)} tokens): {json.dumps(text, ensure_ascii=False)}")
        self.out.write("Assistant: ")
        self.out.flush()
        prompt_format = self.conversation.prompt_format
        markers = turn_markers(prompt_format)
        reply = generate_reply(self.model, self.tokenizer, model_input.ids, self.sampling,
                               ReplyStreamer(self.tokenizer, self._write_out, markers), prompt_format.stop_token_ids,
                               markers)
        self.out.write("\n")
        self.out.flush()
        if reply.stop_reason == "max_new_tokens":
            self._notice(f"reply cut at --max_new_tokens {self.sampling.max_new_tokens}")
        self.conversation.add_reply(reply.text)
        return reply

    def _write_out(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _notice(self, text: str) -> None:
        self.log.write(f"[chat] {text}\n")
        self.log.flush()
