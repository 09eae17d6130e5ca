"""Client of a reward model served by applications/serve.py (or any OpenRLHF-compatible reward server).

    from training.utils.rlhf.remote_reward import remote_rewards, openrlhf_rewards
    remote_rewards("http://127.0.0.1:8001", ["What is 2 + 2?"], [" 4"])          # -> [0.73]
    openrlhf_rewards("http://127.0.0.1:8001/get_reward", ["\\n\\nHuman: hi\\n\\nAssistant: hello"])

Standard library only (urllib), so step 3 can use it as a reward source without the `serve` extra. A failure is a
`RemoteRewardError` naming the URL and what the server said (its OpenAI-shaped error message when it sent one);
connection failures and 503 (busy) are retried `retries` times, 1 s apart.
"""
import json
import time
import urllib.error
import urllib.request


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or refused the request."""


def _post(url: str, payload: dict, api_key: str | None, timeout: float, retries: int) -> dict:
    data = json.dumps(payload).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            message = _error_message(err)
            if err.code != 503 or attempt == retries:
                raise RemoteRewardError(f"reward server {url} answered HTTP {err.code}: {message}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == retries:
                reason = getattr(err, "reason", err)
                raise RemoteRewardError(f"reward server {url} cannot be reached ({reason}): is serve.py running "
                                        "there?") from None
        time.sleep(1.0)
    raise AssertionError("unreachable")


def _error_message(err: "urllib.error.HTTPError") -> str:
    try:
        body = json.loads(err.read().decode("utf-8"))
        return body["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return err.reason or "no message"


def remote_rewards(base_url: str, prompts: list, responses: list[str], *, api_key: str | None = None,
                   timeout: float = 180.0, retries: int = 2) -> list[float]:
    """The reward of each (prompt, response) pair: POST {base_url}/v1/rewards. A prompt is plain text, HH text or
    a list of {"role", "content"} messages; it is rendered in the reward model's own prompt format."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    url = base_url.rstrip("/") + "/v1/rewards"
    body = _post(url, {"pairs": [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]}, api_key,
                 timeout, retries)
    data = sorted(body.get("data", []), key=lambda item: item["index"])
    if len(data) != len(prompts):
        raise RemoteRewardError(f"reward server {url} returned {len(data)} rewards for {len(prompts)} pairs")
    return [float(item["reward"]) for item in data]


def openrlhf_rewards(url: str, queries: list[str], *, api_key: str | None = None, timeout: float = 180.0,
                     retries: int = 2) -> list[float]:
    """OpenRLHF's remote reward call: POST {"query": queries} to `url` (e.g. http://host:port/get_reward), each
    query the prompt and the reply already in the model's format; returns its "rewards"."""
    body = _post(url, {"query": list(queries)}, api_key, timeout, retries)
    rewards = body.get("rewards")
    if not isinstance(rewards, list) or len(rewards) != len(queries):
        raise RemoteRewardError(f"reward server {url} returned no 'rewards' list of {len(queries)} numbers")
    return [float(r) for r in rewards]
