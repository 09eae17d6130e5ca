"""Load test of applications/serve.py over loopback: 1, 8 and 32 concurrent clients, batching on and off.

    python benchmarks/bench_serve.py                                   # tiny/opt (random), prints JSON
    python benchmarks/bench_serve.py --path out/actor --clients 1 8 --requests-per-client 4 --max-tokens 64

For each setting (--max_batch_size B, or 1 for "batching off") one server process is started on a free port
and every client count runs against it in turn: each client sends --requests-per-client streaming chat requests
one after another (a fixed count; every request is bounded by --max-tokens and --request-timeout) with its own
prompt and temperature 0. Reported per row: requests/s, generated tokens/s (the usage counts), latency p50/p95/p99
and time to first token (the first content chunk) p50/p95, and errors (anything but HTTP 200 with a finish
reason; must be 0). The goal (issue 18): 32 clients get >= 4x the tokens/s of one client with p99 latency
within 3x of one client's, with batching on. The clients are threads of this process, on the same machine as
the server: on a small machine they compete with it for the CPU.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from training.utils import distributed

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="tiny/opt", help="Model to serve (a tiny/ name: random weights).")
    parser.add_argument("--clients", nargs="*", type=int, default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32, help="The batching-on setting.")
    parser.add_argument("--settings", nargs="*", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=1, help="The server's torch threads (OMP_NUM_THREADS).")
    parser.add_argument("--output", default=None, help="Also write the JSON here.")
    return parser.parse_args(argv)


def start_server(path: str, batch: int, args) -> tuple[subprocess.Popen, int]:
    port = distributed.free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, str(REPO / "applications" / "serve.py"), "--path", path, "--port",
                                str(port), "--max_batch_size", str(batch), "--max_tokens_limit",
                                str(max(args.max_tokens, 1)), "--max_new_tokens", str(args.max_tokens),
                                "--request_timeout", str(args.request_timeout), "--log_level", "warning",
                                "--max_queue", "4096"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, port
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start in 180 s")


def one_request(port: int, prompt: str, args) -> dict:
    """One streaming chat request: latency, time to first token, generated tokens, ok."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    first, tokens, finished = None, 0, False
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=args.request_timeout)
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return {"ok": False, "latency": time.perf_counter() - start, "ttft": None, "tokens": 0}
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                break
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - start
                finished |= choice.get("finish_reason") is not None
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        connection.close()
    except (OSError, ValueError, http.client.HTTPException):
        return {"ok": False, "latency": time.perf_counter() - start, "ttft": None, "tokens": 0}
    return {"ok": finished, "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_clients(port: int, clients: int, args) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        for r in range(args.requests_per_client):
            digits = " ".join(str((c * 7 + r * 3 + k) % 10) for k in range(4))
            result = one_request(port, f"Repeat: {digits}", args)
            with lock:
                results.append(result)

    one_request(port, "Repeat: 1 2 3 4", args)  # warm-up (not counted)
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)

    def ms(value):
        return None if value is None else round(value * 1000, 1)

    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "generated_tokens": tokens, "latency_ms": {f"p{q}": ms(percentile(latencies, q)) for q in (50, 95, 99)},
            "ttft_ms": {f"p{q}": ms(percentile(ttfts, q)) for q in (50, 95)},
            "mean_latency_ms": ms(statistics.mean(latencies)) if latencies else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    for setting in args.settings:
        batch = args.max_batch_size if setting == "on" else 1
        process, port = start_server(args.path, batch, args)
        try:
            for clients in args.clients:
                row = {"batching": setting, "max_batch_size": batch, **run_clients(port, clients, args)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(60)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {"model": args.path, "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "server_threads": args.threads, "cpus": os.cpu_count(), "load_avg_1m_after": load, "rows": rows,
              "goal": goal(rows)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return report


def goal(rows: list[dict]) -> dict | None:
    """32 (the most) clients against one, batching on: the tokens/s ratio and the p99 latency ratio."""
    on = {r["clients"]: r for r in rows if r["batching"] == "on"}
    if 1 not in on or len(on) < 2:
        return None
    most = on[max(on)]
    one = on[1]
    speedup = most["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else None
    p99 = (most["latency_ms"]["p99"] / one["latency_ms"]["p99"]) if one["latency_ms"]["p99"] else None
    return {"clients": most["clients"], "tokens_per_s_ratio": speedup and round(speedup, 2),
            "p99_latency_ratio": p99 and round(p99, 2),
            "met": bool(speedup and p99 and speedup >= 4 and p99 <= 3 and most["errors"] == 0)}


if __name__ == "__main__":
    main()
