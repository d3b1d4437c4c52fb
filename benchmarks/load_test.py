"""A bounded load test of ``falconspec serve`` (loopback only): the issue-13 load, and batched vs one-at-a-time.

Sends ``--requests`` (60) streamed chat completions from ``--concurrency`` (6) client threads with the openai client:
mixed prompts and mixed lengths (request i asks for a ``max_tokens`` spread over ``--min-tokens``..``--max-tokens``,
16..96, and prompt i mod 10). Reports aggregate output tokens/s, time to first token and end-to-end latency
(p50/p90/max), and the speculative statistics the server returns (mean accepted length, acceptance rate).

Every response is checked as it arrives: one stream id, exactly one final chunk carrying ``usage``, at most
``max_tokens`` tokens (exactly that many when it ends with ``length``), the same count in ``usage`` and in the
speculative statistics, no text after the final chunk. A failed or
corrupted response is listed and makes the exit status 1. With ``--check-solo`` every request is then sent again
alone (one at a time, nothing else running) and each greedy answer of the load must be identical to it (text, token
count, finish reason).

Against a running server:

    falconspec serve --model smollm2-135m --drafter pld --port 8000 &
    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --check-solo --out result.json

Batched against one at a time (``--compare``): starts ``falconspec serve`` once per ``--batch-sizes`` value (default
1 and 6; ``--serve-arg`` passes more options), runs the same load against each, checks that every answer of the
batched servers is identical to the one-at-a-time server's (``--max-batch 1`` generates each request alone), and
writes both results and the throughput ratio (default: benchmarks/results/load-test-batching.json):

    python benchmarks/load_test.py --compare --model smollm2-135m --drafter pld

Numbers from a shared or busy machine measure that machine, not the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
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
    ("Here is a function:\n\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
     "Write a mul and a div function in the same style, then a short docstring for each of the four."),
    ("Summarize the plot of a story in which a young engineer builds a small robot from spare parts, the robot "
     "learns to paint, and the town holds an exhibition of its paintings. Use at most four sentences."),
]
MAX_REQUESTS, MAX_CONCURRENCY = 1000, 32
DEFAULT_COMPARE_OUT = Path(__file__).parent / "results" / "load-test-batching.json"


@dataclass(frozen=True)
class Spec:
    """One request of the load: the same index always means the same request."""

    index: int
    prompt: int
    max_tokens: int


@dataclass
class Outcome:
    index: int
    prompt: int
    max_tokens: int
    latency: float  # seconds, request sent -> final chunk
    ttft: float  # seconds, request sent -> first non-empty text
    completion_tokens: int
    cycles: int
    accepted_tokens: int
    drafted_tokens: int
    finish_reason: str
    text: str

    def answer(self) -> tuple:
        return self.text, self.completion_tokens, self.finish_reason


class CorruptResponse(RuntimeError):
    """A response that arrived but breaks the protocol or its own numbers."""


def make_specs(requests: int, min_tokens: int, max_tokens: int) -> list[Spec]:
    """Mixed prompts and lengths, spread evenly (a stride coprime to most spans) and the same on every run."""
    span = max_tokens - min_tokens + 1
    return [Spec(i, i % len(PROMPTS), min_tokens + (i * 37) % span) for i in range(requests)]


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"load_test.py only targets loopback servers; {host!r} resolves to {sorted(addresses)}")


def one_request(api: openai.OpenAI, model: str, spec: Spec, temperature: float) -> Outcome:
    start = time.perf_counter()
    ttft, final, ids, pieces = None, None, set(), []
    stream = api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[spec.prompt]}], max_tokens=spec.max_tokens,
        temperature=temperature, seed=spec.index, stream=True)
    for chunk in stream:
        ids.add(chunk.id)
        if not chunk.choices:
            continue
        piece = chunk.choices[0].delta.content or ""
        if piece and final is not None:
            raise CorruptResponse("text after the final chunk")
        if ttft is None and piece:
            ttft = time.perf_counter() - start
        pieces.append(piece)
        if chunk.choices[0].finish_reason is not None:
            if final is not None:
                raise CorruptResponse("two final chunks")
            final = chunk
    latency = time.perf_counter() - start
    if final is None or final.usage is None:
        raise CorruptResponse("the stream ended without a final chunk carrying usage")
    if len(ids) != 1:
        raise CorruptResponse(f"{len(ids)} different ids in one stream")
    text, tokens, reason = "".join(pieces), final.usage.completion_tokens, final.choices[0].finish_reason
    if reason not in ("stop", "length") or tokens > spec.max_tokens or (reason == "length"
                                                                        and tokens != spec.max_tokens):
        raise CorruptResponse(f"finish_reason {reason!r} with {tokens} tokens of max_tokens {spec.max_tokens}")
    spec_stats = final.model_extra["speculative"]
    if spec_stats["new_tokens"] != tokens:
        raise CorruptResponse(f"usage says {tokens} tokens, the speculative statistics {spec_stats['new_tokens']}")
    return Outcome(spec.index, spec.prompt, spec.max_tokens, latency, latency if ttft is None else ttft, tokens,
                   spec_stats["cycles"], spec_stats["accepted_tokens"], spec_stats["drafted_tokens"], reason, text)


def run_load(api: openai.OpenAI, model: str, specs: list[Spec], concurrency: int,
             temperature: float) -> tuple[dict[int, Outcome], list[str], float]:
    outcomes, failures = {}, []
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(one_request, api, model, spec, temperature): spec for spec in specs}
        for future in concurrent.futures.as_completed(futures):
            try:
                outcomes[futures[future].index] = future.result()
            except Exception as err:  # report every failure, keep measuring the rest
                failures.append(f"request {futures[future].index}: {type(err).__name__}: {err}")
    return outcomes, sorted(failures), time.perf_counter() - start


def compare_answers(outcomes: dict[int, Outcome], reference: dict[int, tuple]) -> list[str]:
    """Every answer against the reference answer of the same request (text, token count, finish reason)."""
    mismatches = []
    for index, outcome in sorted(outcomes.items()):
        want = reference.get(index)
        if want is None:
            mismatches.append(f"request {index}: no reference answer")
        elif outcome.answer() != tuple(want):
            text, tokens, reason = want
            mismatches.append(f"request {index}: {outcome.completion_tokens} tokens ({outcome.finish_reason}) "
                              f"{outcome.text[:60]!r}... vs alone {tokens} tokens ({reason}) {text[:60]!r}...")
    return mismatches


def solo_answers(api: openai.OpenAI, model: str, specs: list[Spec], temperature: float) -> dict[int, tuple]:
    """Each request sent again alone (one at a time, nothing else in flight)."""
    return {spec.index: one_request(api, model, spec, temperature).answer() for spec in specs}


def percentiles(values: list[float]) -> dict:
    if len(values) < 2:
        return {"p50": values[0], "p90": values[0], "max": values[0]} if values else {}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"p50": statistics.median(values), "p90": deciles[8], "max": max(values)}


def server_batch_sizes(base_url: str) -> dict:
    """Mean sequences per batch cycle, from the server's /metrics (cumulative since it started)."""
    from prometheus_client.parser import text_string_to_metric_families

    with contextlib.suppress(Exception):
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=30).text
        samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if not s.labels}
        cycles = samples.get("falconspec_batch_size_count", 0)
        return {"cycles": cycles, "mean_batch_size": samples.get("falconspec_batch_size_sum", 0) / cycles
                if cycles else 0.0, "max_batch": samples.get("falconspec_max_batch")}
    return {}


def summarize(outcomes: dict[int, Outcome], failures: list[str], wall: float, args: argparse.Namespace) -> dict:
    rows = list(outcomes.values())
    tokens = sum(o.completion_tokens for o in rows)
    cycles = sum(o.cycles for o in rows)
    accepted = sum(o.accepted_tokens for o in rows)
    drafted = sum(o.drafted_tokens for o in rows)
    return {
        "requests": args.requests, "concurrency": args.concurrency, "min_tokens": args.min_tokens,
        "max_tokens": args.max_tokens, "temperature": args.temperature, "succeeded": len(rows),
        "failed": len(failures), "wall_seconds": wall, "completion_tokens": tokens,
        "output_tokens_per_second": tokens / wall if wall else 0.0,
        "ttft_seconds": percentiles([o.ttft for o in rows]),
        "latency_seconds": percentiles([o.latency for o in rows]),
        "mean_accepted_length": 1 + accepted / cycles if cycles else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "finish_reasons": dict(Counter(o.finish_reason for o in rows)),
        "failures": failures,
    }


def request_rows(outcomes: dict[int, Outcome]) -> list[dict]:
    rows = []
    for _, outcome in sorted(outcomes.items()):
        row = asdict(outcome)
        text = row.pop("text")
        row["text_sha1"] = hashlib.sha1(text.encode()).hexdigest()
        row["text_start"] = text[:80]
        rows.append(row)
    return rows


def measure(base_url: str, args: argparse.Namespace, specs: list[Spec],
            reference: dict[int, tuple] | None = None) -> tuple[dict, dict[int, Outcome]]:
    """The load against one server: summary (with the answer checks) and the outcomes."""
    api = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0,
                        timeout=args.timeout)
    model = args.served_model or api.models.list().data[0].id
    for spec in specs[:args.warmup]:  # first requests pay for lazy set-up (allocations, caches): not measured
        one_request(api, model, Spec(spec.index, spec.prompt, min(spec.max_tokens, 8)), args.temperature)
    batch_before = server_batch_sizes(base_url)
    outcomes, failures, wall = run_load(api, model, specs, args.concurrency, args.temperature)
    summary = summarize(outcomes, failures, wall, args)
    summary["model"] = model
    batch_after = server_batch_sizes(base_url)
    if batch_after:
        cycles = batch_after["cycles"] - batch_before.get("cycles", 0)
        summed = (batch_after["mean_batch_size"] * batch_after["cycles"]
                  - batch_before.get("mean_batch_size", 0) * batch_before.get("cycles", 0))
        summary["server"] = {"max_batch": batch_after["max_batch"], "batch_cycles": cycles,
                             "mean_batch_size": summed / cycles if cycles else 0.0}
    greedy = args.temperature == 0
    if args.check_solo and reference is None:
        if greedy:
            reference = solo_answers(api, model, specs, args.temperature)
        else:
            summary["solo_check"] = "skipped: only greedy answers are compared (--temperature 0)"
    if reference is not None and greedy:
        mismatches = compare_answers(outcomes, reference)
        summary["identical_to_alone"] = len(outcomes) - len(mismatches)
        summary["mismatches"] = mismatches
    with httpx.Client(timeout=30) as http:  # the server must still be healthy afterwards
        summary["healthy_after"] = http.get(base_url.rstrip("/") + "/health").status_code == 200
    return summary, outcomes


def passed(summary: dict) -> bool:
    return not summary["failures"] and not summary.get("mismatches") and summary["healthy_after"]


# -------------------------------------------------------------------- --compare: start the servers ourselves
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(args: argparse.Namespace, max_batch: int, log_path: Path):
    """``falconspec serve --max-batch max_batch`` on a free loopback port, until the block ends (then SIGTERM)."""
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from falconspec.cli import main; sys.exit(main())", "serve",
           "--model", args.model, "--drafter", args.drafter, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(max(16, args.concurrency)),
           "--max-tokens-limit", str(max(args.max_tokens, 8)), "--log-level", "warning", *args.serve_arg]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:  # loading the model, and calibrating it the first time it meets this machine
            if proc.poll() is not None:
                raise SystemExit(f"falconspec serve --max-batch {max_batch} exited with {proc.returncode}; "
                                 f"log: {log_path}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"falconspec serve --max-batch {max_batch} did not come up in "
                                 f"{args.startup_timeout:g} s; log: {log_path}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def compare(args: argparse.Namespace, specs: list[Spec]) -> int:
    sizes = sorted(set(args.batch_sizes), key=lambda n: (n != 1, n))  # one at a time first: the reference
    args.check_solo = False  # the one-at-a-time server's answers are the solo answers
    logs = Path(tempfile.mkdtemp(prefix="falconspec-load-test-"))
    runs, rows, reference = {}, {}, None
    for max_batch in sizes:
        print(f"--- falconspec serve --max-batch {max_batch} (log: {logs / f'serve-{max_batch}.log'})", flush=True)
        with serve(args, max_batch, logs / f"serve-{max_batch}.log") as base:
            # the first server generates each request alone when it runs one at a time: its answers are the reference
            summary, outcomes = measure(base, args, specs, reference if max_batch != 1 else None)
        if max_batch == 1 and args.temperature == 0 and len(outcomes) == len(specs):
            reference = {i: o.answer() for i, o in outcomes.items()}
        runs[f"max_batch_{max_batch}"] = summary
        rows[f"max_batch_{max_batch}"] = request_rows(outcomes)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("failures", "mismatches")}, indent=2))
    first, last = runs[f"max_batch_{sizes[0]}"], runs[f"max_batch_{sizes[-1]}"]
    result = {
        "description": "the same streamed load (openai client) against falconspec serve with each --max-batch; "
                       "answers of batched servers compared with the one-at-a-time server's",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": args.model, "drafter": args.drafter, "serve_args": args.serve_arg, "batch_sizes": sizes,
        "runs": runs,
        "throughput_ratio": (last["output_tokens_per_second"] / first["output_tokens_per_second"]
                             if first["output_tokens_per_second"] else None),
        "ttft_p50_ratio": (last["ttft_seconds"]["p50"] / first["ttft_seconds"]["p50"]
                           if first["ttft_seconds"] and last["ttft_seconds"] else None),
        "passed": all(passed(run) for run in runs.values()) and all(
            run.get("identical_to_alone") == len(specs) for name, run in runs.items()
            if name != "max_batch_1" and 1 in sizes and args.temperature == 0),
        "requests": rows,
    }
    out = Path(args.out or DEFAULT_COMPARE_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"throughput ratio (max_batch {sizes[-1]} / {sizes[0]}): {result['throughput_ratio']}; written to {out}")
    for name, run in runs.items():
        for problem in run["failures"] + run.get("mismatches", []):
            print(f"{name}: {problem}", file=sys.stderr)
    return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (not with --compare)")
    parser.add_argument("--served-model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--min-tokens", type=int, default=16, help="shortest max_tokens of a request")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest max_tokens of a request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=1, help="short requests sent first, not measured")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--check-solo", action="store_true",
                        help="then send every request again alone; each greedy answer must be identical")
    parser.add_argument("--out", default=None,
                        help=f"write the summary and per-request rows as JSON here (--compare: default "
                             f"{DEFAULT_COMPARE_OUT.relative_to(Path(__file__).parent.parent)})")
    compare_args = parser.add_argument_group("--compare: start falconspec serve per batch size and compare")
    compare_args.add_argument("--compare", action="store_true")
    compare_args.add_argument("--model", default="smollm2-135m")
    compare_args.add_argument("--drafter", default="pld")
    compare_args.add_argument("--batch-sizes", default="1,6",
                              help="--max-batch of each server, the one-at-a-time one first (default: %(default)s)")
    compare_args.add_argument("--serve-arg", action="append", default=[],
                              help="one more argument for falconspec serve (repeat: --serve-arg=--threads "
                                   "--serve-arg=1)")
    compare_args.add_argument("--startup-timeout", type=float, default=900.0,
                              help="seconds for a server to come up (the first one may calibrate)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency in [1, {MAX_CONCURRENCY}]")
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need 1 <= --min-tokens <= --max-tokens")
    specs = make_specs(args.requests, args.min_tokens, args.max_tokens)
    if args.compare:
        try:
            args.batch_sizes = [int(n) for n in args.batch_sizes.split(",")]
        except ValueError:
            parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
        if not args.batch_sizes or min(args.batch_sizes) < 1:
            parser.error("--batch-sizes must be integers >= 1")
        return compare(args, specs)

    check_loopback(args.base_url)
    summary, outcomes = measure(args.base_url, args, specs)
    summary["server_metrics_url"] = args.base_url.rstrip("/") + "/metrics"
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "requests": request_rows(outcomes)}, f, indent=2)
    return 0 if passed(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
