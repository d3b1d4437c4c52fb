"""The benchmark loop: every method answers the same prompts, interleaved prompt by prompt, after a warm-up.

For each dtype the target is loaded once and shared by all methods; for each temperature and dataset the loop runs
prompt 1 with methods A, B, C, then prompt 2 with A, B, C, ... so that machine drift hits all methods alike. A
multi-turn prompt is answered turn by turn, each turn seeing the same method's earlier answers. Sampling seeds are
``seed + 100 * prompt index + turn``, the same for every method. Answer files are appended after each prompt, and
``resume`` skips the prompts every method has already answered in an earlier run with the same settings.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..calibrate import cpu_info
from ..kernels import STOCK
from ..machine_load import OtherProcessesLoad
from ..models import load_target, parse_dtype
from ..target import TargetModel
from .answers import AnswerKey, PromptRecord, append_answers, read_answers
from .datasets import BenchPrompt, Dataset, load_dataset
from .memory import PeakMemory
from .methods import (BASELINE, EngineMethod, Method, MethodOptions, Skipped, TurnResult, baseline_of, build_methods,
                      expand_method_names)
from .reference import fp32_agreement, summarize_agreement
from .stats import summarize

log = logging.getLogger(__name__)

WARMUP_TOKENS = 16
TOKEN_SLACK = 8  # per turn: re-encoding an answer's text may give a few more tokens than were generated


@dataclass(frozen=True)
class BenchConfig:
    out: str
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("all",)
    datasets: tuple[str, ...] = ("mt-bench",)
    max_new_tokens: int = 256
    temperatures: tuple[float, ...] = (0.0,)
    dtypes: tuple[str, ...] = ("float32",)
    num_prompts: int | None = None  # the first N prompts of each dataset; None = all
    max_turns: int | None = None  # answer only the first N turns of multi-turn prompts; None = all
    seed: int = 0
    device: str = "cpu"
    warmup: int = 1  # warm-up generations per method and setting (not timed, not saved)
    resume: bool = False
    mt_bench_file: str | None = None
    options: MethodOptions = field(default_factory=MethodOptions)
    progress: bool = True
    batch_sizes: tuple[int, ...] | None = None  # batch mode (bench/batch.py): throughput per batch size


    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.warmup < 0 or (self.num_prompts is not None and self.num_prompts < 1):
            raise ValueError("need max_new_tokens >= 1, warmup >= 0 and num_prompts >= 1")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1 (or None for every turn), got {self.max_turns}")
        if any(not math.isfinite(t) or t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures must be finite numbers >= 0 (0 = greedy), got {list(self.temperatures)}")
        for dtype in self.dtypes:
            parse_dtype(dtype)
        expand_method_names(list(self.methods))
        if not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"give one or more distinct datasets, got {list(self.datasets)}")
        if self.batch_sizes is not None and (not self.batch_sizes or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes)):
            raise ValueError(f"batch sizes must be integers >= 1, got {self.batch_sizes}")

    def resumable_fields(self) -> dict:
        """The settings an earlier run must share for its answers to be reused."""
        fields = asdict(self)
        for name in ("out", "resume", "progress", "num_prompts", "warmup"):
            fields.pop(name)
        return json.loads(json.dumps(fields))


def run_bench(config: BenchConfig) -> dict:
    """Run every (dtype, temperature, dataset, method) and return the summary (rows + environment); with
    ``batch_sizes``, the batched throughput benchmark instead (:mod:`.batch`)."""
    if config.batch_sizes is not None:
        from .batch import run_batch_bench

        return run_batch_bench(config)
    out = Path(config.out)
    _check_out(out, config)
    datasets = [load_dataset(name, config.num_prompts, config.mt_bench_file, config.max_turns)
                for name in config.datasets]
    if len({d.name for d in datasets}) != len(datasets):
        raise ValueError(f"two datasets share the name {[d.name for d in datasets]}: rename one of the files")
    summary = {"config": asdict(config), "environment": {"start": environment()}, "rows": [],
               "datasets": [{"name": d.name, "source": d.source, "prompts": len(d.prompts)} for d in datasets]}
    too_long: dict[str, set] = {d.name: set() for d in datasets}
    reference = None  # the float32 model that bf16/fp16 greedy answers are checked against (reference.py)
    with PeakMemory() as memory, OtherProcessesLoad() as others:
        for dtype in config.dtypes:
            target = load_target(config.model, dtype=dtype, device=config.device)
            methods, skipped = build_methods(list(config.methods), target, config.model, config.options)
            summary["environment"].setdefault("product_paths", {})[dtype] = product_paths(target, methods)
            _write_config(out, config)  # only now: a run that failed to start leaves no directory to --resume
            if parse_dtype(dtype) != torch.float32 and 0.0 in config.temperatures and reference is None:
                reference = load_target(config.model, dtype="float32", device=config.device)
            for temperature in config.temperatures:
                check = reference if temperature == 0 and parse_dtype(dtype) != torch.float32 else None
                setting = _Setting(config, target, dtype, temperature, memory, check)
                summary["rows"] += setting.run(methods, skipped, datasets, too_long)
            del target, methods, setting
            gc.collect()
    return finish_summary(summary, too_long, others)


def finish_summary(summary: dict, too_long: dict[str, set], others: OtherProcessesLoad) -> dict:
    """Close a run's summary: the prompts each dataset skipped as too long, the machine's state at the end and the
    CPU other processes used during the run."""
    for entry in summary["datasets"]:
        entry["skipped_too_long"] = sorted(too_long[entry["name"]], key=str)
    summary["environment"]["end"] = environment()
    summary["environment"]["other_processes"] = others.summary()
    return summary


class _Setting:
    """One (dtype, temperature): warm-up, then every dataset with the interleaved loop."""

    def __init__(self, config: BenchConfig, target: TargetModel, dtype: str, temperature: float, memory: PeakMemory,
                 reference: TargetModel | None = None):
        self.config, self.target, self.dtype, self.temperature, self.memory = config, target, dtype, temperature, memory
        self.reference = reference  # float32 model to check greedy answers against (bf16/fp16 runs)
        self.model_id = Path(config.model).name

    def run(self, methods: list[Method], skipped: list[Skipped], datasets: list[Dataset],
            too_long: dict[str, set]) -> list[dict]:
        failed: list[Skipped] = []
        budget = self.config.max_new_tokens
        first = next((p for d in datasets for p in d.prompts if fits_context(self.target, p, budget)), None)
        if first is None:
            raise ValueError(f"no prompt fits the model's context of {self.target.max_context} tokens with "
                             f"{self.config.max_new_tokens} new tokens per turn: lower --max-new-tokens")
        active = self._warm_up(methods, first, failed)
        rows = []
        for dataset in datasets:
            records = self._run_dataset(dataset, active, failed, too_long[dataset.name])
            rows += self._rows(dataset, methods, records, skipped + failed)
        return rows

    def _warm_up(self, methods: list[Method], prompt: BenchPrompt, failed: list[Skipped]) -> list[Method]:
        active = []
        ids = encode_turn(self.target, prompt, 0, [])
        for method in methods:
            try:
                for _ in range(self.config.warmup):
                    method.generate(ids, min(WARMUP_TOKENS, self.config.max_new_tokens), self.temperature,
                                    self.config.seed)
                active.append(method)
            except Exception as err:  # reported as a failed method, with the error, never dropped silently
                log.warning("%s failed in warm-up", method.name, exc_info=True)
                failed.append(Skipped(method.name, f"failed in warm-up: {type(err).__name__}: {err}"))
        if not active or active[0].name != BASELINE:
            reason = next((f.reason for f in failed if f.method == BASELINE), "not built")
            raise RuntimeError(f"the baseline {BASELINE!r} cannot run ({reason}): no speed-up can be measured")
        return active

    def _run_dataset(self, dataset: Dataset, active: list[Method], failed: list[Skipped],
                     too_long: set) -> dict[str, dict]:
        """Answer the dataset's prompts, interleaved; returns method -> question_id -> PromptRecord."""
        from tqdm import tqdm

        keys = {m.name: AnswerKey(dataset.name, m.name, self.dtype, self.temperature) for m in active}
        out = Path(self.config.out)
        records = {m.name: read_answers(out, keys[m.name]) if self.config.resume else {} for m in active}
        done = set.intersection(*(set(r) for r in records.values()))
        todo = []
        for index, prompt in enumerate(dataset.prompts):
            if not fits_context(self.target, prompt, self.config.max_new_tokens):
                too_long.add(prompt.question_id)
            elif prompt.question_id not in done:
                todo.append((index, prompt))
        desc = f"{dataset.name} {self.dtype} T={self.temperature:g}"
        with tqdm(total=len(todo) * len(active), desc=desc, disable=not self.config.progress) as bar:
            for index, prompt in todo:
                answered = {}
                for method in list(active):
                    bar.set_postfix_str(method.name)
                    try:
                        answered[method.name] = self._answer(method, prompt, index)
                    except Exception as err:  # the method is reported as failed and stops; the others go on
                        reason = f"failed on {dataset.name} question {prompt.question_id}: {type(err).__name__}: {err}"
                        if method.name == BASELINE:
                            raise RuntimeError(f"the baseline {reason}: no speed-up can be measured") from err
                        log.warning("%s failed on %s", method.name, prompt.question_id, exc_info=True)
                        failed.append(Skipped(method.name, reason))
                        active.remove(method)
                    bar.update(1)
                for name, record in answered.items():
                    append_answers(out, keys[name], [record], self.model_id)
                    records[name][prompt.question_id] = record
        return records

    def _answer(self, method: Method, prompt: BenchPrompt, index: int) -> PromptRecord:
        turns: list[TurnResult] = []
        with self.memory.track():
            for turn in range(len(prompt.turns)):
                ids = encode_turn(self.target, prompt, turn, [t.text for t in turns])
                seed = seed_for(self.config.seed, index, turn) if self.temperature > 0 else None
                turns.append(method.generate(ids, self.config.max_new_tokens, self.temperature, seed))
        return PromptRecord(prompt.question_id, prompt.category, turns, self.memory.last_peak_mb)

    def _rows(self, dataset: Dataset, methods: list[Method], records: dict[str, dict], unavailable: list[Skipped]):
        setting = {"dtype": self.dtype, "temperature": self.temperature, "dataset": dataset.name}
        reasons = {s.method: s.reason for s in unavailable}
        rows = []
        for name in expand_method_names(list(self.config.methods)):
            method = next((m for m in methods if m.name == name), None)
            baseline = baseline_of(name)  # greedy, or the method COMPARED_WITH names
            if name in reasons:
                status = "failed" if method is not None else "skipped"
                rows.append({**setting, "method": name, "status": status, "reason": reasons[name]})
                continue
            if baseline in reasons:  # its answers are kept, but there is nothing to compare them with
                rows.append({**setting, "method": name, "status": "failed",
                             "reason": f"not compared: {baseline}, the method it is compared with, did not run "
                                       f"({reasons[baseline]})"})
                continue
            # our engine samples by position from the seed, so its sampled answers match its plain decoding's
            same_draws = isinstance(method, EngineMethod) and baseline == BASELINE
            stats = summarize(records[name], records[baseline], self.temperature, method.num_parameters(),
                              same_draws)
            if self.reference is not None:
                stats["fp32_agreement"] = self._agreement(dataset, records[name])
            rows.append({**setting, "method": name, "status": "ok", "reason": None, "baseline": baseline, **stats,
                         "drafter": method.drafter_source()})
        return rows

    def _agreement(self, dataset: Dataset, records: dict) -> dict:
        """Agreement of one method's answers with the float32 reference (see reference.py)."""
        per_prompt = []
        for prompt in dataset.prompts:
            record = records.get(prompt.question_id)
            if record is None:
                continue
            checks = []
            for turn, result in enumerate(record.turns):
                ids = encode_turn(self.target, prompt, turn, [t.text for t in record.turns[:turn]])
                checks.append(fp32_agreement(self.reference, ids, result.token_ids, result.finish_reason == "stop"))
            per_prompt.append(checks)
        return summarize_agreement(per_prompt)


def encode_turn(target: TargetModel, prompt: BenchPrompt, turn: int, answers: list[str]) -> list[int]:
    """Prompt token ids for one turn: through the chat template, or the plain text of a non-chat prompt."""
    if not prompt.chat:
        return target.encode(prompt=prompt.turns[0])
    return target.encode(messages=prompt.messages(turn, answers))


def fits_context(target: TargetModel, prompt: BenchPrompt, max_new_tokens: int) -> bool:
    """Whether every turn fits the model's context, assuming each answer uses the whole token budget."""
    last = len(prompt.turns) - 1
    length = len(encode_turn(target, prompt, last, [""] * last))
    return length + len(prompt.turns) * (max_new_tokens + TOKEN_SLACK) <= target.max_context


def seed_for(seed: int, prompt_index: int, turn: int) -> int:
    return seed + 100 * prompt_index + turn


def product_paths(target: TargetModel, methods: list[Method]) -> dict:
    """The row counts whose products the engine's methods ran on each path other than stock (:mod:`..kernels`), and
    the verification cost curve of the calibration that chose them (none when no engine method drafts): a speed-up
    depends on both."""
    calibration = next((m.generator.calibration for m in methods
                        if isinstance(m, EngineMethod) and m.generator.calibration is not None), None)
    policy = target.matmul_policy
    out = {"sizes_by_path": {path: sorted(policy.sizes(path)) for path in sorted(set(policy.paths.values()))
                             if path != STOCK},
           "calibration": None}
    if calibration is not None:
        out["calibration"] = {"file": calibration.path.name if calibration.path else None, "sizes": calibration.sizes,
                              "verify_ms": {path: [round(s * 1e3, 2) for s in seconds]
                                            for path, seconds in calibration.data["verify"]["seconds"].items()},
                              "busy": calibration.measured_on_busy_machine()}
    return out


def environment() -> dict:
    import transformers

    from .. import __version__
    from .llamacpp import xllamacpp_version

    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average": list(os.getloadavg()),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu_info()[0],
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "falconspec": __version__, "xllamacpp": xllamacpp_version()}


def _check_out(out: Path, config: BenchConfig) -> None:
    """An output directory holds one benchmark; a resumed run must have the settings of the run it continues."""
    path = out / "config.json"
    if not path.exists():
        return
    if not config.resume:
        raise ValueError(f"{out} already holds a benchmark: pass --resume to continue it, or a new --out")
    old = json.loads(path.read_text())
    new = config.resumable_fields()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{out} holds a benchmark run with other settings ({', '.join(changed)}): resume with "
                         "the same settings or use a new --out")


def _write_config(out: Path, config: BenchConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.resumable_fields(), indent=1))
