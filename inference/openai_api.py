"""The OpenAI wire format the server speaks: request checks (each bad field is an `ApiError` with OpenAI's error
shape and an HTTP status) and the response, stream-chunk and usage objects. No web framework here.

Request fields read: chat `messages`, completions `prompt`, and `max_tokens` (`max_completion_tokens` for chat),
`temperature`, `top_p`, `n`, `seed`, `stop`, `stream`, `stream_options.include_usage`, plus vLLM's extra
`top_k` and `repetition_penalty`. `model` may name anything (one model is served; responses name it). Fields
this server cannot honour (`logprobs`, `tools`, ...) are refused when set, never silently dropped; other unknown
fields are ignored, as OpenAI-compatible servers do.
"""
import time
import uuid
from dataclasses import dataclass

from inference.batching import SamplingParams

ROLES = ("system", "user", "assistant")  # "developer" (OpenAI's newer name for system) is read as system
MAX_STOP_STRINGS = 4
MAX_N = 16
# (field, the value that means "not used"): set to anything else, the request is refused.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "function_call": (None, "none"), "logit_bias": (None, {}),
               "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
               "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error response: `status` and OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Limits:
    """What the server allows and its defaults for fields a request leaves out."""
    max_tokens_limit: int  # most tokens one choice may ask for
    default_max_tokens: int
    context: int  # the model's positions: prompt + reply must fit
    max_n: int = MAX_N
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class ParsedRequest:
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    requested_max_tokens: bool  # the request named max_tokens (else it shrinks to fit the context)


def require_object(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not (low < value if low_open else low <= value) or value > high or value != value:
        bound = f"({low}" if low_open else f"[{low}"
        raise ApiError(400, f"'{name}' must be in {bound}, {high}], got {value!r}", name)
    return value


def parse_sampling(body: dict, limits: Limits, seed_default: int, max_tokens_field: str = "max_tokens"
                   ) -> ParsedRequest:
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise ApiError(400, f"'{name}' is not supported by this server: leave it out", name,
                           "unsupported_parameter")
    field = max_tokens_field if body.get(max_tokens_field) is not None else "max_tokens"
    max_tokens = body.get(field)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise ApiError(400, f"'{field}' must be an integer, got {max_tokens!r}", field)
        if max_tokens <= 0:
            raise ApiError(400, f"'{field}' must be at least 1, got {max_tokens}", field)
        if max_tokens > limits.max_tokens_limit:
            raise ApiError(400, f"'{field}' {max_tokens} is more than this server's limit of "
                                f"{limits.max_tokens_limit} tokens (--max_tokens_limit): ask for fewer", field)
    n = _number(body, "n", 1, 1, limits.max_n, integer=True)
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty "
                            f"strings, got {body.get('stop')!r}", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else limits.default_max_tokens,
        temperature=float(_number(body, "temperature", limits.temperature, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", limits.top_p, 0.0, 1.0, low_open=True)),
        top_k=max(0, _number(body, "top_k", limits.top_k, -1, 1 << 30, integer=True)),  # -1 or 0: off
        repetition_penalty=float(_number(body, "repetition_penalty", limits.repetition_penalty, 0.0, 10.0,
                                         low_open=True)),
        seed=(seed if seed is not None else seed_default) % (2 ** 63),
        stop=tuple(stop))
    return ParsedRequest(params, n, stream, bool(options.get("include_usage")), max_tokens is not None)


def parse_messages(body: dict) -> list[dict]:
    """`messages` as [{role, content: str}]: text content parts are joined; roles system/developer, user,
    assistant."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ApiError(400, f"{where}.role {message.get('role')!r} is not one of system, user, assistant",
                           f"{where}.role")
        parsed.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return parsed


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": ...}}); "
                        "this server reads text only", where)


def parse_prompts(body: dict) -> list[str]:
    """Completions' `prompt`: one string or a list of strings (token-id prompts are not read)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise ApiError(400, "'prompt' is required: a string or a non-empty list of strings", "prompt")


def check_fits(prompt_length: int, parsed: ParsedRequest, limits: Limits, param: str) -> SamplingParams:
    """The request's parameters with max_tokens fitted to the model's positions, or a 400 when the prompt (with
    the asked-for max_tokens) does not fit."""
    room = limits.context - prompt_length
    wanted = parsed.params.max_tokens
    if room < 1 or (parsed.requested_max_tokens and wanted > room):
        asked = f" + {wanted} (max_tokens)" if parsed.requested_max_tokens else ""
        raise ApiError(400, f"this model's context is {limits.context} tokens, and the request needs "
                            f"{prompt_length} (prompt){asked}: shorten the {param} or lower max_tokens", param,
                       "context_length_exceeded")
    if wanted > room:
        return SamplingParams(**{**parsed.params.__dict__, "max_tokens": room})
    return parsed.params


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": use}


def completion_response(request_id: str, model: str, texts: list[str], reasons: list[str], use: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(texts, reasons))],
            "usage": use}


def chat_chunk(request_id: str, model: str, created: int, index: int | None, delta: dict | None = None,
               finish_reason: str | None = None, use: dict | None = None) -> dict:
    """One `chat.completion.chunk`; `index` None: the usage chunk (no choices)."""
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                                   "finish_reason": finish_reason}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_chunk(request_id: str, model: str, created: int, index: int | None, text: str = "",
                     finish_reason: str | None = None, use: dict | None = None) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                                   "finish_reason": finish_reason}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "rlhf-chat"}]}
