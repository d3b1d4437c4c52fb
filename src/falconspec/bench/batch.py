"""``falconspec bench --batch-size B [B ...]``: throughput of the engine's methods with sequences decoded in batches.

For each dtype, temperature, dataset, method and batch size B, the prompts are answered through one
:class:`~falconspec.batch.BatchGenerator` with ``max_batch=B`` (continuous batching: a finished sequence's slot is
taken by the next prompt), turn by turn: turn t of every prompt, each seeing that run's own earlier answers. Batch
size 1 always runs: it is the reference. Per row:

* **tokens/s**: all new tokens (EOS excluded) over the wall seconds of the whole run (prefills included);
* **vs batch 1**: that over the same method's tokens/s at batch size 1; **vs greedy**: over greedy's at the same
  batch size;
* **τ**: committed tokens per verification (bonus included) averaged over the sequences' cycles;
* **identical to batch 1** (greedy runs): prompts whose every turn has exactly the tokens of batch size 1; in float32
  anything below 100% is a bug.

Only the engine's own methods batch (greedy, pld, falcon, eagle, eagle3, medusa, lookahead); the others are
reported as skipped. Writes config.json, summary.json and summary.md to --out (no answer files, no plots);
``--resume`` is not supported.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict
from pathlib import Path

from ..batch import BatchGenerator
from ..generate import GenerationResult
from ..machine_load import OtherProcessesLoad
from ..models import load_target
from ..target import TargetModel
from .datasets import BenchPrompt, load_dataset
from .memory import PeakMemory
from .methods import BASELINE, EngineMethod, Skipped, build_methods
from .runner import (
    WARMUP_TOKENS,
    BenchConfig,
    _check_out,
    _write_config,
    encode_turn,
    environment,
    finish_summary,
    fits_context,
    seed_for,
)

log = logging.getLogger(__name__)


def run_batch_bench(config: BenchConfig) -> dict:
    """Run every (dtype, temperature, dataset, method, batch size); returns the summary (``mode`` "batch")."""
    if config.resume:
        raise ValueError("--resume is not supported with --batch-size: use a new --out")
    out = Path(config.out)
    _check_out(out, config)
    datasets = [load_dataset(name, config.num_prompts, config.mt_bench_file, config.max_turns)
                for name in config.datasets]
    sizes = sorted({1, *config.batch_sizes})
    summary = {"mode": "batch", "batch_sizes": sizes, "config": asdict(config),
               "environment": {"start": environment()}, "rows": [],
               "datasets": [{"name": d.name, "source": d.source, "prompts": len(d.prompts)} for d in datasets]}
    too_long: dict[str, set] = {d.name: set() for d in datasets}
    with PeakMemory(), OtherProcessesLoad() as others:
        for dtype in config.dtypes:
            target = load_target(config.model, dtype=dtype, device=config.device)
            methods, skipped = build_methods(list(config.methods), target, config.model, config.options)
            _write_config(out, config)
            skipped += [Skipped(m.name, "batch mode runs the engine's own methods only") for m in methods
                        if not isinstance(m, EngineMethod)]
            engine = [m for m in methods if isinstance(m, EngineMethod)]
            for temperature in config.temperatures:
                for dataset in datasets:
                    prompts = []
                    for index, prompt in enumerate(dataset.prompts):
                        if fits_context(target, prompt, config.max_new_tokens):
                            prompts.append((index, prompt))
                        else:
                            too_long[dataset.name].add(prompt.question_id)
                    setting = {"dtype": dtype, "temperature": temperature, "dataset": dataset.name}
                    summary["rows"] += _run_setting(config, target, engine, sizes, prompts, temperature, setting)
                    summary["rows"] += [{**setting, "method": s.method, "status": "skipped", "reason": s.reason}
                                        for s in skipped]
            del target, methods, engine
            gc.collect()
    return finish_summary(summary, too_long, others)


def _run_setting(config: BenchConfig, target: TargetModel, methods: list[EngineMethod], sizes: list[int],
                 prompts: list[tuple[int, BenchPrompt]], temperature: float, setting: dict) -> list[dict]:
    rows, greedy_speed = [], {}
    for method in methods:
        batch = {size: _batch_generator(target, method, size, config) for size in sizes}
        if prompts and config.warmup:  # untimed: calibration, caches and first-call costs
            ids = encode_turn(target, prompts[0][1], 0, [])
            batch[sizes[-1]].generate([{"input_ids": ids, "max_new_tokens": min(WARMUP_TOKENS, config.max_new_tokens),
                                        "temperature": temperature, "seed": config.seed}] * config.warmup)
        reference = None
        for size in sizes:
            answers, seconds = answer_all(batch[size], target, prompts, config.max_new_tokens, temperature,
                                          config.seed)
            results = [r for turns in answers for r in turns]
            tokens = sum(len(r.token_ids) for r in results)
            speed = tokens / seconds if seconds > 0 else float("nan")
            cycles = sum(r.stats.cycles for r in results)
            accepted = sum(r.stats.accepted_tokens for r in results)
            if size == 1:
                reference = (answers, speed)
            if method.name == BASELINE:
                greedy_speed[size] = speed
            identical = None
            if temperature == 0:
                same = [[r.token_ids for r in a] == [r.token_ids for r in b] for a, b in zip(answers, reference[0])]
                identical = {"rate": sum(same) / len(same) if same else None, "count": sum(same), "of": len(same)}
                if not all(same):
                    log.warning("%s at batch size %d: %d of %d prompts differ from batch size 1", method.name, size,
                                len(same) - sum(same), len(same))
            rows.append({**setting, "method": method.name, "batch_size": size, "status": "ok", "reason": None,
                         "prompts": len(answers), "turns": len(results), "new_tokens": tokens, "seconds": seconds,
                         "tokens_per_s": speed, "speedup_vs_batch1": speed / reference[1],
                         "speedup_vs_greedy": speed / greedy_speed[size] if size in greedy_speed else None,
                         "mean_accepted_length": 1.0 + accepted / cycles if cycles else None,
                         "identical_to_batch1": identical})
    return rows


def _batch_generator(target: TargetModel, method: EngineMethod, size: int, config: BenchConfig) -> BatchGenerator:
    # the method's drafter (planned by the batch's own planners when it was built without a fixed budget)
    return BatchGenerator(target, method.generator.drafter, planner="auto",
                          matmul_path=config.options.matmul_path, max_batch=size)


def answer_all(batch: BatchGenerator, target: TargetModel, prompts: list[tuple[int, BenchPrompt]],
               max_new_tokens: int, temperature: float, seed: int) -> tuple[list[list[GenerationResult]], float]:
    """Every prompt's turns through ``batch``, turn by turn; returns per prompt its results per turn, and the wall
    seconds spent generating."""
    answers: list[list[GenerationResult]] = [[] for _ in prompts]
    seconds = 0.0
    for turn in range(max((len(p.turns) for _, p in prompts), default=0)):
        todo = [k for k, (_, prompt) in enumerate(prompts) if turn < len(prompt.turns)]
        requests = [{"input_ids": encode_turn(target, prompts[k][1], turn, [r.text for r in answers[k]]),
                     "max_new_tokens": max_new_tokens, "temperature": temperature,
                     "seed": seed_for(seed, prompts[k][0], turn) if temperature > 0 else None} for k in todo]
        start = time.perf_counter()
        results = batch.generate(requests)
        seconds += time.perf_counter() - start
        for k, result in zip(todo, results):
            answers[k].append(result)
    return answers, seconds


# ---------------------------------------------------------------------------------------------- report
LEGEND = """\
Columns: **tokens/s**: all new tokens (EOS excluded) over the wall seconds of the whole run, prefills included, the
prompts answered by one BatchGenerator with at most that many sequences at once; **vs batch 1**: over the same
method's tokens/s at batch size 1; **vs greedy**: over greedy's at the same batch size; **τ**: committed tokens per
verification, bonus included; **identical to batch 1** (greedy runs): prompts whose every turn has exactly the
tokens of batch size 1 (float32: anything less is a bug).
"""
COLUMNS = ("dataset", "method", "batch size", "tokens/s", "vs batch 1", "vs greedy", "τ", "identical to batch 1")


def batch_markdown(summary: dict) -> str:
    from .report import _by_setting, header

    config = summary["config"]
    lines = header(summary, f"falconspec bench (batched): {config['model']}")
    lines += [f"Batch sizes {', '.join(map(str, summary['batch_sizes']))}; max-new-tokens {config['max_new_tokens']}, "
              f"seed {config['seed']}, device {config['device']}.", ""]
    for entry in summary["datasets"]:
        skipped = entry.get("skipped_too_long") or []
        note = f"; {len(skipped)} skipped as too long for the context: {skipped}" if skipped else ""
        lines.append(f"- **{entry['name']}**: {entry['prompts']} prompts from `{entry['source']}`{note}")
    lines.append("")
    for (dtype, temperature), rows in _by_setting(summary["rows"]).items():
        mode = "greedy" if temperature == 0 else f"sampling, temperature {temperature:g}"
        lines += [f"## {dtype}, {mode}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in rows:
            if r["status"] != "ok":
                continue
            same = r["identical_to_batch1"]
            lines.append("| " + " | ".join([
                r["dataset"], r["method"], str(r["batch_size"]), f"{r['tokens_per_s']:.1f}",
                f"{r['speedup_vs_batch1']:.2f}x",
                "–" if r["speedup_vs_greedy"] is None else f"{r['speedup_vs_greedy']:.2f}x",
                "–" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}",
                "–" if same is None else f"{same['count']}/{same['of']}"]) + " |")
        lines.append("")
        lines += [f"- **{r['method']}** {r['status']} ({r['dataset']}): {r['reason']}" for r in rows
                  if r["status"] != "ok"]
        lines.append("")
    return "\n".join(lines + [LEGEND])
