"""Request batching for the server: one worker thread owns the model and runs the requests that arrive together
as one batch (up to `max_rows` sequences), each sequence with its own sampling parameters.

How a batch keeps each request's sampling. All rows go through one `model.generate` call in greedy mode with
one logits processor, `RowSampler`, that picks every row's next token itself (its temperature, top-p, top-k,
repetition penalty, and its own `torch.Generator` seeded from the request's `seed`) and hands generate a
score row that is -inf everywhere but the chosen token, so generate's argmax takes exactly that token. A greedy
row (temperature 0) takes the argmax of the raw logits, as `generate(do_sample=False)` would. Requests with
different parameters therefore share a batch (no grouping by parameters), and a seeded request gets the same
tokens whatever else is in its batch (up to floating-point differences of padded batches).

`RowTracker` (a stopping criterion, called after every step) follows each row: it decodes the reply so far,
ends the row at a stop token, a turn marker or a `stop` string (cut from the text), at its own `max_tokens`
("length"), at the request's deadline or when its client went away, and streams the settled text of each
row to its request. Generation ends when every row has ended.
"""
import collections
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from inference.chat import cut_at_turn_marker, unsettled_suffix_length
from training.utils.data.collators import pad_batch
from training.utils.sampling import decoding_kernels

STOP, LENGTH, TIMEOUT, CANCELLED = "stop", "length", "timeout", "cancelled"


class QueueFull(Exception):
    """More sequences are waiting than the server accepts (--max_queue)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # strings that end the reply (not part of it)


@dataclass
class Row:
    """One generated sequence: a choice of a request."""
    prompt_ids: list[int]
    params: SamplingParams
    index: int  # the choice's index in its request
    markers: tuple[str, ...] = ()  # texts that end the reply: turn markers and `stop` strings
    strip: bool = True  # chat replies are stripped as chat.py strips them; raw completions are not
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the reply already streamed
    finish_reason: str | None = None
    generator: torch.Generator | None = None


class Job:
    """One request: its rows and where their events go. `emit(event)` is called from the worker thread with
    ("delta", index, text), ("done", index, finish_reason, completion_tokens) or ("error", message)."""

    def __init__(self, rows: list[Row], emit, deadline: float):
        self.rows, self.emit, self.deadline = rows, emit, deadline
        self.cancelled = False


class RowSampler(LogitsProcessor):
    """Chooses each row's next token with that row's parameters (module docstring)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.empty(len(self.rows), dtype=torch.long, device=scores.device)
        for b, row in enumerate(self.rows):
            chosen[b] = self._choose(row, input_ids[b], scores[b].float()) if row.finish_reason is None else 0
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(1, chosen.unsqueeze(1), 0.0)
        return picked

    @staticmethod
    def _choose(row: Row, previous: torch.Tensor, logits: torch.Tensor) -> int:
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = previous.unique()
            values = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1)
        if row.generator is None or row.generator.device != probs.device:
            row.generator = torch.Generator(device=probs.device).manual_seed(p.seed)
        return int(torch.multinomial(probs, 1, generator=row.generator))


class RowTracker(StoppingCriteria):
    """Ends rows and streams their text (module docstring)."""

    def __init__(self, tokenizer, jobs: list[Job], stop_token_ids: list[int], prompt_length: int):
        self.tokenizer, self.stop_token_ids, self.prompt_length = tokenizer, set(stop_token_ids), prompt_length
        self.rows = [(job, row) for job in jobs for row in job.rows]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        last = input_ids[:, -1].tolist()
        done = []
        for b, (job, row) in enumerate(self.rows):
            if row.finish_reason is None:
                self._advance(job, row, last[b], now)
            done.append(row.finish_reason is not None)
        return torch.tensor(done, device=input_ids.device)

    def _advance(self, job: Job, row: Row, token: int, now: float) -> None:
        if job.cancelled:
            row.finish_reason = CANCELLED
            return
        row.ids.append(token)
        if token in self.stop_token_ids:
            self.finish(job, row, STOP)
            return
        text, at_marker = self._text(row)
        if at_marker:
            self.finish(job, row, STOP)
        elif len(row.ids) >= row.params.max_tokens:
            self.finish(job, row, LENGTH)
        elif now > job.deadline:
            row.finish_reason = TIMEOUT
        else:
            settled = len(text) - unsettled_suffix_length(text, row.markers)
            if row.strip:
                settled = min(settled, len(text[:settled].rstrip()))  # trailing spaces may be stripped at the end
            self._send(job, row, text[:settled])

    def _text(self, row: Row) -> tuple[str, bool]:
        ids = [i for i in row.ids if i not in self.stop_token_ids]
        text, at_marker = cut_at_turn_marker(self.tokenizer.decode(ids, skip_special_tokens=True), row.markers)
        return (text.lstrip() if row.strip else text), at_marker

    def _send(self, job: Job, row: Row, text: str) -> None:
        if len(text) > row.sent:
            job.emit(("delta", row.index, text[row.sent:]))
            row.sent = len(text)

    def finish(self, job: Job, row: Row, reason: str) -> None:
        text, _ = self._text(row)
        self._send(job, row, text.rstrip() if row.strip else text)
        row.finish_reason = reason
        job.emit(("done", row.index, reason, len(row.ids)))


class Batcher:
    """A queue of jobs and one worker thread that takes the jobs waiting (up to `max_rows` rows, waiting up to
    `max_wait_s` after the first for others to arrive) and hands them to `run_batch(jobs)` together."""

    def __init__(self, run_batch, max_rows: int, max_wait_s: float = 0.005, max_queue: int = 1024,
                 name: str = "batcher"):
        self.run_batch, self.max_rows, self.max_wait_s, self.max_queue = run_batch, max_rows, max_wait_s, max_queue
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batch_sizes: list[int] = []  # rows of every batch run (tests and benchmarks read it)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if sum(len(j.rows) for j in self._pending) + len(job.rows) > self.max_queue:
                raise QueueFull(f"more than {self.max_queue} sequences are waiting")
            self._pending.append(job)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop after the jobs already submitted have run."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while self._rows_waiting() < self.max_rows and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs, rows = [], 0
            while self._pending and (not jobs or rows + len(self._pending[0].rows) <= self.max_rows):
                job = self._pending.popleft()
                jobs.append(job)
                rows += len(job.rows)
            return jobs

    def _rows_waiting(self) -> int:
        return sum(len(job.rows) for job in self._pending)

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            live = [job for job in jobs if not job.cancelled]
            if not live:
                continue
            self.batch_sizes.append(sum(len(job.rows) for job in live))
            try:
                self.run_batch(live)
            except Exception as err:  # noqa: BLE001 - one failed batch must not stop the server
                for job in live:
                    job.emit(("error", f"generation failed: {type(err).__name__}: {err}"))


class Generator:
    """Batched generation with a causal LM: `batcher.submit(Job)`; `generate_calls` counts model.generate calls."""

    def __init__(self, model, tokenizer, stop_token_ids: list[int], max_rows: int, max_wait_s: float,
                 max_queue: int = 1024):
        self.model, self.tokenizer, self.stop_token_ids = model, tokenizer, list(stop_token_ids)
        self.generate_calls = 0
        self.batcher = Batcher(self.run_batch, max_rows, max_wait_s, max_queue, name="generation")

    @torch.no_grad()
    def run_batch(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = pad_batch([r.prompt_ids for r in rows], pad, max(len(r.prompt_ids) for r in rows),
                                              left=True)
        tracker = RowTracker(self.tokenizer, jobs, self.stop_token_ids, input_ids.size(1))
        self.generate_calls += 1
        with decoding_kernels(self.model):
            self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max(r.params.max_tokens for r in rows), do_sample=False,
                                num_beams=1, repetition_penalty=1.0, eos_token_id=self.stop_token_ids,
                                pad_token_id=pad, logits_processor=LogitsProcessorList([RowSampler(rows)]),
                                stopping_criteria=StoppingCriteriaList([tracker]))
        for job in jobs:  # rows generate ended without the tracker ending them (e.g. a shorter max_new_tokens)
            for row in job.rows:
                if row.finish_reason is None:
                    tracker.finish(job, row, LENGTH)
                elif row.finish_reason == TIMEOUT:
                    job.emit(("error", "timeout"))
