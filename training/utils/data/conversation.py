"""DeepSpeed-Chat's HH prompt format and the end-of-turn convention shared by SFT, reward model, PPO and chat
(the default format; chat_format.py adds the model's chat template and chooses between the two).

Text format (Anthropic HH / Dahoas rm-static):
    "\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant:" + " a2"

Token convention: every assistant reply is followed by the tokenizer's EOS *id* (never the EOS text),
including replies that sit in the history of a prompt. The reward model scores that EOS position,
PPO keeps it in the action mask, generation stops on it, and chat history is encoded the same way.
Text chunks are tokenised separately and concatenated, so a prompt has the same ids in every step.
"""
from dataclasses import dataclass

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Chunk:
    text: str
    ends_turn: bool = False  # append EOS after this text: it closes an assistant reply
    trained: bool = False  # its tokens (and the EOS) are labels in SFT


def prompt_chunks(prompt: str) -> list[Chunk]:
    """Split an HH-format prompt so each earlier assistant reply is closed by EOS.

    A reply ends where a "\\n\\nHuman:" follows an "\\n\\nAssistant:". Text without markers is one chunk.
    """
    chunks, start, seen_assistant, pos = [], 0, False, 0
    while True:
        next_assistant = prompt.find(ASSISTANT, pos)
        next_human = prompt.find(HUMAN, pos)
        if next_human == -1 and next_assistant == -1:
            break
        if next_human != -1 and (next_assistant == -1 or next_human < next_assistant):
            if seen_assistant and next_human > start:
                chunks.append(Chunk(prompt[start:next_human], ends_turn=True))
                start = next_human
            seen_assistant = False
            pos = next_human + len(HUMAN)
        else:
            seen_assistant = True
            pos = next_assistant + len(ASSISTANT)
    chunks.append(Chunk(prompt[start:]))
    return chunks


def format_user_turn(text: str) -> str:
    """The prompt text that asks the assistant to answer `text` (one new human turn)."""
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


def format_reply(text: str) -> str:
    """Assistant replies start with one space, as in the HH data (prompt + reply is the HH string)."""
    return " " + text.strip()


def messages_to_chunks(messages: list[dict], train_all_replies: bool = True) -> list[Chunk]:
    """Render `[{role, content}]` (roles system/user/assistant) into chunks.

    Assistant replies are trained when `train_all_replies`; user and system text never is.
    """
    chunks, pending = [], ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pending += f"System: {content.strip()}"
        elif role == "user":
            pending += format_user_turn(content)
        elif role == "assistant":
            if pending:
                chunks.append(Chunk(pending))
                pending = ""
            chunks.append(Chunk(format_reply(content), ends_turn=True, trained=train_all_replies))
        else:
            raise ValueError(f"unknown message role {role!r} (expected system, user or assistant)")
    if pending:
        chunks.append(Chunk(pending))
    return chunks


def encode_chunks(tokenizer, chunks: list[Chunk], add_bos: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and, per id, whether it is a training label."""
    return encode_conversations(tokenizer, [chunks], add_bos)[0]


def encode_conversations(tokenizer, conversations: list[list[Chunk]], add_bos: bool = True
                         ) -> list[tuple[list[int], list[bool]]]:
    """`encode_chunks` for many conversations with one batched tokenizer call (fast tokenizers are
    parallel in Rust). The tokenizer's BOS is prepended once when it normally adds one (Llama style)."""
    texts = [chunk.text for chunks in conversations for chunk in chunks]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer_adds_bos(tokenizer) else []
    encoded = []
    for chunks in conversations:
        ids, trained = list(bos), [False] * len(bos)
        for chunk in chunks:
            piece = list(next(pieces))
            if chunk.ends_turn:
                piece.append(tokenizer.eos_token_id)
            ids.extend(piece)
            trained.extend([chunk.trained] * len(piece))
        encoded.append((ids, trained))
    return encoded


def tokenizer_adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(probe) > 0 and probe[0] == tokenizer.bos_token_id
