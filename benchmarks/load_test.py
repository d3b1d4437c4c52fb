"""A small, bounded load test of a running ``falconspec serve`` (loopback only).

Sends ``--requests`` streaming chat completions from ``--concurrency`` client threads with the openai client and
reports end-to-end latency and time to first token (p50/p90/max), aggregate output tokens/s, and the speculative
statistics the server returns with each answer (mean accepted length, acceptance rate).

    falconspec serve --model smollm2-135m --drafter pld --port 8000 &
    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --requests 12 --concurrency 3 --max-tokens 32

Every request must succeed and end with a final chunk carrying ``usage``; failures are listed and make the exit
status 1. Numbers from a shared or busy machine measure that machine, not the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ipaddress
import json
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import httpx
import openai

PROMPTS = [
    "List the numbers from 1 to 20, separated by commas.",
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
    "Write a Python function that returns the squares of a list of numbers.",
    "Explain in two sentences what a hash table is.",
    "Translate to French: good morning, how are you today?",
    "Write the alphabet in capital letters, separated by spaces.",
    "Give three tips for writing clear emails.",
    "What is the capital of France? Answer in one sentence.",
]
MAX_REQUESTS, MAX_CONCURRENCY = 1000, 32


@dataclass
class Outcome:
    prompt: int
    latency: float  # seconds, request sent -> final chunk
    ttft: float  # seconds, request sent -> first non-empty text
    completion_tokens: int
    cycles: int
    accepted_tokens: int
    drafted_tokens: int
    finish_reason: str


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"load_test.py only targets loopback servers; {host!r} resolves to {sorted(addresses)}")


def one_request(api: openai.OpenAI, model: str, index: int, args: argparse.Namespace) -> Outcome:
    prompt = index % len(PROMPTS)
    start = time.perf_counter()
    ttft, final = None, None
    stream = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[prompt]}], max_tokens=args.max_tokens,
        temperature=args.temperature, seed=index, stream=True)
    for chunk in stream:
        if not chunk.choices:
            continue
        if ttft is None and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.choices[0].finish_reason is not None:
            final = chunk
    latency = time.perf_counter() - start
    if final is None or final.usage is None:
        raise RuntimeError("the stream ended without a final chunk carrying usage")
    spec = final.model_extra["speculative"]
    return Outcome(prompt, latency, latency if ttft is None else ttft, final.usage.completion_tokens,
                   spec["cycles"], spec["accepted_tokens"], spec["drafted_tokens"], final.choices[0].finish_reason)


def percentiles(values: list[float]) -> dict:
    if len(values) < 2:
        return {"p50": values[0], "p90": values[0], "max": values[0]} if values else {}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"p50": statistics.median(values), "p90": deciles[8], "max": max(values)}


def summarize(outcomes: list[Outcome], failures: list[str], wall: float, args: argparse.Namespace) -> dict:
    tokens = sum(o.completion_tokens for o in outcomes)
    cycles = sum(o.cycles for o in outcomes)
    accepted = sum(o.accepted_tokens for o in outcomes)
    drafted = sum(o.drafted_tokens for o in outcomes)
    return {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "succeeded": len(outcomes), "failed": len(failures),
        "wall_seconds": wall, "completion_tokens": tokens, "output_tokens_per_second": tokens / wall if wall else 0.0,
        "latency_seconds": percentiles([o.latency for o in outcomes]),
        "ttft_seconds": percentiles([o.ttft for o in outcomes]),
        "mean_accepted_length": 1 + accepted / cycles if cycles else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "finish_reasons": dict(Counter(o.finish_reason for o in outcomes)),
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--out", default=None, help="also write the summary and per-request rows as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency in [1, {MAX_CONCURRENCY}]")
    check_loopback(args.base_url)

    api = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0,
                        timeout=args.timeout)
    model = args.model or api.models.list().data[0].id
    outcomes, failures = [], []
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        futures = {pool.submit(one_request, api, model, i, args): i for i in range(args.requests)}
        for future in concurrent.futures.as_completed(futures):
            try:
                outcomes.append(future.result())
            except Exception as err:  # report every failure, keep measuring the rest
                failures.append(f"request {futures[future]}: {type(err).__name__}: {err}")
    wall = time.perf_counter() - start

    summary = summarize(outcomes, failures, wall, args)
    summary["model"] = model
    summary["server_metrics_url"] = args.base_url.rstrip("/") + "/metrics"
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "requests": [asdict(o) for o in outcomes]}, f, indent=2)
    with httpx.Client(timeout=30) as http:  # the server must still be healthy afterwards
        healthy = http.get(args.base_url.rstrip("/") + "/health").status_code == 200
    return 0 if not failures and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
