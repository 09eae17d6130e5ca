"""Reward-model scoring for the server: (prompt, reply) pairs and OpenRLHF's full texts, batched across requests.

Every score is computed by rw_eval's `score` (the prompt rendered in the reward model's format, the reply closed
by the end-of-turn token, read at that token; prompts cut from the left to fit the model's positions), so the
server returns what `rw_eval.py` prints for the same pairs.

OpenRLHF's remote reward model (`--remote_rm_url`, its `serve_rm.py`) posts {"query": [texts]}, each text the
prompt and the reply already in the model's format, and reads {"rewards": [...]}. A query is split into prompt
and reply where the reply starts (HH: after the last "\\n\\nAssistant:"; a chat template: the text is the
prompt and the end-of-turn token is appended), a trailing pad, EOS or end-of-turn text is dropped, and the pair
is scored as above.
"""
from inference.batching import Batcher, Job
from inference.openai_api import ApiError
from training.step2_reward_model_finetuning.rw_eval import as_prompt, score
from training.utils.data.chat_format import HH
from training.utils.data.conversation import ASSISTANT, Chunk

MAX_PAIRS = 256  # per request


class RewardScorer:
    def __init__(self, model, prompt_format, max_seq_len: int, max_rows: int, max_wait_s: float,
                 max_queue: int = 4096):
        self.model, self.prompt_format, self.max_seq_len, self.max_rows = model, prompt_format, max_seq_len, max_rows
        self.forward_batches = 0
        self.batcher = Batcher(self.run_batch, max_rows, max_wait_s, max_queue, name="scoring")

    def run_batch(self, jobs: list[Job]) -> None:
        pairs = [pair for job in jobs for pair in job.rows]
        scores = score(self.model, self.prompt_format, [p for p, _ in pairs], [r for _, r in pairs], self.max_seq_len,
                       self.max_rows)
        self.forward_batches += -(-len(pairs) // self.max_rows)
        start = 0
        for job in jobs:
            job.emit(("scores", scores[start:start + len(job.rows)]))
            start += len(job.rows)

    # ---------------------------------------------------------------------------------------- requests
    def pairs(self, body: dict) -> list[tuple[list[Chunk], str]]:
        """{"pairs": [{"prompt": text or messages, "response": text}]} -> (rendered prompt, reply) pairs."""
        pairs = body.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            raise ApiError(400, "'pairs' is required: a non-empty list of {\"prompt\", \"response\"} objects", "pairs")
        _check_count(len(pairs), "pairs")
        rendered = []
        for i, pair in enumerate(pairs):
            where = f"pairs[{i}]"
            if not isinstance(pair, dict) or not isinstance(pair.get("response"), str):
                raise ApiError(400, f"{where} must be an object with 'prompt' and a string 'response'", where)
            prompt = pair.get("prompt")
            if isinstance(prompt, str):
                rendered.append((self._render(as_prompt(prompt), where), pair["response"]))
            elif isinstance(prompt, list):
                from inference.openai_api import parse_messages

                messages = parse_messages({"messages": prompt})
                rendered.append((self._render(messages, where), pair["response"]))
            else:
                raise ApiError(400, f"{where}.prompt must be a string or a list of messages", f"{where}.prompt")
        return rendered

    def queries(self, body: dict) -> list[tuple[list[Chunk], str]]:
        """OpenRLHF's {"query": [full texts], ...} -> (rendered prompt, reply) pairs (module docstring)."""
        queries = body.get("query")
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
            raise ApiError(400, "'query' is required: a non-empty list of texts (prompt + reply)", "query")
        _check_count(len(queries), "query")
        return [self._split_query(q) for q in queries]

    def _render(self, prompt, where: str) -> list[Chunk]:
        try:
            return self.prompt_format.prompt(prompt)
        except ValueError as err:  # ConversationError: roles that do not alternate, a template that fails
            raise ApiError(400, f"{where}.prompt: {err}", f"{where}.prompt") from None

    def _split_query(self, text: str) -> tuple[list[Chunk], str]:
        fmt, tokenizer = self.prompt_format, self.prompt_format.tokenizer
        ends = [t for t in (tokenizer.pad_token, tokenizer.eos_token, getattr(fmt, "end_of_turn", None)) if t]
        trimmed = True
        while trimmed:
            trimmed = False
            for end in ends:
                if text.rstrip().endswith(end):
                    text, trimmed = text.rstrip()[:-len(end)], True
        if fmt.name == HH:
            at = text.rfind(ASSISTANT)
            if at < 0:
                return [], text
            cut = at + len(ASSISTANT)
            return fmt.prompt(text[:cut]), text[cut:]
        return [Chunk(text)], ""  # a chat template's reply is the end-of-turn token after the rendered text


def _check_count(count: int, param: str) -> None:
    if count > MAX_PAIRS:
        raise ApiError(400, f"'{param}' holds {count} items, more than the {MAX_PAIRS} one request may score: split it",
                       param)
