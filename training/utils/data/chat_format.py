"""Prompt formats: how a conversation becomes the token ids that every step, chat and evaluation see.

One switch chooses the format (`--apply_chat_template`, OpenRLHF's name; `--chat_template FILE` gives a
Jinja template, TRL's `chat_template_path`):

    hh             DeepSpeed-Chat's "\\n\\nHuman: q\\n\\nAssistant: a" text, every reply closed by the EOS id
                   (conversation.py). The default: DeepSpeed-Chat's behaviour and its datasets' format.
    chat_template  the tokenizer's own chat template (Qwen2 ChatML, Llama-3 headers, SmolLM2, Gemma, ...).

Rules of the chat-template format:
- HH-text rows are parsed into turns (`hh_to_messages`) and rendered by the template; `messages` rows are
  rendered directly. Roles must alternate user/assistant after an optional system message.
- A conversation is rendered once with every assistant content replaced by a placeholder, so whatever the
  template writes around a reply (role headers, system prompts, `<think>` blocks) is never trained; the
  content and the template's end-of-turn token after it are (SFT masks; DPO's reply mask).
- The end-of-turn token is the special token the template writes right after an assistant's content
  (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`). It becomes the tokenizer's EOS (as --add_eot_token
  does), so every EOS rule of the project holds unchanged: the reward model scores it, PPO's action mask
  ends with it, generation stops at it, and also at the tokenizer's own EOS (`stop_token_ids`).
- Prompts (reward pairs, DPO, step 3, chat, evaluation) are rendered with the template's generation prompt;
  a reply is its content plus the end-of-turn token. Text pieces are tokenised separately and concatenated
  (conversation.encode_conversations), so a prompt has the same ids in every step. The template writes
  BOS itself where it wants one; nothing is prepended.

The format travels with the model: every saved model directory holds `prompt_format.json` (and the
tokenizer saves its template), and every program reads it, so the flag is given once, to the first step.
A flag that contradicts a model's saved format is an error.
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass

from training.utils.config import FIXED, option
from training.utils.data.conversation import (
    ASSISTANT,
    HUMAN,
    Chunk,
    encode_conversations,
    format_reply,
    messages_to_chunks,
    prompt_chunks,
    tokenizer_adds_bos,
)
from training.utils.errors import UserInputError
from training.utils.tokenizer import DEFAULT_PAD

HH, CHAT_TEMPLATE = "hh", "chat_template"
PROMPT_FORMAT_FILE = "prompt_format.json"
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never in real text, untouched by `trim` and friends
_TURN_MARKER = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


@dataclass
class PromptFormatFlags:
    """model"""
    apply_chat_template: bool | None = option(
        None, "[new] Format every conversation with the tokenizer's chat template (roles, end-of-turn token) "
              "instead of DeepSpeed-Chat's '\\n\\nHuman: ... \\n\\nAssistant:' text. Default: the format the model "
              "was trained with (its prompt_format.json), else the HH text; --no_apply_chat_template forces the "
              "HH text. Contradicting a saved model's format is an error.", resume=FIXED)
    chat_template: str | None = option(
        None, "[new] A Jinja chat template file, for a tokenizer without a template (or to replace its own); "
              "implies --apply_chat_template. The saved tokenizer keeps it.", resume=FIXED,
        check=lambda path: None if path is None or path.strip() else "must name a Jinja template file")


class ConversationError(ValueError):
    """A conversation the chat template cannot render (the data pipeline names the dataset)."""


# ------------------------------------------------------------------------------------------ conversions
def hh_to_messages(text: str) -> list[dict]:
    """HH text -> [{role, content}]: "Human:" turns are user, "Assistant:" turns assistant, text before the
    first marker a system message ("System: " removed). The open "\\n\\nAssistant:" a prompt ends with (the
    turn the reply fills) is dropped. Contents are stripped, as the HH renderers strip them. Two turns of one
    speaker in a row (4 of the 2303 prompts of Anthropic HH-harmless's test split) are one turn, joined by a
    blank line: in HH text that is the same speaker going on, and a chat template needs alternating roles."""
    parts = _TURN_MARKER.split(text)
    messages = []
    head = parts[0].strip()
    if head:
        messages.append({"role": "system", "content": head.removeprefix("System:").strip()})
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == HUMAN else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(filter(None, (messages[-1]["content"], content.strip())))
        else:
            messages.append({"role": role, "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def check_roles(messages: list[dict], last: str) -> None:
    """An optional system message, then user and assistant alternating from a user turn, ending with `last`."""
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = [("user", "assistant")[i % 2] for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != last:
        first = next((m["content"] for m in messages if m["content"]), "")
        raise ConversationError(f"a conversation's roles do not alternate (system?, user, assistant, user, ..., "
                                f"{last}): got {', '.join(roles) or 'no messages'} (first message: {first[:60]!r})")


# ------------------------------------------------------------------------------------------ the formats
class PromptFormat:
    """DeepSpeed-Chat's HH text (conversation.py), exactly as every step used it before the switch existed."""

    name = HH

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = [tokenizer.eos_token_id]  # generation stops at any; the first closes a reply
        self.bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None

    def prompt(self, prompt: str | list[dict]) -> list[Chunk]:
        """A prompt (HH text or messages ending with a user turn) that asks for the next reply."""
        if not isinstance(prompt, str):
            prompt = "".join(chunk.text for chunk in messages_to_chunks(prompt))
        return prompt_chunks(prompt)

    def reply(self, text: str) -> Chunk:
        """A trained reply closed by the end-of-turn token (reward pairs, DPO, SFT's final turn)."""
        return Chunk(format_reply(text), ends_turn=True, trained=True)

    def sft(self, sample) -> list[Chunk] | None:
        """The SFT conversation of a data row: every assistant turn of a messages row is trained, the final
        reply of an HH-text row (its earlier turns are prompt, as in DeepSpeed-Chat). None: no reply."""
        if sample.messages:
            return messages_to_chunks(list(sample.messages))
        target = sample.demonstration if sample.demonstration is not None else sample.chosen
        return self.prompt(sample.prompt) + [self.reply(target)] if target else None

    def prompt_of(self, sample) -> list[Chunk]:
        return self.prompt(sample.prompt)

    def encode(self, conversations: list[list[Chunk]]) -> list[tuple[list[int], list[bool]]]:
        return encode_conversations(self.tokenizer, conversations, add_bos=self.name == HH)

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        return self.encode([self.prompt(prompt)])[0][0]

    def record(self) -> dict:
        """prompt_format.json: what a later program needs to use the model in the same format."""
        return {"prompt_format": self.name}

    def fingerprint(self) -> str:
        """Changes exactly when the rendering does (part of the data cache key)."""
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return "HH text ('\\n\\nHuman: ...\\n\\nAssistant:'), replies closed by EOS"


class ChatTemplateFormat(PromptFormat):
    """The tokenizer's chat template (see the module docstring). Construction checks the template and makes
    its end-of-turn token the tokenizer's EOS; `origin` names where the template came from, for errors."""

    name = CHAT_TEMPLATE

    def __init__(self, tokenizer, template: str, origin: str, extra_stop_tokens: tuple[str, ...] = ()):
        self.tokenizer, self.template, self.origin = tokenizer, template, origin
        original_eos = tokenizer.eos_token
        try:  # a template that fails on these probe conversations is bad input, named once here
            self._check_generation_prompt()
            self.end_of_turn, end_token = self._find_end_of_turn()
        except ConversationError as err:
            raise UserInputError(f"{err}: fix the template") from None
        if end_token != tokenizer.eos_token:
            tokenizer.add_special_tokens({"eos_token": end_token})
        if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD})
        self.stop_token_ids = []
        for token in (end_token, original_eos, *extra_stop_tokens):
            token_id = tokenizer.convert_tokens_to_ids(token) if token else None
            known = token_id is not None and (token_id != tokenizer.unk_token_id or token == tokenizer.unk_token)
            if known and token_id not in self.stop_token_ids:
                self.stop_token_ids.append(token_id)
        self.stop_tokens = [tokenizer.convert_ids_to_tokens(i) for i in self.stop_token_ids]
        probe = self._render([{"role": "user", "content": "x"}], True)
        bos = tokenizer.bos_token
        self.bos_id = tokenizer.bos_token_id if bos and probe.startswith(bos) else None

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as err:  # noqa: BLE001 - Jinja raises many types (syntax, undefined, raise_exception)
            raise ConversationError(f"the chat template of {self.origin} fails: {type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''}") from None

    def _find_end_of_turn(self) -> tuple[str, str]:
        """(text after an assistant's content up to and including the special token that closes the turn,
        that token). Whitespace before the token (Llama 2's " </s>") belongs to the end of turn."""
        mark = _PLACEHOLDER.format(0)
        text = self._render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": mark}], False)
        if mark not in text:
            raise UserInputError(f"the chat template of {self.origin} does not write the assistant's message: "
                                 "give a template that renders every message's content")
        after = text[text.index(mark) + len(mark):]
        stripped = after.lstrip()
        specials = {t for t in self.tokenizer.all_special_tokens}
        specials |= {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        token = next((t for t in sorted(specials, key=len, reverse=True) if t and stripped.startswith(t)), None)
        if token is None:
            raise UserInputError(f"the chat template of {self.origin} does not close an assistant turn with a special "
                                 f"token (after the reply it writes {after[:30]!r}): generation could not stop; "
                                 "give a template that ends each assistant turn with one (e.g. <|im_end|>)")
        return after[:len(after) - len(stripped)] + token, token

    def _check_generation_prompt(self) -> None:
        user = [{"role": "user", "content": "Hello"}]
        with_prompt, without = self._render(user, True), self._render(user, False)
        if with_prompt == without:
            raise UserInputError(f"the chat template of {self.origin} has no generation prompt (rendering with "
                                 "add_generation_prompt changes nothing): prompts could not ask for a reply; give a "
                                 "template with an {% if add_generation_prompt %} block")

    def _chunks(self, messages: list[dict], trained: set[int], generation_prompt: bool) -> list[Chunk]:
        """Render `messages`; each assistant content (its index in `trained`: a label) + end of turn is a chunk."""
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        masked = [dict(m, content=_PLACEHOLDER.format(i)) if i in assistants else m for i, m in enumerate(messages)]
        text = self._render(masked, generation_prompt)
        chunks, cursor = [], 0
        for i in assistants:
            mark = _PLACEHOLDER.format(i)
            at = text.find(mark, cursor)
            if at < 0:
                raise ConversationError(f"the chat template of {self.origin} drops assistant message {i + 1}")
            end = at + len(mark)
            if text.startswith(self.end_of_turn, end):
                end += len(self.end_of_turn)
            chunks += [Chunk(text[cursor:at]), Chunk(messages[i]["content"] + self.end_of_turn, trained=i in trained)]
            cursor = end
        chunks.append(Chunk(text[cursor:]))
        return [chunk for chunk in chunks if chunk.text]

    def prompt(self, prompt: str | list[dict]) -> list[Chunk]:
        messages = hh_to_messages(prompt) if isinstance(prompt, str) else _stripped(prompt)
        check_roles(messages, last="user")
        return self._chunks(messages, set(), generation_prompt=True)

    def reply(self, text: str) -> Chunk:
        return Chunk(text.strip() + self.end_of_turn, trained=True)

    def sft(self, sample) -> list[Chunk] | None:
        if sample.messages:
            messages = _stripped(sample.messages)
            trained = {i for i, m in enumerate(messages) if m["role"] == "assistant"}
        else:
            target = sample.demonstration if sample.demonstration is not None else sample.chosen
            if not target:
                return None
            messages = hh_to_messages(sample.prompt) + [{"role": "assistant", "content": target.strip()}]
            trained = {len(messages) - 1}
        check_roles(messages, last="assistant")
        return self._chunks(messages, trained, generation_prompt=False)

    def prompt_of(self, sample) -> list[Chunk]:
        return self.prompt(_stripped(sample.messages[:-1]) if sample.messages else sample.prompt)

    def record(self) -> dict:
        return {"prompt_format": self.name, "end_of_turn": self.end_of_turn, "stop_tokens": self.stop_tokens,
                "template_sha256": _sha256(self.template)}

    def describe(self) -> str:
        return (f"chat template of {self.origin} (end of turn {self.end_of_turn!r}, generation stops at "
                f"{', '.join(self.stop_tokens)})")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stripped(messages) -> list[dict]:
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


# ------------------------------------------------------------------------------------------ choosing one
def read_saved_format(model_path: str) -> dict | None:
    """A model directory's prompt_format.json, or None (a base model, a tiny config, a hub id)."""
    path = os.path.join(model_path, PROMPT_FORMAT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("prompt_format") not in (HH, CHAT_TEMPLATE):
            raise ValueError(f"unknown prompt_format {record.get('prompt_format')!r}")
    except (OSError, ValueError, AttributeError) as err:
        raise UserInputError(f"'{path}' is unreadable ({err}): restore it or delete it (the HH format is then "
                             "assumed)") from None
    return record


def saved_formats(model_paths: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """{flag: (path, prompt_format.json)} of the models that were saved with a format."""
    records = {flag: (path, read_saved_format(path)) for flag, path in model_paths.items()
               if path and os.path.isdir(path)}
    return {flag: (path, record) for flag, (path, record) in records.items() if record is not None}


def chosen_format(flags, model_paths: dict[str, str]) -> str:
    """HH or CHAT_TEMPLATE: the flags', else the one the models were saved with, else HH. `model_paths` maps a
    flag name to the model it names ({"--model_name_or_path": "out/actor"}); all must agree with the flags.
    Cheap (reads JSON files only): each program calls it while checking its flags."""
    return _choose(flags, saved_formats(model_paths))


def _choose(flags, saved: dict[str, tuple[str, dict]]) -> str:
    names = {record["prompt_format"] for _, record in saved.values()}
    if len(names) > 1:
        listing = ", ".join(f"{flag} '{path}' ({record['prompt_format']})" for flag, (path, record) in saved.items())
        raise UserInputError(f"the models were trained with different prompt formats: {listing}: use models "
                             "trained with one format")
    if flags.apply_chat_template is False and flags.chat_template:
        raise UserInputError("--no_apply_chat_template and --chat_template contradict each other: drop one")
    wanted = CHAT_TEMPLATE if flags.apply_chat_template or flags.chat_template else (
        HH if flags.apply_chat_template is False else None)
    if wanted is not None and names and wanted not in names:
        flag, (path, record) = next(iter(saved.items()))
        switch = "--apply_chat_template" if wanted == CHAT_TEMPLATE else "--no_apply_chat_template"
        raise UserInputError(f"{switch} contradicts the prompt format {record['prompt_format']!r} that {flag} "
                             f"'{path}' was trained with: drop the flag (the saved format is used)")
    name = wanted or (names.pop() if names else HH)
    if name == CHAT_TEMPLATE and getattr(flags, "add_eot_token", False):
        raise UserInputError("--add_eot_token with the chat template format: the template decides the end-of-turn "
                             "token; drop --add_eot_token")
    return name


def resolve_prompt_format(tokenizer, flags, model_paths: dict[str, str]) -> PromptFormat:
    """The run's PromptFormat (see `chosen_format`), its template checked; `flags` has PromptFormatFlags."""
    saved = saved_formats(model_paths)
    if _choose(flags, saved) == HH:
        return PromptFormat(tokenizer)
    template, origin = _template(tokenizer, flags.chat_template, model_paths)
    for flag, (path, record) in saved.items():
        if record.get("template_sha256", _sha256(template)) != _sha256(template):
            raise UserInputError(f"--chat_template '{flags.chat_template}' differs from the template {flag} '{path}' "
                                 "was trained with: drop --chat_template (the saved template is used)")
    extra = tuple(token for _, record in saved.values() for token in record.get("stop_tokens", ()))
    return ChatTemplateFormat(tokenizer, template, origin, extra)


def _template(tokenizer, path: str | None, model_paths: dict[str, str]) -> tuple[str, str]:
    """(template text, where it came from); a file also becomes the tokenizer's template (saved with it)."""
    if path is None:
        if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template.strip():
            model = next(iter(model_paths.values()), "the model")
            raise UserInputError(f"--apply_chat_template: the tokenizer of '{model}' has no chat template: give "
                                 "one with --chat_template FILE (a Jinja file), or drop --apply_chat_template")
        return tokenizer.chat_template, "the tokenizer"
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"--chat_template '{path}' cannot be read ({type(err).__name__}): give a UTF-8 "
                             "Jinja file") from None
    if not template.strip():
        raise UserInputError(f"--chat_template '{path}' is empty: give a Jinja chat template")
    tokenizer.chat_template = template
    return template, f"--chat_template '{path}'"
