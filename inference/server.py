"""The HTTP server of applications/serve.py: an OpenAI-compatible API on a trained actor, or reward scoring on a
step-2 reward model, plus a web chat page. FastAPI + uvicorn (the `serve` extra); `create_app` builds the app
in-process (tests drive it with FastAPI's TestClient), `run` serves it.

Actor routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET / (the chat page).
Reward-model routes: POST /v1/rewards ({"pairs": [{"prompt", "response"}]} -> {"data": [{"index", "reward"}]}),
POST /get_reward (OpenRLHF's remote reward model: {"query": [texts]} -> {"rewards": [...]}), GET /v1/models,
GET /health.

Every error is OpenAI's {"error": {"message", "type", "param", "code"}} with its HTTP status: 400 bad request
(malformed JSON, a bad field, a prompt beyond the model's positions), 401 (missing or wrong API key), 404
(unknown route), 405, 413 (body over --max_request_bytes), 503 (queue full or shutting down), 504 (the reply
took longer than --request_timeout), 500 (a failure of the server itself).
"""
import asyncio
import copy
import hmac
import json
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.batching import Generator, Job, QueueFull, Row
from inference.chat import turn_markers
from inference.openai_api import (
    ApiError,
    Limits,
    chat_chunk,
    chat_response,
    check_fits,
    completion_chunk,
    completion_response,
    error_body,
    models_list,
    new_id,
    parse_messages,
    parse_prompts,
    parse_sampling,
    require_object,
    usage,
)
from inference.reward_service import RewardScorer
from training.utils.data.chat_format import check_roles
from training.utils.data.conversation import Chunk

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")  # served without the API key (the page asks for it)


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    request_timeout: float = 120.0
    seed: int = 1234


class ChatEngine:
    """An actor behind the batcher: prompts in its format, rows out as events."""

    def __init__(self, model, tokenizer, prompt_format, limits: Limits, max_batch_size: int, max_wait_s: float,
                 max_queue: int = 1024):
        self.prompt_format, self.limits = prompt_format, limits
        self.markers = turn_markers(prompt_format)
        # the worker decodes with its own tokenizer copy, so request threads may encode at the same time
        self.generator = Generator(model, copy.deepcopy(tokenizer), prompt_format.stop_token_ids, max_batch_size,
                                   max_wait_s, max_queue)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        try:
            check_roles(messages, last="user")
            return self.prompt_format.encode_prompt(messages)
        except ValueError as err:  # ConversationError, or an unknown role the HH renderer refuses
            raise ApiError(400, f"'messages': {err}", "messages") from None

    def raw_prompt(self, text: str) -> list[int]:
        return self.prompt_format.encode([[Chunk(text)]])[0][0]

    def close(self) -> None:
        self.generator.batcher.close()


def create_app(settings: Settings, chat: ChatEngine | None = None, rewards: RewardScorer | None = None) -> FastAPI:
    """The app serving `chat` (an actor) or `rewards` (a reward model)."""
    rng = random.Random(settings.seed)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        for engine in (chat, rewards):  # runs after uvicorn drained the open requests
            if engine is not None:
                (engine.close if hasattr(engine, "close") else engine.batcher.close)()

    app = FastAPI(title="rlhf-chat server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chat, app.state.rewards = chat, rewards

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        if err.status_code == 404:
            message, code = f"unknown route: {request.method} {request.url.path}", "not_found"
        elif err.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(err.detail), None
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        return JSONResponse(error_body(f"internal server error: {type(err).__name__}", "server_error"),
                            status_code=500)

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            return require_object(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "kind": "chat" if chat else "reward"}

    @app.get("/v1/models")
    async def models():
        return models_list(settings.model_name, created)

    if chat is not None:
        @app.get("/", response_class=HTMLResponse)
        async def page():
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            body = await read_json(request)
            messages = parse_messages(body)
            parsed = parse_sampling(body, chat.limits, rng.getrandbits(63), "max_completion_tokens")
            ids = chat.chat_prompt(messages)
            params = check_fits(len(ids), parsed, chat.limits, "messages")
            markers = chat.markers + params.stop
            rows = [Row(ids, _seeded(params, i), i, markers, strip=True) for i in range(parsed.n)]
            return await _respond(chat, settings, rows, len(ids), parsed, "chatcmpl", chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await read_json(request)
            prompts = parse_prompts(body)
            parsed = parse_sampling(body, chat.limits, rng.getrandbits(63))
            if len(prompts) * parsed.n > chat.limits.max_n:
                raise ApiError(400, f"{len(prompts)} prompts x n {parsed.n} is more than the {chat.limits.max_n} "
                                    "choices one request may ask for", "n")
            rows, prompt_tokens = [], 0
            for p, text in enumerate(prompts):
                ids = chat.raw_prompt(text)
                params = check_fits(len(ids), parsed, chat.limits, "prompt")
                prompt_tokens += len(ids)
                rows += [Row(ids, _seeded(params, i), p * parsed.n + i, params.stop, strip=False)
                         for i in range(parsed.n)]
            return await _respond(chat, settings, rows, prompt_tokens, parsed, "cmpl", chat=False)

    if rewards is not None:
        @app.post("/v1/rewards")
        async def score_pairs(request: Request):
            body = await read_json(request)
            pairs = rewards.pairs(body)
            scores = await _score(rewards, settings, pairs)
            return {"object": "list", "model": settings.model_name,
                    "data": [{"index": i, "object": "reward", "reward": s} for i, s in enumerate(scores)]}

        @app.post("/get_reward")
        async def openrlhf_reward(request: Request):
            body = await read_json(request)
            scores = await _score(rewards, settings, rewards.queries(body))
            return {"rewards": scores, "scores": scores, "extra_logs": {}}

    return Guard(app, settings)


def _seeded(params, choice: int):
    """The parameters of choice `choice`: its own seed, so the n choices of one request differ."""
    from dataclasses import replace

    return replace(params, seed=(params.seed + choice) % (2 ** 63))


def _submit(batcher, rows, timeout: float) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody waits for this event any more
            pass

    job = Job(rows, emit, time.monotonic() + timeout)
    try:
        batcher.submit(job)
    except QueueFull as err:
        raise ApiError(503, f"the server is busy ({err}): retry later", None, "server_busy", "server_error") from None
    return job, events


def _timeout_error(settings: Settings) -> ApiError:
    return ApiError(504, f"the reply took longer than this server's --request_timeout of {settings.request_timeout:g} "
                         "s: ask for fewer tokens or retry", None, "timeout", "server_error")


async def _next_event(events: asyncio.Queue, job: Job, settings: Settings):
    left = job.deadline - time.monotonic()
    try:
        event = await asyncio.wait_for(events.get(), max(left, 0.001))
    except asyncio.TimeoutError:
        job.cancelled = True
        raise _timeout_error(settings) from None
    if event[0] == "error":
        job.cancelled = True
        if event[1] == "timeout":
            raise _timeout_error(settings)
        raise ApiError(500, event[1], None, "generation_failed", "server_error")
    return event


async def _score(rewards: RewardScorer, settings: Settings, pairs) -> list[float]:
    job, events = _submit(rewards.batcher, pairs, settings.request_timeout)
    return (await _next_event(events, job, settings))[1]


async def _respond(engine: ChatEngine, settings: Settings, rows: list[Row], prompt_tokens: int, parsed, prefix: str,
                   chat: bool):
    request_id = new_id(prefix)
    job, events = _submit(engine.generator.batcher, rows, settings.request_timeout)
    if parsed.stream:
        first = await _peek(events, job, settings)  # errors before the first token are still plain HTTP errors
        return StreamingResponse(_stream(job, events, first, request_id, settings, prompt_tokens, parsed, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, reasons, generated = [""] * len(rows), [None] * len(rows), 0
    while any(r is None for r in reasons):
        event = await _next_event(events, job, settings)
        if event[0] == "delta":
            texts[event[1]] += event[2]
        else:
            reasons[event[1]], generated = event[2], generated + event[3]
    build = chat_response if chat else completion_response
    return build(request_id, settings.model_name, texts, reasons, usage(prompt_tokens, generated))


async def _peek(events: asyncio.Queue, job: Job, settings: Settings):
    return await _next_event(events, job, settings)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, first, request_id: str, settings: Settings, prompt_tokens: int,
                  parsed, chat: bool):
    model, created = settings.model_name, int(time.time())
    open_rows, generated, started = len(job.rows), 0, set()
    event = first
    try:
        while True:
            kind, index = event[0], event[1]
            if chat and index not in started:
                started.add(index)
                yield _sse(chat_chunk(request_id, model, created, index, {"role": "assistant", "content": ""}))
            if kind == "delta":
                yield _sse(chat_chunk(request_id, model, created, index, {"content": event[2]}) if chat
                           else completion_chunk(request_id, model, created, index, event[2]))
            else:
                open_rows, generated = open_rows - 1, generated + event[3]
                yield _sse(chat_chunk(request_id, model, created, index, {}, event[2]) if chat
                           else completion_chunk(request_id, model, created, index, "", event[2]))
            if not open_rows:
                break
            event = await _next_event(events, job, settings)
        if parsed.include_usage:
            use = usage(prompt_tokens, generated)
            yield _sse(chat_chunk(request_id, model, created, None, use=use) if chat
                       else completion_chunk(request_id, model, created, None, use=use))
    except ApiError as err:  # after the first token the status is sent: the error is the stream's last event
        yield _sse(err.body())
    finally:
        if open_rows:
            job.cancelled = True  # the client went away or the reply failed: free its rows
    yield "data: [DONE]\n\n"


class Guard:
    """ASGI middleware in front of the app: the API key (Bearer) on every route but the public ones, and the
    request-size limit (413), checked on Content-Length and on the bytes actually received."""

    def __init__(self, app: FastAPI, settings: Settings):
        self.app, self.settings = app, settings
        self.state = app.state  # (tests reach the engines through it)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = self.settings.api_key
        if key and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, key.encode()):
                problem = "wrong API key" if token else "no API key"
                await _send_error(send, 401, f"{problem}: send the server's --api_key as 'Authorization: Bearer KEY'",
                                  "invalid_api_key")
                return
        limit = self.settings.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, 413, _too_large(limit), "request_too_large")
            return
        body, more = bytearray(), scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _send_error(send, 413, _too_large(limit), "request_too_large")
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes (--max_request_bytes)"


async def _send_error(send, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def run(app, host: str, port: int, drain_timeout: float, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT: stop accepting, let running requests finish (at most `drain_timeout` s), stop
    the batcher, return (uvicorn then re-raises the signal)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="on")
    uvicorn.Server(config).run()
