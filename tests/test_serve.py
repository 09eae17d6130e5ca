"""serve.py: the OpenAI-compatible API (in-process with FastAPI's TestClient, and a real server driven by the
official `openai` client), bad requests, batching with each request's own sampling, reward-model scoring equal
to rw_eval's, the OpenRLHF route and its client, SIGTERM draining, and the web page in headless Chromium."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from conftest import REPO, STEP1_DIR, assert_ok, clean_env, free_port, run_script

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from applications.serve import build_app, parse_args  # noqa: E402

SERVE = REPO / "applications" / "serve.py"
CHAT = REPO / "applications" / "chat.py"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = {"messages": [{"role": "user", "content": "Repeat: 3 1 4 1"}], "temperature": 0, "max_tokens": 12}


def make_client(path, *flags) -> TestClient:
    app, _, _ = build_app(parse_args(["--path", str(path), *flags]), torch.device("cpu"))
    return TestClient(app)


@pytest.fixture(scope="module")
def client(actor_dir):
    with make_client(actor_dir, "--api_key", KEY, "--max_tokens_limit", "64", "--max_request_bytes", "4096",
                     "--max_new_tokens", "8") as test_client:
        yield test_client


def post(client, path, body, headers=AUTH):
    return client.post(path, json=body, headers=headers)


def chat_text(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------------------------------ the protocol
def test_chat_completion_stream_and_usage(client):
    response = post(client, "/v1/chat/completions", HELLO)
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "actor"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    use = body["usage"]
    assert use["prompt_tokens"] > 0 and 0 < use["completion_tokens"] <= 12
    assert use["total_tokens"] == use["prompt_tokens"] + use["completion_tokens"]

    streamed = post(client, "/v1/chat/completions",
                    {**HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(streamed.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == choice["message"]["content"]  # greedy: the stream spells the same reply
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == [choice["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == use


def test_completions_models_health_and_page(client):
    body = post(client, "/v1/completions", {"prompt": ["Hello", "Bye"], "max_tokens": 5, "n": 2, "seed": 7}).json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["completion_tokens"] <= 20
    models = client.get("/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "actor"
    assert client.get("/health").json()["status"] == "ok"  # public: no key needed
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<script" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline


def test_seed_n_and_stop_strings(client):
    sampled = {**HELLO, "temperature": 1.5, "seed": 11, "n": 2, "max_tokens": 10}
    first = post(client, "/v1/chat/completions", sampled).json()["choices"]
    again = post(client, "/v1/chat/completions", sampled).json()["choices"]
    assert [c["message"] for c in first] == [c["message"] for c in again]  # seeded: reproducible
    assert first[0]["message"] != first[1]["message"]  # the n choices are different samples

    greedy = post(client, "/v1/completions", {"prompt": "Hello", "temperature": 0, "max_tokens": 12}).json()
    text = greedy["choices"][0]["text"]
    at = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2] and text[:i].find(text[i:i + 2]) < 0)
    cut = post(client, "/v1/completions", {"prompt": "Hello", "temperature": 0, "max_tokens": 12,
                                           "stop": [text[at:at + 2]]}).json()["choices"][0]
    assert cut == {**cut, "text": text[:at], "finish_reason": "stop"}


# ------------------------------------------------------------------------------------------ bad requests
LONG = "Repeat: " + " ".join(["7"] * 600)
BAD_REQUESTS = [  # (id, path, body (bytes: sent as is), headers, status, message part)
    ("malformed-json", "/v1/chat/completions", b'{"messages": [', AUTH, 400, "not valid JSON"),
    ("not-an-object", "/v1/chat/completions", b"[1, 2]", AUTH, 400, "must be a JSON object"),
    ("no-messages", "/v1/chat/completions", {"max_tokens": 4}, AUTH, 400, "'messages' is required"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, AUTH, 400, "non-empty list"),
    ("unknown-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400,
     "messages[0].role 'wizard'"),
    ("ends-with-assistant", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                                                  {"role": "assistant", "content": "b"}]},
     AUTH, 400, "do not alternate"),
    ("zero-max-tokens", "/v1/chat/completions", {**HELLO, "max_tokens": 0}, AUTH, 400, "at least 1"),
    ("negative-max-tokens", "/v1/completions", {"prompt": "x", "max_tokens": -3}, AUTH, 400, "at least 1"),
    ("max-tokens-over-limit", "/v1/chat/completions", {**HELLO, "max_tokens": 65}, AUTH, 400,
     "limit of 64 tokens"),
    ("prompt-beyond-positions", "/v1/completions", {"prompt": LONG[:3000], "max_tokens": 4}, AUTH, 400,
     "context is 512 tokens"),
    ("bad-temperature", "/v1/chat/completions", {**HELLO, "temperature": 3}, AUTH, 400, "'temperature' must be"),
    ("unsupported-logprobs", "/v1/chat/completions", {**HELLO, "logprobs": True}, AUTH, 400, "not supported"),
    ("no-api-key", "/v1/chat/completions", HELLO, {}, 401, "no API key"),
    ("wrong-api-key", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "wrong API key"),
    ("unknown-route", "/v1/nothing", {}, AUTH, 404, "unknown route: POST /v1/nothing"),
    ("wrong-method", "/v1/chat/completions", None, AUTH, 405, "GET is not allowed"),
    ("oversized-body", "/v1/completions", {"prompt": "x" * 5000}, AUTH, 413, "larger than this server's limit"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_an_openai_error_and_the_server_keeps_serving(client, case):
    _, path, body, headers, status, message = case
    if body is None:
        response = client.get(path, headers=headers)
    elif isinstance(body, bytes):
        response = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        response = client.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert post(client, "/v1/chat/completions", {**HELLO, "max_tokens": 2}).status_code == 200


def test_oversized_chunked_body_is_refused(client):
    def chunks():  # no Content-Length: the limit is checked on the bytes received
        for _ in range(5):
            yield b" " * 1000

    response = client.post("/v1/completions", content=chunks(), headers=AUTH)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------------------------------ batching
def test_concurrent_requests_share_a_batch_and_keep_their_own_sampling(actor_dir):
    requests = [{"prompt": f"Repeat: {i} {i + 1}", "max_tokens": 6 + i, "temperature": 0 if i % 2 else 1.2,
                 "top_p": 0.8 if i % 3 else 1.0, "seed": 100 + i} for i in range(8)]
    with make_client(actor_dir, "--max_batch_size", "1") as alone:
        expected = [post(alone, "/v1/completions", r, {}).json()["choices"][0] for r in requests]
    with make_client(actor_dir, "--max_batch_size", "8", "--batch_wait_ms", "500") as batched:
        results = [None] * len(requests)

        def send(i):
            results[i] = post(batched, "/v1/completions", requests[i], {}).json()["choices"][0]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        generator = batched.app.state.chat.generator
        assert generator.generate_calls < len(requests) and max(generator.batcher.batch_sizes) > 1
    assert results == expected  # each request's parameters (greedy, temperature, top_p, seed, max_tokens) held
    assert [len(r["text"]) > 0 for r in results]


# ------------------------------------------------------------------------------------------ reward model
def test_reward_scores_equal_rw_eval_and_the_openrlhf_route(reward_dir):
    from training.step2_reward_model_finetuning.rw_eval import as_prompt, score
    from training.utils.data.chat_format import PromptFormat
    from training.utils.model.reward_model import load_reward_model

    prompts = ["What is 2 + 2?", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name a colour\n\nAssistant:", "x"]
    replies = [" 4", "Blue, like the sky.", "a much longer reply " * 5]
    model, tokenizer, _ = load_reward_model(str(reward_dir))
    fmt = PromptFormat(tokenizer)
    expected = score(model.eval(), fmt, [fmt.prompt(as_prompt(p)) for p in prompts], replies, 512, 16)
    with make_client(reward_dir, "--max_batch_size", "2") as client:
        body = post(client, "/v1/rewards", {"pairs": [{"prompt": p, "response": r}
                                                      for p, r in zip(prompts, replies)]}, {}).json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert [d["reward"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
        queries = [as_prompt(p) + " " + r.strip() + tokenizer.eos_token for p, r in zip(prompts, replies)]
        openrlhf = post(client, "/get_reward", {"query": queries, "prompts": prompts}, {}).json()
        assert openrlhf["rewards"] == pytest.approx(expected, abs=1e-5)
        assert post(client, "/get_reward", {"query": []}, {}).status_code == 400
        assert post(client, "/v1/chat/completions", HELLO, {}).status_code == 404  # a reward model does not chat


def test_reward_client_against_a_listening_server(reward_dir):
    import uvicorn

    from training.utils.rlhf.remote_reward import RemoteRewardError, openrlhf_rewards, remote_rewards

    app, _, _ = build_app(parse_args(["--path", str(reward_dir), "--api_key", KEY]), torch.device("cpu"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url)
        rewards = remote_rewards(url, ["What is 2 + 2?", [{"role": "user", "content": "Hi"}]], [" 4", "Hello"],
                                 api_key=KEY)
        assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)
        assert openrlhf_rewards(f"{url}/get_reward", ["\n\nHuman: What is 2 + 2?\n\nAssistant: 4"],
                                api_key=KEY) == pytest.approx(rewards[:1], abs=1e-5)
        with pytest.raises(RemoteRewardError, match="HTTP 401: wrong API key"):
            remote_rewards(url, ["q"], ["a"], api_key="nope")
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until_up(url: str, process=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not come up in {timeout} s")


# ------------------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="module")
def trained_actor(tmp_path_factory):
    """A tiny OPT that learnt synthetic/copy ("Repeat: 3 1 4" -> "3 1 4") with step 1 (~30 s on one core)."""
    work = tmp_path_factory.mktemp("serve_sft")
    actor = work / "actor"
    assert_ok(run_script(STEP1_DIR, ["main.py", "--model_name_or_path", "tiny/opt", "--output_dir", str(actor),
                                     "--data_path", "synthetic/copy:size=1600,eval_size=32", "--data_split", "10,0,0",
                                     "--data_output_path", str(work / "cache"), "--dtype", "fp32", "--dropout", "0.0",
                                     "--num_warmup_steps", "10", "--no_group_by_length",
                                     "--per_device_train_batch_size", "16", "--max_seq_len", "64",
                                     "--learning_rate", "1e-3"], OMP_NUM_THREADS="1"))
    return actor


def start_server(path, *flags):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SERVE), "--path", str(path), "--port", str(port), *flags],
                               env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def stop_server(process) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def served_actor(trained_actor):
    process, url = start_server(trained_actor, "--api_key", KEY)
    yield url
    stop_server(process)


def test_openai_client_talks_to_the_server_and_answers_like_chat_py(served_actor, trained_actor):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served_actor}/v1", api_key=KEY, max_retries=0)
    question = "Repeat: 3 1 4 1"
    chat_py = subprocess.run([sys.executable, str(CHAT), "--path", str(trained_actor), "--greedy",
                              "--max_new_tokens", "16"], input=question + "\n", capture_output=True, text=True,
                             env=clean_env(), timeout=300)
    assert_ok(chat_py)
    expected = chat_py.stdout.split("Assistant: ", 1)[1].strip()
    assert expected == "3 1 4 1"  # the actor learnt the task

    reply = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=16)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.model == "actor"
    stream = client.chat.completions.create(model="actor", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=16, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # streamed in several pieces
    completion = client.completions.create(model="actor", prompt=f"\n\nHuman: {question}\n\nAssistant:",
                                           temperature=0, max_tokens=8)
    assert completion.choices[0].text == " " + expected  # the raw continuation: the reply's leading space kept
    assert [m.id for m in client.models.list()] == ["actor"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served_actor}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="actor", messages=[{"role": "user", "content": question}], max_tokens=0)
    assert client.chat.completions.create(model="actor", messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=16).choices[0].message.content == expected


def test_sigterm_lets_the_running_request_finish_then_exits(actor_dir):
    process, url = start_server(actor_dir, "--max_tokens_limit", "400")
    payload = {"prompt": "Hello", "max_tokens": 400, "temperature": 0, "stream": True}
    request = urllib.request.Request(f"{url}/v1/completions", method="POST", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        first = response.readline()
        assert first.startswith(b"data: ")
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
    events = sse_events(first.decode() + rest)
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # ran to its max_tokens after the signal
    code = process.wait(60)
    assert code in (143, -signal.SIGTERM), process.stderr.read()[-2000:]
    assert "stopped by SIGTERM" in process.stderr.read()


# ------------------------------------------------------------------------------------------ the web page
def test_web_page_streams_a_reply_and_a_second_turn(served_actor):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,600"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.get(served_actor + "/")
        browser.find_element(By.ID, "api-key").send_keys(KEY + "\t")  # (leaving the field shows the model's name)
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")  # greedy: the reply is known
        wait = WebDriverWait(browser, 60)

        def ask(text: str, turn: int) -> str:
            box = browser.find_element(By.ID, "input")
            box.send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == turn and not
                       b.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming"))
            return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text

        assert ask("Repeat: 3 1 4 1", 1) == "3 1 4 1"
        assert ask("Repeat: 8 8 5 0", 2)  # a second turn (the model sees the first in its history)
        assert browser.find_element(By.ID, "error").text == ""
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["Repeat: 3 1 4 1",
                                                                                        "Repeat: 8 8 5 0"]
        if os.environ.get("SERVE_SCREENSHOT"):  # refresh docs/serve_chat.png (the README's picture)
            browser.save_screenshot(str(REPO / "docs" / "serve_chat.png"))
        browser.find_element(By.ID, "clear").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        browser.quit()


# ------------------------------------------------------------------------------------------ bad flags
def test_bad_flags_end_in_one_error_line(capsys, actor_dir):
    import socket

    from applications import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [(["--max_batch_size", "0"], "error: --max_batch_size must be at least 1 (got 0)"),
                 (["--max_new_tokens", "300", "--max_tokens_limit", "200"],
                  "error: --max_new_tokens 300 is more than --max_tokens_limit 200: lower it or raise the limit"),
                 (["--port", port], f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"),
                 (["--port", str(free_port()), "--path", str(actor_dir / "missing")], "error: model path")]
        for flags, message in cases:
            with pytest.raises(SystemExit) as exit_info:
                serve.main(["--path", str(actor_dir), *flags])
            assert exit_info.value.code == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert lines[-1].startswith(message) and "Traceback" not in "".join(lines), lines


def test_a_model_saved_without_a_format_is_served_with_its_chat_template(tmp_path):
    from training.utils.data.chat_format import ChatTemplateFormat
    from training.utils.model.build import create_hf_model
    from training.utils.model.save import save_hf_format
    from training.utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("tiny/qwen2")
    torch.manual_seed(0)
    save_hf_format(create_hf_model("tiny/qwen2", tokenizer), tokenizer, str(tmp_path / "qwen"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with make_client(tmp_path / "qwen", "--apply_chat_template") as client:
        body = post(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0}, {})
        assert body.status_code == 200, body.text
        fmt = ChatTemplateFormat(load_tokenizer(str(tmp_path / "qwen")), tokenizer.chat_template, "test")
        assert body.json()["usage"]["prompt_tokens"] == len(fmt.encode_prompt(messages))
        assert client.app.state.chat.prompt_format.name == "chat_template"


@pytest.mark.slow  # (starts a server process from benchmarks/, which the slow-marking hook does not read)
def test_serve_benchmark_reports_every_row_without_errors(capsys):
    from benchmarks import bench_serve

    report = bench_serve.main(["--clients", "1", "2", "--requests-per-client", "2", "--max-tokens", "4",
                               "--max-batch-size", "2"])
    assert [(r["batching"], r["clients"]) for r in report["rows"]] == [("on", 1), ("on", 2), ("off", 1), ("off", 2)]
    assert all(r["errors"] == 0 and r["requests"] == 2 * r["clients"] and r["tokens_per_s"] > 0 for r in report["rows"])
    assert set(report["goal"]) == {"clients", "tokens_per_s_ratio", "p99_latency_ratio", "met"}
    assert json.loads(capsys.readouterr().out)["rows"] == report["rows"]
