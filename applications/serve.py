"""Serve a trained actor behind an OpenAI-compatible HTTP API and a web chat page, or a reward model for scoring.

    pip install -e ".[serve]"
    python applications/serve.py --path output/step3-models/actor            # http://127.0.0.1:8000/
    python applications/serve.py --path output/reward --port 8001              # /v1/rewards, /get_reward (OpenRLHF)
    python applications/serve.py --path DIR --host 0.0.0.0 --api_key "$KEY"   # reachable from other machines

--path is an actor saved by step 1, DPO or step 3, any Hugging Face causal-LM directory (safetensors only, no
remote code, offline), or a step-2 reward model directory (then the scoring routes are served instead). Prompts
are rendered in the format the model was trained with (its prompt_format.json; --apply_chat_template /
--chat_template FILE for a model saved without one), exactly as chat.py renders them. Requests that arrive
together are generated as one batch of up to --max_batch_size sequences, each with its own sampling parameters.
SIGTERM (or Ctrl-C) stops accepting connections, lets the running requests finish, then exits (143 / 130).
"""
import contextlib
import dataclasses
import os
import signal
import sys

from applications.chat import ChatConfig
from training.utils.config import at_least, configuration, group, in_range, option, parse_config, positive
from training.utils.data.chat_format import PromptFormatFlags, chosen_format, resolve_prompt_format
from training.utils.errors import UserInputError, report_user_errors, say
from training.utils.flags import ReplyLengthFlags, SamplingFlags, SeedFlags
from training.utils.model.build import position_limit
from training.utils.model.load import default_device, load_causal_lm

FALLBACK_CONTEXT = 1024  # for configs that do not state their maximum length
API_KEY_ENV = "RLHF_SERVE_API_KEY"


def _same_flag(cls, name: str, help_text: str):
    """`cls`'s option `name` (the same flag: one definition, as tests/test_config.py requires) with this program's
    help text."""
    inherited = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=inherited.default, metadata={**inherited.metadata, "help": help_text})


@configuration()
class ServeConfig(ReplyLengthFlags, SeedFlags, PromptFormatFlags):
    path: str = _same_flag(ChatConfig, "path", "An actor saved by step 1, DPO or step 3 (or any HF causal LM "
                           "directory), or a step-2 reward model directory (then the scoring routes are served), "
                           "loaded offline; tiny/opt | tiny/llama give a random-initialised baseline.")
    sampling: SamplingFlags = group(SamplingFlags, temperature=0.7, top_p=0.9)
    host: str = option("127.0.0.1", "[new] Address to listen on; 0.0.0.0 makes the server reachable from other "
                                    "machines (set --api_key then).")
    port: int = option(8000, "[new] TCP port to listen on.", check=in_range(1, 65535))
    api_key: str | None = option(None, f"[new] Require 'Authorization: Bearer KEY' on every route but / and /health "
                                       f"(default: ${API_KEY_ENV} when set, else no key).")
    served_model_name: str | None = option(None, "[new] The model id /v1/models lists and responses name (default: "
                                                 "the last part of --path).")
    max_batch_size: int = option(8, "[new] Most sequences generated (or pairs scored) in one batch; 1 turns "
                                    "batching off.", check=at_least(1))
    batch_wait_ms: float = option(5.0, "[new] After a request arrives, how long the worker waits for more to batch "
                                       "with it.", check=in_range(0.0, 1000.0))
    max_tokens_limit: int = option(1024, "[new] Most tokens one request may ask for (max_tokens); requests without "
                                         "max_tokens get --max_new_tokens.", check=at_least(1))
    max_request_bytes: int = option(1 << 20, "[new] Largest request body accepted (larger: HTTP 413).",
                                    check=at_least(1024))
    max_queue: int = option(1024, "[new] Most sequences waiting for the model (more: HTTP 503).", check=at_least(1))
    request_timeout: float = option(120.0, "[new] Seconds a request may take, waiting included (longer: HTTP 504, "
                                           "its sequences stop).", check=positive)
    drain_timeout: float = option(60.0, "[new] On SIGTERM, seconds the running requests get to finish before the "
                                        "server exits anyway.", check=at_least(0.0))
    log_level: str = option("info", "[new] uvicorn's log level (access lines at info).",
                            choices=["critical", "error", "warning", "info", "debug"])

    def validate(self) -> None:
        if self.max_new_tokens > self.max_tokens_limit:
            raise UserInputError(f"--max_new_tokens {self.max_new_tokens} is more than --max_tokens_limit "
                                 f"{self.max_tokens_limit}: lower it or raise the limit")
        chosen_format(self, {"--path": self.path})


def parse_args(argv=None) -> ServeConfig:
    return parse_config(ServeConfig, argv, "Serve an actor (OpenAI-compatible API + web chat) or a reward model.")


def build_app(config: ServeConfig, device=None):
    """(app, what is served: "chat" or "reward") for `config`; everything loaded, nothing listening yet."""
    from inference.openai_api import Limits
    from inference.server import ChatEngine, Settings, create_app
    from training.utils.model.reward_model import is_reward_model_dir

    device = device or default_device()
    name = config.served_model_name or os.path.basename(os.path.normpath(config.path)) or config.path
    settings = Settings(model_name=name, api_key=config.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_request_bytes=config.max_request_bytes, request_timeout=config.request_timeout,
                        seed=config.seed)
    wait_s = config.batch_wait_ms / 1000
    if os.path.isdir(config.path) and is_reward_model_dir(config.path):
        from inference.reward_service import RewardScorer
        from training.utils.model.reward_model import load_reward_model

        model, tokenizer, _ = load_reward_model(config.path)
        prompt_format = resolve_prompt_format(tokenizer, config, {"--path": config.path})
        model.to(device).eval()
        context = position_limit(model.config) or FALLBACK_CONTEXT
        scorer = RewardScorer(model, prompt_format, context, config.max_batch_size, wait_s, config.max_queue)
        return create_app(settings, rewards=scorer), "reward", prompt_format
    model, tokenizer = load_causal_lm(config.path, device)
    prompt_format = resolve_prompt_format(tokenizer, config, {"--path": config.path})
    context = position_limit(model.config) or FALLBACK_CONTEXT
    limits = Limits(max_tokens_limit=config.max_tokens_limit, default_max_tokens=config.max_new_tokens,
                    context=context, temperature=config.sampling.temperature, top_p=config.sampling.top_p,
                    top_k=config.sampling.top_k, repetition_penalty=config.sampling.repetition_penalty)
    engine = ChatEngine(model, tokenizer, prompt_format, limits, config.max_batch_size, wait_s, config.max_queue)
    return create_app(settings, chat=engine), "chat", prompt_format


def _stopped(signum, frame):  # uvicorn re-raises the signal once it has drained: end like every other program
    say(f"[serve] stopped by {signal.Signals(signum).name} after the running requests finished")
    sys.exit(128 + signum)


@report_user_errors
def main(argv=None) -> None:
    config = parse_args(argv)
    try:
        from inference.server import run
    except ImportError as err:
        raise UserInputError(f"serving needs FastAPI and uvicorn ({err}): pip install -e '.[serve]'") from None
    check_can_listen(config.host, config.port)  # before minutes of loading
    with contextlib.redirect_stdout(sys.stderr):  # library logs while loading
        app, kind, prompt_format = build_app(config)
    say(f"[serve] {config.path} ({kind}) on {default_device()}, format: {prompt_format.describe()}; "
        f"http://{config.host}:{config.port}/ (batch up to {config.max_batch_size}"
        f"{', API key required' if app.settings.api_key else ''})")
    signal.signal(signal.SIGTERM, _stopped)
    run(app, config.host, config.port, config.drain_timeout, config.log_level)


def check_can_listen(host: str, port: int) -> None:
    """Bind the address once, as uvicorn will: a port in use or an address not of this machine is one error line."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError as err:
        raise UserInputError(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port, or a "
                             "--host address of this machine") from None


if __name__ == "__main__":
    main()
